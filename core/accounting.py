"""Exact parameter and FLOP accounting from a ModelConfig (total vs active).

FLOP convention: a matmul of [m, k] x [k, n] costs 2*m*k*n. Forward FLOPs per token count every matmul:
  attention projections  2*D*(H*Dh) + 2*2*D*(G*Dh) + 2*(H*Dh)*D
  attention scores+mix   2*2*H*Dh*S   with S = seq_len (the full T x T score matrix, as SDPA computes it
                         and as FlopCounterMode and PaLM's MFU formula count it; causal masking is not halved)
  latent attention (MLA) 2*(q params) + 2*D*(R+Dr) + 2*R*H*(Dn+Dv) + 2*H*Dv*D + 2*H*(Dn+Dr)*S + 2*H*Dv*S,
                         q params = D*H*(Dn+Dr), or D*Rq + Rq*H*(Dn+Dr) with the q bottleneck (the latent is
                         expanded once per token, as the forward does without a cache)
  dense SwiGLU           3 * 2*D*F
  MoE layer              router 2*D*E (x2 for noisy_topk's noise projection, a training forward)
                         + k' * 3*2*D*d_expert + shared 3*2*D*(n_shared*d_shared)
                         (+ 2*D for the sigmoid shared-expert gate); k' = top_k for token choice,
                         capacity_factor * top_k for expert choice (what each token averages there)
  LM head                2*D*V
with Dh = ``cfg.dh`` (an explicit ``head_dim`` may differ from D/H). Biases, QK-norm, clipping, norms, RoPE
(scaled or not), activations, softmax and the embedding lookup are elementwise/gathers and are left out
(they are <1% at these sizes and FlopCounterMode ignores them too). Training FLOPs = 3 x forward
(backward costs two matmuls per forward matmul).

``comm_volume``: the bytes one GPU sends per step under expert and data parallelism (formulas in its doc).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moekit.core.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter (tied embeddings counted once)
    active: int  # parameters a single token touches: unselected routed experts excluded
    embedding: int  # input embedding (and the untied head, if any)
    expert_total: int  # routed-expert parameters over all MoE layers
    expert_active: int  # routed-expert parameters one token uses (top_k per layer)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _mla_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one latent-attention layer's projections (every one is a matmul per token)."""
    m, D, H = cfg.mla, cfg.d_model, cfg.n_heads
    assert m is not None
    q = D * H * m.qk_head_dim if m.q_lora_rank is None else m.q_lora_rank * (D + H * m.qk_head_dim)
    kv = D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + H * m.v_head_dim * D


def _attn_params(cfg: ModelConfig) -> int:
    """Projections, their biases, and the QK-norm gains of one attention layer."""
    if cfg.mla is not None:  # + the latent norms' gains
        return _mla_matmul_params(cfg) + cfg.mla.kv_lora_rank + (cfg.mla.q_lora_rank or 0)
    q, kv = cfg.n_heads * cfg.dh, cfg.n_kv_heads * cfg.dh
    n = cfg.d_model * (q + kv) * 2
    if cfg.qkv_bias:
        n += q + 2 * kv
    if cfg.out_bias:
        n += cfg.d_model
    n += {"none": 0, "head": 2 * cfg.dh, "full": q + kv}[cfg.qk_norm]
    return n


def _moe_layer_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(router + shared params, params per routed expert, num routed experts) of one MoE layer."""
    m = cfg.moe
    assert m is not None
    per_expert = 3 * cfg.d_model * m.d_expert
    shared = 3 * cfg.d_model * m.num_shared_experts * m.shared_width + (cfg.d_model if m.shared_gate else 0)
    router = cfg.d_model * m.num_experts
    if m.router == "noisy_topk":
        router *= 2  # the learned noise projection
    return router + shared, per_expert, m.num_experts


def count_params(cfg: ModelConfig) -> ParamCount:
    D, V = cfg.d_model, cfg.vocab_size
    embedding = V * D if cfg.tie_embeddings else 2 * V * D
    total = active = embedding + D  # + final norm
    expert_total = expert_active = 0
    for i in range(cfg.n_layers):
        common = _attn_params(cfg) + 2 * D  # attention + two norms
        total += common
        active += common
        if cfg.is_moe_layer(i):
            fixed, per_expert, n_exp = _moe_layer_params(cfg)
            k = cfg.moe.top_k
            total += fixed + n_exp * per_expert
            active += fixed + k * per_expert
            expert_total += n_exp * per_expert
            expert_active += k * per_expert
        else:
            ffn = 3 * D * cfg.d_ff
            total += ffn
            active += ffn
    return ParamCount(total, active, embedding, expert_total, expert_active)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token at context length ``seq_len`` (default max_seq_len); formula in the module doc."""
    S = cfg.max_seq_len if seq_len is None else seq_len
    D, H, G, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dh
    attn = 2 * D * H * hd + 2 * 2 * D * G * hd + 2 * H * hd * D + 2 * 2 * H * hd * S
    if cfg.mla is not None:
        attn = 2 * _mla_matmul_params(cfg) + 2 * H * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) * S
    total = 0
    for i in range(cfg.n_layers):
        total += attn
        if cfg.is_moe_layer(i):
            m = cfg.moe
            # The noisy router's second projection (x @ w_noise) runs in training forwards, which is what
            # matching and MFU count; an eval forward skips it.
            total += 2 * D * m.num_experts * (2 if m.router == "noisy_topk" else 1)
            total += round(_experts_per_token(m) * 3 * 2 * D * m.d_expert)
            total += 3 * 2 * D * m.num_shared_experts * m.shared_width
            total += 2 * D if m.shared_gate else 0  # the shared-expert gate, a [D, 1] matmul
        else:
            total += 3 * 2 * D * cfg.d_ff
    total += 2 * D * cfg.vocab_size
    return total


