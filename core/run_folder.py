"""A run folder's resolved config (``config.yaml``): writing it, and checking that a resume keeps it.

One home for every run config (language model, multimodal, any task): each is a dataclass with sections
(``model``, ``train``, ...), saved resolved with :func:`save_run_config` and compared section by section
with :func:`check_resumable` before a run continues from its checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from moekit.core.files import atomic_write_text
from moekit.core.layering import config_to_dict, read_yaml

CONFIG_FILE = "config.yaml"
__all__ = ["CONFIG_FILE", "PLACEMENT_KEYS", "check_resumable", "diff_trees", "read_run_config", "save_run_config"]


def save_run_config(cfg: Any, run_dir: str | os.PathLike) -> Path:
    """Write the resolved ``cfg`` (a dataclass) to ``<run_dir>/config.yaml`` atomically; returns the path."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, text)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The saved ``config.yaml`` of ``run_dir`` as a dict, or None when there is none."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


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


# Where the experts live is not the model's shape: checkpoints store them unsharded, so a run may resume
# with another expert-parallel size.
PLACEMENT_KEYS = ("model.moe.expert_parallel_size", "model.lm.moe.expert_parallel_size")


def check_resumable(
    cfg: Any, run_dir: str | os.PathLike, sections: Iterable[str] = ("model",), ignore: Iterable[str] = ()
) -> None:
    """Refuse to resume ``run_dir`` when a section of ``cfg`` that shapes the checkpoint differs from the
    saved ``config.yaml``; the error names every differing field with both values. Dotted keys in
    ``ignore`` may differ."""
    saved = read_run_config(run_dir)
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
