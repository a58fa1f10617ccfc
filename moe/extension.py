"""MoEExtension: everything the generic Trainer needs to train a model with MoE layers, in one place.

    trainer = Trainer(model, cfg, run_dir, train_ds, val_ds, extensions=[MoEExtension(ParallelConfig(2))])

It implements ``moekit.core.extension.TrainerExtension`` (duck-typed: this package imports nothing from the
Trainer) and does nothing on a model without MoE layers, so wiring code may always pass it:

- ``setup``: applies ``parallel.dispatch`` to every MoE layer (``set_dispatch``; only when ``parallel`` is
  given: ``MoEExtension()`` keeps the dispatch each layer was built with); refuses rank-local router
  biases on several processes (:func:`check_bias_scope`); with ``parallel.expert_parallel_size`` P > 1 builds
  the expert-parallel groups, shards the experts and hides them from DDP (``moekit.moe.parallel``), refusing
  FSDP and ``torch.compile`` with P > 1; installs the routing-telemetry forward hooks.
- ``after_backward`` / ``clip_grad_norm``: the expert-gradient all-reduce and the norm over all expert slices
  (expert parallelism only; otherwise the Trainer's own clipping applies).
- ``after_optimizer_step``: ``update_router_biases`` when some layer uses aux-loss-free balancing.
- ``save_state`` / ``load_state``: the routed experts go to ``experts.safetensors``, unsharded
  (``moekit.moe.ep_checkpoint``), so a run resumes with another expert-parallel size; except under FSDP (without
  expert parallelism), where they are ordinary sharded parameters that FSDP's own checkpoint holds.
- ``full_model``: gathers the expert shards into a single-process copy on rank 0, whose layers compute
  ``balance_scope='global'`` locally (no collective can run on rank 0 alone).
- ``step_metrics``: routing telemetry of the last training micro-batch of every process, reduced over the
  processes (counts summed, entropies token-weighted; dead experts: those no process used for
  ``dead_expert_window`` forwards), so it describes the step's tokens, not rank 0's share; with gradient
  accumulation, the last micro-batch's. The ``summarize_routing`` scalars plus ``moe_layers``, one
  ``RoutingStats.to_dict()`` per MoE layer. Collective: every process calls it, as the Trainer's logging does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.moe.config import ParallelConfig
from moekit.moe.ep_checkpoint import (
    gather_full_model,
    load_expert_state,
    routed_expert_weights,
    save_expert_state,
    single_process_configs,
)
from moekit.moe.layer import MoELayer, MoEOutput, set_dispatch, update_router_biases
from moekit.moe.parallel import (
    ExpertParallelGroups,
    allreduce_expert_grads,
    apply_expert_parallel,
    ep_clip_grad_norm_,
    exclude_experts_from_ddp,
    init_expert_parallel,
)
from moekit.moe.telemetry import RoutingStats, reduce_across_processes, summarize_routing

__all__ = ["MoEExtension", "check_bias_scope"]


def check_bias_scope(model: nn.Module, world: int) -> None:
    """Aux-loss-free biases updated from each rank's own counts would drift apart across ranks (DDP does not
    sync buffers here), and a checkpoint keeps rank 0's: refuse before training."""
    for m in model.modules():
        if isinstance(m, MoELayer) and m.cfg.bias_update_rate > 0 and m.cfg.balance_scope != "global" and world > 1:
            raise ValueError(
                f"MoEConfig.balance_scope={m.cfg.balance_scope!r} with bias_update_rate={m.cfg.bias_update_rate} "
                f"on {world} processes: each rank's router bias would follow its own tokens; set "
                "balance_scope='global' (all-reduced counts, the same bias everywhere)"
            )


class _Slot:
    """The last training forward's RoutingStats of one layer."""

    stats: RoutingStats | None = None


def _recorder(layer: MoELayer, slot: _Slot) -> Any:
    def record(module: nn.Module, args: Any, output: MoEOutput) -> None:
        # Training forwards only: evaluation and sampling do not overwrite the training telemetry; nor do
        # copies of the layer (gather_full_model deep-copies the hook along with it).
        if module.training and module is layer:
            slot.stats = output.stats

    return record