def _experts_per_token(m) -> float:
    """Routed experts one token runs through on average: ``top_k`` for token choice (an upper bound under a
    capacity, which may drop some), ``capacity_factor * top_k`` for expert choice, whose E experts each take
    ``ceil(capacity_factor * N * top_k / E)`` of the N tokens (the ceiling left out)."""
    return m.top_k * m.capacity_factor if m.router == "expert_choice" else m.top_k


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    return 3 * flops_per_token(cfg, seq_len)


def comm_volume(
    model_cfg: ModelConfig, tokens_per_gpu: int, ep_size: int, dp_size: int, dtype_bytes: int = 2
) -> dict[str, float]:
    """Bytes ONE GPU sends per optimizer step (forward + backward of ``tokens_per_gpu`` tokens).

    Layout: ``W = ep_size * dp_size`` GPUs; experts sharded ``ep_size`` ways and replicated ``dp_size``
    times; all other parameters replicated (DDP) or sharded (FSDP) over all ``W`` GPUs. Activations and
    gradients in ``dtype_bytes``. Collective costs per GPU, ``S`` = buffer bytes, ``n`` ranks (ring /
    bandwidth-optimal algorithms): all-reduce ``2 (n-1)/n S``, all-gather and reduce-scatter ``(n-1)/n S``.

    - all-to-all, per MoE layer: every routed assignment (``tokens * top_k``, dropless) sends a
      ``d_model`` row to its expert's rank, of which ``(P-1)/P`` leave the GPU under uniform routing;
      the same volume comes back (combine), and backward repeats both (4 exchanges in all). Rows are sent
      once per assignment, as ``moekit.moe.parallel.ep_dispatch`` does (no per-rank de-duplication of a token's rows).
    - DDP: all-reduce of the non-expert gradients over ``W`` plus of this GPU's expert slice over the
      ``dp_size`` replicas.
    - FSDP (full shard, re-gather in backward): two all-gathers of the parameters and one reduce-scatter
      of the gradients; non-expert over ``W``, the expert slice over the replicas.
    """
    if model_cfg.moe is None:
        raise ValueError("comm_volume: model_cfg.moe is None; expert parallelism needs an MoE model")
    for name, value in (("tokens_per_gpu", tokens_per_gpu), ("ep_size", ep_size), ("dp_size", dp_size),
                        ("dtype_bytes", dtype_bytes)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"comm_volume: {name}={value!r} is invalid: must be a positive integer")
    if model_cfg.moe.num_experts % ep_size:
        raise ValueError(f"comm_volume: ep_size={ep_size} must divide num_experts={model_cfg.moe.num_experts}")
    world = ep_size * dp_size
    params = count_params(model_cfg)
    dense = params.total - params.expert_total
    expert_local = params.expert_total // ep_size
    moe_layers = sum(model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers))

    dispatch = tokens_per_gpu * model_cfg.moe.top_k * model_cfg.d_model * dtype_bytes * (ep_size - 1) / ep_size
    a2a_layer = 4 * dispatch
    world_frac = (world - 1) / world
    replica_frac = (dp_size - 1) / dp_size
    ddp_dense = 2 * world_frac * dense * dtype_bytes
    ddp_expert = 2 * replica_frac * expert_local * dtype_bytes
    gather = 2 * (world_frac * dense + replica_frac * expert_local) * dtype_bytes
    scatter = (world_frac * dense + replica_frac * expert_local) * dtype_bytes
    return {
        "world_size": world,
        "moe_layers": moe_layers,
        "dense_params": dense,
        "expert_params_per_gpu": expert_local,
        "a2a_dispatch_bytes_per_layer": dispatch,
        "a2a_bytes_per_layer": a2a_layer,
        "a2a_bytes": a2a_layer * moe_layers,
        "ddp_allreduce_dense_bytes": ddp_dense,
        "ddp_allreduce_expert_bytes": ddp_expert,
        "ddp_allreduce_bytes": ddp_dense + ddp_expert,
        "fsdp_allgather_bytes": gather,
        "fsdp_reduce_scatter_bytes": scatter,
        "fsdp_bytes": gather + scatter,
    }
