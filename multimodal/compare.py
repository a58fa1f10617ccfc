"""Dense vs MoE multimodal models at matched active compute: plan the runs, train them identically, report.

The MoE base config (``model.lm.moe`` set) gets a dense twin whose decoder has the same active FLOPs per
token (``moekit.moe.matching.dense_twin``: the SwiGLU width is chosen to match router + top-k experts).
The image and audio encoders and projectors are identical in both, so matching the decoder's active
FLOPs matches the totals; the report states both, measured on the training mixture (FLOPs per sample:
decoder on real tokens, each image, each clip at its own length). Every run sees the same samples in the
same order for a given seed, the same initial-weight seed, optimizer, schedule and budget.

Runs can train side by side (``compare.workers`` processes, ``compare.threads`` torch threads each): on a
small, shared CPU two single-threaded processes beat one two-threaded process by a wide margin (the
models are small, and intra-op threads spin on each other when the cores are contended). A finished run
leaves ``result.json`` and is not redone; an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.core.accounting import flops_per_token
from moekit.moe.compare import RESULT_FILE, PeakMemory, _apply_overrides, data_digest, finish_run, moe_name
from moekit.moe.matching import check_matched, dense_twin, describe
from moekit.multimodal.report import headline_multimodal, write_multimodal_report
from moekit.multimodal.tasks import DigitTasks
from moekit.multimodal.train import (
    CANDIDATES,
    MultimodalRunConfig,
    SampleCollate,
    TrainableMultimodalLM,
    build_multimodal_trainer,
    flops_profile,
    load_run_tasks,
)


@dataclass
class MMCompareConfig:
    """The ``compare`` section of a multimodal comparison YAML."""

    task: str = "multimodal"  # the comparison recipe's switch; this config is the multimodal one
    seeds: int = 1  # runs per model: seeds train.seed, train.seed + 1, ...
    max_flops_mismatch: float = 0.02  # refuse MoE/dense pairs whose decoder active FLOPs differ by more
    allow_mismatch: bool = False
    variants: list[str] = field(default_factory=list)  # extra MoE runs: "moe.modality_experts=[3,2,2]"
    workers: int = 1  # runs trained at the same time, each in its own process
    threads: int | None = None  # torch intra-op threads per run; None = torch's default

    def __post_init__(self) -> None:
        if self.task != "multimodal":
            raise ValueError(f"MMCompareConfig.task={self.task!r} is invalid: this config is for 'multimodal'")
        for name, low in (("seeds", 1), ("workers", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"MMCompareConfig.{name}={value!r} is invalid: must be an int >= {low}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"MMCompareConfig.threads={self.threads!r} is invalid: must be an int >= 1 or None")
        if not 0 <= self.max_flops_mismatch < 1:
            raise ValueError(f"MMCompareConfig.max_flops_mismatch={self.max_flops_mismatch} must be in [0, 1)")


@dataclass
class MultimodalComparisonConfig(MultimodalRunConfig):
    """A multimodal run config (the MoE base, ``model.lm.moe`` set) plus the ``compare`` section."""

    compare: MMCompareConfig = field(default_factory=MMCompareConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model.lm.moe is None:
            raise ValueError(
                "MultimodalComparisonConfig.model.lm.moe is None: the comparison starts from a MoE decoder and "
                "derives its dense twin; set model.lm.moe (e.g. model.lm.moe.num_experts=8)"
            )

    def run_config(self) -> MultimodalRunConfig:
        return MultimodalRunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MultimodalRunConfig)})


@dataclass
class MMRunSpec:
    name: str  # "dense", "moe-8x2", ...
    kind: str  # "dense" | "moe"
    seed: int
    run: MultimodalRunConfig

    @property
    def folder(self) -> str:
        return f"{self.name}-seed{self.seed}"


def plan_multimodal_runs(cfg: MultimodalComparisonConfig) -> list[MMRunSpec]:
    """Every (model, seed) run, dense twin first; refuses decoders whose active FLOPs are not matched."""
    c, lm = cfg.compare, cfg.model.lm
    seq = lm.max_seq_len
    models = [(moe_name(lm.moe), "moe", lm)]
    for text in c.variants:
        m = _apply_overrides(lm, text)
        if m.moe is None:
            raise ValueError(f"MMCompareConfig.variants entry {text!r} removes the MoE; variants must stay MoE")
        name = moe_name(m.moe)
        models.append((f"{name}[{text}]" if any(name == n for n, *_ in models) else name, "moe", m))
    twin = dense_twin(lm, seq)
    models.insert(0, ("dense", "dense", twin))
    if not c.allow_mismatch:
        ref = describe("dense", twin, seq)
        for name, kind, m in models:
            if kind == "moe":
                check_matched(describe(name, m, seq), ref, "flops_per_token", c.max_flops_mismatch)
    base = cfg.run_config()
    specs = []
    for name, kind, m in models:
        for s in range(c.seeds):
            run = dataclasses.replace(
                base,
                model=dataclasses.replace(base.model, lm=m),
                train=dataclasses.replace(base.train, seed=base.train.seed + s),
            )
            specs.append(MMRunSpec(name, kind, base.train.seed + s, run))
    return specs


def model_facts(run: MultimodalRunConfig, tasks: DigitTasks) -> dict[str, Any]:
    """Parameters (decoder total/active, encoders + projectors) and forward FLOPs: the decoder's active
    FLOPs per token at ``max_seq_len`` (what is matched) and the mixture's FLOPs per sample and per token."""
    model = TrainableMultimodalLM(run.model)
    rep = model.report()
    prof = flops_profile(model, tasks, SampleCollate(model, run.data.pad_to_multiple_of), run.train.batch_size)
    media = rep.params["total"] - rep.params["lm_total"]
    return dict(
        params_total=rep.params["total"],
        params_active=rep.params["active"],
        lm_params_total=rep.params["lm_total"],
        lm_params_active=rep.params["lm_active"],
        encoder_params=media,
        lm_flops_per_token=flops_per_token(run.model.lm, run.model.lm.max_seq_len),
        flops_per_sample=prof["per_sample"],
        flops_per_token=prof["per_token"]["total"],
        steps=run.train.steps,
    )


