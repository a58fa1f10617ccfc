"""Fault injection through the real recipes (issue 11), on the debug preset with a few steps: kill -9 at
chosen moments (after a step, mid-save, before ``latest`` moves, mid-append to metrics.jsonl) in a fresh
process, each followed by a resume that must end on the weights of an uninterrupted run; a NaN gradient at a
chosen step; absurd learning rates; every checkpoint file kind corrupted in turn; refused ``--out`` /
``--resume`` folders and fixed fields changed on resume. Each case checks the named error (or the exact
resume) and that no good checkpoint was lost. The faults come from tests/fault_driver.py (this process's
patches only) or from plain recipe arguments."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from safetensors.torch import load_file

from moekit.core.checkpoint import unreadable_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
DRIVER = Path(__file__).resolve().parent / "fault_driver.py"
DEBUG = str(RECIPES / "configs" / "debug.yaml")
STEPS = 6
RUN = [
    "--config", DEBUG, "--samples", "0", f"train.steps={STEPS}",
    "train.save_every=1", "train.keep_checkpoints=2", "train.log_every=1", "train.eval_every=3",
    "train.eval_batches=1", "train.log_with=none", "train.progress_bar=false", "train.mfu_probe=false",
    "model.moe.num_experts=4", "model.moe.d_expert=32", "data.seq_len=32",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _fails(capsys, argv, recipe="train_lm") -> tuple[int, str]:
    """Run ``recipe`` in this process; it must exit non-zero with one named error and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _recipe(recipe)(argv)
    err = capsys.readouterr().err
    assert info.value.code != 0 and f"{recipe}: error: " in err and "Traceback" not in err
    return info.value.code, err


