"""The report tells the truth: the data digest hashes the batches each training loop actually consumed (so it
changes when one run is fed a different batch, and survives resume), and every metrics event carries the
elapsed training seconds the report's time axis uses."""

import json

import pytest
import torch

from moekit.core.configio import RunConfig
from moekit.core.layering import load_config
from moekit.experiment.lm import build_lm_trainer

CFG = "recipes/configs/compare-debug.yaml"
SMALL = ["train.steps=4", "train.eval_every=2", "train.save_every=2", "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _trainer(tmp_path, name, *extra, resume=False):
    cfg = load_config(RunConfig, CFG, [*SMALL, *extra], ignore=("compare",))
    return build_lm_trainer(cfg, tmp_path / name, resume=resume)[0]


def test_digest_equal_dense_vs_moe_changes_with_one_batch_and_survives_resume(tmp_path, fresh_accelerate):
    moe = _trainer(tmp_path, "moe")
    d_moe = moe.train()["data_digest"]
    dense = _trainer(tmp_path, "dense", "model.moe=null")
    assert dense.train()["data_digest"] == d_moe and len(d_moe) == 16

    other = _trainer(tmp_path, "other", "model.moe=null")
    real = other.sampler.indices
    other.sampler.indices = lambda step: real(step).flip(0) if step == 2 else real(step)  # one batch reordered
    assert other.train()["data_digest"] != d_moe

    part = _trainer(tmp_path, "resumed", "model.moe=null")
    part.train(max_steps=2)
    fresh_accelerate()
    resumed = _trainer(tmp_path, "resumed", "model.moe=null", resume=True)
    assert resumed.step == 2 and resumed.train()["data_digest"] == d_moe


def test_every_metrics_event_carries_train_seconds(tmp_path):
    t = _trainer(tmp_path, "run", "model.moe=null")
    t.train()
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events and all("train_seconds" in e for e in events)
    secs = [e["train_seconds"] for e in events]
    assert secs == sorted(secs) and secs[-1] == pytest.approx(t.train_seconds, abs=1e-3) and secs[-1] > 0
    assert any("val_loss" in e for e in events)
    assert torch.is_tensor(t.sampler.indices(0))
