"""Hugging Face interop: ``LlamaForCausalLM`` / ``MixtralForCausalLM`` checkpoints <-> moekit.

Shapes: V vocab, D d_model, F FFN / expert hidden width, E experts.

Configs are read and written as plain JSON (transformers is not a dependency of moekit); weights go
through safetensors only. Both libraries use the half-split (rotate_half) RoPE convention and
``nn.Linear`` ``[out, in]`` projections, so attention and dense weights copy over unchanged (no q/k
permutation). Routed experts are the exception: moekit stacks them as ``x @ w`` matrices
(``w_gate/w_up [E, D, F]``, ``w_down [E, F, D]``), the transpose of HF's per-expert Linear weights.

Mixtral checkpoints come in two layouts and both are read: the classic per-expert one
(``block_sparse_moe.experts.{e}.w1/w2/w3.weight``; what ``save_pretrained`` writes in transformers 4 and
5) and transformers 5's in-memory fused one (``mlp.experts.gate_up_proj [E, 2F, D]``,
``mlp.experts.down_proj [E, D, F]``, ``mlp.gate.weight``). The classic layout is written, since every
transformers version loads it.

Training-only fields do not travel exactly: HF ``attention_dropout`` and ``router_jitter_noise``
(which in Mixtral also scales the experts' input) are dropped, moekit's ``dropout``/``z_loss_coef``
are not exported. The load-balance coefficient is rescaled (see :func:`config_from_hf`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moekit.core.config import ModelConfig
from moekit.core.model import Transformer
from moekit.core.pretrained import write_pretrained
from moekit.moe.config import MoEConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}
_ARCH_CLASS = {kind: name for name, kind in ARCHITECTURES.items()}

# transformers' class defaults for fields a config.json may omit.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        initializer_range=0.02,
    ),
    "mixtral": dict(
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=1e6,
        initializer_range=0.02,
        num_key_value_heads=8,
        num_experts_per_tok=2,
        num_local_experts=8,
        router_aux_loss_coef=0.001,
    ),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers some old Llama checkpoints carry; moekit recomputes RoPE tables on the fly.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# moekit names inside one block (see docs/DESIGN.md); MoE names follow moe/layer.py and moe/experts.py.
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}
_DENSE_MLP = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
_ROUTER = "ffn.router.weight"
_EXPERTS = "ffn.experts"


def _refuse(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"HF config field {field}={value!r} cannot be converted to moekit: {allowed}")


# ---- configs -----------------------------------------------------------------------------------
def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a Hugging Face checkpoint folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    return json.loads(path.read_text())


def detect_architecture(hf_cfg: dict[str, Any]) -> str:
    """``"llama"`` or ``"mixtral"``, from ``architectures`` (preferred) or ``model_type``."""
    archs = hf_cfg.get("architectures") or []
    kinds = {ARCHITECTURES[a] for a in archs if a in ARCHITECTURES}
    model_type = hf_cfg.get("model_type")
    if archs and not kinds:
        _refuse("architectures", archs, f"supported architectures are {sorted(ARCHITECTURES)}")
    if len(kinds) > 1:
        _refuse("architectures", archs, "must name exactly one supported architecture")
    if model_type is not None and model_type not in _ARCH_CLASS:
        _refuse("model_type", model_type, f"supported model types are {sorted(_ARCH_CLASS)}")
    if kinds and model_type is not None and model_type not in kinds:
        _refuse("model_type", model_type, f"does not match architectures={archs}")
    if not kinds and model_type is None:
        raise ValueError("HF config has neither 'architectures' nor 'model_type'; cannot tell Llama from Mixtral")
    return kinds.pop() if kinds else model_type


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` or the older top-level ``rope_theta``.

    Only plain RoPE is representable: scaled variants (linear, dynamic, yarn, llama3, ...) and partial
    rotary embeddings are refused.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            _refuse(field, d, "must be a JSON object or null")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            _refuse(f"{field}.rope_type", kind, "only 'default' RoPE (no scaling) is supported")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse(f"{field}.partial_rotary_factor", d["partial_rotary_factor"], "only 1.0 is supported")
    top = hf.get("rope_theta")
    nested = params.get("rope_theta")
    if top is not None and nested is not None and float(top) != float(nested):
        _refuse("rope_theta", top, f"disagrees with rope_parameters.rope_theta={nested}")
    theta = nested if nested is not None else top
    return float(default if theta is None else theta)


def config_from_hf(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Map a Llama or Mixtral ``config.json`` dict to a :class:`ModelConfig`, refusing what moekit lacks.

    Mixtral routing becomes softmax over all experts, top-k, renormalised (top-1 uses top-k-then-softmax,
    which gives HF's weight 1.0 where moekit's renormalisation is skipped). HF's load-balancing loss
    counts top-k assignments per token (so it is ``top_k`` times moekit's per-layer loss) and pools its
    statistics over layers where moekit sums per-layer losses, hence
    ``load_balance_coef = router_aux_loss_coef * top_k / n_layers`` (exact when the layers route alike).
    Mixtral has no z-loss: ``z_loss_coef = 0``.
    """
    kind = detect_architecture(hf_cfg)
    hf = {**_HF_DEFAULTS[kind], **hf_cfg}
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"HF config lacks required fields {missing}")
    if hf["hidden_act"] not in ("silu", "swish"):
        _refuse("hidden_act", hf["hidden_act"], "only 'silu' (alias 'swish'; SwiGLU) is supported")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            _refuse(field, hf[field], "moekit projections have no bias; only false is supported")
    if "quantization_config" in hf:
        _refuse("quantization_config", hf["quantization_config"], "dequantize the checkpoint first")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % n_heads:
        _refuse("hidden_size", d_model, f"must be divisible by num_attention_heads={n_heads}")
    if hf.get("head_dim") not in (None, d_model // n_heads):
        _refuse("head_dim", hf["head_dim"], f"only hidden_size/num_attention_heads={d_model // n_heads} is supported")
    max_pos = hf["max_position_embeddings"]
    window = hf.get("sliding_window")
    if window is not None and window < max_pos:
        _refuse("sliding_window", window, f"only null or >= max_position_embeddings={max_pos} (no effect)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        _refuse("layer_types", sorted(set(layer_types)), "only 'full_attention' layers are supported")

    n_layers = hf["num_hidden_layers"]
    moe = None
    if kind == "mixtral":
        top_k = hf["num_experts_per_tok"]
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=top_k,
            d_expert=hf["intermediate_size"],
            router="topk",
            score_func="softmax",
            topk_order="softmax_then_topk" if top_k > 1 else "topk_then_softmax",
            renormalize=True,
            capacity_factor=None,
            num_shared_experts=0,
            every_n_layers=1,
            router_noise=0.0,
            router_jitter=0.0,
            load_balance_coef=hf["router_aux_loss_coef"] * top_k / n_layers,
            z_loss_coef=0.0,
        )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=max_pos,
        rope_theta=_rope_theta(hf_cfg, _HF_DEFAULTS[kind]["rope_theta"]),
        norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        init_std=float(hf["initializer_range"]),
        moe=moe,
    )