def multimodal_matching_table(specs: list[MMRunSpec], tasks: DigitTasks) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for s in specs:
        if s.name not in seen:
            seen[s.name] = dict(name=s.name, kind=s.kind, **model_facts(s.run, tasks))
    return list(seen.values())


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block (None: unchanged), restored afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_one_multimodal(
    spec: MMRunSpec, run_dir: Path, tasks: DigitTasks | None = None, expect_processes: int | None = None
) -> dict[str, Any]:
    """Train one run (resuming if it was interrupted) and return its summary row; writes result.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks if tasks is not None else load_run_tasks(spec.run)
    resume = (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").iterdir())
    t0 = time.perf_counter()
    trainer = build_multimodal_trainer(spec.run, run_dir, resume=resume, tasks=tasks, expect_processes=expect_processes)
    acc = trainer.accelerator
    with PeakMemory(acc.device) as mem:
        summary = trainer.train()
    facts = model_facts(spec.run, tasks)
    val_loss = summary.get("val_loss")
    row = dict(
        name=spec.name,
        kind=spec.kind,
        seed=spec.seed,
        **{k: v for k, v in facts.items() if k != "steps"},
        tokens_trained=summary["tokens_seen"],
        samples_trained=summary["step"] * spec.run.train.batch_size,
        train_flops=3 * facts["flops_per_sample"]["total"] * summary["step"] * spec.run.train.batch_size,
        final_val_loss=val_loss,
        val_bits_per_byte=None if val_loss is None else val_loss / math.log(2),  # byte targets
        val_text_loss=summary.get("text_loss"),
        **{k: v for k, v in summary.items() if k.endswith("_acc") or (k.endswith("_loss") and k[:-5] in CANDIDATES)},
        tokens_per_s=summary.get("mean_tokens_per_s"),
        peak_mem_mib=round(mem.mib, 1),
        wall_s=round(summary.get("train_seconds", 0.0), 2),
        run_wall_s=round(time.perf_counter() - t0, 2),  # this call: setup, training, evaluation
        data_digest=data_digest(spec.run, len(trainer.train_data)),
        routing=trainer.last_metrics.get("routing"),
    )
    return finish_run(acc, run_dir, row)


def _worker_init(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _worker_run(spec: MMRunSpec, run_dir: str) -> dict[str, Any]:
    return run_one_multimodal(spec, Path(run_dir))


def run_multimodal_comparison(
    cfg: MultimodalComparisonConfig,
    out_dir: str | os.PathLike,
    dry_run: bool = False,
    verbose: bool = True,
    expect_processes: int | None = None,
) -> list[dict[str, Any]]:
    """Plan, print the matching, train (or reuse) every run under ``out_dir/runs`` and write the report.

    Returns the summary rows in plan order (empty for ``dry_run``). ``verbose=False`` silences the plan (for
    ranks other than 0 under a launcher, before any process group exists); ``expect_processes`` see
    ``moekit.core.train.Trainer``.
    """
    say = print if verbose else (lambda *a, **k: None)
    out = Path(out_dir)
    c = cfg.compare
    t0, load0 = time.perf_counter(), _loadavg()
    specs = plan_multimodal_runs(cfg)
    with num_threads(c.threads):
        tasks = load_run_tasks(cfg.run_config())
        matching = multimodal_matching_table(specs, tasks)
    say("matching (decoder active FLOPs/token at max_seq_len; FLOPs per sample on the training mixture):")
    for m in matching:
        fs = m["flops_per_sample"]
        say(
            f"  {m['name']:<24} {m['kind']:<6} params {m['params_total']:>10,} (decoder {m['lm_params_active']:,} "
            f"active of {m['lm_params_total']:,}) decoder {m['lm_flops_per_token']:>10,} FLOPs/token; per sample "
            f"decoder {fs['lm'] / 1e6:.2f} + image {fs['image'] / 1e6:.2f} + audio {fs['audio'] / 1e6:.2f} = "
            f"{fs['total'] / 1e6:.2f} MFLOPs"
        )
    say(f"{len(specs)} runs: " + ", ".join(s.folder for s in specs), flush=True)
    if dry_run:
        return []
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        done = out / "runs" / spec.folder / RESULT_FILE
        if done.is_file():
            rows[spec.folder] = json.loads(done.read_text())
            say(f"[compare] {spec.folder}: finished earlier, reusing {done}", flush=True)
        else:
            todo.append(spec)
    launched = expect_processes is not None and expect_processes > 1
    if c.workers > 1 and len(todo) > 1 and launched:  # every rank would spawn workers claiming its rank
        say(f"[compare] {expect_processes} processes launched: runs train one after another (workers ignored)")
    if c.workers > 1 and len(todo) > 1 and not launched:
        ctx = multiprocessing.get_context("spawn")
        # One fresh process per run: a reused worker keeps the previous run's freed heap in its RSS, which
        # would make the later runs' peak memory (RSS above the start value) read far too low.
        with concurrent.futures.ProcessPoolExecutor(
            min(c.workers, len(todo)),
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(c.threads,),
            max_tasks_per_child=1,
        ) as pool:
            futures = {s.folder: pool.submit(_worker_run, s, str(out / "runs" / s.folder)) for s in todo}
            for folder, fut in futures.items():
                rows[folder] = fut.result()
    else:
        with num_threads(c.threads):
            for spec in todo:
                rows[spec.folder] = run_one_multimodal(spec, out / "runs" / spec.folder, tasks, expect_processes)
    ordered = [rows[s.folder] for s in specs]
    timing = {"wall_s": round(time.perf_counter() - t0, 1), "loadavg_start": load0, "loadavg_end": _loadavg()}
    timing.update(workers=c.workers, threads=c.threads, cpus=os.cpu_count())
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # every rank trained; one writes the report
        report = write_multimodal_report(out, specs, ordered, matching, cfg.to_dict(), timing)
        print(f"\n{headline_multimodal(ordered)}\nreport: {report}")
    return ordered


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
