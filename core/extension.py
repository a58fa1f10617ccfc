"""The Trainer's one seam for model families: ``TrainerExtension``, a base class of no-op hooks.

A model family that needs more than "forward, backward, step" (expert parallelism, router-bias updates,
extra checkpoint files, telemetry: ``moekit.moe.extension.MoEExtension``) subclasses it and overrides the
hooks it needs; the Trainer takes a list of them and calls every hook in list order:

    class PrintLR(TrainerExtension):
        def after_optimizer_step(self, model, ctx):
            if ctx.is_main:
                print("stepped", ctx.cfg.lr)

    trainer = Trainer(model, cfg, run_dir, train_ds, extensions=[MoEExtension(), PrintLR()])

``model`` is always the unwrapped model (no DDP wrapper, no compiled wrapper), which holds the same
parameters as the one being trained. Hooks marked collective run on every rank at the same point; an
extension must make the same collective calls on every rank there.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.core.train_config import TrainConfig

__all__ = ["TrainContext", "TrainerExtension"]


@dataclass(frozen=True)
class TrainContext:
    """What the Trainer knows about where it runs, handed to every hook."""

    cfg: TrainConfig
    world_size: int  # processes in the run
    rank: int  # this process's index in [0, world_size)
    device: torch.device
    is_main: bool  # the process that writes files and logs
    fsdp: bool  # parameters sharded by FSDP (else DDP or a single process)


class TrainerExtension:
    """Hooks into the Trainer; every default does nothing. Call order within one optimizer step:
    ``after_backward`` (gradient-syncing micro-batch only), ``clip_grad_norm``, optimizer step,
    ``after_optimizer_step``; ``step_metrics`` at each train log event."""

    def setup(self, model: nn.Module, ctx: TrainContext) -> None:
        """Once, before the optimizer is built and before ``accelerator.prepare``: the place to shard or
        replace parameters, mark some for DDP to ignore, or refuse an unsupported setup. Collective."""

    def after_backward(self, model: nn.Module, ctx: TrainContext) -> None:
        """After the backward of the micro-batch on which DDP synchronises gradients, before clipping
        (e.g. all-reduce gradients that DDP does not own). Collective."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float, ctx: TrainContext) -> Tensor | None:
        """Clip all gradients to global norm ``max_norm`` and return the pre-clip norm, or None to leave
        clipping to the next extension (finally to Accelerate's ``clip_grad_norm_``). Collective."""
        return None

    def after_optimizer_step(self, model: nn.Module, ctx: TrainContext) -> None:
        """After every optimizer (and scheduler) step."""

    def save_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, ctx: TrainContext
    ) -> Collection[str]:
        """Write extra files into the checkpoint ``folder`` (a temp folder, renamed once complete); return
        the model state-dict keys stored there, which ``model.safetensors`` then leaves out. Collective."""
        return ()

    def load_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, ctx: TrainContext
    ) -> Collection[str]:
        """Restore what :meth:`save_state` wrote (after the rest of the checkpoint is loaded); return the model
        keys restored. Collective."""
        return ()

    def full_model(self, model: nn.Module | None, ctx: TrainContext) -> nn.Module | None:
        """Turn ``model`` into a copy the main process can run alone (sampling, ``save_pretrained``) and return
        it on the main process (None elsewhere). ``model`` is the unwrapped training model, or, under FSDP,
        a plain copy rebuilt from the full state dict on the main process and None on the others.
        Collective."""
        return model

    def step_metrics(self, model: nn.Module, ctx: TrainContext) -> dict[str, Any]:
        """Extra entries of a train log event (this rank's view; JSON-ready values)."""
        return {}
