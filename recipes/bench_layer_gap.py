"""Where a MoE layer's time goes beyond its FLOP-matched dense SwiGLU: the experts' matmuls, or the rest.

    python recipes/bench_layer_gap.py [--json PATH] [--threads 1] [--repeats 30] [--clock cpu|wall]
        [--dtype float32|bfloat16] [--point 16x2x86x64x4096 32x4x43x64x4096 64x16x128x512x1024]

Per point ``ExKxFxDxN`` (experts, top-k, d_expert, d_model, tokens), side by side in one run, rounds
interleaved (order reversed every other round), medians after warm-up rounds:

- ``layer``: forward+backward of ``MoELayer`` and of the dense ``SwiGLU`` with d_ff = top_k x d_expert.
  The MoE layer runs dispatch 'sorted' (the fused node, whose matmuls ``matmuls`` times; what 'auto' runs
  in float32 on CPU, while in bf16 'auto' may pick padded_bmm), load-balance and z-losses on, training
  mode, telemetry included;
- ``matmuls``: the same 9 matmul shapes alone (3 forward, 6 backward): the dense ones in ``nn.Linear``'s
  weight layout, the MoE's as the fused dispatch node issues them (per expert, every expert at the mean
  load ``N*K/E``, on contiguous row blocks, weight grads and input grads written in place);
- ``fixed``: the MoE layer's forward+backward on 8 tokens, where compute is ~0: what a layer costs no
  matter the batch (Python and dispatcher time per op, routing, losses, telemetry).

The gap (MoE - dense) splits into ``matmuls`` (their difference) and ``rest`` (everything else: the
fixed cost, top-k, the argsort, gathering and scatter-adding rows, SwiGLU elementwise split into E
pieces). docs/perf.md has the numbers this printed and what they explain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.core.files import atomic_write_json
from moekit.core.layers import SwiGLU
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

POINTS = ["16x2x86x64x4096", "32x4x43x64x4096", "64x16x128x512x1024"]  # demo, its fine variant, issue 14's E=64
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _point(text: str) -> tuple[int, int, int, int, int]:
    e, k, f, d, n = (int(v) for v in text.split("x"))
    if e < 1 or k < 1 or k > e or f < 1 or d < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"--point {text!r}: need ExKxFxDxN with 1 <= K <= E and positive sizes")
    return e, k, f, d, n


def _layer_step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        loss = out.y.float().sum() + out.aux_loss if hasattr(out, "y") else out.float().sum()
        loss.backward()

    return step


def _dense_matmuls(d: int, width: int, n: int, dtype: torch.dtype) -> Callable[[], None]:
    x, g, dy = torch.randn(n, d, dtype=dtype), torch.randn(n, width, dtype=dtype), torch.randn(n, d, dtype=dtype)
    w_gate, w_up = torch.randn(width, d, dtype=dtype), torch.randn(width, d, dtype=dtype)  # nn.Linear: [out, in]
    w_down = torch.randn(d, width, dtype=dtype)

    def run() -> None:
        x @ w_gate.T, x @ w_up.T, g @ w_down.T  # forward
        dy.T @ g, dy @ w_down, g.T @ x, g.T @ x  # backward: down's weight and input grads, gate/up weight grads
        torch.addmm(g @ w_gate, g, w_up)  # input grad through gate and up

    return run


def _moe_matmuls(e: int, k: int, f: int, d: int, n: int, dtype: torch.dtype) -> Callable[[], None]:
    rows = n * k
    counts = [rows // e + (i < rows % e) for i in range(e)]
    xs, hs, dys = (torch.randn(rows, w, dtype=dtype) for w in (d, f, d))
    w_gate, w_up, w_down = (
        torch.randn(e, d, f, dtype=dtype),
        torch.randn(e, d, f, dtype=dtype),
        torch.randn(e, f, d, dtype=dtype),
    )
    dw_gate, dw_up, dw_down = torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down)
    dxs, ys = torch.empty_like(xs), torch.empty_like(xs)

    def run() -> None:
        blocks = zip(
            *(t.split(counts) for t in (xs, hs, dys, dxs, ys)),
            *(w.unbind(0) for w in (w_gate, w_up, w_down, dw_gate, dw_up, dw_down)),
        )
        for x, h, dy, dx, y, wg, wu, wd, dwg, dwu, dwd in blocks:
            torch.mm(x, wg), torch.mm(x, wu), torch.mm(h, wd, out=y)
            torch.mm(h.T, dy, out=dwd), torch.mm(dy, wd.T)
            torch.mm(x.T, h, out=dwg), torch.mm(x.T, h, out=dwu)
            torch.mm(h, wg.T, out=dx).addmm_(h, wu.T)

    return run


def measure(point: tuple[int, int, int, int, int], dtype: torch.dtype, repeats: int, clock: str) -> dict:
    e, k, f, d, n = point
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=e, top_k=k, d_expert=f, load_balance_coef=0.01, z_loss_coef=0.001)
    moe, dense = MoELayer(d, cfg, dispatch="sorted").train().to(dtype), SwiGLU(d, k * f).to(dtype)
    x = torch.randn(1, n, d, dtype=dtype, requires_grad=True)
    tiny = torch.randn(1, 8, d, dtype=dtype, requires_grad=True)
    fns = {
        "moe_layer": _layer_step(moe, x),
        "dense_layer": _layer_step(dense, x),
        "moe_matmuls": _moe_matmuls(e, k, f, d, n, dtype),
        "dense_matmuls": _dense_matmuls(d, k * f, n, dtype),
        "moe_fixed": _layer_step(moe, tiny),
    }
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(), fn()  # warm-up
    for r in range(repeats):
        for name, fn in fns.items() if r % 2 == 0 else reversed(fns.items()):
            t0 = now()
            fn()
            times[name].append((now() - t0) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    gap = ms["moe_layer"] - ms["dense_layer"]
    mm_gap = ms["moe_matmuls"] - ms["dense_matmuls"]
    return dict(
        point=f"{e}x{k}x{f}x{d}x{n}",
        dtype=str(dtype).removeprefix("torch."),
        **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
        spread={name: round((max(v) - min(v)) / 2 / statistics.median(v), 3) for name, v in times.items()},
        layer_ratio=round(ms["moe_layer"] / ms["dense_layer"], 3),
        gap_ms=round(gap, 3),
        gap_from_matmuls=round(mm_gap / gap, 3) if gap > 0 else None,
    )


def _fmt(r: dict) -> str:
    share = "-" if r["gap_from_matmuls"] is None else f"{r['gap_from_matmuls']:.0%}"
    return (
        f"| {r['point']} | {r['dtype']} "
        f"| {r['moe_layer_ms']:.2f} / {r['dense_layer_ms']:.2f} ({r['layer_ratio']:.2f}x) "
        f"| {r['moe_matmuls_ms']:.2f} / {r['dense_matmuls_ms']:.2f} | {r['moe_fixed_ms']:.2f} | {r['gap_ms']:.2f} "
        f"| {share} |"
    )


HEADER = (
    "| ExKxFxDxN | dtype | layer MoE / dense ms | matmuls alone MoE / dense ms | fixed (8 tokens) ms | gap ms "
    "| gap from matmuls |"
)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds after two warm-up calls each")
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu", help="process CPU time (1 thread) or wall")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--point", nargs="+", type=_point, default=[_point(t) for t in POINTS], metavar="ExKxFxDxN")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(HEADER, "|" + "---|" * (HEADER.count("|") - 1), sep="\n")
    rows = []
    for point in args.point:
        rows.append(measure(point, getattr(torch, args.dtype), args.repeats, args.clock))
        print(_fmt(rows[-1]), flush=True)
    if args.json:
        atomic_write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
