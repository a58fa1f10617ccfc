"""The experiment layer on the language-model task: matching, identical data order, side-by-side workers,
resume, refusal to mix configs, summary schema, report."""

import json
import re
import shutil
from pathlib import Path

import pytest

from moekit.core.accounting import flops_per_token
from moekit.experiment.lm import LMTask
from moekit.experiment.plan import TASKS, CompareConfig, load_comparison, plan_runs
from moekit.experiment.report import SUMMARY_FIELDS

CONFIG = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "compare-debug.yaml")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "compare.py"


def load(*overrides):
    return load_comparison(CONFIG, list(overrides))


def test_plan_matches_active_flops_within_two_percent():
    cmp = load("compare.seeds=2", "compare.param_matched=true", "compare.variants=['moe.num_experts=8']")
    specs = plan_runs(cmp)
    names = [s.folder for s in specs]
    assert names[:2] == ["dense-seed0", "dense-seed1"]
    assert {"moe-4x2-seed1", "moe-8x2-seed0", "dense-param-matched-seed0"} <= set(names)
    dense = flops_per_token(specs[0].run.model, 64)
    for s in specs:
        if s.kind == "moe":
            assert abs(flops_per_token(s.run.model, 64) - dense) / dense < 0.02
    # Same seed -> same training setup apart from the model.
    by_seed = {}
    for s in specs:
        key = (s.run.train.seed, s.run.train.batch_size, s.run.data.seq_len, s.run.train.steps, s.run.train.lr)
        by_seed.setdefault(s.seed, set()).add(key)
    assert all(len(v) == 1 for v in by_seed.values())


def test_mismatched_compute_is_refused():
    with pytest.raises(ValueError, match="flops_per_token"):
        plan_runs(load("compare.variants=['moe.top_k=4']"))  # doubles active FLOPs
    plan_runs(load("compare.variants=['moe.top_k=4']", "compare.allow_mismatch=true"))


def test_sweep_holds_active_compute_fixed():
    specs = plan_runs(load("compare.sweep=top_k=1,2,4"))
    moe = [s for s in specs if s.kind == "moe"]
    assert [s.run.model.moe.top_k for s in moe] == [1, 2, 4]
    assert [s.run.model.moe.d_expert for s in moe] == [128, 64, 32]
    with pytest.raises(ValueError, match="sweep"):
        load("compare.sweep=not_a_field=1,2")


def test_sweep_values_go_through_the_override_coercion_and_validation():
    """A sweep value went through yaml.safe_load and dataclasses.replace: '1e-2' (YAML 1.1 text) stayed a string
    and MoEConfig's range check raised a TypeError."""
    specs = plan_runs(load("compare.sweep=load_balance_coef=1e-2,1e-3"))
    assert [s.run.model.moe.load_balance_coef for s in specs if s.kind == "moe"] == [0.01, 0.001]
    moe_specs = [s for s in specs if s.kind == "moe"]
    assert [s.sweep_value for s in moe_specs] == [0.01, 0.001]  # numbers on the plot's axis, not text
    names = {s.name.split("-seed")[0] for s in moe_specs}
    assert names == {"moe-load_balance_coef=0.01", "moe-load_balance_coef=0.001"}
    with pytest.raises(ValueError, match=r"config key 'moe\.load_balance_coef': expected a number, got 'x'"):
        plan_runs(load("compare.sweep=load_balance_coef=x,1e-3"))
    with pytest.raises(
        ValueError, match=r"CompareConfig\.sweep=.*is invalid: override 'z_loss_coef=\[1'.*not valid YAML"
    ):
        load("compare.sweep=z_loss_coef=[1,2]")


def test_flops_budget_scales_steps():
    cmp = load("compare.budget=flops", "compare.param_matched=true")
    steps = {s.name: s.run.train.steps for s in plan_runs(cmp)}
    assert steps["dense"] == steps["moe-4x2"] == 12
    assert steps["dense-param-matched"] < 12


