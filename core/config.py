"""ModelConfig: the dense decoder's shape, with an optional MoE spec for chosen feed-forward slots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from moekit.core.checks import fail, is_finite_number, is_int
from moekit.moe.config import MoEConfig

QK_NORMS = ("none", "head", "full")
ROPE_SCALINGS = ("llama3", "yarn")


def _fail(name: str, value: Any, allowed: str) -> None:
    fail("ModelConfig", name, value, allowed)


@dataclass
class RopeScaling:
    """Frequency scaling of RoPE for long contexts, nested as ``ModelConfig(rope_scaling=RopeScaling(...))``.

    - ``rope_type='llama3'`` (Llama 3.1): frequencies whose wavelength exceeds ``original_max_seq_len /
      low_freq_factor`` are divided by ``factor``, those shorter than ``original_max_seq_len /
      high_freq_factor`` are kept, and the band between is interpolated smoothly.
    - ``rope_type='yarn'`` (Peng et al. 2023): frequencies that turn fewer than ``beta_slow`` times over
      ``original_max_seq_len`` positions are divided by ``factor``, those turning more than ``beta_fast`` times
      are kept, with a linear ramp over the dims between (``truncate`` rounds the ramp ends outwards), and
      cos/sin are scaled by :attr:`attention_scaling` (``attention_factor``, else ``0.1 ln(factor) + 1``, or
      the ratio of that with ``mscale`` and ``mscale_all_dim`` when both are set, as DeepSeek does).

    Formulas in ``moekit.core.layers.rope_inv_freq``. The fields of the other type keep their defaults.
    """

    rope_type: str = "llama3"  # one of ROPE_SCALINGS
    factor: float = 8.0
    original_max_seq_len: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None = derived from factor (and mscale / mscale_all_dim)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALINGS:
            fail("RopeScaling", "rope_type", self.rope_type, f"allowed values are {', '.join(ROPE_SCALINGS)}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if not is_finite_number(value) or value <= 0:
                fail("RopeScaling", name, value, "must be a finite number > 0")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and (not is_finite_number(value) or value <= 0):
                fail("RopeScaling", name, value, "must be a finite number > 0, or None")
        if self.high_freq_factor <= self.low_freq_factor:
            allowed = f"must be > low_freq_factor={self.low_freq_factor}"
            fail("RopeScaling", "high_freq_factor", self.high_freq_factor, allowed)
        if not is_int(self.original_max_seq_len) or self.original_max_seq_len < 1:
            fail("RopeScaling", "original_max_seq_len", self.original_max_seq_len, "must be a positive integer")
        if not isinstance(self.truncate, bool):
            fail("RopeScaling", "truncate", self.truncate, "must be true or false")

    @property
    def attention_scaling(self) -> float:
        """The factor on cos/sin (so on every q.k logit, squared): 1 except for yarn."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor

        def m(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return m(self.factor, self.mscale) / m(self.factor, self.mscale_all_dim)
        return m(self.factor)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3), nested as ``ModelConfig(mla=MLAConfig(...))``.

    Queries come from ``x`` directly (``q_lora_rank=None``, DeepSeek-V2-Lite) or through a rank-``q_lora_rank``
    bottleneck with an RMSNorm; keys and values come from one shared latent ``c_kv`` of width ``kv_lora_rank``
    (RMSNorm'd) expanded per head, plus one rotary key of width ``qk_rope_head_dim`` shared by all heads. Each
    head's query/key is ``qk_nope_head_dim`` position-free dims then ``qk_rope_head_dim`` rotary dims; values
    have ``v_head_dim``. ``rope_interleave``: the rotary dims are rotated in adjacent pairs ``(x0, x1), (x2,
    x3), ...`` (DeepSeek's layout) instead of Llama's half split. ``latent_norm_eps``: the eps of the two
    latent norms (transformers fixes it at 1e-6 whatever ``rms_norm_eps`` says).
    """

    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None = a plain q projection
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    latent_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail("MLAConfig", name, value, "must be a positive integer")
        if self.q_lora_rank is not None and (not is_int(self.q_lora_rank) or self.q_lora_rank < 1):
            fail("MLAConfig", "q_lora_rank", self.q_lora_rank, "must be a positive integer, or None (no q bottleneck)")
        if not is_int(self.qk_rope_head_dim) or self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            fail("MLAConfig", "qk_rope_head_dim", self.qk_rope_head_dim, "must be an even integer >= 2 (RoPE)")
        if not isinstance(self.rope_interleave, bool):
            fail("MLAConfig", "rope_interleave", self.rope_interleave, "must be true or false")
        if not is_finite_number(self.latent_norm_eps) or self.latent_norm_eps <= 0:
            fail("MLAConfig", "latent_norm_eps", self.latent_norm_eps, "must be a finite number > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. ``moe=None`` is a dense model.

    ``d_ff`` is the SwiGLU hidden width of dense layers. When ``moe`` is set, layers where
    ``moe.is_moe_layer(i)`` holds get a routed expert layer instead of the dense FFN.

    Attention options (the defaults are the plain Llama attention): ``head_dim`` (None = d_model / n_heads;
    Qwen3 sets it explicitly), ``qkv_bias`` / ``out_bias`` (biases of the q/k/v and of the output projection),
    ``qk_norm`` ("head": RMSNorm over each head's Dh, Qwen3; "full": over the whole q and k projection
    width, OLMoE), ``clip_qkv`` (clamp q, k, v to [-c, c] after the QK-norm, OLMoE) and
    ``rope_scaling`` (:class:`RopeScaling`), ``sliding_window`` (each query sees itself and the
    ``sliding_window - 1`` keys before it, in every layer; Mistral). ``mla`` (:class:`MLAConfig`) replaces
    the q/k/v projections by multi-head latent attention (DeepSeek); ``n_kv_heads`` must then equal
    ``n_heads`` and ``head_dim``, the biases, QK-norm, clipping and ``attn_scale`` keep their defaults.

    Scalings (IBM Granite; HF field in brackets; the defaults change nothing): ``embed_scale`` multiplies the
    input embeddings, ``inputs_embeds`` too (``embedding_multiplier``); ``residual_scale`` multiplies each
    attention and feed-forward output before its residual add (``residual_multiplier``); ``attn_scale`` is
    the softmax scale of q.k, None = 1/sqrt(Dh) (``attention_multiplier``); ``logit_divisor`` divides the
    logits (``logits_scaling``).
    """

    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    d_ff: int = 683
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    moe: MoEConfig | None = None
    head_dim: int | None = None  # None = d_model // n_heads
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"  # one of QK_NORMS
    clip_qkv: float | None = None
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # every layer: query i sees keys j with i - window < j <= i
    mla: MLAConfig | None = None  # None = grouped-query attention
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    attn_scale: float | None = None  # None = 1/sqrt(Dh)
    logit_divisor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:  # is_int: YAML's `true` is no 1
                _fail(name, value, "must be a positive integer")
        # is_finite_number first: None, a list or a string would raise a bare TypeError at the comparison
        for name, ok, rule in (
            ("rope_theta", lambda x: x > 0, "> 0"),
            ("norm_eps", lambda x: x > 0, "> 0"),
            ("dropout", lambda x: 0 <= x < 1, "in [0, 1)"),
            ("init_std", lambda x: x > 0, "> 0"),
        ):
            value = getattr(self, name)
            if not is_finite_number(value) or not ok(value):
                _fail(name, value, f"must be a finite number {rule}")
        if not isinstance(self.tie_embeddings, bool):
            _fail("tie_embeddings", self.tie_embeddings, "must be true or false")
        self._check_attention()
        self._check_scales()
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.moe is not None:
            if self.moe.layers is not None and any(i >= self.n_layers for i in self.moe.layers):
                _fail("moe.layers", self.moe.layers, f"entries must be < n_layers={self.n_layers}")
            if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
                _fail("moe", self.moe, "selects no layer; check moe.every_n_layers / moe.layers")

    def _check_attention(self) -> None:
        # head_dim stays None when unset, so that dataclasses.replace(cfg, d_model=...) moves the head dim along.
        if self.head_dim is None and self.mla is None:  # MLA sizes its heads itself
            if self.d_model % self.n_heads:
                _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads} (or set head_dim)")
            if (self.d_model // self.n_heads) % 2:
                hd = self.d_model // self.n_heads
                _fail("d_model", self.d_model, f"head dim d_model/n_heads={hd} must be even (RoPE)")
        elif self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2):
            _fail("head_dim", self.head_dim, "must be an even integer >= 2 (RoPE), or None for d_model // n_heads")
        for name in ("qkv_bias", "out_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if self.qk_norm not in QK_NORMS:
            _fail("qk_norm", self.qk_norm, f"allowed values are {', '.join(QK_NORMS)}")
        if self.clip_qkv is not None and (not is_finite_number(self.clip_qkv) or self.clip_qkv <= 0):
            _fail("clip_qkv", self.clip_qkv, "must be a finite number > 0, or None (no clipping)")
        if self.sliding_window is not None and (not is_int(self.sliding_window) or self.sliding_window < 1):
            _fail("sliding_window", self.sliding_window, "must be a positive integer (keys per query), or None")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail("rope_scaling", self.rope_scaling, "must be a RopeScaling (or its dict), or None")
        if self.mla is not None:
            self._check_mla()

    def _check_scales(self) -> None:
        for name in ("embed_scale", "residual_scale", "logit_divisor"):
            value = getattr(self, name)
            if not is_finite_number(value) or value <= 0:
                _fail(name, value, "must be a finite number > 0 (1.0 = no scaling)")
        if self.attn_scale is not None and (not is_finite_number(self.attn_scale) or self.attn_scale <= 0):
            _fail("attn_scale", self.attn_scale, "must be a finite number > 0, or None for 1/sqrt(head dim)")

    def _check_mla(self) -> None:
        if not isinstance(self.mla, MLAConfig):
            _fail("mla", self.mla, "must be an MLAConfig (or its dict), or None")
        if self.n_kv_heads != self.n_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must equal n_heads={self.n_heads} with mla (every head has its kv)")
        defaults = dict(head_dim=None, qkv_bias=False, out_bias=False, qk_norm="none", clip_qkv=None, attn_scale=None)
        for name, default in defaults.items():
            if getattr(self, name) != default:
                _fail(name, getattr(self, name), f"only {default!r} with mla (latent attention has no such option)")

    @property
    def dh(self) -> int:
        """The attention head dim in use: ``head_dim``, or ``d_model // n_heads`` when that is None."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def rope_dim(self) -> int:
        """The rotated width of each query/key head: ``mla.qk_rope_head_dim`` with MLA, else :attr:`dh`."""
        return self.dh if self.mla is None else self.mla.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(i)

    def ffn_kinds(self) -> list[str]:
        """Per-layer feed-forward kind: "dense" or "moe"."""
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.n_layers)]

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig got unknown fields {unknown}; allowed fields are {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            d["moe"] = MoEConfig.from_dict(d["moe"])  # drops placement fields of older saved configs
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read JSON or YAML (chosen by suffix)."""
        text = Path(path).read_text()
        d = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
        return cls.from_dict(d)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
