"""Sparse vs dense at matched compute: plan the runs, train them identically, collect one summary.

From one MoE base config the plan builds the dense twin with the same active FLOPs per token
(``moekit.moe.matching.dense_twin``), the MoE model itself, optional MoE variants or a sweep over one
MoE field at fixed active compute, and optionally a dense model with the MoE model's total parameters.
Every run uses the same data windows in the same order (``StepSampler`` seeded by ``train.seed``),
the same initial-weight seed, optimizer, schedule and budget. A finished run leaves ``result.json`` in
its folder and is not redone; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.config import ModelConfig
from moekit.core.configio import DataConfig, RunConfig
from moekit.core.data import StepSampler
from moekit.core.files import atomic_write_json
from moekit.core.layering import config_to_dict, set_dotted
from moekit.core.train import TrainConfig
from moekit.moe.config import MoEConfig
from moekit.moe.matching import check_matched, dense_twin, describe, param_matched_twin

BUDGETS = ("tokens", "flops")
TASKS = ("lm", "multimodal")  # the comparisons recipes/compare.py knows (compare.task)
RESULT_FILE = "result.json"
SUMMARY_FIELDS = (
    "name",
    "kind",
    "seed",
    "params_total",
    "params_active",
    "flops_per_token",
    "tokens_trained",
    "train_flops",
    "final_val_loss",
    "val_bits_per_byte",
    "tokens_per_s",
    "peak_mem_mib",
    "wall_s",
)


@dataclass
class CompareConfig:
    """What to compare and how; lives under ``compare:`` in a comparison YAML."""

    task: str = "lm"  # recipes/compare.py's switch: "multimodal" selects moekit.multimodal.compare instead
    seeds: int = 1  # runs per model, seeds train.seed, train.seed + 1, ...
    param_matched: bool = False  # also train a dense model with the MoE model's total parameters
    budget: str = "tokens"  # one of BUDGETS: equal tokens, or equal training FLOPs (steps scale per model)
    max_flops_mismatch: float = 0.02  # refuse MoE/dense pairs whose active FLOPs differ by more
    allow_mismatch: bool = False
    variants: list[str] = field(default_factory=list)  # extra MoE runs: "moe.num_experts=16 moe.top_k=4"
    sweep: str | None = None  # "num_experts=1,4,8,16" (also top_k, capacity_factor, router, ...)
    prompt: str = "**ROMEO**\n"
    sample_tokens: int = 160

    def __post_init__(self) -> None:
        if self.task != "lm":
            raise ValueError(
                f"CompareConfig.task={self.task!r} is invalid here: this config is the language-model comparison "
                f"('lm'); recipes/compare.py sends 'multimodal' to moekit.multimodal.compare (allowed: {TASKS})"
            )
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"CompareConfig.seeds={self.seeds!r} is invalid: must be an int >= 1")
        if self.budget not in BUDGETS:
            raise ValueError(f"CompareConfig.budget={self.budget!r} is invalid: allowed values are {BUDGETS}")
        if not 0 <= self.max_flops_mismatch < 1:
            raise ValueError(f"CompareConfig.max_flops_mismatch={self.max_flops_mismatch} must be in [0, 1)")
        if self.sweep is not None:
            parse_sweep(self.sweep)


@dataclass
class ComparisonConfig:
    """A comparison YAML: the MoE base run (``model`` must have ``moe``) plus the ``compare`` section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def __post_init__(self) -> None:
        if self.model.moe is None:
            raise ValueError(
                "ComparisonConfig.model.moe is None: the comparison starts from a MoE model and derives its dense "
                "twin; set model.moe (e.g. model.moe.num_experts=8)"
            )
        RunConfig(self.model, self.train, self.data)  # seq_len vs max_seq_len checks

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@dataclass
class RunSpec:
    name: str  # model name shared by its seeds, e.g. "dense" or "moe-8x2"
    kind: str  # "dense" | "moe"
    seed: int
    run: RunConfig
    sweep_value: Any = None

    @property
    def folder(self) -> str:
        return f"{self.name}-seed{self.seed}"


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("moe.")
    allowed = [f.name for f in dataclasses.fields(MoEConfig)]
    if not sep or key not in allowed or not values.strip():
        raise ValueError(f"CompareConfig.sweep={text!r} must look like 'num_experts=1,4,8' with a key from {allowed}")
    return key, [yaml.safe_load(v) for v in values.split(",")]


