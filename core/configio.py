"""The language-model run config: ``RunConfig`` (model, train, data sections) and its loader.

    cfg = load_run_config("recipes/configs/debug.yaml", ["model.d_model=128", "model.moe.num_experts=8"])

Layering (defaults -> YAML -> dotted overrides) is generic and lives in ``moekit.core.layering``; the
run folder's ``config.yaml`` (save, resume checks, migration of older folders) in ``moekit.core.run_folder``.
The ``parallel`` section (``moekit.moe.config.ParallelConfig``) says where the MoE layers run; it is not the
model, so a run may resume with another one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.core.config import ModelConfig
from moekit.core.data import CORPORA
from moekit.core.layering import config_to_dict
from moekit.core.run_folder import CONFIG_FILE, check_resumable, load_run_file, migrate_placement, save_run_config
from moekit.core.train_config import TrainConfig
from moekit.moe.config import ParallelConfig

TOKENIZERS = ("byte",)
__all__ = ["CONFIG_FILE", "DataConfig", "RunConfig", "load_run_config"]


@dataclass
class DataConfig:
    """Which corpus and how it is cut into training windows."""

    corpus: str = "shakespeare"  # a key of moekit.core.data.CORPORA
    seq_len: int = 128  # tokens per training window
    tokenizer: str = "byte"  # one of TOKENIZERS

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or self.corpus not in CORPORA:  # a dict is unhashable: check first
            raise ValueError(f"DataConfig.corpus={self.corpus!r} is invalid: allowed values are {sorted(CORPORA)}")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 1:
            raise ValueError(f"DataConfig.seq_len={self.seq_len!r} is invalid: must be an int >= 1")
        if not isinstance(self.tokenizer, str) or self.tokenizer not in TOKENIZERS:
            raise ValueError(f"DataConfig.tokenizer={self.tokenizer!r} is invalid: allowed values are {TOKENIZERS}")


@dataclass
class RunConfig:
    """Everything a ``train_lm`` run needs; written resolved to ``<run_dir>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"RunConfig: data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def check_resumable(self, run_dir: str | os.PathLike) -> None:
        """Refuse to resume ``run_dir`` with another model (see ``moekit.core.run_folder.check_resumable``)."""
        check_resumable(self, run_dir, migrate=migrate_placement)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``config.yaml`` into ``run_dir`` atomically."""
        return save_run_config(self, run_dir)


def load_run_config(
    path: str | os.PathLike | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> RunConfig:
    """Defaults -> YAML file ``path`` (optional) -> dotted ``overrides``. A top-level ``compare`` section in the
    file (a comparison preset's, read by recipes/compare.py) is ignored, so that one preset also trains its
    MoE base run alone. A file from an older version with placement in ``model.moe`` is migrated (logged)."""
    return load_run_file(RunConfig, path, overrides, ignore=("compare",), migrate=migrate_placement)
