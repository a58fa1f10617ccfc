"""The scaling recipe: plan a dense family and MoEs at one of its sizes (:class:`ScalingConfig`), then price
each MoE in dense-equivalent compute: the training FLOPs a dense model would need for its loss.

Shapes are plain lists: ``C`` training FLOPs (active FLOPs for a MoE), ``L`` final validation loss.

1. Fit the dense family's loss against training FLOPs (:func:`fit_dense`):

   - ``power_law``: ``L(C) = E + A * C^-alpha``. For a fixed ``E`` the law is linear in log space, so ``E`` is
     profiled (a grid over ``E in [0, min L)`` spaced in ``log(min L - E)``, golden-section refinement, each
     step a log-space least-squares fit scored in loss space), then Levenberg-Marquardt polishes
     ``(E, log A, alpha)`` in loss space. Needs 3+ distinct sizes and ``alpha > 0``; with exactly 3 sizes the
     law interpolates the size means, so the residuals show seed noise only.
   - ``log_linear``: straight lines in ``log C`` between neighbouring sizes' mean losses, end segments
     extended. ``method='auto'`` falls back to it, saying why, when the power law is ill-posed.

2. Invert it at each MoE seed's loss; the **multiplier** is ``C_dense_equiv(L_moe) / C_moe``. Outside the
   dense range it is flagged as extrapolated, and refused (``None``, with the reason) beyond
   ``max_extrapolation`` times the end sizes or below the fitted ``E``.

3. Over seeds: when every dense size has a run with the MoE's seed, that seed's dense runs are refitted alone
   (paired: it carries the dense seed noise too), else every seed uses the fit over all dense runs. The
   multiplier's 95% CI is a t-interval of ``log(multiplier)``, reported as ``exp``; the point estimate is
   the geometric mean.

:func:`scaling_analysis` returns plain JSON (``None`` for missing numbers); :func:`plot_scaling` draws from
that same dict, so a report can redraw it from ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.core.checks import fail, is_finite_number, is_int
from moekit.core.config import ModelConfig
from moekit.core.files import atomic_write_bytes
from moekit.experiment.adapter import Row, md_table, repeated
from moekit.experiment.matching import dense_twin, moe_name
from moekit.experiment.plots import PALETTE
from moekit.experiment.verdict import seed_order, t_interval

FIT_METHODS = ("auto", "power_law", "log_linear")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class ScalingConfig:
    """``compare.scaling``: a dense family at 3+ widths on the same tokens, plus MoE models (the base MoE's
    routing, ``moe_experts`` expert counts) at the active compute of dense size ``moe_at``. The dense size
    ``moe_at`` is the MoEs' FLOP-matched dense twin (named ``dense``); the others are ``dense-d<width>`` with
    the twin's FFN/d_model ratio."""

    dense_d_model: list[int] = field(default_factory=list)  # ascending widths (n_heads must divide each)
    moe_experts: list[int] = field(default_factory=list)  # expert counts of the MoE models
    moe_at: int = 0  # index into dense_d_model: the width whose active FLOPs the MoEs match

    def __post_init__(self) -> None:
        d, e = self.dense_d_model, self.moe_experts
        if not isinstance(d, list) or len(d) < 3 or not all(is_int(w) and w > 0 for w in d) or d != sorted(set(d)):
            fail("ScalingConfig", "dense_d_model", d, "must list 3 or more ascending distinct positive ints")
        if not isinstance(e, list) or not e or not all(is_int(n) and n >= 1 for n in e):
            fail("ScalingConfig", "moe_experts", e, "must list one or more expert counts >= 1")
        if dup := repeated(e):
            fail("ScalingConfig", "moe_experts", e, f"expert counts must be distinct (one MoE model each); {dup}")
        if not is_int(self.moe_at) or not 0 <= self.moe_at < len(d):
            fail("ScalingConfig", "moe_at", self.moe_at, f"must index dense_d_model (0..{len(d) - 1})")


