"""The per-row ops a MoE layer runs and a dense one does not, each against the alternatives tried for it.

    python recipes/bench_routing_ops.py [--json PATH] [--threads 1] [--repeats 5] [--calls 200]
        [--point 16x2x4096x64 32x4x4096x64 64x16x1024x512]

Per point ``ExKxNxD`` (experts, top-k, tokens, d_model), side by side in one run: for each op the variant
the layer uses (``current``) and the alternatives docs/perf.md lists, on the same inputs (random router
probabilities, a random expert per assignment, random rows). Each alternative is first checked to give the
current variant's result (``agrees``: same indices, same order, same sums within 1e-5); a timing is the
median over ``--repeats`` rounds of ``--calls`` calls, rounds interleaved across variants (order reversed
every other round), process CPU time at one thread. ``spread`` is (max - min) / 2 over the rounds,
relative to the median.

Ops (shapes: ``A = N * K`` assignments):

- ``topk``: the K best of ``[N, E]`` probabilities. ``current`` ``torch.topk``; ``max_rounds_transposed``
  K rounds of ``max`` over a transposed ``[E, N]`` copy (transpose counted; ties: lowest index);
  ``sort_stable`` a stable descending sort of each row, first K kept.
- ``argsort``: the stable order of the ``A`` assignments by expert. ``current`` ``argsort(stable=True)``;
  ``unstable_combined`` an unstable argsort of ``expert * A + position`` (the same order);
  ``stable_int32`` int32 keys.
- ``gather``: the ``A`` rows of ``[N, D]``. ``current`` ``index_select``; ``advanced_index`` ``x[idx]``.
- ``combine``: the ``A`` expert outputs summed back per token. ``current`` ``index_add_`` into zeros;
  ``inverse_permutation_sum`` rows put back in token order by the inverse permutation, then summed over K.
- ``entropy``: ``-sum p log p`` per token. ``current`` the clamped ``p * log(p)`` (``moekit.moe.losses``);
  ``special_entr`` ``torch.special.entr``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.core.files import atomic_write_json
from moekit.moe.losses import entropy

POINTS = ["16x2x4096x64", "32x4x4096x64", "64x16x1024x512"]  # the demo, its fine variant, issue 14's E=64


def _point(text: str) -> tuple[int, int, int, int]:
    try:
        e, k, n, d = (int(v) for v in text.split("x"))
    except ValueError:
        e = k = n = d = 0
    if not (1 <= k <= e and n > 0 and d > 0):
        raise argparse.ArgumentTypeError(f"--point {text!r}: need ExKxNxD with 1 <= K <= E and positive sizes")
    return e, k, n, d


def _topk_by_max_rounds(p_ne: torch.Tensor, k: int) -> torch.Tensor:
    work_en = p_ne.T.contiguous()  # [E, N]: each max runs across tokens, vectorised
    idx = []
    for j in range(k):
        i_n = work_en.max(0).indices
        idx.append(i_n)
        if j + 1 < k:
            work_en.scatter_(0, i_n[None], float("-inf"))
    return torch.stack(idx, 1)  # [N, K]


def variants(e: int, k: int, n: int, d: int, seed: int = 0) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """``{op: {variant: fn}}`` on fixed random inputs of one point; ``current`` first in each op."""
    gen = torch.Generator().manual_seed(seed)
    a = n * k
    probs_ne = torch.randn(n, e, generator=gen).softmax(-1)
    expert_a = torch.randint(0, e, (a,), generator=gen)
    expert32_a, pos_a = expert_a.int(), torch.arange(a)
    token_a = torch.arange(n).repeat_interleave(k)[torch.argsort(expert_a, stable=True)]  # grouped by expert
    inverse_a = torch.argsort(token_a, stable=True)  # token-major slot -> its row in the grouped order
    x_nd, ys_ad = torch.randn(n, d, generator=gen), torch.randn(a, d, generator=gen)
    return {
        "topk": {
            "current": lambda: probs_ne.topk(k, dim=-1).indices,
            "max_rounds_transposed": lambda: _topk_by_max_rounds(probs_ne, k),
            "sort_stable": lambda: probs_ne.sort(dim=-1, descending=True, stable=True).indices[:, :k],
        },
        "argsort": {
            "current": lambda: torch.argsort(expert_a, stable=True),
            "unstable_combined": lambda: torch.argsort(expert_a * a + pos_a),
            "stable_int32": lambda: torch.argsort(expert32_a, stable=True),
        },
        "gather": {
            "current": lambda: x_nd.index_select(0, token_a),
            "advanced_index": lambda: x_nd[token_a],
        },
        "combine": {
            "current": lambda: x_nd.new_zeros(n, d).index_add_(0, token_a, ys_ad),
            "inverse_permutation_sum": lambda: ys_ad.index_select(0, inverse_a).view(n, k, d).sum(1),
        },
        "entropy": {
            "current": lambda: entropy(probs_ne),
            "special_entr": lambda: torch.special.entr(probs_ne).sum(-1),
        },
    }


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    return torch.equal(a, b)


def measure(point: tuple[int, int, int, int], repeats: int, calls: int) -> list[dict]:
    e, k, n, d = point
    rows = []
    for op, fns in variants(e, k, n, d).items():
        want = fns["current"]()
        agrees = {name: _agrees(want, fn()) for name, fn in fns.items()}
        times: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        for r in range(repeats + 1):  # round 0 warms up
            for name in order if r % 2 else order[::-1]:
                fn = fns[name]
                t0 = time.process_time()
                for _ in range(calls):
                    fn()
                if r:
                    times[name].append((time.process_time() - t0) / calls * 1e6)
        base = statistics.median(times["current"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append(
                dict(point="x".join(map(str, point)), op=op, variant=name, us=med,
                     spread=(max(ts) - min(ts)) / 2 / med, vs_current=med / base, agrees=agrees[name])
            )  # fmt: skip
    return rows


def _fmt(r: dict) -> str:
    return (
        f"| {r['point']} | {r['op']} | {r['variant']} | {r['us']:,.0f} | ±{r['spread']:.0%} | "
        f"{r['vs_current']:.2f}x | {'yes' if r['agrees'] else 'NO'} |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the clock is process CPU time)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--point", nargs="+", type=_point, default=[_point(t) for t in POINTS], metavar="ExKxNxD")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for point in args.point for row in measure(point, args.repeats, args.calls)]
    print("| point ExKxNxD | op | variant | us per call | spread | vs current | agrees |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
