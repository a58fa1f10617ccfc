"""Faults a run must survive or refuse by name (issue 11): absurd hyperparameters, a torn metrics line,
resuming a finished run. (The recipe-level fault injection of the issue is still to come.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences
from moekit.core.model import Transformer
from moekit.core.train import TrainConfig, Trainer

TINY = ModelConfig(vocab_size=272, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


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
