"""The multimodal task of the comparison: image, audio and text tasks through one decoder, whose ``model.lm``
the dense twin replaces. The encoders and projectors are identical in every model, so matching the decoder's
active FLOPs per token matches the totals (the report states both, measured on the training mixture); the
report adds held-out accuracy per task and per-modality expert load and purity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.core.accounting import flops_per_token
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, best_moe, cell, group_rows, pyplot, save_figure
from moekit.moe.modality import load_fractions
from moekit.multimodal.train import (
    CANDIDATES,
    CHANCE,
    MultimodalRunConfig,
    SampleCollate,
    TrainableMultimodalLM,
    build_multimodal_trainer,
    flops_profile,
    load_run_tasks,
)

MODALITIES = ("text", "image", "audio")  # group ids 0, 1, 2 (moekit.multimodal.sequence)


def _mflops(key: str) -> Any:
    return lambda m: f"{m['flops_per_sample'][key] / 1e6:.3f}M"


class MultimodalTask(TaskAdapter):
    name = "multimodal"
    title = "Multimodal: sparse vs dense at matched compute"
    run_config = MultimodalRunConfig
    decoder_key = "model.lm"
    summary_fields = (
        "lm_flops_per_token", "flops_per_sample", "val_text_loss",
        *(f"{t}_acc" for t in CANDIDATES), *(f"{t}_loss" for t in CANDIDATES),
    )  # fmt: skip
    verdict_fields = (*(f"{t}_loss" for t in CANDIDATES), "val_text_loss")  # per-task val losses
    matching_columns = (
        ("decoder params total", lambda m: f"{m['lm_params_total']:,}"),
        ("decoder params active", lambda m: f"{m['lm_params_active']:,}"),
        ("encoders + projectors", lambda m: f"{m['encoder_params']:,}"),
        ("decoder FLOPs/token", lambda m: f"{m['lm_flops_per_token']:,}"),
        ("FLOPs/sample: decoder", _mflops("lm")),
        ("image", _mflops("image")),
        ("audio", _mflops("audio")),
        ("total", _mflops("total")),
        ("steps", lambda m: str(m["steps"])),
    )
    result_columns = (
        ("text loss", lambda rs: cell(rs, "val_text_loss")),
        *((f"{t} acc", lambda rs, t=t: cell(rs, f"{t}_acc", ".1%")) for t in CANDIDATES),
    )

    def prepare(self, run: MultimodalRunConfig) -> Any:
        return load_run_tasks(run)

    def facts(self, run: MultimodalRunConfig, state: Any) -> Row:
        """Parameters and forward FLOPs: the decoder's per token at ``max_seq_len`` (what is matched), the
        training mixture's per sample and per token."""
        model = TrainableMultimodalLM(run.model)
        rep = model.report()
        collate = SampleCollate(model, run.data.pad_to_multiple_of)
        prof = flops_profile(model, state, collate, run.train.batch_size)
        return dict(
            params_total=rep.params["total"],
            params_active=rep.params["active"],
            lm_params_total=rep.params["lm_total"],
            lm_params_active=rep.params["lm_active"],
            encoder_params=rep.params["total"] - rep.params["lm_total"],
            lm_flops_per_token=flops_per_token(run.model.lm, self.seq_len(run)),
            flops_per_sample=prof["per_sample"],
            flops_per_token=prof["per_token"]["total"],
            steps=run.train.steps,
        )

    def build_trainer(self, run: Any, run_dir: Path, *, resume: bool, expect_processes: int | None, state: Any):
        return build_multimodal_trainer(run, run_dir, resume=resume, tasks=state, expect_processes=expect_processes)

    def results(self, trainer: Any, summary: Row, spec: RunSpec, facts: Row, compare: Any) -> Row:
        samples = summary["step"] * spec.run.train.batch_size
        val_loss = summary.get("val_loss")
        return dict(
            samples_trained=samples,
            train_flops=3 * facts["flops_per_sample"]["total"] * samples,
            val_bits_per_byte=None if val_loss is None else val_loss / math.log(2),  # byte targets
            val_text_loss=summary.get("text_loss"),
            **{k: v for k, v in summary.items() if k.endswith("_acc") or k.removesuffix("_loss") in CANDIDATES},
            routing=trainer.last_metrics.get("routing"),
        )

    def headline(self, rows: list[Row]) -> str:
        groups = group_rows(rows)
        if "dense" not in groups or (best := best_moe(groups)) is None:
            return ""
        tasks = [t for t in CANDIDATES if any(f"{t}_acc" in r for r in rows)]
        chance = ", ".join(f"{t} {100 * CHANCE[t]:.0f}%" for t in tasks)
        accs = {n: ", ".join(f"{t} {cell(groups[n], f'{t}_acc', '.1%')}" for t in tasks) for n in (best, "dense")}
        return f"Held-out accuracy (chance: {chance}): {best} {accs[best]}; dense {accs['dense']}."

    def sections(self, out: Path, specs: list[RunSpec], rows: list[Row], matching: list[Row]) -> list[str]:
        d, lines = next(m for m in matching if m["name"] == "dense"), []
        for m in (m for m in matching if m["kind"] == "moe"):
            lm = m["lm_flops_per_token"] / d["lm_flops_per_token"] - 1
            total = m["flops_per_sample"]["total"] / d["flops_per_sample"]["total"] - 1
            lines.append(
                f"{m['name']} vs dense: decoder active FLOPs/token {lm:+.2%}, total FLOPs per sample {total:+.2%} "
                "(same encoders; FLOPs per sample measured on the first training batches, decoder on real tokens).\n"
            )
        chance = ", ".join(f"{t} {100 * p:.0f}%" for t, p in CHANCE.items())
        lines += [
            "Held-out data: unseen images, unseen voices, validation plays. Accuracy: the gold answer must have the "
            "highest likelihood among all candidates (10 captions, 10 transcripts, same/different); chance: "
            f"{chance}. Val loss is in nats per target byte over answers and text windows; text loss over "
            "Shakespeare windows.",
            "",
            "## Routing by modality (MoE, held-out data after training)",
            "",
        ]
        for name, routing in _routings(rows).items():
            purities = ", ".join(f"layer {i}: {p:.3f}" for i, p in enumerate(routing["mean_modality_purity"]))
            lines.append(f"- **{name}** mean modality purity {purities}.")
        lines += [
            "",
            "Modality purity of expert e: s_ge = c_ge / n_g (assignments of modality g to expert e per token of g), "
            "purity_e = max_g s_ge / sum_g s_ge; 1 = the expert serves one modality, 1/3 = all three in proportion. "
            "The layer mean weights experts by sum_g s_ge.",
            "",
        ]
        return lines + [f"![{f}]({f})\n" for f in _plot_modality_routing(rows, out)]


