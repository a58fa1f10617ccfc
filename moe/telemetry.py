"""Routing telemetry: per-layer counters as device tensors (no host sync until logged).

Shapes: ``N`` tokens, ``E`` experts, ``A`` assignments, ``Gr`` telemetry groups (e.g. text / image /
audio tokens, from ``group_ids``).

Per-group counters split the overall ones exactly when every group id lies in ``[0, Gr)``:
``tokens_per_expert_by_group.sum(0) == tokens_per_expert``, ``tokens_by_group.sum() == num_tokens`` and
``(router_entropy_by_group * tokens_by_group).sum() / num_tokens == router_entropy``. Modality purity
(``moekit.moe.modality``): ``purity_e = max_g s_ge / sum_g s_ge`` with ``s_ge = c_ge / n_g``, ``c`` =
``tokens_per_expert_by_group``, ``n`` = ``tokens_by_group``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.moe.losses import entropy as entropy_of
from moekit.moe.modality import mean_purity, modality_purity
from moekit.moe.router import Routing


@dataclass
class RoutingStats:
    """One MoE layer's routing for one forward. All fields are detached tensors."""

    tokens_per_expert: Tensor  # [E] assignments each expert processed (after capacity)
    routed_assignments: Tensor  # scalar: real assignments before capacity (expert choice: slots filled)
    dropped_assignments: Tensor  # scalar: real assignments removed by capacity
    dropped_tokens: Tensor  # scalar: real tokens left with no routed expert at all
    num_tokens: Tensor  # scalar: real tokens
    router_entropy: Tensor  # scalar: mean over real tokens of the routing distribution's entropy (nats)
    dead_experts: Tensor  # scalar: experts unused for >= dead_expert_window training forwards
    tokens_per_expert_by_group: Tensor | None = None  # [Gr, E] kept assignments by token group
    tokens_by_group: Tensor | None = None  # [Gr] real tokens of each group
    router_entropy_by_group: Tensor | None = None  # [Gr] mean routing entropy over each group's real tokens

    @property
    def modality_purity(self) -> Tensor | None:
        """[E] purity of each expert (0 for an unused one); None without group ids."""
        if self.tokens_per_expert_by_group is None or self.tokens_by_group is None:
            return None
        return modality_purity(self.tokens_per_expert_by_group, self.tokens_by_group)

    @property
    def mean_modality_purity(self) -> Tensor | None:
        """Load-weighted mean of ``modality_purity`` (scalar); None without group ids."""
        if self.tokens_per_expert_by_group is None or self.tokens_by_group is None:
            return None
        return mean_purity(self.tokens_per_expert_by_group, self.tokens_by_group)

    @property
    def drop_rate(self) -> Tensor:
        return self.dropped_assignments / self.routed_assignments.clamp(min=1)

    @property
    def load_imbalance(self) -> Tensor:
        """max / mean of tokens_per_expert: 1.0 is perfectly balanced, E means one expert took all."""
        load = self.tokens_per_expert.float()
        return load.max() / load.mean().clamp(min=1e-9)

    @property
    def load_cv(self) -> Tensor:
        """Coefficient of variation std / mean (population std) of tokens_per_expert."""
        load = self.tokens_per_expert.float()
        return load.std(unbiased=False) / load.mean().clamp(min=1e-9)

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists for JSON logging (this is where the host sync happens)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.tolist()
        for name in ("drop_rate", "load_imbalance", "load_cv"):
            out[name] = getattr(self, name).item()
        if self.modality_purity is not None:
            out["modality_purity"] = self.modality_purity.tolist()
            out["mean_modality_purity"] = self.mean_modality_purity.item()
        return out


_SUMMED = ("tokens_per_expert", "routed_assignments", "dropped_assignments", "dropped_tokens", "num_tokens")


