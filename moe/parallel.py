"""Expert parallelism (EP) over torch.distributed (its traffic: ``moekit.core.accounting.comm_volume``).

Shapes: ``N`` local tokens, ``D`` d_model, ``E`` experts (all ranks), ``El = E / P`` experts held per rank,
``P`` expert-parallel size, ``A`` local assignments, ``S`` rows this rank sends, ``R`` rows it receives.

Layout. The ``W`` ranks (the default process group, e.g. the one Accelerate starts) split into ``W / P``
expert-parallel groups of ``P`` consecutive ranks (one node when ``P`` = GPUs per node, so the all-to-all
stays on NVLink). Rank ``r`` of an EP group holds experts ``[r * El, (r + 1) * El)``; the ``W / P`` ranks
with the same EP rank hold the same slice and form its replica group. Everything else (attention,
embeddings, router, shared experts) stays replicated on all ``W`` ranks and data-parallel as usual.

Forward of a sharded MoE layer: each rank routes its own tokens (routing and capacity are decided
locally, over the local tokens only: a capacity factor therefore bounds each expert per rank, not per
global batch), exchanges per-expert row counts with one ``all_to_all_single``, sends every kept
assignment's input row to the rank of its expert, runs its local experts on what it received and sends
the outputs back the same way; the combine weights are applied at home. The row exchanges go through
``torch.distributed.nn.functional.all_to_all_single``, whose backward is the transposed exchange, so
gradients reach the experts from every rank's loss. Works with gloo (CPU) and NCCL.

Gradients. After backward, an expert slice's ``.grad`` already holds the gradient of the SUM of the
local losses of every rank in its EP group (their tokens came to it). DDP averages the other gradients
over all ``W`` ranks, i.e. it trains on ``mean_r loss_r``. To match, expert gradients must be summed
over the replica group and divided by ``W`` (:func:`allreduce_expert_grads`); DDP itself must not touch
them (:func:`exclude_experts_from_ddp`), or it would average different experts' gradients together and
overwrite the slices of ranks != 0 with rank 0's at wrapping time. Gradient clipping needs the norm
over all slices (:func:`ep_clip_grad_norm_`): a per-rank norm would clip replicas by different factors.

Checkpoints, the final model and sampling need the experts unsharded: ``moekit.moe.ep_checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single as _autograd_all_to_all

from moekit.moe.dispatch import select_capacity
from moekit.moe.experts import RoutedExperts
from moekit.moe.layer import MoELayer
from moekit.moe.router import Routing


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """This rank's place in the expert-parallel layout (see the module doc)."""

    ep_size: int  # P: ranks sharing one full set of experts
    ep_rank: int  # this rank's index inside its EP group
    world_size: int  # W
    ep_group: Any  # ProcessGroup of this rank's EP group (None when P == 1)
    replica_group: Any  # ProcessGroup of the ranks holding this rank's expert slice (None when W == P)

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ep_size

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """``[first, end)`` global expert ids held by this rank."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def __deepcopy__(self, memo: dict) -> ExpertParallelGroups:
        return self  # process groups are handles to shared communicators, not copyable state


def init_expert_parallel(ep_size: int) -> ExpertParallelGroups:
    """Build the EP groups (consecutive ranks) and the expert replica groups; every rank must call it.

    Needs an initialised default process group (``Accelerator()`` or ``init_process_group``), except for
    ``ep_size=1`` in a single process. Separate communicators also keep the all-to-alls from interleaving
    with DDP's asynchronous all-reduces on the default group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(
                f"ParallelConfig.expert_parallel_size={ep_size} needs an initialised torch.distributed process group "
                "(create the Accelerator or call init_process_group first)"
            )
        return ExpertParallelGroups(1, 0, 1, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if ep_size < 1 or world % ep_size:
        raise ValueError(
            f"ParallelConfig.expert_parallel_size={ep_size} is invalid: must be >= 1 and divide the world size {world}"
        )
    ep_group = replica_group = None
    if ep_size > 1:
        ep_group, _ = dist.new_subgroups_by_enumeration([list(range(s, s + ep_size)) for s in range(0, world, ep_size)])
    if world > ep_size:
        replica_group, _ = dist.new_subgroups_by_enumeration([list(range(r, world, ep_size)) for r in range(ep_size)])
    return ExpertParallelGroups(ep_size, rank % ep_size, world, ep_group, replica_group)


# ---------------------------------------------------------------------------------------------- dispatch
def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _exchange(x_md: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Differentiable variable-size all-to-all of rows.

    With grad enabled every rank must record the exchange so that every rank also runs its transposed
    backward exchange (a collective): a rank whose rows happen not to require grad (nothing received,
    frozen experts) would otherwise skip it and leave the others waiting.
    """
    if torch.is_grad_enabled() and not x_md.requires_grad:
        x_md = x_md.detach().requires_grad_()
    out_md = x_md.new_empty(sum(out_splits), x_md.shape[1])
    return _autograd_all_to_all(out_md, x_md.contiguous(), out_splits, in_splits, group=group)


def ep_dispatch(
    x_nd: Tensor,
    routing: Routing,
    keep_a: Tensor,
    experts: RoutedExperts,
    groups: ExpertParallelGroups,
    *,
    grouped: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Routed-expert output ``y_nd [N, D]`` of this rank's tokens, with the experts sharded over the EP group.

    ``routing`` (global expert ids) and ``keep_a [A]`` are the local decision, as for ``dispatch_fast``;
    ``experts`` holds this rank's ``El`` experts. Rows travel in ``compute_dtype`` (the autocast dtype, which
    the expert matmuls would cast to anyway). ``grouped`` runs the local experts with ``torch._grouped_mm``.
    One host sync: the exchanged counts, which the variable-size all-to-all needs as Python ints.
    """
    n, d = x_nd.shape
    p, e_local = groups.ep_size, experts.num_experts
    num_experts = p * e_local
    device = x_nd.device
    key_a = torch.where(keep_a, routing.expert_a, num_experts)  # dropped/padded -> sentinel E, sorts last
    order_a = torch.argsort(key_a, stable=True)  # [A] grouped by global expert = by destination rank
    send_e = torch.bincount(key_a, minlength=num_experts + 1)[:num_experts]  # [E] rows per global expert
    recv_e = torch.empty_like(send_e)  # [P * El]: rows each source rank sends to each of my experts
    dist.all_to_all_single(recv_e, send_e, group=groups.ep_group)
    counts = torch.cat([send_e, recv_e]).tolist()
    send_p = [sum(counts[r * e_local : (r + 1) * e_local]) for r in range(p)]
    recv_pl = counts[num_experts:]
    recv_p = [sum(recv_pl[r * e_local : (r + 1) * e_local]) for r in range(p)]

    idx_s = order_a[: sum(send_p)]  # [S] kept assignments, by destination rank then expert
    token_s = routing.token_a[idx_s]
    xs_sd = x_nd.index_select(0, token_s).to(compute_dtype or x_nd.dtype)
    xr_rd = _exchange(xs_sd, recv_p, send_p, groups.ep_group)  # [R, D] by source rank, then local expert

    # Regroup the received rows by local expert (stable: source-rank order within an expert).
    local_r = torch.arange(e_local, device=device).repeat(p).repeat_interleave(torch.tensor(recv_pl, device=device))
    perm_r = torch.argsort(local_r, stable=True)
    local_counts = [sum(recv_pl[j::e_local]) for j in range(e_local)]
    xl_rd = xr_rd.index_select(0, perm_r)
    if sum(local_counts) == 0:
        # Nothing to compute, but the result must still depend on the received rows: the backward of
        # the exchange is a collective that this rank has to join.
        yl_rd = xl_rd[:, :0].sum() + xl_rd.new_zeros(0, experts.w_down.shape[-1])
    elif grouped:
        offs_e = torch.tensor(local_counts, device=device).cumsum(0).to(torch.int32)
        yl_rd = experts.forward_grouped(xl_rd, offs_e, xl_rd.dtype)
    else:
        yl_rd = experts.forward_sorted(xl_rd, local_counts)
    yr_rd = torch.empty_like(yl_rd).index_copy(0, perm_r, yl_rd)  # back to arrival order
    ys_sd = _exchange(yr_rd, send_p, recv_p, groups.ep_group)  # [S, D] in send order
    # Combine weights are applied at home: the router's gradient then never crosses the network.
    ys_sd = ys_sd * routing.weight_a[idx_s].to(ys_sd.dtype)[:, None]
    return ys_sd.new_zeros(n, d).index_add(0, token_s, ys_sd)


class ExpertParallelDispatch:
    """The ``MoELayer.expert_parallel`` hook that :func:`shard_experts` installs: ``(layer, x_nd, routing)
    -> (y_nd, keep_a)``, the same contract as ``MoELayer.dispatch``."""

    def __init__(self, groups: ExpertParallelGroups) -> None:
        self.groups = groups

    def __call__(self, layer: MoELayer, x_nd: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        cfg = layer.cfg
        if routing.capacity is None:
            keep_a = routing.valid_a
        else:
            keep_a = select_capacity(
                routing.expert_a, routing.score_a, routing.valid_a, cfg.num_experts, routing.capacity, cfg.drop_policy
            )
        impl = layer.resolve_dispatch(x_nd)
        if impl == "reference":  # shard_experts / set_dispatch refuse it; never fall back silently
            raise ValueError("dispatch='reference' has no expert-parallel form: use 'auto', 'sorted' or 'grouped_mm'")
        grouped = impl == "grouped_mm"
        y_nd = ep_dispatch(
            x_nd, routing, keep_a, layer.experts, self.groups, grouped=grouped, compute_dtype=_compute_dtype(x_nd)
        )
        return y_nd, keep_a

    def __deepcopy__(self, memo: dict) -> ExpertParallelDispatch:
        return self


# ---------------------------------------------------------------------------------------------- sharding
def shard_experts(layer: MoELayer, groups: ExpertParallelGroups) -> MoELayer:
    """Keep only this rank's slice of ``layer``'s routed experts and route through the EP group; in place.

    Every rank must hold the same full weights first (same seed, or a loaded checkpoint). Call before
    building the optimizer and before ``accelerator.prepare`` (the expert parameters are replaced).
    ``ep_size=1`` leaves the layer untouched. The reference dispatch has no expert-parallel form: a layer
    set to ``dispatch='reference'`` is refused rather than silently run on the sorted path.
    """
    cfg = layer.cfg
    if layer.expert_parallel is not None:
        raise ValueError("shard_experts: this MoELayer is already sharded")
    if groups.ep_size == 1:
        return layer
    if cfg.num_experts % groups.ep_size:
        raise ValueError(
            f"ParallelConfig.expert_parallel_size={groups.ep_size} is invalid: must divide "
            f"MoEConfig.num_experts={cfg.num_experts}"
        )
    if layer.dispatch_impl == "reference":
        raise ValueError(
            "ParallelConfig.dispatch='reference' is invalid under expert parallelism (the per-assignment reference "
            "loop needs every expert on one rank): use 'auto', 'sorted' or 'grouped_mm', or expert_parallel_size=1"
        )
    lo, hi = groups.expert_range(cfg.num_experts)
    experts = layer.experts
    for name in ("w_gate", "w_up", "w_down"):
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
    experts.num_experts = hi - lo
    layer.expert_parallel = ExpertParallelDispatch(groups)
    return layer


@torch.no_grad()
def unshard_experts(layer: MoELayer, groups: ExpertParallelGroups) -> MoELayer:
    """Inverse of :func:`shard_experts` (all-gather over the EP group; every rank of it must call it)."""
    if getattr(layer, "expert_parallel", None) is None:
        return layer
    experts = layer.experts
    for name in ("w_gate", "w_up", "w_down"):
        local = getattr(experts, name)
        parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
        dist.all_gather(parts, local.detach().contiguous(), group=groups.ep_group)
        setattr(experts, name, nn.Parameter(torch.cat(parts), requires_grad=local.requires_grad))
    experts.num_experts = layer.cfg.num_experts
    layer.expert_parallel = None
    return layer


def apply_expert_parallel(model: nn.Module, groups: ExpertParallelGroups) -> list[str]:
    """:func:`shard_experts` on every MoE layer of ``model``; returns the sharded layers' names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            shard_experts(module, groups)
            if module.expert_parallel is not None:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- gradients
def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` of every sharded expert weight in ``model`` (names relative to ``model``)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and getattr(module, "expert_parallel", None) is not None:
            prefix = f"{name}.experts." if name else "experts."
            out.extend((prefix + pname, p) for pname, p in module.experts.named_parameters())
    return out


def exclude_experts_from_ddp(model: nn.Module) -> list[str]:
    """Tell DDP to leave the sharded expert weights alone (no initial broadcast, no gradient all-reduce).

    Call on the unwrapped model before ``DistributedDataParallel(model)`` / ``accelerator.prepare``.
    Keeps any names already ignored. Returns the full ignore list.
    """
    already = getattr(model, "_ddp_params_and_buffers_to_ignore", ())
    names = sorted({*already, *(n for n, _ in expert_parameters(model))})
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def allreduce_expert_grads(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Turn local expert gradients into DDP-convention gradients: sum over the replica group, divide by W.

    Call on every rank after the backward that DDP synchronises (the last micro-batch), before clipping
    and ``optimizer.step()``. Missing gradients (an expert slice that got no tokens anywhere on this rank's
    EP group) become zeros, so that every replica joins the same all-reduce.
    """
    params = [p for _, p in expert_parameters(model) if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if groups.num_replicas > 1:
        dist.all_reduce(flat, group=groups.replica_group)
    flat.div_(groups.world_size)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


@torch.no_grad()
def ep_grad_norm(model: nn.Module, groups: ExpertParallelGroups) -> Tensor:
    """Global L2 gradient norm of the whole (unsharded) model, identical on every rank.

    Assumes synchronised gradients: non-expert ones equal on all ranks (after DDP), expert ones equal
    across replicas (after :func:`allreduce_expert_grads`), so the squares of the expert slices are
    summed over the EP group only.
    """
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    device = next(model.parameters()).device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None:
            sq = torch.linalg.vector_norm(p.grad).double().square()  # no float64 copy of the gradient
            if id(p) in expert_ids:
                expert_sq += sq
            else:
                dense_sq += sq
    if groups.ep_size > 1:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (dense_sq + expert_sq).sqrt()


@torch.no_grad()
def ep_clip_grad_norm_(model: nn.Module, max_norm: float, groups: ExpertParallelGroups) -> Tensor:
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))`` with the global :func:`ep_grad_norm`."""
    total = ep_grad_norm(model, groups)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return total
