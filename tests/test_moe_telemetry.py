"""Routing telemetry: counts against brute force, group breakdown, dead experts, logging helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import reference_keep
from moekit.moe.layer import MoELayer
from moekit.moe.telemetry import summarize_routing

D = 8


def _layer(**kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 8, "router_dtype": "float64", **kw})
    torch.manual_seed(0)
    return MoELayer(D, cfg, init_std=1.0).double()


@pytest.mark.parametrize("policy", ["score", "position"])
def test_counts_match_brute_force(policy: str):
    layer = _layer(capacity_factor=0.75, drop_policy=policy)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, mask)
    r = layer.route(x.view(-1, D), mask.view(-1))
    cap = layer.cfg.capacity(int(mask.sum()), training=True)
    keep = reference_keep(r.token_a, r.expert_a, r.score_a, r.valid_a, 4, cap, policy)
    s = out.stats
    assert s.tokens_per_expert.tolist() == [float((keep & (r.expert_a == e)).sum()) for e in range(4)]
    assert s.routed_assignments.item() == 10 * 2
    assert s.tokens_per_expert.sum().item() == s.routed_assignments.item() - s.dropped_assignments.item()
    assert s.drop_rate.item() == pytest.approx(s.dropped_assignments.item() / 20)
    kept_tokens = set(r.token_a[keep].tolist())
    assert s.dropped_tokens.item() == sum(1 for n in mask.view(-1).nonzero().flatten().tolist() if n not in kept_tokens)


def test_group_breakdown():
    layer = _layer(capacity_factor=1.0)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    groups = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, -1, 7, 0]])  # -1 and 7: not counted
    out = layer(x, group_ids=groups)
    by_group = out.stats.tokens_per_expert_by_group
    assert by_group.shape == (3, 4)
    r = layer.route(x.view(-1, D))
    keep = reference_keep(r.token_a, r.expert_a, r.score_a, r.valid_a, 4, layer.cfg.capacity(12, True), "score")
    g_a = groups.view(-1)[r.token_a]
    for g in range(3):
        for e in range(4):
            assert by_group[g, e].item() == float((keep & (g_a == g) & (r.expert_a == e)).sum())
    in_range = layer(x, group_ids=groups.clamp(0, 2)).stats
    torch.testing.assert_close(in_range.tokens_per_expert_by_group.sum(0), in_range.tokens_per_expert)
    assert _layer(num_groups=5)(x, group_ids=groups).stats.tokens_per_expert_by_group.shape == (5, 4)
    assert out.stats.tokens_per_expert_by_group is not None and layer(x).stats.tokens_per_expert_by_group is None


def test_dead_expert_counter():
    layer = _layer(top_k=3, dead_expert_window=3)  # experts 0-2 always chosen
    with torch.no_grad():
        layer.router.weight[3] = -10.0  # positive inputs never pick expert 3
    x = torch.randn(2, 6, D, dtype=torch.float64).abs()
    deads = [layer(x).stats.dead_experts.item() for _ in range(4)]
    assert deads == [0, 0, 1, 1]
    assert layer.steps_since_used[3].item() == 4
    layer.eval()
    layer(x)
    assert layer.steps_since_used[3].item() == 4  # eval forwards do not age experts
    layer.train()
    with torch.no_grad():
        layer.router.weight[3] = 10.0  # now expert 3 is in every top-3
    assert layer(x).stats.dead_experts.item() == 0
    assert layer.steps_since_used[3].item() == 0


def test_uniform_router_entropy_is_log_e():
    layer = _layer()
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(1, 5, D, dtype=torch.float64))
    assert out.stats.router_entropy.item() == pytest.approx(math.log(4))


def test_router_entropy_matches_special_entr_with_zero_probabilities():
    """Reserved experts give other groups' tokens probability exactly 0 (0 log 0 = 0, not NaN); telemetry's
    entropy and its per-group split equal torch.special.entr's, token by token over real tokens."""
    layer = _layer(modality_experts=[1, 1], num_groups=3)  # experts 0 / 1 reserved for groups 0 / 1
    x = torch.randn(2, 6, D, dtype=torch.float64)
    groups = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 1, 0, 2]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    s = layer(x, mask, group_ids=groups).stats
    r = layer.route(x.view(-1, D), mask.view(-1), group_n=groups.view(-1))
    assert (r.probs_ne == 0).any()
    h_n = torch.special.entr(r.probs_ne).sum(-1)
    real = mask.view(-1)
    assert s.router_entropy.item() == pytest.approx(h_n[real].mean().item(), rel=1e-6)
    for g in range(3):
        in_g = real & (groups.view(-1) == g)
        assert s.router_entropy_by_group[g].item() == pytest.approx(h_n[in_g].mean().item(), rel=1e-6)


def test_imbalance_properties_and_logging():
    layer = _layer()
    out = layer(torch.randn(2, 6, D, dtype=torch.float64))
    s = out.stats
    load = s.tokens_per_expert
    assert s.load_imbalance.item() == pytest.approx(load.max().item() / load.mean().item())
    assert s.load_cv.item() == pytest.approx(load.std(unbiased=False).item() / load.mean().item())
    d = s.to_dict()
    json.dumps(d)
    assert d["tokens_per_expert"] == load.tolist() and isinstance(d["drop_rate"], float)
    other = _layer(capacity_factor=0.5)(torch.randn(2, 6, D, dtype=torch.float64)).stats
    summary = summarize_routing([s, other], prefix="moe/")
    json.dumps(summary)
    assert summary["moe/drop_rate"] == pytest.approx((s.drop_rate.item() + other.drop_rate.item()) / 2)
    assert summary["moe/load_imbalance_max"] == pytest.approx(max(s.load_imbalance.item(), other.load_imbalance.item()))
    assert summary["moe/dropped_tokens"] == s.dropped_tokens.item() + other.dropped_tokens.item()
    assert summarize_routing([]) == {}
