"""Benchmark the whole training step of a MoE model against its FLOP-matched dense twin, side by side.

    python recipes/bench_train_step.py --json runs/bench/train_step.json [--config recipes/configs/compare-cpu.yaml]
        [--quick] [--repeats 5] [--threads 2] [--fine-experts 32] [--compile] [--dtypes float32 bfloat16]
        [--dispatch auto sorted sorted_autograd padded_bmm] [--clock wall|cpu] [KEY=VALUE ...]

One step is what the Trainer does per batch: forward under autocast (bf16) or not (fp32), the LM objective
``loss + aux_loss`` (the MoE's load-balance and z-losses included), backward, gradient clipping, AdamW. The
models come from the comparison's own plan (``moekit.experiment.plan.plan_runs`` on ``--config`` and the
dotted overrides): the MoE base model and exactly the dense twin the comparison trains, at the
comparison's batch size and sequence length. A fine-grained variant splits each expert ``--fine-experts /
num_experts`` ways at the same active width (top_k * d_expert), against its own dense twin; every pair's
active FLOPs per token must agree within ``compare.max_flops_mismatch``, as the comparison demands. For a
multimodal comparison (``compare.task: multimodal``) it times the decoder alone, on token inputs.

Each implementation keeps its own model and optimizer; rounds interleave them (order alternating by round)
so machine drift hits all alike, the first round is the warm-up, and a timing is the median of
``--repeats`` rounds with its min and max. The inputs are fixed uniformly random tokens. Several
``--dispatch`` values give one MoE runner each in the same rounds (a summary row each, against the same
dense twin); ``--clock cpu`` times process CPU time (robust on a shared machine at ``--threads 1``).

Memory, stated in parts: the parameters, their gradients and AdamW's state (bytes of the tensors), and the
activations saved for backward (unique storages seen by ``saved_tensors_hooks``, parameters excluded; the
part that differs between sparse and dense). On CUDA also ``max_memory_allocated`` over a step above what
was allocated before it. ``--compile`` adds torch.compile'd rows (forward and backward compiled, the
optimizer eager, as the Trainer does); their first step, compilation included, is ``first_step_s`` and
``compile_s`` is that minus the compiled median step.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from moekit.core.config import ModelConfig
from moekit.core.files import atomic_write_json
from moekit.core.meter import SavedTensorBytes
from moekit.core.model import Transformer
from moekit.core.objective import LMObjective
from moekit.core.optim import build_optimizer
from moekit.experiment.matching import check_matched, dense_twin, describe, moe_name
from moekit.experiment.plan import TASKS, load_comparison, plan_runs, with_moe
from moekit.moe.config import DISPATCH_IMPLS
from moekit.moe.layer import set_dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK_BATCH = 2  # sequences per step under --quick: a plumbing check, not a measurement
MiB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_pairs(config: str | None, overrides: list[str], fine_experts: int) -> tuple[Any, list[dict]]:
    """The comparison, and its (name, MoE decoder, dense twin) pairs: the demo's and the fine-grained one."""
    cmp = load_comparison(config, overrides)
    task = TASKS[cmp.compare.task]
    seq = task.seq_len(cmp.base)
    specs = plan_runs(cmp)  # checks the demo pair's matching as the comparison does
    moe = task.decoder(next(s.run for s in specs if s.kind == "moe"))
    twin = next((task.decoder(s.run) for s in specs if s.name == "dense"), None) or dense_twin(moe, seq)
    pairs = [dict(pair="demo", moe=moe, dense=twin)]
    if fine_experts:
        base = moe.moe
        if fine_experts % base.num_experts or fine_experts <= base.num_experts:
            raise ValueError(
                f"--fine-experts={fine_experts} must be a multiple of the model's num_experts={base.num_experts} "
                "above it (each expert splits into equal parts)"
            )
        g = fine_experts // base.num_experts
        fine = with_moe(moe, num_experts=fine_experts, top_k=base.top_k * g)  # d_expert / g: same active width
        pairs.append(dict(pair="fine", moe=fine, dense=dense_twin(fine, seq)))
    for p in pairs:
        a, b = describe(moe_name(p["moe"].moe), p["moe"], seq), describe("dense", p["dense"], seq)
        check_matched(a, b, "flops_per_token", cmp.compare.max_flops_mismatch)
        p["facts"] = {"moe": asdict(a), "dense": asdict(b)}
        p["flops_mismatch"] = abs(a.flops_per_token - b.flops_per_token) / b.flops_per_token
    return cmp, pairs


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class StepRunner:
    """One implementation under test: a model, its AdamW, and the Trainer's step on a fixed batch."""

    def __init__(self, cfg: ModelConfig, train: Any, batch: dict, device: torch.device, dtype: torch.dtype) -> None:
        torch.manual_seed(0)
        self.model = Transformer(cfg).to(device)
        self.opt = build_optimizer(self.model, train.lr, train.weight_decay, train.betas, train.adam_eps)
        self.clip = train.grad_clip if train.grad_clip else float("inf")
        self.batch, self.device, self.dtype = batch, device, dtype
        self.forward: torch.nn.Module = self.model
        self.compiled = False
        self.objective = LMObjective()

    def compile(self, backend: str) -> None:
        self.forward, self.compiled = torch.compile(self.model, backend=backend), True

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _loss(self) -> torch.Tensor:
        # The sorted dispatch's per-expert sizes are data-dependent: one graph needs captured scalars.
        patch = torch._dynamo.config.patch(capture_scalar_outputs=True) if self.compiled else contextlib.nullcontext()
        with patch, self._autocast():
            out = self.objective(self.forward, self.batch)
        return out.loss + out.aux_loss

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._loss().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()

    def memory(self) -> dict[str, float | None]:
        """Bytes in MiB: parameters, gradients, AdamW state; activations saved for backward (eager only)."""
        params = list(self.model.parameters())
        state = [v for s in self.opt.state.values() for v in s.values()]
        mem: dict[str, float | None] = {
            "weights_mib": _bytes(params) / MiB,
            "grads_mib": _bytes(p.grad for p in params) / MiB,
            "optimizer_state_mib": _bytes(state) / MiB,
            "activations_mib": None,
        }
        self.opt.zero_grad(set_to_none=True)
        if not self.compiled:  # hooks inside compiled graphs do not see what AOT autograd saves
            with SavedTensorBytes(exclude=params) as saved:
                loss = self._loss()
            mem["activations_mib"] = saved.mib
            del loss
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step()
            torch.cuda.synchronize()
            mem["cuda_step_peak_above_state_mib"] = (torch.cuda.max_memory_allocated() - base) / MiB
        return mem


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_rounds(
    runners: dict[str, StepRunner], repeats: int, device: torch.device, clock: str = "wall"
) -> dict[str, dict]:
    """Per runner: first-round seconds and the later rounds' step ms; rounds interleave the runners.

    ``clock='cpu'`` times the process's CPU time instead of wall time: on a shared machine with one
    torch thread it leaves out the time other processes held the core."""
    now = CLOCKS[clock]
    names = list(runners)
    first: dict[str, float] = {}
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats + 1):
        for name in names if r % 2 == 0 else reversed(names):
            _sync(device)
            t0 = now()
            runners[name].step()
            _sync(device)
            dt = now() - t0
            if r == 0:
                first[name] = dt
            else:
                ms[name].append(dt * 1e3)
    return {n: {"first_step_s": first[n], "ms": ms[n]} for n in names}


