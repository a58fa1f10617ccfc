"""Dense-equivalent compute multiplier against synthetic dense families with a known answer."""

import json
import math

import numpy as np
import pytest

from moekit.experiment.scaling import DenseFit, dense_equivalent, fit_dense, plot_scaling, scaling_analysis
from moekit.experiment.verdict import student_t_quantile

E, A, ALPHA = 1.5, 20.0, 0.1
SIZES = [float(c) for c in np.geomspace(1e12, 1e16, 5)]


def law(c: float) -> float:
    return E + A * c**-ALPHA


def dense_rows(offsets=(0.0,), sizes=SIZES):
    """One dense run per (size, seed); seed s's whole curve is shifted by offsets[s] (E + offset)."""
    return [
        dict(name=f"dense-{i}", kind="dense", seed=s, train_flops=c, final_val_loss=law(c) + off)
        for i, c in enumerate(sizes)
        for s, off in enumerate(offsets)
    ]


def test_power_law_recovers_exact_parameters():
    fit = fit_dense(SIZES, [law(c) for c in SIZES])
    assert fit.method == "power_law" and fit.note == ""
    assert fit.E == pytest.approx(E, rel=1e-6)
    assert fit.A == pytest.approx(A, rel=1e-6)
    assert fit.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert fit.rmse < 1e-9 and len(fit.residuals) == 5
    assert fit.flops_for_loss(law(7e13)) == pytest.approx(7e13, rel=1e-6)
    assert fit.flops_for_loss(1.4) is None  # below E: no dense size reaches it


def test_power_law_with_seed_noise():
    rng = np.random.default_rng(0)
    c = [x for x in SIZES for _ in range(3)]
    y = [law(x) + 0.002 * rng.standard_normal() for x in c]
    fit = fit_dense(c, y)
    assert fit.method == "power_law" and fit.sizes == SIZES and len(fit.points) == 15
    for r, (cx, yx) in zip(fit.residuals, fit.points):
        assert r["residual"] == pytest.approx(yx - fit.loss_at(cx), abs=1e-12)
    assert fit.rmse < 0.003  # residuals at the noise level: the fit found the curve
    # Within the dense range the fitted curve tracks the true one closely even if (E, A, alpha) trade off.
    for x in np.geomspace(1e12, 1e16, 9):
        assert fit.loss_at(float(x)) == pytest.approx(law(float(x)), abs=0.004)


