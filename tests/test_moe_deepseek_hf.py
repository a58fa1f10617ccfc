"""Layer-level truth for the DeepSeek converters: transformers' DeepseekV3MoE / DeepseekV2Moe with random
weights, copied into moekit's MoELayer (routed + shared experts, group-limited routing, correction bias,
routed_scaling_factor), compute the same output in float32."""

from __future__ import annotations

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

D, F, E, SHARED = 16, 8, 8, 2
SHAPE = dict(hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, n_shared_experts=SHARED, num_attention_heads=2)


def _randomise(block: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:  # large enough to change which experts (and groups) win
            bias.copy_(torch.randn(bias.shape, generator=gen) * 0.3)


def _moekit_layer(block: torch.nn.Module, cfg: MoEConfig) -> MoELayer:
    layer = MoELayer(D, cfg).eval()
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2F, D], [E, D, F]
    sh = block.shared_experts
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        if layer.router.expert_bias is not None:
            layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        layer.experts.w_gate.copy_(gate_up[:, :F].transpose(1, 2))
        layer.experts.w_up.copy_(gate_up[:, F:].transpose(1, 2))
        layer.experts.w_down.copy_(down.transpose(1, 2))
        # HF's shared MLP is one SwiGLU of width n_shared * F: moekit's fused shared experts, same layout.
        layer.shared.w_gate.weight.copy_(sh.gate_proj.weight)
        layer.shared.w_up.weight.copy_(sh.up_proj.weight)
        layer.shared.w_down.weight.copy_(sh.down_proj.weight)
    return layer


def _cfg(hf_kw: dict, **routing) -> MoEConfig:
    shape = dict(num_experts=E, top_k=hf_kw["num_experts_per_tok"], d_expert=F, num_shared_experts=SHARED, d_shared=F)
    return MoEConfig(**shape, **routing)


def _compare(block: torch.nn.Module, cfg: MoEConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    _randomise(block, gen)
    layer = _moekit_layer(block.eval(), cfg)
    x = torch.randn(3, 7, D, generator=gen)
    with torch.no_grad():
        want = block(x)
        got = layer(x).y
        # the routing itself, not just the sum: same experts per token
        _, hf_w, hf_idx = block.gate(x)
        r = layer.route(x.reshape(-1, D))
    k = cfg.top_k
    assert torch.equal(hf_idx.sort(1).values, r.expert_a.view(-1, k).sort(1).values)
    order_hf, order_mk = hf_idx.argsort(1), r.expert_a.view(-1, k).argsort(1)
    torch.testing.assert_close(r.weight_a.view(-1, k).gather(1, order_mk), hf_w.gather(1, order_hf))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


V3_CASES = [
    dict(n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(n_group=2, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.7),
    dict(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=1.0),
]


@pytest.mark.parametrize("hf_kw", V3_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_deepseek_v3_moe_equals_moekit_layer(hf_kw: dict, seed: int):
    hf_cfg = transformers.DeepseekV3Config(**SHAPE, **hf_kw)
    cfg = _cfg(
        hf_kw,
        score_func="sigmoid",
        renormalize=hf_kw["norm_topk_prob"],
        n_group=hf_kw["n_group"],
        topk_group=hf_kw["topk_group"],
        group_score="top2_sum",
        routed_scaling_factor=hf_kw["routed_scaling_factor"],
        selection_bias=True,
    )
    _compare(DeepseekV3MoE(hf_cfg), cfg, seed)


@pytest.mark.parametrize(
    "hf_kw",
    [
        dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3),
        dict(topk_method="group_limited_greedy", n_group=2, topk_group=1, num_experts_per_tok=2),
        dict(topk_method="greedy", n_group=None, topk_group=None, num_experts_per_tok=2),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_deepseek_v2_moe_equals_moekit_layer(hf_kw: dict, seed: int):
    # V2's router never renormalises (norm_topk_prob is unused there) and scales by routed_scaling_factor.
    hf_cfg = transformers.DeepseekV2Config(**SHAPE, **hf_kw, routed_scaling_factor=16.0)
    cfg = _cfg(
        hf_kw,
        score_func="softmax",
        renormalize=False,
        n_group=hf_kw["n_group"] or 1,
        topk_group=hf_kw["topk_group"],
        group_score="max",
        routed_scaling_factor=16.0,
    )
    _compare(DeepseekV2Moe(hf_cfg), cfg, seed)


def test_the_comparison_sees_a_wrong_group_rule():
    # V3 groups by top-2 sum; moekit told to group by max routes some token differently at this seed.
    hf_cfg = transformers.DeepseekV3Config(
        **SHAPE, n_group=4, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5
    )
    cfg = MoEConfig(
        num_experts=E, top_k=2, d_expert=F, num_shared_experts=SHARED, d_shared=F, score_func="sigmoid",
        n_group=4, topk_group=1, group_score="max", routed_scaling_factor=2.5, selection_bias=True,
    )  # fmt: skip
    with pytest.raises(AssertionError):
        _compare(DeepseekV3MoE(hf_cfg), cfg, 0)
