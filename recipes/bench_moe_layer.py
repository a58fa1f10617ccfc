"""Benchmark one MoE layer against the FLOP-matched dense SwiGLU and transformers' MoE blocks.

    python recipes/bench_moe_layer.py [--json PATH] [--quick] [--repeats 5] [--threads 2] [--grouped]
        [--impls auto reference sorted sorted_autograd padded_bmm grouped_mm] [--clock wall|cpu]
        [--peers mixtral qwen3_moe olmoe torchtitan] [--experts-impls eager batched_mm grouped_mm]
        [--peer-max-gib 2] [--d-model 512] [--grid 8x2x1024 64x16x128] [--tokens 1024 4096]

Side by side in one run, on whatever device is available: forward and forward+backward time and peak
memory of moekit's MoE layer (fast path and naive reference), the dense SwiGLU with
d_ff = top_k * d_expert (the same matmul FLOPs as the routed experts), and, when transformers is installed
(a test-only dependency), its sparse MoE blocks of Mixtral, Qwen3-MoE and OLMoE holding the same weights,
once per ``experts_implementation`` it registers (its Python loop ``eager``, ``batched_mm``,
``grouped_mm``, and kernels such as ``deepgemm`` / ``sonicmoe`` where the machine has them), and, when
torchtitan is installed (``requirements-peers.txt``), its ``MoE`` module (token-choice top-k router, local
token dispatcher, ``GroupedExperts``). A peer is timed only after its float32 output and gradients (input,
router, experts) agree with moekit's layer to 1e-5 relative (torchtitan: 3e-2, since its experts always
compute in bfloat16, so it has bfloat16 rows only); one that fails or cannot run is listed under
``skipped`` with the reason, never timed, and so is
``batched_mm`` where its per-assignment weight copies would pass ``--peer-max-gib`` (at d_model 512 it
needs ~24 GiB already at 1,024 tokens: it is a decoding path, not a training one). Every row
names the version it ran (``transformers 5.x`` / ``torchtitan 0.x`` for peers, ``torch 2.x`` for moekit and
dense). Each timing is
the median of ``--repeats`` rounds after a warm-up round, implementations interleaved round by round (order
reversed every other round) so drift hits all alike; the table's ``±`` is (max - min) / 2 relative to the
median, the JSON's ``fwdbwd_spread`` the full (max - min) / median.
moekit rows are ``moekit-<--impls value>``; ``dispatch`` names the path ``auto`` resolved to.
The JSON is ``{"rows": [...], "skipped": [...]}``.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over forward+backward. CPU has no allocator
statistics, so there it is the activation memory saved for backward (unique storages seen by
``saved_tensors_hooks``, weights included) plus the output: the part that differs between implementations.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moekit.core.config import ModelConfig
from moekit.core.files import atomic_write_json
from moekit.core.hf_families import FAMILIES, StackedExperts
from moekit.core.hf_moe_config import moe_to_hf
from moekit.core.layers import SwiGLU
from moekit.core.meter import SavedTensorBytes
from moekit.moe.config import DISPATCH_IMPLS, MoEConfig
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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: robust on a shared machine, 1 thread


def _timed(module: torch.nn.Module, x: torch.Tensor, device: torch.device, backward: bool, clock: str) -> float:
    now = CLOCKS[clock]
    xg = x.detach().requires_grad_(backward)
    module.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward):
        _sync(device)
        t0 = now()
        _run(module, xg, backward=backward)
        _sync(device)
    return (now() - t0) * 1e3


def _peak_mib(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    xg = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(module, xg, backward=True)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with SavedTensorBytes() as saved:
        y = _run(module, xg, backward=False)
    return saved.mib + y.numel() * y.element_size() / 2**20


def measure_all(
    modules: dict[str, torch.nn.Module], x, device, repeats: int, clock: str = "wall"
) -> dict[str, dict[str, float]]:
    """Per module: median forward and forward+backward ms over ``repeats`` rounds after a warm-up round,
    the modules interleaved (order reversed every other round) so machine drift hits all alike; the
    forward+backward spread (max - min) / median; peak memory."""
    names = list(modules)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    fwdbwd: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for name in names if r % 2 == 0 else reversed(names):
            f = _timed(modules[name], x, device, False, clock)
            fb = _timed(modules[name], x, device, True, clock)
            if r:
                fwd[name].append(f)
                fwdbwd[name].append(fb)
    out = {}
    for n in names:
        med = statistics.median(fwdbwd[n])
        out[n] = {
            "fwd_ms": statistics.median(fwd[n]),
            "fwdbwd_ms": med,
            "fwdbwd_spread": (max(fwdbwd[n]) - min(fwdbwd[n])) / med,
            "peak_mib": _peak_mib(modules[n], x, device),
        }
    return out


PEERS = {  # transformers family -> (config class, sparse MoE block class)
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock"),
    "olmoe": ("OlmoeConfig", "OlmoeSparseMoeBlock"),
}
PEER_RTOL = 1e-5  # a peer is timed only if its float32 output and gradients agree to this (relative to max |.|)
TITAN = "torchtitan"
TITAN_RTOL = 3e-2  # torchtitan's experts always compute in bfloat16: agreement at bfloat16 accuracy


def experts_implementations() -> list[str]:
    """Every ``experts_implementation`` the installed transformers registers, its Python loop ("eager") first."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def peer_block(family: str, layer: MoELayer, experts_impl: str) -> torch.nn.Module:
    """transformers' sparse MoE block of ``family`` with ``layer``'s weights (float32, on the layer's device).

    The HF MoE fields come from the converter's own mapping (``moe_to_hf``: top-k renormalisation included,
    so OLMoE and Qwen3-MoE get ``norm_topk_prob`` as moekit's layer does) and the weights from its
    ``StackedExperts`` rule (moekit ``[E, in, out]`` -> transformers 5's fused ``[E, out, in]``).
    """
    import transformers

    fam = FAMILIES[family]
    config_cls, block_cls = PEERS[family]
    model = ModelConfig(d_model=layer.d_model, n_layers=1, n_heads=1, moe=layer.cfg)
    fields = {k: v for k, v in moe_to_hf(model, fam).items() if k != "router_aux_loss_coef"}
    hf_cfg = getattr(transformers, config_cls)(
        hidden_size=layer.d_model, hidden_act="silu", experts_implementation=experts_impl, **fields
    )
    if hasattr(hf_cfg, "router_jitter_noise"):
        hf_cfg.router_jitter_noise = 0.0
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    block = getattr(modeling, block_cls)(hf_cfg)
    ex = layer.experts
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(StackedExperts("", ()).to_hf([ex.w_gate, ex.w_up], model)[0])
        block.experts.down_proj.copy_(StackedExperts("", ()).to_hf([ex.w_down], model)[0])
    return block.to(layer.router.weight.device)


