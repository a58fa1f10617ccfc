"""The report tells the truth, checked on synthetic runs: the time axis is the training seconds the metrics
events recorded, unequal recorded data digests are flagged per seed, a run folder whose config differs from
the plan in any section is refused naming the field, and the multimodal task gets the LM's verdict structure
for every task's accuracy and val loss."""

import json
import re
from pathlib import Path

import pytest

from moekit.experiment.plan import TASKS, load_comparison, matching_table, plan_runs
from moekit.experiment.plots import loss_curves
from moekit.experiment.report import write_report
from moekit.experiment.runner import check_planned
from moekit.experiment.verdict import comparison_verdicts
from moekit.multimodal.train import CANDIDATES

CONFIG = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "compare-debug.yaml")
TIMING = dict(wall_s=1.0, loadavg_start=None, loadavg_end=None, workers=1, threads=1, cpus=2)


def _row(spec, loss, digest):
    return dict(
        name=spec.name, kind=spec.kind, seed=spec.seed, flops_per_token=1000, tokens_trained=512, train_flops=1.5e6,
        final_val_loss=loss, tokens_per_s=100.0, peak_mem_mib=1.0, wall_s=5.0, data_digest=digest, status="finished",
        divergence=None, sweep_value=None, sample="",
    )  # fmt: skip


def _metrics(out, spec, events):
    run = out / "runs" / spec.folder
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_the_time_axis_is_the_recorded_training_seconds(tmp_path):
    specs = plan_runs(load_comparison(CONFIG, []))
    # uneven recorded seconds (a slow start), which tokens / mean tokens-per-second would flatten into a line
    recorded = {"dense": [3.0, 4.0, 4.5], "moe-4x2": [7.25, 9.5, 20.0]}
    for s in specs:
        events = [
            dict(step=k, tokens_seen=100 * k, val_loss=3 - k / 10, train_seconds=t)
            for k, t in enumerate(recorded[s.name], 1)
        ]
        _metrics(tmp_path, s, [dict(step=1, tokens_seen=100, train_loss=3.0, train_seconds=0.1), *events])
    rows = [_row(s, 2.0, "d") for s in specs]
    curves = loss_curves(specs, rows, tmp_path)
    assert {n: c[0]["time"] for n, c in curves.items()} == recorded
    assert curves["dense"][0]["tokens"] == [100, 200, 300] and curves["dense"][0]["loss"] == pytest.approx(
        [2.9, 2.8, 2.7]
    )
    assert curves["dense"][0]["flops"] == pytest.approx([1.5e6 / 512 * t for t in (100, 200, 300)])
    # a run folder written before events carried seconds: tokens / mean tokens per second, said so
    (tmp_path / "runs" / specs[0].folder / "metrics.jsonl").write_text(
        json.dumps(dict(step=1, tokens_seen=300, val_loss=2.0))
    )
    assert loss_curves(specs, rows, tmp_path)["dense"][0]["time"] == [3.0]


@pytest.mark.parametrize("moe_digests", [("a0", "b1"), ("a0", "XX")])
def test_unequal_recorded_digests_are_flagged_per_seed(tmp_path, moe_digests):
    cmp = load_comparison(CONFIG, ["compare.seeds=2"])
    specs = plan_runs(cmp)
    digests = {"dense": ("a0", "b1"), "moe-4x2": moe_digests}
    rows = [_row(s, 2.0 - 0.01 * (s.kind == "moe"), digests[s.name][s.seed]) for s in specs]
    write_report(tmp_path, cmp, specs, rows, matching_table(specs), TIMING)
    summary = json.loads((tmp_path / "summary.json").read_text())
    equal = moe_digests == digests["dense"]
    assert [(d["seed"], d["equal"]) for d in summary["data_digests"]] == [(0, True), (1, equal)]
    report = (tmp_path / "report.md").read_text()
    assert ("DATA DIFFERED" in report) is not equal
    if not equal:
        assert "seed 1 moe-4x2: XX vs dense b1" in report


def test_runs_of_different_lengths_are_not_flagged_as_different_data(tmp_path):
    """compare.budget=flops gives each model its own step count: a chained digest differs by construction, so
    it is left uncompared (with the reason), not reported as unpaired data."""
    cmp = load_comparison(CONFIG, ["compare.seeds=2", "compare.budget=flops"])
    specs = plan_runs(cmp)
    rows = [_row(s, 2.0 - 0.01 * (s.kind == "moe"), f"{s.kind}{s.seed}") for s in specs]
    for r in rows:
        r["tokens_trained"] = 512 if r["kind"] == "dense" else 448
    rows[-1]["tokens_trained"], rows[-1]["data_digest"] = 512, "dense1"  # seed 1 equal length: compared
    write_report(tmp_path, cmp, specs, rows, matching_table(specs), TIMING)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(d["seed"], d["equal"]) for d in summary["data_digests"]] == [(0, None), (1, True)]
    assert "448 vs 512 tokens" in summary["data_digests"][0]["note"]
    report = (tmp_path / "report.md").read_text()
    assert "DATA DIFFERED" not in report and "Not compared: seed 0 moe-4x2: different budgets" in report
    rows[-1]["data_digest"] = "XX"  # an equal-length pair that differs is still flagged
    write_report(tmp_path, cmp, specs, rows, matching_table(specs), TIMING)
    assert "DATA DIFFERED" in (tmp_path / "report.md").read_text()


def test_a_verdict_without_paired_seeds_says_so_in_its_cells():
    from moekit.experiment.verdict import verdict_cells

    v = dict(model="moe", metric="final_val_loss", diff_mean=None, diff_ci95=None, n_seeds=0, verdict="unresolved")
    assert verdict_cells(v)[3] == "n/a (0 seeds)"
    assert verdict_cells({**v, "n_seeds": 1, "diff_mean": 0.1})[3] == "n/a (1 seed)"


