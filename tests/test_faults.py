"""Faults a run must survive or refuse by name (issue 11), on the Trainer: absurd hyperparameters, a torn
metrics line, resuming a finished run, divergence (NaN gradient, NaN loss, loss spike, non-finite weights at
a save) and a resume that changes the lr schedule. Through the real recipes: tests/test_fault_injection.py."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences
from moekit.core.extension import TrainerExtension
from moekit.core.guard import TrainingDiverged
from moekit.core.model import Transformer
from moekit.core.objective import LMObjective
from moekit.core.train import TrainConfig, Trainer

TINY = ModelConfig(vocab_size=272, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def data():
    tokens = torch.arange(2000) % 37 + 60
    return PackedSequences(tokens[:1600], 16), PackedSequences(tokens[1600:], 16)


def _trainer(run_dir, data, resume=False, **kw) -> Trainer:
    base = dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1)
    base.update(log_with="none", progress_bar=False, mfu_probe=False, cpu=True, **kw)
    torch.manual_seed(0)
    return Trainer(Transformer(TINY), TrainConfig(**base), run_dir, data[0], data[1], resume=resume)


@pytest.mark.parametrize(
    "kw, named",
    [
        (dict(lr=math.inf), "TrainConfig.lr=inf"),
        (dict(lr=math.nan), "TrainConfig.lr=nan"),
        (dict(grad_clip=math.inf), "TrainConfig.grad_clip=inf"),
        (dict(adam_eps=math.nan), "TrainConfig.adam_eps=nan"),
        (dict(weight_decay=math.inf), "TrainConfig.weight_decay=inf"),
        (dict(betas=(0.9, math.nan)), "TrainConfig.betas"),
    ],
)
def test_absurd_hyperparameters_are_refused_at_config_time(kw, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**kw)
    TrainConfig(steps=10, warmup_steps=10, grad_clip=None)  # the edges stay allowed


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, data):
    first = _trainer(tmp_path, data)
    first.train(max_steps=2)
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "train_lo')  # a crash mid-append
    second = _trainer(tmp_path, data, resume=True)
    assert second.step == 2
    second.train()
    second.close()
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["step"] for e in events if "train_loss" in e] == [1, 2, 3, 4]


def test_a_corrupt_metrics_line_before_the_last_is_named(tmp_path, data):
    first = _trainer(tmp_path, data)
    first.train(max_steps=2)
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["garbage", *lines]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 1 is not a JSON event"):
        _trainer(tmp_path, data, resume=True)


def test_resuming_a_finished_run_reports_its_last_val_loss(tmp_path, data):
    first = _trainer(tmp_path, data)
    done = first.train()
    first.close()
    again = _trainer(tmp_path, data, resume=True)
    summary = again.train()
    again.close()
    assert summary["step"] == 4 and math.isfinite(summary["val_loss"])
    assert summary["val_loss"] == done["val_loss"]


# ---------------------------------------------------------------- divergence guard
class _PoisonGrad(TrainerExtension):
    """A NaN gradient in optimizer step ``at`` (1-based); records the weights before each step."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.before = at, 0, None

    def after_backward(self, model, ctx):
        self.calls += 1
        self.before = {k: v.clone() for k, v in model.state_dict().items()}
        if self.calls == self.at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan


class _ScaledLoss(LMObjective):
    """The LM loss, times ``scale`` from optimizer step ``at`` on (one micro-batch per step here)."""

    def __init__(self, at: int, scale: float) -> None:
        self.at, self.scale, self.calls = at, scale, 0

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        if model.training:
            self.calls += 1
            if self.calls >= self.at:
                return dataclasses.replace(out, loss=out.loss * self.scale)
        return out


def _guarded(run_dir, data, ext=(), objective=None, resume=False, **kw) -> Trainer:
    base = dict(steps=6, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, eval_every=0, eval_batches=1)
    base.update(save_every=1, keep_checkpoints=1, log_with="none", progress_bar=False, mfu_probe=False, cpu=True)
    base.update(kw)
    torch.manual_seed(0)
    model = Transformer(TINY)
    return Trainer(
        model, TrainConfig(**base), run_dir, data[0], data[1], resume=resume, extensions=ext, objective=objective
    )


