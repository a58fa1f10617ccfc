"""Sparse upcycling (Komatsuzaki et al. 2022): start a MoE model from a trained dense checkpoint.

Every routed expert of a MoE layer starts as a copy of the dense SwiGLU at the same module path;
attention, norms, embeddings and the FFN slots that stay dense are copied unchanged; routers start fresh
(normal(0, init_std), the MoE layer's own init). With combine weights that sum to 1 and no capacity drops,
every token's output is ``sum_k w_k * FFN(x) = FFN(x)``, so the upcycled model computes exactly the dense
model's function at initialisation (:func:`function_preserving` says when that holds).

Shared experts (DeepSeekMoE), if configured, are copies of the dense FFN too, and the layer's two paths
split the output evenly: the routed experts' ``w_down`` and the shared experts' ``w_down`` columns are
scaled so that routed and shared halves each contribute ``FFN(x) / 2`` (``n`` shared experts each give
``FFN(x) / (2n)``). Both paths therefore start identical in function and receive gradient from the start.

The other routing options keep the dense function as follows:

- ``shared_gate`` (Qwen2-MoE): the gate weight starts at zero, so ``sigmoid(0) = 1/2`` on every token, and
  the shared ``w_down`` is doubled to make up for it; the gate's gradient is not zero, so it learns.
- ``routed_scaling_factor`` ``s``: the routed weights sum to ``s``, so the routed ``w_down`` is divided by ``s``.
- ``selection_bias`` / ``bias_update_rate``: the fresh bias is zero and never enters the combine weights.
- group-limited top-k (``n_group``/``topk_group``): it narrows which experts a token picks, all copies of
  the same FFN, and the renormalised weights still sum to 1.

This module is duck-typed on the model so that ``moekit.moe`` stays a leaf (it imports nothing from
``moekit.core``): the dense model must carry its config dataclass as ``model.cfg`` with a ``moe`` field
(``None`` for dense), ``type(model)(cfg)`` must build the model, and each dense FFN slot must expose
``w_gate``/``w_up``/``w_down`` ``nn.Linear`` layers (no bias) at the module path where the MoE model has
its :class:`~moekit.moe.layer.MoELayer`. ``moekit.core.Transformer`` satisfies all three.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
from torch import nn

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

__all__ = ["function_preserving", "upcycle"]

M = TypeVar("M", bound=nn.Module)


def function_preserving(cfg: MoEConfig) -> tuple[bool, str]:
    """Whether an upcycled layer with this config computes the dense FFN exactly: ``(ok, why_not)``.

    Needs token-choice routing whose selected weights sum to 1 (renormalised top-k with ``top_k > 1``,
    ``topk_order='topk_then_softmax'``, or a single softmax expert) and no capacity drops; a
    ``routed_scaling_factor``, ``shared_gate``, selection bias and group-limited top-k are compensated or
    harmless (module docstring). No capacity drops means both ``capacity_factor`` and ``eval_capacity_factor``
    are ``None`` (evaluation counts too). Top-1 with ``renormalize=True`` and several experts is *not*
    renormalised (see ``MoEConfig``): its weight is the raw router probability, so the upcycled output starts at
    ``p * FFN(x)``.
    """
    if cfg.router == "expert_choice":
        return False, "router='expert_choice' gives a token zero or several experts"
    if cfg.capacity_factor is not None:
        return False, f"capacity_factor={cfg.capacity_factor} may drop assignments (use None, dropless)"
    if cfg.eval_capacity_factor is not None:  # None means capacity_factor's (dropless here) at evaluation too
        return False, (
            f"eval_capacity_factor={cfg.eval_capacity_factor} may drop assignments at evaluation (use None, dropless)"
        )
    softmax = cfg.score_func == "softmax"
    if softmax and cfg.topk_order == "topk_then_softmax":
        return True, ""
    if cfg.top_k > 1 and cfg.renormalize:
        return True, ""
    if softmax and cfg.num_experts == 1:
        return True, ""
    return False, (
        f"the selected weights do not sum to 1 (top_k={cfg.top_k}, renormalize={cfg.renormalize}, "
        f"score_func={cfg.score_func!r}, topk_order={cfg.topk_order!r}); renormalisation applies only at top_k > 1"
    )


def _dense_ffn(dense: nn.Module, path: str) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    try:
        ffn = dense.get_submodule(path)
    except AttributeError as e:
        raise ValueError(f"upcycle: the dense model has no module {path!r} where the MoE model has a MoELayer") from e
    parts = tuple(getattr(ffn, n, None) for n in ("w_gate", "w_up", "w_down"))
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in parts):
        raise ValueError(
            f"upcycle: dense module {path!r} ({type(ffn).__name__}) is not a SwiGLU with bias-free nn.Linear "
            "w_gate, w_up and w_down"
        )
    return parts  # type: ignore[return-value]


def upcycle(dense: M, moe_config: MoEConfig, *, seed: int | None = None) -> M:
    """Return a new MoE model, ``type(dense)(replace(dense.cfg, moe=moe_config))``, whose routed (and shared)
    experts are copies of ``dense``'s feed-forward layers and whose other weights are ``dense``'s.

    ``moe_config.d_expert`` (and ``shared_width`` with shared experts) must equal the dense FFN width: each
    expert is a full copy. ``seed`` seeds the fresh router weights without touching the global RNG (``None``:
    the global RNG draws them). The result has ``dense``'s device, dtype and train/eval mode.
    """
    cfg = getattr(dense, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg) or not hasattr(cfg, "moe"):
        raise TypeError(
            f"upcycle expects a model whose .cfg is a config dataclass with a 'moe' field; got {type(dense).__name__}"
        )
    if cfg.moe is not None or any(isinstance(m, MoELayer) for m in dense.modules()):
        raise ValueError("upcycle expects a dense model (cfg.moe=None, no MoELayer)")
    if not isinstance(moe_config, MoEConfig):
        raise TypeError(f"upcycle moe_config must be a MoEConfig; got {type(moe_config).__name__}")
    first = next(dense.parameters())
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = type(dense)(dataclasses.replace(cfg, moe=moe_config))
    model.to(device=first.device, dtype=first.dtype).train(dense.training)

    moe_paths = [name for name, m in model.named_modules() if isinstance(m, MoELayer)]
    slots = {path: _dense_ffn(dense, path) for path in moe_paths}
    for path, (w_gate, _, _) in slots.items():
        d_ff = w_gate.weight.shape[0]
        if moe_config.d_expert != d_ff:
            raise ValueError(
                f"MoEConfig.d_expert={moe_config.d_expert} must equal the dense FFN width {d_ff} at {path!r} "
                "for upcycling (each expert starts as a full copy of the dense FFN)"
            )
        if moe_config.num_shared_experts and moe_config.shared_width != d_ff:
            raise ValueError(
                f"MoEConfig.d_shared={moe_config.d_shared} (shared width {moe_config.shared_width}) must equal the "
                f"dense FFN width {d_ff} at {path!r} for upcycling"
            )

    src, dst = dense.state_dict(), model.state_dict()
    with torch.no_grad():
        for name, tensor in dst.items():
            if any(name.startswith(p + ".") for p in moe_paths):
                continue  # router and experts: set below (router keeps its fresh init)
            if name not in src or src[name].shape != tensor.shape:
                got = tuple(src[name].shape) if name in src else "missing"
                raise ValueError(
                    f"upcycle: MoE model entry {name!r} {tuple(tensor.shape)} has no dense counterpart ({got})"
                )
            tensor.copy_(src[name])
        for path in moe_paths:
            _copy_into_layer(model.get_submodule(path), *slots[path])
    return model


def _copy_into_layer(layer: MoELayer, w_gate: nn.Linear, w_up: nn.Linear, w_down: nn.Linear) -> None:
    """Every routed expert (and the shared experts) of ``layer`` := the dense SwiGLU, outputs split evenly."""
    experts, shared, cfg = layer.experts, layer.shared, layer.cfg
    n_paths = 2 if shared is not None else 1
    # nn.Linear weights are [out, in]; stacked experts are [E, in, out].
    experts.w_gate.copy_(w_gate.weight.T.expand_as(experts.w_gate))
    experts.w_up.copy_(w_up.weight.T.expand_as(experts.w_up))
    routed_down = w_down.weight.T / (n_paths * cfg.routed_scaling_factor)  # weights sum to the factor
    experts.w_down.copy_(routed_down.expand_as(experts.w_down))
    if shared is not None:
        n_shared, d_ff = cfg.num_shared_experts, w_gate.weight.shape[0]
        gate_scale = 1.0
        if layer.shared_gate is not None:  # a zero gate is sigmoid(0) = 1/2 everywhere
            layer.shared_gate.weight.zero_()
            gate_scale = 0.5
        for n in range(n_shared):  # fused shared experts: block n of the hidden units is expert n
            rows = slice(n * d_ff, (n + 1) * d_ff)
            shared.w_gate.weight[rows].copy_(w_gate.weight)
            shared.w_up.weight[rows].copy_(w_up.weight)
            shared.w_down.weight[:, rows].copy_(w_down.weight / (n_paths * n_shared * gate_scale))
