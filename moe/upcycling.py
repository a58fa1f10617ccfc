"""Sparse upcycling (Komatsuzaki et al. 2022): start a MoE model from a trained dense checkpoint.

Every routed expert of a MoE layer starts as a copy of that layer's dense SwiGLU; attention, norms and
embeddings are copied unchanged; routers start fresh (normal(0, init_std)). With renormalised top-k
weights (they sum to 1) and no capacity drops, every token's output is ``sum_k w_k * FFN(x) = FFN(x)``,
so the upcycled model computes exactly the dense model's function at initialisation.
"""

from __future__ import annotations

import dataclasses

import torch

from moekit.core.config import ModelConfig
from moekit.core.model import Transformer
from moekit.moe.config import MoEConfig


def upcycle(dense: Transformer, moe_config: MoEConfig, *, seed: int | None = None) -> Transformer:
    """Return a new MoE ``Transformer`` whose experts are copies of ``dense``'s feed-forward layers.

    ``moe_config.d_expert`` must equal the dense ``d_ff`` (each expert is a full copy) and the dense model
    must have no MoE layers. Shared experts, if any, are copies too and their output is scaled so that
    the layer output still equals the dense FFN: shared and routed halves each get half the ``w_down``.
    """
    cfg = dense.cfg
    if cfg.moe is not None:
        raise ValueError("upcycle expects a dense model (ModelConfig.moe=None)")
    if moe_config.d_expert != cfg.d_ff:
        raise ValueError(
            f"MoEConfig.d_expert={moe_config.d_expert} must equal the dense d_ff={cfg.d_ff} for upcycling "
            "(each expert starts as a full copy of the dense FFN)"
        )
    if moe_config.num_shared_experts and moe_config.shared_width != cfg.d_ff:
        raise ValueError(f"MoEConfig.d_shared must equal the dense d_ff={cfg.d_ff} for upcycling")
    moe_cfg: ModelConfig = dataclasses.replace(cfg, moe=moe_config)
    if seed is not None:
        torch.manual_seed(seed)
    model = Transformer(moe_cfg).to(dense.embed.weight.device, dense.embed.weight.dtype)

    src = dense.state_dict()
    dst = model.state_dict()
    with torch.no_grad():
        for name, tensor in dst.items():
            if ".ffn." not in name and name in src:
                tensor.copy_(src[name])
        for i, blk in enumerate(model.layers):
            dense_ffn = dense.layers[i].ffn
            if not blk.is_moe:
                blk.ffn.load_state_dict(dense_ffn.state_dict())
                continue
            # Dense nn.Linear weights are [out, in]; stacked experts are [E, in, out].
            w_gate, w_up, w_down = (dense_ffn.w_gate.weight.T, dense_ffn.w_up.weight.T, dense_ffn.w_down.weight.T)
            n_paths = 2 if blk.ffn.shared is not None else 1
            blk.ffn.experts.w_gate.copy_(w_gate.expand_as(blk.ffn.experts.w_gate))
            blk.ffn.experts.w_up.copy_(w_up.expand_as(blk.ffn.experts.w_up))
            blk.ffn.experts.w_down.copy_((w_down / n_paths).expand_as(blk.ffn.experts.w_down))
            if blk.ffn.shared is not None:
                for n in range(moe_config.num_shared_experts):
                    rows = slice(n * cfg.d_ff, (n + 1) * cfg.d_ff)
                    blk.ffn.shared.w_gate.weight[rows].copy_(dense_ffn.w_gate.weight)
                    blk.ffn.shared.w_up.weight[rows].copy_(dense_ffn.w_up.weight)
                    blk.ffn.shared.w_down.weight[:, rows].copy_(
                        dense_ffn.w_down.weight / (n_paths * moe_config.num_shared_experts)
                    )
    return model
