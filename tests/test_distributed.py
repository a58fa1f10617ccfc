"""A real 2-process CPU run (torchrun, gloo) matches a 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker_train.py")
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_two_process_run_matches_single_process(tmp_path, moe):
    extra = ["--moe"] if moe else []
    # 1 process: 8 sequences as 4 micro-batches of 2.  2 processes: 4 each, as 2 micro-batches of 2.
    _run([sys.executable, str(WORKER), str(tmp_path / "one"), "1", "--micro-batch", "2", *extra], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(WORKER), str(tmp_path / "two"), "2", "--micro-batch", "2", *extra], tmp_path)

    one, two = _events(tmp_path / "one"), _events(tmp_path / "two")
    train_one = [(e["step"], e["train_loss"]) for e in one if "train_loss" in e]
    train_two = [(e["step"], e["train_loss"]) for e in two if "train_loss" in e]
    assert [s for s, _ in train_one] == [s for s, _ in train_two] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(train_one, train_two):
        assert a == pytest.approx(b, abs=1e-5)
    assert train_one[-1][1] < train_one[0][1] - 0.1  # and the steps did something
    val_one = next(e["val_loss"] for e in one if "val_loss" in e)
    val_two = next(e["val_loss"] for e in two if "val_loss" in e)
    assert val_one == pytest.approx(val_two, abs=1e-5)
    assert two[0]["tokens_seen"] == one[0]["tokens_seen"] == 8 * 16
    w_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name, w in w_one.items():
        torch.testing.assert_close(w_two[name], w, atol=1e-5, rtol=0, msg=name)
