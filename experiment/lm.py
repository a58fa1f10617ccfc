"""The language-model task of the comparison: Shakespeare windows through the byte tokenizer, and a text
sample from each trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.configio import RunConfig
from moekit.core.lm import build_lm_trainer, sample_text
from moekit.core.tokenizer import ByteTokenizer
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, cell, group_rows


class LMTask(TaskAdapter):
    name = "lm"
    run_config = RunConfig
    summary_fields = ("val_bits_per_byte",)
    matching_columns = (
        ("params total", lambda m: f"{m['params_total']:,}"),
        ("params active", lambda m: f"{m['params_active']:,}"),
        ("FLOPs/token (fwd)", lambda m: f"{m['flops_per_token']:,}"),
        ("steps", lambda m: str(m["steps"])),
    )
    result_columns = (("val bits/byte", lambda rs: cell(rs, "val_bits_per_byte")),)

    def seq_len(self, run: RunConfig) -> int:
        return run.data.seq_len

    def facts(self, run: RunConfig, state: Any) -> Row:
        pc = count_params(run.model)
        fpt = flops_per_token(run.model, run.data.seq_len)
        return dict(params_total=pc.total, params_active=pc.active, flops_per_token=fpt, steps=run.train.steps)

    def build_trainer(self, run: RunConfig, run_dir: Path, *, resume: bool, expect_processes: int | None, state: Any):
        return build_lm_trainer(run, run_dir, resume=resume, expect_processes=expect_processes)[0]

    def results(self, trainer: Any, summary: Row, spec: RunSpec, facts: Row, compare: Any) -> Row:
        full = trainer.gather_full_model()  # collective (expert-parallel shards); the model on the main process
        prompts, n = [compare.prompt], compare.sample_tokens
        sample = "" if full is None else sample_text(full, ByteTokenizer(), prompts, max_new_tokens=n, seed=0)[0]
        return dict(
            train_flops=3 * facts["flops_per_token"] * summary["tokens_seen"],
            val_bits_per_byte=summary.get("val_bpb"),
            sample=sample,
        )

    def sections(self, out: Path, specs: list[RunSpec], rows: list[Row], matching: list[Row]) -> list[str]:
        lines = ["## Samples (same prompt, same sampling seed)", ""]
        for name, rs in group_rows(rows).items():
            lines += [f"**{name}**", "", "```text", (rs[0].get("sample") or "").strip()[:600], "```", ""]
        return lines
