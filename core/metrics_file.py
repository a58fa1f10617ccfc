"""A run's ``metrics.jsonl``: one JSON event per line, appended by the Trainer, cut back on resume.

A crash mid-append leaves a torn last line: :func:`restart_events` drops it (the resumed run redoes that
step); any other unreadable line is an error naming the file and the line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moekit.core.files import atomic_write_text
from moekit.core.layering import config_to_dict, flatten_dict

__all__ = ["METRICS_FILE", "append_event", "read_events", "restart_events", "tracker_hparams"]

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics file, without a torn last line (dropped with a warning)."""
    lines = path.read_text().splitlines()
    events = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: dropped a torn last line (%s)", path, e)
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON event ({e}); fix or remove that line") from None
    return events


def restart_events(path: Path, step: int) -> list[dict[str, Any]]:
    """Rewrite ``path`` with only the events up to ``step`` (a fresh run: ``step=0``, an empty file); returns
    the events kept, so that a resumed (e.g. finished) run reports its last metrics, not nan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [e for e in read_events(path) if e["step"] <= step] if step > 0 and path.exists() else []
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in kept))  # a kill here keeps the old history
    return kept


def append_event(path: Path, event: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def tracker_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams accept only int/float/str/bool: flatten sections, stringify the rest."""
    flat = flatten_dict(config_to_dict(hparams))
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
