"""Per-modality routing: modality-specific expert groups and the modality purity of experts.

Shapes: ``N`` tokens, ``E`` experts, ``Gr`` telemetry groups (modalities), ``G`` groups with reserved
experts (``len(modality_experts)``).

Expert groups. ``MoEConfig.modality_experts = [n_0, ..., n_{G-1}]`` gives group ``g`` the contiguous
block ``[o_g, o_g + n_g)`` with ``o_g = n_0 + ... + n_{g-1}``; experts ``[sum_g n_g, E)`` are common to
every group. A token of group ``g`` may be routed to its block and the common experts; a group id outside
``[0, G)`` may use every expert. The router turns this into ``-inf`` on the logits of forbidden experts
before the softmax and the top-k (and before the aux-loss-free bias is added), so forbidden experts get
probability exactly 0, are never selected, and every dispatch path sees one and the same routing.

Modality purity of expert ``e`` (from ``c_ge``, the assignments of group-``g`` tokens that expert ``e``
processed, and ``n_g``, the real tokens of group ``g``; groups with ``n_g = 0`` are left out)::

    s_ge     = c_ge / n_g                      # expert e's load from group g, per token of g
    purity_e = max_g s_ge / sum_g s_ge         # 0 when sum_g s_ge = 0 (an unused expert)

Dividing by ``n_g`` first removes the token-count imbalance between modalities (a batch may hold 5x more
text than audio tokens): with equal token counts ``purity_e`` is the share of the expert's tokens that
come from its dominant modality. It lies in ``[1 / (groups present), 1]`` for a used expert: 1 means the
expert serves a single modality, ``1/Gr`` that it serves every modality in proportion to its size.
The layer's mean purity weights each expert by ``sum_g s_ge`` (its normalised load).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def modality_expert_ranges(modality_experts: Sequence[int], num_experts: int) -> tuple[list[range], range]:
    """(each group's reserved experts, the common experts) for ``MoEConfig.modality_experts``."""
    if sum(modality_experts) > num_experts:
        raise ValueError(f"modality_experts={list(modality_experts)} reserves more than num_experts={num_experts}")
    ranges, start = [], 0
    for n in modality_experts:
        ranges.append(range(start, start + n))
        start += n
    return ranges, range(start, num_experts)


def allowed_experts_table(modality_experts: Sequence[int], num_experts: int) -> Tensor:
    """bool ``[G + 1, E]``: row ``g`` marks the experts group ``g`` may use; the last row (ids outside
    ``[0, G)``) allows every expert."""
    ranges, common = modality_expert_ranges(modality_experts, num_experts)
    table_ge = torch.zeros(len(ranges) + 1, num_experts, dtype=torch.bool)
    for g, r in enumerate(ranges):
        table_ge[g, r.start : r.stop] = True
    table_ge[:, common.start : common.stop] = True
    table_ge[-1] = True
    return table_ge


def token_allowed_experts(table_ge: Tensor, group_n: Tensor | None, num_tokens: int) -> Tensor:
    """bool ``[N, E]`` from :func:`allowed_experts_table`; ``group_n=None`` puts every token in group 0."""
    num_reserved = table_ge.shape[0] - 1
    if group_n is None:
        return table_ge[0].expand(num_tokens, -1)
    in_range_n = (group_n >= 0) & (group_n < num_reserved)
    return table_ge[torch.where(in_range_n, group_n, num_reserved)]


def modality_purity(by_group_ge: Tensor, tokens_g: Tensor) -> Tensor:
    """``purity_e`` (float ``[E]``) from the kept assignments ``by_group_ge [Gr, E]`` and the real tokens
    per group ``tokens_g [Gr]``; formula in the module docstring."""
    present_g = tokens_g > 0
    share_ge = by_group_ge.double() / tokens_g.double().clamp(min=1)[:, None] * present_g[:, None]
    total_e = share_ge.sum(0)
    return torch.where(total_e > 0, share_ge.amax(0) / total_e.clamp(min=1e-300), 0.0)


def mean_purity(by_group_ge: Tensor, tokens_g: Tensor) -> Tensor:
    """Mean of ``purity_e`` weighted by each expert's normalised load ``sum_g c_ge / n_g`` (scalar)."""
    present_g = tokens_g > 0
    share_ge = by_group_ge.double() / tokens_g.double().clamp(min=1)[:, None] * present_g[:, None]
    total_e = share_ge.sum(0)
    # sum_e purity_e * total_e / sum_e total_e, and purity_e * total_e = max_g s_ge
    return share_ge.amax(0).sum() / total_e.sum().clamp(min=1e-300)


def load_fractions(by_group_ge: Tensor) -> Tensor:
    """Each group's load spread over the experts: ``c_ge / sum_e c_ge`` (rows of empty groups are 0)."""
    c = by_group_ge.double()
    return c / c.sum(1, keepdim=True).clamp(min=1e-300)
