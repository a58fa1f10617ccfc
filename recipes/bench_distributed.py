"""Training throughput on 1 vs N processes, with and without expert parallelism, measured side by side.

    python recipes/bench_distributed.py                       # MoE of compare-cpu.yaml, 2 processes, 3 rounds
    python recipes/bench_distributed.py --rounds 1 --steps 20 --json runs/bench_dist.json
    python recipes/bench_distributed.py --config recipes/configs/debug.yaml model.moe.num_experts=4 \
        model.moe.d_expert=64

Each setting is a real `recipes/train_lm.py` run (`torchrun --standalone` for N > 1 processes, gloo on CPU
with ACCELERATE_USE_CPU=1) with the same model, global batch and data; the settings are interleaved round by
round so that drifting machine load hits all of them alike, and the median over rounds is reported.
Tokens/s is the trainer's own number (global tokens per second of training step time, evaluation and
checkpoints excluded), the median over its log windows after the first (warm-up) one. Peak RSS is the
largest resident set of one training process (includes the Python, torch and data footprint, so it shows
differences such as EP's halved expert state on top of a common base).

Settings: 1 process with all N threads (what one process makes of the machine), 1 process with 1 thread,
N processes x 1 thread with data parallelism (DDP, experts replicated), and N processes x 1 thread with
expert parallelism (`parallel.expert_parallel_size=N`: each rank holds E/N experts; tokens travel by
all-to-all). Library code is untouched: this script only launches recipes and reads their metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).with_name("train_lm.py")
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "compare-cpu.yaml"


def settings(n: int) -> list[tuple[str, int, int, int]]:
    """``(name, processes, threads per process, expert_parallel_size)`` of every measured setting."""
    return [
        (f"1 process x {n} threads", 1, n, 1),
        ("1 process x 1 thread", 1, 1, 1),
        (f"{n} processes x 1 thread, DDP", n, 1, 1),
        (f"{n} processes x 1 thread, DDP + EP={n}", n, 1, n),
    ]


def run_once(config: str, overrides: list[str], procs: int, threads: int, ep: int, out: Path) -> dict:
    """One training run; returns its tokens/s (median over log windows after the first) and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable]
    if procs > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*launch, str(RECIPE), "--config", config, "--out", str(out), "--samples", "0", *overrides]
    if ep > 1:
        cmd.append(f"parallel.expert_parallel_size={ep}")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = _watch_peak_rss(proc)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-6000:]}")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    if len(tps) < 2:
        raise RuntimeError(f"{out}: fewer than 2 log windows; raise --steps or lower --log-every")
    return {"tokens_per_s": statistics.median(tps[1:]), "wall_s": wall, "peak_rss_mib": peak / 2**20}


def _watch_peak_rss(proc: subprocess.Popen, interval_s: float = 0.1) -> int:
    """Wait for ``proc``; return the largest resident set of one training process (the launched process,
    or under torchrun each worker it starts) seen while it ran, in bytes."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = root.children(recursive=True) or [root]
            peak = max([peak, *(p.memory_info().rss for p in procs)])
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(interval_s)
    return peak


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="train_lm YAML with a model.moe section")
    p.add_argument("--processes", type=int, default=2, help="N: processes of the multi-process settings")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats of all settings (median reported)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every run")
    args = p.parse_intermixed_args(argv)
    if args.processes < 2:
        p.error(f"--processes={args.processes} is invalid: must be >= 2")
    if args.steps < 2 * args.log_every:
        p.error(f"--steps={args.steps} must be at least 2 x --log-every={args.log_every} (two log windows)")

    overrides = [
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_with=none",
        "train.progress_bar=false",
        "train.mfu_probe=false",
        *args.overrides,
    ]
    todo = settings(args.processes)
    results: dict[str, list[dict]] = {name: [] for name, *_ in todo}
    with tempfile.TemporaryDirectory(prefix="moekit-bench-dist-") as tmp:
        for r in range(args.rounds):
            for name, procs, threads, ep in todo:
                res = run_once(args.config, overrides, procs, threads, ep, Path(tmp) / "run")
                results[name].append(res)
                print(f"round {r + 1}/{args.rounds}  {name:<36} {res['tokens_per_s']:>9,.0f} tokens/s", flush=True)

    base = statistics.median(x["tokens_per_s"] for x in results[todo[0][0]])
    rows = []
    for name, procs, threads, ep in todo:
        tps = statistics.median(x["tokens_per_s"] for x in results[name])
        mem = statistics.median(x["peak_rss_mib"] for x in results[name])
        rows.append(dict(setting=name, processes=procs, threads=threads, expert_parallel_size=ep, tokens_per_s=tps))
        rows[-1].update(vs_first=tps / base, peak_rss_mib_per_process=mem)
    print(f"\nconfig {args.config} {' '.join(args.overrides)}; {args.steps} steps, median of {args.rounds} round(s)")
    print(f"| setting | tokens/s | vs {todo[0][0]} | peak RSS per process (MiB) |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['tokens_per_s']:,.0f} | {row['vs_first']:.2f}x | "
            f"{row['peak_rss_mib_per_process']:,.0f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
