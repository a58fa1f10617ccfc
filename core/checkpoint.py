"""Crash-safe training checkpoints over ``accelerator.save_state``.

Layout under ``<run_dir>/ckpt``::

    step_0000100/        accelerate state (model, optimizer, scheduler, per-rank RNG) + trainer_state.json
    step_0000200/          (+ whatever ``extra_writer`` adds, e.g. experts.safetensors)
    latest               text file naming the newest complete step folder

A checkpoint is written into ``.tmp_step_XXXXXXX`` and renamed into place with ``os.replace`` only once
every rank has finished writing and every file in it is fsynced; ``latest`` is then replaced atomically.
A crash (of the process or of the machine) at any point leaves ``latest`` naming a complete checkpoint.
Resume reads only ``latest``; stale temp folders are removed.

``model.safetensors`` holds the state dict of the *unwrapped* model (no DDP ``module.`` prefix), so a
checkpoint resumes on any number of processes. State that ranks hold differently (expert-parallel shards)
goes through two collective hooks: ``save(..., extra_writer=fn)`` calls ``fn(tmp_dir)`` on every rank
before the folder is complete; ``fn`` writes its files and returns the model state-dict keys it stored,
which are left out of ``model.safetensors``. ``load(..., extra_reader=fn)`` calls ``fn(dir)`` on every
rank after ``accelerator.load_state``; it restores its part of the model and optimizer and returns the
keys it restored. Any model key restored by neither is an error.

A checkpoint file that cannot be read (truncated, overwritten, missing RNG state) is a
:class:`CorruptCheckpoint` naming the file and the newest older checkpoint whose files all read back;
:func:`rewind_to` makes that one ``latest`` (moving the newer folders to ``ckpt/discarded/``, never deleting
them) so that a resume continues from it (the recipes' ``--resume-from``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from moekit.core.files import atomic_write_text, fsync_dir, fsync_tree

CKPT_DIR = "ckpt"  # a run folder's checkpoints: <run_dir>/ckpt
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"  # accelerate's name for the first model; model_1.safetensors for the next
_PREFIX = "step_"
_DDP_PREFIX = "module."
_FSDP_MODEL = "pytorch_model_fsdp"  # accelerate.utils.constants.FSDP_MODEL_NAME
_RNG_FILE = "random_states_{}.pkl"  # accelerate's per-rank RNG state
DISCARDED = "discarded"  # newer checkpoints set aside by rewind_to

ExtraWriter = Callable[[Path], Collection[str]]  # (temp folder) -> model keys it stored; collective
ExtraReader = Callable[[Path], Collection[str]]  # (checkpoint folder) -> model keys it restored; collective


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


log = logging.getLogger(__name__)


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


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read; names the file and the newest older checkpoint that reads back."""

    def __init__(self, file: Path, problem: str, older: Path | None) -> None:
        self.file, self.problem, self.older = file, problem, older
        if older is not None:
            advice = (
                f"the newest older complete checkpoint is {older}: resume from it with --resume-from {older} "
                f"(train recipes; newer checkpoints move to {older.parent / DISCARDED}), or start a new run"
            )
        else:
            advice = "there is no older complete checkpoint: start a new run"
        super().__init__(f"checkpoint file {file} is unreadable ({problem}); {advice}")