def test_a_run_folder_with_another_config_in_any_section_is_refused_naming_the_field(tmp_path):
    spec = plan_runs(load_comparison(CONFIG, []))[1]  # the MoE run
    for i, (override, field) in enumerate(
        [
            ("data.seq_len=32", "data.seq_len"),
            ("model.moe.top_k=1", "model.moe.top_k"),
            ("train.warmup_steps=1", "train.warmup_steps"),
        ]
    ):
        other = plan_runs(load_comparison(CONFIG, [override, "compare.allow_mismatch=true"]))[1]
        other.run.save(tmp_path / str(i))
        with pytest.raises(ValueError, match=rf"different config.*: {re.escape(field)} is "):
            check_planned(spec, tmp_path / str(i))
    placed = plan_runs(load_comparison(CONFIG, ["parallel.dispatch=reference"]))[1]
    placed.run.save(tmp_path / "placed")
    check_planned(spec, tmp_path / "placed")  # placement is not what the comparison holds equal
    check_planned(spec, tmp_path / "empty")  # nothing trained there yet


def test_the_multimodal_task_gets_the_lm_verdict_structure_per_task():
    pairs = [("dense", "dense", 0.0), ("moe-4x2", "moe", 0.05)]
    lm = comparison_verdicts(
        [
            dict(name=n, kind=k, seed=s, final_val_loss=1.0 + s / 10 - g * (1 + s / 10))
            for n, k, g in pairs
            for s in range(3)
        ]
    )
    rows = []
    for name, kind, g in pairs:
        for s in range(3):
            gain = g * (1 + s / 10)  # the MoE's gain varies a little by seed: equal ones have no interval
            row = dict(name=name, kind=kind, seed=s, final_val_loss=2.0 - gain + s / 10, val_text_loss=2.5 - gain)
            row.update({f"{t}_acc": 0.5 + gain + s / 100 for t in CANDIDATES})
            row.update({f"{t}_loss": 1.0 - gain + s / 50 for t in CANDIDATES})
            rows.append(row)
    mm = comparison_verdicts(rows, TASKS["multimodal"].verdict_fields)
    metrics = {v["metric"] for v in mm}
    assert {f"{t}_{m}" for t in CANDIDATES for m in ("acc", "loss")} | {"final_val_loss", "val_text_loss"} == metrics
    assert all(set(v) == set(lm[0]) for v in mm)  # the same structure as the LM's verdicts
    assert all(v["verdict"] == "moe_better" and v["n_seeds"] == 3 for v in mm)
    assert {v["metric"]: v["higher_is_better"] for v in mm} == {m: m.endswith("_acc") for m in metrics}


@pytest.mark.parametrize("dense", [[2.0, 2.0, 2.0], [2.0, 2.1, 1.9], [2.7, 1.3, 3.9]])
def test_equal_paired_differences_leave_the_verdict_unresolved(dense):
    """sd 0 gave a zero-width interval, read as 'beats the dense twin (95% CI -0.100 to -0.100)'."""
    from moekit.experiment.verdict import NO_SPREAD, verdict_cells, verdict_sentence, verdicts_sentence

    rows = [dict(name="dense", kind="dense", seed=s, final_val_loss=v) for s, v in enumerate(dense)]
    rows += [dict(name="moe-4x2", kind="moe", seed=s, final_val_loss=v - 0.1) for s, v in enumerate(dense)]
    (v,) = comparison_verdicts(rows)
    assert v["verdict"] == "unresolved" and v["diff_ci95"] is None and v["reason"] == NO_SPREAD
    assert v["n_seeds"] == 3 and v["diff_mean"] == pytest.approx(-0.1)
    text = verdict_sentence(v)
    assert text.startswith("moe-4x2 vs the dense twin is unresolved (no spread between seeds): val loss -0.100")
    assert "beats" not in text and "CI" not in text and "1 seed" not in text
    assert verdicts_sentence([v]) == text and verdict_cells(v)[3:] == ["n/a (3 seeds)", "3", "unresolved"]
    json.dumps(v, allow_nan=False)
    rows[-1]["final_val_loss"] -= 0.01  # a real spread: an interval again
    (v,) = comparison_verdicts(rows)
    assert v["diff_ci95"] is not None and v["diff_ci95"][0] < v["diff_ci95"][1] and v["reason"] != NO_SPREAD


def test_the_report_headline_uses_the_comparisons_flops_tolerance(tmp_path):
    cmp = load_comparison(CONFIG, ["compare.seeds=2", "compare.max_flops_mismatch=0.005"])
    specs = plan_runs(cmp)
    rows = [_row(s, 2.0 - 0.01 * (s.kind == "moe") + s.seed / 100, "d") for s in specs]
    for r in rows:
        r["flops_per_token"] = 1_010_000 if r["kind"] == "moe" else 1_000_000  # 1% apart: over 0.5%
    write_report(tmp_path, cmp, specs, rows, matching_table(specs), TIMING)
    report = (tmp_path / "report.md").read_text()
    assert "**Result.** At active compute 1.01 vs 1.00 MFLOPs/token (not matched: 1.00% apart" in report
    cmp = load_comparison(CONFIG, ["compare.seeds=2"])  # the default 2%: matched
    write_report(tmp_path, cmp, specs, rows, matching_table(specs), TIMING)
    assert "**Result.** At matched active compute (1.01 vs 1.00 MFLOPs/token)" in (tmp_path / "report.md").read_text()
