"""The experiment layer on the multimodal task: the decoder's dense twin at matched FLOPs with everything
else identical, the recipe end to end (held-out accuracy, per-modality routing in the report), reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moekit.core.accounting import flops_per_token
from moekit.experiment.plan import load_comparison, plan_runs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MM_DEBUG = RECIPES / "configs" / "mm-debug.yaml"
pytestmark = pytest.mark.usefixtures("mm_env")


def _cmp(mm_cache: str, *overrides: str):
    return load_comparison(MM_DEBUG, [f"data.cache_root={mm_cache}", *overrides])


def test_comparison_plan_matches_decoder_flops_and_keeps_everything_else(mm_cache):
    specs = plan_runs(_cmp(mm_cache, "compare.seeds=2", "compare.variants=['moe.modality_experts=[1,1,1]']"))
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
        plan_runs(_cmp(mm_cache, "compare.variants=['moe.top_k=4']"))
    with pytest.raises(ValueError, match=r"model\.lm\.moe"):
        _cmp(mm_cache, "model.lm.moe=null")


def test_the_shared_planner_sweeps_and_budgets_the_multimodal_decoder(mm_cache):
    specs = plan_runs(_cmp(mm_cache, "compare.sweep=top_k=1,2", "compare.param_matched=true", "compare.budget=flops"))
    assert [s.name for s in specs] == ["dense", "moe-top_k=1", "moe-top_k=2", "dense-param-matched"]
    assert [s.run.model.lm.moe.d_expert for s in specs[1:3]] == [64, 32]  # top_k * d_expert held fixed
    assert specs[-1].run.model.lm.moe is None and specs[-1].run.train.steps < specs[0].run.train.steps
    assert all(s.run.model.image == specs[0].run.model.image for s in specs)


def test_comparison_end_to_end_writes_the_report_and_resumes(mm_cache, tmp_path, monkeypatch, compare_cli):
    import moekit.experiment.runner as runner

    # through the comparison recipe, which picks the multimodal task from mm-debug.yaml's compare.task
    overrides = [f"data.cache_root={mm_cache}", "train.steps=2", "train.log_every=1", "train.eval_every=0"]
    overrides += ["eval.samples_per_task=2", "compare.threads=1"]
    rows = compare_cli(["--config", str(MM_DEBUG), "--out", str(tmp_path), *overrides])
    assert [r["name"] for r in rows] == ["dense", "moe-4x2"]
    assert rows[0]["data_digest"] == rows[1]["data_digest"]
    assert rows[0]["flops_per_sample"]["image"] == rows[1]["flops_per_sample"]["image"] > 0  # same encoders
    assert rows[0]["routing"] is None and len(rows[1]["routing"]["modality_purity"]) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "multimodal"
    metrics = {v["metric"] for v in summary["verdicts"] if v["model"] == "moe-4x2"}
    assert {"final_val_loss", "caption_acc", "transcribe_acc", "compare_acc", "caption_loss"} <= metrics
    assert all(set(v) >= {"diff_mean", "diff_ci95", "n_seeds", "verdict"} for v in summary["verdicts"])
    assert summary["data_digests"][0]["equal"] is True
    assert {"caption_acc", "transcribe_acc", "compare_acc", "final_val_loss"} <= set(summary["runs"][0])
    report = (tmp_path / "report.md").read_text()
    assert report.splitlines()[2].startswith("**Verdict.** moe-4x2 vs the dense twin is unresolved (1 seed)")
    assert "Held-out accuracy" in report and "modality purity" in report and "## Time" in report
    assert (tmp_path / "modality_load_moe-4x2.png").is_file() and (tmp_path / "modality_purity_moe-4x2.png").is_file()
    # a rerun reuses the finished runs instead of training again
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("retrained"))
    assert runner.run_comparison(_cmp(mm_cache, *overrides), tmp_path) == rows
