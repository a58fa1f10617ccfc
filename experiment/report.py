"""The comparison's outputs, for every task: summary.json, PNG plots and report.md, from the runs' rows and
their metrics.jsonl. The task adapter adds its columns, headline sentence and sections."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moekit.core.files import atomic_write_json, atomic_write_text
from moekit.core.layering import config_to_dict
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, cell, group_rows, mean_spread, pyplot, save_figure
from moekit.experiment.scaling import plot_scaling, scaling_analysis
from moekit.experiment.verdict import paired_verdicts, verdict_metrics, verdicts_sentence

if TYPE_CHECKING:
    from moekit.experiment.plan import Comparison

METRICS_FILE = "metrics.jsonl"
# every row field summary.json keeps, whatever the task (the adapter adds its own summary_fields)
SUMMARY_FIELDS = tuple(
    "name kind seed params_total params_active flops_per_token tokens_trained train_flops final_val_loss "
    "tokens_per_s peak_mem_mib wall_s data_digest status divergence".split()
)
PALETTE = ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def read_metrics(run_dir: Path) -> list[Row]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdicts(rows: list[Row], task: TaskAdapter | None = None) -> list[Row]:
    """Paired-seed verdicts of every MoE model against the dense twin (``model``, ``metric``, ``diff_mean``,
    ``diff_ci95``, ``n_seeds``, ``verdict``, ...; ``moekit.experiment.verdict``): final val loss, every per-task
    accuracy and the task's own extra metrics (``task.verdict_fields``, e.g. per-task val losses)."""
    if not any(r["name"] == "dense" for r in rows):
        return []
    metrics = verdict_metrics(rows)
    metrics += [m for m in (task.verdict_fields if task is not None else ()) if m not in metrics]
    return paired_verdicts(rows, metrics)


def digest_checks(rows: list[Row]) -> list[Row]:
    """Per seed and MoE model: is the data digest its training loop recorded equal to the dense twin's?
    ``equal`` is None where either run diverged (its loop stopped early: nothing to compare)."""
    dense = {r["seed"]: r for r in rows if r["name"] == "dense"}
    out = []
    for r in rows:
        if r["kind"] == "moe" and r["seed"] in dense:
            d, m = dense[r["seed"]].get("data_digest"), r.get("data_digest")
            equal = None if diverged(r) or diverged(dense[r["seed"]]) else d is not None and d == m
            out.append(dict(model=r["name"], seed=r["seed"], dense=d, moe=m, equal=equal))
    return out


def diverged(row: Row) -> bool:
    return row.get("status") == "diverged"


def divergence_text(row: Row) -> str:
    d = row["divergence"]
    return f"{row['name']}-seed{row['seed']} diverged at step {d['step']}: {d['reason']}"


def headline(rows: list[Row], task: TaskAdapter | None = None) -> str:
    """One sentence: the best MoE vs the FLOP-matched dense twin, the measured difference and spread, then the
    task's own sentence (e.g. held-out accuracy). Diverged runs are left out (the verdicts say so)."""
    rows = [r for r in rows if not diverged(r)]
    groups = group_rows(rows)
    if "dense" not in groups:
        return "No dense baseline finished training."
    moe_names = [n for n, rs in groups.items() if rs[0]["kind"] == "moe"]
    if not moe_names:
        return "No MoE run finished training."
    d_mean, d_sd = mean_spread([r["final_val_loss"] for r in groups["dense"]])
    best = min(moe_names, key=lambda n: mean_spread([r["final_val_loss"] for r in groups[n]])[0])
    m_mean, m_sd = mean_spread([r["final_val_loss"] for r in groups[best]])
    n = min(len(groups["dense"]), len(groups[best]))
    # Paired by seed: same data order and init seed, so the per-seed difference is the honest spread.
    by_seed = {r["seed"]: r["final_val_loss"] for r in groups["dense"]}
    diffs = [r["final_val_loss"] - by_seed[r["seed"]] for r in groups[best] if r["seed"] in by_seed]
    diff, diff_sd = mean_spread(diffs)
    fpt_m, fpt_d = groups[best][0]["flops_per_token"], groups["dense"][0]["flops_per_token"]
    head = (
        f"At matched active compute ({fpt_m / 1e6:.2f} vs {fpt_d / 1e6:.2f} MFLOPs/token) and "
        f"{groups[best][0]['tokens_trained']:,} training tokens, the {best} model"
    )
    extra = f" {task.headline(rows)}".rstrip() if task is not None else ""
    if len(diffs) < 2:  # one seed has no spread: report the gap without a verdict
        return (
            f"{head} reached a {'lower' if diff < 0 else 'higher'} validation loss than its dense twin on a single "
            f"seed: {m_mean:.4f} vs {d_mean:.4f} nats/byte ({diff:+.4f}); one seed cannot separate that from "
            f"seed-to-seed noise (rerun with compare.seeds=3).{extra}"
        )
    # No verdict word here: the verdict (t-interval over paired seeds) is the sentence before this one.
    return (
        f"{head} reached validation loss {m_mean:.4f} ± {m_sd:.4f} vs the dense twin's {d_mean:.4f} ± {d_sd:.4f} "
        f"nats/byte, a paired difference of {diff:+.4f} ± {diff_sd:.4f} (sd over {len(diffs)} paired seeds), "
        f"n={n} seeds.{extra}"
    )


