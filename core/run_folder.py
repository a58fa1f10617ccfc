"""A run folder's resolved config (``config.yaml``): writing it, the rules of what a resume may change, and
the checks of a recipe's ``--out`` folder.

One home for every run config (language model, multimodal, any task): each is a dataclass with sections
(``model``, ``train``, ...), saved resolved with :func:`save_run_config` and compared field by field with
:func:`check_resumable` before a run continues from its checkpoints. :data:`RESUME_RULES` classifies every
field of every run config as ``MAY_CHANGE`` (cadence, trackers, placement, the lr schedule, which the
Trainer rebuilds from the resumed step) or ``FIXED`` (the model, the data and its order, the optimizer's
own hyperparameters, seeds, the batch, the numerics); a resume that changes a fixed field is refused,
naming the field and both values. ``tests/test_resume_rules.py`` fails when a field has no class.

:func:`check_out_folder` is what the recipes call on ``--out``: ``--resume`` needs a folder holding a run,
a new run needs a new or empty folder.

Older run folders kept placement (``dispatch``, ``expert_parallel_size``) in the model's ``moe`` section;
:func:`migrate_placement` moves it to the run's ``parallel`` section (logging a note), and
:func:`load_run_file` applies it to every config file a recipe loads, so such a folder resumes as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moekit.core.checkpoint import CKPT_DIR, CorruptCheckpoint, rewind_to
from moekit.core.files import atomic_write_text
from moekit.core.guard import TrainingDiverged
from moekit.core.layering import build_dataclass, config_to_dict, merge_tree, parse_override, read_yaml, set_dotted

CONFIG_FILE = "config.yaml"
__all__ = [
    "CONFIG_FILE",
    "FIXED",
    "MAY_CHANGE",
    "RESUME_RULES",
    "read_completed_config",
    "saved_config_diffs",
    "RunFolderError",
    "RUN_ERRORS",
    "check_out_folder",
    "open_run_folder",
    "check_resumable",
    "resume_rule",
    "diff_trees",
    "load_run_file",
    "migrate_placement",
    "read_run_config",
    "save_run_config",
]

T = TypeVar("T")
Migration = Callable[[dict[str, Any]], list[str]]  # rewrites a config tree in place; returns notes
log = logging.getLogger(__name__)

# Fields older moekit versions kept in MoEConfig that say where/how to run: moved to ``parallel`` (or dropped).
_MOVED_TO_PARALLEL = ("dispatch", "expert_parallel_size")
_DROPPED = ("extra",)

MAY_CHANGE = "may change"
FIXED = "fixed"
# Dotted key -> class; a key also classifies every field below it (the longest listed prefix wins). The
# model sections are fixed as a whole: every model field shapes the weights or what they compute.
RESUME_RULES: dict[str, str] = {
    "model": FIXED,
    # train: the lr schedule is rebuilt from the resumed step with the new values (Trainer._restore)
    "train.steps": MAY_CHANGE,
    "train.lr": MAY_CHANGE,
    "train.warmup_steps": MAY_CHANGE,
    "train.min_lr_ratio": MAY_CHANGE,
    "train.decay": MAY_CHANGE,
    # the restored optimizer state carries its own hyperparameters: a new value would be ignored
    "train.weight_decay": FIXED,
    "train.betas": FIXED,
    "train.adam_eps": FIXED,
    "train.grad_clip": MAY_CHANGE,  # applied at every step
    "train.divergence_factor": MAY_CHANGE,
    "train.batch_size": FIXED,  # the data order (StepSampler) and the tokens per step
    "train.micro_batch_size": MAY_CHANGE,  # same global batch, other accumulation (as on another world size)
    "train.seed": FIXED,
    "train.mixed_precision": FIXED,  # one run, one numerics
    "train.eval_every": MAY_CHANGE,
    "train.eval_batches": FIXED,  # which val windows: val losses of one run must be comparable
    "train.log_every": MAY_CHANGE,
    "train.save_every": MAY_CHANGE,
    "train.keep_checkpoints": MAY_CHANGE,
    "train.log_with": MAY_CHANGE,
    "train.progress_bar": MAY_CHANGE,
    "train.mfu_probe": MAY_CHANGE,
    "train.cpu": MAY_CHANGE,
    "train.compile": MAY_CHANGE,
    "train.compile_backend": MAY_CHANGE,
    # language-model data: which windows the run trains and evaluates on
    "data.corpus": FIXED,
    "data.seq_len": FIXED,
    "data.tokenizer": FIXED,
    # multimodal data, tasks and held-out evaluation
    "data.train_samples": FIXED,
    "data.val_samples": FIXED,
    "data.speech": FIXED,
    "data.eval_voices": FIXED,
    "data.cache_root": MAY_CHANGE,  # where the same clips are cached
    "data.pad_to_multiple_of": FIXED,
    "tasks": FIXED,
    "eval.samples_per_task": FIXED,
    "eval.batch_size": MAY_CHANGE,  # rows per forward only
    "eval.every": MAY_CHANGE,
    # placement, not the model (docs/DESIGN.md)
    "parallel.expert_parallel_size": MAY_CHANGE,
    "parallel.dispatch": MAY_CHANGE,
}


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: a refused resume, a wrong or non-empty ``--out``."""


