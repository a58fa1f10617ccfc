"""Dense twins of a MoE config: matched active compute (FLOPs per token) or matched total parameters.

The twin keeps everything but the feed-forward width: each MoE layer becomes a dense SwiGLU whose ``d_ff``
makes its FLOPs (or parameters) equal the MoE layer's (router + top_k routed + shared experts). A model has
one ``d_ff``, so with some non-MoE layers ``d_ff`` is chosen so that the *model totals* agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.config import ModelConfig
from moekit.moe.config import MoEConfig


@dataclass(frozen=True)
class MatchReport:
    name: str
    params_total: int
    params_active: int
    flops_per_token: int


def describe(name: str, cfg: ModelConfig, seq_len: int | None = None) -> MatchReport:
    pc = count_params(cfg)
    return MatchReport(name, pc.total, pc.active, flops_per_token(cfg, seq_len))


def moe_name(moe: MoEConfig) -> str:
    return f"moe-{moe.num_experts}x{moe.top_k}" + (f"+{moe.num_shared_experts}s" if moe.num_shared_experts else "")


def _twin(cfg: ModelConfig, measure: Callable[[ModelConfig], int], caller: str) -> ModelConfig:
    """The dense model whose integer ``d_ff`` brings ``measure`` (linear in ``d_ff``) closest to the MoE's."""
    if cfg.moe is None:
        raise ValueError(f"{caller} needs a ModelConfig with moe set; got moe=None")
    dense = dataclasses.replace(cfg, moe=None, d_ff=1)
    base = measure(dense)
    per_unit = measure(dataclasses.replace(dense, d_ff=2)) - base  # exact: both measures are linear in d_ff
    return dataclasses.replace(dense, d_ff=max(1, round((measure(cfg) - base) / per_unit) + 1))


def dense_twin(cfg: ModelConfig, seq_len: int | None = None) -> ModelConfig:
    """Dense model with the MoE model's active FLOPs per token (and so, up to the router, its active params)."""
    return _twin(cfg, lambda c: flops_per_token(c, seq_len), "dense_twin")


def param_matched_twin(cfg: ModelConfig) -> ModelConfig:
    """Dense model with the MoE model's total parameter count."""
    return _twin(cfg, lambda c: count_params(c).total, "param_matched_twin")


def relative_mismatch(x: float, y: float) -> float:
    """How far ``x`` is from ``y``, relative to ``y``: what ``compare.max_flops_mismatch`` bounds."""
    return abs(x - y) / max(y, 1)


def check_matched(a: MatchReport, b: MatchReport, field: str = "flops_per_token", tol: float = 0.02) -> None:
    """Raise when two runs' ``field`` differ by more than ``tol`` (relative to ``b``; the comparison passes
    ``compare.max_flops_mismatch``)."""
    x, y = getattr(a, field), getattr(b, field)
    if (gap := relative_mismatch(x, y)) > tol:
        raise ValueError(
            f"{a.name} and {b.name} differ by {gap:.2%} in {field} ({x:,} vs {y:,}); the tolerance is {tol:.2%} "
            f"(compare.max_flops_mismatch={tol:g}). Adjust the configs, raise compare.max_flops_mismatch, or allow "
            "it explicitly (compare.allow_mismatch=true)."
        )
