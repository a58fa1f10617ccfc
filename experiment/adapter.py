"""The task adapter: all that the task-agnostic planner, runner and report writer know about a task. A task
is one :class:`TaskAdapter` subclass in its own file, registered by name in ``moekit.experiment.plan.TASKS``.
Also the small helpers the report and the adapters share."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.config import ModelConfig
from moekit.core.layering import load_config

Row = dict[str, Any]
Column = tuple[str, Callable[[Any], str]]  # (header, cell from a matching row / a list of a model's rows)


@dataclass
class RunSpec:
    """One planned run: a model of the comparison at one seed, as a complete run config of its task."""

    task: str  # key of moekit.experiment.plan.TASKS
    name: str  # model name shared by its seeds, e.g. "dense" or "moe-8x2"
    kind: str  # "dense" | "moe"
    seed: int
    run: Any  # the task's run config (RunConfig, MultimodalRunConfig, ...)
    sweep_value: Any = None

    @property
    def folder(self) -> str:
        return f"{self.name}-seed{self.seed}"


class TaskAdapter:
    """Base class of the task adapters; the defaults suit a run config with ``model`` and ``train`` sections."""

    name: str = ""
    title: str = "Sparse vs dense at matched compute"
    run_config: type = object  # the task's run config dataclass
    summary_fields: tuple[str, ...] = ()  # extra row fields copied into summary.json
    matching_columns: tuple[Column, ...] = (  # matching-table columns after model and kind: the default facts
        ("params total", lambda m: f"{m['params_total']:,}"),
        ("params active", lambda m: f"{m['params_active']:,}"),
        ("FLOPs/token (fwd)", lambda m: f"{m['flops_per_token']:,}"),
        ("steps", lambda m: str(m["steps"])),
    )
    result_columns: tuple[Column, ...] = ()  # results-table columns after the final val loss
    verdict_fields: tuple[str, ...] = ()  # row metrics with verdicts beyond final val loss and *_acc
    decoder_key: str = "model"  # dotted path of the decoder's ModelConfig (what the dense twin replaces)

    def load_base(self, path: Any, overrides: list[str]) -> Any:
        """The MoE base run config from a comparison YAML (its ``compare`` section is read separately)."""
        return load_config(self.run_config, path, overrides, ignore=("compare",))

    def decoder(self, run: Any) -> ModelConfig:
        for part in self.decoder_key.split("."):
            run = getattr(run, part)
        return run

    def with_decoder(self, run: Any, model: ModelConfig, key: str | None = None) -> Any:
        head, _, rest = (key or self.decoder_key).partition(".")
        return dataclasses.replace(run, **{head: self.with_decoder(getattr(run, head), model, rest) if rest else model})

    def seq_len(self, run: Any) -> int:
        """The sequence length at which active FLOPs per token are matched."""
        return self.decoder(run).max_seq_len

    def prepare(self, run: Any) -> Any:
        """Data shared by the main process's facts and in-process runs (loaded once); None if nothing."""
        return None

    def facts(self, run: Any, state: Any) -> Row:
        """Matching facts of one model: params_total, params_active, flops_per_token, steps and the task's own;
        by default the decoder's at :meth:`seq_len`."""
        decoder = self.decoder(run)
        pc, fpt = count_params(decoder), flops_per_token(decoder, self.seq_len(run))
        return dict(params_total=pc.total, params_active=pc.active, flops_per_token=fpt, steps=run.train.steps)

    def build_trainer(self, run: Any, run_dir: Path, *, resume: bool, expect_processes: int | None, state: Any):
        """The run's Trainer (it writes config.yaml); ``state`` is :meth:`prepare`'s value or None in a worker."""
        raise NotImplementedError

    def results(self, trainer: Any, summary: Row, spec: RunSpec, facts: Row, compare: Any) -> Row:
        """Task-specific fields of a finished run's row; must include ``train_flops``."""
        raise NotImplementedError

    def headline(self, rows: list[Row]) -> str:
        """A sentence appended to the generic headline ('' for none)."""
        return ""

    def sections(self, out: Path, specs: list[RunSpec], rows: list[Row], matching: list[Row]) -> list[str]:
        """Task-specific report.md lines (plots written into ``out``), placed after the results table."""
        return []


def mean_spread(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); None and NaN are skipped."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def repeated(values: list[Any]) -> str | None:
    """``'4 appears twice'`` for the first value that ``values`` holds more than once (by ``==``), else None: a
    comparison's models must be distinct, or two of them plan the same run folder."""
    for i, v in enumerate(values):
        if v in values[:i]:
            n = sum(w == v for w in values)
            return f"{v!r} appears {'twice' if n == 2 else f'{n} times'}"
    return None


def group_rows(rows: list[Row]) -> dict[str, list[Row]]:
    """Each model's rows, models in the order they first appear."""
    return {name: [r for r in rows if r["name"] == name] for name in dict.fromkeys(r["name"] for r in rows)}


def best_moe(groups: dict[str, list[Row]]) -> str | None:
    """The MoE model with the lowest mean final val loss (None without one)."""
    moe = [n for n, rs in groups.items() if rs[0]["kind"] == "moe"]
    return min(moe, key=lambda n: mean_spread([r["final_val_loss"] for r in groups[n]])[0], default=None)


def cell(rs: list[Row], key: str, spec: str = ".4f") -> str:
    """``mean ± sd`` of ``key`` over a model's rows (the mean alone for one row, 'n/a' when absent)."""
    m, sd = mean_spread([r.get(key) for r in rs])
    return "n/a" if math.isnan(m) else f"{m:{spec}}" + (f" ± {sd:{spec}}" if len(rs) > 1 else "")


def md_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(row) + " |" for row in [headers, ["---"] * len(headers), *cells]]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in workers or CI
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path, fname: str) -> str:
    """Write ``fig`` to ``out/fname`` as every report PNG is written, close it, return ``fname``."""
    fig.savefig(out / fname, dpi=110)
    pyplot().close(fig)
    return fname