def scaling_models(sc: ScalingConfig, moe: ModelConfig, seq: int) -> list[tuple[str, str, ModelConfig, Any]]:
    """The planner's ``(name, kind, decoder, d_model)`` models: MoEs at width ``dense_d_model[moe_at]`` (base
    routing, active FFN width scaled with d_model), their dense twin ``dense`` there, the dense family."""
    assert moe.moe is not None
    width = sc.dense_d_model[sc.moe_at]
    moes = []
    for n in sc.moe_experts:
        k = min(moe.moe.top_k, n)
        d_expert = max(1, round(moe.moe.top_k * moe.moe.d_expert * (width / moe.d_model) / k))
        m = dataclasses.replace(
            moe, d_model=width, moe=dataclasses.replace(moe.moe, num_experts=n, top_k=k, d_expert=d_expert)
        )
        moes.append((moe_name(m.moe), "moe", m, width))
    twin = dense_twin(moes[0][2], seq)
    dense = []
    for w in sc.dense_d_model:
        m = twin if w == width else dataclasses.replace(twin, d_model=w, d_ff=max(1, round(twin.d_ff * w / width)))
        dense.append(("dense" if w == width else f"dense-d{w}", "dense", m, w))
    return dense + moes


@dataclass
class DenseFit:
    """A fitted dense loss-vs-training-FLOPs curve. Build it with :func:`fit_dense`."""

    method: str  # "power_law" or "log_linear"
    sizes: list[float]  # distinct dense training FLOPs, ascending
    size_loss: list[float]  # mean loss per size over its points (seeds)
    points: list[tuple[float, float]]  # every (C, L) the fit saw
    E: float | None = None  # power law: irreducible loss
    A: float | None = None  # power law: scale (in units of C^alpha)
    alpha: float | None = None  # power law: exponent
    note: str = ""  # why this method, and caveats
    residuals: list[dict[str, float]] = field(default_factory=list)  # per point: flops, loss, fitted, residual

    def __post_init__(self) -> None:
        if not self.residuals:
            self.residuals = [
                {"flops": c, "loss": y, "fitted": self.loss_at(c), "residual": y - self.loss_at(c)}
                for c, y in self.points
            ]

    def loss_at(self, flops: float) -> float:
        """The fitted dense loss at ``flops`` (log-linear: the end segments extended beyond the sizes)."""
        if self.method == "power_law":
            return float(self.E + self.A * flops ** (-self.alpha))
        if len(self.sizes) == 1:
            return self.size_loss[0]
        x, xs = math.log(flops), [math.log(c) for c in self.sizes]
        i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
        t = (x - xs[i]) / (xs[i + 1] - xs[i])
        return self.size_loss[i] + t * (self.size_loss[i + 1] - self.size_loss[i])

    def flops_for_loss(self, loss: float) -> float | None:
        """The training FLOPs at which the fitted dense curve reaches ``loss``; ``None`` where it never does
        (at or below the power law's ``E``, or beyond a log-linear end segment that does not fall)."""
        if self.method == "power_law":
            if loss <= self.E:
                return None
            return float(((loss - self.E) / self.A) ** (-1.0 / self.alpha))
        xs, ys = [math.log(c) for c in self.sizes], self.size_loss
        if len(xs) < 2:
            return None
        for i in range(len(xs) - 1):  # the first crossing from the smallest size up
            lo, hi = sorted((ys[i], ys[i + 1]))
            if lo <= loss <= hi and ys[i] != ys[i + 1]:
                return float(math.exp(xs[i] + (loss - ys[i]) / (ys[i + 1] - ys[i]) * (xs[i + 1] - xs[i])))
        # Outside the sizes' range: extend the end segment on the side the loss lies (falling segments only).
        j = len(xs) - 2 if loss < min(ys) else 0
        slope = (ys[j + 1] - ys[j]) / (xs[j + 1] - xs[j])
        if slope >= 0:
            return None
        return float(math.exp(xs[j] + (loss - ys[j]) / slope))

    @property
    def rmse(self) -> float:
        return math.sqrt(sum(r["residual"] ** 2 for r in self.residuals) / len(self.residuals))

    def to_dict(self) -> dict[str, Any]:
        params = {"E": self.E, "A": self.A, "alpha": self.alpha} if self.method == "power_law" else None
        return {
            "method": self.method,
            "formula": "L = E + A * C^-alpha" if self.method == "power_law" else "L linear in log C between sizes",
            "params": params,
            "sizes": list(self.sizes),
            "size_loss": list(self.size_loss),
            "points": [list(p) for p in self.points],
            "residuals": [dict(r) for r in self.residuals],
            "rmse": self.rmse,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DenseFit:
        params = d.get("params") or {}
        points = [(float(c), float(y)) for c, y in d["points"]]
        return cls(d["method"], list(d["sizes"]), list(d["size_loss"]), points, **params, note=d.get("note", ""))


def _log_fit(x: np.ndarray, y: np.ndarray, e: float) -> tuple[float, float, float]:
    """Least squares of ``log(y - e) = a - alpha * x``: ``(a, alpha, sse in loss space)``."""
    design = np.stack([np.ones_like(x), -x], axis=1)
    (a, alpha), *_ = np.linalg.lstsq(design, np.log(y - e), rcond=None)
    pred = e + np.exp(a - alpha * x)
    return float(a), float(alpha), float(np.sum((y - pred) ** 2))


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """``(E, a, alpha)`` of ``y = E + exp(a - alpha * x)`` with ``E in [0, min y)``; ``x`` = centred log C."""
    y_min = float(y.min())
    # u = log(min y - E): E = 0 at u_max, E -> min y as u -> -inf. Spacing in u resolves E close to min y.
    u_max = math.log(y_min)
    u_min = u_max - math.log(1e9)

    def sse(u: float) -> float:
        return _log_fit(x, y, y_min - math.exp(u))[2]

    grid = np.linspace(u_min, u_max, 241)
    vals = [sse(float(u)) for u in grid]
    k = int(np.argmin(vals))
    lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc, fd = sse(c), sse(d)
    for _ in range(100):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = sse(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = sse(d)
    u = (lo + hi) / 2.0
    e = y_min - math.exp(u)
    a, alpha, best = _log_fit(x, y, e)
    theta = np.array([e, a, alpha])
    # Levenberg-Marquardt in loss space: the profile minimised a log-space fit for each E; this polishes
    # all three parameters jointly on the quantity that matters, the loss residual.
    lam = 1e-3
    for _ in range(100):
        e, a, alpha = theta
        g = np.exp(a - alpha * x)
        r = y - (e + g)
        jac = np.stack([np.ones_like(x), g, -x * g], axis=1)
        jtj, jtr = jac.T @ jac, jac.T @ r
        try:
            step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-30), jtr)
        except np.linalg.LinAlgError:
            break  # keep the profiled solution
        new = theta + step
        r_new = y - (new[0] + np.exp(new[1] - new[2] * x))
        new_sse = float(r_new @ r_new)
        if 0.0 <= new[0] < y_min and new_sse <= best:
            theta, lam = new, max(lam / 10.0, 1e-12)
            converged = best - new_sse <= 1e-30 + 1e-15 * best
            best = new_sse
            if converged:
                break
        else:
            lam *= 10.0
            if lam > 1e12:
                break
    return float(theta[0]), float(theta[1]), float(theta[2])