def test_dense_base_config_is_refused():
    with pytest.raises(ValueError, match="model.moe"):
        load("model.moe=null")


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("task", "speech", r"\('lm', 'multimodal'\)"),
        ("budget", "steps", r"\('tokens', 'flops'\)"),
        ("workers", 0, "int >= 1"),
        ("seeds", True, "int >= 1"),
        ("threads", 0, "int >= 1 or null"),
        ("max_flops_mismatch", 1.5, r"\[0, 1\)"),
    ],
)
def test_compare_config_errors_name_the_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"CompareConfig\.{field}=.* is invalid: .*{allowed}"):
        CompareConfig(**{field: value})


def test_task_registry_and_the_compare_task_switch():
    mm = str(Path(CONFIG).with_name("mm-cpu.yaml"))
    assert isinstance(TASKS["lm"], LMTask) and set(TASKS) == {"lm", "multimodal"}
    assert load(*()).task.name == "lm"  # no task key: the language-model comparison
    assert load_comparison(mm, []).task.name == "multimodal"
    assert load("compare.task=multimodal", "compare.task=lm").task.name == "lm"  # the last override wins
    with pytest.raises(ValueError, match=r"CompareConfig\.task='speech' is invalid.*'lm', 'multimodal'"):
        load("compare.task=speech")
    with pytest.raises(ValueError, match=r"unknown config key 'compare\.sed'"):
        load("compare.sed=2")


def _run_recipe(main, out, *extra):
    return main(["--config", CONFIG, "--out", str(out), *extra])


TINY = ("train.steps=6", "train.eval_every=3", "train.save_every=3", "compare.sample_tokens=8")


