"""Throughput bookkeeping of the training loop: the log window (loss sums, tokens, paused clock) and the
matmul probe that gives MFU its denominator; and the CPU stand-in for peak memory that the benchmarks use."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

import psutil
import torch
from accelerate import Accelerator
from torch import Tensor


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, min_iters: int = 5, min_seconds: float = 0.2
) -> float:
    """Best FLOP/s of an ``[n, n] @ [n, n]`` matmul (``2 n^3`` FLOPs) on ``device`` in ``dtype``.

    Repeats for at least ``min_iters`` products and ``min_seconds`` and keeps the fastest, which filters
    out interference from other processes. ``n`` defaults to 4096 on GPUs and 512 on CPUs. Inputs come
    from a private generator so that the probe leaves the global RNG, and hence training, untouched.
    """
    n = n or (4096 if device.type == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: kernel selection, allocator
    sync()
    best, iters, start = math.inf, 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        iters += 1
    return 2.0 * n**3 / max(best, 1e-9)


class SavedTensorBytes:
    """Context manager: unique storage bytes autograd saves for backward while it is active.

    CPU has no allocator statistics; what a forward keeps for backward is the activation memory that
    differs between implementations. It is a lower bound of a step's peak: temporaries freed within the
    forward and the gradients are not in it. Views of one storage count once; storages of ``exclude`` (the
    parameters, whose bytes a caller states separately) do not count.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}  # storage address -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self._skip:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())

    @property
    def mib(self) -> float:
        return self.nbytes / 2**20


class LogWindow:
    """Loss sums and throughput counters since the last log event (device tensors: no per-step host sync).

    The clock runs from ``restart`` to the next log, paused around evaluation and checkpointing; log
    events read it right after an all-reduce, which waits for queued device work.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's real target tokens
        self.global_tokens = 0  # all ranks' tokens of the window, set by reduce()
        self.grad_norm: Tensor | None = None
        self._seconds = 0.0
        self._t0 = time.perf_counter()

    def pause(self) -> None:
        self._seconds += time.perf_counter() - self._t0

    def resume(self) -> None:
        self._t0 = time.perf_counter()

    def seconds(self) -> float:
        return self._seconds + time.perf_counter() - self._t0

    def add(self, loss: Tensor, aux: Tensor, metrics: Mapping[str, Tensor], num_tokens: Tensor | int = 0) -> None:
        """One micro-batch: its loss, aux loss, extra metrics (logged as means) and real target tokens (summed)."""
        parts = {"train_loss": loss, "aux_loss": aux, **metrics}
        for k, v in parts.items():
            v = torch.as_tensor(v, device=self.device).detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.tokens = self.tokens + torch.as_tensor(num_tokens, device=self.device).detach().double()
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Means over micro-batches and ranks, and ``global_tokens`` (the sum over ranks), in one all-reduce;
        every rank must call it. Token counts are exact in float64 below 2**53."""
        keys = sorted(self.sums)
        stacked = torch.stack([*(self.sums[k] for k in keys), self.tokens])  # [K + 1]
        total = accelerator.reduce(stacked, reduction="sum")
        self.global_tokens = int(total[-1].item())
        return dict(zip(keys, (total[:-1] / (self.count * accelerator.num_processes)).tolist()))


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """``[MiB]``, set when the block ends: CUDA's allocator peak, or on CPU the process RSS peak above its
    start value, sampled every 50 ms (RSS because CPU tensors live on the process heap)."""
    out = [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        out[0] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    proc, stop = psutil.Process(), threading.Event()
    base = proc.memory_info().rss

    def watch() -> None:
        while not stop.wait(0.05):
            out[0] = max(out[0], (proc.memory_info().rss - base) / 2**20)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` inside the block (None: unchanged), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)
