"""HF config.json <-> :class:`ModelConfig`, per family (see :mod:`moekit.core.hf_families`), refusing
by name whatever one side cannot represent: the HF config field and its value (HF -> moekit), or the
``ModelConfig`` field (moekit -> HF). Any ``ModelConfig``/``MoEConfig`` field this module does not know
(added to moekit later) must keep its default to be exported, so a new feature never exports silently wrong.
DeepSeek's latent attention and routing: :mod:`moekit.core.hf_deepseek`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moekit.core.checks import is_finite_number
from moekit.core.config import ModelConfig, RopeScaling
from moekit.core.hf_deepseek import (
    DEEPSEEK_MOE_MAPPED,
    check_deepseek_exportable,
    deepseek_moe_from_hf,
    deepseek_to_hf,
    mla_from_hf,
)
from moekit.core.hf_families import FAMILIES, WRITABLE_DENSE, WRITABLE_MOE, Family, detect_family, refuse
from moekit.core.hf_moe_config import MOE_INERT, MOE_MAPPED, check_moe_exportable, moe_from_hf, moe_to_hf
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
# ModelConfig fields that an HF checkpoint does not need: training only.
_MODEL_INERT = {"dropout"}
_MODEL_MAPPED = {
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "rope_theta", "norm_eps",
    "tie_embeddings", "init_std", "moe", "head_dim", "qkv_bias", "out_bias", "qk_norm", "clip_qkv", "rope_scaling",
    "sliding_window", "embed_scale", "residual_scale", "attn_scale", "logit_divisor",
}  # fmt: skip
# Granite's multipliers: ModelConfig field -> HF field (see ModelConfig; attention_multiplier is the softmax scale).
GRANITE_SCALES = {
    "embed_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
    "attn_scale": "attention_multiplier", "logit_divisor": "logits_scaling",
}  # fmt: skip
_ROPE_KEYS = {  # HF rope_parameters keys of each scaling moekit represents
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
        "mscale_all_dim", "truncate",
    ),
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


def _rope(hf_cfg: dict[str, Any], fam: Family) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from transformers 5's ``rope_parameters`` or the older top-level ``rope_theta`` /
    ``rope_scaling``.

    Plain RoPE and the ``llama3`` and ``yarn`` scalings are representable; other scalings (linear, dynamic,
    longrope, ...) and partial rotary embeddings are refused.
    """
    params = hf_cfg.get("rope_parameters") or {}
    scaling = hf_cfg.get("rope_scaling") or {}
    found: list[tuple[str, dict[str, Any]]] = []
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, dict):
            refuse(name, d, "must be a JSON object or null")
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in fam.rope_types:
            only = " or ".join(repr(k) for k in fam.rope_types)
            allowed = f"{fam.title} with {kind!r} RoPE scaling is not supported yet; only {only}"
            refuse(f"{name}.rope_type", kind, allowed)
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(
                f"{name}.partial_rotary_factor", d["partial_rotary_factor"], "partial RoPE is not supported; only 1.0"
            )
        if kind in _ROPE_KEYS:
            found.append((name, {**d, "rope_type": kind}))
    if hf_cfg.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", hf_cfg["partial_rotary_factor"], "partial RoPE is not supported; only 1.0")
    top, nested = hf_cfg.get("rope_theta"), params.get("rope_theta")
    if top is not None and nested is not None and float(top) != float(nested):
        refuse("rope_theta", top, f"disagrees with rope_parameters.rope_theta={nested}")
    theta = nested if nested is not None else top
    theta = float(fam.defaults_full()["rope_theta"] if theta is None else theta)
    if not found:
        return theta, None
    name, d = found[0]
    kind = d["rope_type"]
    if len(found) > 1 and any(found[1][1].get(k) != d.get(k) for k in ("rope_type", *_ROPE_KEYS[kind])):
        refuse("rope_scaling", found[1][1], f"disagrees with rope_parameters={d}")
    return theta, _scaling_from_hf(name, d, hf_cfg)