def bench(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cmp, pairs = model_pairs(args.config, args.overrides, args.fine_experts)
    train = cmp.base.train
    seq = TASKS[cmp.compare.task].seq_len(cmp.base)
    batch_size = args.batch_size or (QUICK_BATCH if args.quick else train.batch_size)
    gen = torch.Generator().manual_seed(0)
    vocab = pairs[0]["moe"].vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=gen).to(device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    tokens = batch_size * seq
    modes = ["eager"] + (["compiled"] if args.compile else [])
    dispatches: list[str | None] = list(dict.fromkeys(args.dispatch)) if args.dispatch else [None]
    rows, summary = [], []
    for p in pairs:
        for dtype_name in args.dtypes:
            torch._dynamo.reset()  # compile time is each group's own, not a cache hit from the last group
            runners: dict[tuple[str, str, str | None], StepRunner] = {}
            for mode in modes:
                for kind, impl in [("moe", d) for d in dispatches] + [("dense", None)]:
                    run = StepRunner(p[kind], train, batch, device, DTYPES[dtype_name])
                    if impl is not None:
                        set_dispatch(run.model, impl)
                    if mode == "compiled":
                        run.compile(args.compile_backend)
                    runners[(kind, mode, impl)] = run
            timed = time_rounds({_key(*k): r for k, r in runners.items()}, args.repeats, device, args.clock)
            group = {}
            for (kind, mode, impl), run in runners.items():
                t = timed[_key(kind, mode, impl)]
                med = statistics.median(t["ms"])
                row = dict(
                    pair=p["pair"],
                    model=p["facts"][kind]["name"],
                    kind=kind,
                    mode=mode,
                    dtype=dtype_name,
                    tokens_per_step=tokens,
                    step_ms=med,
                    step_ms_min=min(t["ms"]),
                    step_ms_max=max(t["ms"]),
                    tokens_per_s=tokens / (med / 1e3),
                    first_step_s=t["first_step_s"],
                    compile_s=t["first_step_s"] - med / 1e3 if mode == "compiled" else None,
                    **run.memory(),
                    **{k: p["facts"][kind][k] for k in ("params_total", "params_active", "flops_per_token")},
                )
                if kind == "moe":
                    row["dispatch"] = impl or "auto"
                rows.append(row)
                group[(kind, mode, impl)] = row
            for mode in modes:
                for impl in dispatches:
                    moe, eager = group[("moe", mode, impl)], group[("moe", "eager", impl)]
                    s = _summary(moe, group[("dense", mode, None)], eager)
                    summary.append(s)
                    print(_fmt(s), flush=True)
    return dict(meta=_meta(args, device, cmp, batch_size, seq, pairs), summary=summary, rows=rows)


def _key(kind: str, mode: str, impl: str | None) -> str:
    return f"{kind}/{mode}" + (f"/{impl}" if impl else "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _summary(moe: dict, dense: dict, moe_eager: dict) -> dict:
    """MoE vs dense in one mode: time per token and memory ratios, and compiled vs eager for the MoE."""
    return dict(
        pair=moe["pair"],
        moe=moe["model"],
        dispatch=moe["dispatch"],
        mode=moe["mode"],
        dtype=moe["dtype"],
        moe_tokens_per_s=moe["tokens_per_s"],
        dense_tokens_per_s=dense["tokens_per_s"],
        time_per_token_moe_vs_dense=moe["step_ms"] / dense["step_ms"],
        moe_spread=(moe["step_ms_max"] - moe["step_ms_min"]) / moe["step_ms"],
        dense_spread=(dense["step_ms_max"] - dense["step_ms_min"]) / dense["step_ms"],
        activations_moe_vs_dense=_ratio(moe["activations_mib"], dense["activations_mib"]),
        state_moe_vs_dense=_ratio(_state(moe), _state(dense)),
        moe_step_vs_eager=moe["step_ms"] / moe_eager["step_ms"],
        moe_compile_s=moe["compile_s"],
    )


def _state(row: dict) -> float:
    return row["weights_mib"] + row["grads_mib"] + row["optimizer_state_mib"]


def _meta(args: argparse.Namespace, device: torch.device, cmp: Any, batch_size: int, seq: int, pairs: list) -> dict:
    return dict(
        config=args.config,
        overrides=args.overrides,
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        quick=args.quick,
        repeats=args.repeats,
        batch_size=batch_size,
        seq_len=seq,
        dispatch=args.dispatch or ["auto"],
        clock=args.clock,
        compile_backend=args.compile_backend if args.compile else None,
        max_flops_mismatch=cmp.compare.max_flops_mismatch,
        pairs=[
            dict(
                pair=p["pair"], moe=asdict(p["moe"].moe), dense_d_ff=p["dense"].d_ff, flops_mismatch=p["flops_mismatch"]
            )
            for p in pairs
        ],
    )


HEADER = (
    "| pair | MoE | dispatch | mode | dtype | MoE tok/s | dense tok/s | time/token MoE/dense | spread MoE, dense "
    "| activations MoE/dense | weights+grads+Adam MoE/dense | MoE vs eager | MoE compile s |"
)


def _fmt(s: dict) -> str:
    def num(v: float | None, spec: str, unit: str = "") -> str:
        return "-" if v is None else format(v, spec) + unit

    act, state = (num(s[k], ".2f", "x") for k in ("activations_moe_vs_dense", "state_moe_vs_dense"))
    return (
        f"| {s['pair']} | {s['moe']} | {s['dispatch']} | {s['mode']} | {s['dtype']} | {s['moe_tokens_per_s']:,.0f} "
        f"| {s['dense_tokens_per_s']:,.0f} | {s['time_per_token_moe_vs_dense']:.2f}x "
        f"| ±{s['moe_spread'] / 2:.0%}, ±{s['dense_spread'] / 2:.0%} | {act} | {state} "
        f"| {s['moe_step_vs_eager']:.2f}x | {num(s['moe_compile_s'], '.1f')} |"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result (meta, summary, rows) as JSON here")
    p.add_argument("--config", default="recipes/configs/compare-cpu.yaml", help="comparison YAML (its model, train)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_BATCH} sequences per step: plumbing, not numbers")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on CUDA)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the config's train.batch_size)")
    p.add_argument("--fine-experts", type=int, default=32, help="experts of the fine-grained variant (0: none)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument(
        "--dispatch",
        nargs="+",
        choices=DISPATCH_IMPLS,
        help="MoE dispatch for every MoE layer; several: one MoE runner each, side by side (default: auto)",
    )
    p.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="wall time, or process CPU time (with --threads 1)"
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.moe.top_k=4")
    args = p.parse_intermixed_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    print(HEADER, "|" + "---|" * (HEADER.count("|") - 1), sep="\n")
    result = bench(args)
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