def titan_block(layer: MoELayer) -> torch.nn.Module:
    """torchtitan's ``MoE`` with ``layer``'s weights: its softmax top-k router (``route_norm`` = moekit's
    renormalisation), local token dispatcher and ``GroupedExperts`` (``w1``/``w3`` ``[E, F, D]``, ``w2``
    ``[E, D, F]``: the transposes of moekit's ``[E, in, out]``), no load-balance bias.

    torchtitan 0.3's ``GroupedExperts`` casts rows and weights to bfloat16 and runs ``torch._grouped_mm``
    whatever the input dtype, so it matches moekit at bfloat16 accuracy and is timed in bfloat16 only.
    """
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = layer.cfg
    plain = dict(
        router="topk",
        score_func="softmax",
        topk_order="softmax_then_topk",
        routed_scaling_factor=1.0,
        router_jitter=0.0,
        capacity_factor=None,
        n_group=1,
        modality_experts=None,
        selection_bias=False,
        bias_update_rate=0.0,
        num_shared_experts=0,
    )
    if any(getattr(cfg, k) != v for k, v in plain.items()):
        raise ValueError(f"the torchtitan peer is built for a plain dropless softmax top-k layer ({plain})")
    e, d, k = cfg.num_experts, layer.d_model, cfg.top_k
    block = MoE.Config(
        num_experts=e,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=d, hidden_dim=cfg.d_expert, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=e,
            gate=Linear.Config(in_features=d, out_features=e),
            top_k=k,
            score_func="softmax",
            route_norm=cfg.renormalize and k > 1,
        ),
        load_balance_coeff=None,
    ).build()
    ex, titan = layer.experts, block.routed_experts.inner_experts
    with torch.no_grad():
        block.router.gate.weight.copy_(layer.router.weight)
        titan.w1_EFD.copy_(ex.w_gate.transpose(1, 2))
        titan.w3_EFD.copy_(ex.w_up.transpose(1, 2))
        titan.w2_EDF.copy_(ex.w_down.transpose(1, 2))
    return block.to(layer.router.weight.device)