def _scaling_from_hf(name: str, d: dict[str, Any], hf_cfg: dict[str, Any]) -> RopeScaling:
    kind = d["rope_type"]
    need = _ROPE_KEYS[kind] if kind == "llama3" else ("original_max_position_embeddings",)
    lacking = [k for k in need if d.get(k) is None]
    if lacking:
        refuse(name, d, f"{kind} RoPE scaling needs {lacking}")
    orig = int(d["original_max_position_embeddings"])
    kw: dict[str, Any] = dict(rope_type=kind, original_max_seq_len=orig)
    if kind == "llama3":
        kw.update(
            factor=float(d["factor"]), low_freq_factor=d["low_freq_factor"], high_freq_factor=d["high_freq_factor"]
        )
    else:  # transformers: a missing factor is the context ratio (DeepSeek-V3); falsy betas take 32 and 1
        factor = d.get("factor")
        if factor is None:
            factor = hf_cfg.get("max_position_embeddings", orig) / orig
        kw.update(
            factor=float(factor),
            beta_fast=float(d.get("beta_fast") or 32),
            beta_slow=float(d.get("beta_slow") or 1),
            attention_factor=d.get("attention_factor"),
            mscale=d.get("mscale"),
            mscale_all_dim=d.get("mscale_all_dim"),
            truncate=bool(d.get("truncate", True)),
        )
    try:
        return RopeScaling(**kw)
    except ValueError as err:
        refuse(name, d, str(err))


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rs = cfg.rope_scaling
    if rs is not None:
        params.update(
            rope_type=rs.rope_type, factor=rs.factor, original_max_position_embeddings=rs.original_max_seq_len
        )
        if rs.rope_type == "llama3":
            params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
        else:
            params.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, truncate=rs.truncate)
            params.update({k: getattr(rs, k) for k in ("attention_factor", "mscale", "mscale_all_dim")})
    return params


def _check_common(hf: dict[str, Any], fam: Family) -> None:
    """Refusals shared by every supported family: what moekit's attention/FFN cannot represent."""
    if hf["hidden_act"] not in ("silu", "swish"):
        refuse("hidden_act", hf["hidden_act"], "only 'silu' (alias 'swish'; SwiGLU) is supported")
    flags = ("attention_bias", "qkv_bias", "mlp_bias")
    for name in flags if fam.bias is None else [f for f in flags if f != fam.bias[0]]:
        if hf.get(name, False):
            refuse(name, hf[name], f"{fam.title} has no such projection biases; only false")
    if "quantization_config" in hf:
        refuse("quantization_config", hf["quantization_config"], "dequantize the checkpoint first")
    for name in ("clip_qkv",) if not fam.clip_qkv else ():
        if hf.get(name) is not None:
            refuse(name, hf[name], f"{fam.title} does not clip q/k/v; only null")


