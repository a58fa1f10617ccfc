"""The HF converter's weight rules: Hugging Face tensor names next to moekit's, per layout.

Shapes: V vocab, D d_model, H/G query/kv heads, Dh head dim, F FFN / expert hidden width, E experts.

A weight layout is a list of :class:`Rule`; each rule names HF tensors and moekit tensors and converts one
way and back, so the two directions cannot drift apart:

- :class:`Same`: one tensor, renamed (both sides use ``nn.Linear`` ``[out, in]`` and the same RoPE pairs:
  half-split, or DeepSeek's adjacent pairs with ``MLAConfig.rope_interleave``, so attention needs no q/k
  permutation);
- :class:`Fused`: one HF tensor = moekit tensors concatenated along rows (Phi-3 ``qkv_proj``, ``gate_up_proj``);
- :class:`PerExpert`: per-expert HF Linear weights (``experts.{e}.w1.weight [F, D]``) <-> one stacked moekit
  tensor of ``x @ w`` matrices (``experts.w_gate [E, D, F]``), i.e. stacked and transposed;
- :class:`StackedExperts`: transformers 5's in-memory fused experts (``gate_up_proj [E, 2F, D]``) <-> moekit's
  stacked ones; read only by default (the classic per-expert layout is written, every version loads it).

Templates use ``{i}`` for the layer and ``{e}`` for the expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.core.config import ModelConfig


# ---- weight rules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf`` <-> moekit tensors ``ours`` (name templates with ``{i}``/``{e}``)."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]

    def hf_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [t.format(i=i) for t in self.hf]

    def ours_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [t.format(i=i) for t in self.ours]

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        raise NotImplementedError

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        raise NotImplementedError


class Same(Rule):
    def __init__(self, hf: str, ours: str) -> None:
        super().__init__((hf,), (ours,))

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return ts

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return ts


class Fused(Rule):
    """``hf = cat(ours, dim=0)``, with row counts ``sizes(cfg)``; parts are cloned so they own their memory."""

    def __init__(self, hf: str, ours: tuple[str, ...], sizes: Callable[[ModelConfig], tuple[int, ...]]) -> None:
        super().__init__((hf,), ours)
        object.__setattr__(self, "sizes", sizes)

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        sizes = self.sizes(cfg)
        if ts[0].shape[0] != sum(sizes):
            raise ValueError(f"has {ts[0].shape[0]} rows; the config implies {sum(sizes)} = {sizes}")
        return [p.clone() for p in ts[0].split(list(sizes), dim=0)]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.cat(ts, dim=0)]


class PerExpert(Rule):
    """HF ``{e}``-templated ``[out, in]`` Linear weights <-> moekit ``[E, in, out]``."""

    def __init__(self, hf: str, ours: str) -> None:
        super().__init__((hf,), (ours,))

    def hf_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [self.hf[0].format(i=i, e=e) for e in range(cfg.moe.num_experts)]

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.stack([t.t() for t in ts])]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [w.t().contiguous() for w in ts[0]]


class StackedExperts(Rule):
    """HF ``[E, k*out, in]`` (k parts along dim 1) <-> k moekit ``[E, in, out]`` tensors."""

    def __init__(self, hf: str, ours: tuple[str, ...]) -> None:
        super().__init__((hf,), ours)

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [p.transpose(1, 2).contiguous() for p in ts[0].chunk(len(self.ours), dim=1)]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.cat([w.transpose(1, 2) for w in ts], dim=1).contiguous()]


L, M = "model.layers.{i}", "layers.{i}"
GLOBAL_RULES: tuple[Rule, ...] = (
    Same("model.embed_tokens.weight", "embed.weight"),
    Same("model.norm.weight", "norm.weight"),
)
LM_HEAD = Same("lm_head.weight", "lm_head.weight")
NORMS = (
    Same(f"{L}.input_layernorm.weight", f"{M}.attn_norm.weight"),
    Same(f"{L}.post_attention_layernorm.weight", f"{M}.ffn_norm.weight"),
)
ATTN = tuple(
    Same(f"{L}.self_attn.{n}.weight", f"{M}.attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj")
)
QKV_BIAS = tuple(Same(f"{L}.self_attn.{n}.bias", f"{M}.attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj"))
OUT_BIAS = (Same(f"{L}.self_attn.o_proj.bias", f"{M}.attn.o_proj.bias"),)
QK_NORM = tuple(Same(f"{L}.self_attn.{n}.weight", f"{M}.attn.{n}.weight") for n in ("q_norm", "k_norm"))
DENSE_MLP = tuple(
    Same(f"{L}.mlp.{h}.weight", f"{M}.ffn.{o}.weight")
    for h, o in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
)
_X = f"{M}.ffn.experts"
MIXTRAL_MOE = (
    Same(f"{L}.block_sparse_moe.gate.weight", f"{M}.ffn.router.weight"),  # [E, D]
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w1.weight", f"{_X}.w_gate"),
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w3.weight", f"{_X}.w_up"),
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w2.weight", f"{_X}.w_down"),
)
MOE_FUSED = (  # transformers 5's in-memory layout (what model.state_dict() gives), every MoE family
    Same(f"{L}.mlp.gate.weight", f"{M}.ffn.router.weight"),
    StackedExperts(f"{L}.mlp.experts.gate_up_proj", (f"{_X}.w_gate", f"{_X}.w_up")),  # [E, 2F, D]: gate, then up
    StackedExperts(f"{L}.mlp.experts.down_proj", (f"{_X}.w_down",)),  # [E, D, F]
)
QWEN_MOE = (  # Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints on disk
    Same(f"{L}.mlp.gate.weight", f"{M}.ffn.router.weight"),  # [E, D]
    PerExpert(f"{L}.mlp.experts.{{e}}.gate_proj.weight", f"{_X}.w_gate"),
    PerExpert(f"{L}.mlp.experts.{{e}}.up_proj.weight", f"{_X}.w_up"),
    PerExpert(f"{L}.mlp.experts.{{e}}.down_proj.weight", f"{_X}.w_down"),
)
QWEN2_SHARED = tuple(  # the shared expert (width shared_expert_intermediate_size) and its sigmoid gate [1, D]
    Same(f"{L}.mlp.shared_expert.{h}.weight", f"{M}.ffn.shared.{o}.weight")
    for h, o in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
) + (Same(f"{L}.mlp.shared_expert_gate.weight", f"{M}.ffn.shared_gate.weight"),)
PHI3_ATTN = (
    Fused(
        f"{L}.self_attn.qkv_proj.weight",  # rows: q (H*Dh), k (G*Dh), v (G*Dh)
        tuple(f"{M}.attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")),
        lambda c: (c.n_heads * c.dh, c.n_kv_heads * c.dh, c.n_kv_heads * c.dh),
    ),
    Same(f"{L}.self_attn.o_proj.weight", f"{M}.attn.o_proj.weight"),
)
PHI3_MLP = (
    Fused(
        f"{L}.mlp.gate_up_proj.weight", (f"{M}.ffn.w_gate.weight", f"{M}.ffn.w_up.weight"), lambda c: (c.d_ff, c.d_ff)
    ),
    Same(f"{L}.mlp.down_proj.weight", f"{M}.ffn.w_down.weight"),
)
_G = f"{L}.block_sparse_moe"
GRANITE_MOE = (  # Granite-MoE checkpoints on disk: experts stacked, [E, 2F, D] rows gate then up, [E, D, F]
    Same(f"{_G}.router.layer.weight", f"{M}.ffn.router.weight"),
    StackedExperts(f"{_G}.input_linear.weight", (f"{_X}.w_gate", f"{_X}.w_up")),
    StackedExperts(f"{_G}.output_linear.weight", (f"{_X}.w_down",)),
)
GRANITE_MOE_FUSED = (  # transformers 5's in-memory names of the same tensors
    Same(f"{_G}.router.weight", f"{M}.ffn.router.weight"),
    StackedExperts(f"{_G}.experts.gate_up_proj", (f"{_X}.w_gate", f"{_X}.w_up")),
    StackedExperts(f"{_G}.experts.down_proj", (f"{_X}.w_down",)),
)
GRANITE_SHARED = (  # GraniteMoeShared's ungated shared expert: input_linear rows gate, then up
    Fused(
        f"{L}.shared_mlp.input_linear.weight",
        (f"{M}.ffn.shared.w_gate.weight", f"{M}.ffn.shared.w_up.weight"),
        lambda c: (c.moe.num_shared_experts * c.moe.shared_width,) * 2,
    ),
    Same(f"{L}.shared_mlp.output_linear.weight", f"{M}.ffn.shared.w_down.weight"),
)
# DeepSeek's multi-head latent attention: the plain q projection (V2-Lite) or the q bottleneck, then the kv side.
MLA_Q = (Same(f"{L}.self_attn.q_proj.weight", f"{M}.attn.q_proj.weight"),)
MLA_Q_LORA = tuple(
    Same(f"{L}.self_attn.{h}.weight", f"{M}.attn.{o}.weight")
    for h, o in (("q_a_proj", "q_a_proj"), ("q_a_layernorm", "q_a_norm"), ("q_b_proj", "q_b_proj"))
)
MLA_KV = tuple(
    Same(f"{L}.self_attn.{h}.weight", f"{M}.attn.{o}.weight")
    for h, o in (
        ("kv_a_proj_with_mqa", "kv_a_proj"),  # rows: the latent (R), then the shared rotary key (Dr)
        ("kv_a_layernorm", "kv_a_norm"),
        ("kv_b_proj", "kv_b_proj"),  # rows per head: Dn key, then Dv value
        ("o_proj", "o_proj"),
    )
)
DEEPSEEK_SHARED = tuple(  # the n_shared_experts shared experts, one SwiGLU of width n_shared * F (no gate)
    Same(f"{L}.mlp.shared_experts.{h}.weight", f"{M}.ffn.shared.{o}.weight")
    for h, o in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
)
# DeepSeek-V3's score-correction bias: moekit's fixed selection bias.
CORRECTION_BIAS = (Same(f"{L}.mlp.gate.e_score_correction_bias", f"{M}.ffn.router.expert_bias"),)
# Buffers some old checkpoints carry; moekit recomputes RoPE tables on the fly.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
