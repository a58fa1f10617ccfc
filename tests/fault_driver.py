"""Run a training recipe in this process with one fault injected, for tests/test_fault_injection.py.

    python tests/fault_driver.py FAULT STEP THREADS RECIPE [recipe args...]
    torchrun --nproc_per_node 2 tests/fault_driver.py FAULT STEP THREADS RECIPE [recipe args...]

``STEP`` is the 1-based optimizer step the fault concerns; ``THREADS`` the torch threads (the test's own, so
that its reference run computes bit for bit the same). Faults:

- ``kill-after-step``: SIGKILL right after optimizer step STEP.
- ``kill-mid-save``: SIGKILL inside the checkpoint save of STEP, once accelerate has written its files and
  before ``trainer_state.json`` marks the temporary folder complete.
- ``kill-before-latest``: SIGKILL once the folder of STEP is in place, before ``latest`` names it.
- ``kill-mid-append``: SIGKILL after half of the metrics event of STEP reached metrics.jsonl.
- ``nan-grad``: a NaN gradient in optimizer step STEP (the run must stop with TrainingDiverged).
- ``nan-grad-rank1``: the same on process 1 only, after DDP's gradient all-reduce (every rank must stop).

The patches live in this process only: library code has no test hooks.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from typing import Any

import torch

import moekit.core.checkpoint as checkpoint
import moekit.core.train as train
from moekit.core.extension import TrainerExtension


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _StepFault(TrainerExtension):
    def __init__(self, fault: str, step: int) -> None:
        self.fault, self.step = fault, step
        self.trainer: Any = None  # set once the Trainer is built

    def after_backward(self, model, ctx):
        here = self.fault == "nan-grad" or (self.fault == "nan-grad-rank1" and ctx.rank == 1)
        if here and self.trainer.step + 1 == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    def after_optimizer_step(self, model, ctx):
        if self.fault == "kill-after-step" and self.trainer.step + 1 == self.step:
            _kill()


def _install(fault: str, step: int) -> None:
    ext = _StepFault(fault, step)
    init = train.Trainer.__init__

    def patched_init(self, *args, extensions=(), **kwargs):
        init(self, *args, extensions=(*extensions, ext), **kwargs)
        ext.trainer = self

    train.Trainer.__init__ = patched_init
    folder = checkpoint.step_dir_name(step)
    write = checkpoint.atomic_write_text

    def patched_write(path, text):
        if fault == "kill-mid-save" and path.name == checkpoint.STATE_FILE and path.parent.name.endswith(folder):
            _kill()
        if fault == "kill-before-latest" and path.name == checkpoint.LATEST and text.strip() == folder:
            _kill()
        return write(path, text)

    checkpoint.atomic_write_text = patched_write
    append = train.append_event

    def patched_append(path, event):
        if fault == "kill-mid-append" and event.get("step") == step and "train_loss" in event:
            line = json.dumps(dict(event)) + "\n"
            with open(path, "a") as f:
                f.write(line[: len(line) // 2])
            _kill()
        append(path, event)

    train.append_event = patched_append


def main() -> None:
    fault, step, threads, recipe, *args = sys.argv[1:]
    torch.set_num_threads(int(threads))
    _install(fault, int(step))
    sys.argv = [recipe, *args]
    runpy.run_path(recipe, run_name="__main__")


if __name__ == "__main__":
    main()
