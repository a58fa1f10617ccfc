"""Parameter and FLOP accounting against the real modules and torch's FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.core.accounting import count_params, flops_per_token, train_flops_per_token
from moekit.core.config import ModelConfig
from moekit.core.model import Transformer

DENSE_CONFIGS = [
    dict(vocab_size=272, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=172, max_seq_len=64),
    dict(vocab_size=500, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=256, max_seq_len=128),
    dict(
        vocab_size=272, d_model=128, n_layers=1, n_heads=8, n_kv_heads=1, d_ff=344, max_seq_len=32, tie_embeddings=False
    ),
]


def measured_flops_per_token(model: Transformer, B: int, T: int) -> float:
    """FlopCounterMode's forward FLOPs per token; the math SDPA backend runs attention as bmm's, which it counts
    (CPU fused kernels are not)."""
    x = torch.randint(0, model.cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops() / (B * T)


def assert_params_and_flops_exact(cfg: ModelConfig, T: int = 32) -> None:
    model = Transformer(cfg).eval()
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())
    measured = measured_flops_per_token(model, 2, T)
    assert abs(flops_per_token(cfg, T) - measured) / measured < 0.02, (flops_per_token(cfg, T), measured)


@pytest.mark.parametrize("kw", DENSE_CONFIGS)
def test_param_count_matches_modules(kw):
    cfg = ModelConfig(**kw)
    model = Transformer(cfg)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert pc.active == pc.total


@pytest.mark.parametrize("kw", DENSE_CONFIGS)
def test_forward_flops_match_flop_counter(kw):
    cfg = ModelConfig(**kw)
    model = Transformer(cfg).eval()
    T = cfg.max_seq_len
    measured = measured_flops_per_token(model, 2, T)
    assert abs(flops_per_token(cfg, T) - measured) / measured < 0.02, (flops_per_token(cfg, T), measured)
    assert train_flops_per_token(cfg, T) == 3 * flops_per_token(cfg, T)


def test_training_flops_are_three_times_forward():
    cfg = ModelConfig(**DENSE_CONFIGS[0])
    model = Transformer(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x[:, :-1], labels=x[:, 1:]).loss.backward()
    measured = fc.get_total_flops() / x[:, :-1].numel()
    # Backward skips the input-embedding grad matmul only; within 2% of 3x forward.
    expected = train_flops_per_token(cfg, cfg.max_seq_len - 1)
    assert abs(expected - measured) / measured < 0.02, (expected, measured)


MOE_CONFIGS = [
    dict(num_experts=4, top_k=2, d_expert=48),
    dict(num_experts=8, top_k=1, d_expert=96, router="switch"),
    dict(num_experts=16, top_k=4, d_expert=24, num_shared_experts=1, d_shared=32),  # fine-grained + shared
    dict(num_experts=4, top_k=2, d_expert=48, every_n_layers=2, router="noisy_topk", router_noise=1.0),
    dict(num_experts=4, top_k=2, d_expert=48, router="expert_choice", capacity_factor=1.5),
    dict(num_experts=4, top_k=1, d_expert=48, router="expert_choice", capacity_factor=0.5),
]


@pytest.mark.parametrize("moe_kw", MOE_CONFIGS)
@pytest.mark.parametrize("dispatch", ["reference", "sorted"])
def test_moe_params_and_flops_are_exact(moe_kw, dispatch):
    from moekit.moe.config import MoEConfig
    from moekit.moe.layer import set_dispatch

    cfg = ModelConfig(**DENSE_CONFIGS[0], moe=MoEConfig(**moe_kw))
    # A training forward (what matching and MFU count): noisy_topk's noise projection runs only there.
    model = Transformer(cfg).train()
    set_dispatch(model, dispatch)
    pc = count_params(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    # Active = total minus the routed experts a token does not use.
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    unused = moe_layers * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * cfg.d_model * cfg.moe.d_expert
    assert pc.active == pc.total - unused
    # Exact: FlopCounterMode counts the matmuls the formula counts (expert choice: 2 x 16 tokens make every
    # capacity ceil(cf * 32 * k / 4) a whole number).
    assert flops_per_token(cfg, 16) == measured_flops_per_token(model, 2, 16)


ATTENTION_OPTIONS = [
    dict(qkv_bias=True, out_bias=True),
    dict(qk_norm="head", head_dim=24),  # Qwen3: head_dim != d_model / n_heads
    dict(qk_norm="full", clip_qkv=1.0),  # OLMoE
    dict(rope_scaling=dict(factor=8.0, original_max_seq_len=16)),
    dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_seq_len=16)),
    dict(qkv_bias=True, qk_norm="head", head_dim=8, n_kv_heads=1),
    dict(embed_scale=12.0, residual_scale=0.22, attn_scale=0.05, logit_divisor=8.0),  # Granite: elementwise only
]


@pytest.mark.parametrize("opts", ATTENTION_OPTIONS)
def test_attention_options_params_and_flops_are_exact(opts):
    cfg = ModelConfig(**{**DENSE_CONFIGS[1], **opts})
    assert_params_and_flops_exact(cfg)
    if "head_dim" in opts:  # the head width really enters the count
        assert flops_per_token(cfg, 32) != flops_per_token(ModelConfig(**DENSE_CONFIGS[1]), 32)


def test_gated_shared_expert_params_and_flops_are_exact():
    from moekit.moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, top_k=2, d_expert=6, num_shared_experts=1, d_shared=10, shared_gate=True)
    cfg = ModelConfig(**DENSE_CONFIGS[0], moe=moe)
    assert_params_and_flops_exact(cfg, T=16)
    ungated = ModelConfig(**DENSE_CONFIGS[0], moe=MoEConfig(**{**moe.to_dict(), "shared_gate": False}))
    assert count_params(cfg).total - count_params(ungated).total == 2 * cfg.d_model  # [1, D] gate in 2 layers


MLA_OPTIONS = [
    dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),  # V2-Lite
    dict(kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16),  # V3
]


@pytest.mark.parametrize("mla", MLA_OPTIONS)
def test_latent_attention_params_and_flops_are_exact(mla):
    from moekit.core.config import MLAConfig

    base = {**DENSE_CONFIGS[1], "n_kv_heads": None}
    cfg = ModelConfig(**base, mla=MLAConfig(**mla))
    assert_params_and_flops_exact(cfg)
    # Each width enters the count: widening any one changes both numbers.
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        wider = ModelConfig(**base, mla=MLAConfig(**{**mla, name: mla[name] + 2}))
        assert count_params(wider).total > count_params(cfg).total
        assert flops_per_token(wider, 32) > flops_per_token(cfg, 32)


def test_deepseek_shaped_model_params_and_flops_are_exact():
    """MLA with the q bottleneck, a dense first layer, then MoE with shared experts, groups and the selection bias
    (a buffer, not a parameter)."""
    from moekit.core.config import MLAConfig
    from moekit.moe.config import MoEConfig

    moe = MoEConfig(num_experts=8, top_k=3, d_expert=6, num_shared_experts=2, score_func="sigmoid", n_group=4,
                    topk_group=2, routed_scaling_factor=2.5, selection_bias=True, layers=[1, 2])  # fmt: skip
    cfg = ModelConfig(**{**DENSE_CONFIGS[1], "n_kv_heads": None}, mla=MLAConfig(**MLA_OPTIONS[1]), moe=moe)
    assert_params_and_flops_exact(cfg, T=16)
