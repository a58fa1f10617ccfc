"""The comparison's outputs: summary.json, PNG plots and report.md, from the runs' result.json/metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from moekit.moe.compare import SUMMARY_FIELDS, RunSpec, _write_json

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def group_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["name"]].append(r)
    return dict(groups)


def headline(rows: list[dict[str, Any]]) -> str:
    """One sentence: the best MoE vs the FLOP-matched dense twin, with the measured difference and spread."""
    groups = group_rows(rows)
    if "dense" not in groups:
        return "No dense baseline was trained."
    moe_names = [n for n, rs in groups.items() if rs[0]["kind"] == "moe"]
    if not moe_names:
        return "No MoE run was trained."
    d_mean, d_sd = mean_spread([r["final_val_loss"] for r in groups["dense"]])
    best = min(moe_names, key=lambda n: mean_spread([r["final_val_loss"] for r in groups[n]])[0])
    m_mean, m_sd = mean_spread([r["final_val_loss"] for r in groups[best]])
    n = min(len(groups["dense"]), len(groups[best]))
    # Paired by seed: same data order and init seed, so the per-seed difference is the honest spread.
    by_seed = {r["seed"]: r["final_val_loss"] for r in groups["dense"]}
    diffs = [r["final_val_loss"] - by_seed[r["seed"]] for r in groups[best] if r["seed"] in by_seed]
    diff, diff_sd = mean_spread(diffs)
    tokens = groups[best][0]["tokens_trained"]
    fpt_m, fpt_d = groups[best][0]["flops_per_token"], groups["dense"][0]["flops_per_token"]
    head = (
        f"At matched active compute ({fpt_m / 1e6:.2f} vs {fpt_d / 1e6:.2f} MFLOPs/token) and {tokens:,} training "
        f"tokens, the {best} model"
    )
    if len(diffs) < 2:  # one seed has no spread: report the gap without a verdict
        lower = "lower" if diff < 0 else "higher"
        return (
            f"{head} reached a {lower} validation loss than its dense twin on a single seed: {m_mean:.4f} vs "
            f"{d_mean:.4f} nats/byte ({diff:+.4f}); one seed cannot separate that from seed-to-seed noise "
            "(rerun with --seeds 3)."
        )
    if diff < 0 and all(d < 0 for d in diffs):
        verdict = "beats"
    elif diff > 0 and all(d > 0 for d in diffs):
        verdict = "is worse than"
    else:  # the seeds disagree on the sign: the difference is within seed-to-seed noise
        verdict = "is not distinguishable (the seeds disagree on the sign) from"
    return (
        f"{head} {verdict} its dense twin: validation loss {m_mean:.4f} ± {m_sd:.4f} vs {d_mean:.4f} ± {d_sd:.4f} "
        f"nats/byte, a difference of {diff:+.4f} ± {diff_sd:.4f} (sd over {len(diffs)} paired seeds), n={n} seeds."
    )


def save_figure(fig: Any, out: Path, fname: str) -> str:
    """Write ``fig`` to ``out/fname`` as the reports' PNGs are written, close it, return ``fname``."""
    import matplotlib.pyplot as plt

    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return fname


