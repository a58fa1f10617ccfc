"""Router auxiliary losses as pure functions over real (unpadded) tokens.

Shapes: ``N`` tokens, ``E`` experts, ``K`` experts per token. ``mask_n`` is bool ``[N]`` (True = real)
or None (all real). Both losses are returned unweighted; the layer applies the coefficients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _real_weights(n: int, mask_n: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token weight (1 real / 0 padded) and the real-token count, clamped to >= 1."""
    if mask_n is None:
        w_n = torch.ones(n, dtype=like.dtype, device=like.device)
    else:
        w_n = mask_n.to(like.dtype)
    return w_n, w_n.sum().clamp(min=1)


def assignment_counts(expert_idx_nk: Tensor, num_experts: int, mask_n: Tensor | None = None) -> Tensor:
    """Routed assignments per expert over real tokens, before any capacity drop: float ``[E]``."""
    n, k = expert_idx_nk.shape
    w_nk = (torch.ones(n, device=expert_idx_nk.device) if mask_n is None else mask_n.float())[:, None]
    w_nk = w_nk.expand(n, k).reshape(-1)
    counts_e = torch.zeros(num_experts, device=expert_idx_nk.device)
    return counts_e.index_add_(0, expert_idx_nk.reshape(-1), w_nk)


def load_balance_loss(
    probs_ne: Tensor, expert_idx_nk: Tensor, mask_n: Tensor | None = None, *, counts_e: Tensor | None = None
) -> Tensor:
    """Switch / GShard load-balancing loss ``E * sum_e f_e * P_e`` over real tokens.

    ``f_e = (# real assignments routed to e) / (N_real * K)``: the fraction of routed assignments
    (before capacity), not differentiable. ``P_e = mean_{real n} probs_ne[n, e]``: the mean router
    probability, which carries the gradient. Uniform routing gives f_e = P_e = 1/E and a loss of exactly
    1.0; concentrating both on one expert gives E. ``counts_e`` overrides the per-expert assignment
    counts (e.g. summed over data-parallel ranks); f_e then divides by their total.
    """
    n, e = probs_ne.shape
    w_n, n_real = _real_weights(n, mask_n, probs_ne)
    if counts_e is None:
        counts_e = assignment_counts(expert_idx_nk, e, mask_n)
    f_e = counts_e.to(probs_ne.dtype) / counts_e.sum().clamp(min=1).to(probs_ne.dtype)
    p_e = (probs_ne * w_n[:, None]).sum(0) / n_real
    return e * (f_e * p_e).sum()


def router_z_loss(logits_ne: Tensor, mask_n: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_{real n} logsumexp_e(logits_ne[n, e])^2``.

    Penalises large logits, which keeps the softmax out of its saturated, round-off-prone range.
    """
    w_n, n_real = _real_weights(logits_ne.shape[0], mask_n, logits_ne)
    z_n = torch.logsumexp(logits_ne, dim=-1)
    return (z_n.square() * w_n).sum() / n_real
