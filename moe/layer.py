"""MoELayer: router + routed experts + optional shared experts, the drop-in for a dense FFN slot.

Shapes: ``B`` batch, ``T`` tokens, ``D`` d_model, ``N`` = B*T, ``E`` experts, ``A`` assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moekit.moe.config import DISPATCH_IMPLS, MoEConfig
from moekit.moe.dispatch import auto_dispatch, dispatch_fast, dispatch_reference
from moekit.moe.experts import RoutedExperts, SharedExperts, grouped_mm_supported
from moekit.moe.losses import (
    assignment_counts,
    global_entropy_loss,
    load_balance_loss,
    local_entropy_loss,
    router_z_loss,
)
from moekit.moe.router import Router, Routing
from moekit.moe.telemetry import RoutingStats, compute_stats


class MoEOutput(NamedTuple):
    y: Tensor  # [B, T, D]
    aux_loss: Tensor  # scalar, already weighted: load_balance_coef * lb + z_loss_coef * z (+ entropy terms)
    losses: dict[str, Tensor]  # unweighted: {"load_balance", "z"} (+ "local_entropy", "global_entropy" when on)
    stats: RoutingStats


class MoELayer(nn.Module):
    """Routed SwiGLU experts (``cfg.num_experts`` of width ``cfg.d_expert``, ``cfg.top_k`` per token)
    plus ``cfg.num_shared_experts`` always-active shared experts.

    ``forward(x_btd, token_mask=None, group_ids=None) -> MoEOutput``. Padded tokens (``token_mask``
    False) are never routed, use no capacity and do not enter the losses; their output is zero (the shared
    experts see them zeroed too) and their state, whatever it is (NaN included), reaches no real token's
    output, no loss and no gradient but their own. Weights start at normal(0, init_std); output projections
    (``w_down``) at normal(0, out_init_std), default ``init_std`` (a dense model of L layers usually
    passes ``init_std / sqrt(2 * L)``).

    Parameters: ``router.weight [E, D]`` (+ ``router.w_noise`` for noisy top-k), ``experts.w_gate
    [E, D, F]``, ``experts.w_up [E, D, F]``, ``experts.w_down [E, F, D]``, ``shared.{w_gate,w_up,w_down}
    .weight`` (nn.Linear), ``shared_gate.weight [1, D]`` (``cfg.shared_gate``). Buffers:
    ``router.expert_bias [E]`` (persistent, with ``bias_update_rate > 0`` or ``selection_bias``),
    ``router.load_counts [E]`` and ``steps_since_used [E]`` (not persistent).
    Training forwards update the last two; activation checkpointing that re-runs the forward counts
    a micro-batch twice (harmless for the sign update, visible in the dead-expert age).

    ``balance_scope='global'`` (with an initialised process group) all-reduces the load-balance
    assignment counts and the aux-loss-free load; telemetry stays per rank. With ``load_balance_coef=0`` the
    load-balance loss is not optimised, so its counts are not all-reduced: ``losses['load_balance']`` is then
    the rank's local value.

    ``dispatch`` (one of ``DISPATCH_IMPLS``, default 'auto') picks the dispatch implementation; it is
    placement, not model: it lives in ``dispatch_impl`` (not in ``cfg``) and :func:`set_dispatch` changes it.

    torch.compile: the layer (losses, telemetry and buffer updates included) traces into one graph, as
    is on the grouped_mm path and with ``torch._dynamo.config.capture_scalar_outputs = True`` on the
    sorted path (see ``moekit.moe.dispatch``); the reference path runs eagerly.
    """

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        *,
        dispatch: str = "auto",
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"MoELayer d_model={d_model!r} is invalid: must be >= 1")
        self.dispatch_impl = _check_dispatch(dispatch)
        self.cfg = cfg
        self.d_model = d_model
        out_std = init_std if out_init_std is None else out_init_std
        self.router = Router(d_model, cfg, init_std=init_std)
        self.experts = RoutedExperts(cfg.num_experts, d_model, cfg.d_expert, init_std=init_std, out_init_std=out_std)
        self.shared: SharedExperts | None = None
        if cfg.num_shared_experts > 0:
            self.shared = SharedExperts(
                d_model, cfg.num_shared_experts, cfg.shared_width, init_std=init_std, out_init_std=out_std
            )
        self.shared_gate: nn.Linear | None = None
        if cfg.shared_gate:  # Qwen2-MoE: a per-token sigmoid gate on the shared experts' output
            self.shared_gate = nn.Linear(d_model, 1, bias=False)
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.register_buffer("steps_since_used", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)
        # Expert-parallel hook (installed by moekit.moe.parallel.shard_experts): replaces the local dispatch
        # with the same contract, (layer, x_nd, routing) -> (y_nd, keep_a).
        self.expert_parallel: Callable[[MoELayer, Tensor, Routing], tuple[Tensor, Tensor]] | None = None

    def route(self, x_nd: Tensor, mask_n: Tensor | None = None, group_n: Tensor | None = None) -> Routing:
        """The routing decision for flattened tokens ``x_nd [N, D]`` (no buffer updates)."""
        return self.router(x_nd, mask_n, group_n)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def resolve_dispatch(self, x: Tensor) -> str:
        """Which implementation runs for input ``x``: 'reference' or one of ``FAST_IMPLS``.

        'grouped_mm' falls back to 'sorted' where the kernel does not run (dtype, device, alignment,
        fp32 under torch.compile); 'auto' follows the measured rules of
        :func:`moekit.moe.dispatch.auto_dispatch` (grouped_mm on CUDA in bf16, padded_bmm on CPU in
        bf16 for small batches or, with several threads, small experts; sorted elsewhere). Other names
        run as given, except padded_bmm under torch.compile, which runs as sorted.
        """
        impl = self.dispatch_impl
        if impl == "padded_bmm" and torch.compiler.is_compiling():
            return "sorted"  # its padded size is data-dependent: eager only
        if impl not in ("auto", "grouped_mm"):
            return impl
        dtype = self._compute_dtype(x)
        grouped_ok = grouped_mm_supported(x.device, dtype, self.d_model, self.cfg.d_expert)
        if impl == "grouped_mm":
            return "grouped_mm" if grouped_ok else "sorted"
        tokens = x.numel() // self.d_model
        rows = tokens * self.cfg.top_k
        if self.cfg.router == "expert_choice":  # each expert takes its capacity's worth of tokens
            capacity = self.cfg.capacity(tokens, self.training)
            rows = rows if capacity is None else self.cfg.num_experts * min(tokens, capacity)
        return auto_dispatch(x.device, dtype, rows, self.d_model, grouped_ok, num_experts=self.cfg.num_experts)

    def dispatch(self, x_nd: Tensor, routing: Routing, impl: str | None = None) -> tuple[Tensor, Tensor]:
        """Routed-expert output ``[N, D]`` and ``keep_a [A]`` for a routing decision (``impl``: one of
        DISPATCH_IMPLS, default the layer's own; a sharded layer runs its expert-parallel dispatch)."""
        if self.expert_parallel is not None:  # sharded experts: only the hook can run them
            if impl is not None:
                raise ValueError(
                    f"MoELayer.dispatch(impl={impl!r}) on an expert-parallel layer: it runs the layer's own "
                    "dispatch (MoELayer(dispatch=...), set_dispatch or ParallelConfig.dispatch)"
                )
            return self.expert_parallel(self, x_nd, routing)
        impl = impl or self.resolve_dispatch(x_nd)
        dtype = self._compute_dtype(x_nd)
        if impl == "reference":
            y_nd, keep_a = self._dispatch_reference(x_nd, routing)
            return y_nd.to(dtype), keep_a  # same output dtype as the fast paths (autocast's)
        return dispatch_fast(x_nd, routing, self.experts, self.cfg.drop_policy, impl=impl, compute_dtype=dtype)

    @torch.compiler.disable  # host syncs and per-assignment Python loops: always eager
    def _dispatch_reference(self, x_nd: Tensor, routing: Routing) -> tuple[Tensor, Tensor]:
        capacity = None
        if routing.capacity is not None:
            capacity = self.cfg.capacity(int(routing.num_real), self.training)
        return dispatch_reference(x_nd, routing, self.experts, capacity, self.cfg.drop_policy)

    def shared_output(self, x_nd: Tensor) -> Tensor:
        """The shared experts' ``[N, D]`` output, times ``sigmoid(x @ shared_gate.weight.T)`` when gated."""
        y_nd = self.shared(x_nd)
        if self.shared_gate is not None:
            y_nd = torch.sigmoid(self.shared_gate(x_nd)) * y_nd
        return y_nd

    def _losses(
        self, routing: Routing, mask_n: Tensor | None, group_n: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        z = router_z_loss(routing.logits_ne, mask_n)
        if routing.expert_idx_nk is None:  # expert choice is balanced by construction
            lb = z.new_zeros(())
        else:
            counts_e = None
            # Coefficient 0 (the aux-loss-free setup): the loss is only reported, so no collective is worth a
            # forward's latency; the rank's local value is reported instead (the logger averages it over ranks).
            if cfg.balance_scope == "global" and cfg.load_balance_coef > 0 and torch.distributed.is_available():
                if torch.distributed.is_initialized():
                    counts_e = assignment_counts(routing.expert_idx_nk, cfg.num_experts, mask_n)
                    torch.distributed.all_reduce(counts_e)
            lb = load_balance_loss(routing.probs_ne, routing.expert_idx_nk, mask_n, counts_e=counts_e)
        aux = z.new_zeros(())
        if cfg.load_balance_coef > 0:
            aux = aux + cfg.load_balance_coef * lb
        if cfg.z_loss_coef > 0:
            aux = aux + cfg.z_loss_coef * z
        losses = {"load_balance": lb, "z": z}
        # LIMoE entropy losses, summed over the covered groups (computed only when they are switched on).
        groups = cfg.entropy_group_ids
        if cfg.local_entropy_coef > 0:
            losses["local_entropy"] = local_entropy_loss(routing.probs_ne, group_n, mask_n, groups).sum()
            aux = aux + cfg.local_entropy_coef * losses["local_entropy"]
        if cfg.global_entropy_coef > 0:
            losses["global_entropy"] = global_entropy_loss(
                routing.probs_ne, group_n, mask_n, groups, cfg.global_entropy_threshold
            ).sum()
            aux = aux + cfg.global_entropy_coef * losses["global_entropy"]
        return aux, losses

    def forward(self, x_btd: Tensor, token_mask: Tensor | None = None, group_ids: Tensor | None = None) -> MoEOutput:
        """``x_btd [B, T, D]`` (any leading dims), ``token_mask [B, T]`` bool (True = real) or None,
        ``group_ids [B, T]`` long modality ids: per-group telemetry (ids outside [0, num_groups) are not
        counted), modality expert groups and the entropy losses (None = every token is group 0 for those)."""
        d = x_btd.shape[-1]
        x_nd = x_btd.reshape(-1, d)  # [N, D]
        mask_n = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        group_n = None if group_ids is None else group_ids.reshape(-1)
        xr_nd = x_nd
        if mask_n is not None:
            # A padded token's state may be anything (NaN from an attention row with nothing to attend to):
            # zeroed, it cannot reach the router's weight grad (NaN * 0 = NaN), the losses or grouped_mm's rows.
            xr_nd = torch.where(mask_n[:, None], x_nd, 0)
        routing = self.route(xr_nd, mask_n, group_n)
        y_nd, keep_a = self.dispatch(xr_nd, routing)
        if self.shared is not None:
            y_nd = y_nd + self.shared_output(xr_nd)
        aux, losses = self._losses(routing, mask_n, group_n)

        if self.training:
            with torch.no_grad():
                self.router.record_load(routing)
                used_e = torch.zeros_like(self.steps_since_used).index_add_(0, routing.expert_a, keep_a.long()) > 0
                self.steps_since_used.copy_(torch.where(used_e, 0, self.steps_since_used + 1))
        dead = (self.steps_since_used >= self.cfg.dead_expert_window).sum()
        stats = compute_stats(routing, keep_a, mask_n, self.cfg.num_experts, dead, group_n, self.cfg.num_groups)
        return MoEOutput(y_nd.view(x_btd.shape), aux, losses, stats)

    def update_bias(self) -> None:
        """Aux-loss-free balancing step (no-op unless ``bias_update_rate > 0``); see :meth:`Router.update_bias`."""
        self.router.update_bias()


# What a layer accepts: the run config's choices plus the concrete fast paths 'auto' picks between.


def _check_dispatch(impl: str) -> str:
    if impl not in DISPATCH_IMPLS:
        allowed = ", ".join(DISPATCH_IMPLS)
        raise ValueError(f"MoELayer dispatch={impl!r} is invalid: allowed values are {allowed}")
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise ValueError("MoELayer dispatch='grouped_mm' is invalid: this torch has no torch._grouped_mm")
    return impl


def set_dispatch(model: nn.Module, impl: str) -> list[str]:
    """Use dispatch ``impl`` (one of ``DISPATCH_IMPLS``) in every MoE layer of ``model``; returns their names.

    Sharded (expert-parallel) layers run the sorted or grouped_mm path over the all-to-all; the per-assignment
    reference loop has no expert-parallel form, so ``'reference'`` is refused for them.
    """
    _check_dispatch(impl)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            if impl == "reference" and module.expert_parallel is not None:
                raise ValueError(
                    f"dispatch='reference' is not available for the expert-parallel MoE layer {name or '<model>'}: "
                    "use 'auto', 'sorted' or 'grouped_mm', or expert_parallel_size=1"
                )
            module.dispatch_impl = impl
            names.append(name)
    return names


def update_router_biases(model: nn.Module) -> None:
    """Apply :meth:`MoELayer.update_bias` to every MoE layer in ``model``; call after ``optimizer.step()``."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.update_bias()
