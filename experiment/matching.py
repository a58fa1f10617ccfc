"""Dense twins of a MoE config: matched active compute (FLOPs per token) or matched total parameters.

The twin keeps everything but the feed-forward width: each MoE layer becomes a dense SwiGLU whose ``d_ff``
makes its FLOPs (or parameters) equal the MoE layer's (router + top_k routed + shared experts). A model has
one ``d_ff``, so with some non-MoE layers ``d_ff`` is chosen so that the *model totals* agree."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.config import ModelConfig


@dataclass(frozen=True)
class MatchReport:
    name: str
    params_total: int
    params_active: int
    flops_per_token: int

    def rel_diff(self, other: MatchReport, field: str) -> float:
        a, b = getattr(self, field), getattr(other, field)
        return abs(a - b) / max(b, 1)


def describe(name: str, cfg: ModelConfig, seq_len: int | None = None) -> MatchReport:
    pc = count_params(cfg)
    return MatchReport(name, pc.total, pc.active, flops_per_token(cfg, seq_len))


def _best_d_ff(cfg: ModelConfig, target: int, measure) -> int:
    """Smallest-error integer d_ff for a dense twin; ``measure(dense_cfg)`` is monotone in d_ff."""
    dense = dataclasses.replace(cfg, moe=None, d_ff=1)
    base = measure(dense)
    per_unit = measure(dataclasses.replace(dense, d_ff=2)) - base  # exact: both measures are linear in d_ff
    d_ff = max(1, round((target - base) / per_unit) + 1)
    return d_ff


def dense_twin(cfg: ModelConfig, seq_len: int | None = None) -> ModelConfig:
    """Dense model with the MoE model's active FLOPs per token (and so, up to the router, its active params)."""
    if cfg.moe is None:
        raise ValueError("dense_twin needs a ModelConfig with moe set; got moe=None")
    target = flops_per_token(cfg, seq_len)
    d_ff = _best_d_ff(cfg, target, lambda c: flops_per_token(c, seq_len))
    return dataclasses.replace(cfg, moe=None, d_ff=d_ff)


def param_matched_twin(cfg: ModelConfig) -> ModelConfig:
    """Dense model with the MoE model's total parameter count."""
    if cfg.moe is None:
        raise ValueError("param_matched_twin needs a ModelConfig with moe set; got moe=None")
    target = count_params(cfg).total
    d_ff = _best_d_ff(cfg, target, lambda c: count_params(c).total)
    return dataclasses.replace(cfg, moe=None, d_ff=d_ff)


def check_matched(a: MatchReport, b: MatchReport, field: str = "flops_per_token", tol: float = 0.02) -> None:
    """Raise when two runs' ``field`` differ by more than ``tol`` (relative)."""
    diff = a.rel_diff(b, field)
    if diff > tol:
        raise ValueError(
            f"{a.name} and {b.name} differ by {diff:.1%} in {field} ({getattr(a, field):,} vs {getattr(b, field):,}); "
            f"the tolerance is {tol:.0%}. Adjust the configs, or allow it explicitly (compare.allow_mismatch=true)."
        )
