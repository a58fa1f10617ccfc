"""A run that diverges (``TrainingDiverged``) does not crash the comparison: its result, summary.json and the
report record it, the verdicts skip its seed and say so, the CLI ends with the verdict and exits normally, in
the main process and across a worker-process boundary alike. The guard is stubbed: the run raises."""

import json
import multiprocessing
import types
from pathlib import Path

import pytest

import moekit.experiment.runner as runner
from moekit.core.guard import TrainingDiverged
from moekit.experiment.plan import TASKS

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "compare-debug.yaml"
TINY = ["train.steps=4", "train.eval_every=2", "train.save_every=2", "compare.sample_tokens=4", "compare.threads=1"]


def _main(main, out, *extra):
    return main(["--config", str(CONFIG), "--out", str(out), *TINY, *extra])


def _diverge_after(steps, folder):
    """``build_trainer`` whose run in ``folder`` trains ``steps`` steps, then raises as the guard would."""
    real = TASKS["lm"].build_trainer

    def build(run, run_dir, **kw):
        trainer = real(run, run_dir, **kw)
        if run_dir.name == folder:
            real_train = trainer.train

            def train():
                real_train(max_steps=steps)
                raise TrainingDiverged(steps, "loss is nan", run_dir / "ckpt" / "step_2")

            trainer.train = train
        return trainer

    return build


@pytest.mark.slow
def test_a_diverged_run_is_recorded_and_its_seed_skipped(tmp_path, monkeypatch, capsys, fresh_accelerate, compare_cli):
    monkeypatch.setattr(TASKS["lm"], "build_trainer", _diverge_after(3, "moe-4x2-seed0"))
    _main(compare_cli, tmp_path, "compare.seeds=2")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        last.startswith("moe-4x2 vs the dense twin is unresolved (1 seed)")
        and "seed 0 excluded (moe-4x2 diverged at step 3)" in last
    )

    result = json.loads((tmp_path / "runs" / "moe-4x2-seed0" / "result.json").read_text())
    assert result["status"] == "diverged" and result["final_val_loss"] is None
    assert result["divergence"] == dict(
        step=3, reason="loss is nan", last_good_checkpoint=str(tmp_path / "runs" / "moe-4x2-seed0" / "ckpt" / "step_2")
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {(r["name"], r["seed"]): r["status"] for r in summary["runs"]}
    assert status == {("dense", 0): "finished", ("dense", 1): "finished", ("moe-4x2", 0): "diverged"} | {
        ("moe-4x2", 1): "finished"
    }
    (v,) = summary["verdicts"]
    assert v["n_seeds"] == 1 and v["seeds"] == [1] and v["verdict"] == "unresolved"
    assert v["excluded"] == [{"seed": 0, "reason": "moe-4x2 diverged at step 3"}]
    assert [d["equal"] for d in summary["data_digests"]] == [None, True]  # a stopped loop: nothing to compare
    report = (tmp_path / "report.md").read_text()
    assert "**Diverged runs**" in report and "moe-4x2-seed0 diverged at step 3: loss is nan" in report
    assert "| moe-4x2 | 2 (1 diverged) |" in report and "| diverged at step 3 |" in report
    assert "DATA DIFFERED" not in report

    # a rerun reuses the diverged result (same config: it would diverge again) and writes the same verdict
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("retrained"))
    _main(compare_cli, tmp_path, "compare.seeds=2")
    assert capsys.readouterr().out.strip().splitlines()[-1] == last


class _FakeTrainer:
    """Enough of a Trainer for ``run_one``: the dense run finishes, the MoE run diverges at step 5."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.accelerator = types.SimpleNamespace(
            device=types.SimpleNamespace(type="cpu"), is_main_process=True, trackers=[], wait_for_everyone=lambda: None
        )

    def train(self):
        if self.run_dir.name.startswith("moe"):
            raise TrainingDiverged(5, "grad norm is inf", None)
        return dict(tokens_seen=512, val_loss=2.5, train_seconds=1.0, data_digest="ab" * 8, val_bpb=3.6)

    def gather_full_model(self):
        return None


def test_divergence_crosses_the_worker_process_boundary(tmp_path, monkeypatch, capsys, compare_cli):
    # fork (not the runner's spawn) so that the workers inherit the stubbed trainer; the rows still travel back
    # pickled, which a TrainingDiverged escaping a worker could not (its constructor takes three arguments)
    class ForkPool(runner.concurrent.futures.ProcessPoolExecutor):
        def __init__(self, workers, ctx, **kw):  # fork cannot limit tasks per child
            super().__init__(workers, multiprocessing.get_context("fork"))

    monkeypatch.setattr(runner.concurrent.futures, "ProcessPoolExecutor", ForkPool)
    monkeypatch.setattr(TASKS["lm"], "build_trainer", lambda run, run_dir, **kw: _FakeTrainer(run_dir))
    rows = _main(compare_cli, tmp_path, "compare.workers=2")
    assert [(r["name"], r["status"]) for r in rows] == [("dense", "finished"), ("moe-4x2", "diverged")]
    assert rows[1]["divergence"] == dict(step=5, reason="grad norm is inf", last_good_checkpoint=None)
    out = capsys.readouterr().out.strip().splitlines()
    assert "moe-4x2-seed0 diverged at step 5: grad norm is inf" in out
    no_pair = "unresolved, no paired seed; seed 0 excluded (moe-4x2 diverged at step 5)."
    assert out[-1] == f"moe-4x2 vs the dense twin on val loss: {no_pair}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    (v,) = summary["verdicts"]
    assert v["verdict"] == "unresolved" and v["n_seeds"] == 0 and v["diff_mean"] is None
    assert summary["runs"][1]["divergence"]["step"] == 5
    assert "No MoE run finished training." in (tmp_path / "report.md").read_text()


def test_the_real_guard_stops_a_diverging_moe_and_the_comparison_reports_it(
    tmp_path, capsys, fresh_accelerate, compare_cli
):
    # No stub: an absurd (finite) MoE learning rate trips the Trainer's divergence guard at step 2.
    out = tmp_path / "cmp"
    _main(compare_cli, out, "compare.moe_overrides=[train.lr=1e3]")
    summary = json.loads((out / "summary.json").read_text())
    status = {r["name"]: (r["status"], (r.get("divergence") or {}).get("step")) for r in summary["runs"]}
    assert status["dense"] == ("finished", None)
    moe = next(name for name in status if name != "dense")
    assert status[moe][0] == "diverged" and status[moe][1] <= 2
    assert summary["verdicts"][0]["verdict"] == "unresolved" and summary["verdicts"][0]["excluded"]
    report = (out / "report.md").read_text()
    assert "Diverged runs" in report and f"{moe}-seed0 diverged at step" in report
    assert "excluded" in capsys.readouterr().out.strip().splitlines()[-1]
