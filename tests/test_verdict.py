"""Paired-seed verdicts against hand-computed t-intervals; the t quantile against closed forms."""

import json
import math

import pytest

from moekit.experiment.verdict import (
    paired_verdicts,
    student_t_cdf,
    student_t_quantile,
    t_interval,
    verdict_metrics,
    verdict_sentence,
    verdicts_sentence,
)

# t_{0.975, 2} exactly: (2p - 1) / sqrt(2 p (1 - p)) at p = 0.975 (the t(2) CDF inverts in closed form).
T975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def rows(dense, moe, name="moe-8x2", metric="final_val_loss", **extra):
    out = [dict(name="dense", kind="dense", seed=s, **{metric: v}) for s, v in enumerate(dense)]
    out += [dict(name=name, kind="moe", seed=s, **{metric: v}, **extra) for s, v in enumerate(moe)]
    return out


def test_t_quantile_known_values():
    assert student_t_quantile(0.975, 2) == pytest.approx(T975_DF2, rel=1e-14)
    assert T975_DF2 == pytest.approx(4.302652729911275, rel=1e-9)  # the brief's table value
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706204736174707, rel=1e-12)
    # Values from standard tables (df 3, 10, 30) and the normal limit: the bisection path, not a closed form.
    assert student_t_quantile(0.975, 3) == pytest.approx(3.182446305284263, rel=1e-10)
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228138851986274, rel=1e-10)
    assert student_t_quantile(0.975, 30) == pytest.approx(2.042272456301238, rel=1e-10)
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)
    assert student_t_quantile(0.025, 5) == -student_t_quantile(0.975, 5)
    for df in (1, 2, 3.5, 12):
        for p in (0.6, 0.9, 0.999):
            assert student_t_cdf(student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_t_quantile_against_scipy_when_present():
    stats = pytest.importorskip("scipy.stats")  # not a runtime dependency; a cross-check where installed
    for df in (3, 4, 7, 25, 60, 0.8):
        for p in (0.55, 0.95, 0.975, 0.9995):
            assert student_t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9)


def test_hand_computed_interval():
    diffs = [-0.02, -0.01, -0.03]
    dense = [2.0, 2.1, 1.9]
    (v,) = paired_verdicts(rows(dense, [d + x for d, x in zip(dense, diffs)]))
    s = 0.01  # sample sd of the diffs: sqrt((0 + 0.01^2 + 0.01^2) / 2)
    half = T975_DF2 * s / math.sqrt(3)  # 0.0248: the interval [-0.0448, +0.0048] straddles 0
    assert v["model"] == "moe-8x2" and v["metric"] == "final_val_loss" and v["n_seeds"] == 3
    assert v["diff_mean"] == pytest.approx(-0.02, abs=1e-12)
    assert v["diff_ci95"] == pytest.approx([-0.02 - half, -0.02 + half], abs=1e-12)
    assert v["verdict"] == "unresolved" and v["higher_is_better"] is False
    assert t_interval(diffs) == pytest.approx((-0.02, -0.02 - half, -0.02 + half), abs=1e-12)
    json.dumps(v, allow_nan=False)


def test_hand_computed_interval_moe_better():
    diffs = [-0.02, -0.018, -0.022]
    dense = [2.0, 2.1, 1.9]
    (v,) = paired_verdicts(rows(dense, [d + x for d, x in zip(dense, diffs)]))
    half = T975_DF2 * 0.002 / math.sqrt(3)  # sd 0.002 -> half-width 0.00497
    assert v["diff_ci95"] == pytest.approx([-0.02 - half, -0.02 + half], abs=1e-12)
    assert v["diff_ci95"][1] < 0 and v["verdict"] == "moe_better" and v["reason"] == ""
    text = verdict_sentence(v)
    assert text == "moe-8x2 beats the dense twin: val loss -0.020 nats/byte (95% CI -0.025 to -0.015, 3 paired seeds)."


def test_dense_better_and_unresolved():
    (v,) = paired_verdicts(rows([1.0, 1.0, 1.0], [1.02, 1.021, 1.019]))
    assert v["verdict"] == "dense_better" and v["diff_ci95"][0] > 0
    assert verdict_sentence(v).startswith("the dense twin beats moe-8x2: val loss +0.020")
    (v,) = paired_verdicts(rows([1.0, 1.0, 1.0], [1.02, 0.99, 1.01]))
    assert v["verdict"] == "unresolved" and v["diff_ci95"][0] < 0 < v["diff_ci95"][1]
    assert "CI includes 0" in v["reason"]


def test_one_seed_is_unresolved():
    (v,) = paired_verdicts(rows([1.0], [0.5]))
    assert v["verdict"] == "unresolved" and v["reason"] == "1 seed"
    assert v["n_seeds"] == 1 and v["diff_mean"] == pytest.approx(-0.5) and v["diff_ci95"] is None
    assert "unresolved (1 seed)" in verdict_sentence(v)


