"""The comparison's runner, for every task: train (or reuse) each planned run, then write the report.

Runs train side by side in ``compare.workers`` fresh spawned processes (``compare.threads`` torch threads
each): on a small shared CPU two single-threaded processes beat one two-threaded one by a wide margin. Under a
launcher (``expect_processes`` > 1) all ranks train the runs one after another, together. A finished run
(``result.json``) is reused and an interrupted one resumes, only if its ``config.yaml`` is the plan's. A run
that diverges (``TrainingDiverged``) is a result, not a crash: its row says ``status: diverged``."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moekit.core.files import atomic_write_json
from moekit.core.guard import TrainingDiverged
from moekit.core.meter import num_threads, peak_memory
from moekit.core.run_folder import RunFolderError, migrate_placement, saved_config_diffs
from moekit.experiment.adapter import Row, RunSpec
from moekit.experiment.plan import TASKS, CompareConfig, Comparison, matching_table, plan_runs
from moekit.experiment.report import SUMMARY_FILE, divergence_text, headline, matching_lines, write_report
from moekit.experiment.verdict import comparison_verdicts, verdicts_sentence

RESULT_FILE = "result.json"


def check_compare_out(out: str | os.PathLike) -> Path:
    """A comparison's output folder: new, empty, or a comparison's own (``summary.json`` or ``runs/``), which a
    rerun reuses and resumes. Any other folder is refused: report.md, summary.json, plots and runs/ would land
    next to its files (``--out .``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / SUMMARY_FILE).is_file() or (out / "runs").is_dir()):
        raise RunFolderError(
            f"--out {out} is not empty and holds no comparison (no {SUMMARY_FILE}, no runs/): choose a new or empty "
            "folder, or the folder of the comparison to resume"
        )
    return out


def check_planned(spec: RunSpec, run_dir: Path) -> None:
    """Refuse a run folder trained (or started) with another config than the plan's: resuming or reusing it
    would mix configs within one comparison. Placement (the ``parallel`` section) may differ; a folder written
    before placement left the model section is read migrated."""
    moe_path = f"{TASKS[spec.task].decoder_key}.moe"
    migrate = functools.partial(migrate_placement, moe_path=moe_path)
    diffs = [d for d in saved_config_diffs(spec.run, run_dir, migrate) if not d[0].startswith("parallel.")]
    if diffs:
        (key, old, new), more = diffs[0], f" (and {len(diffs) - 1} more field(s))" if len(diffs) > 1 else ""
        raise RunFolderError(
            f"{run_dir} was trained with a different config than this comparison plans for it: {key} is {old!r} "
            f"there, {new!r} in the plan{more}; use a new output folder (or delete that run) instead of mixing "
            "configs within one comparison"
        )


def run_one(
    spec: RunSpec,
    run_dir: Path,
    compare: CompareConfig,
    facts: Row,
    expect_processes: int | None = None,
    state: Any = None,
) -> Row:
    """Train one run (resuming if it was interrupted) on ``compare.threads`` torch threads and return its row;
    the main process writes result.json. ``state``: the adapter's ``prepare`` value, None in a worker."""
    task = TASKS[spec.task]
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").iterdir())
    t0 = time.perf_counter()
    with num_threads(compare.threads):
        trainer = task.build_trainer(spec.run, run_dir, resume=resume, expect_processes=expect_processes, state=state)
        with peak_memory(trainer.accelerator.device) as mib:
            try:
                summary, diverged = trainer.train(), None
            except TrainingDiverged as e:  # caught here, in the worker: the parent gets a plain row
                summary, diverged = {}, e
        row = {"name": spec.name, "kind": spec.kind, "seed": spec.seed, **facts, "sweep_value": spec.sweep_value}
        del row["steps"]
        row.update(status="finished" if diverged is None else "diverged", divergence=None)
        row.update(tokens_trained=summary.get("tokens_seen"), final_val_loss=summary.get("val_loss"))
        row.update(tokens_per_s=summary.get("mean_tokens_per_s"), peak_mem_mib=round(mib[0], 1))
        row.update(wall_s=round(summary.get("train_seconds", time.perf_counter() - t0), 2))
        row.update(data_digest=summary.get("data_digest"))  # recorded by the training loop as it fetched batches
        if diverged is None:
            row.update(task.results(trainer, summary, spec, facts, compare))
        else:
            ckpt = diverged.last_good_checkpoint
            row.update(train_flops=None, divergence=dict(step=diverged.step, reason=diverged.reason))
            row["divergence"]["last_good_checkpoint"] = None if ckpt is None else str(ckpt)
            print(f"[compare] {spec.folder}: {diverged}", flush=True)
    row["run_wall_s"] = round(time.perf_counter() - t0, 2)  # setup, training, evaluation, sampling
    acc = trainer.accelerator
    if acc.is_main_process:
        atomic_write_json(run_dir / RESULT_FILE, row)
    for tracker in acc.trackers:  # not Trainer.close(): under a launcher the next run reuses the process group
        tracker.finish()
    acc.wait_for_everyone()
    return row