def _window_from_hf(hf: dict[str, Any], fam: Family) -> int | None:
    """The sliding window every layer uses, or None; a window on some layers only is refused.

    Mistral, Mixtral and Phi-3 slide every layer when ``sliding_window`` is set; Qwen only with
    ``use_sliding_window``, from layer ``max_window_layers`` on (``layer_types`` says which, when written).
    A window >= max_position_embeddings has no effect.
    """
    window = hf.get("sliding_window") if fam.window_field or fam.window_flag else None
    if fam.window_flag and not hf.get("use_sliding_window"):
        window = None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or []
    if not types and window is not None and "max_window_layers" in hf:
        first = hf["max_window_layers"]
        types = ["full_attention" if i < first else "sliding_attention" for i in range(n)]
    if types and "sliding_attention" not in types:
        window = None
    if window is None or window >= hf["max_position_embeddings"]:
        types = [t for t in types if t != "sliding_attention"]  # a window that never binds is full attention
        window = None
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        refuse("layer_types", sorted(set(types)), "only 'full_attention' and 'sliding_attention' layers are supported")
    if "sliding_attention" in types and "full_attention" in types:
        refuse(
            "layer_types" if hf.get("layer_types") else "max_window_layers",
            hf.get("layer_types") or hf.get("max_window_layers"),
            "sliding-window attention on some layers only is not supported yet; only all layers or none",
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        refuse("sliding_window", window, "must be a positive integer or null")
    return window


def _attention_from_hf(hf: dict[str, Any], fam: Family, given: Iterable[str] = ()) -> dict[str, Any]:
    """ModelConfig's attention fields for ``hf`` (class defaults filled in; ``given``: the fields config.json
    itself holds, for the error messages)."""
    if fam.deepseek is not None:  # head_dim is transformers' rotary width there, not a head size
        return dict(mla=mla_from_hf(hf, fam), n_kv_heads=hf["num_attention_heads"])
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and (d_model % n_heads or head_dim != d_model // n_heads):
        if not fam.head_dim_free:
            refuse("head_dim", head_dim, f"{fam.title} needs head_dim = hidden_size/num_attention_heads")
    elif d_model % n_heads:
        refuse("hidden_size", d_model, f"must be divisible by num_attention_heads={n_heads} (or set head_dim)")
    else:
        head_dim = None  # the default d_model // n_heads
    qkv_bias = out_bias = False
    if fam.bias is not None:
        flag, scope = fam.bias
        on = True if flag is None else bool(hf.get(flag, False))
        qkv_bias, out_bias = on, on and scope == "all"
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        absent = "" if "num_key_value_heads" in given else f" (absent from config.json: {fam.title}'s class default)"
        refuse("num_key_value_heads", n_kv_heads, f"must divide num_attention_heads={n_heads}{absent}")
    return dict(
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        qk_norm=fam.qk_norm,
        clip_qkv=None if hf.get("clip_qkv") is None else float(hf["clip_qkv"]),
    )


def config_from_hf(hf_cfg: dict[str, Any]) -> ModelConfig:
    """Map an HF ``config.json`` dict of a supported family to a :class:`ModelConfig`, refusing what moekit lacks.

    MoE routing and layer selection: :func:`moekit.core.hf_moe_config.moe_from_hf`.
    """
    fam = detect_family(hf_cfg)
    hf = {**fam.defaults_full(), **hf_cfg}
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"HF config lacks required fields {missing}")
    _check_common(hf, fam)
    theta, scaling = _rope(hf_cfg, fam)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        init_std=float(hf["initializer_range"]),
        moe=_moe_from_hf(hf_cfg, hf, fam),
        sliding_window=_window_from_hf(hf, fam),
        **_attention_from_hf(hf, fam, hf_cfg.keys()),
        **_scales_from_hf(hf, fam),
    )


def _scales_from_hf(hf: dict[str, Any], fam: Family) -> dict[str, float]:
    """Granite's multipliers (HF's attention_multiplier is the softmax scale itself: never None)."""
    if not fam.granite:
        return {}
    scales = {}
    for ours, name in GRANITE_SCALES.items():
        value = hf[name]
        if not is_finite_number(value) or value <= 0:
            refuse(name, value, "must be a finite number > 0")
        scales[ours] = float(value)
    return scales


def _moe_from_hf(hf_cfg: dict[str, Any], hf: dict[str, Any], fam: Family) -> MoEConfig | None:
    if not fam.is_moe:
        return None
    return deepseek_moe_from_hf(hf, fam) if fam.deepseek is not None else moe_from_hf(hf_cfg, hf, fam)


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


