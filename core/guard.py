"""Divergence: the error a run stops with when its loss or gradients stop being finite (or explode), and the
checks the Trainer makes before every optimizer step and before every save.

``DivergenceGuard.check`` runs once per optimizer step, after the gradients are final (synced, clipped) and
before ``optimizer.step``, so a non-finite step never reaches the weights. It costs one host sync per step:
the step's loss, auxiliary loss and gradient norm travel in one tensor (one all-reduce on several processes,
so every rank takes the same decision). A spike check (``TrainConfig.divergence_factor``) stops a run whose
loss exceeds that multiple of its baseline: the loss of the first step (this process's; an untrained model's
loss bounds where training should go) or, once ``SPIKE_MIN_HISTORY`` steps were seen, the median of the last
``SPIKE_WINDOW`` step losses if lower. The first catches a run that blows up within a few steps and stays up
(``train.lr=10``: 5.6 -> 380 -> 1,400 nats), the second a late spike of a run that has learned. An
objective whose first loss is not positive gets no spike check (a ratio to it means nothing).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

__all__ = ["SPIKE_MIN_HISTORY", "SPIKE_WINDOW", "DivergenceGuard", "TrainingDiverged", "all_finite"]

SPIKE_WINDOW = 100  # step losses in the running median
SPIKE_MIN_HISTORY = 10  # steps seen before the spike check arms itself


class TrainingDiverged(RuntimeError):
    """Training stopped at ``step`` because of ``reason`` (non-finite loss/grad norm, or a loss spike);
    ``last_good_checkpoint`` is the newest checkpoint whose weights are finite (None if none was written)."""

    def __init__(self, step: int, reason: str, last_good_checkpoint: Path | None) -> None:
        self.step = step
        self.reason = reason
        self.last_good_checkpoint = last_good_checkpoint
        if last_good_checkpoint:
            where = (
                f"the last good checkpoint is {last_good_checkpoint}. Try a lower train.lr, more "
                "train.warmup_steps or a train.grad_clip, then resume from it (--resume-from "
                f"{last_good_checkpoint} with the changed train.* overrides) or start over"
            )
        else:
            where = (
                "no checkpoint was written. Try a lower train.lr, more train.warmup_steps or a train.grad_clip "
                "and start over"
            )
        super().__init__(f"training diverged at step {step}: {reason}; {where}")


class DivergenceGuard:
    """Per-step non-finite and spike checks of one run (see the module doc). ``factor=None``: no spike check."""

    def __init__(self, factor: float | None) -> None:
        self.factor = factor
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.first: float | None = None  # the first step's loss

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to take the same decisions as an uninterrupted one (JSON-serialisable)."""
        return {"first": self.first, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the checkpoint's ``trainer_state.json``, key ``divergence_guard``)."""

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        first, history = (state.get("first"), state.get("history")) if isinstance(state, dict) else (None, None)
        if not (
            isinstance(state, dict)
            and "first" in state
            and (first is None or number(first))
            and isinstance(history, list)
            and all(number(v) for v in history)
        ):
            raise ValueError(
                f"trainer_state.json: divergence_guard={state!r} is invalid: needs 'first' (a number or null) and "
                "'history' (a list of numbers), as DivergenceGuard.state_dict writes them"
            )
        self.first = None if first is None else float(first)
        self.history = deque((float(v) for v in history), maxlen=SPIKE_WINDOW)

    def check(
        self, step: int, loss: Tensor, aux_loss: Tensor, grad_norm: Tensor | None, accelerator: Accelerator
    ) -> str | None:
        """Why optimizer step ``step`` (1-based) must not be applied, or None. ``loss``/``aux_loss``: this rank's
        mean over its micro-batches; ``grad_norm``: the global pre-clip norm (None if not computed).
        Collective on several processes."""
        parts = [loss, aux_loss, grad_norm if grad_norm is not None else torch.zeros_like(loss)]
        stats = torch.stack([p.detach().to(device=loss.device, dtype=torch.float64).reshape(()) for p in parts])
        world = accelerator.num_processes
        if world > 1:
            stats = accelerator.reduce(stats, reduction="sum")  # a non-finite value on any rank stays non-finite
            stats[:2] /= world
        loss_v, aux_v, norm_v = stats.tolist()  # the one host sync of the step
        for name, value in (("loss", loss_v), ("aux_loss", aux_v), ("gradient norm", norm_v)):
            if not math.isfinite(value):
                return f"the {name} is {value} (not finite)"
        if self.factor is not None and self.first is not None and self.first > 0:  # a ratio needs a positive base
            baseline, what = self.first, "the first step's loss"
            if len(self.history) >= SPIKE_MIN_HISTORY:
                median = statistics.median(self.history)
                if median < baseline:
                    baseline, what = median, f"the median loss of the last {len(self.history)} steps"
            if loss_v > self.factor * baseline:
                factor = f"train.divergence_factor={self.factor:g}"
                return f"the loss {loss_v:.4g} exceeds {factor} x {what} ({baseline:.4g})"
        if self.first is None:
            self.first = loss_v
        self.history.append(loss_v)
        return None


@torch.no_grad()
def all_finite(tensors: Iterable[Tensor], accelerator: Accelerator) -> bool:
    """Whether every tensor (this rank's parameters, say) is finite on every rank. Collective."""
    device = accelerator.device
    bad = torch.zeros((), dtype=torch.float32, device=device)
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard checks its own part
        if local.is_floating_point() or local.is_complex():
            bad += (~torch.isfinite(local.detach())).any().to(device=device, dtype=torch.float32)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return float(bad) == 0.0