def _plot_curves(specs: list[RunSpec], out: Path, rows: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_of = {(r["name"], r["seed"]): r for r in rows}
    files = []
    axes_spec = [
        ("tokens_seen", "training tokens", "val_loss_vs_tokens.png"),
        ("train_flops", "training FLOPs", "val_loss_vs_flops.png"),
        ("wall_s", "wall-clock seconds (training only)", "val_loss_vs_time.png"),
    ]
    curves: dict[str, list[tuple[list[float], list[float], list[float], list[float]]]] = defaultdict(list)
    for s in specs:
        ev = [m for m in read_metrics(out / "runs" / s.folder) if "val_loss" in m]
        if not ev:
            continue
        row = row_of.get((s.name, s.seed), {})
        fpt = row.get("flops_per_token", 0)
        tps = row.get("tokens_per_s") or float("nan")
        toks = [m["tokens_seen"] for m in ev]
        secs = [m.get("train_seconds", t / tps) for m, t in zip(ev, toks)]
        curves[s.name].append((toks, [3 * fpt * t for t in toks], secs, [m["val_loss"] for m in ev]))
    for key, label, fname in axes_spec:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, runs in curves.items():
            for i, (toks, flops, secs, losses) in enumerate(runs):
                x = {"tokens_seen": toks, "train_flops": flops, "wall_s": secs}[key]
                ax.plot(x, losses, color=_color(name, curves), alpha=0.9, label=name if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"Validation loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        files.append(save_figure(fig, out, fname))
    return files


def _color(name: str, names) -> str:
    palette = ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    return palette[list(names).index(name) % len(palette)]


def _plot_routing(specs: list[RunSpec], out: Path) -> list[str]:
    """Expert load per layer over training (heatmaps) and entropy / drop rate, for each MoE model's first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = []
    firsts = {}
    for s in specs:
        if s.kind == "moe" and s.name not in firsts:
            firsts[s.name] = s
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
            im = ax.imshow(
                frac.T,
                aspect="auto",
                origin="lower",
                cmap="viridis",
                extent=(steps[0], steps[-1], -0.5, frac.shape[1] - 0.5),
            )
            ax.set_title(f"MoE layer {li}")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
            ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="share of routed tokens")
        fig.suptitle(f"{name}: expert load over training (uniform = {1 / frac.shape[1]:.3f})")
        fname = f"expert_load_{name}.png"
        files.append(save_figure(fig, out, fname))

        fig, ax1 = plt.subplots(figsize=(6.4, 3.6))
        ax1.plot(steps, [m.get("moe/router_entropy", float("nan")) for m in logs], color="#1f77b4")
        ax1.set_xlabel("step")
        ax1.set_ylabel("router entropy (nats)", color="#1f77b4")
        ax1.axhline(math.log(frac.shape[1]), color="#1f77b4", ls=":", lw=1)
        ax2 = ax1.twinx()
        ax2.plot(steps, [m.get("moe/drop_rate", 0.0) for m in logs], color="#d62728")
        ax2.set_ylabel("drop rate", color="#d62728")
        ax1.set_title(f"{name}: routing entropy (dotted: uniform) and drop rate")
        fig.tight_layout()
        fname = f"routing_{name}.png"
        files.append(save_figure(fig, out, fname))
    return files


def _plot_bars(rows: list[dict[str, Any]], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    names = list(groups)
    tps = [mean_spread([r["tokens_per_s"] for r in groups[n]]) for n in names]
    mem = [mean_spread([r["peak_mem_mib"] for r in groups[n]]) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = [_color(n, names) for n in names]
    a.bar(names, [m for m, _ in tps], yerr=[s for _, s in tps], color=colors)
    a.set_title("training throughput (tokens/s)")
    b.bar(names, [m for m, _ in mem], yerr=[s for _, s in mem], color=colors)
    b.set_title("peak memory (MiB)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "throughput_memory.png", dpi=110)
    plt.close(fig)
    return "throughput_memory.png"


def _plot_sweep(rows: list[dict[str, Any]], out: Path, key: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_xlabel(key)
    ax.set_ylabel("final validation loss")
    ax.set_title(f"Final validation loss vs {key} at fixed active compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    return "sweep.png"


def _fmt(v: Any, spec: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) if spec else str(v)


def write_report(
    out_dir: str | os.PathLike,
    specs: list[RunSpec],
    rows: list[dict[str, Any]],
    matching: list[dict[str, Any]],
    config: dict[str, Any],
    sweep_key: str | None = None,
) -> Path:
    """Write summary.json, the plots and report.md into ``out_dir``; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", [{k: r.get(k) for k in SUMMARY_FIELDS} for r in rows])
    plots = _plot_curves(specs, out, rows)
    routing = _plot_routing(specs, out)
    bars = _plot_bars(rows, out)
    sweep = _plot_sweep(rows, out, sweep_key) if sweep_key else None

    groups = group_rows(rows)
    lines = ["# Sparse vs dense at matched compute", "", f"**Result.** {headline(rows)}", ""]
    lines += ["## What was held equal", ""]
    lines += [
        "| model | kind | params total | params active | FLOPs/token (fwd) | steps |",
        "|---|---|---|---|---|---|",
    ]
    for m in matching:
        lines.append(
            f"| {m['name']} | {m['kind']} | {m['params_total']:,} | {m['params_active']:,} | "
            f"{m['flops_per_token']:,} | {m['steps']} |"
        )
    digests = {r.get("data_digest") for r in rows if r["seed"] == rows[0]["seed"]}
    lines += [
        "",
        f"Same data windows in the same order for every model with the same seed "
        f"(data-order digest{'s' if len(digests) > 1 else ''}: {', '.join(sorted(map(str, digests)))}), same "
        "initial-weight seed, optimizer, learning-rate schedule and budget. The dense twin's SwiGLU width is "
        "chosen so that its forward FLOPs per token equal the MoE model's (router and active experts included).",
        "",
        "## Results",
        "",
        "| model | seeds | final val loss | val bits/byte | tokens trained | train FLOPs | tokens/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in groups.items():
        vl, vs = mean_spread([r["final_val_loss"] for r in rs])
        bl, bs = mean_spread([r["val_bits_per_byte"] for r in rs])
        tp, _ = mean_spread([r["tokens_per_s"] for r in rs])
        mem, _ = mean_spread([r["peak_mem_mib"] for r in rs])
        lines.append(
            f"| {name} | {len(rs)} | {vl:.4f} ± {vs:.4f} | {bl:.4f} ± {bs:.4f} | {rs[0]['tokens_trained']:,} | "
            f"{rs[0]['train_flops']:.3g} | {tp:,.0f} | {mem:,.0f} |"
        )
    lines += ["", "Spread is the sample standard deviation over seeds (± 0 for one seed).", ""]
    lines += ["## Plots", ""]
    for f in plots + ([sweep] if sweep else []) + [bars] + routing:
        lines.append(f"![{f}]({f})")
        lines.append("")
    lines += ["## Samples (same prompt, same sampling seed)", ""]
    for name, rs in groups.items():
        text = (rs[0].get("sample") or "").strip()
        lines += [f"**{name}**", "", "```text", text[:600], "```", ""]
    lines += ["## Configuration", "", "```yaml"]
    import yaml

    lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
