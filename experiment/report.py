"""The comparison's outputs, for every task: summary.json, PNG plots and report.md, from the runs' rows and
their metrics.jsonl. The task adapter adds its columns, headline sentence and sections."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import yaml

from moekit.core.files import atomic_write_json, atomic_write_text
from moekit.core.layering import config_to_dict
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, best_moe, cell, group_rows, md_table, mean_spread
from moekit.experiment.matching import relative_mismatch
from moekit.experiment.plan import CompareConfig, Comparison, parse_sweep
from moekit.experiment.plots import report_plots
from moekit.experiment.scaling import scaling_section
from moekit.experiment.verdict import comparison_verdicts, exclusion_reason, verdict_cells, verdicts_sentence

# every row field summary.json keeps, whatever the task (the adapter adds its own summary_fields)
SUMMARY_FILE = "summary.json"  # in the comparison folder; the runner recognises a comparison by it
SUMMARY_FIELDS = tuple(
    "name kind seed params_total params_active flops_per_token tokens_trained train_flops final_val_loss "
    "tokens_per_s peak_mem_mib wall_s data_digest status divergence".split()
)
_MEANS = (("tokens/s", "tokens_per_s"), ("peak MiB", "peak_mem_mib"), ("train s", "wall_s"))


def diverged(row: Row) -> bool:
    return row.get("status") == "diverged"


def divergence_text(row: Row) -> str:
    d = row["divergence"]
    return f"{row['name']}-seed{row['seed']} diverged at step {d['step']}: {d['reason']}"


def digest_checks(rows: list[Row]) -> list[Row]:
    """Per seed and MoE model: is the data digest its training loop recorded equal to the dense twin's?

    The digest chains every consumed batch, so it can only be compared between runs of the same length:
    ``equal`` is None, with the reason in ``note``, where either run diverged (its loop stopped early) or the
    two trained different token counts (``compare.budget=flops`` gives each model its own step count)."""
    dense = {r["seed"]: r for r in rows if r["name"] == "dense"}
    out = []
    for r in (r for r in rows if r["kind"] == "moe" and r["seed"] in dense):
        twin = dense[r["seed"]]
        d, m = twin.get("data_digest"), r.get("data_digest")
        equal, note = d is not None and d == m, None
        if diverged(r) or diverged(twin):
            equal, note = None, "a run diverged"
        elif r.get("tokens_trained") != twin.get("tokens_trained"):
            equal, note = None, f"different budgets ({r.get('tokens_trained')} vs {twin.get('tokens_trained')} tokens)"
        out.append(dict(model=r["name"], seed=r["seed"], dense=d, moe=m, equal=equal, note=note))
    return out


def headline(
    rows: list[Row], task: TaskAdapter | None = None, max_flops_mismatch: float = CompareConfig.max_flops_mismatch
) -> str:
    """One sentence: the best MoE vs the FLOP-matched dense twin, the measured difference and spread, then the
    task's own sentence (e.g. held-out accuracy). Their active compute reads "matched" when their FLOPs per
    token differ by at most ``max_flops_mismatch`` (the comparison's ``compare.max_flops_mismatch``), and both
    token counts are given where they differ (``compare.budget=flops``). The runs the verdicts exclude
    (diverged, or without a finite final val loss: :func:`~moekit.experiment.verdict.exclusion_reason`) are
    left out, so the headline's means cover the verdict's seeds (the verdicts name the excluded ones)."""
    rows = [r for r in rows if exclusion_reason(r, "final_val_loss") is None]
    groups = group_rows(rows)
    if "dense" not in groups or best_moe(groups) is None:
        return f"No {'MoE run' if 'dense' in groups else 'dense baseline'} finished training."
    # Paired by seed (same data order and init seed): the best MoE is chosen on, and every number below comes
    # from, the seeds both it and the dense twin finished, so the means and their difference describe the same runs.
    dense_seeds = {r["seed"] for r in groups["dense"]}
    paired_groups = {n: [r for r in rs if r["seed"] in dense_seeds] for n, rs in groups.items() if n != "dense"}
    if (best := best_moe({n: rs for n, rs in paired_groups.items() if rs})) is None:
        return "No seed finished training for both the dense twin and any MoE model: nothing to compare."
    moe = paired_groups[best]
    dense = [r for r in groups["dense"] if r["seed"] in {r["seed"] for r in moe}]
    (d_mean, d_sd), (m_mean, m_sd) = (mean_spread([r["final_val_loss"] for r in g]) for g in (dense, moe))
    by_seed = {r["seed"]: r["final_val_loss"] for r in dense}
    diffs = [r["final_val_loss"] - by_seed[r["seed"]] for r in moe]
    diff, diff_sd = mean_spread(diffs)
    (m_flops, d_flops), (m_tokens, d_tokens) = ((moe[0][k], dense[0][k]) for k in ("flops_per_token", "tokens_trained"))
    flops, gap = f"{m_flops / 1e6:.2f} vs {d_flops / 1e6:.2f} MFLOPs/token", relative_mismatch(m_flops, d_flops)
    compute = (  # "matched" only within the tolerance the plan checks (compare.allow_mismatch can waive it)
        f"matched active compute ({flops})"
        if gap <= max_flops_mismatch
        else f"active compute {flops} (not matched: {gap:.2%} apart, beyond compare.max_flops_mismatch)"
    )
    tokens = f"{m_tokens:,} training tokens"
    if m_tokens != d_tokens:  # compare.budget=flops: each model trains its own step count
        tokens = f"{m_tokens:,} vs {d_tokens:,} training tokens (MoE vs dense twin)"
    head = f"At {compute} and {tokens}, the {best} model"
    extra = f" {task.headline(dense + moe)}".rstrip() if task is not None else ""
    if len(diffs) < 2:  # one seed has no spread: report the gap without a verdict
        return (
            f"{head} reached a {'lower' if diff < 0 else 'higher'} validation loss than its dense twin on a single "
            f"paired seed: {m_mean:.4f} vs {d_mean:.4f} nats/byte ({diff:+.4f}); one seed cannot separate that from "
            f"seed-to-seed noise (rerun with more seeds, e.g. compare.seeds=3).{extra}"
        )
    # No verdict word here: the verdict (t-interval over paired seeds) is the sentence before this one.
    return (
        f"{head} reached validation loss {m_mean:.4f} ± {m_sd:.4f} vs the dense twin's {d_mean:.4f} ± {d_sd:.4f} "
        f"nats/byte, a paired difference of {diff:+.4f} ± {diff_sd:.4f} (sd over {len(diffs)} paired seeds), "
        f"n={len(diffs)} seeds.{extra}"
    )


def write_report(
    out_dir: str | Path, cmp: Comparison, specs: list[RunSpec], rows: list[Row], matching: list[Row], timing: Row
) -> Path:
    """Write summary.json, the plots and report.md into ``out_dir``; returns the report path."""
    out, task, c = Path(out_dir), cmp.task, cmp.compare
    out.mkdir(parents=True, exist_ok=True)
    runs = [{k: r.get(k) for k in SUMMARY_FIELDS + task.summary_fields} for r in rows]
    verdict_rows, digests = comparison_verdicts(rows, task.verdict_fields), digest_checks(rows)
    summary = dict(task=task.name, verdicts=verdict_rows, data_digests=digests, runs=runs)
    scaling_lines = []
    if c.scaling is not None:
        summary["scaling"], scaling_lines = scaling_section(rows, out)
    atomic_write_json(out / SUMMARY_FILE, summary)
    plots = report_plots(specs, rows, out, parse_sweep(c.sweep)[0] if c.sweep else None)

    first = verdicts_sentence(verdict_rows) or "No verdict: no MoE model paired with the dense twin."
    lines = [
        f"# {task.title}",
        "",
        f"**Verdict.** {first}",
        "",
        f"**Result.** {headline(rows, task, c.max_flops_mismatch)}",
        "",
    ]
    if verdict_rows:
        heads = ["model", "metric", "moe - dense", "95% CI", "paired seeds", "verdict"]
        lines += md_table(heads, [verdict_cells(v) for v in verdict_rows]) + [""]
    if lost := [f"- {divergence_text(r)}" for r in rows if diverged(r)]:
        lines += ["**Diverged runs** (no final metrics; the verdicts skip their seeds):", "", *lost, ""]
    lines += ["## What was held equal", "", *matching_lines(matching, task), ""]
    if c.dense_overrides or c.moe_overrides:
        lines += [
            f"Not equal by design (each model's own tuned settings): dense runs {c.dense_overrides or 'base'}, MoE "
            f"runs {c.moe_overrides or 'base'} (base: the config's own, train.lr={cmp.base.train.lr:g}).",
            "",
        ]

    def recorded(ds: list[Row]) -> str:
        return ", ".join(f"seed {d['seed']} {d['model']}: {d['moe']} vs dense {d['dense']}" for d in ds)

    compared = [d for d in digests if d["equal"] is not None]
    skipped = "; ".join(f"seed {d['seed']} {d['model']}: {d['note']}" for d in digests if d["equal"] is None)
    lines += [
        f"**DATA DIFFERED: the training loops recorded DIFFERENT batch digests** ({recorded(compared)}); the "
        "comparison is not paired."
        if any(d["equal"] is False for d in digests)
        else f"Data digests recorded by the training loops (hash of every consumed batch's indices) are equal "
        f"per seed for the dense twin and every MoE ({recorded(compared) or 'no pairs'})."
        + (f" Not compared: {skipped}." if skipped else ""),
        "",
        "Same seed (identical initial weights in every shared parameter), optimizer, schedule and budget. "
        "The dense twin's SwiGLU width is chosen so that its forward FLOPs per token equal the MoE decoder's "
        "(router and active experts included). "
        "Forward FLOPs: 2 per multiply-add, training = 3x forward.",
        "",
        "## Results",
        "",
    ]
    cols = [("final val loss", lambda rs: cell(rs, "final_val_loss")), *task.result_columns]
    cols += [("tokens trained", _first("tokens_trained", ",")), ("train FLOPs", _first("train_flops", ".3g"))]
    cols += [(h, lambda rs, k=k: f"{mean_spread([r[k] for r in rs])[0]:,.0f}") for h, k in _MEANS]
    cells = [[name, _seeds(rs), *(f(rs) for _, f in cols)] for name, rs in group_rows(rows).items()]
    lines += md_table(["model", "seeds", *(h for h, _ in cols)], cells)
    lines += ["", "Spread: the sample standard deviation over seeds (none with one seed).", ""]
    lines += scaling_lines + task.sections(out, specs, rows, matching)
    lines += ["## Plots", ""] + [f"![{f}]({f})\n" for f in plots]
    lines += [
        "## Time",
        "",
        f"{timing['wall_s']:.0f} s wall for the whole comparison ({timing['workers']} run(s) at a time, "
        f"{timing['threads'] or 'default'} torch thread(s) each, {timing['cpus']} CPUs; load average "
        f"{timing['loadavg_start']} at the start, {timing['loadavg_end']} at the end).",
        "",
    ]
    lines += md_table(["run", "train s", "setup + train + eval s", "status"], [_time_cells(r) for r in rows])
    config = yaml.safe_dump({**config_to_dict(cmp.base), "compare": config_to_dict(c)}, sort_keys=False)
    lines += ["", "## Configuration", "", "```yaml", config.rstrip(), "```"]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def matching_lines(matching: list[Row], task: TaskAdapter) -> list[str]:
    """The matching table (markdown; also what the runner prints before training)."""
    cells = [[m["name"], m["kind"], *(f(m) for _, f in task.matching_columns)] for m in matching]
    return md_table(["model", "kind", *(h for h, _ in task.matching_columns)], cells)


def _first(key: str, spec: str) -> Callable[[list[Row]], str]:
    """A results cell: the first seed's value (equal over seeds by design; a diverged run has none)."""
    return lambda rs: next((f"{r[key]:{spec}}" for r in rs if r.get(key) is not None), "n/a")


def _seeds(rs: list[Row]) -> str:
    lost = sum(map(diverged, rs))
    return f"{len(rs)} ({lost} diverged)" if lost else str(len(rs))


def _time_cells(r: Row) -> list[str]:
    status = f"diverged at step {r['divergence']['step']}" if diverged(r) else "finished"
    return [f"{r['name']}-seed{r['seed']}", f"{r['wall_s']:.0f}", f"{r.get('run_wall_s', math.nan):.0f}", status]
