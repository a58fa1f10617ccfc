"""Train a byte-level language model (dense or MoE) on a registered corpus.

    python recipes/train_lm.py --config recipes/configs/cpu-small.yaml --out runs/cpu-small
    python recipes/train_lm.py --config recipes/configs/debug.yaml --out runs/dbg model.moe.num_experts=4
    torchrun --nproc_per_node 2 recipes/train_lm.py --config recipes/configs/debug.yaml --out runs/dbg2
    torchrun --nproc_per_node 2 recipes/train_lm.py --config recipes/configs/debug.yaml --out runs/ep2 \
        model.moe.num_experts=4 model.moe.d_expert=64 parallel.expert_parallel_size=2   # experts sharded
    accelerate launch recipes/train_lm.py --config recipes/configs/gpu.yaml --out runs/gpu
    python recipes/train_lm.py --out runs/dbg --resume         # continue with the saved OUT/config.yaml
    python recipes/train_lm.py --out runs/dbg --resume-from runs/dbg/ckpt/step_0000010 train.lr=1e-3

``--out`` must be new or empty, or hold this recipe's run with ``--resume`` (README, "Runs, resume and
failures": which fields may change on resume). A diverging run stops with exit code 3 and the last good
checkpoint; a refused folder, resume or damaged checkpoint exits with code 2 and one line naming it.

Overrides are dotted ``section.key=value`` pairs (positional or ``--set``), applied after the YAML file.
The resolved config is written to ``OUT/config.yaml``; metrics to ``OUT/metrics.jsonl`` and ``OUT/tb``;
checkpoints to ``OUT/ckpt``; the final model (``save_pretrained``) to ``OUT/final``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moekit.core.configio import CONFIG_FILE, load_run_config
from moekit.core.generate import sample_text
from moekit.core.guard import TrainingDiverged
from moekit.core.run_folder import RUN_ERRORS, open_run_folder
from moekit.experiment.lm import build_lm_trainer

PROMPTS = ("**ROMEO**\n", "**HAMLET**\nTo be, or not", "**KING HENRY V**\nOnce more")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML preset (e.g. recipes/configs/debug.yaml); with --resume, default OUT/config.yaml"
    )
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/ckpt/latest)")
    parser.add_argument(
        "--resume-from",
        metavar="CKPT",
        help="continue from OUT/ckpt/step_N instead of the latest (newer checkpoints move to OUT/ckpt/discarded)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--samples", type=int, default=len(PROMPTS), help="texts to generate at the end")
    parser.add_argument("--sample-tokens", type=int, default=200)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)

    try:
        resume = open_run_folder(args.out, args.resume, args.resume_from)
        config = args.config
        if config is None and resume:
            config = Path(args.out) / CONFIG_FILE  # resume as configured before, unless told otherwise
        cfg = load_run_config(config, [*args.overrides, *args.set])
    except (ValueError, FileNotFoundError) as err:  # a refused folder, a bad config value or file: named
        parser.exit(2, f"train_lm: error: {err}\n")
    try:
        # A launcher's WORLD_SIZE that Accelerate does not reproduce means N separate runs: refuse it.
        world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        trainer, tokenizer = build_lm_trainer(cfg, args.out, resume=resume, expect_processes=world)
    except RUN_ERRORS as err:
        parser.exit(2, f"train_lm: error: {err}\n")
    try:
        summary = trainer.train()
    except TrainingDiverged as err:
        trainer.close()
        parser.exit(3, f"train_lm: error: {err}\n")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.samples)]
    # Collective: every rank joins the gather of expert shards; the main process gets a one-process model.
    full = trainer.gather_full_model() if prompts else None
    if trainer.is_main_process:
        if full is not None:
            texts = sample_text(full, tokenizer, prompts, max_new_tokens=args.sample_tokens)
            for text in texts:
                print(f"----- sample\n{text}")
        nan = float("nan")
        print(
            f"----- done: step {summary['step']}, val_loss {summary.get('val_loss', nan):.4f} "
            f"(bpb {summary.get('val_bpb', nan):.4f}), train_loss {summary.get('train_loss', nan):.4f}, "
            f"{summary.get('mean_tokens_per_s', 0.0):,.0f} tokens/s over {summary['train_seconds']:.1f}s of training"
        )
    trainer.close()
    return summary


if __name__ == "__main__":
    main()