def brute_force_sse(c, y):
    """Slow reference: the best loss-space SSE over a fine (E, alpha) grid, A in closed form for each pair."""
    c, y = np.asarray(c), np.asarray(y)
    best = np.inf
    for e in np.linspace(0.0, y.min(), 400, endpoint=False):
        g = c[None, :] ** -np.geomspace(1e-3, 2.0, 400)[:, None]  # [alpha, point]
        a = (g * (y - e)).sum(1) / (g * g).sum(1)  # least-squares A for each alpha
        best = min(best, float((((y - e) - a[:, None] * g) ** 2).sum(1).min()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_power_law_fit_is_at_least_as_good_as_a_brute_force_grid(seed):
    rng = np.random.default_rng(seed)
    c = np.geomspace(1e10, 1e15, 5)
    e, a, alpha = rng.uniform(0.5, 2.5), rng.uniform(5, 50), rng.uniform(0.05, 0.3)
    y = e + a * c**-alpha
    y = y + 0.1 * np.diff(y).min() * rng.standard_normal(5)  # noise below the size-to-size gaps
    fit = fit_dense(list(c), list(y))
    assert fit.method == "power_law"
    assert fit.rmse**2 * 5 <= brute_force_sse(c, y) * (1 + 1e-6)


def test_multiplier_three_paired_seeds():
    offsets = (0.0, 0.01, -0.005)
    c_moe = 3e13
    rows = dense_rows(offsets) + [
        dict(name="moe-8x2", kind="moe", seed=s, train_flops=c_moe, final_val_loss=law(3 * c_moe) + off)
        for s, off in enumerate(offsets)
    ]
    out = scaling_analysis(rows)
    json.dumps(out, allow_nan=False)
    (m,) = out["multipliers"]
    assert out["fit"]["method"] == "power_law"
    assert m["ci_method"] == "paired_refit" and m["n_seeds"] == 3 and m["status"] == "interpolated"
    # Each seed's dense curve is the law shifted by that seed's offset, and so is its MoE loss: exactly 3x.
    assert m["multiplier"] == pytest.approx(3.0, rel=0.01)
    assert m["multiplier_ci95"] == pytest.approx([3.0, 3.0], rel=0.01)
    for p in m["per_seed"]:
        assert p["multiplier"] == pytest.approx(3.0, rel=0.01)
        assert p["dense_equiv_flops"] == pytest.approx(9e13, rel=0.01)


def test_multiplier_interval_is_a_t_interval_of_log_multipliers():
    true = [2.0, 3.0, 4.5]
    c_moe = 3e13
    rows = dense_rows((0.0,)) + [
        dict(name="moe", kind="moe", seed=s, train_flops=c_moe, final_val_loss=law(k * c_moe))
        for s, k in enumerate(true)
    ]
    (m,) = scaling_analysis(rows)["multipliers"]
    assert m["ci_method"] == "central_fit"  # dense has seed 0 only: every seed is placed on the one fit
    logs = np.log(true)
    half = student_t_quantile(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert m["multiplier"] == pytest.approx(math.exp(logs.mean()), rel=1e-5)
    assert m["multiplier_ci95"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)], rel=1e-5)


def test_a_seed_that_does_not_fit_alone_falls_back_to_the_central_fit():
    rows = dense_rows((0.0, 0.0))
    rows += [
        dict(name="dense-odd", kind="dense", seed=2, train_flops=c, final_val_loss=y)
        for c, y in zip(SIZES, [2.0, 2.1, 2.2, 2.3, 2.4])
    ]
    rows += [dict(name="moe", kind="moe", seed=s, train_flops=3e13, final_val_loss=law(9e13)) for s in range(3)]
    (m,) = scaling_analysis(rows)["multipliers"]
    assert m["ci_method"] == "central_fit" and "seed 2's dense runs do not fit alone" in m["reason"]
    assert m["n_seeds"] == 3 and m["multiplier"] is not None


def test_log_linear_between_neighbours():
    sizes = [1e12, 1e13]
    fit = fit_dense(sizes, [3.0, 2.0])
    assert fit.method == "log_linear" and "2 distinct dense sizes" in fit.note
    assert fit.loss_at(math.sqrt(1e12 * 1e13)) == pytest.approx(2.5)
    # A MoE at 1e12 FLOPs reaching the midpoint loss is worth sqrt(10) times its compute.
    d = dense_equivalent(fit, 1e12, 2.5)
    assert d["status"] == "interpolated" and d["multiplier"] == pytest.approx(math.sqrt(10), rel=1e-9)
    with pytest.raises(ValueError, match="power_law.*ill-posed.*2 distinct"):
        fit_dense(sizes, [3.0, 2.0], method="power_law")
    # Explicit log-linear on many sizes: piecewise, exact at the sizes.
    fit = fit_dense(SIZES, [law(c) for c in SIZES], method="log_linear")
    assert fit.method == "log_linear" and fit.rmse < 1e-12
    assert fit.flops_for_loss(law(SIZES[2])) == pytest.approx(SIZES[2], rel=1e-9)


def test_power_law_falls_back_when_loss_rises_with_compute():
    fit = fit_dense(SIZES[:3], [2.0, 2.1, 2.3])
    assert fit.method == "log_linear" and "ill-posed" in fit.note and "not fall" in fit.note
    fit = fit_dense([1e12, 1e13, 1e14, 1e15], [3.0, 2.5, 2.6, 2.0])  # falls overall, one size out of line
    assert fit.method == "power_law" and "do not fall monotonically" in fit.note
    assert "3 sizes for 3 parameters" in fit_dense(SIZES[:3], [law(c) for c in SIZES[:3]]).note


def test_outside_the_dense_range():
    fit = fit_dense(SIZES, [law(c) for c in SIZES])
    # 2x beyond the largest dense size: placed, but flagged.
    d = dense_equivalent(fit, 1e15, law(2e16))
    assert d["status"] == "extrapolated" and d["multiplier"] == pytest.approx(20.0, rel=1e-5)
    assert "beyond the largest" in d["reason"]
    # 100x beyond: refused, with the reason.
    d = dense_equivalent(fit, 1e15, law(1e18))
    assert d["status"] == "refused" and d["multiplier"] is None and "max_extrapolation=4x" in d["reason"]
    assert dense_equivalent(fit, 1e15, law(1e18), max_extrapolation=1000)["status"] == "extrapolated"
    # Below the fitted irreducible loss: no dense model gets there.
    d = dense_equivalent(fit, 1e15, 1.45)
    assert d["status"] == "refused" and "irreducible loss" in d["reason"]
    # Worse than the smallest dense size.
    d = dense_equivalent(fit, 1e12, law(5e11))
    assert d["status"] == "extrapolated" and "below the smallest" in d["reason"]
    assert d["multiplier"] == pytest.approx(0.5, rel=1e-5)
    # Through the analysis: a refused model says so and carries no multiplier.
    rows = dense_rows() + [dict(name="moe", kind="moe", seed=0, train_flops=1e15, final_val_loss=1.45)]
    (m,) = scaling_analysis(rows)["multipliers"]
    assert m["status"] == "refused" and m["multiplier"] is None and "seed 0" in m["reason"]


def test_diverged_rows_are_excluded_and_plot_is_written(tmp_path):
    rows = dense_rows((0.0, 0.01))
    rows.append(dict(name="dense-9", kind="dense", seed=0, train_flops=1e17, final_val_loss=math.nan))
    rows += [
        dict(name="moe-8x2", kind="moe", seed=s, train_flops=3e13, final_val_loss=law(9e13) + o)
        for s, o in enumerate((0.0, 0.01))
    ]
    rows += [dict(name="moe-16x2", kind="moe", seed=0, train_flops=3e13, final_val_loss=law(2e14), status="ok")]
    rows.append(dict(name="moe-16x2", kind="moe", seed=1, train_flops=3e13, final_val_loss=9.0, status="diverged"))
    out = scaling_analysis(rows)
    assert [e["name"] for e in out["excluded"]] == ["dense-9", "moe-16x2"]
    assert len(out["fit"]["points"]) == 10
    m8, m16 = out["multipliers"]
    assert m8["multiplier"] == pytest.approx(3.0, rel=0.01) and m16["n_seeds"] == 1
    assert m16["multiplier_ci95"] is None and "1 seed" in m16["reason"]
    json.dumps(out, allow_nan=False)
    fit = DenseFit.from_dict(json.loads(json.dumps(out["fit"])))
    assert fit.loss_at(5e13) == pytest.approx(law(5e13) + 0.005, rel=1e-6)  # the mean of the two seeds' curves
    path = plot_scaling(out, tmp_path / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_bad_inputs():
    with pytest.raises(ValueError, match="method='cubic'"):
        fit_dense(SIZES, SIZES, method="cubic")
    with pytest.raises(ValueError, match="at least 2 distinct"):
        fit_dense([1e12, 1e12], [2.0, 2.1])
    with pytest.raises(ValueError, match="finite flops > 0"):
        fit_dense([1e12, -1.0], [2.0, 2.1])
    with pytest.raises(ValueError, match="no usable dense rows"):
        scaling_analysis([dict(name="moe", kind="moe", seed=0, train_flops=1.0, final_val_loss=1.0)])
