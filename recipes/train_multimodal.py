"""Train a multimodal model (image + audio encoders around a dense or MoE decoder) on the digit tasks.

    python recipes/train_multimodal.py --config recipes/configs/mm-debug.yaml --out runs/mm-debug
    python recipes/train_multimodal.py --config recipes/configs/mm-cpu.yaml --out runs/mm-cpu
    python recipes/train_multimodal.py --config recipes/configs/mm-cpu.yaml --out runs/mm-dense model.lm.moe=null
    python recipes/train_multimodal.py --config recipes/configs/mm-cpu.yaml --out runs/mm-groups \
        model.lm.moe.modality_experts=[3,2,2]
    python recipes/train_multimodal.py --out runs/mm-cpu --resume     # continue with the saved OUT/config.yaml
    python recipes/train_multimodal.py --out runs/mm-cpu --resume-from runs/mm-cpu/ckpt/step_0000200

Tasks: image -> caption, audio -> transcript, image + audio -> same/different, Shakespeare text LM.
Overrides are dotted ``section.key=value`` pairs (positional or ``--set``), applied after the YAML file;
sections: model (MultimodalConfig: lm, image, audio, *_projector), train, tasks, data, eval, parallel
(ParallelConfig: ``parallel.dispatch``, ``parallel.expert_parallel_size`` of the decoder's MoE layers; a ``compare``
section, read by recipes/compare.py, is ignored here). The resolved
config is written to ``OUT/config.yaml``; metrics (with per-modality routing per MoE layer) to
``OUT/metrics.jsonl``; checkpoints to ``OUT/ckpt``; the final model to ``OUT/final``. At the end the
held-out accuracy of every task is printed next to its chance level. ``--out``, resume and failures behave as
in train_lm.py (exit code 2: refused folder, resume or damaged checkpoint; 3: the run diverged).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from moekit.core.configio import CONFIG_FILE
from moekit.core.guard import TrainingDiverged
from moekit.core.run_folder import RUN_ERRORS, open_run_folder
from moekit.multimodal.train import CHANCE, build_multimodal_trainer, load_mm_run_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML preset (e.g. recipes/configs/mm-cpu.yaml); with --resume, default OUT/config.yaml"
    )
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/ckpt/latest)")
    parser.add_argument(
        "--resume-from",
        metavar="CKPT",
        help="continue from OUT/ckpt/step_N instead of the latest (newer checkpoints move to OUT/ckpt/discarded)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (1 is much faster for these small models on a busy CPU)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        resume = open_run_folder(args.out, args.resume, args.resume_from)
        config = Path(args.out) / CONFIG_FILE if args.config is None and resume else args.config
        cfg = load_mm_run_config(config, [*args.overrides, *args.set])
    except (ValueError, FileNotFoundError) as err:  # a refused folder, a bad config value or file: named
        parser.exit(2, f"train_multimodal: error: {err}\n")
    try:
        world = (
            int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
        )  # checked against Accelerate's group (see train_lm.py)
        trainer = build_multimodal_trainer(cfg, args.out, resume=resume, expect_processes=world)
    except RUN_ERRORS as err:
        parser.exit(2, f"train_multimodal: error: {err}\n")
    acc = trainer.accelerator
    report = trainer.unwrapped_model.report(seq_len=cfg.model.lm.max_seq_len)
    acc.print(f"model: params {json.dumps(report.params)}; forward FLOPs {json.dumps(report.flops)}")
    acc.print(
        f"{acc.num_processes} process(es) on {acc.device}; tasks {list(trainer.tasks.tasks)}"
        + (f"; resuming at step {trainer.step}" if trainer.step else "")
    )
    try:
        summary = trainer.train()
    except TrainingDiverged as err:
        trainer.close()
        parser.exit(3, f"train_multimodal: error: {err}\n")
    if trainer.is_main_process:
        nan = float("nan")
        for task, chance in CHANCE.items():
            if f"{task}_acc" in summary:
                print(f"  {task:<11} held-out accuracy {summary[f'{task}_acc']:.3f} (chance {chance:.2f})")
        print(
            f"----- done: step {summary['step']}, val_loss {summary.get('val_loss', nan):.4f}, "
            f"text_loss {summary.get('text_loss', nan):.4f}, train_loss {summary.get('train_loss', nan):.4f}, "
            f"{summary['train_seconds']:.1f}s of training"
        )
    trainer.close()
    return summary


if __name__ == "__main__":
    main()