def unreadable_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of checkpoint ``folder`` that does not read back, with the reason, or None. Reads every
    file in full (safetensors, torch zip archives with their CRCs, JSON); a missing state file counts."""
    if not (folder / STATE_FILE).is_file():
        return folder / STATE_FILE, "missing: the checkpoint is incomplete"
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif file.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(file) as z:  # torch.save's format
                    bad = z.testzip()
                if bad is not None:
                    return file, f"archive member {bad} fails its CRC check"
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as e:  # any failure to read is the finding
            return file, f"{type(e).__name__}: {e}"
    return None


def older_complete(root: Path, than: Path | None) -> Path | None:
    """The newest checkpoint under ``root`` older than ``than`` (all, if None) whose files all read back."""
    steps = sorted((p for p in root.glob(f"{_PREFIX}*") if p.is_dir()), reverse=True)
    for path in steps:
        if (than is None or path.name < than.name) and unreadable_file(path) is None:
            return path
    return None


def set_aside(folder: Path) -> Path:
    """Move a checkpoint folder to ``ckpt/discarded/`` (a fresh name if taken); a folder already moved by
    another process of the same launch is skipped. Returns where it went."""
    target, n = folder.parent / DISCARDED / folder.name, 1
    while target.exists():
        target, n = folder.parent / DISCARDED / f"{folder.name}.{n}", n + 1
    target.parent.mkdir(exist_ok=True)
    try:
        os.replace(folder, target)
    except FileNotFoundError:
        pass
    return target


def rewind_to(checkpoint: str | os.PathLike) -> Path:
    """Make ``checkpoint`` (a ``step_*`` folder of a run's ``ckpt``) the one a resume continues from: check
    that it reads back, move every newer checkpoint to ``ckpt/discarded/`` and point ``latest`` at it. Not
    collective, and safe to run on every process of a launch at once (a folder another process already moved
    is skipped); run it before the Trainer is built."""
    path = Path(checkpoint).resolve()
    root = path.parent
    if not path.is_dir() or not path.name.startswith(_PREFIX) or not (root / LATEST).exists():
        raise FileNotFoundError(f"--resume-from {checkpoint}: not a checkpoint folder (OUT/ckpt/{_PREFIX}*)")
    found = unreadable_file(path)
    if found is not None:
        raise CorruptCheckpoint(found[0], found[1], older_complete(root, path))
    for newer in sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and p.name > path.name):
        set_aside(newer)
    fsync_dir(root)
    atomic_write_text(root / LATEST, path.name + "\n")
    return path


class CheckpointManager:
    """Save / find / load checkpoints of one run. Every rank must call ``save`` and ``load`` (collective)."""

    def __init__(self, root: str | os.PathLike, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"CheckpointManager.keep={keep} is invalid: must be >= 1")
        self.root = Path(root)
        self.keep = keep

    def _latest_name(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text(errors="replace").strip() if pointer.is_file() else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(errors="replace").strip()
        path = self.root / name
        if not name.startswith(_PREFIX) or "/" in name or not (path / STATE_FILE).is_file():
            raise CorruptCheckpoint(pointer, f"names {name!r}, which is missing or incomplete", self.older(None))
        return path

    def older(self, than: Path | None) -> Path | None:
        """The newest checkpoint older than ``than`` (any, if None) whose files all read back."""
        return older_complete(self.root, than)

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
        if final.exists():
            if self._latest_name() == final.name:  # this step already saved (resumed and stopped at once)
                return final
            # A folder of this step that ``latest`` does not name: written before a crash between its rename
            # and ``latest``, by the trajectory this run resumed away from. Set aside, never reused or deleted.
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                set_aside(final)
            accelerator.wait_for_everyone()
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
        if accelerator.is_local_main_process:
            # Durable before it counts: accelerate's writers do not fsync, so a power loss after the rename
            # could otherwise leave ``latest`` naming a folder of empty files. One process per machine, since
            # fsync flushes only its own machine's cached writes (other nodes' RNG files and expert shards).
            fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # the state file goes last: its presence marks the folder complete
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
        self._check_rng_file(path, accelerator.process_index)
        unset: set[str] = set()
        try:
            handle = accelerator.register_load_state_pre_hook(partial(_load_unwrapped, accelerator, path, unset))
            try:
                accelerator.load_state(str(path))
            finally:
                handle.remove()
            unset -= set(extra_reader(path)) if extra_reader is not None else set()
            state = json.loads((path / STATE_FILE).read_text())
        except Exception as e:
            found = unreadable_file(path)  # a damaged file, or a genuine mismatch (re-raised as is)
            if found is None:
                raise
            raise CorruptCheckpoint(found[0], found[1], self.older(path)) from e
        if unset:
            raise RuntimeError(f"checkpoint {path} has no saved value for {sorted(unset)}")
        return state

    def _check_rng_file(self, path: Path, rank: int) -> None:
        """Accelerate skips an unreadable RNG file with an INFO log, so the run would continue with other
        random numbers: refuse it. A missing file of a rank > 0 means the checkpoint was written by fewer
        processes; that rank keeps its seeded state (logged), as on any other process count."""
        file = path / _RNG_FILE.format(rank)
        if not file.is_file():
            if rank == 0:
                raise CorruptCheckpoint(file, "missing", self.older(path))
            log.warning(
                "%s is missing (checkpoint written by fewer processes): rank %d keeps its seeded RNG", file, rank
            )
            return
        try:
            with zipfile.ZipFile(file) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            raise CorruptCheckpoint(file, f"{type(e).__name__}: {e}", self.older(path)) from None
        if bad is not None:
            raise CorruptCheckpoint(file, f"archive member {bad} fails its CRC check", self.older(path))

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
