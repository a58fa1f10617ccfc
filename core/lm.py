"""The language-model wiring of the Trainer: Shakespeare windows through the byte tokenizer into a Transformer,
and sampling from the trained model. Used by recipes/train_lm.py and the sparse-vs-dense comparison."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from moekit.core.configio import RunConfig
from moekit.core.tokenizer import ByteTokenizer
from moekit.core.train import Trainer
from moekit.core.train_config import _fail


def build_lm_trainer(
    cfg: RunConfig, run_dir: str | os.PathLike, *, resume: bool = False, expect_processes: int | None = None
) -> tuple[Trainer, ByteTokenizer]:
    """Tokenise the corpus, build the Transformer and its Trainer, write ``config.yaml``, print the model facts.
    ``expect_processes``: the launcher's world size, checked against Accelerate's (see ``Trainer``)."""
    from moekit.core.accounting import count_params, flops_per_token
    from moekit.core.data import PackedSequences, load_corpus, tokenize_splits
    from moekit.core.model import Transformer
    from moekit.core.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        _fail("ModelConfig", "vocab_size", cfg.model.vocab_size, f"must be >= the tokenizer's {tok.vocab_size}")
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
    )
    if trainer.is_main_process:
        cfg.save(run_dir)
    params = count_params(cfg.model)
    acc = trainer.accelerator
    acc.print(
        f"model: {params.total / 1e6:.3f}M params ({params.active / 1e6:.3f}M active, "
        f"{params.embedding / 1e6:.3f}M embedding), {fpt / 1e6:.3f} MFLOPs/token forward at seq_len "
        f"{cfg.data.seq_len}, ffn layers {cfg.model.ffn_kinds()}"
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


def sample_text(
    model: nn.Module,
    tokenizer: ByteTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt (batched, left-padded); returns prompt + continuation texts."""
    from moekit.core.generate import generate

    device = next(model.parameters()).device
    ids_bt = tokenizer.encode(list(prompts), add_bos=True, padding_side="left").to(device)  # [B, T]
    mask_bt = (ids_bt != tokenizer.PAD).long()
    gen = torch.Generator(device=device).manual_seed(seed)
    out_bt = generate(
        model,
        ids_bt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=tokenizer.EOS,
        pad_token_id=tokenizer.PAD,
        attention_mask=mask_bt,
        generator=gen,
    )
    return tokenizer.decode_batch(out_bt)
