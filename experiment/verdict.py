"""Paired-seed verdicts: does each MoE model beat its dense twin, with a 95% confidence interval?

Runs with the same seed share the data order and the initial-weight seed, so the per-seed difference
``moe - dense`` removes most of the seed-to-seed noise that two independent means would carry. For every
MoE model and metric this module pairs the summary rows by seed, takes the mean paired difference and a
Student t-interval over the paired seeds, and turns it into a word:

- lower-is-better metrics (losses): ``moe_better`` when the whole interval is below 0, ``dense_better``
  when it is above 0, else ``unresolved``;
- higher-is-better metrics (accuracies, ``*_acc``): the reverse;
- one paired seed has no spread: ``unresolved`` with the reason ``"1 seed"``;
- paired differences that are all equal (sd 0) have no spread either: their zero-width interval would claim
  a certainty that the seeds did not show (e.g. every seed trained the same runs), so ``unresolved`` with
  ``diff_ci95`` None and the reason ``"no spread between seeds: the interval is undefined"``.

A diverged run (``status: 'diverged'``) or a non-finite metric excludes that seed's pair, and the
verdict's ``reason`` names it. Everything returned is plain JSON (no NaN: missing numbers are ``None``).

Pure Python (``math`` only): the t quantile is computed here by inverting the t CDF, written with the
regularized incomplete beta function, so scipy is not a runtime dependency.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from moekit.core.checks import is_finite_number

# ---- Student t distribution ------------------------------------------------------------------------


def _nonzero(v: float) -> float:
    return v if abs(v) > 1e-300 else 1e-300  # Lentz's guard against a zero denominator


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 / _nonzero(1.0 - qab * x / qap)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d, c = 1.0 / _nonzero(1.0 + aa * d), _nonzero(1.0 + aa / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"student_t_cdf df={df!r} is invalid: must be > 0")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    # P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. ``p=0.975, df=2`` -> 4.3027).

    df 1 and 2 have closed forms; otherwise the CDF is inverted by bracketing and bisection to full
    double precision (about 60 CDF evaluations, each a short continued fraction).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile p={p!r} is invalid: must be in (0, 1)")
    if not df > 0:
        raise ValueError(f"student_t_quantile df={df!r} is invalid: must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """``(mean, lo, hi)``: the two-sided ``level`` Student t-interval of the mean of ``values``.

    ``None`` for fewer than 2 values (no spread to estimate). Equal values give ``lo == hi == mean``.
    """
    n = len(values)
    if not 0.0 < level < 1.0:
        raise ValueError(f"t_interval level={level!r} is invalid: must be in (0, 1)")
    if n < 2:
        return None
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = student_t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# ---- verdicts ---------------------------------------------------------------------------------------

NO_SPREAD = "no spread between seeds: the interval is undefined"


def verdict_metrics(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metrics a comparison's verdicts cover: ``final_val_loss`` and every per-task accuracy (``*_acc``)
    that some row carries, in that order (the multimodal comparison's rows have one accuracy per task)."""
    keys = {k for r in rows for k in r}
    return ["final_val_loss"] * ("final_val_loss" in keys) + sorted(k for k in keys if k.endswith("_acc"))


def higher_is_better(metric: str) -> bool:
    """Accuracies (``*_acc``, ``*accuracy``) are higher-is-better; losses and everything else lower."""
    return metric.endswith(("_acc", "accuracy"))


