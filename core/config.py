"""ModelConfig: the dense decoder's shape, with an optional MoE spec for chosen feed-forward slots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from moekit.moe.config import MoEConfig


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. ``moe=None`` is a dense model.

    ``d_ff`` is the SwiGLU hidden width of dense layers. When ``moe`` is set, layers where
    ``moe.is_moe_layer(i)`` holds get a routed expert layer instead of the dense FFN.
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

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(name, value, "must be a positive integer")
        if self.d_model % self.n_heads:
            _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            hd = self.d_model // self.n_heads
            _fail("d_model", self.d_model, f"head dim d_model/n_heads={hd} must be even (RoPE)")
        if self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if self.norm_eps <= 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if self.init_std <= 0:
            _fail("init_std", self.init_std, "must be > 0")
        if self.moe is not None:
            if self.moe.layers is not None and any(i >= self.n_layers for i in self.moe.layers):
                _fail("moe", self.moe.layers, f"moe.layers entries must be < n_layers={self.n_layers}")
            if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
                _fail("moe", self.moe, "selects no layer; check moe.every_n_layers / moe.layers")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
