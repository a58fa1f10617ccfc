"""Divergence: the error a run stops with when its loss or gradients stop being finite (or explode)."""

from __future__ import annotations

from pathlib import Path


class TrainingDiverged(RuntimeError):
    """Training stopped at ``step`` because of ``reason`` (non-finite loss/grad norm, or a loss spike);
    ``last_good_checkpoint`` is the newest checkpoint whose weights are finite (None if none was written)."""

    def __init__(self, step: int, reason: str, last_good_checkpoint: Path | None) -> None:
        self.step = step
        self.reason = reason
        self.last_good_checkpoint = last_good_checkpoint
        where = f"the last good checkpoint is {last_good_checkpoint}" if last_good_checkpoint else "no checkpoint"
        super().__init__(
            f"training diverged at step {step}: {reason}; {where}. Try a lower train.lr, more "
            "train.warmup_steps or a train.grad_clip, then resume from that checkpoint or start over."
        )
