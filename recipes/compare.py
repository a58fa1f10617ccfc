"""Sparse vs dense at matched compute: train a MoE model and its FLOP-matched dense twin identically.

    python recipes/compare.py --config recipes/configs/compare-cpu.yaml --out runs/compare
    python recipes/compare.py --config recipes/configs/compare-cpu.yaml --out runs/compare --seeds 3
    python recipes/compare.py --config recipes/configs/compare-debug.yaml --out runs/sweep \
        --sweep num_experts=1,2,4,8
    accelerate launch --multi_gpu --num_processes 8 recipes/compare.py --config recipes/configs/compare-gpu.yaml \
        --out runs/compare-gpu
    python recipes/compare.py --config recipes/configs/mm-cpu.yaml --out runs/mm-compare     # compare.task: multimodal

The YAML holds the MoE base run (the task's run config, with a moe section in its decoder) and a `compare`
section; dotted overrides follow (`model.moe.num_experts=16 compare.budget=flops compare.workers=2`). The
matching (params, FLOPs per token) is printed before any training, and a comparison whose active FLOPs
differ by more than `compare.max_flops_mismatch` is refused unless `--allow-mismatch`. Rerunning the same
command resumes: finished runs are reused, an interrupted run continues from its last checkpoint, and a run
folder trained with another config is refused. A run that diverges (`TrainingDiverged`) does not stop the
comparison: it is recorded (status `diverged`, step, reason) in its result.json, summary.json and the report,
the verdicts skip its seed and say so, and the command exits 0 after writing the report, its last line the
verdict as always (a rerun reuses the diverged result; retry in a new OUT). Outputs in OUT: report.md,
summary.json, PNG plots, runs/<model>-seed<k>/ (each a full training run folder). OUT must be new, empty or
a comparison's own folder (holding summary.json or runs/); a refused value, plan, folder or resume prints one
line and exits with code 2.

`compare.task` picks the task adapter (moekit.experiment.plan.TASKS): `lm` (default; Shakespeare) or
`multimodal` (image, audio and text tasks through one decoder: encoders identical in both models, the
report adds held-out accuracy per task and per-modality expert load and purity). `compare.workers=2` trains
two runs side by side, each in its own process (`compare.threads` torch threads each).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch.distributed as dist

from moekit.core.run_folder import RUN_ERRORS
from moekit.experiment.plan import load_comparison, plan_runs
from moekit.experiment.runner import check_compare_out, run_comparison


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="comparison YAML (e.g. recipes/configs/compare-cpu.yaml)")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--seeds", type=int, help="runs per model (sets compare.seeds)")
    p.add_argument("--param-matched", action="store_true", help="also train a dense model with the MoE's total params")
    p.add_argument("--sweep", help="e.g. num_experts=1,4,8,16 (also top_k, capacity_factor, router)")
    p.add_argument("--budget", choices=["tokens", "flops"], help="equal tokens (default) or equal training FLOPs")
    p.add_argument("--allow-mismatch", action="store_true", help="run even if active FLOPs differ by more than 2%%")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the matching, train nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=200")
    args = p.parse_intermixed_args(argv)

    overrides = list(args.overrides)
    for flag, value in (
        ("seeds", args.seeds),
        ("allow_mismatch", args.allow_mismatch or None),
        ("param_matched", args.param_matched or None),
        ("sweep", args.sweep),
        ("budget", args.budget),
    ):
        if value is not None:
            overrides.append(f"compare.{flag}={'true' if value is True else value}")
    try:  # a bad value, key or file, a dense base model, a refused plan or --out folder: one line, exit 2
        cmp = load_comparison(args.config, overrides)
        plan_runs(cmp)  # the plan's own refusals (compute mismatch, repeated models) before any work
        check_compare_out(args.out)
    except (ValueError, FileNotFoundError) as err:
        p.exit(2, f"compare: error: {err}\n")
    # torchrun / accelerate launch set WORLD_SIZE and RANK; the process group starts with the first run's
    # Accelerator, so until then RANK says which process prints the plan.
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    try:
        rows = run_comparison(
            cmp,
            Path(args.out),
            dry_run=args.dry_run,
            verbose=os.environ.get("RANK", "0") == "0",
            expect_processes=world,
        )
    except RUN_ERRORS as err:  # a run folder trained with another config, a damaged checkpoint
        p.exit(2, f"compare: error: {err}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo aborts at exit otherwise
    return rows


if __name__ == "__main__":
    main()
