"""HF config.json <-> :class:`ModelConfig`, per family (see :mod:`moekit.core.hf_families`), refusing
by name whatever one side cannot represent: the HF config field and its value (HF -> moekit), or the
``ModelConfig`` field (moekit -> HF). Any ``ModelConfig``/``MoEConfig`` field this module does not know
(added to moekit later) must keep its default to be exported, so a new feature never exports silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from moekit.core.config import ModelConfig
from moekit.core.hf_families import FAMILIES, WRITABLE_DENSE, WRITABLE_MOE, Family, detect_family, refuse
from moekit.moe.config import MoEConfig

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dt for dt, name in DTYPE_NAMES.items()}
# HF fields with no effect on the function that travel back unchanged through hf_source.json.
# Token ids belong to the tokenizer, not the family: they travel back through hf_source.json whatever family
# is written, and are written as null without one (else a class default such as Phi-3's pad 32000 applies).
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Inert fields of one family (no effect with default RoPE) that come back when the same family is written.
_INERT_HF_FIELDS = ("original_max_position_embeddings",)
# ModelConfig / MoEConfig fields that an HF checkpoint does not need: training, telemetry, placement.
_MODEL_INERT = {"dropout"}
_MODEL_MAPPED = {
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
    "rope_theta", "norm_eps", "tie_embeddings", "init_std", "moe",
}  # fmt: skip
_MOE_INERT = {
    "load_balance_coef", "z_loss_coef", "router_jitter", "balance_scope", "router_dtype", "dispatch",
    "dead_expert_window", "expert_parallel_size", "num_groups", "local_entropy_coef", "global_entropy_coef",
    "global_entropy_threshold", "entropy_groups", "extra", "drop_policy", "d_shared", "router_noise",
}  # fmt: skip
_MOE_MAPPED = {
    "num_experts", "top_k", "d_expert", "num_shared_experts", "router", "score_func", "topk_order",
    "renormalize", "capacity_factor", "eval_capacity_factor", "bias_update_rate", "every_n_layers", "layers",
    "modality_experts",
}  # fmt: skip


# ---- configs: HF -> moekit -----------------------------------------------------------------------
def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a Hugging Face checkpoint folder."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def detect_architecture(hf_cfg: dict[str, Any]) -> str:
    """The family name (``"llama"``, ``"mixtral"``, ...) of an HF config dict; refuses unsupported ones."""
    return detect_family(hf_cfg).name


def _rope_theta(hf_cfg: dict[str, Any], fam: Family) -> float:
    """RoPE base from transformers 5's ``rope_parameters`` or the older top-level ``rope_theta``.

    Only plain RoPE is representable: scaled variants (linear, dynamic, yarn, llama3, longrope, ...) and
    partial rotary embeddings are refused.
    """
    params = hf_cfg.get("rope_parameters") or {}
    scaling = hf_cfg.get("rope_scaling") or {}
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            refuse(name, d, "must be a JSON object or null")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in fam.rope_types:
            refuse(
                f"{name}.rope_type",
                kind,
                f"{fam.title} with {kind!r} RoPE scaling is not supported yet; only 'default'",
            )
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(
                f"{name}.partial_rotary_factor", d["partial_rotary_factor"], "partial RoPE is not supported; only 1.0"
            )
    if hf_cfg.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", hf_cfg["partial_rotary_factor"], "partial RoPE is not supported; only 1.0")
    top, nested = hf_cfg.get("rope_theta"), params.get("rope_theta")
    if top is not None and nested is not None and float(top) != float(nested):
        refuse("rope_theta", top, f"disagrees with rope_parameters.rope_theta={nested}")
    theta = nested if nested is not None else top
    return float(fam.defaults_full()["rope_theta"] if theta is None else theta)


def _check_common(hf: dict[str, Any], fam: Family) -> None:
    """Refusals shared by every supported family: what moekit's attention/FFN cannot represent."""
    if hf["hidden_act"] not in ("silu", "swish"):
        refuse("hidden_act", hf["hidden_act"], "only 'silu' (alias 'swish'; SwiGLU) is supported")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name, False):
            refuse(name, hf[name], "projection biases are not supported yet; only false")
    if "quantization_config" in hf:
        refuse("quantization_config", hf["quantization_config"], "dequantize the checkpoint first")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if d_model % n_heads:
        refuse("hidden_size", d_model, f"must be divisible by num_attention_heads={n_heads}")
    if hf.get("head_dim") not in (None, d_model // n_heads):
        refuse(
            "head_dim",
            hf["head_dim"],
            f"a head_dim other than hidden_size/num_attention_heads={d_model // n_heads} is not supported yet",
        )
    max_pos = hf["max_position_embeddings"]
    window = hf.get("sliding_window")
    if window is not None and window < max_pos:
        refuse(
            "sliding_window",
            window,
            f"sliding-window attention is not supported yet; only null or >= max_position_embeddings={max_pos}",
        )
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", hf["use_sliding_window"], "sliding-window attention is not supported yet")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "only 'full_attention' layers are supported")


def _mixtral_moe(hf: dict[str, Any]) -> MoEConfig:
    top_k = hf["num_experts_per_tok"]
    return MoEConfig(
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
        load_balance_coef=hf["router_aux_loss_coef"] * top_k / hf["num_hidden_layers"],
        z_loss_coef=0.0,
    )


def config_from_hf(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Map an HF ``config.json`` dict of a supported family to a :class:`ModelConfig`, refusing what moekit lacks.

    Mixtral routing becomes softmax over all experts, top-k, renormalised (top-1 uses top-k-then-softmax,
    which gives HF's weight 1.0 where moekit's renormalisation is skipped). HF's load-balancing loss
    counts top-k assignments per token (so it is ``top_k`` times moekit's per-layer loss) and pools its
    statistics over layers where moekit sums per-layer losses, hence
    ``load_balance_coef = router_aux_loss_coef * top_k / n_layers`` (exact when the layers route alike).
    Mixtral has no z-loss: ``z_loss_coef = 0``.
    """
    fam = detect_family(hf_cfg)
    hf = {**fam.defaults_full(), **hf_cfg}
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"HF config lacks required fields {missing}")
    _check_common(hf, fam)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=_rope_theta(hf_cfg, fam),
        norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        init_std=float(hf["initializer_range"]),
        moe=_mixtral_moe(hf) if fam.is_moe else None,
    )


# ---- configs: moekit -> HF -----------------------------------------------------------------------
def _check_unknown_fields(obj: Any, known: set[str], prefix: str) -> None:
    """A field this converter does not know (added to moekit later) must keep its default, or be refused."""
    for f in dataclasses.fields(obj):
        if f.name in known:
            continue
        value = getattr(obj, f.name)
        ref = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if value != ref:
            raise ValueError(
                f"ModelConfig.{prefix}{f.name}={value!r} has no HF equivalent here; only the default {ref!r}"
            )


def check_exportable(cfg: ModelConfig, fam: Family) -> None:
    _check_unknown_fields(cfg, _MODEL_MAPPED | _MODEL_INERT, "")
    moe = cfg.moe
    if moe is None:
        if fam.is_moe:
            raise ValueError(
                f"ModelConfig.moe=None: a dense model cannot be written as {fam.title}; use one of {WRITABLE_DENSE}"
            )
        return
    if not fam.is_moe:
        raise ValueError(f"ModelConfig.moe is set: {fam.title} has no MoE layers; use one of {WRITABLE_MOE}")
    _check_unknown_fields(moe, _MOE_MAPPED | _MOE_INERT, "moe.")

    def bad(name: str, allowed: str) -> None:
        raise ValueError(
            f"ModelConfig.moe.{name}={getattr(moe, name)!r} has no {fam.architecture} equivalent: {allowed}"
        )

    if not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        bad("every_n_layers" if moe.layers is None else "layers", f"{fam.title} needs every layer to be MoE")
    if moe.router != "topk":
        bad("router", "only 'topk'")
    if moe.score_func != "softmax":
        bad("score_func", "only 'softmax'")
    # Mixtral's weights are the renormalised top-k probabilities (1.0 at top-1); moekit skips
    # renormalisation at top-1, where only top-k-then-softmax gives 1.0.
    if not (moe.topk_order == "topk_then_softmax" or (moe.renormalize and moe.top_k > 1)):
        bad("renormalize", "use renormalize=True with top_k > 1, or topk_order='topk_then_softmax'")
    for name in ("capacity_factor", "eval_capacity_factor", "modality_experts"):
        if getattr(moe, name) is not None:
            bad(name, "only None")
    if moe.num_shared_experts:
        bad("num_shared_experts", "only 0")
    if moe.bias_update_rate:
        bad("bias_update_rate", "only 0 (no selection bias)")


def choose_family(cfg: ModelConfig, family: str | None, source: dict[str, Any] | None) -> Family:
    """``family`` if given; else the family the checkpoint came from (if it can hold ``cfg``); else the
    default (Llama for dense, Mixtral for MoE)."""
    writable = WRITABLE_MOE if cfg.moe is not None else WRITABLE_DENSE
    if family is not None:
        if family not in FAMILIES or FAMILIES[family].missing is not None:
            raise ValueError(f"family={family!r} cannot be written; choose one of {WRITABLE_DENSE + WRITABLE_MOE}")
        return FAMILIES[family]
    if source is not None and source.get("family") in writable:
        return FAMILIES[source["family"]]
    return FAMILIES[writable[0]]


def config_to_hf(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` as ``family`` (default: the ``source`` family, else Llama for a
    dense model, Mixtral for an all-MoE one). ``source`` is the ``hf_source.json`` of a converted checkpoint:
    its token ids come back. Raises, naming the ``ModelConfig`` field, if the family cannot hold ``cfg``.
    ``rope_theta`` is written inside ``rope_parameters`` (transformers 5) and at the top level (4)."""
    fam = choose_family(cfg, family, source)
    check_exportable(cfg, fam)
    hf: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff if cfg.moe is None else cfg.moe.d_expert,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dh,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),
        **{name: 0.0 for name in fam.training_only},
    }
    if fam.name == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if fam.window_field:
        hf["sliding_window"] = None
    if cfg.moe is not None:
        hf.update(
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.load_balance_coef * cfg.n_layers / cfg.moe.top_k,
        )
    old = (source or {}).get("config") or {}
    hf.update({k: old.get(k) for k in _TOKEN_FIELDS})
    if source is not None and source.get("family") == fam.name:
        hf.update({k: old[k] for k in _INERT_HF_FIELDS if k in old})
    return hf