def _check_exportable(cfg: ModelConfig) -> None:
    moe = cfg.moe
    if moe is None:
        return

    def bad(field: str, allowed: str) -> None:
        raise ValueError(
            f"ModelConfig.moe.{field}={getattr(moe, field)!r} has no MixtralForCausalLM equivalent: {allowed}"
        )

    if not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        bad("every_n_layers" if moe.layers is None else "layers", "Mixtral needs every layer to be MoE")
    if moe.router != "topk":
        bad("router", "only 'topk'")
    if moe.score_func != "softmax":
        bad("score_func", "only 'softmax'")
    # Mixtral's weights are the renormalised top-k probabilities (1.0 at top-1); moekit skips
    # renormalisation at top-1, where only top-k-then-softmax gives 1.0.
    if not (moe.topk_order == "topk_then_softmax" or (moe.renormalize and moe.top_k > 1)):
        bad("renormalize", "use renormalize=True with top_k > 1, or topk_order='topk_then_softmax'")
    for field, allowed in (
        ("capacity_factor", "only None (dropless)"),
        ("eval_capacity_factor", "only None (dropless)"),
    ):
        if getattr(moe, field) is not None:
            bad(field, allowed)
    if moe.num_shared_experts:
        bad("num_shared_experts", "only 0")
    if moe.bias_update_rate:
        bad("bias_update_rate", "only 0 (Mixtral has no selection bias)")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``LlamaForCausalLM`` (dense) or ``MixtralForCausalLM`` (MoE).

    Raises if ``cfg`` has no HF equivalent (partially-MoE stacks, other routers, capacity limits,
    shared experts). ``rope_theta`` is written both inside ``rope_parameters`` (transformers 5) and at
    the top level (transformers 4).
    """
    _check_exportable(cfg)
    kind = "llama" if cfg.moe is None else "mixtral"
    hf: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff if cfg.moe is None else cfg.moe.d_expert,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }
    if cfg.moe is None:
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.load_balance_coef * cfg.n_layers / cfg.moe.top_k,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return hf


# ---- weights -----------------------------------------------------------------------------------
def load_hf_state_dict(hf_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF checkpoint folder: ``model.safetensors``, or the shards its index lists."""
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir} (pytorch_model.bin is not read)")
    sd: dict[str, Tensor] = {}
    for name in files:
        sd.update(load_file(str(d / name)))
    return sd