def write_report(
    out_dir: str | Path, cmp: Comparison, specs: list[RunSpec], rows: list[Row], matching: list[Row], timing: Row
) -> Path:
    """Write summary.json, the plots and report.md into ``out_dir``; returns the report path."""
    out, task = Path(out_dir), cmp.task
    out.mkdir(parents=True, exist_ok=True)
    runs = [{k: r.get(k) for k in SUMMARY_FIELDS + task.summary_fields} for r in rows]
    verdict_rows, digests = verdicts(rows, task), digest_checks(rows)
    summary = dict(task=task.name, verdicts=verdict_rows, data_digests=digests, runs=runs)
    scaling_lines = []
    if cmp.compare.scaling is not None:
        summary["scaling"], scaling_lines = _scaling(rows, out)
    atomic_write_json(out / "summary.json", summary)
    sweep_key = cmp.compare.sweep.partition("=")[0].strip().removeprefix("moe.") if cmp.compare.sweep else None
    plots = _plot_curves(specs, rows, out) + ([_plot_sweep(rows, out, sweep_key)] if sweep_key else [])
    plots += [_plot_bars(rows, out)] + _plot_routing(specs, out)

    first = verdicts_sentence(verdict_rows) or "No verdict: no MoE model paired with the dense twin."
    lines = [f"# {task.title}", "", f"**Verdict.** {first}", "", f"**Result.** {headline(rows, task)}", ""]
    if verdict_rows:
        cells = [
            [v["model"], v["metric"], _num(v["diff_mean"]), _ci(v["diff_ci95"]), str(v["n_seeds"]), v["verdict"]]
            for v in verdict_rows
        ]
        lines += _table(["model", "metric", "moe - dense", "95% CI", "paired seeds", "verdict"], cells) + [""]
    lost = [f"- {divergence_text(r)}" for r in rows if diverged(r)]
    if lost:
        lines += ["**Diverged runs** (no final metrics; the verdicts skip their seeds):", "", *lost, ""]
    lines += ["## What was held equal", "", *matching_lines(matching, task)]
    c = cmp.compare
    if c.dense_overrides or c.moe_overrides:
        lines += [
            "",
            f"Not equal by design (each model's own tuned settings): dense runs {c.dense_overrides or 'base'}, "
            f"MoE runs {c.moe_overrides or 'base'}.",
        ]
    bad = [d for d in digests if d["equal"] is False]
    recorded = ", ".join(f"seed {d['seed']} {d['model']}: {d['moe']} vs dense {d['dense']}" for d in digests)
    lines += [
        "",
        (
            f"**DATA DIFFERED: the training loops recorded DIFFERENT batch digests** ({recorded}); the comparison "
            "is not paired."
            if bad
            else f"Data digests recorded by the training loops (hash of every consumed batch's indices) are equal "
            f"per seed for the dense twin and every MoE ({recorded or 'no pairs'})."
        ),
        "",
        "Same initial-weight seed, optimizer, learning-rate schedule and budget. The dense twin's SwiGLU width is "
        "chosen so that its forward FLOPs per token equal the MoE decoder's (router and active experts included). "
        "Forward FLOPs: 2 per multiply-add, training = 3x forward.",
        "",
        "## Results",
        "",
    ]
    cols = [("final val loss", lambda rs: cell(rs, "final_val_loss")), *task.result_columns]
    cols += [
        ("tokens trained", lambda rs: _first(rs, "tokens_trained", ",")),
        ("train FLOPs", lambda rs: _first(rs, "train_flops", ".3g")),
        *((h, lambda rs, k=k: f"{mean_spread([r[k] for r in rs])[0]:,.0f}") for h, k in _MEANS),
    ]
    cells = [[name, _seeds(rs), *(f(rs) for _, f in cols)] for name, rs in group_rows(rows).items()]
    lines += _table(["model", "seeds", *(h for h, _ in cols)], cells)
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
    cells = [
        [f"{r['name']}-seed{r['seed']}", f"{r['wall_s']:.0f}", f"{r.get('run_wall_s', math.nan):.0f}", _status(r)]
        for r in rows
    ]
    lines += _table(["run", "train s", "setup + train + eval s", "status"], cells)
    config = yaml.safe_dump({**config_to_dict(cmp.base), "compare": config_to_dict(cmp.compare)}, sort_keys=False)
    lines += ["", "## Configuration", "", "```yaml", config.rstrip(), "```"]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


