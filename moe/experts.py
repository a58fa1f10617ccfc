"""Expert feed-forward networks: E routed SwiGLU experts as stacked weights, and fused shared experts.

Shapes: ``E`` experts, ``D`` d_model, ``F`` expert hidden width, ``A`` rows (assignments) sorted by
expert, ``N`` tokens.

Routed weights use the ``[E, in, out]`` layout, so expert e computes
``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` with plain ``x @ w`` (no transpose), which is also
the layout ``torch._grouped_mm`` consumes. Note this is the transpose of ``nn.Linear.weight``
(``[out, in]``): copying a dense SwiGLU into expert e is ``w_gate[e] = dense.w_gate.weight.T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RoutedExperts(nn.Module):
    """``w_gate [E, D, F]``, ``w_up [E, D, F]``, ``w_down [E, F, D]``."""

    def __init__(
        self, num_experts: int, d_model: int, d_expert: int, *, init_std: float = 0.02, out_init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        nn.init.normal_(self.w_gate, std=init_std)
        nn.init.normal_(self.w_up, std=init_std)
        nn.init.normal_(self.w_down, std=out_init_std)

    def expert(self, x_md: Tensor, e: int) -> Tensor:
        """Expert ``e`` on rows ``x_md [M, D]``. Reference path only: ``w[e]`` in a loop over experts
        costs O(E^2) in backward (every slice's grad materialises the whole stacked weight)."""
        return (F.silu(x_md @ self.w_gate[e]) * (x_md @ self.w_up[e])) @ self.w_down[e]

    @property
    def scale_hidden(self) -> bool:
        """Whether combine weights are cheaper to apply to the hidden rows ``[A, F]`` than to the outputs
        ``[A, D]`` (fine-grained experts, F < D); ``w_down`` is linear, so both give the same result."""
        return self.w_down.shape[1] < self.w_down.shape[2]

    def forward_sorted(self, xs_ad: Tensor, counts: list[int], scale_a: Tensor | None = None) -> Tensor:
        """Rows ``xs_ad [A, D]`` grouped by expert, ``counts[e]`` rows each (sum = A) -> ``[A, D]``.

        ``scale_a [A]`` optionally multiplies each row's hidden activation (see :attr:`scale_hidden`).
        ``unbind`` gives per-expert views whose backward is ONE stack into each weight's grad; empty
        experts are skipped in eager mode (their grad slice is zero). Under torch.compile ``counts`` are
        unbacked SymInts: testing one for zero would be a graph break, and an empty matmul is harmless.
        """
        w_gate, w_up, w_down = self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)
        scales = scale_a.split(counts) if scale_a is not None else None
        skip_empty = not torch.compiler.is_compiling()
        ys = []
        for e, x_md in enumerate(xs_ad.split(counts)):
            if skip_empty and counts[e] == 0:
                continue
            h_mf = F.silu(x_md @ w_gate[e]) * (x_md @ w_up[e])
            if scales is not None:
                h_mf = h_mf * scales[e].to(h_mf.dtype)[:, None]
            ys.append(h_mf @ w_down[e])
        if not ys:
            return xs_ad.new_zeros(xs_ad.shape[0], self.w_down.shape[-1])
        return torch.cat(ys) if len(ys) > 1 else ys[0]

    def forward_grouped(
        self, xs_ad: Tensor, offs_e: Tensor, dtype: torch.dtype, scale_a: Tensor | None = None
    ) -> Tensor:
        """Same as :meth:`forward_sorted` with ``torch._grouped_mm``; ``offs_e [E]`` int32 cumulative row
        ends (the last must equal A). Computes in ``dtype``; no host sync."""
        xs_ad = xs_ad.to(dtype)
        h_af = F.silu(_grouped_mm(xs_ad, self.w_gate.to(dtype), offs_e)) * _grouped_mm(
            xs_ad, self.w_up.to(dtype), offs_e
        )
        if scale_a is not None:
            h_af = h_af * scale_a.to(h_af.dtype)[:, None]
        return _grouped_mm(h_af, self.w_down.to(dtype), offs_e)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous: ``_grouped_mm``'s backward rejects
    expanded (stride-0) grads such as the one ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _grouped_mm(x_ad: Tensor, w_eio: Tensor, offs_e: Tensor) -> Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_ad, w_eio, offs=offs_e))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` runs here: CPU fp32/bf16, CUDA bf16, row strides 16-byte aligned.

    Under torch.compile bf16 only: the op's fake (meta) kernel rejects fp32 even where eager runs it.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    bf16_only = device.type == "cuda" or torch.compiler.is_compiling()
    allowed = (torch.bfloat16,) if bf16_only else (torch.float32, torch.bfloat16)
    if device.type not in ("cpu", "cuda") or dtype not in allowed:
        return False
    return all((d * dtype.itemsize) % 16 == 0 for d in dims)


class SharedExperts(nn.Module):
    """DeepSeekMoE shared experts: ``num_shared`` always-active SwiGLU experts of hidden width ``width``.

    Implemented as ONE SwiGLU of hidden width ``num_shared * width``: the sum of independent SwiGLUs
    equals a SwiGLU over their concatenated hidden units (block-structured ``w_gate``/``w_up`` rows and
    ``w_down`` columns), so this is mathematically identical and runs as three large matmuls.
    Parameter names follow the dense ``SwiGLU`` (``w_gate``/``w_up``/``w_down`` nn.Linear, no bias).
    """

    def __init__(
        self, d_model: int, num_shared: int, width: int, *, init_std: float = 0.02, out_init_std: float = 0.02
    ) -> None:
        super().__init__()
        hidden = num_shared * width
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w_gate.weight, std=init_std)
        nn.init.normal_(self.w_up.weight, std=init_std)
        nn.init.normal_(self.w_down.weight, std=out_init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