def seed_order(seed: Any) -> tuple[int, Any]:
    """Sort key for seeds: numbers numerically (2 before 10), then anything else by its repr."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, seed)
    return (1, repr(seed))


def _by_seed(rows: Iterable[Mapping[str, Any]], name: str) -> dict[Any, Mapping[str, Any]]:
    out: dict[Any, Mapping[str, Any]] = {}
    for r in rows:
        if "name" not in r or "seed" not in r:
            raise ValueError(f"summary row {dict(r)!r} needs 'name' and 'seed' to be paired")
        if r["name"] != name:
            continue
        if r["seed"] in out:
            raise ValueError(f"summary rows hold two runs of {name!r} with seed {r['seed']!r}; expected one per seed")
        out[r["seed"]] = r
    return out


def exclusion_reason(row: Mapping[str, Any], metric: str) -> str | None:
    """Why ``row`` cannot enter a pair for ``metric`` (diverged, no value, a non-finite value), or None: the
    one rule for which runs a comparison's numbers cover (the verdicts here, the report's headline)."""
    if row.get("status") == "diverged":
        step = (row.get("divergence") or {}).get("step")
        return "diverged" if step is None else f"diverged at step {step}"
    if metric not in row or row[metric] is None:
        return f"has no {metric}"
    if not is_finite_number(row[metric]):
        return f"{metric}={row[metric]!r} is not finite"
    return None


def _decide(lo: float, hi: float, higher: bool) -> str:
    if hi < 0:
        return "dense_better" if higher else "moe_better"
    if lo > 0:
        return "moe_better" if higher else "dense_better"
    return "unresolved"


def paired_verdicts(
    rows: Iterable[Mapping[str, Any]],
    metrics: Sequence[str] = ("final_val_loss",),
    *,
    dense_name: str = "dense",
) -> list[dict[str, Any]]:
    """One verdict per (MoE model, metric), MoE models in the order they first appear in ``rows``.

    ``rows`` are summary rows with ``name``, ``kind`` ('dense' | 'moe'; a row without ``kind`` counts as MoE
    unless it is the dense twin), ``seed``, the metric values and optionally ``status``. A metric that no
    row of a model carries is skipped for that model (an LM row has no ``caption_acc``). Each verdict::

        {"model", "metric", "diff_mean", "diff_ci95": [lo, hi] | None, "n_seeds", "verdict",
         "higher_is_better", "reason", "seeds", "excluded": [{"seed", "reason"}]}

    ``diff_mean`` is ``mean(moe - dense)`` over the paired seeds (``None`` with no pair), ``n_seeds`` the
    number of pairs that entered it, ``reason`` a short why for ``unresolved`` and for exclusions ('' if none).
    """
    rows = list(rows)
    dense = _by_seed(rows, dense_name)
    if not dense:
        raise ValueError(f"no dense twin rows (name={dense_name!r}) among the summary rows")
    kinds = ((r["name"], r.get("kind", "dense" if r["name"] == dense_name else "moe")) for r in rows)
    models = list(dict.fromkeys(name for name, kind in kinds if kind == "moe"))
    verdicts = []
    for model in models:
        runs = _by_seed(rows, model)
        for metric in metrics:
            if not any(metric in r or r.get("status") == "diverged" for r in runs.values()):
                continue  # no run of this model has the metric (a diverged run has none: its verdict says so)
            verdicts.append(_one_verdict(model, metric, runs, dense))
    return verdicts


def _one_verdict(
    model: str,
    metric: str,
    runs: Mapping[Any, Mapping[str, Any]],
    dense: Mapping[Any, Mapping[str, Any]],
) -> dict[str, Any]:
    higher = higher_is_better(metric)
    diffs: list[float] = []
    seeds: list[Any] = []
    excluded: list[dict[str, Any]] = []
    for seed in sorted(runs, key=seed_order):
        if seed not in dense:
            excluded.append({"seed": seed, "reason": "no dense twin run with this seed"})
            continue
        why = [
            f"{who} {b}"
            for who, row in ((model, runs[seed]), ("dense", dense[seed]))
            if (b := exclusion_reason(row, metric))
        ]
        if why:
            excluded.append({"seed": seed, "reason": "; ".join(why)})
            continue
        diffs.append(float(runs[seed][metric]) - float(dense[seed][metric]))
        seeds.append(seed)
    n = len(diffs)
    excl = "; ".join(f"seed {e['seed']} excluded ({e['reason']})" for e in excluded)
    ci = t_interval(diffs, 0.95)
    if ci is None:
        verdict, why = "unresolved", "no paired seed" if n == 0 else "1 seed"
    elif max(diffs) == min(diffs):  # sd 0: a zero-width interval, not a certain result
        ci, verdict, why = None, "unresolved", NO_SPREAD
    else:
        verdict = _decide(ci[1], ci[2], higher)
        why = "the 95% CI includes 0" if verdict == "unresolved" else ""
    reason = "; ".join(x for x in (why, excl) if x)
    return {
        "model": model,
        "metric": metric,
        "diff_mean": math.fsum(diffs) / n if n else None,
        "diff_ci95": [ci[1], ci[2]] if ci is not None else None,
        "n_seeds": n,
        "verdict": verdict,
        "higher_is_better": higher,
        "reason": reason,
        "seeds": seeds,
        "excluded": excluded,
    }


def comparison_verdicts(rows: Sequence[Mapping[str, Any]], extra_metrics: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A comparison's verdicts: :func:`paired_verdicts` on :func:`verdict_metrics` plus the task's own
    ``extra_metrics`` (e.g. per-task val losses); none without a dense twin."""
    if not any(r["name"] == "dense" for r in rows):
        return []
    metrics = verdict_metrics(rows)
    return paired_verdicts(rows, metrics + [m for m in extra_metrics if m not in metrics])