def _weight_grads(layer: MoELayer, block: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, moekit's grad, the peer's grad in the same layout) for the router and expert weights."""
    ex = layer.experts
    if hasattr(block, "routed_experts"):  # torchtitan
        titan = block.routed_experts.inner_experts
        return [
            ("router grad", layer.router.weight.grad, block.router.gate.weight.grad),
            ("gate grad", ex.w_gate.grad, titan.w1_EFD.grad.transpose(1, 2)),
            ("up grad", ex.w_up.grad, titan.w3_EFD.grad.transpose(1, 2)),
            ("down grad", ex.w_down.grad, titan.w2_EDF.grad.transpose(1, 2)),
        ]
    hf = StackedExperts("", ())
    return [
        ("router grad", layer.router.weight.grad, block.gate.weight.grad),
        ("gate_up grad", hf.to_hf([ex.w_gate.grad, ex.w_up.grad], None)[0], block.experts.gate_up_proj.grad),
        ("down grad", hf.to_hf([ex.w_down.grad], None)[0], block.experts.down_proj.grad),
    ]


def peer_mismatch(layer: MoELayer, block: torch.nn.Module, tokens: int = 128, rtol: float = PEER_RTOL) -> str | None:
    """Why ``block`` does not compute ``layer`` in float32 (output, input and weight gradients), or None."""
    gen = torch.Generator().manual_seed(1)  # leaves the global RNG, and so the timed inputs, alone
    x = torch.randn(1, tokens, layer.d_model, generator=gen).to(layer.router.weight.device)
    got = {}
    for name, module in (("moekit", layer), ("peer", block)):
        module.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y = _run(module, xg, backward=True)
        got[name] = [y.detach(), xg.grad]
    checks = [("output", *(g[0] for g in got.values())), ("input grad", *(g[1] for g in got.values()))]
    checks += _weight_grads(layer, block)
    layer.zero_grad(set_to_none=True)
    for what, a, b in checks:
        err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        if not err <= rtol:
            return f"{what} differs from moekit's by {err:.1e} relative (> {rtol:.0e})"
    return None


def _checked_peer(layer: MoELayer, build: Callable[[], torch.nn.Module], rtol: float) -> tuple[Any, str | None]:
    """``build()``'s block and why it may not be timed (None: it computes ``layer``)."""
    try:
        block = build()
        return block, peer_mismatch(layer, block, rtol=rtol)
    except Exception as e:  # an API this version lacks, a kernel or device this machine lacks
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def peers(
    layer: MoELayer, families: list[str], experts_impls: list[str] | None, dtype: torch.dtype = torch.float32
) -> tuple[dict, list[dict]]:
    """{row name: block} of the peers that compute ``layer`` (checked in float32), and the skipped ones with
    the reason. torchtitan is offered in bfloat16 only (its experts compute in bfloat16 whatever the input)."""
    found, skipped = {}, []

    def record(name: str, version: str, block: Any, reason: str | None) -> None:
        if reason is None:
            found[name] = block
        else:
            skipped.append(dict(impl=name, version=version, reason=reason))
            print(f"skipped {name}: {reason}", flush=True)

    if TITAN in families:
        try:
            version = f"{TITAN} {importlib.metadata.version(TITAN)}"
        except importlib.metadata.PackageNotFoundError:
            skipped.append(dict(impl=TITAN, reason="not installed (pip install --no-deps -r requirements-peers.txt)"))
        else:
            if dtype != torch.bfloat16:
                block, reason = None, "computes its experts in bfloat16 whatever the input dtype: bfloat16 rows only"
            else:
                block, reason = _checked_peer(layer, functools.partial(titan_block, layer), TITAN_RTOL)
            record(f"{TITAN}-grouped_mm", version, block, reason)
        families = [f for f in families if f != TITAN]
    if not families:
        return found, skipped
    try:
        import transformers
    except ImportError:
        return found, skipped + [dict(impl="transformers", reason="not installed")]
    for family in families:
        for impl in experts_impls or experts_implementations():
            block, reason = _checked_peer(layer, functools.partial(peer_block, family, layer, impl), PEER_RTOL)
            record(f"transformers-{family}-{impl}", f"transformers {transformers.__version__}", block, reason)
    return found, skipped


def batched_mm_gib(cfg: MoEConfig, d_model: int, tokens: int, dtype: torch.dtype) -> float:
    """transformers' ``batched_mm`` copies every assignment's expert weights (gate, up, down) before its bmm,
    and backward allocates their gradients alike: GiB of those copies, which exceed memory quickly."""
    return 2 * tokens * cfg.top_k * 3 * cfg.d_expert * d_model * dtype.itemsize / 2**30


def _version(impl: str) -> str:
    if impl.startswith(TITAN):
        return f"{TITAN} {importlib.metadata.version(TITAN)}"
    if impl.startswith("transformers"):
        import transformers

        return f"transformers {transformers.__version__}"
    return f"torch {torch.__version__}"  # moekit and the dense SwiGLU: this checkout on this torch


def moekit_impls(args: argparse.Namespace) -> list[str]:
    """moekit's dispatch paths to time (``--impls``, plus grouped_mm with ``--grouped``), each once."""
    impls = list(args.impls) + (["grouped_mm"] if args.grouped else [])
    return list(dict.fromkeys(impls))