def _routings(rows: list[Row]) -> dict[str, Row]:
    """Each MoE model's routing profile of its first seed (held-out data after training)."""
    return {
        n: rs[0]["routing"] for n, rs in group_rows(rows).items() if rs[0]["kind"] == "moe" and rs[0].get("routing")
    }


def _plot_modality_routing(rows: list[Row], out: Path) -> list[str]:
    """Per MoE model (first seed), on the val set after training: each modality's share of its expert
    assignments per expert and layer (heatmaps), and each expert's modality purity per layer."""
    plt = pyplot()
    files = []
    for name, routing in _routings(rows).items():
        by_group = torch.tensor(routing["tokens_per_expert_by_group"])  # [L, Gr, E]
        n_layers, n_groups, n_exp = by_group.shape
        labels = [MODALITIES[g] if g < len(MODALITIES) else f"group {g}" for g in range(n_groups)]
        fig, axes = plt.subplots(
            1, n_layers, figsize=(2.2 + 0.45 * n_exp * n_layers, 2.8), squeeze=False, layout="constrained"
        )
        for li, ax in enumerate(axes[0]):
            im = ax.imshow(load_fractions(by_group[li]).numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
            ax.set_title(f"MoE layer {li} (purity {routing['mean_modality_purity'][li]:.2f})", fontsize=9)
            ax.set(xlabel="expert", xticks=range(n_exp))
            ax.set_yticks(range(n_groups), labels if li == 0 else [""] * n_groups)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the modality's assignments")
        fig.suptitle(f"{name}: expert load per modality on held-out data (uniform = {1 / n_exp:.3f})")
        files.append(save_figure(fig, out, f"modality_load_{name}.png"))

        purity = np.array(routing["modality_purity"])  # [L, E]
        fig, ax = plt.subplots(figsize=(1.5 + 0.55 * n_exp, 1.2 + 0.45 * n_layers), layout="constrained")
        im = ax.imshow(purity, aspect="auto", cmap="viridis", vmin=1 / max(n_groups, 1), vmax=1)
        for (li, e), v in np.ndenumerate(purity):
            ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.75 else "k")
        ax.set(xlabel="expert", ylabel="MoE layer", xticks=range(n_exp), yticks=range(n_layers))
        fig.colorbar(im, ax=ax, label="modality purity")
        ax.set_title(f"{name}: modality purity of each expert", fontsize=10)
        files.append(save_figure(fig, out, f"modality_purity_{name}.png"))
    return files