# What a recipe reports as one line and a non-zero exit instead of a traceback.
RUN_ERRORS = (RunFolderError, CorruptCheckpoint, TrainingDiverged)


def resume_rule(key: str) -> str | None:
    """The class of dotted config ``key`` in :data:`RESUME_RULES` (its longest listed prefix), or None."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        rule = RESUME_RULES.get(".".join(parts[:n]))
        if rule is not None:
            return rule
    return None


def save_run_config(cfg: Any, run_dir: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` (a dataclass) to ``<run_dir>/config.yaml`` atomically; returns the path."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, text)


def read_run_config(run_dir: str | os.PathLike, migrate: Migration | None = None) -> dict[str, Any] | None:
    """The saved ``config.yaml`` of ``run_dir`` as a dict (passed through ``migrate``), or None when there is
    none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return _read_tree(path, migrate)


def read_completed_config(
    cls: type, run_dir: str | os.PathLike, migrate: Migration | None = None
) -> dict[str, Any] | None:
    """``read_run_config`` built through ``cls`` and back: fields a newer version added (absent from an older
    ``config.yaml``) take their defaults, which keep the old behaviour, so they never read as a change."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return config_to_dict(load_run_file(cls, path, migrate=migrate))


def saved_config_diffs(
    cfg: Any, run_dir: str | os.PathLike, migrate: Migration | None = None
) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, cfg's value)`` for every field where ``cfg`` differs from the run folder's completed
    saved config (:func:`read_completed_config`); empty when they agree or the folder has no ``config.yaml``."""
    saved = read_completed_config(type(cfg), run_dir, migrate)
    return [] if saved is None else diff_trees(saved, config_to_dict(cfg))


def _read_tree(path: str | os.PathLike, migrate: Migration | None) -> dict[str, Any]:
    tree = read_yaml(path)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path}: top level must be a mapping, got {type(tree).__name__}")
    for note in migrate(tree) if migrate is not None else ():
        log.warning("%s: %s", path, note)
    return tree


def migrate_placement(tree: dict[str, Any], moe_path: str = "model.moe") -> list[str]:
    """Move ``<moe_path>.dispatch`` / ``.expert_parallel_size`` of an older config tree to ``parallel.*`` and
    drop ``<moe_path>.extra``, in place; returns one note per change. A value already set in ``parallel`` wins."""
    node: Any = tree
    for part in moe_path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return []
    notes = []
    for key in _MOVED_TO_PARALLEL:
        if key in node:
            value = node.pop(key)
            parallel = tree.get("parallel")
            if not isinstance(parallel, dict):
                parallel = tree["parallel"] = {}
            parallel.setdefault(key, value)
            notes.append(f"{moe_path}.{key}={value!r} is placement, not model: moved to parallel.{key}")
    for key in _DROPPED:
        if key in node:
            node.pop(key)
            notes.append(f"{moe_path}.{key} no longer exists: dropped")
    return notes


