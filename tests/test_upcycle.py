"""Sparse upcycling reproduces the dense model's function at initialisation."""

import pytest
import torch

from moekit.core.config import ModelConfig
from moekit.core.model import Transformer
from moekit.moe.config import MoEConfig
from moekit.moe.upcycling import upcycle


def dense_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32)
    return Transformer(cfg).double().eval()


@pytest.mark.parametrize(
    "moe_kw",
    [
        dict(num_experts=4, top_k=2),
        dict(num_experts=8, top_k=3, score_func="sigmoid"),
        dict(num_experts=4, top_k=2, num_shared_experts=2),
        dict(num_experts=4, top_k=2, every_n_layers=2),
    ],
)
def test_upcycled_logits_equal_dense(moe_kw):
    dense = dense_model()
    moe = upcycle(dense, MoEConfig(d_expert=48, renormalize=True, router_dtype="float64", **moe_kw), seed=1).eval()
    assert any(blk.is_moe for blk in moe.layers)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-10, atol=1e-10)


def test_without_renormalisation_it_differs():
    # Guards the test above: the equality really depends on the top-k weights summing to one.
    dense = dense_model()
    moe = upcycle(dense, MoEConfig(num_experts=4, top_k=2, d_expert=48, renormalize=False), seed=1).eval()
    x = torch.randint(0, 97, (2, 16))
    assert not torch.allclose(moe(x).logits, dense(x).logits)


def test_upcycle_rejects_width_mismatch():
    with pytest.raises(ValueError, match="d_expert"):
        upcycle(dense_model(), MoEConfig(num_experts=4, top_k=2, d_expert=32))
