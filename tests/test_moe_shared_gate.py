"""The sigmoid-gated shared expert (Qwen2-MoE): both dispatch paths against a per-token float64 reference,
outputs and every gradient; config validation (accounting: tests/test_accounting.py)."""

import pytest
import torch
import torch.nn.functional as F

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

D = 12
CFG = dict(num_experts=4, top_k=2, d_expert=6, num_shared_experts=1, d_shared=10, shared_gate=True, z_loss_coef=0.0)


def per_token_reference(layer: MoELayer, x_nd: torch.Tensor) -> torch.Tensor:
    """Each token on its own: its routed experts' weighted SwiGLUs plus sigmoid(g . x) times the shared SwiGLU."""
    routing = layer.route(x_nd)
    ex, sh = layer.experts, layer.shared
    rows = []
    for n in range(x_nd.shape[0]):
        x = x_nd[n]
        y = (F.silu(x @ sh.w_gate.weight.T) * (x @ sh.w_up.weight.T)) @ sh.w_down.weight.T
        y = torch.sigmoid(x @ layer.shared_gate.weight[0]) * y
        for a in (routing.token_a == n).nonzero().flatten().tolist():
            e = routing.expert_a[a]
            h = F.silu(x @ ex.w_gate[e]) * (x @ ex.w_up[e])
            y = y + routing.weight_a[a].to(x.dtype) * (h @ ex.w_down[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("impl", ["reference", "sorted"])
def test_gated_shared_expert_matches_per_token_reference_float64(impl):
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(**CFG, router_dtype="float64"), dispatch=impl, init_std=0.5).double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    fast = layer(x).y
    ref = per_token_reference(layer, x.reshape(-1, D)).view_as(fast)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(fast)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert layer.shared_gate.weight.shape == (1, D)


def test_the_gate_changes_the_output():
    torch.manual_seed(1)
    gated = MoELayer(D, MoEConfig(**CFG)).eval()
    plain = MoELayer(D, MoEConfig(**{**CFG, "shared_gate": False})).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    x = torch.randn(1, 4, D)
    assert not torch.allclose(gated(x).y, plain(x).y)


def test_gate_without_shared_experts_is_refused():
    with pytest.raises(ValueError, match="MoEConfig.shared_gate=True is invalid: .*num_shared_experts >= 1"):
        MoEConfig(num_experts=4, top_k=2, shared_gate=True)
    with pytest.raises(ValueError, match="MoEConfig.shared_gate='yes' is invalid"):
        MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, shared_gate="yes")
