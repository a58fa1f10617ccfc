"""Sparse upcycling reproduces the dense model's function at initialisation, without importing moekit.core."""

import ast
from pathlib import Path

import pytest
import torch

from moekit.core.config import ModelConfig
from moekit.core.model import Transformer
from moekit.moe.config import MoEConfig
from moekit.moe.upcycling import function_preserving, upcycle

D_FF = 48


def dense_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=D_FF, max_seq_len=32)
    return Transformer(cfg).double().eval()


EXACT = [
    dict(num_experts=4, top_k=2),
    dict(num_experts=8, top_k=3, score_func="sigmoid"),
    dict(num_experts=4, top_k=2, num_shared_experts=1),
    dict(num_experts=4, top_k=2, num_shared_experts=2),
    dict(num_experts=4, top_k=2, every_n_layers=2),
    dict(num_experts=4, top_k=1, topk_order="topk_then_softmax"),  # top-1 whose weight is exactly 1
    dict(num_experts=1, top_k=1),  # a single softmax expert: weight exactly 1
    dict(num_experts=4, top_k=2, bias_update_rate=0.01),  # the bias moves the selection only
    dict(num_experts=4, top_k=2, num_shared_experts=1, shared_gate=True),  # zero gate, doubled shared w_down
    dict(num_experts=4, top_k=2, num_shared_experts=2, shared_gate=True, routed_scaling_factor=0.5),
    # DeepSeek-V3 routing: groups, scaled weights, fixed selection bias, shared experts
    dict(
        num_experts=8,
        top_k=3,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        selection_bias=True,
        num_shared_experts=2,
    ),  # fmt: skip
    dict(num_experts=8, top_k=2, n_group=4, topk_group=1, group_score="max", routed_scaling_factor=16.0),
]
INEXACT = [
    dict(num_experts=4, top_k=2, renormalize=False),
    dict(num_experts=4, top_k=1),  # top-1 is never renormalised (MoEConfig): weight = router probability
    dict(num_experts=4, top_k=2, capacity_factor=0.5),  # drops assignments
    dict(num_experts=4, top_k=2, eval_capacity_factor=0.25),  # dropless training, but drops in eval mode
    dict(num_experts=1, top_k=1, score_func="sigmoid"),
    dict(num_experts=8, top_k=2, n_group=4, topk_group=1, renormalize=False, routed_scaling_factor=2.5),
]


def make(moe_kw, seed=1):
    kw = dict(d_expert=D_FF, renormalize=True, router_dtype="float64") | moe_kw
    return upcycle(dense_model(), MoEConfig(**kw), seed=seed)