def moe_name(moe: MoEConfig) -> str:
    name = f"moe-{moe.num_experts}x{moe.top_k}"
    if moe.num_shared_experts:
        name += f"+{moe.num_shared_experts}s"
    return name


def _with_moe(model: ModelConfig, **changes: Any) -> ModelConfig:
    """Change MoE fields at fixed active compute: top_k * d_expert is held constant."""
    base = model.moe
    assert base is not None
    new = dict(changes)
    if "num_experts" in new and "top_k" not in new:
        new["top_k"] = min(base.top_k, new["num_experts"])
    if "top_k" in new and "d_expert" not in new:
        new["d_expert"] = max(1, round(base.top_k * base.d_expert / new["top_k"]))
    if new.get("router") == "switch":
        new.setdefault("top_k", 1)
        new["d_expert"] = base.top_k * base.d_expert // new["top_k"]
    if new.get("router") == "expert_choice" and base.capacity_factor is None and "capacity_factor" not in new:
        new["capacity_factor"] = 1.0
    return dataclasses.replace(model, moe=dataclasses.replace(base, **new))


def _apply_overrides(model: ModelConfig, text: str) -> ModelConfig:
    tree = config_to_dict(model)
    for item in text.split():
        key, _, raw = item.partition("=")
        set_dotted(ModelConfig, tree, key.removeprefix("model."), yaml.safe_load(raw))
    return ModelConfig.from_dict(tree)


def plan_runs(cfg: ComparisonConfig) -> list[RunSpec]:
    """Every (model, seed) run of the comparison, dense twin first; checks the compute matching."""
    c = cfg.compare
    seq = cfg.data.seq_len
    models: list[tuple[str, str, ModelConfig, Any]] = []
    if c.sweep:
        key, values = parse_sweep(c.sweep)
        for v in values:
            models.append((f"moe-{key}={v}", "moe", _with_moe(cfg.model, **{key: v}), v))
    else:
        models.append((moe_name(cfg.model.moe), "moe", cfg.model, None))
        for text in c.variants:
            m = _apply_overrides(cfg.model, text)
            if m.moe is None:
                raise ValueError(f"CompareConfig.variants entry {text!r} removes the MoE; variants must stay MoE")
            name = moe_name(m.moe)
            if any(name == n for n, *_ in models):
                name = f"{name}[{text}]"
            models.append((name, "moe", m, None))
    twin = dense_twin(cfg.model, seq)
    models.insert(0, ("dense", "dense", twin, None))
    if c.param_matched:
        models.append(("dense-param-matched", "dense", param_matched_twin(cfg.model), None))
    if not c.allow_mismatch:
        ref = describe("dense", twin, seq)
        for name, kind, m, _ in models:
            if kind == "moe":
                check_matched(describe(name, m, seq), ref, "flops_per_token", c.max_flops_mismatch)

    tokens_per_step = cfg.train.batch_size * seq
    budget_flops = 3 * flops_per_token(cfg.model, seq) * tokens_per_step * cfg.train.steps
    specs = []
    for name, kind, m, value in models:
        train = cfg.train
        if c.budget == "flops":
            steps = max(1, round(budget_flops / (3 * flops_per_token(m, seq) * tokens_per_step)))
            train = dataclasses.replace(train, steps=steps, warmup_steps=min(train.warmup_steps, steps))
        for s in range(c.seeds):
            run = RunConfig(m, dataclasses.replace(train, seed=cfg.train.seed + s), cfg.data)
            specs.append(RunSpec(name, kind, cfg.train.seed + s, run, value))
    return specs


def matching_table(specs: list[RunSpec]) -> list[dict[str, Any]]:
    """One row per model: params total/active and FLOPs per token (what the comparison holds equal)."""
    seen: dict[str, dict[str, Any]] = {}
    for s in specs:
        if s.name not in seen:
            pc = count_params(s.run.model)
            seen[s.name] = dict(
                name=s.name,
                kind=s.kind,
                params_total=pc.total,
                params_active=pc.active,
                flops_per_token=flops_per_token(s.run.model, s.run.data.seq_len),
                steps=s.run.train.steps,
            )
    return list(seen.values())