def _driver(fault: str, step: int, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    argv = [*launch, str(DRIVER), fault, str(step), str(torch.get_num_threads()), str(RECIPES / "train_lm.py")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*argv, "--out", str(out), *RUN, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _train_steps(run: Path) -> list[int]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in events if "train_loss" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    reset_accelerate()
    run = tmp_path_factory.mktemp("reference") / "run"
    _recipe("train_lm")(["--out", str(run), *RUN])
    return _weights(run)


def _assert_same_weights(run: Path, reference: dict[str, torch.Tensor]) -> None:
    got = _weights(run)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in got), "resumed run differs from the uninterrupted one"


# ---------------------------------------------------------------- kill -9, then resume
@pytest.mark.parametrize(
    "fault, seed",
    [("kill-mid-save", 0), ("kill-mid-save", 1), ("kill-before-latest", 2), ("kill-after-step", 3),
     ("kill-mid-append", 4)],
)  # fmt: skip
def test_kill_9_then_resume_ends_on_the_uninterrupted_weights(tmp_path, reference, fault, seed):
    step = random.Random(seed).randint(2, STEPS - 1)
    out = tmp_path / "run"
    killed = _driver(fault, step, out)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = out / "ckpt"
    latest = ckpt / (ckpt / "latest").read_text().strip()
    assert unreadable_file(latest) is None  # `latest` names a complete checkpoint
    newest = step if fault in ("kill-after-step", "kill-mid-append") else step - 1
    assert (
        latest.name == f"step_{newest - (fault == 'kill-after-step' and False):07d}"
        or latest.name == f"step_{step - 1:07d}"
    )
    _recipe("train_lm")(["--out", str(out), "--resume", "--samples", "0"])
    _assert_same_weights(out, reference)
    assert _train_steps(out) == list(range(1, STEPS + 1))  # no duplicate, none missing, no torn line
    assert not list(ckpt.glob(".tmp_*"))  # the debris is gone


# ---------------------------------------------------------------- divergence
def test_a_nan_at_step_k_stops_the_recipe_and_the_last_good_checkpoint_resumes(tmp_path, reference):
    out = tmp_path / "run"
    diverged = _driver("nan-grad", 4, out, "train.keep_checkpoints=1")
    assert diverged.returncode == 3, diverged.stderr[-2000:]
    good = out / "ckpt" / "step_0000003"
    assert "train_lm: error: training diverged at step 4: the gradient norm is nan" in diverged.stderr
    assert f"--resume-from {good}" in diverged.stderr and "Traceback" not in diverged.stderr
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_0000003"]  # rotation kept it
    assert all(torch.isfinite(t).all() for t in load_file(str(good / "model.safetensors")).values())
    assert not (out / "final").exists()
    _recipe("train_lm")(["--out", str(out), "--resume-from", str(good), "--samples", "0"])
    _assert_same_weights(out, reference)  # the step-3 state was intact: same run as without the NaN


def test_a_nan_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    diverged = _driver("nan-grad-rank1", 3, out, processes=2)
    assert diverged.returncode != 0
    # Both ranks took the same decision at the same step (else one would hang in the next collective).
    assert diverged.stderr.count("train_lm: error: training diverged at step 3: the gradient norm is nan") == 2
    # torchrun's report: the recipe's code (it lists the second rank only when it exits before torchrun
    # tears the group down, which depends on timing)
    assert diverged.stderr.count("exitcode  : 3 (pid") >= 1
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["latest", "step_0000001", "step_0000002"]


@pytest.mark.parametrize(
    "lr, code, named",
    [(".inf", 2, "TrainConfig.lr=inf is invalid"), ("nan", 2, "TrainConfig.lr=nan is invalid"),
     ("1e30", 3, "training diverged at step 2"), ("10", 3, "exceeds train.divergence_factor=10")],
)  # fmt: skip
def test_absurd_learning_rates_stop_with_a_named_error(tmp_path, capsys, lr, code, named):
    got, err = _fails(capsys, ["--out", str(tmp_path / "run"), *RUN, f"train.lr={lr}"])
    assert got == code and named in err


# ---------------------------------------------------------------- corrupt checkpoint files
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    reset_accelerate()
    run = tmp_path_factory.mktemp("finished") / "run"
    _recipe("train_lm")(["--out", str(run), *RUN, "train.steps=4", "train.keep_checkpoints=3"])
    return run


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "experts.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
     "trainer_state.json"],
)  # fmt: skip
def test_a_corrupt_checkpoint_file_is_named_with_the_older_one_and_resume_from_it_works(
    tmp_path, capsys, finished, name
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = run / "ckpt"
    bad, older = ckpt / "step_0000004" / name, ckpt / "step_0000003"
    _truncate(bad)
    before = _tree_hash(ckpt)
    code, err = _fails(capsys, ["--out", str(run), "--resume", "--samples", "0", "train.steps=5"])
    assert code == 2 and f"checkpoint file {bad} is unreadable" in err and f"--resume-from {older}" in err
    assert _tree_hash(ckpt) == before  # nothing deleted or rewritten
    summary = _recipe("train_lm")(["--out", str(run), "--resume-from", str(older), "--samples", "0", "train.steps=5"])
    assert summary["step"] == 5 and _train_steps(run) == [1, 2, 3, 4, 5]
    assert (ckpt / "discarded" / "step_0000004" / name).is_file()  # set aside, never deleted


def test_a_corrupt_latest_pointer_names_the_newest_intact_checkpoint(tmp_path, capsys, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "ckpt" / "latest").write_text("\x00garbage")
    _, err = _fails(capsys, ["--out", str(run), "--resume", "--samples", "0"])
    assert f"{run / 'ckpt' / 'latest'} is unreadable" in err and f"--resume-from {run / 'ckpt' / 'step_0000004'}" in err


# ---------------------------------------------------------------- run folders and resume rules
@pytest.mark.parametrize("recipe", ["train_lm", "train_multimodal"])
def test_resume_needs_a_run_and_a_new_run_needs_an_empty_folder(tmp_path, capsys, finished, recipe):
    _, err = _fails(capsys, ["--out", str(tmp_path / "typo"), "--resume"], recipe)
    assert f"--resume: {tmp_path / 'typo'} does not exist" in err
    _, err = _fails(capsys, ["--out", str(tmp_path / "typo"), "--resume-from", str(tmp_path / "c")], recipe)
    assert f"--resume-from: {tmp_path / 'typo'} does not exist" in err and "drop --resume-from" in err
    (tmp_path / "empty").mkdir()
    _, err = _fails(capsys, ["--out", str(tmp_path / "empty"), "--resume"], recipe)
    assert "holds no run (no config.yaml)" in err and not any((tmp_path / "empty").iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    _, err = _fails(
        capsys, ["--out", str(tmp_path / "full"), "--config", str(RECIPES / "configs" / "debug.yaml")], recipe
    )
    assert "is not empty and holds no run" in err and [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    before = _tree_hash(finished)
    _, err = _fails(capsys, ["--out", str(finished), "--config", DEBUG], recipe)
    assert "holds a run: pass --resume" in err and _tree_hash(finished) == before


def test_a_recipe_refuses_to_resume_another_recipes_run_naming_its_config(tmp_path, capsys, finished):
    before = _tree_hash(finished)
    _, err = _fails(capsys, ["--out", str(finished), "--resume"], "train_multimodal")
    assert f"config file {finished / 'config.yaml'}: unknown config key 'model.vocab_size'" in err
    assert _tree_hash(finished) == before


@pytest.mark.parametrize(
    "override, named",
    [("data.seq_len=64", "data.seq_len: run has 32, now 64"), ("train.batch_size=4", "train.batch_size: run has 8"),
     ("train.seed=1", "train.seed: run has 0, now 1"), ("train.weight_decay=0.2", "train.weight_decay: run has 0.1"),
     ("train.eval_batches=2", "train.eval_batches: run has 1, now 2"),
     ("model.n_layers=3", "model.n_layers: run has 2")],
)  # fmt: skip
def test_a_resume_that_changes_a_fixed_field_is_refused_and_changes_nothing(
    tmp_path, capsys, finished, override, named
):
    before = _tree_hash(finished)
    _, err = _fails(capsys, ["--out", str(finished), "--resume", "--samples", "0", override])
    assert named in err and "fixed on resume" in err
    assert _tree_hash(finished) == before  # config.yaml, metrics and checkpoints untouched


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 64\ntrain: [steps: 3\n")
    _, err = _fails(capsys, ["--out", str(tmp_path / "run"), "--config", str(bad)])
    assert f"config file {bad}: invalid YAML at line 4" in err and not (tmp_path / "run").exists()


def test_resuming_a_finished_run_reports_its_metrics(tmp_path, capsys, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree_hash(run / "ckpt")
    summary = _recipe("train_lm")(["--out", str(run), "--resume", "--samples", "0"])
    done = capsys.readouterr().out.splitlines()[-1]
    assert summary["step"] == 4 and "val_loss nan" not in done and f"val_loss {summary['val_loss']:.4f}" in done
    assert _tree_hash(run / "ckpt") == before  # nothing retrained, nothing rewritten


def test_a_resume_with_a_new_lr_and_steps_takes_effect_through_the_recipe(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _recipe("train_lm")(["--out", str(run), "--resume", "--samples", "0", "train.steps=6", "train.lr=0.01"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["lr"] for e in events if "lr" in e}
    # debug preset: warmup 2, cosine to 0.1 x peak over the new 6 steps; logged step s used 0-based step s - 1
    for step in (5, 6):
        progress = (step - 1 - 2) / (6 - 1 - 2)
        assert logged[step] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert "lr: 0.01" in (run / "config.yaml").read_text()
