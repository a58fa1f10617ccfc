"""A run folder's resolved config (``config.yaml``): writing it, and checking that a resume keeps it.

One home for every run config (language model, multimodal, any task): each is a dataclass with sections
(``model``, ``train``, ...), saved resolved with :func:`save_run_config` and compared section by section
with :func:`check_resumable` before a run continues from its checkpoints.

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

from moekit.core.files import atomic_write_text
from moekit.core.layering import build_dataclass, config_to_dict, merge_tree, parse_override, read_yaml, set_dotted

CONFIG_FILE = "config.yaml"
__all__ = [
    "CONFIG_FILE",
    "check_resumable",
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
        merge_tree(cls, tree, {k: v for k, v in _read_tree(path, migrate).items() if k not in skip})
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


def check_resumable(
    cfg: Any,
    run_dir: str | os.PathLike,
    sections: Iterable[str] = ("model",),
    ignore: Iterable[str] = (),
    migrate: Migration | None = None,
) -> None:
    """Refuse to resume ``run_dir`` when a section of ``cfg`` that shapes the checkpoint differs from the
    saved ``config.yaml`` (read through ``migrate``); the error names every differing field with both values.
    Dotted keys in ``ignore`` may differ."""
    saved = read_run_config(run_dir, migrate)
    if saved is None:
        return
    current = config_to_dict(cfg)
    diffs = []
    for section in sections:
        diffs += diff_trees(saved.get(section), current.get(section), f"{section}.")
    skip = set(ignore)
    diffs = [d for d in diffs if d[0] not in skip]
    if diffs:
        listed = "; ".join(f"{k}: run has {_short(a)}, now {_short(b)}" for k, a, b in diffs)
        raise ValueError(
            f"resume: {Path(run_dir) / CONFIG_FILE} was trained with a different config ({listed}); resume with "
            "the run's own config (omit --config) or start a new run folder"
        )


def _short(value: Any) -> str:
    return "a section" if isinstance(value, Mapping) else repr(value)