class MoEExtension:
    """The Trainer extension of MoE models (module doc). ``parallel`` None: no expert parallelism, and every
    layer keeps the dispatch it was built with.

    One instance serves one Trainer: ``setup`` binds it to that Trainer's model. After setup, ``groups`` is
    the expert-parallel layout (None without expert parallelism).
    """

    def __init__(self, parallel: ParallelConfig | None = None) -> None:
        self._set_dispatch = parallel is not None
        self.parallel = parallel if parallel is not None else ParallelConfig()
        self.groups: ExpertParallelGroups | None = None
        self._layers: list[tuple[str, MoELayer]] = []
        self._last_stats: list[_Slot] = []  # per layer; a fixed structure, so torch.compile does not recompile
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, ctx: Any) -> None:
        if self._hooks or self.groups is not None:
            raise RuntimeError("MoEExtension.setup: this extension is already bound to a model; make a new one")
        self._layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        if not self._layers:
            return
        ep = self.parallel.expert_parallel_size
        if ep > 1:
            if ctx.fsdp:
                raise ValueError(
                    f"ParallelConfig.expert_parallel_size={ep} under FSDP is not supported yet (the experts would "
                    "need fsdp_ignored_modules and their own checkpoint path): use DDP, or expert_parallel_size=1"
                )
            if ctx.cfg.compile:
                raise ValueError(
                    f"TrainConfig.compile=True is invalid: not supported with expert_parallel_size={ep} yet"
                )
        if self._set_dispatch:
            set_dispatch(model, self.parallel.dispatch)
        check_bias_scope(model, ctx.world_size)
        if ep > 1:
            # Keep this rank's expert slice and hide it from DDP, before the optimizer sees the parameters
            # (sharding replaces them) and before prepare() wraps the model.
            self.groups = init_expert_parallel(ep)
            apply_expert_parallel(model, self.groups)
            exclude_experts_from_ddp(model)
        self._last_stats = [_Slot() for _ in self._layers]
        for (_, layer), slot in zip(self._layers, self._last_stats):
            self._hooks.append(layer.register_forward_hook(_recorder(layer, slot)))

    # ------------------------------------------------------------------ step
    def after_backward(self, model: nn.Module, ctx: Any) -> None:
        if self.groups is not None:
            allreduce_expert_grads(model, self.groups)

    def clip_grad_norm(self, model: nn.Module, max_norm: float, ctx: Any) -> Tensor | None:
        if self.groups is None:
            return None
        return ep_clip_grad_norm_(model, max_norm, self.groups)  # the norm over all expert slices, same everywhere

    def after_optimizer_step(self, model: nn.Module, ctx: Any) -> None:
        if any(layer.cfg.bias_update_rate > 0 for _, layer in self._layers):
            update_router_biases(model)

    def step_metrics(self, model: nn.Module, ctx: Any) -> dict[str, Any]:
        parts = [
            (layer, slot.stats) for (_, layer), slot in zip(self._layers, self._last_stats) if slot.stats is not None
        ]
        if not parts:
            return {}
        stats = reduce_across_processes(
            [s for _, s in parts],
            [layer.steps_since_used for layer, _ in parts],
            [layer.cfg.dead_expert_window for layer, _ in parts],
        )
        out: dict[str, Any] = dict(summarize_routing(stats))
        out["moe_layers"] = [s.to_dict() for s in stats]
        return out

    # ------------------------------------------------------------------ checkpoints and the full model
    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, ctx: Any) -> list[str]:
        if not self._owns_expert_files(model, ctx):
            return []
        return save_expert_state(folder, model, optimizer, self.groups)

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, ctx: Any) -> list[str]:
        if not self._owns_expert_files(model, ctx):
            return []
        return load_expert_state(folder, model, optimizer, self.groups)

    def _owns_expert_files(self, model: nn.Module, ctx: Any) -> bool:
        return bool(routed_expert_weights(model)) and not (ctx.fsdp and self.groups is None)

    def full_model(self, model: nn.Module | None, ctx: Any) -> nn.Module | None:
        if not self._layers:
            return model
        if ctx.fsdp:  # already a plain copy on the main process (None elsewhere): make it run alone
            if model is not None:
                single_process_configs(model)
            return model
        return gather_full_model(model, self.groups)  # collective; None on ranks other than 0

    def close(self) -> None:
        """Remove the telemetry hooks (the model keeps working without them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