_MEANS = (("tokens/s", "tokens_per_s"), ("peak MiB", "peak_mem_mib"), ("train s", "wall_s"))


def matching_lines(matching: list[Row], task: TaskAdapter) -> list[str]:
    """The matching table (markdown; also what the runner prints before training)."""
    cells = [[m["name"], m["kind"], *(f(m) for _, f in task.matching_columns)] for m in matching]
    return _table(["model", "kind", *(h for h, _ in task.matching_columns)], cells)


def _scaling(rows: list[Row], out: Path) -> tuple[Row, list[str]]:
    """The scaling recipe: fit the dense family, price each MoE in dense-equivalent compute (summary.json's
    ``scaling``), the plot and a multiplier table."""
    try:
        analysis = scaling_analysis(rows)
    except ValueError as e:  # e.g. losses that do not fall with compute: say so instead of failing the report
        return {"error": str(e)}, ["## Scaling", "", f"No dense fit: {e}", ""]
    plot_scaling(analysis, out / "scaling.png")
    fit = analysis["fit"]
    lines = ["## Scaling: dense-equivalent compute", "", f"Dense fit: {fit['method']} ({fit.get('note') or ''}).", ""]
    cells = []
    for m in analysis["multipliers"]:
        ci = m["multiplier_ci95"]
        mult = "refused" if m["multiplier"] is None else f"{m['multiplier']:.2f}x"
        ci_text = "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
        cells.append([m["model"], mult, ci_text, str(m["n_seeds"]), m["status"], m["reason"] or ""])
    lines += _table(["model", "multiplier", "95% CI", "seeds", "status", "note"], cells)
    res = ", ".join(f"{r['residual']:+.4f}" for r in fit["residuals"])
    lines += ["", f"Dense fit residuals (loss - fit): {res}.", "", "![scaling.png](scaling.png)", ""]
    return analysis, lines


def _first(rs: list[Row], key: str, spec: str) -> str:
    """The first seed's value (equal over seeds by design); a diverged run has none."""
    return next((f"{r[key]:{spec}}" for r in rs if r.get(key) is not None), "n/a")


def _seeds(rs: list[Row]) -> str:
    lost = sum(map(diverged, rs))
    return f"{len(rs)} ({lost} diverged)" if lost else str(len(rs))


def _status(r: Row) -> str:
    return f"diverged at step {r['divergence']['step']}" if diverged(r) else "finished"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _ci(ci: list[float] | None) -> str:
    return "n/a (1 seed)" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _table(headers: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(row) + " |" for row in [headers, ["---"] * len(headers), *cells]]


def _color(name: str, names: Any) -> str:
    return PALETTE[list(names).index(name) % len(PALETTE)]


