"""Expert feed-forward networks: E routed SwiGLU experts as stacked weights, and fused shared experts.

Shapes: ``E`` experts, ``D`` d_model, ``F`` expert hidden width, ``A`` rows (assignments) sorted by
expert, ``N`` tokens.

Routed weights use the ``[E, in, out]`` layout, so expert e computes
``(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` with plain ``x @ w`` (no transpose), which is also
the layout ``torch._grouped_mm`` consumes. Note this is the transpose of ``nn.Linear.weight``
(``[out, in]``): copying a dense SwiGLU into expert e is ``w_gate[e] = dense.w_gate.weight.T``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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

    def forward_padded(self, xs_sd: Tensor, scale_s: Tensor, cap: int, dtype: torch.dtype) -> Tensor:
        """Rows ``xs_sd [E * cap, D]``, expert e's in rows ``[e * cap, (e + 1) * cap)``, times ``scale_s
        [E * cap]`` (zero on padding rows) -> ``[E * cap, D]``: three ``torch.bmm`` over all experts."""
        e, d = self.num_experts, xs_sd.shape[-1]
        xs_ecd = xs_sd.to(dtype).view(e, cap, d)
        h_ecf = F.silu(torch.bmm(xs_ecd, self.w_gate.to(dtype))) * torch.bmm(xs_ecd, self.w_up.to(dtype))
        s_ec1 = scale_s.to(dtype).view(e, cap, 1)
        if self.scale_hidden:
            return torch.bmm(h_ecf * s_ec1, self.w_down.to(dtype)).view(e * cap, d)
        return (torch.bmm(h_ecf, self.w_down.to(dtype)) * s_ec1).view(e * cap, d)

    def forward_fused(
        self,
        x_nd: Tensor,
        token_a: Tensor,
        counts: list[int],
        scale_a: Tensor,
        dtype: torch.dtype,
        gather_once: bool = False,
    ) -> Tensor:
        """``y_nd [N, D]``: every row of ``token_a [A]`` (grouped by expert, ``counts[e]`` each) through its
        expert, times ``scale_a [A]``, summed per token; gather, experts and scatter in one autograd node
        (:class:`_FusedSortedExperts`). Computes in ``dtype`` (autocast's, cast once per call). Eager only:
        its per-expert loop runs over host ints. ``gather_once``: gather and scatter all rows in one op
        each (``[A, D]`` buffers, the gathered rows kept for backward) instead of per expert."""
        weights = (self.w_gate, self.w_up, self.w_down)
        return _FusedSortedExperts.apply(x_nd, token_a, scale_a, *weights, counts, dtype, gather_once)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming grad contiguous: ``_grouped_mm``'s backward rejects
    expanded (stride-0) grads such as the one ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def _not_differentiable(backward: Callable) -> Callable:
    """Mark a hand-written backward as not differentiable, refusing a double backward outright.

    ``torch.autograd.function.once_differentiable`` raises only when the incoming grad requires grad; under
    ``autograd.grad(..., create_graph=True)`` it often does not, and the node's contribution would silently
    count as a constant. Grad mode is on exactly when a backward is being recorded.

    Autocast is switched off too, as in the forward: ``loss.backward()`` called inside an autocast region
    would otherwise turn the plain ``mm`` calls to bf16 while the ``mm(out=)`` buffers keep the forward's
    dtype."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            _refuse_double_backward()
        with torch.no_grad(), torch.autocast(grads[0].device.type, enabled=False):
            return backward(ctx, *grads)

    return wrapper


def _refuse_double_backward() -> None:
    raise RuntimeError(
        "MoE dispatch 'sorted' (the fused node) has a hand-written backward that is not differentiable; "
        "for double backward (create_graph=True, gradient penalties) use dispatch='sorted_autograd' "
        "(MoELayer(dispatch=...), moekit.moe.set_dispatch or parallel.dispatch)"
    )


class _FusedSortedExperts(torch.autograd.Function):
    """Gather -> per-expert SwiGLU -> scaled scatter-add, with a hand-written backward.

    Why not autograd over the plain ops: on CPU every fresh buffer of K*N rows (the gathered rows, the
    concatenated outputs, their grads, the stacked weight grads) is above glibc's mmap threshold, so it
    is page-faulted anew each call, and ``cat``/``split``/``unbind`` backward materialise each twice.
    Here nothing ``[A, D]`` wide exists: each expert gathers its own rows (small, heap-reused buffers),
    scatters its output straight into ``y``, re-gathers in backward (a gather is cheaper than keeping
    ``[A, D]`` alive) and writes its weight grads in place (``mm(out=)``). With ``gather_once`` (small
    batches, whose ``[A, D]`` buffers cost no page faults) one gather and one scatter serve all experts,
    the outputs and input grads written in place by ``mm(out=)``. Saved: ``x``, the cast
    weights and per expert ``g, u, silu(g), s*h`` ``[M, F]`` (what autograd saves for a dense SwiGLU of
    width K*F; keeping the last two instead of recomputing them was ~2-3% faster, docs/perf.md).
    The combine weight s scales the hidden rows; its grad is ``<dh, h> = <dh * u, silu(g)>`` (``dh``
    the hidden row's grad before s) because ``<dy, (s*h) @ w_down> = s * <dy @ w_down^T, h>``.
    """

    @staticmethod
    def forward(ctx, x_nd, token_a, scale_a, w_gate, w_up, w_down, counts, dtype, gather_once):  # type: ignore[override]
        with torch.autocast(x_nd.device.type, enabled=False):
            xc, wg, wu, wd = x_nd.to(dtype), w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
            s_a = scale_a.to(dtype)
            y_nd = xc.new_zeros(x_nd.shape[0], w_down.shape[-1])
            xs_ad = ys_ad = None
            if gather_once:  # small batches: one gather and one scatter instead of one per expert
                xs_ad = xc.index_select(0, token_a)
                ys_ad = xc.new_empty(token_a.shape[0], w_down.shape[-1])
            saved = []
            # Split and unbind once: per-expert slicing and indexing ops cost as much as the small matmuls.
            per_expert = zip(
                counts,
                token_a.split(counts),
                s_a[:, None].split(counts),
                *(_parts(t, counts) for t in (xs_ad, ys_ad)),
                wg.unbind(0),
                wu.unbind(0),
                wd.unbind(0),
            )
            for m, idx_m, s_m, xs_md, ys_md, wg_e, wu_e, wd_e in per_expert:
                if m == 0:
                    continue
                x_md = xc.index_select(0, idx_m) if xs_md is None else xs_md
                g_mf, u_mf = torch.mm(x_md, wg_e), torch.mm(x_md, wu_e)
                sg_mf = F.silu(g_mf)
                hs_mf = torch.mul(sg_mf, u_mf).mul_(s_m)
                if ys_md is None:
                    y_nd.index_add_(0, idx_m, torch.mm(hs_mf, wd_e))
                else:
                    torch.mm(hs_mf, wd_e, out=ys_md)
                saved += [g_mf, u_mf, sg_mf, hs_mf]
            if ys_ad is not None:
                y_nd.index_add_(0, token_a, ys_ad)
        ctx.save_for_backward(xc, token_a, s_a, wg, wu, wd, xs_ad, *saved)
        ctx.counts = counts
        ctx.in_dtypes = (x_nd.dtype, scale_a.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
        return y_nd

    @staticmethod
    @_not_differentiable
    def backward(ctx, dy_nd):  # type: ignore[override]
        xc, token_a, s_a, wg, wu, wd, xs_ad, *saved = ctx.saved_tensors
        counts = ctx.counts
        dy_nd = dy_nd.to(xc.dtype)
        dx_nd = torch.zeros_like(xc)
        ds_a = torch.empty_like(s_a)
        dwg, dwu, dwd = (torch.empty_like(w) for w in (wg, wu, wd))
        dys_ad = dxs_ad = None
        if xs_ad is not None:
            dys_ad, dxs_ad = dy_nd.index_select(0, token_a), torch.empty_like(xs_ad)
        i = 0
        per_expert = zip(
            counts,
            token_a.split(counts),
            s_a[:, None].split(counts),
            ds_a.split(counts),
            *(_parts(t, counts) for t in (xs_ad, dys_ad, dxs_ad)),
            *(w.unbind(0) for w in (wg, wu, wd, dwg, dwu, dwd)),
        )
        for m, idx_m, s_m, ds_m, xs_md, dys_md, dxs_md, wg_e, wu_e, wd_e, dwg_e, dwu_e, dwd_e in per_expert:
            if m == 0:
                for dw_e in (dwg_e, dwu_e, dwd_e):
                    dw_e.zero_()
                continue
            g_mf, u_mf, sg_mf, hs_mf = saved[i : i + 4]
            if xs_md is None:
                x_md, dy_md = xc.index_select(0, idx_m), dy_nd.index_select(0, idx_m)
            else:
                x_md, dy_md = xs_md, dys_md
            torch.mm(hs_mf.T, dy_md, out=dwd_e)
            dh_mf = torch.mm(dy_md, wd_e.T)  # grad of the hidden row before the combine weight
            t_mf = dh_mf * u_mf
            torch.linalg.vecdot(t_mf, sg_mf, out=ds_m)
            dg_mf = torch.ops.aten.silu_backward(t_mf.mul_(s_m), g_mf)
            du_mf = dh_mf.mul_(s_m).mul_(sg_mf)
            torch.mm(x_md.T, dg_mf, out=dwg_e)
            torch.mm(x_md.T, du_mf, out=dwu_e)
            if dxs_md is None:
                dx_nd.index_add_(0, idx_m, torch.mm(dg_mf, wg_e.T).addmm_(du_mf, wu_e.T))
            else:
                torch.mm(dg_mf, wg_e.T, out=dxs_md).addmm_(du_mf, wu_e.T)
            i += 4
        if dxs_ad is not None:
            dx_nd.index_add_(0, token_a, dxs_ad)
        x_dt, s_dt, wg_dt, wu_dt, wd_dt = ctx.in_dtypes
        grads = (dx_nd.to(x_dt), None, ds_a.to(s_dt), dwg.to(wg_dt), dwu.to(wu_dt), dwd.to(wd_dt))
        return (*grads, None, None, None)


def _parts(t: Tensor | None, counts: list[int]) -> list[Tensor | None] | tuple[Tensor, ...]:
    """``t`` split into per-expert row blocks, or one None per expert when there is no ``t``."""
    return [None] * len(counts) if t is None else t.split(counts)


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
