"""Crash-safe training checkpoints over ``accelerator.save_state``.

Layout under ``<run_dir>/ckpt``::

    step_0000100/        accelerate state (model, optimizer, scheduler, per-rank RNG) + trainer_state.json
    step_0000200/
    latest               text file naming the newest complete step folder

A checkpoint is written into ``.tmp_step_XXXXXXX`` and renamed into place with ``os.replace`` only once
every rank has finished writing; ``latest`` is then replaced atomically. A crash at any point leaves
``latest`` naming a complete checkpoint. Resume reads only ``latest``; stale temp folders are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator

LATEST = "latest"
STATE_FILE = "trainer_state.json"
_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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

    def save(self, accelerator: Accelerator, step: int, trainer_state: dict[str, Any]) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        if final.exists():  # same step already saved (e.g. resumed and stopped at once): identical content
            return final
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash while writing this step
        accelerator.wait_for_everyone()
        with _quiet_tied_weights():
            accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main rank the rest
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The state file goes last: its presence marks the folder complete.
            _write_atomic(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._prune(keep_also=final)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
        """Restore the prepared objects and RNG states; return the trainer state (``step`` etc.)."""
        path = Path(path)
        accelerator.load_state(str(path))
        return json.loads((path / STATE_FILE).read_text())

    def _prune(self, keep_also: Path) -> None:
        steps = sorted(p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old != keep_also:
                shutil.rmtree(old, ignore_errors=True)
        for debris in self.root.glob(f".tmp_{_PREFIX}*"):
            shutil.rmtree(debris, ignore_errors=True)