def _plot_curves(specs: list[RunSpec], rows: list[Row], out: Path) -> list[str]:
    """Validation loss against training tokens, training FLOPs and training seconds, every run."""
    plt = pyplot()
    curves: dict[str, list[dict[str, list[float]]]] = defaultdict(list)
    for s, row in zip(specs, rows):  # rows are in plan order
        ev = [m for m in read_metrics(out / "runs" / s.folder) if "val_loss" in m]
        toks, tps = [m["tokens_seen"] for m in ev], row["tokens_per_s"]
        fpt = row["train_flops"] / row["tokens_trained"] if row.get("train_flops") else math.nan  # nan: diverged
        secs = [m.get("train_seconds", t / (tps or math.nan)) for m, t in zip(ev, toks)]  # recorded seconds
        if ev:
            curves[s.name].append(
                dict(tokens=toks, flops=[fpt * t for t in toks], time=secs, loss=[m["val_loss"] for m in ev])
            )
    files = []
    for key, label in (("tokens", "training tokens"), ("flops", "training FLOPs"), ("time", "training seconds")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, runs in curves.items():
            for i, c in enumerate(runs):
                ax.plot(c[key], c["loss"], color=_color(name, curves), alpha=0.9, label=name if i == 0 else None)
        ax.set(xlabel=label, ylabel="validation loss (nats/byte)", title=f"Validation loss vs {label}")
        files.append(_finish(fig, ax, out, f"val_loss_vs_{key}.png"))
    return files


def _plot_routing(specs: list[RunSpec], out: Path) -> list[str]:
    """Expert load per layer over training (heatmaps) and entropy / drop rate, for each MoE model's first seed."""
    import numpy as np

    plt = pyplot()
    files = []
    firsts = {n: next(s for s in specs if s.name == n) for n in dict.fromkeys(s.name for s in specs if s.kind == "moe")}
    for name, s in firsts.items():
        logs = [m for m in read_metrics(out / "runs" / s.folder) if "moe_layers" in m]
        if not logs:
            continue
        steps = [m["step"] for m in logs]
        n_layers = len(logs[0]["moe_layers"])
        fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1.2, 3.6), squeeze=False, layout="constrained")
        for li in range(n_layers):
            load = np.array([m["moe_layers"][li]["tokens_per_expert"] for m in logs], dtype=float)  # [steps, E]
            frac = load / np.maximum(load.sum(1, keepdims=True), 1)
            ax = axes[0, li]
            extent = (steps[0], steps[-1], -0.5, frac.shape[1] - 0.5)
            im = ax.imshow(frac.T, aspect="auto", origin="lower", cmap="viridis", extent=extent)
            ax.set(title=f"MoE layer {li}", xlabel="step", ylabel="expert")
            ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="share of routed tokens")
        fig.suptitle(f"{name}: expert load over training (uniform = {1 / frac.shape[1]:.3f})")
        files.append(save_figure(fig, out, f"expert_load_{name}.png"))

        fig, ax1 = plt.subplots(figsize=(6.4, 3.6))
        ax1.plot(steps, [m.get("moe/router_entropy", math.nan) for m in logs], color="#1f77b4")
        ax1.set_xlabel("step")
        ax1.set_ylabel("router entropy (nats)", color="#1f77b4")
        ax1.axhline(math.log(frac.shape[1]), color="#1f77b4", ls=":", lw=1)
        ax2 = ax1.twinx()
        ax2.plot(steps, [m.get("moe/drop_rate", 0.0) for m in logs], color="#d62728")
        ax2.set_ylabel("drop rate", color="#d62728")
        ax1.set_title(f"{name}: routing entropy (dotted: uniform) and drop rate")
        fig.tight_layout()
        files.append(save_figure(fig, out, f"routing_{name}.png"))
    return files


def _plot_bars(rows: list[Row], out: Path) -> str:
    plt = pyplot()
    groups = group_rows(rows)
    names = list(groups)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in zip(axes, ("tokens_per_s", "peak_mem_mib"), ("training throughput (tokens/s)", "peak MiB")):
        ms = [mean_spread([r[key] for r in groups[n]]) for n in names]
        ax.bar(names, [m for m, _ in ms], yerr=[s for _, s in ms], color=[_color(n, names) for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return save_figure(fig, out, "throughput_memory.png")


def _plot_sweep(rows: list[Row], out: Path, key: str) -> str:
    plt = pyplot()
    pts: dict[Any, list[float]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "moe":
            pts[r["sweep_value"]].append(r["final_val_loss"])
    xs = list(pts)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    pos = xs if numeric else list(range(len(xs)))
    ms = [mean_spread(pts[x]) for x in xs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(pos, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", color="#d62728", label="MoE")
    dense = [r["final_val_loss"] for r in rows if r["name"] == "dense"]
    if dense:
        ax.axhline(mean_spread(dense)[0], color="#444444", ls="--", label="dense twin (same active FLOPs)")
    if numeric and all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-9) > 4:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(pos, [str(x) for x in xs])
    ax.set(xlabel=key, ylabel="final validation loss", title=f"Final validation loss vs {key} at fixed active compute")
    return _finish(fig, ax, out, "sweep.png")


def _finish(fig: Any, ax: Any, out: Path, fname: str) -> str:
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, fname)