def _check_attention_exportable(cfg: ModelConfig, fam: Family) -> None:
    def bad(name: str, allowed: str) -> None:
        raise ValueError(f"ModelConfig.{name}={getattr(cfg, name)!r} has no {fam.architecture} equivalent: {allowed}")

    if fam.bias is None:
        for name in ("qkv_bias", "out_bias"):
            if getattr(cfg, name):
                bad(name, f"{fam.title} has no projection biases; only False")
    else:
        flag, scope = fam.bias
        if flag is None and not cfg.qkv_bias:
            bad("qkv_bias", f"{fam.title} always has q/k/v biases; only True")
        if scope == "all" and cfg.out_bias != cfg.qkv_bias:
            bad("out_bias", f"{fam.title}'s {flag} sets all four projection biases; must equal qkv_bias")
        if scope == "qkv" and cfg.out_bias:
            bad("out_bias", f"{fam.title} has no output-projection bias; only False")
    if cfg.qk_norm != fam.qk_norm:
        bad("qk_norm", f"{fam.title} needs {fam.qk_norm!r}")
    if cfg.clip_qkv is not None and not fam.clip_qkv:
        bad("clip_qkv", "only None")
    if cfg.head_dim is not None and cfg.head_dim * cfg.n_heads != cfg.d_model and not fam.head_dim_free:
        bad("head_dim", "only None (d_model / n_heads)")
    if cfg.sliding_window is not None and not (fam.window_field or fam.window_flag):
        bad("sliding_window", f"{fam.title} has no sliding-window attention; only None")
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type not in fam.rope_types:
        bad("rope_scaling", f"{fam.title} supports RoPE types {fam.rope_types}")
    for name in GRANITE_SCALES if not fam.granite else ():
        default = ModelConfig.__dataclass_fields__[name].default
        if getattr(cfg, name) != default:
            bad(name, f"only the default {default!r} (the Granite families have this multiplier)")


def check_exportable(cfg: ModelConfig, fam: Family) -> None:
    deepseek = fam.deepseek is not None
    _check_unknown_fields(cfg, _MODEL_MAPPED | _MODEL_INERT | ({"mla"} if deepseek else set()), "")
    _check_attention_exportable(cfg, fam)
    if deepseek:
        check_deepseek_exportable(cfg, fam)
    if cfg.moe is None:
        if fam.is_moe:
            raise ValueError(
                f"ModelConfig.moe=None: a dense model cannot be written as {fam.title}; use one of {WRITABLE_DENSE}"
            )
        return
    if not fam.is_moe:
        raise ValueError(f"ModelConfig.moe is set: {fam.title} has no MoE layers; use one of {WRITABLE_MOE}")
    _check_unknown_fields(cfg.moe, MOE_MAPPED | MOE_INERT | (DEEPSEEK_MOE_MAPPED if deepseek else set()), "moe.")
    if not deepseek:
        check_moe_exportable(cfg, fam)


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
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dh,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": DTYPE_NAMES.get(dtype, "float32"),
        "torch_dtype": DTYPE_NAMES.get(dtype, "float32"),
        **{name: 0.0 for name in fam.training_only},
    }
    if fam.name in ("llama", "granite"):
        hf["mlp_bias"] = False
    if fam.granite:
        hf.update({name: getattr(cfg, ours) for ours, name in GRANITE_SCALES.items()})
        hf["attention_multiplier"] = cfg.attn_scale if cfg.attn_scale is not None else cfg.dh**-0.5
    if fam.bias is not None and fam.bias[0] is not None:
        hf[fam.bias[0]] = cfg.qkv_bias
    if fam.clip_qkv:
        hf["clip_qkv"] = cfg.clip_qkv
    if fam.window_field or fam.window_flag:
        hf["sliding_window"] = cfg.sliding_window
    if fam.window_flag:  # every layer slides (max_window_layers 0), or none
        hf.update(use_sliding_window=cfg.sliding_window is not None, max_window_layers=0)
    if cfg.moe is not None:
        hf.update(deepseek_to_hf(cfg, fam) if fam.deepseek is not None else moe_to_hf(cfg, fam))
    old = (source or {}).get("config") or {}
    hf.update({k: old.get(k) for k in _TOKEN_FIELDS})
    if source is not None and source.get("family") == fam.name:
        hf.update({k: old[k] for k in _INERT_HF_FIELDS if k in old})
    return hf
