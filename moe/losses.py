"""Router auxiliary losses as pure functions over real (unpadded) tokens.

Shapes: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``Gs`` groups an entropy loss covers.
``mask_n`` is bool ``[N]`` (True = real) or None (all real); ``group_n`` is long ``[N]`` (modality ids).
Every loss is returned unweighted; the layer applies the coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# ---------------------------------------------------------------- LIMoE per-modality entropy losses
def entropy(p_xe: Tensor) -> Tensor:
    """``-sum_e p log p`` over the last axis with a finite gradient at ``p = 0``.

    Experts masked out by modality groups have probability exactly 0; ``d/dp (p log p)`` is ``-inf``
    there and would turn the softmax backward into NaN (``0 * inf``). Clamping inside the log keeps the
    value exact (``0 * log(tiny) = 0``) and the gradient finite; the softmax Jacobian then zeroes it.
    """
    return -(p_xe * p_xe.clamp(min=torch.finfo(p_xe.dtype).tiny).log()).sum(-1)


def _group_weights(group_n: Tensor | None, mask_n: Tensor | None, groups: Sequence[int], like: Tensor) -> Tensor:
    """``w_gn [Gs, N]``: 1 where token ``n`` is real and belongs to ``groups[g]`` (``group_n=None``: all group 0)."""
    n = like.shape[0]
    if group_n is None:
        group_n = torch.zeros(n, dtype=torch.long, device=like.device)
    ids_g = torch.as_tensor(list(groups), dtype=group_n.dtype, device=like.device)
    w_gn = group_n[None, :] == ids_g[:, None]
    if mask_n is not None:
        w_gn = w_gn & mask_n[None, :]
    return w_gn.to(like.dtype)


def local_entropy_loss(
    probs_ne: Tensor, group_n: Tensor | None, mask_n: Tensor | None, groups: Sequence[int]
) -> Tensor:
    """LIMoE local entropy loss per group, ``[len(groups)]`` (minimised):

        local_g = (1 / n_g) * sum_{real n in g} H(p(. | x_n)),   H(p) = -sum_e p_e log p_e

    Low when each token commits to few experts. ``n_g`` counts the real tokens of group ``g``; a group
    with no tokens gives 0.
    """
    w_gn = _group_weights(group_n, mask_n, groups, probs_ne)
    return (w_gn @ entropy(probs_ne)) / w_gn.sum(1).clamp(min=1)


def global_entropy_loss(
    probs_ne: Tensor,
    group_n: Tensor | None,
    mask_n: Tensor | None,
    groups: Sequence[int],
    threshold: float | None = None,
) -> Tensor:
    """LIMoE global entropy loss per group, ``[len(groups)]`` (minimised, so the entropy is maximised):

        pbar_g   = (1 / n_g) * sum_{real n in g} p(. | x_n)      # the group's average routing distribution
        global_g = -H(pbar_g)                                    # threshold None
        global_g = max(0, tau - H(pbar_g))                       # threshold tau (LIMoE's Omega_tau)

    Low when the group's tokens, taken together, spread over many experts; ``tau = ln m`` stops pushing
    once the group's marginal is as spread as a uniform distribution over ``m`` experts. A group with no
    tokens gives 0.
    """
    w_gn = _group_weights(group_n, mask_n, groups, probs_ne)
    n_g = w_gn.sum(1)
    pbar_ge = (w_gn @ probs_ne) / n_g.clamp(min=1)[:, None]
    h_g = entropy(pbar_ge)
    loss_g = -h_g if threshold is None else (threshold - h_g).clamp(min=0)
    return torch.where(n_g > 0, loss_g, torch.zeros_like(loss_g))
