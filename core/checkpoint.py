"""Crash-safe training checkpoints over ``accelerator.save_state``.

Layout under ``<run_dir>/ckpt``::

    step_0000100/        accelerate state (model, optimizer, scheduler, per-rank RNG) + trainer_state.json
    step_0000200/          (+ whatever ``extra_writer`` adds, e.g. experts.safetensors)
    latest               text file naming the newest complete step folder

A checkpoint is written into ``.tmp_step_XXXXXXX`` and renamed into place with ``os.replace`` only once
every rank has finished writing; ``latest`` is then replaced atomically. A crash at any point leaves
``latest`` naming a complete checkpoint. Resume reads only ``latest``; stale temp folders are removed.

``model.safetensors`` holds the state dict of the *unwrapped* model (no DDP ``module.`` prefix), so a
checkpoint resumes on any number of processes. State that ranks hold differently (expert-parallel shards)
goes through two collective hooks: ``save(..., extra_writer=fn)`` calls ``fn(tmp_dir)`` on every rank
before the folder is complete; ``fn`` writes its files and returns the model state-dict keys it stored,
which are left out of ``model.safetensors``. ``load(..., extra_reader=fn)`` calls ``fn(dir)`` on every
rank after ``accelerator.load_state``; it restores its part of the model and optimizer and returns the
keys it restored. Any model key restored by neither is an error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from moekit.core.files import atomic_write_text, fsync_dir

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"  # accelerate's name for the first model; model_1.safetensors for the next
_PREFIX = "step_"
_DDP_PREFIX = "module."
_FSDP_MODEL = "pytorch_model_fsdp"  # accelerate.utils.constants.FSDP_MODEL_NAME

ExtraWriter = Callable[[Path], Collection[str]]  # (temp folder) -> model keys it stored; collective
ExtraReader = Callable[[Path], Collection[str]]  # (checkpoint folder) -> model keys it restored; collective


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


class _DropTiedWeightNotice(logging.Filter):
    """Accelerate warns each time safetensors stores a tied LM head once; that is expected and reloads fine."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _quiet_tied_weights() -> Iterator[None]:
    log = logging.getLogger("accelerate.utils.other")
    notice = _DropTiedWeightNotice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


class CheckpointManager:
    """Save / find / load checkpoints of one run. Every rank must call ``save`` and ``load`` (collective)."""

    def __init__(self, root: str | os.PathLike, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"CheckpointManager.keep={keep} is invalid: must be >= 1")
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
        return path

    def save(
        self,
        accelerator: Accelerator,
        step: int,
        trainer_state: dict[str, Any],
        extra_writer: ExtraWriter | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` (collective); ``extra_writer`` see the module doc."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if final.exists():  # same step already saved (e.g. resumed and stopped at once): identical content
            return final
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash while writing this step
            tmp.mkdir()
        accelerator.wait_for_everyone()
        owned = set(extra_writer(tmp)) if extra_writer is not None else set()
        handle = accelerator.register_save_state_pre_hook(partial(_unwrapped_weights, accelerator, owned))
        try:
            with _quiet_tied_weights():
                accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main rank the rest
        finally:
            handle.remove()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The state file goes last: its presence marks the folder complete.
            atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
            os.replace(tmp, final)
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            self._prune(keep_also=final)
        accelerator.wait_for_everyone()
        return final

    def load(
        self, accelerator: Accelerator, path: str | os.PathLike, extra_reader: ExtraReader | None = None
    ) -> dict[str, Any]:
        """Restore the prepared objects and RNG states; return the trainer state (``step`` etc.). Collective."""
        path = Path(path)
        unset: set[str] = set()
        handle = accelerator.register_load_state_pre_hook(partial(_load_unwrapped, accelerator, path, unset))
        try:
            accelerator.load_state(str(path))
        finally:
            handle.remove()
        unset -= set(extra_reader(path)) if extra_reader is not None else set()
        if unset:
            raise RuntimeError(f"checkpoint {path} has no saved value for {sorted(unset)}")
        return json.loads((path / STATE_FILE).read_text())

    def _prune(self, keep_also: Path) -> None:
        steps = sorted(p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old != keep_also:
                shutil.rmtree(old, ignore_errors=True)
        for debris in self.root.glob(f".tmp_{_PREFIX}*"):
            shutil.rmtree(debris, ignore_errors=True)


def _model_file(path: Path, index: int) -> Path:
    return path / (MODEL_FILE if index == 0 else MODEL_FILE.replace(".", f"_{index}."))


def _unwrapped_weights(
    accelerator: Accelerator, exclude: set[str], models: list[nn.Module], weights: list[dict], _dir: str
) -> None:
    """Save pre-hook: store each model's unwrapped state dict, without the keys an extra writer stored."""
    if len(weights) != len(models):  # FSDP / DeepSpeed save their models themselves
        return
    for i, model in enumerate(models):
        state = accelerator.unwrap_model(model).state_dict()
        # An OrderedDict, as accelerate's save expects: it then stores tied weights once.
        weights[i] = OrderedDict((k, v) for k, v in state.items() if k not in exclude)


def _load_unwrapped(accelerator: Accelerator, path: Path, unset: set[str], models: list[nn.Module], _dir: str) -> None:
    """Load pre-hook: load each model file into the unwrapped model ourselves (accelerate would expect the
    wrapped layout) and collect the keys it left unset; emptying ``models`` makes accelerate skip them."""
    for i, model in enumerate(models):
        unset.update(_load_weights(accelerator.unwrap_model(model), _model_file(path, i)))
    models.clear()


def _load_weights(model: nn.Module, file: Path) -> set[str]:
    """Load ``file`` into ``model``; return the model's keys it did not set. Tied weights stored once count as
    set; files with DDP's ``module.`` prefix (written before unwrapped naming) load too. Unexpected keys and
    shape mismatches raise."""
    if not file.is_file():
        if any(file.parent.glob(f"{_FSDP_MODEL}*")):
            raise FileNotFoundError(
                f"{file.parent} was written under FSDP (sharded {_FSDP_MODEL}* files, no {file.name}): resume it "
                "under the same FSDP setup"
            )
        raise FileNotFoundError(f"{file} is missing: not a complete checkpoint")
    state = load_file(str(file))
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{file} holds keys the model does not have: {sorted(result.unexpected_keys)}")
    own = model.state_dict()
    loaded = {own[k].untyped_storage().data_ptr() for k in state}
    return {k for k in result.missing_keys if own[k].untyped_storage().data_ptr() not in loaded}
