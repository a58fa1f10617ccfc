"""Benchmark one MoE layer against the FLOP-matched dense SwiGLU (and transformers' Mixtral block).

    python recipes/bench_moe_layer.py [--json PATH] [--quick] [--repeats 5] [--threads 2]

Side by side in one run, on whatever device is available: forward and forward+backward time and peak
memory of moekit's MoE layer (fast path and naive reference), the dense SwiGLU with
d_ff = top_k * d_expert (the same matmul FLOPs as the routed experts), and transformers'
``MixtralSparseMoeBlock`` holding the same weights when transformers is installed. Each timing is the
median of ``--repeats`` runs after a warm-up, with implementations interleaved so drift hits all alike.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over forward+backward. CPU has no allocator
statistics, so there it is the activation memory saved for backward (unique storages seen by
``saved_tensors_hooks``) plus the output: the part that differs between implementations.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moekit.core.files import atomic_write_json
from moekit.core.layers import SwiGLU
from moekit.core.meter import SavedTensorBytes
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

GRID = [(8, 2, 1024), (64, 16, 128)]  # (num_experts, top_k, d_expert)
TOKENS = [1024, 4096, 16384]
D_MODEL = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(module: torch.nn.Module, x: torch.Tensor, backward: bool) -> torch.Tensor:
    out = module(x)
    y = out.y if hasattr(out, "y") else out
    if backward:
        y.float().pow(2).mean().backward()
    return y


def measure(module, x, device, repeats: int) -> dict[str, float]:
    fwd, fwdbwd = [], []
    for r in range(repeats + 1):  # first run is warm-up
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            _run(module, x, backward=False)
            _sync(device)
            t1 = time.perf_counter()
        xg = x.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        _run(module, xg, backward=True)
        _sync(device)
        t3 = time.perf_counter()
        if r:
            fwd.append((t1 - t0) * 1e3)
            fwdbwd.append((t3 - t2) * 1e3)
    xg = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(module, xg, backward=True)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with SavedTensorBytes() as saved:
            y = _run(module, xg, backward=False)
        peak = saved.mib + y.numel() * y.element_size() / 2**20
    return {"fwd_ms": statistics.median(fwd), "fwdbwd_ms": statistics.median(fwdbwd), "peak_mib": peak}


def mixtral_block(layer: MoELayer, dtype: torch.dtype):
    """transformers' MixtralSparseMoeBlock with ``layer``'s weights, or None if transformers is missing."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = layer.cfg
    hf_cfg = MixtralConfig(
        hidden_size=layer.d_model,
        intermediate_size=cfg.d_expert,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        ex = layer.experts  # [E, in, out] -> HF [E, out, in]
        block.experts.gate_up_proj.copy_(torch.cat([ex.w_gate, ex.w_up], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(ex.w_down.transpose(1, 2))
    return block.to(device=layer.router.weight.device, dtype=dtype)


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tokens = [1024, 4096] if args.quick else TOKENS
    rows = []
    for dtype_name in args.dtypes:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        for num_experts, top_k, d_expert in GRID:
            torch.manual_seed(0)
            impls: dict[str, torch.nn.Module] = {}
            for impl in ("sorted", "reference") + (("grouped_mm",) if args.grouped else ()):
                cfg = MoEConfig(num_experts=num_experts, top_k=top_k, d_expert=d_expert)
                layer = MoELayer(D_MODEL, cfg, dispatch=impl).to(device)
                if impls:  # identical weights for every implementation
                    layer.load_state_dict(next(iter(impls.values())).state_dict())
                impls[f"moekit-{impl}"] = layer.to(dtype)
            impls["dense"] = SwiGLU(D_MODEL, top_k * d_expert).to(device=device, dtype=dtype)
            hf = mixtral_block(impls["moekit-sorted"], dtype) if args.mixtral else None
            if hf is not None:
                impls["transformers-mixtral"] = hf
            for n in tokens:
                x = torch.randn(1, n, D_MODEL, device=device, dtype=dtype)
                # The reference loops in Python; past --reference-max-tokens it only costs minutes.
                run = {k: m for k, m in impls.items() if k != "moekit-reference" or n <= args.reference_max_tokens}
                res = {name: measure(m, x, device, args.repeats) for name, m in run.items()}
                for name, r in res.items():
                    row = dict(
                        impl=name,
                        dtype=dtype_name,
                        num_experts=num_experts,
                        top_k=top_k,
                        d_expert=d_expert,
                        tokens=n,
                        **{k: round(v, 3) for k, v in r.items()},
                        ratio_fwdbwd_vs_dense=round(r["fwdbwd_ms"] / res["dense"]["fwdbwd_ms"], 3),
                    )
                    rows.append(row)
                    print(_fmt(row), flush=True)
    return rows


HEADER = "| impl | dtype | E | k | d_expert | tokens | fwd ms | fwd+bwd ms | peak MiB | fwd+bwd / dense |"


def _fmt(r: dict) -> str:
    return (
        f"| {r['impl']} | {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['d_expert']} | {r['tokens']} "
        f"| {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} | {r['peak_mib']:.1f} | {r['ratio_fwdbwd_vs_dense']:.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="tokens 1024 and 4096 only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--no-mixtral", dest="mixtral", action="store_false", help="skip transformers' Mixtral block")
    p.add_argument("--grouped", action="store_true", help="also time the torch._grouped_mm path")
    p.add_argument("--reference-max-tokens", type=int, default=1024, help="skip the naive reference above this")
    args = p.parse_args()
    print(HEADER, "|" + "---|" * (HEADER.count("|") - 1), sep="\n")
    rows = bench(args)
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
