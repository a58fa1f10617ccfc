"""The report's task-independent PNG plots: validation loss vs tokens, FLOPs and recorded training seconds;
a sweep's final loss; throughput and memory; expert load and routing over training per MoE model."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from moekit.core.train import METRICS_FILE
from moekit.experiment.adapter import Row, RunSpec, group_rows, mean_spread, pyplot, save_figure

PALETTE = ["#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def read_metrics(run_dir: Path) -> list[Row]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def report_plots(specs: list[RunSpec], rows: list[Row], out: Path, sweep_key: str | None) -> list[str]:
    """Every plot into ``out``; returns the file names."""
    files = plot_curves(specs, rows, out) + ([_plot_sweep(rows, out, sweep_key)] if sweep_key else [])
    return files + [_plot_bars(rows, out)] + _plot_routing(specs, out)


def _color(name: str, names: Any) -> str:
    return PALETTE[list(names).index(name) % len(PALETTE)]


def _finish(fig: Any, ax: Any, out: Path, fname: str) -> str:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no curves (every run diverged before its first eval): no legend
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out, fname)


def loss_curves(specs: list[RunSpec], rows: list[Row], out: Path) -> dict[str, list[dict[str, list[float]]]]:
    """Per model, per seed: validation loss at each eval event against training tokens, training FLOPs and
    the training seconds the event recorded (``train_seconds``; older run folders: tokens / mean tokens/s)."""
    curves: dict[str, list[dict[str, list[float]]]] = defaultdict(list)
    for s, row in zip(specs, rows):  # rows are in plan order
        ev = [m for m in read_metrics(out / "runs" / s.folder) if "val_loss" in m]
        fpt = row["train_flops"] / row["tokens_trained"] if row.get("train_flops") else math.nan  # nan: diverged
        toks, tps = [m["tokens_seen"] for m in ev], row["tokens_per_s"]
        secs = [m.get("train_seconds", t / (tps or math.nan)) for m, t in zip(ev, toks)]
        if ev:
            curves[s.name].append(
                dict(tokens=toks, flops=[fpt * t for t in toks], time=secs, loss=[m["val_loss"] for m in ev])
            )
    return dict(curves)


def plot_curves(specs: list[RunSpec], rows: list[Row], out: Path) -> list[str]:
    """Validation loss against training tokens, training FLOPs and training seconds, every run."""
    plt, curves = pyplot(), loss_curves(specs, rows, out)
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
    plt = pyplot()
    files = []
    firsts = {n: next(s for s in specs if s.name == n) for n in dict.fromkeys(s.name for s in specs if s.kind == "moe")}
    for name, s in firsts.items():
        logs = [m for m in read_metrics(out / "runs" / s.folder) if "moe_layers" in m]
        if not logs:
            continue
        steps, n_layers = [m["step"] for m in logs], len(logs[0]["moe_layers"])
        fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1.2, 3.6), squeeze=False, layout="constrained")
        for li, ax in enumerate(axes[0]):
            load = np.array([m["moe_layers"][li]["tokens_per_expert"] for m in logs], dtype=float)  # [steps, E]
            frac = load / np.maximum(load.sum(1, keepdims=True), 1)
            extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, frac.shape[1] - 0.5)  # one log step: still a cell
            im = ax.imshow(frac.T, aspect="auto", origin="lower", cmap="viridis", extent=extent)
            ax.set(title=f"MoE layer {li}", xlabel="step", ylabel="expert")
            ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="share of routed tokens")
        fig.suptitle(f"{name}: expert load over training (uniform = {1 / frac.shape[1]:.3f})")
        files.append(save_figure(fig, out, f"expert_load_{name}.png"))

        fig, ax1 = plt.subplots(figsize=(6.4, 3.6))
        ax1.plot(steps, [m.get("moe/router_entropy", math.nan) for m in logs], color="#1f77b4")
        ax1.set(xlabel="step", title=f"{name}: routing entropy (dotted: uniform) and drop rate")
        ax1.set_ylabel("router entropy (nats)", color="#1f77b4")
        ax1.axhline(math.log(frac.shape[1]), color="#1f77b4", ls=":", lw=1)
        ax2 = ax1.twinx()
        ax2.plot(steps, [m.get("moe/drop_rate", 0.0) for m in logs], color="#d62728")
        ax2.set_ylabel("drop rate", color="#d62728")
        fig.tight_layout()
        files.append(save_figure(fig, out, f"routing_{name}.png"))
    return files


def _plot_bars(rows: list[Row], out: Path) -> str:
    plt = pyplot()
    groups = group_rows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in zip(axes, ("tokens_per_s", "peak_mem_mib"), ("training throughput (tokens/s)", "peak MiB")):
        ms = [mean_spread([r[key] for r in rs]) for rs in groups.values()]
        ax.bar(list(groups), [m for m, _ in ms], yerr=[s for _, s in ms], color=[_color(n, groups) for n in groups])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return save_figure(fig, out, "throughput_memory.png")


def _plot_sweep(rows: list[Row], out: Path, key: str) -> str:
    plt = pyplot()
    pts: dict[Any, list[float]] = defaultdict(list)
    for r in (r for r in rows if r["kind"] == "moe"):
        pts[r["sweep_value"]].append(r["final_val_loss"])
    xs = list(pts)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    pos, ms = xs if numeric else list(range(len(xs))), [mean_spread(pts[x]) for x in xs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(pos, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", color="#d62728", label="MoE")
    if dense := [r["final_val_loss"] for r in rows if r["name"] == "dense"]:
        ax.axhline(mean_spread(dense)[0], color="#444444", ls="--", label="dense twin (same active FLOPs)")
    if numeric and all(x > 0 for x in xs) and max(xs) / max(min(xs), 1e-9) > 4:
        ax.set_xscale("log", base=2)
    if not numeric:
        ax.set_xticks(pos, [str(x) for x in xs])
    ax.set(xlabel=key, ylabel="final validation loss", title=f"Final validation loss vs {key} at fixed active compute")
    return _finish(fig, ax, out, "sweep.png")