@pytest.mark.slow
def test_end_to_end_identical_data_and_resume(tmp_path, capsys, compare_cli):
    out = tmp_path / "cmp"
    rows = _run_recipe(compare_cli, out, *TINY)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "lm" and [v["model"] for v in summary["verdicts"]] == ["moe-4x2"]
    v = summary["verdicts"][0]
    assert v["metric"] == "final_val_loss" and v["n_seeds"] == 1 and v["verdict"] == "unresolved"
    assert summary["data_digests"][0]["equal"] is True
    assert [r["name"] for r in summary["runs"]] == ["dense", "moe-4x2"]
    for r in summary["runs"]:
        assert set(r) == set(SUMMARY_FIELDS + LMTask.summary_fields)
        assert r["tokens_trained"] == 6 * 8 * 64 and r["final_val_loss"] > 0 and r["peak_mem_mib"] >= 0
    assert rows[0]["data_digest"] == rows[1]["data_digest"], "both models must see the same data order"
    assert rows[1]["sample"].startswith("**ROMEO**")
    for f in (
        "report.md",
        "val_loss_vs_tokens.png",
        "val_loss_vs_flops.png",
        "val_loss_vs_time.png",
        "throughput_memory.png",
        "expert_load_moe-4x2.png",
        "routing_moe-4x2.png",
    ):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "matched active compute" in report and "moe-4x2" in report and "## Samples" in report

    # Interrupt: drop the MoE run's result (as if it died after its step-3 checkpoint) and rerun.
    moe_dir = out / "runs" / "moe-4x2-seed0"
    dense_mtime = (out / "runs" / "dense-seed0" / "result.json").stat().st_mtime
    (moe_dir / "result.json").unlink()
    ckpts = sorted((moe_dir / "ckpt").glob("step_*"))
    for c in ckpts[1:]:
        shutil.rmtree(c)
    (moe_dir / "ckpt" / "latest").write_text(ckpts[0].name)
    rows2 = _run_recipe(compare_cli, out, *TINY)
    assert (out / "runs" / "dense-seed0" / "result.json").stat().st_mtime == dense_mtime, "dense was redone"
    assert rows2[1]["final_val_loss"] == pytest.approx(rows[1]["final_val_loss"], abs=1e-6)
    # A changed config is refused (finished and interrupted runs alike), naming the first differing field, in
    # one line with exit code 2 (it was a traceback)
    for extra, message in (
        ("train.lr=1e-3", r"different config.*train\.lr is 0\.003 there, 0\.001 in the plan"),
        ("model.d_model=32", r"dense-seed0 was trained with a different config.*model\.d_model"),
    ):
        with pytest.raises(SystemExit) as exc:
            _run_recipe(compare_cli, out, *TINY, extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and re.match(rf"compare: error: .*{message}", err) and err.count("\n") == 1, err
        (moe_dir / "result.json").unlink(missing_ok=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.d_model=[64]"], "config key 'model.d_model': expected int, got a list [64]"),
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["model.moe=null"], "the comparison's base model has no moe section"),
        (["compare.variants=['moe.top_k=4']"], "flops_per_token"),  # the plan's refusal
        (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
    ],
)
def test_compare_refusals_print_one_line_and_exit_2(tmp_path, capsys, compare_cli, extra, message):
    """As train_lm / train_multimodal do; compare.py printed a traceback and exited 1."""
    with pytest.raises(SystemExit) as exc:
        _run_recipe(compare_cli, tmp_path / "cmp", "--dry-run", *extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("compare: error: ") and message in err and err.count("\n") == 1


def test_compare_out_must_be_new_empty_or_a_comparison_folder(tmp_path, capsys, compare_cli):
    """Any non-empty folder was accepted: report.md, summary.json, plots and runs/ landed next to its files."""
    from moekit.experiment.runner import run_comparison

    (tmp_path / "x").write_text("mine")
    for out in (tmp_path, tmp_path / "x"):
        with pytest.raises(SystemExit) as exc:
            _run_recipe(compare_cli, out, "--dry-run")
        assert exc.value.code == 2 and f"--out {out} is" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not empty and holds no comparison"):  # the library refuses it too
        run_comparison(load(), tmp_path, dry_run=True, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    (tmp_path / "runs").mkdir()  # an (interrupted) comparison's folder is reused, as one with summary.json
    assert _run_recipe(compare_cli, tmp_path, "--dry-run") == []
    assert _run_recipe(compare_cli, tmp_path / "new", "--dry-run") == []


@pytest.mark.slow
def test_two_runs_side_by_side_in_worker_processes(tmp_path, monkeypatch, compare_cli):
    import moekit.experiment.runner as runner

    pools = []

    class Pool(runner.concurrent.futures.ProcessPoolExecutor):
        def __init__(self, workers, ctx, **kw):
            pools.append((workers, ctx.get_start_method(), kw["max_tasks_per_child"]))
            super().__init__(workers, ctx, **kw)

    monkeypatch.setattr(runner.concurrent.futures, "ProcessPoolExecutor", Pool)
    # spawned workers import afresh: this process must not train a run itself
    monkeypatch.setattr(TASKS["lm"], "build_trainer", lambda *a, **k: pytest.fail("trained in the parent"))
    out = tmp_path / "cmp"
    tiny = ("train.steps=2", "train.eval_every=0", "train.save_every=0", "train.log_every=1")
    tiny += ("compare.workers=2", "compare.threads=1", "compare.sample_tokens=4")
    rows = _run_recipe(compare_cli, out, *tiny)
    assert pools == [(2, "spawn", 1)], "both runs at once, one fresh spawned process each"
    assert [r["name"] for r in rows] == ["dense", "moe-4x2"]
    assert rows[0]["data_digest"] == rows[1]["data_digest"] and all(r["tokens_trained"] == 2 * 8 * 64 for r in rows)
    end = {f: (out / "runs" / f / "result.json").stat().st_mtime for f in ("dense-seed0", "moe-4x2-seed0")}
    # a rerun reuses both results instead of training again
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("retrained"))
    assert _run_recipe(compare_cli, out, *tiny) == rows
    assert end == {f: (out / "runs" / f / "result.json").stat().st_mtime for f in end}


def _rows(dense, moe):
    base = dict(tokens_trained=100, flops_per_token=10)
    return [dict(name="dense", kind="dense", seed=s, final_val_loss=v, **base) for s, v in enumerate(dense)] + [
        dict(name="moe-8x2", kind="moe", seed=s, final_val_loss=v, **base) for s, v in enumerate(moe)
    ]


def test_headline_states_the_paired_spread_without_a_verdict_word():
    from moekit.experiment.report import headline

    text = headline(_rows([2.0, 2.1], [1.9, 2.05]))
    assert "moe-8x2 model reached validation loss" in text and "-0.0750 ± 0.0354" in text
    assert "beats" not in text  # the verdict word comes from the t-interval (comparison_verdicts), not the headline
    one = headline(_rows([2.0], [2.1]))  # one seed: the gap, but no verdict
    assert "higher validation loss than its dense twin on a single paired seed" in one and "(+0.1000)" in one
    assert "worse" not in one and "beats" not in one


def test_headline_numbers_come_from_the_seeds_both_models_finished():
    from moekit.experiment.report import headline

    rows = _rows([2.0, 2.0], [1.9, 1.0])
    rows[1]["status"] = "diverged"  # dense seed 1: the MoE's seed-1 run has no twin
    one = headline(rows)
    assert "lower validation loss" in one and "1.9000 vs 2.0000 nats/byte (-0.1000)" in one
    rows[2]["status"] = "diverged"  # MoE seed 0 as well: no seed left with both
    assert "No seed finished training for both" in headline(rows)


def test_headline_picks_the_best_moe_among_models_paired_with_the_dense_twin():
    """An MoE whose only finished seed has no dense twin cannot be the headline's model, however low its loss."""
    from moekit.experiment.report import headline

    base = dict(tokens_trained=100, flops_per_token=10)
    rows = [dict(name="dense", kind="dense", seed=0, final_val_loss=2.0, **base)]
    rows += [dict(name="moe-a", kind="moe", seed=1, final_val_loss=1.0, **base)]  # unpaired
    rows += [dict(name="moe-b", kind="moe", seed=s, final_val_loss=v, **base) for s, v in [(0, 1.9), (1, 1.2)]]
    text = headline(rows)
    assert "the moe-b model reached a lower validation loss" in text and "1.9000 vs 2.0000" in text, text


@pytest.mark.slow
def test_comparison_runs_on_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    cmd += [str(RECIPE), "--config", CONFIG, "--out", str(tmp_path / "cmp"), "train.steps=4", "train.eval_every=2"]
    cmd += ["compare.workers=2"]  # ignored under a launcher: both ranks train each run together
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("2 process(es)") == 2, "both runs must really use 2 processes"
    assert proc.stdout.count("report:") == 1, "only rank 0 writes the report"
    assert proc.stdout.count("matching (") == 1, "only rank 0 prints the plan"
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [r["tokens_trained"] for r in summary["runs"]] == [4 * 8 * 64] * 2


def test_per_model_train_overrides_apply_to_their_kind_and_are_validated(tmp_path):
    specs = plan_runs(load("compare.dense_overrides=['train.lr=5.6e-3']", "compare.moe_overrides=['train.lr=2e-3']"))
    assert {s.kind: s.run.train.lr for s in specs} == {"dense": 5.6e-3, "moe": 2e-3}
    assert len({(s.run.train.seed, s.run.train.steps, s.run.train.batch_size) for s in specs}) == 1
    fixed = ("train.seed=3", "train.eval_batches=1", "train.mixed_precision=bf16")  # pairing, scoring, precision
    only_train = r"CompareConfig\.moe_overrides=.* is invalid: only train\.\* keys, except .* may differ per model"
    cases = [("model.d_model=8", only_train), *((f, only_train) for f in fixed)]
    cases.append(("train.lrr=1", r"'lrr' is not a field"))
    for bad, why in cases:
        with pytest.raises(ValueError, match=why):
            load(f"compare.moe_overrides=['{bad}']")
    # the resume/reuse check covers them: a run folder trained at another lr is refused
    from moekit.experiment.runner import check_planned

    dense = plan_runs(load("compare.dense_overrides=['train.lr=5.6e-3']"))[0]
    dense.run.save(tmp_path)
    with pytest.raises(ValueError, match=r"train\.lr is 0\.0056 there, 0\.003 in the plan"):
        check_planned(plan_runs(load())[0], tmp_path)


def test_scaling_recipe_end_to_end_writes_fit_and_multipliers(tmp_path, fresh_accelerate):
    from moekit.experiment.runner import run_comparison

    scaling = "compare.scaling={dense_d_model: [16, 32, 64], moe_experts: [2, 4], moe_at: 1}"
    tiny = ["train.steps=3", "train.eval_every=0", "train.save_every=0", "compare.sample_tokens=0", "model.n_layers=1"]
    cmp = load(scaling, "compare.seeds=2", *tiny)
    specs = plan_runs(cmp)
    assert [s.name for s in specs[::2]] == ["dense-d16", "dense", "dense-d64", "moe-2x2", "moe-4x2"]
    rows = run_comparison(cmp, tmp_path, verbose=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    sc = summary["scaling"]
    assert "error" not in sc, sc
    assert sc["fit"]["method"] in ("power_law", "log_linear") and len(sc["fit"]["residuals"]) == 6
    assert [m["model"] for m in sc["multipliers"]] == ["moe-2x2", "moe-4x2"]
    assert all({"multiplier", "multiplier_ci95", "n_seeds"} <= set(m) for m in sc["multipliers"])
    assert (tmp_path / "scaling.png").is_file() and "## Scaling" in (tmp_path / "report.md").read_text()
    assert len(rows) == 10


def test_scaling_config_is_validated():
    with pytest.raises(ValueError, match=r"ScalingConfig\.dense_d_model"):
        load("compare.scaling={dense_d_model: [32, 16, 64], moe_experts: [4]}")
    with pytest.raises(ValueError, match=r"ScalingConfig\.moe_at"):
        load("compare.scaling={dense_d_model: [16, 32, 64], moe_experts: [4], moe_at: 3}")
    with pytest.raises(ValueError, match=r"CompareConfig\.scaling"):
        load("compare.scaling={dense_d_model: [16, 32, 64], moe_experts: [4]}", "compare.budget=flops")


@pytest.mark.parametrize("preset", ["scaling-cpu.yaml", "scaling-gpu.yaml"])
def test_scaling_presets_plan_and_the_gpu_one_starts_on_cpu(preset, tmp_path, fresh_accelerate):
    from moekit.experiment.runner import run_comparison

    path = str(Path(CONFIG).with_name(preset))
    specs = plan_runs(load_comparison(path, []))
    assert (
        len({s.name for s in specs if s.kind == "dense"}) >= 3 and len({s.name for s in specs if s.kind == "moe"}) >= 2
    )
    assert len({s.seed for s in specs}) >= 2 and len({s.run.train.steps for s in specs}) == 1  # same tokens
    if preset == "scaling-gpu.yaml":  # a tiny override really trains 2 steps per run on CPU
        tiny = ["train.steps=2", "train.eval_every=0", "train.eval_batches=1", "train.batch_size=4"]
        tiny += ["train.save_every=0", "model.n_layers=1", "compare.seeds=1", "data.seq_len=32", "model.max_seq_len=32"]
        rows = run_comparison(load_comparison(path, [*tiny, "train.cpu=true"]), tmp_path, verbose=False)
        assert len(rows) == 6 and all(r["tokens_trained"] == 2 * 4 * 32 for r in rows)


@pytest.mark.parametrize(
    "override, message",
    [
        ("compare.sweep=num_experts=4,4", r"CompareConfig\.sweep='num_experts=4,4' is invalid: values must be distinct"
         r".*; 4 appears twice"),
        ("compare.sweep=num_experts=4,8,4,4", r"CompareConfig\.sweep=.*; 4 appears 3 times"),
        ("compare.scaling={dense_d_model: [16, 32, 64], moe_experts: [4, 4]}",
         r"ScalingConfig\.moe_experts=\[4, 4\] is invalid: expert counts must be distinct.*; 4 appears twice"),
        ("compare.variants=['moe.num_experts=8','moe.num_experts=8']",
         r"CompareConfig\.variants=.* is invalid: variants must be distinct.*; 'moe\.num_experts=8' appears twice"),
        ("compare.variants=['moe.num_experts=8','moe.num_experts=8  ']", r"'moe\.num_experts=8' appears twice"),
    ],
)  # fmt: skip
def test_repeated_models_are_refused_when_the_config_loads(override, message):
    """Two models of one name shared run folders and crashed the verdicts after every run had trained."""
    with pytest.raises(ValueError, match=message):
        load(override)


@pytest.mark.parametrize(
    "variants, same",
    [
        ("['moe.num_experts=4']", "'moe-4x2\\[moe.num_experts=4\\]', the same model as 'moe-4x2'"),  # the base
        ("['moe.num_experts=8','moe.num_experts=8 moe.top_k=2']", ".*, the same model as 'moe-8x2'"),
        ("['moe.num_experts=4','moe.num_experts=4 moe.top_k=2']", "'moe-4x2\\[moe.num_experts=4\\]', the same model"),
    ],
)
def test_variants_that_plan_one_model_twice_are_refused_at_planning(variants, same):
    with pytest.raises(ValueError, match=rf"CompareConfig\.variants=\[.*\] is invalid: it plans {same}"):
        plan_runs(load(f"compare.variants={variants}"))
    names = [
        s.name
        for s in plan_runs(load("compare.variants=['moe.num_experts=8','moe.num_experts=8 moe.z_loss_coef=0.01']"))
    ]
    assert names == [
        "dense",
        "moe-4x2",
        "moe-8x2",
        "moe-8x2[moe.num_experts=8 moe.z_loss_coef=0.01]",
    ]  # distinct: planned


@pytest.mark.parametrize("who", ["moe", "dense"])
@pytest.mark.parametrize("bad", [float("nan"), None, float("inf")])
def test_headline_leaves_out_exactly_the_runs_the_verdict_excludes(who, bad):
    """A run with a NaN/None final loss (not marked diverged): the verdict drops its seed, the headline's means
    covered it (NaN skipped in one mean only, seed counted) or crashed on None."""
    from moekit.experiment.report import headline
    from moekit.experiment.verdict import comparison_verdicts

    rows = _rows([2.0, 2.1, 2.3], [1.9, 2.05, 1.0])
    rows[2 if who == "dense" else 5]["final_val_loss"] = bad  # seed 2 of one model
    (v,) = comparison_verdicts(rows)
    assert v["seeds"] == [0, 1] and "seed 2 excluded" in v["reason"]
    text = headline(rows)
    assert f"a paired difference of {v['diff_mean']:+.4f} ± " in text and "n=2 seeds" in text, text
    assert "1.9750 ± 0.1061 vs the dense twin's 2.0500 ± 0.0707" in text, text  # seeds 0 and 1 on both sides


def test_headline_says_matched_only_for_matched_compute_and_gives_both_token_counts():
    from moekit.experiment.report import headline

    rows = _rows([2.0, 2.1], [1.9, 2.05])
    for r in rows:
        r["flops_per_token"] = 1_000_000
    same = "At matched active compute (1.00 vs 1.00 MFLOPs/token) and 100 training tokens, the moe-8x2 model"
    assert headline(rows).startswith(same)
    for r in rows[2:]:  # the MoE: compare.budget=flops gave it its own step count, and 10% more FLOPs per token
        r.update(tokens_trained=90, flops_per_token=1_100_000)
    text = headline(rows)
    assert text.startswith(
        "At active compute 1.10 vs 1.00 MFLOPs/token (not matched: 10.00% apart, beyond compare.max_flops_mismatch) "
        "and 90 vs 100 training tokens (MoE vs dense twin), the moe-8x2 model reached validation loss"
    ), text
    assert "matched active compute" not in text
    assert headline(rows, max_flops_mismatch=0.1).startswith(  # within the comparison's own tolerance
        "At matched active compute (1.10 vs 1.00 MFLOPs/token) and 90 vs 100 training tokens (MoE vs dense twin), "
    )
