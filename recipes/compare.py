"""Sparse vs dense at matched compute: train a MoE model and its FLOP-matched dense twin identically.

    python recipes/compare.py --config recipes/configs/compare-cpu.yaml --out runs/compare
    python recipes/compare.py --config recipes/configs/compare-cpu.yaml --out runs/compare --seeds 3
    python recipes/compare.py --config recipes/configs/compare-debug.yaml --out runs/sweep \
        --sweep num_experts=1,2,4,8
    accelerate launch --multi_gpu --num_processes 8 recipes/compare.py --config recipes/configs/compare-gpu.yaml \
        --out runs/compare-gpu
    python recipes/compare.py --config recipes/configs/mm-cpu.yaml --out runs/mm-compare     # compare.task: multimodal

The YAML holds the MoE base run (model with a moe section, train, data) and a `compare` section; dotted
overrides follow (`model.moe.num_experts=16 compare.budget=flops`). The matching (params total/active,
FLOPs per token) is printed before any training, and a comparison whose active FLOPs differ by more than
`compare.max_flops_mismatch` is refused unless `--allow-mismatch`. Rerunning the same command resumes:
finished runs are reused, an interrupted run continues from its last checkpoint. Outputs in OUT:
report.md, summary.json, PNG plots, runs/<model>-seed<k>/ (each a full train_lm run folder).

`compare.task` picks the comparison: `lm` (default; Shakespeare, moekit.moe.compare) or `multimodal` (image,
audio and text tasks through one decoder, moekit.multimodal.compare: encoders identical in both models, the
report adds held-out accuracy per task and per-modality expert load and purity). --sweep, --param-matched and
--budget belong to the language-model comparison.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch.distributed as dist
import yaml

from moekit.core.layering import load_config, parse_override
from moekit.moe.compare import TASKS, ComparisonConfig, matching_table, parse_sweep, plan_runs, run_comparison
from moekit.moe.report import headline, write_report


def comparison_task(config: str | None, overrides: list[str]) -> str:
    """``compare.task`` from the YAML, then the overrides (the last one wins); "lm" when unset."""
    task = "lm"
    if config is not None:
        tree = yaml.safe_load(Path(config).read_text()) or {}
        section = tree.get("compare") if isinstance(tree, dict) else None
        task = section.get("task", task) if isinstance(section, dict) else task
    for o in overrides:
        key, value = parse_override(o)
        if key == "compare.task":
            task = value
    if task not in TASKS:
        raise ValueError(f"compare.task={task!r} is invalid: allowed values are {TASKS}")
    return task


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
    if args.seeds is not None:
        overrides.append(f"compare.seeds={args.seeds}")
    if args.allow_mismatch:
        overrides.append("compare.allow_mismatch=true")
    if comparison_task(args.config, overrides) == "multimodal":
        for flag, value in (
            ("--param-matched", args.param_matched),
            ("--sweep", args.sweep),
            ("--budget", args.budget),
        ):
            if value:
                p.error(f"{flag} is for the language-model comparison (compare.task=lm), not compare.task=multimodal")
        return _multimodal(args.config, overrides, Path(args.out), args.dry_run)
    if args.param_matched:
        overrides.append("compare.param_matched=true")
    if args.sweep:
        overrides.append(f"compare.sweep={args.sweep}")
    if args.budget:
        overrides.append(f"compare.budget={args.budget}")
    cfg = load_config(ComparisonConfig, args.config, overrides)
    specs = plan_runs(cfg)
    matching = matching_table(specs)
    # The process group starts with the first run's Accelerator; until then the launcher's RANK tells.
    if os.environ.get("RANK", "0") == "0":
        print(f"matching (forward FLOPs per token at seq_len {cfg.data.seq_len}):")
        print(f"  {'model':<24} {'kind':<6} {'params total':>14} {'params active':>14} {'FLOPs/token':>14} steps")
        for m in matching:
            print(
                f"  {m['name']:<24} {m['kind']:<6} {m['params_total']:>14,} {m['params_active']:>14,} "
                f"{m['flops_per_token']:>14,} {m['steps']}"
            )
        print(f"{len(specs)} runs: " + ", ".join(s.folder for s in specs), flush=True)
    if args.dry_run:
        return []
    out = Path(args.out)
    rows = run_comparison(cfg, out, expect_processes=_launcher_world_size())
    if not dist.is_initialized() or dist.get_rank() == 0:
        sweep_key = parse_sweep(cfg.compare.sweep)[0] if cfg.compare.sweep else None
        report = write_report(out, specs, rows, matching, cfg.to_dict(), sweep_key)
        print(f"\n{headline(rows)}\nreport: {report}")
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo aborts at exit otherwise
    return rows


def _launcher_world_size() -> int | None:
    """torchrun / accelerate launch set WORLD_SIZE; other launchers (e.g. mpirun) leave the check to Accelerate."""
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def _multimodal(config: str | None, overrides: list[str], out: Path, dry_run: bool) -> list[dict]:
    from moekit.multimodal.compare import MultimodalComparisonConfig, run_multimodal_comparison

    cfg = load_config(MultimodalComparisonConfig, config, overrides)
    world = _launcher_world_size()
    # Prints the matching (rank 0: no process group exists yet to ask); rank 0 writes the report.
    rows = run_multimodal_comparison(
        cfg, out, dry_run=dry_run, verbose=os.environ.get("RANK", "0") == "0", expect_processes=world
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