def load_run_file(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    ignore: Iterable[str] = (),
    migrate: Migration | None = None,
) -> T:
    """``moekit.core.layering.load_config`` (defaults -> YAML ``path`` -> dotted overrides; top-level sections
    in ``ignore`` skipped) with ``migrate`` applied to the file's tree first: a run folder written by an older
    version loads, with a logged note per moved field. Overrides naming a moved field are migrated too."""
    tree: dict[str, Any] = {}
    if path is not None:
        skip = set(ignore)
        file_tree = {k: v for k, v in _read_tree(path, migrate).items() if k not in skip}
        try:
            merge_tree(cls, tree, file_tree)
        except ValueError as e:  # e.g. a key of another recipe's run: name the file it came from
            raise ValueError(f"config file {path}: {e}") from None
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        if migrate is not None:
            probe: dict[str, Any] = {}
            _set_at(probe, key, value)
            notes = migrate(probe)
            if notes:
                for note in notes:
                    log.warning("override %s: %s", key, note)
                for new_key, new_value in _leaves(probe):
                    set_dotted(cls, tree, new_key, new_value)
                continue
        set_dotted(cls, tree, key, value)
    return build_dataclass(cls, tree)


def _set_at(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key="a.b.c"``, creating the dicts on the way (no validation)."""
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted ``(key, value)`` pairs of the plain values of a migrated override tree (sections that the
    migration emptied are left out: they must not create a section with defaults)."""
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def diff_trees(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every leaf where two nested dicts differ, in key order."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, Any, Any]] = []
        for key in sorted(set(old) | set(new), key=str):
            out += diff_trees(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        return [(prefix.rstrip("."), old, new)]
    return []


def check_resumable(cfg: Any, run_dir: str | os.PathLike, migrate: Migration | None = None) -> None:
    """Refuse to resume ``run_dir`` when ``cfg`` changes a field that :data:`RESUME_RULES` fixes (or does not
    classify) against the saved ``config.yaml`` (read through ``migrate``); the error names every such field
    with both values. A folder without ``config.yaml`` has nothing to compare."""
    refused = [d for d in saved_config_diffs(cfg, run_dir, migrate) if resume_rule(d[0]) != MAY_CHANGE]
    if refused:
        listed = "; ".join(f"{k}: run has {_short(a)}, now {_short(b)}" for k, a, b in refused)
        raise RunFolderError(
            f"resume: {Path(run_dir) / CONFIG_FILE} was trained with a different config ({listed}); these fields "
            "are fixed on resume (moekit.core.run_folder.RESUME_RULES): resume with the run's own values or start "
            "a new run folder"
        )


def check_out_folder(out: str | os.PathLike, resume: bool, flag: str = "--resume") -> Path:
    """A recipe's ``--out``: with ``resume``, a folder holding a run (its ``config.yaml``); without, a new or
    empty folder (never one holding a run or anything else). Returns the path; raises :class:`RunFolderError`."""
    out = Path(out)
    holds_run = (out / CONFIG_FILE).is_file()
    if resume and not holds_run:
        what = "does not exist" if not out.exists() else f"holds no run (no {CONFIG_FILE})"
        raise RunFolderError(f"{flag}: {out} {what}; check the path, or drop {flag} to start a new run there")
    if not resume and out.exists():
        if not out.is_dir():
            raise RunFolderError(f"--out {out} is a file, not a folder")
        if holds_run:
            raise RunFolderError(f"--out {out} holds a run: pass --resume to continue it, or choose another folder")
        if any(out.iterdir()):
            raise RunFolderError(f"--out {out} is not empty and holds no run: choose a new or empty folder")
    return out


def open_run_folder(out: str | os.PathLike, resume: bool, resume_from: str | os.PathLike | None = None) -> bool:
    """The train recipes' ``--out`` / ``--resume`` / ``--resume-from CKPT``: :func:`check_out_folder`, then make
    ``CKPT`` (a checkpoint of this run) the one the resume continues from (``moekit.core.checkpoint.rewind_to``:
    newer checkpoints move to ``OUT/ckpt/discarded``). Returns whether the run resumes."""
    resume = resume or resume_from is not None
    out = check_out_folder(out, resume, "--resume" if resume_from is None else "--resume-from")
    if resume_from is not None:
        ckpt = Path(resume_from).resolve()
        if ckpt.parent != (out / CKPT_DIR).resolve():
            raise RunFolderError(
                f"--resume-from {resume_from}: not a checkpoint of {out} (one of {out / CKPT_DIR}/step_*)"
            )
        try:
            rewind_to(ckpt)
        except FileNotFoundError as e:
            raise RunFolderError(str(e)) from None
    return resume


def _short(value: Any) -> str:
    return "a section" if isinstance(value, Mapping) else repr(value)
