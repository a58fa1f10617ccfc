"""The language-model task: Shakespeare windows through the byte tokenizer into a Transformer, trained with
``LMObjective`` and ``MoEExtension(cfg.parallel)`` (a no-op for a dense model) — ``build_lm_trainer``, used by
recipes/train_lm.py — and the comparison's adapter for it (``LMTask``: facts, a text sample from each model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.checks import fail
from moekit.core.configio import RunConfig
from moekit.core.data import PackedSequences, load_corpus, tokenize_splits
from moekit.core.generate import sample_text
from moekit.core.model import Transformer
from moekit.core.objective import LMObjective
from moekit.core.tokenizer import ByteTokenizer
from moekit.core.train import Trainer
from moekit.experiment.adapter import Row, RunSpec, TaskAdapter, cell, group_rows
from moekit.moe.extension import MoEExtension


def build_lm_trainer(
    cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False, expect_processes: int | None = None
) -> tuple[Trainer, ByteTokenizer]:
    """Tokenise the corpus, build the Transformer and its Trainer, write ``config.yaml``, print the model facts.
    ``expect_processes``: the launcher's world size, checked against Accelerate's (see ``Trainer``)."""
    tok = ByteTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        fail("ModelConfig", "vocab_size", cfg.model.vocab_size, f"must be >= the tokenizer's {tok.vocab_size}")
    run_dir = Path(run_dir)
    if resume:
        cfg.check_resumable(run_dir)
    splits = tokenize_splits(load_corpus(cfg.data.corpus), tok)
    train_ds = PackedSequences(splits.train, cfg.data.seq_len)
    val_ds = PackedSequences(splits.val, cfg.data.seq_len)
    set_seed(cfg.train.seed)  # identical initial weights on every rank and on every rerun
    model = Transformer(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    trainer = Trainer(
        model,
        cfg.train,
        run_dir,
        train_ds,
        val_ds,
        resume=resume,
        expect_processes=expect_processes,
        flops_per_token=fpt,
        tokens_per_byte=1.0,  # byte tokenizer; BOS/EOS per document make this a ~1e-5 overestimate of bpb
        hparams=cfg.to_dict(),
        extensions=[MoEExtension(cfg.parallel)],
        objective=LMObjective(),
    )
    if trainer.is_main_process:
        cfg.save(run_dir)
    params = count_params(cfg.model)
    acc = trainer.accelerator
    acc.print(
        f"model: {params.total / 1e6:.3f}M params ({params.active / 1e6:.3f}M active, "
        f"{params.embedding / 1e6:.3f}M embedding), {fpt / 1e6:.3f} MFLOPs/token forward at seq_len "
        f"{cfg.data.seq_len}, ffn layers {cfg.model.ffn_kinds()}, expert_parallel_size "
        f"{cfg.parallel.expert_parallel_size}, dispatch {cfg.parallel.dispatch}"
    )
    acc.print(
        f"data: {cfg.data.corpus} {splits.train.numel():,} train / {splits.val.numel():,} val tokens, "
        f"{len(train_ds):,} train windows; {acc.num_processes} process(es) on {acc.device}, micro-batch "
        f"{trainer.micro_batch_size} x {trainer.accum_steps} accumulation, {cfg.train.mixed_precision} precision"
        + (f"; resuming at step {trainer.step}" if trainer.step else "")
    )
    if trainer.probe_flops:
        acc.print(f"matmul probe: {trainer.probe_flops / 1e9:.1f} GFLOP/s per process (MFU denominator)")
    return trainer, tok


class LMTask(TaskAdapter):
    name = "lm"
    run_config = RunConfig
    summary_fields = ("val_bits_per_byte",)
    result_columns = (("val bits/byte", lambda rs: cell(rs, "val_bits_per_byte")),)

    def seq_len(self, run: RunConfig) -> int:
        return run.data.seq_len

    def build_trainer(self, run: RunConfig, run_dir: Path, *, resume: bool, expect_processes: int | None, state: Any):
        return build_lm_trainer(run, run_dir, resume=resume, expect_processes=expect_processes)[0]

    def results(self, trainer: Any, summary: Row, spec: RunSpec, facts: Row, compare: Any) -> Row:
        full = trainer.gather_full_model()  # collective (expert-parallel shards); the model on the main process
        prompts, n = [compare.prompt], compare.sample_tokens
        sample = (
            "" if full is None or n == 0 else sample_text(full, ByteTokenizer(), prompts, max_new_tokens=n, seed=0)[0]
        )
        return dict(
            train_flops=3 * facts["flops_per_token"] * summary["tokens_seen"],
            val_bits_per_byte=summary.get("val_bpb"),
            sample=sample,
        )

    def sections(self, out: Path, specs: list[RunSpec], rows: list[Row], matching: list[Row]) -> list[str]:
        lines = ["## Samples (same prompt, same sampling seed)", ""]
        if not any(r.get("sample") for r in rows):
            return []  # compare.sample_tokens=0: nothing sampled
        for name, rs in group_rows(rows).items():
            lines += [f"**{name}**", "", "```text", (rs[0].get("sample") or "").strip()[:600], "```", ""]
        return lines
