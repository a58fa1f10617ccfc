"""Auxiliary losses: formulas by hand, padding excluded, coefficients applied by the layer."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer
from moekit.moe.losses import assignment_counts, load_balance_loss, router_z_loss


def test_load_balance_is_one_at_uniform_routing():
    e, k, n = 4, 2, 8
    probs = torch.full((n, e), 1.0 / e)
    idx = torch.arange(n * k).view(n, k) % e  # every expert gets n*k/e assignments
    assert load_balance_loss(probs, idx).item() == pytest.approx(1.0, abs=1e-7)


def test_load_balance_is_num_experts_when_collapsed():
    e, n = 4, 6
    probs = torch.zeros(n, e)
    probs[:, 2] = 1.0
    idx = torch.full((n, 1), 2)
    assert load_balance_loss(probs, idx).item() == pytest.approx(e)


def test_load_balance_by_hand_with_padding():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.9, 0.05, 0.05]])
    idx = torch.tensor([[0], [1], [0]])
    mask = torch.tensor([True, True, False])
    # real tokens 0, 1: f = [1/2, 1/2, 0], P = [0.4, 0.4, 0.2] -> 3 * (0.2 + 0.2) = 1.2
    assert load_balance_loss(probs, idx, mask).item() == pytest.approx(1.2)
    assert assignment_counts(idx, 3, mask).tolist() == [1.0, 1.0, 0.0]
    counts = torch.tensor([3.0, 1.0, 0.0])  # e.g. summed over ranks: f = [3/4, 1/4, 0]
    got = load_balance_loss(probs, idx, mask, counts_e=counts).item()
    assert got == pytest.approx(3 * (0.75 * 0.4 + 0.25 * 0.4))


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0], [50.0, 50.0]])
    z0, z1 = math.log(1 + 3), math.log(math.exp(1.0) + math.exp(-2.0))
    mask = torch.tensor([True, True, False])
    assert router_z_loss(logits, mask).item() == pytest.approx((z0**2 + z1**2) / 2, rel=1e-6)
    z2 = 50.0 + math.log(2.0)
    assert router_z_loss(logits).item() == pytest.approx((z0**2 + z1**2 + z2**2) / 3, rel=1e-6)


def _layer(**kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 8, "router_dtype": "float64", **kw})
    torch.manual_seed(0)
    return MoELayer(8, cfg, init_std=0.5).double()


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_padding_does_not_affect_losses(router: str):
    layer = _layer(router=router, capacity_factor=1.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, mask)
    x_garbage = x.masked_fill(~mask[..., None], 1e3)  # padded values must not matter at all
    out_garbage = layer(x_garbage, mask)
    out_real = layer(x[mask][None], None)
    for name in ("load_balance", "z"):
        torch.testing.assert_close(out.losses[name], out_real.losses[name])
        torch.testing.assert_close(out_garbage.losses[name], out_real.losses[name])


def test_aux_loss_applies_coefficients():
    layer = _layer(load_balance_coef=0.3, z_loss_coef=0.05)
    out = layer(torch.randn(3, 4, 8, dtype=torch.float64))
    lb, z = out.losses["load_balance"], out.losses["z"]
    assert lb.item() > 0 and z.item() > 0
    torch.testing.assert_close(out.aux_loss, 0.3 * lb + 0.05 * z)
    off = _layer(load_balance_coef=0.0, z_loss_coef=0.0)(torch.randn(3, 4, 8, dtype=torch.float64))
    assert off.aux_loss.item() == 0.0 and off.losses["load_balance"].item() > 0


def test_expert_choice_has_no_balance_loss():
    out = _layer(router="expert_choice", capacity_factor=1.0, z_loss_coef=0.1)(
        torch.randn(2, 4, 8, dtype=torch.float64)
    )
    assert out.losses["load_balance"].item() == 0.0
    torch.testing.assert_close(out.aux_loss, 0.1 * out.losses["z"])