@pytest.mark.parametrize("moe_kw", EXACT)
def test_upcycled_logits_equal_dense(moe_kw):
    dense = dense_model()
    moe = make(moe_kw)
    assert function_preserving(moe.cfg.moe) == (True, "")
    assert type(moe) is Transformer and any(blk.is_moe for blk in moe.layers)
    assert not moe.training and moe.embed.weight.dtype == torch.float64
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-10, atol=1e-10)
    # Also with the training-mode forward (jitter-free here) the function is the dense one.
    torch.testing.assert_close(moe.train()(x).logits, dense(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("moe_kw", INEXACT)
def test_inexact_configs_differ_and_say_why(moe_kw):
    # Guards the test above: equality really depends on weights summing to one and nothing dropped.
    dense = dense_model()
    moe = make(moe_kw)
    ok, why = function_preserving(moe.cfg.moe)
    assert not ok and why
    x = torch.randint(0, 97, (2, 16))
    assert not torch.allclose(moe(x).logits, dense(x).logits, rtol=1e-6, atol=1e-6)


def test_weights_are_copies():
    dense = dense_model()
    moe = make(dict(num_experts=4, top_k=2, num_shared_experts=2, every_n_layers=2))
    d_blk, m_blk = dense.layers[1], moe.layers[1]
    assert m_blk.is_moe and not moe.layers[0].is_moe
    for e in range(4):
        assert torch.equal(m_blk.ffn.experts.w_gate[e], d_blk.ffn.w_gate.weight.T)
        assert torch.equal(m_blk.ffn.experts.w_up[e], d_blk.ffn.w_up.weight.T)
        assert torch.equal(m_blk.ffn.experts.w_down[e], d_blk.ffn.w_down.weight.T / 2)
    shared = m_blk.ffn.shared
    assert torch.equal(shared.w_gate.weight, torch.cat([d_blk.ffn.w_gate.weight] * 2))
    assert torch.equal(shared.w_down.weight, torch.cat([d_blk.ffn.w_down.weight / 4] * 2, dim=1))
    assert torch.equal(moe.layers[0].ffn.w_gate.weight, dense.layers[0].ffn.w_gate.weight)  # stays dense
    assert torch.equal(moe.layers[2].attn.q_proj.weight, dense.layers[2].attn.q_proj.weight)
    assert torch.equal(moe.embed.weight, dense.embed.weight) and moe.lm_head.weight is moe.embed.weight


def test_seed_sets_router_without_touching_global_rng():
    dense = dense_model()
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=D_FF)
    state = torch.random.get_rng_state()
    a, b, c = (upcycle(dense, cfg, seed=s).layers[0].ffn.router.weight for s in (5, 5, 6))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_upcycle_rejects_bad_inputs():
    with pytest.raises(ValueError, match="d_expert"):
        upcycle(dense_model(), MoEConfig(num_experts=4, top_k=2, d_expert=32))
    with pytest.raises(ValueError, match="d_shared"):
        upcycle(dense_model(), MoEConfig(num_experts=4, top_k=2, d_expert=D_FF, num_shared_experts=1, d_shared=16))
    moe = make(dict(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="dense model"):
        upcycle(moe, MoEConfig(num_experts=4, top_k=2, d_expert=D_FF))
    with pytest.raises(TypeError, match=r"\.cfg"):
        upcycle(torch.nn.Linear(2, 2), MoEConfig(num_experts=4, top_k=2, d_expert=D_FF))


def test_upcycling_imports_nothing_from_core():
    # moekit.moe is a leaf: upcycling is duck-typed on the model instead of importing Transformer/ModelConfig.
    import moekit.moe.upcycling as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and all(
        m == "__future__" or not m.startswith("moekit.") or m.startswith("moekit.moe.") for m in imported
    )


def test_shared_gate_starts_at_one_half_and_learns():
    moe = make(dict(num_experts=4, top_k=2, num_shared_experts=1, shared_gate=True)).train()
    gates = [blk.ffn.shared_gate.weight for blk in moe.layers]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in gates)
    moe(torch.randint(0, 97, (2, 8))).logits.sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)


def test_upcycled_converted_qwen2_equals_the_dense_checkpoint(tmp_path):
    """A dense HF checkpoint (Qwen2: q/k/v biases, tied embeddings) converted by moekit.core.hf, then
    upcycled with Qwen2-MoE- and DeepSeek-style routing: the logits are the dense model's at initialisation."""
    transformers = pytest.importorskip("transformers")
    from moekit.core.hf import load_hf

    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-2, rope_theta=500.0,
        tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-zero biases, so that a lost bias shows
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    hf.save_pretrained(tmp_path / "hf")
    dense = load_hf(tmp_path / "hf").eval()
    assert dense.cfg.qkv_bias and dense.cfg.tie_embeddings
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, hf(x).logits, rtol=1e-4, atol=1e-4)
    dense = dense.double()
    want = dense(x).logits
    for moe_kw in (
        dict(num_experts=4, top_k=2, num_shared_experts=1, shared_gate=True, layers=[1, 2]),
        dict(
            num_experts=8, top_k=2, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
            selection_bias=True, num_shared_experts=1, layers=[1, 2],  # layer 0 dense: first_k_dense_replace=1
        ),
    ):  # fmt: skip
        moe = upcycle(dense, MoEConfig(d_expert=40, router_dtype="float64", **moe_kw), seed=3)
        assert [blk.is_moe for blk in moe.layers] == [False, True, True]
        assert torch.equal(moe.layers[1].attn.q_proj.bias, dense.layers[1].attn.q_proj.bias)
        torch.testing.assert_close(moe(x).logits, want, rtol=1e-10, atol=1e-10)