def test_accuracy_is_higher_is_better():
    r = rows([0.50, 0.55, 0.52], [0.60, 0.64, 0.63], metric="caption_acc")
    (v,) = paired_verdicts(r, metrics=("final_val_loss", "caption_acc"))  # no loss in these rows: skipped
    assert v["metric"] == "caption_acc" and v["higher_is_better"] is True
    assert v["diff_ci95"][0] > 0 and v["verdict"] == "moe_better"
    assert verdict_sentence(v).startswith("moe-8x2 beats the dense twin: caption accuracy +0.10")
    (v,) = paired_verdicts(rows([0.60, 0.64, 0.63], [0.50, 0.55, 0.52], metric="caption_acc"), ("caption_acc",))
    assert v["verdict"] == "dense_better"


@pytest.mark.parametrize("bad", [dict(status="diverged"), dict(final_val_loss=math.nan)])
def test_diverged_pair_is_excluded(bad):
    r = rows([1.0, 1.0, 1.0, 1.0], [0.98, 0.979, 0.981, 0.5])
    r[-1].update(bad)  # the MoE run of seed 3
    (v,) = paired_verdicts(r)
    assert v["n_seeds"] == 3 and v["seeds"] == [0, 1, 2]
    assert v["diff_mean"] == pytest.approx(-0.02)  # seed 3's -0.5 did not enter
    assert v["excluded"][0]["seed"] == 3 and "moe-8x2" in v["excluded"][0]["reason"]
    assert "seed 3 excluded" in v["reason"] and v["verdict"] == "moe_better"
    assert "excluded" in verdict_sentence(v)
    json.dumps(v, allow_nan=False)


def test_diverged_dense_leaves_one_seed_unresolved():
    r = rows([1.0, math.inf], [0.9, 0.9])
    (v,) = paired_verdicts(r)
    assert v["verdict"] == "unresolved" and v["n_seeds"] == 1
    assert v["reason"].startswith("1 seed; seed 1 excluded (dense final_val_loss=inf is not finite)")


def test_several_models_and_sentence():
    r = rows([1.0, 1.1], [0.9, 1.0], name="moe-a") + [
        dict(name="moe-b", kind="moe", seed=s, final_val_loss=v) for s, v in enumerate([1.2, 1.31])
    ]
    r.append(dict(name="dense-wide", kind="dense", seed=0, final_val_loss=0.1))  # a dense variant: no verdict
    vs = paired_verdicts(r)
    assert [v["model"] for v in vs] == ["moe-a", "moe-b"]
    line = verdicts_sentence(vs)
    assert line.startswith("moe-a beats the dense twin") and "; the dense twin beats moe-b" in line
    assert line.endswith(".") and line.count(".") >= 1


def test_seeds_pair_in_numeric_order():
    r = [dict(name="dense", kind="dense", seed=s, final_val_loss=1.0) for s in (10, 2, 1)]
    r += [dict(name="moe", kind="moe", seed=s, final_val_loss=1.0 - s / 1000) for s in (1, 10, 2)]
    (v,) = paired_verdicts(r)
    assert v["seeds"] == [1, 2, 10] and v["diff_mean"] == pytest.approx(-13 / 3000)


def test_unpaired_seed_and_errors():
    r = rows([1.0, 1.0], [0.9, 0.91]) + [dict(name="moe-8x2", kind="moe", seed=7, final_val_loss=0.1)]
    (v,) = paired_verdicts(r)
    assert v["n_seeds"] == 2 and v["excluded"] == [{"seed": 7, "reason": "no dense twin run with this seed"}]
    with pytest.raises(ValueError, match="two runs"):
        paired_verdicts(r + [dict(name="dense", kind="dense", seed=0, final_val_loss=1.0)])
    with pytest.raises(ValueError, match="needs 'name' and 'seed'"):
        paired_verdicts(r + [dict(name="dense", final_val_loss=1.0)])
    with pytest.raises(ValueError, match="no dense twin"):
        paired_verdicts([dict(name="moe", kind="moe", seed=0, final_val_loss=1.0)])


def test_multimodal_rows_get_loss_and_per_task_verdicts():
    r = rows([1.0, 1.0], [0.9, 0.91])
    for row, acc in zip(r, [0.5, 0.52, 0.6, 0.63]):
        row.update(caption_acc=acc, audio_acc=acc / 2)
    metrics = verdict_metrics(r)
    assert metrics == ["final_val_loss", "audio_acc", "caption_acc"]
    vs = paired_verdicts(r, metrics)
    assert [v["metric"] for v in vs] == metrics
    line = verdicts_sentence(vs, "final_val_loss", unit="nats/token")
    assert line.startswith("moe-8x2 beats the dense twin: val loss -0.095 nats/token (95% CI ")