def _final(row: Row) -> str:
    loss = row.get("final_val_loss")
    return f"val {loss:.4f}" if isinstance(loss, float) else str(row.get("status", "?"))


def run_comparison(
    cmp: Comparison,
    out_dir: str | os.PathLike,
    dry_run: bool = False,
    verbose: bool = True,
    expect_processes: int | None = None,
) -> list[Row]:
    """Check ``out_dir`` (:func:`check_compare_out`), plan, print the matching, train (or reuse) every run under
    ``out_dir/runs``, write the report; returns the rows in plan order (none for ``dry_run``). ``verbose=False``
    silences the plan (ranks other than 0 under a launcher, before any process group exists);
    ``expect_processes``: the launcher's world size."""
    say = print if verbose else (lambda *a, **k: None)
    out, c, task = check_compare_out(out_dir), cmp.compare, cmp.task
    t0, load0 = time.perf_counter(), _loadavg()
    specs = plan_runs(cmp)
    with num_threads(c.threads):
        state = task.prepare(cmp.base)
        matching = matching_table(specs, state)
    facts = {m["name"]: m for m in matching}
    say("matching (what the comparison holds equal):\n" + "\n".join(matching_lines(matching, task)))
    if c.dense_overrides or c.moe_overrides:
        say(f"per-model train overrides: dense {c.dense_overrides or 'none'}, MoE {c.moe_overrides or 'none'}")
    say(f"{len(specs)} runs: " + ", ".join(s.folder for s in specs), flush=True)
    if dry_run:
        return []
    rows: dict[str, Row] = {}
    for spec in specs:
        check_planned(spec, out / "runs" / spec.folder)
        if (done := out / "runs" / spec.folder / RESULT_FILE).is_file():
            rows[spec.folder] = json.loads(done.read_text())
            say(f"[compare] {spec.folder}: finished earlier, reusing {done}", flush=True)
    todo = [s for s in specs if s.folder not in rows]
    launched = expect_processes is not None and expect_processes > 1
    if c.workers > 1 and len(todo) > 1 and launched:  # every rank would spawn workers claiming its rank
        say(f"[compare] {expect_processes} processes launched: runs train one after another (workers ignored)")
    if c.workers > 1 and len(todo) > 1 and not launched:
        # One fresh process per run: a reused worker keeps the previous run's freed heap in its RSS, which
        # would make the later runs' peak memory (RSS above the start value) read far too low.
        ctx = multiprocessing.get_context("spawn")  # fork would copy this process's threads and torch state
        with concurrent.futures.ProcessPoolExecutor(min(c.workers, len(todo)), ctx, max_tasks_per_child=1) as pool:
            futures = {pool.submit(run_one, s, out / "runs" / s.folder, c, facts[s.name]): s for s in todo}
            # One bar for the whole comparison: the workers' own per-step bars would interleave.
            with tqdm(total=len(todo), desc="runs", unit="run", disable=not verbose) as bar:
                for fut in concurrent.futures.as_completed(futures):
                    row = rows[futures[fut].folder] = fut.result()
                    bar.set_postfix_str(f"{row['name']} seed {row['seed']}: {_final(row)}")
                    bar.update()
    else:
        for s in todo:
            rows[s.folder] = run_one(s, out / "runs" / s.folder, c, facts[s.name], expect_processes, state)
    ordered = [rows[s.folder] for s in specs]
    timing = dict(wall_s=round(time.perf_counter() - t0, 1), loadavg_start=load0, loadavg_end=_loadavg())
    timing.update(workers=c.workers, threads=c.threads, cpus=os.cpu_count())
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:  # every rank trained; one writes the report
        report = write_report(out, cmp, specs, ordered, matching, timing)
        diverged = "".join(f"{divergence_text(r)}\n" for r in ordered if r.get("divergence"))
        verdict = verdicts_sentence(comparison_verdicts(ordered, task.verdict_fields))
        print(
            f"\n{diverged}{headline(ordered, task, c.max_flops_mismatch)}\nreport: {report}\n{verdict}", flush=True
        )  # the verdict last
    return ordered


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None  # not on Windows
