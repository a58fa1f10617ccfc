"""The multimodal comparison's report: the headline with held-out accuracy per task, per-modality expert
load heatmaps and modality purity, and report.md beside summary.json and the training plots."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.moe.compare import SUMMARY_FIELDS, _write_json
from moekit.moe.modality import load_fractions
from moekit.moe.report import (
    _plot_bars,
    _plot_curves,
    _plot_routing,
    group_rows,
    headline,
    mean_spread,
    save_figure,
)
from moekit.multimodal.train import CANDIDATES, CHANCE

if TYPE_CHECKING:
    from moekit.multimodal.compare import MMRunSpec

MODALITIES = ("text", "image", "audio")  # group ids 0, 1, 2 (moekit.multimodal.sequence)
MM_SUMMARY_FIELDS = (
    *SUMMARY_FIELDS,
    "lm_flops_per_token",
    "flops_per_sample",
    "val_text_loss",
    *(f"{t}_acc" for t in CANDIDATES),
)


def _acc_cell(rs: list[dict[str, Any]], key: str) -> str:
    m, sd = mean_spread([r.get(key) for r in rs])
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f}%" if len(rs) < 2 else f"{100 * m:.1f} ± {100 * sd:.1f}%"


def headline_multimodal(rows: list[dict[str, Any]]) -> str:
    """``moekit.moe.report.headline`` (validation loss, paired over seeds) plus held-out accuracy per task."""
    groups = group_rows(rows)
    moe = [n for n, rs in groups.items() if rs[0]["kind"] == "moe"]
    if "dense" not in groups or not moe:
        return headline(rows)
    best = min(moe, key=lambda n: mean_spread([r["final_val_loss"] for r in groups[n]])[0])
    tasks = [t for t in CANDIDATES if any(f"{t}_acc" in r for r in rows)]

    def accs(name: str) -> str:
        return ", ".join(f"{t} {_acc_cell(groups[name], f'{t}_acc')}" for t in tasks)

    chance = ", ".join(f"{t} {100 * CHANCE[t]:.0f}%" for t in tasks)
    return f"{headline(rows)} Held-out accuracy (chance: {chance}): {best} {accs(best)}; dense {accs('dense')}."


def _plot_modality_routing(specs: list[MMRunSpec], rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Per MoE model (first seed), on the val set after training: each modality's share of its expert
    assignments per expert and layer (heatmaps), and each expert's modality purity per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    row_of = {(r["name"], r["seed"]): r for r in rows}
    firsts: dict[str, MMRunSpec] = {}
    for s in specs:
        firsts.setdefault(s.name, s)
    for name, s in firsts.items():
        routing = row_of.get((name, s.seed), {}).get("routing")
        if s.kind != "moe" or not routing:
            continue
        by_group = torch.tensor(routing["tokens_per_expert_by_group"])  # [L, Gr, E]
        n_layers, n_groups, n_exp = by_group.shape
        labels = [MODALITIES[g] if g < len(MODALITIES) else f"group {g}" for g in range(n_groups)]
        fig, axes = plt.subplots(
            1, n_layers, figsize=(2.2 + 0.45 * n_exp * n_layers, 2.8), squeeze=False, layout="constrained"
        )
        for li in range(n_layers):
            ax = axes[0, li]
            im = ax.imshow(load_fractions(by_group[li]).numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"MoE layer {li} (purity {routing['mean_modality_purity'][li]:.2f})", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_yticks(range(n_groups), labels if li == 0 else [""] * n_groups)
            ax.set_xticks(range(n_exp))
        fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the modality's assignments")
        fig.suptitle(f"{name}: expert load per modality on held-out data (uniform = {1 / n_exp:.3f})")
        fname = f"modality_load_{name}.png"
        files.append(save_figure(fig, out, fname))

        purity = torch.tensor(routing["modality_purity"])  # [L, E]
        fig, ax = plt.subplots(figsize=(1.5 + 0.55 * n_exp, 1.2 + 0.45 * n_layers), layout="constrained")
        im = ax.imshow(purity.numpy(), aspect="auto", cmap="viridis", vmin=1 / max(n_groups, 1), vmax=1)
        for (li, e), v in zip(
            torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_exp)).tolist(), purity.flatten()
        ):
            ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.75 else "k")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(n_exp))
        ax.set_yticks(range(n_layers))
        fig.colorbar(im, ax=ax, label="modality purity")
        ax.set_title(f"{name}: modality purity of each expert", fontsize=10)
        fname = f"modality_purity_{name}.png"
        files.append(save_figure(fig, out, fname))
    return files


def write_multimodal_report(
    out_dir: str | os.PathLike,
    specs: list[MMRunSpec],
    rows: list[dict[str, Any]],
    matching: list[dict[str, Any]],
    config: dict[str, Any],
    timing: dict[str, Any] | None = None,
) -> Path:
    """Write summary.json, the plots and report.md into ``out_dir``; returns the report path."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "summary.json", [{k: r.get(k) for k in MM_SUMMARY_FIELDS} for r in rows])
    plots = _plot_curves(specs, out, rows) + [_plot_bars(rows, out)]
    modality = _plot_modality_routing(specs, rows, out)
    training_routing = _plot_routing(specs, out)
    groups = group_rows(rows)
    tasks = [t for t in CANDIDATES if any(f"{t}_acc" in r for r in rows)]

    lines = ["# Multimodal: sparse vs dense at matched compute", "", f"**Result.** {headline_multimodal(rows)}", ""]
    lines += ["## What was held equal", ""]
    lines += [
        "| model | kind | decoder params total | decoder params active | encoders + projectors | decoder FLOPs/token "
        "| FLOPs/sample: decoder | image | audio | total | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in matching:
        fs = m["flops_per_sample"]
        lines.append(
            f"| {m['name']} | {m['kind']} | {m['lm_params_total']:,} | {m['lm_params_active']:,} | "
            f"{m['encoder_params']:,} | {m['lm_flops_per_token']:,} | {fs['lm'] / 1e6:.3f}M | "
            f"{fs['image'] / 1e6:.3f}M | {fs['audio'] / 1e6:.3f}M | {fs['total'] / 1e6:.3f}M | {m['steps']} |"
        )
    dense = next(m for m in matching if m["name"] == "dense")
    for m in matching:
        if m["kind"] == "moe":
            d_lm = m["lm_flops_per_token"] / dense["lm_flops_per_token"] - 1
            d_tot = m["flops_per_sample"]["total"] / dense["flops_per_sample"]["total"] - 1
            lines.append(
                f"\n{m['name']} vs dense: decoder active FLOPs/token {d_lm:+.2%}, total FLOPs per sample with the "
                f"encoders {d_tot:+.2%} (the encoders are identical; FLOPs per sample are measured on the first "
                "training batches, decoder on real tokens only)."
            )
    digests = sorted({str(r.get("data_digest")) for r in rows if r["seed"] == rows[0]["seed"]})
    lines += [
        "",
        f"Same samples in the same order for every model with the same seed (data-order digest: {', '.join(digests)}), "
        "same initial-weight seed, optimizer, schedule and budget. Forward FLOPs: 2 per multiply-add, "
        "training = 3x forward.",
        "",
        "## Results (held-out data: unseen images, unseen voices, validation plays)",
        "",
        "| model | seeds | val loss | text loss | "
        + " | ".join(f"{t} acc" for t in tasks)
        + " | tokens/s | peak MiB | train s |",
        "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|",
    ]
    for name, rs in groups.items():
        vl, vs = mean_spread([r["final_val_loss"] for r in rs])
        tl, ts = mean_spread([r.get("val_text_loss") for r in rs])
        tp, _ = mean_spread([r["tokens_per_s"] for r in rs])
        mem, _ = mean_spread([r["peak_mem_mib"] for r in rs])
        wall, _ = mean_spread([r["wall_s"] for r in rs])
        accs = " | ".join(_acc_cell(rs, f"{t}_acc") for t in tasks)
        lines.append(
            f"| {name} | {len(rs)} | {vl:.4f} ± {vs:.4f} | {tl:.4f} ± {ts:.4f} | {accs} | {tp:,.0f} | {mem:,.0f} | "
            f"{wall:,.0f} |"
        )
    lines.append("| chance | | | | " + " | ".join(f"{100 * CHANCE[t]:.0f}%" for t in tasks) + " | | | |")
    lines += [
        "",
        "Accuracy: the gold answer must have the highest likelihood among all candidates (10 captions, 10 "
        "transcripts, same/different). Spread is the sample standard deviation over seeds (± 0 for one seed). "
        "Val loss is in nats per target byte over answers and text windows; text loss over Shakespeare windows.",
        "",
    ]
    lines += ["## Routing by modality (MoE, held-out data after training)", ""]
    for name, rs in groups.items():
        routing = rs[0].get("routing")
        if rs[0]["kind"] == "moe" and routing:
            purities = ", ".join(f"layer {i}: {p:.3f}" for i, p in enumerate(routing["mean_modality_purity"]))
            lines.append(f"- **{name}** mean modality purity {purities}.")
    lines += [
        "",
        "Modality purity of expert e: s_ge = c_ge / n_g (assignments of modality g to expert e per token of g), "
        "purity_e = max_g s_ge / sum_g s_ge; 1 = the expert serves one modality, 1/3 = all three in proportion. "
        "The layer mean weights experts by sum_g s_ge.",
        "",
    ]
    for f in modality:
        lines += [f"![{f}]({f})", ""]
    lines += ["## Training curves, throughput and routing over training", ""]
    for f in plots + training_routing:
        lines += [f"![{f}]({f})", ""]
    if timing:
        load = f"load average {timing.get('loadavg_start')} at the start, {timing.get('loadavg_end')} at the end"
        lines += [
            "## Time",
            "",
            f"{timing['wall_s']:.0f} s wall for the whole comparison ({timing.get('workers')} run(s) at a time, "
            f"{timing.get('threads') or 'default'} torch thread(s) each, {timing.get('cpus')} CPUs; {load}). "
            "Other processes shared the CPU, so timings are noisy.",
            "",
            "| run | train s | setup + train + eval s |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['name']}-seed{r['seed']} | {r['wall_s']:.0f} | {r.get('run_wall_s', float('nan')):.0f} |"
            for r in rows
        ]
        lines.append("")
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
