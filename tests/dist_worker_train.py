"""Worker for test_distributed.py: train a tiny model with Trainer; metrics land in OUT/metrics.jsonl.

Run as ``python tests/dist_worker_train.py OUT 1 ...`` or ``torchrun --nproc_per_node 2 ... OUT 2 ...``.
The data and the global batch are the same whatever the process count, so per-step losses must agree.

Expert parallelism: ``--ep 2`` shards the MoE experts over 2 ranks; ``--stop-at K`` stops after step K
(checkpointing there), ``--resume`` continues from OUT's latest checkpoint; ``--sample`` generates a few
tokens from the gathered model on rank 0 after training (every rank joins the gather); ``--check-final``
makes every rank compare its own weights (its expert slice) with OUT/final, exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences, make_batch
from moekit.core.generate import sample_text
from moekit.core.model import IGNORE_INDEX, Transformer
from moekit.core.tokenizer import ByteTokenizer
from moekit.core.train import TrainConfig, Trainer
from moekit.moe.config import MoEConfig, ParallelConfig
from moekit.moe.ep_checkpoint import local_expert_range, routed_expert_weights
from moekit.moe.extension import MoEExtension


def make_data() -> tuple[PackedSequences, PackedSequences]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.where(
        torch.rand(3000, generator=gen) < 0.1, torch.randint(0, 256, (3000,), generator=gen), torch.arange(3000) % 37
    )
    return PackedSequences(tokens[:2500], 16), PackedSequences(tokens[2500:], 16)


def padded_collate(dataset: PackedSequences, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets removed (-100) at a data-dependent, per-row uneven share of positions: ranks and micro-batches
    then hold different numbers of real targets, which tokens_seen must sum exactly."""
    batch = make_batch(dataset, indices)
    drop_bt = (batch["input_ids"] % 4 == 0) | (torch.arange(16) >= 16 - indices[:, None] % 6)
    batch["labels"] = batch["labels"].masked_fill(drop_bt, IGNORE_INDEX)
    return batch


def model_config(moe: bool) -> ModelConfig:
    # Aux-loss-free biases with global scope: counts are all-reduced, so the update is world-size invariant.
    # The load-balance loss is not (it sees one micro-batch per rank), hence its coefficient 0 here.
    moe_cfg = MoEConfig(
        num_experts=4,
        top_k=2,
        d_expert=16,
        bias_update_rate=0.01,
        balance_scope="global",
        load_balance_coef=0.0,
    )
    return ModelConfig(
        vocab_size=272, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe=moe_cfg if moe else None
    )


def check_final(trainer: Trainer, ext: MoEExtension, out: Path) -> None:
    """This rank's weights (its expert slice) equal the saved full model's, bit for bit."""
    saved = load_file(out / "final" / "model.safetensors")
    model = trainer.unwrapped_model
    experts = {name: num_experts for name, _, num_experts in routed_expert_weights(model)}
    for name, local in model.state_dict().items():
        if name == "lm_head.weight" and name not in saved:
            continue  # tied to the embedding, stored once
        full = saved[name]
        if name in experts:
            lo, hi = local_expert_range(experts[name], local.shape[0], ext.groups)
            assert full.shape[0] == experts[name], (name, full.shape)
            full = full[lo:hi]
        assert torch.equal(full, local), name
    saved_cfg = json.loads((out / "final" / "config.json").read_text())["moe"]
    assert saved_cfg == model.cfg.moe.to_dict() and "expert_parallel_size" not in saved_cfg  # the model only


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("expect_processes", type=int)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--ep", type=int, default=1, help="expert_parallel_size (implies --moe)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stop-at", type=int, default=None, help="train(max_steps=K)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--check-final", action="store_true")
    parser.add_argument("--pad", action="store_true", help="remove some targets (padded_collate)")
    args = parser.parse_args()

    train, val = make_data()
    model_cfg = model_config(args.moe or args.ep > 1)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=8,
        micro_batch_size=args.micro_batch,
        lr=3e-3,
        warmup_steps=1,
        log_every=1,
        eval_every=5,
        eval_batches=1,
        log_with="none",
        progress_bar=False,
        mfu_probe=False,
        cpu=True,
    )
    torch.manual_seed(0)
    ext = MoEExtension(ParallelConfig(expert_parallel_size=args.ep))
    collate = padded_collate if args.pad else make_batch
    trainer = Trainer(
        Transformer(model_cfg), cfg, args.out, train, val, resume=args.resume, extensions=[ext], collate=collate
    )
    try:
        assert trainer.accelerator.num_processes == args.expect_processes, trainer.accelerator.num_processes
        trainer.train(max_steps=args.stop_at)
        rank = trainer.accelerator.process_index
        if args.sample:
            full = trainer.gather_full_model()  # collective: every rank joins
            if full is not None:
                text = sample_text(full, ByteTokenizer(), ["ab"], max_new_tokens=6, seed=0)[0]
                print(f"rank {rank}: sample {text!r}", flush=True)
            trainer.accelerator.wait_for_everyone()
        if args.check_final:
            check_final(trainer, ext, Path(args.out))
            print(f"rank {rank}: final ok", flush=True)
    finally:
        trainer.close()  # destroys the process group: gloo aborts at exit otherwise


if __name__ == "__main__":
    main()
    # Leave without interpreter finalization, where torch's autograd-engine / gloo teardown can hang at random
    # (pytorch/pytorch#190489; seen once in a full-suite run here): everything is written and the group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