# ---- text ---------------------------------------------------------------------------------------


def _label(metric: str) -> tuple[str, str]:
    """Display name and unit of a metric; only the comparison's val loss has a known unit."""
    if metric == "final_val_loss":
        return "val loss", "nats/byte"
    if metric.endswith("_acc"):
        return f"{metric[: -len('_acc')]} accuracy", ""
    return metric.replace("_", " "), ""


def _decimals(values: Sequence[float]) -> int:
    """Enough decimals to show two significant digits of the largest magnitude (at least 3, at most 6)."""
    big = max((abs(v) for v in values), default=0.0)
    if big == 0:
        return 3
    return int(min(6, max(3, 1 - math.floor(math.log10(big)))))


def verdict_sentence(v: Mapping[str, Any], *, label: str | None = None, unit: str | None = None) -> str:
    """One sentence for a verdict from :func:`paired_verdicts`, e.g. ``"moe-8x2 beats the dense twin: val
    loss -0.018 nats/byte (95% CI -0.025 to -0.011, 3 paired seeds)."``. ``label``/``unit`` override the
    metric's display name and unit (the LM's val loss is in nats/byte, other tasks' may not be)."""
    default_label, default_unit = _label(v["metric"])
    label = default_label if label is None else label
    unit = default_unit if unit is None else unit
    model, n, mean, ci = v["model"], v["n_seeds"], v["diff_mean"], v["diff_ci95"]
    u = f" {unit}" if unit else ""
    excl = "".join(f"; seed {e['seed']} excluded ({e['reason']})" for e in v.get("excluded", ()))
    if mean is None:
        return f"{model} vs the dense twin on {label}: unresolved, {v['reason']}."
    if ci is None and n > 1:  # equal differences on every seed: no interval (see NO_SPREAD)
        d = _decimals([mean])
        return (
            f"{model} vs the dense twin is unresolved (no spread between seeds): {label} {mean:+.{d}f}{u} on each "
            f"of {n} paired seeds, so the interval is undefined{excl}."
        )
    if ci is None:
        d = _decimals([mean])
        return (
            f"{model} vs the dense twin is unresolved (1 seed): {label} {mean:+.{d}f}{u} on a single paired seed; "
            f"one seed cannot separate that from seed-to-seed noise{excl}."
        )
    d = _decimals([mean, *ci])
    head = {
        "moe_better": f"{model} beats the dense twin",
        "dense_better": f"the dense twin beats {model}",
        "unresolved": f"{model} vs the dense twin is unresolved",
    }[v["verdict"]]
    stats = f"{label} {mean:+.{d}f}{u} (95% CI {ci[0]:+.{d}f} to {ci[1]:+.{d}f}, {n} paired seeds)"
    return f"{head}: {stats}{excl}."


def verdict_cells(v: Mapping[str, Any]) -> list[str]:
    """A verdict as report-table cells: model, metric, moe - dense, 95% CI, paired seeds, verdict."""
    seeds = "1 seed" if v["n_seeds"] == 1 else f"{v['n_seeds']} seeds"
    ci = f"n/a ({seeds})" if v["diff_ci95"] is None else "[{:+.4f}, {:+.4f}]".format(*v["diff_ci95"])
    mean = "n/a" if v["diff_mean"] is None else f"{v['diff_mean']:+.4f}"
    return [v["model"], v["metric"], mean, ci, str(v["n_seeds"]), v["verdict"]]


def verdicts_sentence(
    verdicts: Sequence[Mapping[str, Any]],
    metric: str = "final_val_loss",
    *,
    label: str | None = None,
    unit: str | None = None,
) -> str:
    """The report's first sentence and the CLI's last line: every MoE model's verdict on ``metric``,
    joined into one sentence (``"a beats ...; the dense twin beats b: ..."``); ``label``/``unit`` as in
    :func:`verdict_sentence`. Empty string when no verdict has that metric."""
    parts = [verdict_sentence(v, label=label, unit=unit).rstrip(".") for v in verdicts if v["metric"] == metric]
    return "; ".join(parts) + "." if parts else ""