def fit_dense(flops: Sequence[float], losses: Sequence[float], *, method: str = "auto") -> DenseFit:
    """Fit the dense family's loss against training FLOPs; one point per run (several seeds per size welcome).

    ``method``: 'power_law', 'log_linear' or 'auto' (the power law when it is well posed, else log-linear,
    with the reason in ``DenseFit.note``). An explicit 'power_law' that is ill-posed raises ``ValueError``.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"fit_dense method={method!r} is invalid: allowed values are {', '.join(FIT_METHODS)}")
    if len(flops) != len(losses) or not flops:
        raise ValueError(f"fit_dense needs equally long, non-empty flops and losses; got {len(flops)}, {len(losses)}")
    points = [(float(c), float(y)) for c, y in zip(flops, losses)]
    for c, y in points:
        if not (math.isfinite(c) and c > 0 and math.isfinite(y) and y > 0):
            raise ValueError(f"fit_dense point (flops={c!r}, loss={y!r}) is invalid: needs finite flops > 0, loss > 0")
    by_size: dict[float, list[float]] = {}
    for c, y in points:
        by_size.setdefault(c, []).append(y)
    sizes = sorted(by_size)
    size_loss = [math.fsum(by_size[c]) / len(by_size[c]) for c in sizes]
    if len(sizes) < 2:
        raise ValueError(f"fit_dense needs at least 2 distinct dense sizes (training FLOPs); got {len(sizes)}")

    monotone = all(b < a for a, b in zip(size_loss, size_loss[1:]))
    why_not = ""
    if method in ("auto", "power_law"):
        if len(sizes) < 3:
            why_not = f"{len(sizes)} distinct dense sizes; a 3-parameter power law needs at least 3"
        else:
            x_all = np.log([c for c, _ in points])
            x0 = float(x_all.mean())
            e, a, alpha = _power_law(x_all - x0, np.array([y for _, y in points]))
            if not all(math.isfinite(v) for v in (e, a, alpha)) or alpha <= 0:
                why_not = f"the power-law fit is ill-posed (alpha={alpha:.3g}: the loss does not fall with compute)"
            else:
                notes = [
                    "3 sizes for 3 parameters: the law can pass through every size mean, so the residuals show "
                    "seed noise, not how well a power law describes the family"
                ] * (len(sizes) == 3)
                notes += ["the size means do not fall monotonically: noise rivals compute"] * (not monotone)
                note = "; ".join(notes)
                big_a = math.exp(a + alpha * x0)  # back from centred log C: A * C^-alpha = exp(a - alpha (ln C - x0))
                return DenseFit("power_law", sizes, size_loss, points, E=e, A=big_a, alpha=alpha, note=note)
        if method == "power_law":
            raise ValueError(f"fit_dense method='power_law' is ill-posed here: {why_not}; use 'log_linear'")
    note = f"log-linear between neighbouring sizes ({why_not})" if why_not else "log-linear between neighbouring sizes"
    if not monotone:
        note += "; the size means do not fall monotonically, the inverse takes the first crossing"
    return DenseFit("log_linear", sizes, size_loss, points, note=note)


def dense_equivalent(
    fit: DenseFit, moe_flops: float, moe_loss: float, *, max_extrapolation: float = 4.0
) -> dict[str, Any]:
    """Place one MoE run on the dense curve: ``{"moe_flops", "moe_loss", "dense_equiv_flops", "multiplier",
    "status", "reason"}`` with status 'interpolated' (within the dense sizes' FLOPs range), 'extrapolated'
    (outside it, by at most ``max_extrapolation`` times, flagged) or 'refused' (multiplier None)."""
    if not max_extrapolation >= 1.0:
        raise ValueError(f"dense_equivalent max_extrapolation={max_extrapolation!r} is invalid: must be >= 1")
    out: dict[str, Any] = {"moe_flops": moe_flops, "moe_loss": moe_loss, "dense_equiv_flops": None}
    out.update(multiplier=None, status="refused", reason="")
    if not (is_finite_number(moe_loss) and is_finite_number(moe_flops) and moe_flops > 0):
        out["reason"] = f"needs a finite loss and flops > 0; got loss={moe_loss!r}, flops={moe_flops!r}"
        return out
    c_eq = fit.flops_for_loss(moe_loss)
    if c_eq is None:
        floor = f"the fitted irreducible loss E={fit.E:.4g}" if fit.method == "power_law" else "the dense fit"
        out["reason"] = f"loss {moe_loss:.4g} is below {floor}: no dense model size reaches it"
        return out
    c_min, c_max = fit.sizes[0], fit.sizes[-1]
    factor = max(c_eq / c_max, c_min / c_eq, 1.0)
    where = "beyond the largest" if c_eq > c_max else "below the smallest"
    if factor > max_extrapolation:
        out["reason"] = (
            f"the dense equivalent ({c_eq:.3g} FLOPs) lies {factor:.3g}x {where} dense size; extrapolating "
            f"further than max_extrapolation={max_extrapolation:g}x is refused (add a dense size there)"
        )
        return out
    out.update(dense_equiv_flops=c_eq, multiplier=c_eq / moe_flops)
    if factor > 1.0:
        out.update(status="extrapolated", reason=f"extrapolated {factor:.3g}x {where} dense size")
    else:
        out["status"] = "interpolated"
    return out


def _usable(row: Mapping[str, Any], metric: str, flops_key: str) -> bool:
    ok = is_finite_number(row.get(metric)) and is_finite_number(row.get(flops_key))
    return ok and row.get("status") != "diverged"


def scaling_analysis(
    rows: Iterable[Mapping[str, Any]],
    *,
    metric: str = "final_val_loss",
    flops_key: str = "train_flops",
    method: str = "auto",
    max_extrapolation: float = 4.0,
) -> dict[str, Any]:
    """Fit the dense family (rows with ``kind='dense'``) and price every MoE model (``kind='moe'``) in it.

    Returns ``{"metric", "flops_key", "fit": DenseFit.to_dict(), "excluded": [...], "multipliers": [...]}``;
    each multiplier entry::

        {"model", "n_seeds", "multiplier", "multiplier_ci95": [lo, hi] | None, "ci_method", "status",
         "reason", "moe_flops", "moe_loss", "per_seed": [dense_equivalent(...) + {"seed"}]}

    ``ci_method`` is 'paired_refit' (each seed against a dense fit over that seed's runs) or 'central_fit'.
    """
    rows = list(rows)
    excluded = [
        {"name": r["name"], "seed": r.get("seed"), "reason": "diverged or missing/non-finite loss or flops"}
        for r in rows
        if r.get("kind") in ("dense", "moe") and not _usable(r, metric, flops_key)
    ]
    dense = [r for r in rows if r.get("kind") == "dense" and _usable(r, metric, flops_key)]
    if not dense:
        raise ValueError(
            f"scaling_analysis found no usable dense rows (kind='dense' with finite {metric}, {flops_key})"
        )
    central = fit_dense([r[flops_key] for r in dense], [r[metric] for r in dense], method=method)
    models: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("kind") == "moe" and _usable(r, metric, flops_key):
            models.setdefault(r["name"], []).append(r)

    def place(fit: DenseFit, seed: Any, flops: float, loss: float) -> dict[str, Any]:
        return {"seed": seed, **dense_equivalent(fit, flops, loss, max_extrapolation=max_extrapolation)}

    out = []
    for name, runs in models.items():
        per_seed, unpaired = [], ""
        for r in sorted(runs, key=lambda r: seed_order(r.get("seed"))):
            same = [d for d in dense if d.get("seed") == r.get("seed")]
            fit = central
            if {d[flops_key] for d in same} != set(central.sizes):
                unpaired = f"seed {r.get('seed')!r} lacks a dense run at some size"
            else:
                try:
                    fit = fit_dense([d[flops_key] for d in same], [d[metric] for d in same], method=central.method)
                except ValueError as e:  # e.g. one seed's losses do not fall with compute
                    unpaired = f"seed {r.get('seed')!r}'s dense runs do not fit alone ({e})"
            per_seed.append(place(fit, r.get("seed"), float(r[flops_key]), float(r[metric])))
        if unpaired:  # mixing the two kinds of estimate in one interval would be meaningless
            per_seed = [place(central, p["seed"], p["moe_flops"], p["moe_loss"]) for p in per_seed]
        m = _summarise(name, per_seed, "central_fit" if unpaired else "paired_refit")
        if unpaired:
            m["reason"] = "; ".join(x for x in (m["reason"], f"central fit for every seed: {unpaired}") if x)
        out.append(m)
    return dict(metric=metric, flops_key=flops_key, fit=central.to_dict(), excluded=excluded, multipliers=out)


def _summarise(name: str, per_seed: list[dict[str, Any]], ci_method: str) -> dict[str, Any]:
    ok = [p for p in per_seed if p["multiplier"] is not None]
    logs = [math.log(p["multiplier"]) for p in ok]
    ci = t_interval(logs)
    refused = [f"seed {p['seed']}: {p['reason']}" for p in per_seed if p["multiplier"] is None]
    reasons = []
    if not ok:
        status = "refused"
    elif any(p["status"] == "extrapolated" for p in ok):
        status = "extrapolated"
        reasons.append("extrapolated beyond the dense sizes for some seeds")
    else:
        status = "interpolated"
    if len(ok) == 1:
        reasons.append("1 seed: no confidence interval")
    reasons += refused
    return {
        "model": name,
        "n_seeds": len(ok),
        "multiplier": math.exp(math.fsum(logs) / len(logs)) if ok else None,
        "multiplier_ci95": [math.exp(ci[1]), math.exp(ci[2])] if ci is not None else None,
        "ci_method": ci_method,
        "status": status,
        "reason": "; ".join(reasons),
        "moe_flops": math.fsum(p["moe_flops"] for p in per_seed) / len(per_seed),
        "moe_loss": math.fsum(p["moe_loss"] for p in per_seed) / len(per_seed),
        "per_seed": per_seed,
    }


def _multiplier_text(m: Mapping[str, Any]) -> str:
    if m["multiplier"] is None:
        return f"{m['model']}: refused"
    text = f"{m['model']}: {m['multiplier']:.2f}x dense compute"
    if m["multiplier_ci95"] is not None:
        lo, hi = m["multiplier_ci95"]
        text += f" (95% CI {lo:.2f}-{hi:.2f}, {m['n_seeds']} seeds)"
    return text + (" [extrapolated]" if m["status"] == "extrapolated" else "")


def plot_scaling(analysis: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Draw loss vs training FLOPs (log x) from :func:`scaling_analysis`'s dict: dense points and fit, MoE
    points with the dense-equivalent FLOPs marked and the multiplier annotated, and the fit's residuals
    below. Written atomically as PNG; returns the path. Uses the Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fit = DenseFit.from_dict(analysis["fit"])
    fig = Figure(figsize=(7.5, 6.0))
    FigureCanvasAgg(fig)
    ax, ax_r = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    all_c = [c for c, _ in fit.points] + [p["moe_flops"] for m in analysis["multipliers"] for p in m["per_seed"]]
    all_c += [p["dense_equiv_flops"] for m in analysis["multipliers"] for p in m["per_seed"] if p["dense_equiv_flops"]]
    grid = np.geomspace(min(all_c) / 1.5, max(all_c) * 1.5, 200)
    ax.plot(grid, [fit.loss_at(float(c)) for c in grid], color="0.3", lw=1.2, label=f"dense fit ({fit.method})")
    ax.scatter([c for c, _ in fit.points], [y for _, y in fit.points], color="0.1", s=18, zorder=3, label="dense runs")
    for i, m in enumerate(analysis["multipliers"]):
        col = PALETTE[1 + i % (len(PALETTE) - 1)]  # the report's colours, dense grey left out
        seeds = m["per_seed"]
        ax.scatter(
            [p["moe_flops"] for p in seeds], [p["moe_loss"] for p in seeds], color=col, marker="D", s=22, zorder=4
        )
        if m["multiplier"] is not None:
            c_eq = m["multiplier"] * m["moe_flops"]
            ax.plot([m["moe_flops"], c_eq], [m["moe_loss"]] * 2, color=col, ls="--", lw=1)
            ax.scatter([c_eq], [m["moe_loss"]], color=col, marker="x", s=30, zorder=4)
        ax.scatter([], [], color=col, marker="D", label=_multiplier_text(m))
    ax.set_xscale("log")
    ax.set_ylabel(f"{analysis.get('metric', 'loss')}")
    ax.set_title(title or "loss vs training FLOPs: MoE placed on the dense curve")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    res = fit.residuals
    ax_r.axhline(0.0, color="0.5", lw=0.8)
    ax_r.scatter([r["flops"] for r in res], [r["residual"] for r in res], color="0.1", s=12)
    ax_r.set_ylabel("dense residual")
    ax_r.set_xlabel("training FLOPs")
    ax_r.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def scaling_section(rows: list[Row], out: Path) -> tuple[Row, list[str]]:
    """The report's part: fit the dense family, price each MoE (summary.json's ``scaling``), the plot and a
    multiplier table; a failed fit (e.g. losses that do not fall with compute) is said, not raised."""
    try:
        analysis = scaling_analysis(rows)
    except ValueError as e:
        return {"error": str(e)}, ["## Scaling", "", f"No dense fit: {e}", ""]
    plot_scaling(analysis, out / "scaling.png")
    fit = analysis["fit"]
    lines = ["## Scaling: dense-equivalent compute", "", f"Dense fit: {fit['method']} ({fit.get('note') or ''}).", ""]
    cells = []
    for m in analysis["multipliers"]:
        mult, ci = m["multiplier"], m["multiplier_ci95"]
        ci_text = "n/a" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
        row = [m["model"], "refused" if mult is None else f"{mult:.2f}x", ci_text, str(m["n_seeds"]), m["status"]]
        cells.append([*row, m["reason"] or ""])
    lines += md_table(["model", "multiplier", "95% CI", "seeds", "status", "note"], cells)
    res = ", ".join(f"{r['residual']:+.4f}" for r in fit["residuals"])
    return analysis, [*lines, "", f"Dense fit residuals (loss - fit): {res}.", "", "![scaling.png](scaling.png)", ""]