def bench(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    tokens = args.tokens or ([1024, 4096] if args.quick else TOKENS)
    rows, skipped = [], []
    for dtype_name in args.dtypes:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
        for num_experts, top_k, d_expert in args.grid:
            torch.manual_seed(0)
            impls: dict[str, torch.nn.Module] = {}
            for impl in moekit_impls(args):
                cfg = MoEConfig(num_experts=num_experts, top_k=top_k, d_expert=d_expert)
                layer = MoELayer(args.d_model, cfg, dispatch=impl).to(device)
                if impls:  # identical weights for every implementation
                    layer.load_state_dict(next(iter(impls.values())).state_dict())
                impls[f"moekit-{impl}"] = layer
            impls["dense"] = SwiGLU(args.d_model, top_k * d_expert).to(device)
            found, skip = peers(next(iter(impls.values())), args.peers, args.experts_impls, dtype)  # fp32 check
            impls.update(found)
            skipped += [
                dict(s, dtype=dtype_name, num_experts=num_experts, top_k=top_k, d_expert=d_expert) for s in skip
            ]
            impls = {k: m.to(dtype) for k, m in impls.items()}
            for n in tokens:
                x = torch.randn(1, n, args.d_model, device=device, dtype=dtype)
                # The reference loops in Python; past --reference-max-tokens it only costs minutes.
                run = {k: m for k, m in impls.items() if k != "moekit-reference" or n <= args.reference_max_tokens}
                gib = batched_mm_gib(cfg, args.d_model, n, dtype)
                for name in [k for k in run if k.endswith("-batched_mm") and gib > args.peer_max_gib]:
                    reason = (
                        f"its per-assignment weight copies need ~{gib:.1f} GiB > --peer-max-gib {args.peer_max_gib}"
                    )
                    del run[name]
                    skipped.append(
                        dict(impl=name, version=_version(name), reason=reason, dtype=dtype_name, tokens=n)
                        | dict(num_experts=num_experts, top_k=top_k, d_expert=d_expert)
                    )
                    print(f"skipped {name} at {n} tokens: {reason}", flush=True)
                res = measure_all(run, x, device, args.repeats, args.clock)
                for name, r in res.items():
                    row = dict(
                        impl=name,
                        version=_version(name),
                        dispatch=run[name].resolve_dispatch(x) if isinstance(run[name], MoELayer) else None,
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
    return dict(rows=rows, skipped=skipped)


HEADER = (
    "| impl | version | dtype | E | k | d_expert | tokens | fwd ms | fwd+bwd ms | spread | peak MiB | fwd+bwd / dense |"
)


def _fmt(r: dict) -> str:
    label = f"{r['impl']} ({r['dispatch']})" if r["impl"] == "moekit-auto" else r["impl"]
    return (
        f"| {label} | {r['version']} | {r['dtype']} | {r['num_experts']} | {r['top_k']} | {r['d_expert']} "
        f"| {r['tokens']} "
        f"| {r['fwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} | ±{r['fwdbwd_spread'] / 2:.0%} | {r['peak_mib']:.1f} "
        f"| {r['ratio_fwdbwd_vs_dense']:.2f} |"
    )


def _grid_point(text: str) -> tuple[int, int, int]:
    e, k, f = (int(v) for v in text.split("x"))
    return e, k, f


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="tokens 1024 and 4096 only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument(
        "--peers",
        nargs="*",
        default=[*PEERS, TITAN],
        choices=[*PEERS, TITAN],
        help="transformers' MoE blocks, torchtitan's MoE module",
    )
    p.add_argument("--experts-impls", nargs="+", help="experts_implementation values (default: all transformers has)")
    p.add_argument("--peer-max-gib", type=float, default=2.0, help="skip batched_mm where its copies exceed this")
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--grid", nargs="+", type=_grid_point, default=GRID, metavar="ExKxF", help="e.g. 8x2x1024 64x16x128")
    p.add_argument("--tokens", nargs="+", type=int, help="token counts (default: 1024 4096 16384; --quick: 1024 4096)")
    p.add_argument(
        "--impls",
        nargs="+",
        default=["auto", "reference"],
        choices=DISPATCH_IMPLS,
        help="moekit dispatch paths to time side by side (auto: what MoELayer picks; sorted_autograd: the "
        "permutation through plain autograd, the pre-fusion path)",
    )
    p.add_argument("--grouped", action="store_true", help="also time the torch._grouped_mm path")
    p.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or process CPU time (with --threads 1)"
    )
    p.add_argument("--reference-max-tokens", type=int, default=1024, help="skip the naive reference above this")
    args = p.parse_args(argv)
    print(HEADER, "|" + "---|" * (HEADER.count("|") - 1), sep="\n")
    with warnings.catch_warnings():
        # torchtitan's router asks for a float32 autocast region, which CPU autocast declines (harmlessly).
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        result = bench(args)
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