class _Source:
    """HF tensors consumed by name, so that missing and left-over keys both give clear errors."""

    def __init__(self, sd: dict[str, Tensor]) -> None:
        self.sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}

    def pop(self, *names: str) -> Tensor:
        """The first of ``names`` present (alternative spellings of one tensor)."""
        for name in names:
            if name in self.sd:
                return self.sd.pop(name)
        raise KeyError(f"HF checkpoint lacks tensor {names[0]!r}")

    def has(self, name: str) -> bool:
        return name in self.sd

    def finish(self) -> None:
        if self.sd:
            extra = sorted(self.sd)
            raise ValueError(
                f"HF checkpoint has {len(extra)} tensors moekit cannot represent (biases? other architecture?): "
                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
            )


def _experts_from_hf(src: _Source, p: str, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D])`` of the Mixtral layer with prefix ``p``."""
    if src.has(f"{p}.mlp.experts.gate_up_proj"):  # transformers 5 fused layout
        gate_up_e2fd = src.pop(f"{p}.mlp.experts.gate_up_proj")  # [E, 2F, D]: gate rows, then up rows
        down_edf = src.pop(f"{p}.mlp.experts.down_proj")  # [E, D, F]
        gate_efd, up_efd = gate_up_e2fd.chunk(2, dim=1)
        return gate_efd.transpose(1, 2), up_efd.transpose(1, 2), down_edf.transpose(1, 2)
    q = f"{p}.block_sparse_moe.experts"
    w1, w3, w2 = ([src.pop(f"{q}.{e}.{w}.weight").t() for e in range(num_experts)] for w in ("w1", "w3", "w2"))
    return torch.stack(w1), torch.stack(w3), torch.stack(w2)  # w1/w3: [F, D] -> [D, F]; w2: [D, F] -> [F, D]


def state_dict_from_hf(hf_sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename (and for experts, restack) HF ``*ForCausalLM`` tensors into moekit's state-dict names.

    Tensors keep their dtype. With ``cfg.tie_embeddings`` the result has no ``lm_head.weight`` (an HF
    copy of it is dropped, as HF ties it to the embedding on load).
    """
    src = _Source(hf_sd)
    out = {"embed.weight": src.pop("model.embed_tokens.weight"), "norm.weight": src.pop("model.norm.weight")}
    for i in range(cfg.n_layers):
        p, m = f"model.layers.{i}", f"layers.{i}"
        out[f"{m}.attn_norm.weight"] = src.pop(f"{p}.input_layernorm.weight")
        out[f"{m}.ffn_norm.weight"] = src.pop(f"{p}.post_attention_layernorm.weight")
        for hf_name, name in _ATTN.items():
            out[f"{m}.attn.{name}.weight"] = src.pop(f"{p}.self_attn.{hf_name}.weight")
        if cfg.is_moe_layer(i):
            out[f"{m}.{_ROUTER}"] = src.pop(f"{p}.block_sparse_moe.gate.weight", f"{p}.mlp.gate.weight")  # [E, D]
            w_gate, w_up, w_down = _experts_from_hf(src, p, cfg.moe.num_experts)
            out[f"{m}.{_EXPERTS}.w_gate"], out[f"{m}.{_EXPERTS}.w_up"] = w_gate, w_up
            out[f"{m}.{_EXPERTS}.w_down"] = w_down
        else:
            for hf_name, name in _DENSE_MLP.items():
                out[f"{m}.ffn.{name}.weight"] = src.pop(f"{p}.mlp.{hf_name}.weight")
    if cfg.tie_embeddings:
        if src.has("lm_head.weight"):
            src.pop("lm_head.weight")
    else:
        out["lm_head.weight"] = src.pop("lm_head.weight")
    src.finish()
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """moekit tensors -> HF ``*ForCausalLM`` names (classic per-expert Mixtral layout), contiguous copies.

    A tied model exports only ``model.embed_tokens.weight`` (whichever of the two tied names ``sd``
    holds), matching what ``save_pretrained`` writes.
    """
    _check_exportable(cfg)
    embed = sd["embed.weight"] if "embed.weight" in sd else sd["lm_head.weight"]
    out = {"model.embed_tokens.weight": embed, "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, m = f"model.layers.{i}", f"layers.{i}"
        out[f"{p}.input_layernorm.weight"] = sd[f"{m}.attn_norm.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = sd[f"{m}.ffn_norm.weight"]
        for hf_name, name in _ATTN.items():
            out[f"{p}.self_attn.{hf_name}.weight"] = sd[f"{m}.attn.{name}.weight"]
        if cfg.is_moe_layer(i):
            q = f"{p}.block_sparse_moe"
            out[f"{q}.gate.weight"] = sd[f"{m}.{_ROUTER}"]
            w = {n: sd[f"{m}.{_EXPERTS}.{n}"] for n in ("w_gate", "w_up", "w_down")}
            for e in range(cfg.moe.num_experts):
                out[f"{q}.experts.{e}.w1.weight"] = w["w_gate"][e].t()  # [D, F] -> [F, D]
                out[f"{q}.experts.{e}.w3.weight"] = w["w_up"][e].t()
                out[f"{q}.experts.{e}.w2.weight"] = w["w_down"][e].t()  # [F, D] -> [D, F]
        else:
            for hf_name, name in _DENSE_MLP.items():
                out[f"{p}.mlp.{hf_name}.weight"] = sd[f"{m}.ffn.{name}.weight"]
    # clone: safetensors refuses tensors that share storage (tied weights, slices of a stacked expert).
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _check_against_model(sd: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Names and shapes must be exactly those of ``Transformer(cfg)`` (built on the meta device: free)."""
    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"converted state dict does not fit Transformer(cfg): missing {missing}, unexpected {extra}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise ValueError(f"tensor {k} has shape {tuple(sd[k].shape)}; the config implies {tuple(t.shape)}")


# ---- folders and models ------------------------------------------------------------------------
def hf_to_moekit(hf_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """Convert an HF Llama/Mixtral folder into moekit's ``save_pretrained`` layout; returns the config."""
    cfg = config_from_hf(load_hf_config(hf_dir))
    sd = state_dict_from_hf(load_hf_state_dict(hf_dir), cfg)
    _check_against_model(sd, cfg)
    write_pretrained(out_dir, cfg.to_dict(), lambda path: save_file(sd, str(path), metadata={"format": "pt"}))
    return cfg


def _write_hf(sd: dict[str, Tensor], cfg: ModelConfig, hf_dir: str | Path) -> dict[str, Any]:
    hf_sd = state_dict_to_hf(sd, cfg)
    hf_cfg = config_to_hf(cfg, hf_sd["model.embed_tokens.weight"].dtype)
    out = Path(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return hf_cfg


def moekit_to_hf(moekit_dir: str | Path, hf_dir: str | Path) -> dict[str, Any]:
    """Convert a moekit ``save_pretrained`` folder into an HF folder; returns the HF config dict."""
    d = Path(moekit_dir)
    cfg = ModelConfig.load(d / "config.json")
    return _write_hf(load_file(str(d / "model.safetensors")), cfg, hf_dir)


def save_hf(model: Transformer, hf_dir: str | Path) -> dict[str, Any]:
    """Write an in-memory :class:`Transformer` as an HF checkpoint folder."""
    return _write_hf(model.state_dict(), model.cfg, hf_dir)


def load_hf(hf_dir: str | Path) -> Transformer:
    """A :class:`Transformer` with the weights of an HF Llama/Mixtral folder."""
    cfg = config_from_hf(load_hf_config(hf_dir))
    sd = state_dict_from_hf(load_hf_state_dict(hf_dir), cfg)
    _check_against_model(sd, cfg)
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)  # tied: lm_head.weight is embed.weight
    return model