def data_digest(run: RunConfig, num_items: int) -> str:
    """Hash of every global batch's window indices: equal digests mean identical data order."""
    sampler = StepSampler(num_items, run.train.batch_size, run.train.seed)
    h = hashlib.sha256()
    for step in range(run.train.steps):
        h.update(sampler.indices(step).numpy().tobytes())
    return h.hexdigest()[:16]


class PeakMemory:
    """Peak memory of a run: CUDA's allocator peak, or on CPU the process RSS peak above its start value."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device, self.interval = device, interval_s
        self._stop = threading.Event()
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        proc = psutil.Process()
        self._base = proc.memory_info().rss

        def watch() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, proc.memory_info().rss - self._base)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mib(self) -> float:
        return self.peak / 2**20


_write_json = atomic_write_json  # kept for the report modules until the experiment layer lands


def run_one(
    spec: RunSpec, run_dir: Path, prompt: str, sample_tokens: int, expect_processes: int | None = None
) -> dict[str, Any]:
    """Train one run (resuming if it was interrupted) and return its summary row; rank 0 writes result.json."""
    from moekit.core.generate import sample_text
    from moekit.experiment.lm import build_lm_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    resume = (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").iterdir())
    trainer, tok = build_lm_trainer(spec.run, run_dir, resume=resume, expect_processes=expect_processes)
    acc = trainer.accelerator
    t0 = time.perf_counter()
    with PeakMemory(acc.device) as mem:
        summary = trainer.train()
    wall = time.perf_counter() - t0
    sample = ""
    full = trainer.gather_full_model()  # collective (expert-parallel shards); the model on the main process
    if full is not None:
        sample = sample_text(full, tok, [prompt], max_new_tokens=sample_tokens, seed=0)[0]
    del full
    fpt = flops_per_token(spec.run.model, spec.run.data.seq_len)
    pc = count_params(spec.run.model)
    row = dict(
        name=spec.name,
        kind=spec.kind,
        seed=spec.seed,
        params_total=pc.total,
        params_active=pc.active,
        flops_per_token=fpt,
        tokens_trained=summary["tokens_seen"],
        train_flops=3 * fpt * summary["tokens_seen"],
        final_val_loss=summary.get("val_loss"),
        val_bits_per_byte=summary.get("val_bpb"),
        tokens_per_s=summary.get("mean_tokens_per_s"),
        peak_mem_mib=round(mem.mib, 1),
        wall_s=round(summary.get("train_seconds", wall), 2),
        sweep_value=spec.sweep_value,
        data_digest=data_digest(spec.run, len(trainer.train_data)),
        sample=sample,
    )
    return finish_run(acc, run_dir, row)


def finish_run(acc: Any, run_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Mark a comparison run done (the main process writes ``result.json``), finish its trackers and wait for
    every rank; returns ``row``. Not ``Trainer.close()``: under a launcher the next run reuses the process
    group, which the caller destroys at the end."""
    if acc.is_main_process:
        _write_json(run_dir / RESULT_FILE, row)
    for tracker in acc.trackers:
        tracker.finish()
    acc.wait_for_everyone()
    return row


def run_comparison(
    cfg: ComparisonConfig, out_dir: str | os.PathLike, expect_processes: int | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) every planned run under ``out_dir/runs``; returns the summary rows in plan order."""
    out = Path(out_dir)
    specs = plan_runs(cfg)
    rows = []
    for spec in specs:
        run_dir = out / "runs" / spec.folder
        done = run_dir / RESULT_FILE
        if done.is_file():
            saved = run_dir / "config.yaml"
            if saved.is_file() and yaml.safe_load(saved.read_text()) != spec.run.to_dict():
                raise ValueError(
                    f"{run_dir} finished with a different config than this comparison plans for it; "
                    "use a new --out folder (or delete that run) instead of mixing results"
                )
            rows.append(json.loads(done.read_text()))
            print(f"[compare] {spec.folder}: finished earlier, reusing {done}", flush=True)
            continue
        rows.append(run_one(spec, run_dir, cfg.compare.prompt, cfg.compare.sample_tokens, expect_processes))
    return rows
