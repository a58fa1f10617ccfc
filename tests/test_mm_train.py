"""Multimodal training: the mm-debug preset end to end with the Trainer, per-modality routing in the metrics,
held-out task evaluation, determinism and exact resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

import moekit.multimodal.train as mmtrain
from moekit.core.layering import load_config
from moekit.multimodal.tasks import DigitTasks
from moekit.multimodal.train import (
    CANDIDATES,
    EVAL_J,
    MultimodalRunConfig,
    SampleCollate,
    TrainableMultimodalLM,
    build_multimodal_trainer,
    evaluate_tasks,
    finish_task_metrics,
    load_mm_run_config,
    load_run_tasks,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.usefixtures("mm_env")


def _cfg(mm_cache: str, *overrides: str) -> MultimodalRunConfig:
    # as recipes/train_multimodal.py reads it: the preset's compare section is the comparison recipe's
    return load_mm_run_config(RECIPES / "configs" / "mm-debug.yaml", [f"data.cache_root={mm_cache}", *overrides])


@pytest.fixture(scope="module")
def tasks(mm_cache) -> DigitTasks:
    return load_run_tasks(_cfg(mm_cache))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(cfg, run_dir, tasks, resume=False, max_steps=None) -> dict:
    trainer = build_multimodal_trainer(cfg, run_dir, resume=resume, tasks=tasks)
    summary = trainer.train(max_steps)
    trainer.close()
    return summary


def test_debug_preset_trains_end_to_end_with_per_modality_routing(mm_cache, tasks, tmp_path):
    cfg = _cfg(mm_cache)
    summary = _train(cfg, tmp_path, tasks)
    events = _events(tmp_path)
    train_events = [e for e in events if "train_loss" in e]
    assert [e["step"] for e in train_events] == [2, 4]
    for e in train_events:
        assert 0 < e["moe/modality_purity"] <= 1
        assert len(e["moe_layers"]) == 2  # both decoder layers are MoE
        for layer in e["moe_layers"]:
            by_group = torch.tensor(layer["tokens_per_expert_by_group"])  # [3 modalities, 4 experts]
            assert by_group.shape == (3, 4)
            assert torch.equal(by_group.sum(0), torch.tensor(layer["tokens_per_expert"]))
            assert sum(layer["tokens_by_group"]) == layer["num_tokens"]
            assert all(n > 0 for n in layer["tokens_by_group"])  # text, image and audio all routed
            assert len(layer["modality_purity"]) == 4
    final = events[-1]
    assert final["step"] == 4 and "val_loss" in final
    for task in ("caption", "transcribe", "compare"):
        assert 0 <= final[f"{task}_acc"] <= 1 and final[f"{task}_loss"] > 0
    assert final["text_loss"] > 0
    routing = final["routing"]
    assert torch.tensor(routing["tokens_per_expert_by_group"]).shape == (2, 3, 4)
    assert all(0 < p <= 1 for p in routing["mean_modality_purity"])
    assert "routing" not in summary and summary["caption_acc"] == final["caption_acc"]
    # resolved config and final weights written; both load back
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert load_config(MultimodalRunConfig, tmp_path / "config.yaml").to_dict() == saved == cfg.to_dict()
    model = TrainableMultimodalLM.from_pretrained(tmp_path / "final")
    batch = SampleCollate(model).samples(tasks.batch(0, 3, split="eval"))
    assert torch.isfinite(model(**batch).loss)


def test_training_is_deterministic_and_resumes_exactly(mm_cache, tasks, tmp_path):
    cfg = _cfg(mm_cache, "eval.samples_per_task=2")
    _train(cfg, tmp_path / "a", tasks)
    _train(cfg, tmp_path / "b", tasks, max_steps=2)  # interrupted after the step-2 checkpoint ...
    _train(cfg, tmp_path / "b", tasks, resume=True)  # ... and resumed
    a, b = _events(tmp_path / "a"), _events(tmp_path / "b")

    def strip(events):
        return [{k: v for k, v in e.items() if k not in ("tokens_per_s", "train_seconds")} for e in events]

    assert strip(a) == strip(b)  # bitwise: losses, routing telemetry, accuracies


def test_task_eval_keys_and_gold_loss_match_the_model_loss(mm_cache, tasks):
    cfg = _cfg(mm_cache, "eval.samples_per_task=5", "eval.batch_size=7")  # chunks cut through the candidates
    torch.manual_seed(0)
    model = TrainableMultimodalLM(cfg.model).eval()
    collate = SampleCollate(model)
    sums = evaluate_tasks(model, tasks, collate, cfg.eval)
    metrics = finish_task_metrics(sums)
    assert set(metrics) == {f"{t}_acc" for t in CANDIDATES} | {f"{t}_loss" for t in (*CANDIDATES, "text")}
    for task in tasks.tasks:
        assert sums[f"{task}_count"] == 5
        single = DigitTasks(dataclasses.replace(tasks.cfg, weights={task: 1.0}), tasks.splits)
        gold = [single.sample(i, EVAL_J, "eval") for i in range(5)]
        with torch.no_grad():
            want = model(**collate.samples(gold)).loss  # mean CE over the gold answers' tokens
        assert metrics[f"{task}_loss"] == pytest.approx(want.item(), rel=1e-5)
    # sharding over two ranks covers the same samples
    halves = [evaluate_tasks(model, tasks, collate, cfg.eval, rank=r, world=2) for r in (0, 1)]
    merged = {k: halves[0][k] + halves[1][k] for k in sums}
    assert finish_task_metrics(merged) == pytest.approx(metrics)


@pytest.mark.parametrize("pick", [0, -1])
def test_accuracy_counts_the_top_ranked_candidate(mm_cache, tasks, monkeypatch, pick):
    cfg = _cfg(mm_cache, "eval.samples_per_task=12", "eval.batch_size=30")

    def fake_scores(model, batch):  # rows are sample-major, candidate-minor: favour candidate `pick`
        rows = batch["input_ids"].shape[0]
        n_cand = 2 if "audio" in batch else 10  # compare rows carry a clip, caption rows do not
        cand = torch.arange(rows) % n_cand
        return (cand == pick % n_cand).double(), torch.ones(rows, dtype=torch.float64)

    monkeypatch.setattr(mmtrain, "_answer_logprobs", fake_scores)
    model = TrainableMultimodalLM(cfg.model)
    two = DigitTasks(dataclasses.replace(cfg.tasks, weights={"caption": 1.0, "compare": 1.0}), tasks.splits)
    metrics = finish_task_metrics(evaluate_tasks(model, two, SampleCollate(model), cfg.eval))
    for task in ("caption", "compare"):
        single = DigitTasks(dataclasses.replace(cfg.tasks, weights={task: 1.0}), tasks.splits)
        answers = [single.sample(i, EVAL_J, "eval").parts[-1].text for i in range(12)]
        want = sum(a == CANDIDATES[task][pick] for a in answers) / 12
        assert metrics[f"{task}_acc"] == pytest.approx(want)
