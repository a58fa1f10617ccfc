"""Worker for test_distributed.py: train a tiny model with Trainer; metrics land in OUT/metrics.jsonl.

Run as ``python tests/dist_worker_train.py OUT 1 ...`` or ``torchrun --nproc_per_node 2 ... OUT 2 ...``.
The data and the global batch are the same whatever the process count, so per-step losses must agree.
"""

from __future__ import annotations

import argparse

import torch

from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences
from moekit.core.model import Transformer
from moekit.core.train import TrainConfig, Trainer
from moekit.moe.config import MoEConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("expect_processes", type=int)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--moe", action="store_true")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    tokens = torch.where(
        torch.rand(3000, generator=gen) < 0.1, torch.randint(0, 256, (3000,), generator=gen), torch.arange(3000) % 37
    )
    train, val = PackedSequences(tokens[:2500], 16), PackedSequences(tokens[2500:], 16)
    # Aux-loss-free biases with global scope: counts are all-reduced, so the update is world-size invariant.
    # The load-balance loss is not (it sees one micro-batch per rank), hence its coefficient 0 here.
    moe = MoEConfig(
        num_experts=4, top_k=2, d_expert=16, bias_update_rate=0.01, balance_scope="global", load_balance_coef=0.0
    )
    model_cfg = ModelConfig(
        vocab_size=272, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, moe=moe if args.moe else None
    )
    cfg = TrainConfig(
        steps=5,
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
    trainer = Trainer(Transformer(model_cfg), cfg, args.out, train, val)
    try:
        assert trainer.accelerator.num_processes == args.expect_processes, trainer.accelerator.num_processes
        trainer.train()
    finally:
        trainer.close()  # destroys the process group: gloo aborts at exit otherwise


if __name__ == "__main__":
    main()