def test_a_nan_gradient_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data, fresh_accelerate):
    poison = _PoisonGrad(at=4)
    trainer = _guarded(tmp_path, data, [poison], grad_clip=None)  # no clipping: the guard measures the norm itself
    with pytest.raises(TrainingDiverged, match=r"diverged at step 4: the gradient norm is nan") as info:
        trainer.train()
    err = info.value
    assert err.step == 4 and err.last_good_checkpoint == tmp_path / "ckpt" / "step_0000003"
    # The optimizer step was never applied: the weights are those the poisoned step started from.
    now = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in poison.before.items())
    trainer.close()
    # keep_checkpoints=1 and saves at every step: the newest finite checkpoint is the one kept, and nothing else.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000003"]
    assert not (tmp_path / "final").exists()
    fresh_accelerate()
    resumed = _guarded(tmp_path, data, resume=True, grad_clip=None)
    assert resumed.step == 3
    assert resumed.train()["step"] == 6
    resumed.close()


def test_a_nan_loss_stops_the_run_within_one_step(tmp_path, data):
    trainer = _guarded(tmp_path, data, objective=_ScaledLoss(at=3, scale=math.nan))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss is nan.*step_0000002.*train\.lr"):
        trainer.train()
    trainer.close()


def test_a_loss_spike_stops_the_run_unless_the_check_is_off(tmp_path, data, fresh_accelerate):
    trainer = _guarded(tmp_path / "a", data, objective=_ScaledLoss(at=14, scale=50.0), steps=16)
    with pytest.raises(TrainingDiverged, match=r"step 14: the loss .* exceeds train\.divergence_factor=10 x"):
        trainer.train()
    trainer.close()
    fresh_accelerate()
    off = _guarded(tmp_path / "b", data, objective=_ScaledLoss(at=14, scale=50.0), steps=16, divergence_factor=None)
    assert off.train()["step"] == 16
    off.close()


class _PoisonWeights(TrainerExtension):
    """An inf weight after optimizer step ``at``: past that step's guard, so only the save check can catch it."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, 0

    def after_optimizer_step(self, model, ctx):
        self.steps += 1
        if self.steps == self.at:
            next(model.parameters()).data.view(-1)[0] = math.inf


def test_non_finite_weights_are_never_saved(tmp_path, data):
    trainer = _guarded(tmp_path, data, [_PoisonWeights(at=3)])
    with pytest.raises(TrainingDiverged, match=r"step 3: the weights or optimizer state are not finite"):
        trainer.train()
    trainer.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000002"]


@pytest.mark.parametrize("value", [1.0, 0.5, math.inf, math.nan, "10"])
def test_divergence_factor_is_validated(value):
    with pytest.raises(ValueError, match=r"TrainConfig\.divergence_factor="):
        TrainConfig(divergence_factor=value)
    assert TrainConfig(divergence_factor=None).divergence_factor is None


# ---------------------------------------------------------------- the schedule follows a resumed run's config
def _cosine_lr(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """The lr of 0-based optimizer step ``step``, written out independently of moekit.core.optim."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("changes", [dict(steps=10), dict(steps=10, lr=3e-3, warmup_steps=5)])
def test_a_resume_with_new_steps_or_lr_follows_the_new_schedule(tmp_path, data, fresh_accelerate, changes):
    first = _guarded(tmp_path, data, steps=4, min_lr_ratio=0.1)
    first.train()
    first.close()
    fresh_accelerate()
    second = _guarded(tmp_path, data, resume=True, min_lr_ratio=0.1, **changes)
    second.train()
    second.close()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {e["step"]: e["lr"] for e in events if "lr" in e}
    peak, warmup = changes.get("lr", 1e-3), changes.get("warmup_steps", 1)
    for step in range(5, 11):  # logged step s used the lr of 0-based step s - 1
        assert logged[step] == pytest.approx(_cosine_lr(step - 1, peak, warmup, 10, 0.1), rel=1e-9), step
    assert logged[4] == pytest.approx(_cosine_lr(3, 1e-3, 1, 4, 0.1), rel=1e-9)  # the first run's own schedule