def reduce_across_processes(
    stats: Sequence[RoutingStats], steps_since_used: Sequence[Tensor], windows: Sequence[int]
) -> list[RoutingStats]:
    """Every process's stats of each layer as one (collective over the default group; a no-op on one
    process): counts summed, entropies token-weighted, and ``dead_experts`` the experts that no process has
    used for ``windows[i]`` forwards (the minimum of the layers' ``steps_since_used [E]`` over processes).
    Every process must call it with the same layers, grouped or not alike. Two collectives in all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(stats)
    pieces: list[Tensor] = []
    for s in stats:
        pieces += [getattr(s, name).float().reshape(-1) for name in _SUMMED]
        pieces.append((s.router_entropy * s.num_tokens).float().reshape(-1))
        if s.tokens_by_group is not None:
            pieces += [s.tokens_per_expert_by_group.reshape(-1), s.tokens_by_group]
            pieces.append(s.router_entropy_by_group * s.tokens_by_group)
    flat = torch.cat(pieces)
    dist.all_reduce(flat)
    least = torch.stack([t.to(torch.long) for t in steps_since_used])  # [layers, E]
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    out, at = [], 0

    def take(like: Tensor) -> Tensor:
        nonlocal at
        t = flat[at : at + like.numel()].view(like.shape).to(like.dtype)
        at += like.numel()
        return t

    for s, steps_e, window in zip(stats, least, windows):
        summed = {name: take(getattr(s, name)) for name in _SUMMED}
        entropy = take(s.router_entropy) / summed["num_tokens"].float().clamp(min=1)
        groups: dict[str, Tensor | None] = dict.fromkeys(
            ("tokens_per_expert_by_group", "tokens_by_group", "router_entropy_by_group")
        )
        if s.tokens_by_group is not None:
            groups["tokens_per_expert_by_group"] = take(s.tokens_per_expert_by_group)
            groups["tokens_by_group"] = take(s.tokens_by_group)
            groups["router_entropy_by_group"] = take(s.router_entropy_by_group) / groups["tokens_by_group"].clamp(min=1)
        dead = (steps_e >= window).sum().to(s.dead_experts.dtype)
        out.append(RoutingStats(**summed, router_entropy=entropy, dead_experts=dead, **groups))
    return out


_SCALARS = ("drop_rate", "router_entropy", "load_imbalance", "load_cv")


def summarize_routing(stats: Sequence[RoutingStats], prefix: str = "moe/") -> dict[str, float]:
    """Aggregate layers for logging with one host sync: means of rates, entropy, imbalance and CV,
    the worst layer's imbalance, and totals of dropped tokens and dead experts."""
    if not stats:
        return {}
    per_layer = torch.stack(
        [
            torch.stack(
                [getattr(s, name).float() for name in _SCALARS] + [s.dropped_tokens.float(), s.dead_experts.float()]
            )
            for s in stats
        ]
    )  # [layers, len(_SCALARS) + 2]
    means, maxes, sums = per_layer.mean(0).tolist(), per_layer.amax(0).tolist(), per_layer.sum(0).tolist()
    out = {f"{prefix}{name}": means[i] for i, name in enumerate(_SCALARS)}
    out[f"{prefix}load_imbalance_max"] = maxes[_SCALARS.index("load_imbalance")]
    out[f"{prefix}dropped_tokens"] = sums[len(_SCALARS)]
    out[f"{prefix}dead_experts"] = sums[len(_SCALARS) + 1]
    purities = [s.mean_modality_purity for s in stats if s.mean_modality_purity is not None]
    if purities:
        out[f"{prefix}modality_purity"] = torch.stack(purities).mean().item()
    return out


@torch.no_grad()
def compute_stats(
    routing: Routing,
    keep_a: Tensor,
    mask_n: Tensor | None,
    num_experts: int,
    dead_experts: Tensor,
    group_n: Tensor | None = None,
    num_groups: int = 3,
) -> RoutingStats:
    """Counters from one routing decision and the dispatch's ``keep_a``; sync-free (index_add, no bincount)."""
    device = keep_a.device
    n = routing.probs_ne.shape[0]
    kept_a = keep_a.float()
    tokens_per_expert = torch.zeros(num_experts, device=device).index_add_(0, routing.expert_a, kept_a)
    routed = routing.valid_a.sum().float()
    kept = kept_a.sum()
    real_n = torch.ones(n, dtype=torch.bool, device=device) if mask_n is None else mask_n
    kept_per_token_n = torch.zeros(n, device=device).index_add_(0, routing.token_a, kept_a)
    dropped_tokens = ((kept_per_token_n == 0) & real_n).sum().float()
    entropy_n = entropy_of(routing.probs_ne.detach().float())  # 4x faster than special.entr on CPU
    num_tokens = real_n.sum().float()
    entropy = (entropy_n * real_n).sum() / num_tokens.clamp(min=1)
    by_group = tokens_by_group = entropy_by_group = None
    if group_n is not None:
        group_a = group_n[routing.token_a]
        in_range_a = (group_a >= 0) & (group_a < num_groups)
        cell_a = group_a.clamp(0, num_groups - 1) * num_experts + routing.expert_a
        by_group = torch.zeros(num_groups * num_experts, device=device)
        by_group = by_group.index_add_(0, cell_a, kept_a * in_range_a).view(num_groups, num_experts)
        in_range_n = (group_n >= 0) & (group_n < num_groups) & real_n
        group_idx_n = group_n.clamp(0, num_groups - 1)
        tokens_by_group = torch.zeros(num_groups, device=device).index_add_(0, group_idx_n, in_range_n.float())
        entropy_sum_g = torch.zeros(num_groups, device=device).index_add_(0, group_idx_n, entropy_n * in_range_n)
        entropy_by_group = entropy_sum_g / tokens_by_group.clamp(min=1)
    return RoutingStats(
        tokens_per_expert=tokens_per_expert,
        routed_assignments=routed,
        dropped_assignments=routed - kept,
        dropped_tokens=dropped_tokens,
        num_tokens=num_tokens,
        router_entropy=entropy,
        dead_experts=dead_experts.detach(),
        tokens_per_expert_by_group=by_group,
        tokens_by_group=tokens_by_group,
        router_entropy_by_group=entropy_by_group,
    )
