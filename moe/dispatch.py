"""Dispatch: send routed assignments to their experts, apply capacity, combine weighted outputs.

Shapes: ``N`` tokens, ``D`` d_model, ``E`` experts, ``A`` assignments (see :class:`Routing`).

- ``dispatch_reference``: obviously correct, slow. Its own capacity rule in plain Python, then one
  expert call per kept assignment. The yardstick of the fast paths' tests, and selectable
  (``MoELayer(dispatch='reference')``, ``parallel.dispatch=reference``) to check a run against it; it
  needs every expert on one rank, so expert parallelism refuses it (``moekit.moe.parallel.shard_experts``).
- ``dispatch_fast(impl='sorted')``: one stable argsort of assignments by expert (dropped ones last), then
  in eager mode one autograd node (``RoutedExperts.forward_fused``) that per expert gathers its rows,
  runs its SwiGLU with the combine weight on the hidden rows and scatter-adds into the output, with a
  hand-written backward (the transposed gather, weight grads written in place): no ``[A, D]`` buffer is
  ever allocated (docs/perf.md: on CPU those fresh K*N-row buffers, page-faulted every call, and the
  ``cat``/``split``/``unbind`` backward copies were most of the gap to dense). One host sync:
  :func:`expert_split_sizes` to slice per expert. Under torch.compile it runs as ``sorted_autograd``.
- ``dispatch_fast(impl='sorted_autograd')``: the same permutation through plain autograd: one gather of
  the kept rows, per-expert matmuls on contiguous slices of ``unbind``-ed weights, one ``index_add``
  back; combine weights scale the narrower of the hidden ``[A, F]`` and output ``[A, D]`` rows. What
  torch.compile traces (a custom autograd node with a Python loop over host ints would not).
- ``dispatch_fast(impl='grouped_mm')``: the same permutation, then ``torch._grouped_mm`` over all
  experts at once with device-side offsets; static shapes and no host sync. Dropped and padded
  assignments ride along as zero rows at the tail of the last group (zero in, zero out, zero grad).
- ``dispatch_fast(impl='padded_bmm')``: the same permutation into a zero-padded ``[E, C, D]`` batch
  (``C`` = the fullest expert's load, one host sync), three ``torch.bmm`` for all experts at once, one
  ``index_add`` back. Wasted FLOPs grow with load imbalance; it pays where one batched call beats E
  small ones by more than that (CPU bf16: oneDNN's per-call weight packing; docs/perf.md).

Which one ``MoELayer(dispatch='auto')`` runs: :func:`auto_dispatch`, rules measured in docs/perf.md.

torch.compile: the grouped_mm path traces into one graph as is. The sorted paths' per-expert slice
sizes are data-dependent by nature; with ``torch._dynamo.config.capture_scalar_outputs = True`` they
trace as unbacked SymInts and the whole layer is one graph, otherwise :func:`expert_split_sizes` is a
graph break (one per MoE layer, and since it sits inside the model's loop over layers, Dynamo then
compiles each block on its own instead of the whole model). ``MoELayer`` runs the reference path
eagerly (``torch.compiler.disable``): it loops over host values by design.

Capacity keep rule (token choice, ``capacity`` C per expert, real tokens only): ``drop_policy='score'``
keeps each expert's C highest-score assignments (batch-prioritised routing; ties go to the earlier
token), ``'position'`` keeps its C earliest tokens (flattened B*T order). Dropped assignments contribute
nothing: the token keeps its other experts' output and the residual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.moe.experts import RoutedExperts
from moekit.moe.router import Routing

# padded_bmm rounds the per-expert capacity up to this many rows: the weight-grad bmm reduces over it, and
# oneDNN's bf16 kernel ran 1.6x faster at a multiple of 32 (272 -> 288 rows: 512 -> 822 GFLOP/s); the
# demo's bf16 step 1.45x -> 1.33x the dense twin's (docs/perf.md, with the one point where it lost).
PAD_ROWS = 32

# Concrete fast paths (MoELayer's 'auto' resolves to one of them); see the module docstring.
FAST_IMPLS = ("sorted", "sorted_autograd", "grouped_mm", "padded_bmm")


# 'auto' on CPU in bf16: padded_bmm while the gathered rows (assignments x d_model) stay below this many
# elements, sorted from there. Measured (docs/perf.md): one bmm beats E small oneDNN bf16 matmuls by 1.1-3x up
# to ~1M elements (demo model 1.42x vs 3.26x the dense step); at 2M (E=8, 2,048 tokens) it lost at one thread
# (1.43x vs 1.29x the dense layer) and tied at two; from 4M on, the padded path's full-size buffers and
# padding FLOPs cost more than the calls it saves. fp32 (MKL) never gains from it.
PADDED_BMM_MAX_ELEMENTS = 2**21
# ... except with several threads for many small experts: one bmm over E=64 experts of ~256 rows spreads over
# the threads where 64 small matmuls do not (E=64 top-16, 1,024 tokens, 8M elements, two threads: 2.9-3.2x vs
# 4.1x the dense layer in two runs; one thread: a tie, 3.04x vs 2.98x). With >= 2 threads, at least this many
# experts averaging at most PADDED_BMM_MAX_ROWS_PER_EXPERT rows, up to this many elements. Only that point
# was measured: fewer or larger experts (where padding lost from 4M elements on) keep the rule above.
PADDED_BMM_THREADED_MAX_ELEMENTS = 2**23
PADDED_BMM_MAX_ROWS_PER_EXPERT = 256
PADDED_BMM_THREADED_MIN_EXPERTS = 64
# The fused sorted node gathers and scatters all rows at once below this many bytes of gathered rows
# (assignments x d_model x itemsize), per expert above: small ``[A, D]`` buffers come from the heap for
# free, large ones are page-faulted every call. Measured (docs/perf.md): 2-8 MiB won 3-5% (demo and
# fine-grained steps, coarse layer at 1,024 tokens, bf16 at 4,096), 16 MiB tied or lost 18%, 32 MiB lost 30%.
GATHER_ONCE_MAX_BYTES = 2**24


def auto_dispatch(
    device: torch.device,
    dtype: torch.dtype,
    rows: int,
    d_model: int,
    grouped_ok: bool,
    *,
    num_experts: int = 1,
    threads: int | None = None,
) -> str:
    """What ``dispatch='auto'`` runs for ``rows`` assignments of width ``d_model`` over ``num_experts``
    experts with ``threads`` intra-op CPU threads (default: ``torch.get_num_threads()``), by the measured
    rules above.

    CUDA bf16 (where the kernel runs): grouped_mm. CPU bf16, few rows (or, with several threads, many
    small experts): padded_bmm (never under torch.compile: its padded size is data-dependent). Otherwise
    sorted (CUDA fp32 not measured here).
    """
    if device.type == "cuda" and dtype == torch.bfloat16 and grouped_ok:
        return "grouped_mm"
    if device.type != "cpu" or dtype != torch.bfloat16 or torch.compiler.is_compiling():
        return "sorted"
    threads = torch.get_num_threads() if threads is None else threads
    elements = rows * d_model
    many_small_experts = (
        threads >= 2
        and num_experts >= PADDED_BMM_THREADED_MIN_EXPERTS
        and rows <= PADDED_BMM_MAX_ROWS_PER_EXPERT * num_experts
        and elements <= PADDED_BMM_THREADED_MAX_ELEMENTS
    )
    return "padded_bmm" if elements < PADDED_BMM_MAX_ELEMENTS or many_small_experts else "sorted"


def select_capacity(
    expert_a: Tensor, score_a: Tensor, valid_a: Tensor, num_experts: int, capacity: Tensor | int, drop_policy: str
) -> Tensor:
    """Vectorised keep rule -> ``keep_a [A]`` bool. Assignments must come in token order (as token-choice
    routing emits them: ``a = n*K + k``), which makes the flat order the 'position' priority."""
    a = expert_a.numel()
    device = expert_a.device
    key_a = torch.where(valid_a, expert_a, num_experts)  # padded -> sentinel bucket E, never kept
    if drop_policy == "score":
        prio_a = torch.argsort(score_a, descending=True, stable=True)  # ties: earlier assignment first
        order_a = prio_a[torch.argsort(key_a[prio_a], stable=True)]
    else:
        order_a = torch.argsort(key_a, stable=True)
    key_sorted = key_a[order_a]  # [A] grouped by expert, by priority within each
    counts_e = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts_e.index_add_(0, key_a, torch.ones_like(key_a))
    starts_e = counts_e.cumsum(0) - counts_e
    rank_sorted = torch.arange(a, device=device) - starts_e[key_sorted]  # rank within the expert's queue
    keep_sorted = (rank_sorted < capacity) & (key_sorted < num_experts)
    return torch.empty_like(keep_sorted).scatter_(0, order_a, keep_sorted)


def expert_split_sizes(counts_e: Tensor) -> list[int]:
    """``counts_e [E]`` as Python ints, the sorted path's per-expert slice sizes: its one host sync.

    Kept apart because it is the one unavoidable torch.compile graph break of the MoE layer: the sizes
    depend on the routing, i.e. on data. With ``torch._dynamo.config.capture_scalar_outputs = True``
    Dynamo traces them as unbacked SymInts instead of breaking (see the module docstring).
    """
    return counts_e.tolist()


def dispatch_fast(
    x_nd: Tensor,
    routing: Routing,
    experts: RoutedExperts,
    drop_policy: str,
    impl: str = "sorted",
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Routed-expert output ``y_nd [N, D]`` (zero for padded tokens) and ``keep_a [A]``."""
    n, d = x_nd.shape
    num_experts = experts.num_experts
    if routing.capacity is None:
        keep_a = routing.valid_a
    else:
        keep_a = select_capacity(
            routing.expert_a, routing.score_a, routing.valid_a, num_experts, routing.capacity, drop_policy
        )
    key_a = torch.where(keep_a, routing.expert_a, num_experts)  # dropped/padded -> sentinel E, sorts last
    order_a = torch.argsort(key_a, stable=True)  # [A]
    counts_e = torch.zeros(num_experts + 1, dtype=torch.long, device=x_nd.device)
    counts_e = counts_e.index_add_(0, key_a, torch.ones_like(key_a))[:num_experts]  # kept rows per expert

    scale_hidden = experts.scale_hidden
    if impl == "grouped_mm":
        a = order_a.numel()
        token_a = routing.token_a[order_a]
        kept_a = keep_a[order_a]
        xs_ad = x_nd.index_select(0, token_a) * kept_a[:, None].to(x_nd.dtype)  # dropped rows -> zeros
        offs_e = counts_e.cumsum(0).to(torch.int32)
        offs_e[-1] = a  # the tail of zero rows joins the last group instead of being left uninitialised
        weight_a = routing.weight_a[order_a] * kept_a
        dtype = compute_dtype or x_nd.dtype
        ys_ad = experts.forward_grouped(xs_ad, offs_e, dtype, weight_a if scale_hidden else None)
    elif impl == "padded_bmm":
        counts = expert_split_sizes(counts_e)
        kept, cap = sum(counts), -(-max(counts, default=0) // PAD_ROWS) * PAD_ROWS
        idx_a = order_a[:kept]
        expert_s = routing.expert_a[idx_a]
        rank_s = torch.arange(kept, device=x_nd.device) - (counts_e.cumsum(0) - counts_e)[expert_s]
        slot_a = expert_s * cap + rank_s  # [kept] row of the [E * cap] padded batch
        # Empty slots read a kept token (never a padded one, whose state may be anything, NaN included) and
        # carry combine weight 0: zero output, zero grads, nothing to mask.
        fill = routing.token_a[idx_a[:1]] if kept else torch.zeros(1, dtype=torch.long, device=x_nd.device)
        token_s = fill.expand(num_experts * cap).clone()
        token_s = token_s.index_copy(0, slot_a, routing.token_a[idx_a])
        weight_s = routing.weight_a.new_zeros(num_experts * cap).index_copy(0, slot_a, routing.weight_a[idx_a])
        ys_sd = experts.forward_padded(x_nd.index_select(0, token_s), weight_s, cap, compute_dtype or x_nd.dtype)
        return ys_sd.new_zeros(n, d).index_add(0, token_s, ys_sd), keep_a
    else:
        counts = expert_split_sizes(counts_e)
        idx_a = order_a[: sum(counts)]
        token_a = routing.token_a[idx_a]
        weight_a = routing.weight_a[idx_a]
        if impl == "sorted" and not torch.compiler.is_compiling():
            dtype = compute_dtype or x_nd.dtype
            once = token_a.numel() * d * dtype.itemsize < GATHER_ONCE_MAX_BYTES
            return experts.forward_fused(x_nd, token_a, counts, weight_a, dtype, gather_once=once), keep_a
        ys_ad = experts.forward_sorted(x_nd.index_select(0, token_a), counts, weight_a if scale_hidden else None)
    if not scale_hidden:
        ys_ad = ys_ad * weight_a.to(ys_ad.dtype)[:, None]
    y_nd = ys_ad.new_zeros(n, d).index_add(0, token_a, ys_ad)
    return y_nd, keep_a


def reference_keep(
    token_a: Tensor,
    expert_a: Tensor,
    score_a: Tensor,
    valid_a: Tensor,
    num_experts: int,
    capacity: int | None,
    drop_policy: str,
) -> Tensor:
    """Keep rule written out per expert: sort its real assignments by priority, keep the first C."""
    tokens, experts, scores, valid = token_a.tolist(), expert_a.tolist(), score_a.tolist(), valid_a.tolist()
    keep = [False] * len(tokens)
    for e in range(num_experts):
        mine = [a for a in range(len(tokens)) if valid[a] and experts[a] == e]
        if capacity is not None:
            if drop_policy == "score":
                mine.sort(key=lambda a: (-scores[a], tokens[a]))
            else:
                mine.sort(key=lambda a: tokens[a])
            mine = mine[:capacity]
        for a in mine:
            keep[a] = True
    return torch.tensor(keep, dtype=torch.bool, device=token_a.device)


def dispatch_reference(
    x_nd: Tensor, routing: Routing, experts: RoutedExperts, capacity: int | None, drop_policy: str
) -> tuple[Tensor, Tensor]:
    """Loop over assignments: ``y[n] += weight * expert_e(x[n])`` for every kept one."""
    n, d = x_nd.shape
    keep_a = reference_keep(
        routing.token_a, routing.expert_a, routing.score_a, routing.valid_a, experts.num_experts, capacity, drop_policy
    )
    rows = [x_nd.new_zeros(d) for _ in range(n)]
    keep = keep_a.tolist()
    for a, (tok, e) in enumerate(zip(routing.token_a.tolist(), routing.expert_a.tolist())):
        if keep[a]:
            out_d = experts.expert(x_nd[tok : tok + 1], e)[0]
            rows[tok] = rows[tok] + routing.weight_a[a].to(x_nd.dtype) * out_d
    y_nd = torch.stack(rows) if rows else x_nd.new_zeros(0, d)
    return y_nd, keep_a
