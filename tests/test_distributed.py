"""Real 2-process CPU runs (torchrun, gloo): they match a 1-process run with the same global batch, and under
expert parallelism they checkpoint, resume (also on 1 process), save a full final model and sample."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker_train.py")
pytestmark = pytest.mark.slow


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_two_process_run_matches_single_process(tmp_path, moe):
    # Dense: padded targets, so ranks and micro-batches hold different numbers of real tokens.
    extra = ["--moe"] if moe else ["--pad"]
    # 1 process: 8 sequences as 4 micro-batches of 2.  2 processes: 4 each, as 2 micro-batches of 2.
    _run([sys.executable, str(WORKER), str(tmp_path / "one"), "1", "--micro-batch", "2", *extra], tmp_path)
    _run([*TORCHRUN, str(WORKER), str(tmp_path / "two"), "2", "--micro-batch", "2", *extra], tmp_path)

    one, two = _events(tmp_path / "one"), _events(tmp_path / "two")
    train_one = [(e["step"], e["train_loss"]) for e in one if "train_loss" in e]
    train_two = [(e["step"], e["train_loss"]) for e in two if "train_loss" in e]
    assert [s for s, _ in train_one] == [s for s, _ in train_two] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(train_one, train_two):
        assert a == pytest.approx(b, abs=1e-5)
    assert train_one[-1][1] < train_one[0][1] - 0.1  # and the steps did something
    if moe:  # telemetry covers every process's last micro-batch: 2 x 16 tokens per process
        for events, procs in ((one, 1), (two, 2)):
            layers = [e["moe_layers"] for e in events if "moe_layers" in e]
            assert layers and all(layer["num_tokens"] == procs * 2 * 16 for ls in layers for layer in ls)
            assert all(sum(layer["tokens_per_expert"]) == procs * 2 * 16 * 2 for ls in layers for layer in ls)
    val_one = next(e["val_loss"] for e in one if "val_loss" in e)
    val_two = next(e["val_loss"] for e in two if "val_loss" in e)
    assert val_one == pytest.approx(val_two, abs=1e-5)
    from moekit.core.data import StepSampler

    worker = _worker_module()
    train_ds = worker.make_data()[0]
    sampler = StepSampler(len(train_ds), 8, 0)  # the worker's global batch 8, seed 0
    collate = worker.padded_collate if not moe else worker.make_batch
    real = [int((collate(train_ds, sampler.indices(s))["labels"] != -100).sum()) for s in range(5)]
    assert (real[0] < 8 * 16) != moe  # the dense run really is padded
    assert [e["tokens_seen"] for e in two if "train_loss" in e] == [sum(real[: s + 1]) for s in range(5)]
    assert [e["tokens_seen"] for e in one if "train_loss" in e] == [sum(real[: s + 1]) for s in range(5)]
    w_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w_two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name, w in w_one.items():
        torch.testing.assert_close(w_two[name], w, atol=1e-5, rtol=0, msg=name)


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["train_loss"]) for e in _events(run_dir) if "train_loss" in e]


def _worker_module():
    spec = importlib.util.spec_from_file_location("dist_worker_train", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expert_parallel_checkpoint_resume_final_and_sampling(tmp_path):
    """EP=2 (4 experts) on 2 processes. (a) Stopped at step 3 and resumed by a new launch, the run repeats the
    uninterrupted one bit for bit (losses and final weights): every rank got back its expert slice and its
    Adam moments. (b) The final model is the full one: each rank's slice equals its rows of it (checked in
    the worker), it loads in one process and reproduces the run's val loss; sampling from the gathered
    model on rank 0 returns. (c) The EP=2 checkpoint resumes on 1 process (EP=1), continuing to ~1e-5."""
    ep = ["--micro-batch", "2", "--ep", "2"]
    out = _run([*TORCHRUN, WORKER, tmp_path / "full", "2", *ep, "--sample", "--check-final"], tmp_path)
    assert "rank 0: sample 'ab" in out and "rank 0: final ok" in out and "rank 1: final ok" in out
    _run([*TORCHRUN, WORKER, tmp_path / "cut", "2", *ep, "--stop-at", "3"], tmp_path)

    ckpt = tmp_path / "cut" / "ckpt" / "step_0000003"
    experts = load_file(ckpt / "experts.safetensors")
    assert experts["layers.1.ffn.experts.w_down"].shape == (4, 16, 32)  # [E, F, D]: unsharded
    assert {"layers.1.ffn.experts.w_down::exp_avg", "layers.1.ffn.experts.w_down::exp_avg_sq"} <= experts.keys()
    assert not any(".experts." in k for k in load_file(ckpt / "model.safetensors"))  # no rank-0-only slice
    shutil.copytree(tmp_path / "cut", tmp_path / "one")

    # (a) 2 -> 2: identical.
    _run([*TORCHRUN, WORKER, tmp_path / "cut", "2", *ep, "--resume", "--check-final"], tmp_path)
    full, cut = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "cut")
    assert [s for s, _ in full] == [s for s, _ in cut] == [1, 2, 3, 4, 5]
    assert cut == full
    assert full[-1][1] < full[0][1] - 0.1  # and the steps did something
    w_full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    w_cut = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert w_full.keys() == w_cut.keys() and all(torch.equal(w_cut[k], w) for k, w in w_full.items())

    # (c) 2 -> 1: the same run up to float rounding (another reduction order).
    _run([sys.executable, WORKER, tmp_path / "one", "1", "--micro-batch", "2", "--moe", "--resume"], tmp_path)
    one = _train_losses(tmp_path / "one")
    assert [s for s, _ in one] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(full[3:], one[3:]):
        assert b == pytest.approx(a, abs=1e-5)
    w_one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for name, w in w_full.items():
        torch.testing.assert_close(w_one[name], w, atol=1e-5, rtol=0, msg=name)
    # (b) The gathered final model, in this (non-distributed) process, gives the val loss the EP run logged.
    from moekit.core.data import make_batch
    from moekit.core.model import Transformer

    model = Transformer.from_pretrained(tmp_path / "full" / "final").eval()
    assert model.layers[0].ffn.experts.w_gate.shape[0] == 4
    val = _worker_module().make_data()[1]
    idx = torch.arange(8) * len(val) // 8  # Trainer._eval_shard: eval_batches * batch_size windows, evenly spaced
    with torch.no_grad():
        loss = model(**make_batch(val, idx)).loss.item()
    val_loss = next(e["val_loss"] for e in _events(tmp_path / "full") if "val_loss" in e)
    assert loss == pytest.approx(val_loss, abs=1e-5)


def test_multimodal_recipe_on_two_processes_matches_one(tmp_path):
    # Some ranks' micro-batches hold no image or no clip: DDP must accept encoders without gradients there.
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "train_multimodal.py"
    config = recipe.parent / "configs" / "mm-debug.yaml"
    common = ["--config", str(config), f"data.cache_root={tmp_path / 'speech'}", "train.log_every=1"]
    _run([sys.executable, str(recipe), "--out", str(tmp_path / "one"), *common, "train.micro_batch_size=4"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _run([*torchrun, str(recipe), "--out", str(tmp_path / "two"), *common], tmp_path)
    assert "2 process(es)" in out

    one, two = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, abs=1e-5)
    seen = [[e["tokens_seen"] for e in _events(tmp_path / r) if "train_loss" in e] for r in ("one", "two")]
    assert seen[0] == seen[1] and seen[0][0] < 8 * 48  # real targets summed over ranks: exact, not padding
    val = [next(e["val_loss"] for e in reversed(_events(tmp_path / r)) if "val_loss" in e) for r in ("one", "two")]
    assert val[0] == pytest.approx(val[1], abs=1e-5)


def test_multimodal_comparison_on_two_processes(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "compare.py"
    config = recipe.parent / "configs" / "mm-debug.yaml"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--config", str(config), "--out", str(tmp_path / "cmp"), f"data.cache_root={tmp_path / 'speech'}"]
    out = _run([*torchrun, str(recipe), *args, "compare.workers=2"], tmp_path)
    assert out.count("matching (what the comparison holds equal)") == 1  # rank 0 prints the plan, once
    assert "runs train one after another (workers ignored)" in out  # no local worker pools under a launcher
    rows = json.loads((tmp_path / "cmp" / "summary.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["dense", "moe-4x2"]  # both runs trained in one process group
    assert (tmp_path / "cmp" / "report.md").is_file()
    train = [e for e in _events(tmp_path / "cmp" / "runs" / "moe-4x2-seed0") if "train_loss" in e]
    # Real target tokens (answers and text), not padded positions: fewer than steps x batch x padded length,
    # and the same for both runs (same data).
    dense = [e for e in _events(tmp_path / "cmp" / "runs" / "dense-seed0") if "train_loss" in e]
    assert train and 0 < train[-1]["tokens_seen"] < 4 * 8 * 48
    assert [e["tokens_seen"] for e in train] == [e["tokens_seen"] for e in dense]
