"""DeepSeek routing: group-limited top-k, routed_scaling_factor and the fixed selection bias, against a slow
per-token reference (float64, weights and gradients) and the config rules."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.router import Router

D, N = 6, 9


def _reference(cfg: MoEConfig, router: Router, x_nd: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Per token, plain Python over groups and experts: (selected experts sorted by id, their weights)."""
    logits = x_nd @ router.weight.T
    bias = router.expert_bias if router.expert_bias is not None else torch.zeros(cfg.num_experts, dtype=x_nd.dtype)
    m = cfg.num_experts // cfg.n_group
    chosen, weights = [], []
    for n in range(x_nd.shape[0]):
        row = logits[n]
        score = torch.sigmoid(row) if cfg.score_func == "sigmoid" else torch.softmax(row, dim=0)
        sel = [score[e].item() + bias[e].item() for e in range(cfg.num_experts)]
        group_scores = []
        for g in range(cfg.n_group):
            members = sorted(sel[g * m : (g + 1) * m], reverse=True)
            group_scores.append(members[0] if cfg.group_score == "max" else members[0] + members[1])
        n_keep = cfg.n_group if cfg.topk_group is None else cfg.topk_group
        kept = sorted(range(cfg.n_group), key=lambda g: -group_scores[g])[:n_keep]
        candidates = [e for g in kept for e in range(g * m, (g + 1) * m)]
        top = sorted(sorted(candidates, key=lambda e: -sel[e])[: cfg.top_k])
        if cfg.topk_order == "topk_then_softmax":
            w = torch.softmax(row[top], dim=0)
        else:
            w = score[top]
            if cfg.renormalize and cfg.top_k > 1:
                w = w / w.sum()
        chosen.append(top)
        weights.append(w * cfg.routed_scaling_factor)
    return chosen, weights


CASES = [
    dict(score_func="sigmoid", group_score="top2_sum", selection_bias=True, routed_scaling_factor=2.5),
    dict(score_func="sigmoid", group_score="top2_sum", topk_group=1, top_k=2),
    dict(score_func="sigmoid", group_score="max", renormalize=False, routed_scaling_factor=0.7),
    dict(score_func="softmax", group_score="max", renormalize=False, routed_scaling_factor=16.0),
    dict(score_func="softmax", group_score="top2_sum", selection_bias=True),
    dict(score_func="softmax", group_score="max", topk_order="topk_then_softmax", routed_scaling_factor=1.5),
    dict(score_func="softmax", group_score="top2_sum", n_group=2, topk_group=1, router="noisy_topk", router_noise=0.3),
    dict(score_func="sigmoid", group_score="max", n_group=6, topk_group=2, top_k=3, bias_update_rate=0.01),
    dict(score_func="softmax", n_group=1, topk_group=None, routed_scaling_factor=3.0),
]


def _case(kw: dict) -> MoEConfig:
    base = dict(num_experts=12, top_k=4, d_expert=4, n_group=4, topk_group=2, router_dtype="float64")
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_group_limited_topk_matches_per_token_reference_float64(kw: dict):
    cfg = _case(kw)
    torch.manual_seed(0)
    router = Router(D, cfg, init_std=1.0).double().eval()  # eval: noisy top-k adds no noise
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.randn(cfg.num_experts, dtype=torch.float64) * 0.3)
    x_nd = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    mask_n = torch.ones(N, dtype=torch.bool)
    mask_n[-2:] = False  # padding: same selection, marked invalid
    r = router(x_nd, mask_n)
    chosen, weights = _reference(cfg, router, x_nd)

    e_nk = r.expert_a.view(N, cfg.top_k)
    order = e_nk.argsort(dim=1)
    assert e_nk.gather(1, order).tolist() == chosen
    w_nk = r.weight_a.view(N, cfg.top_k).gather(1, order)
    w_ref = torch.stack(weights)
    torch.testing.assert_close(w_nk, w_ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(r.valid_a, mask_n.repeat_interleave(cfg.top_k))
    # score_a: unbiased, unscaled, detached router scores of the selected experts
    logits = (x_nd @ router.weight.T).detach()
    scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
    torch.testing.assert_close(r.score_a.view(N, -1), scores.gather(1, e_nk), rtol=1e-12, atol=0)
    assert not r.score_a.requires_grad

    proj = torch.randn(N, cfg.top_k, dtype=torch.float64)
    (g_x, g_w) = torch.autograd.grad((w_nk * proj).sum(), (x_nd, router.weight))
    (r_x, r_w) = torch.autograd.grad((w_ref * proj).sum(), (x_nd, router.weight))
    torch.testing.assert_close(g_x, r_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, r_w, rtol=1e-10, atol=1e-12)


def test_group_limit_really_restricts_the_choice():
    # The reference test above must not pass just because the best experts happen to share groups.
    cfg = _case(dict(score_func="sigmoid", topk_group=1, top_k=2))
    free = MoEConfig(**{**cfg.to_dict(), "n_group": 1, "topk_group": None})
    torch.manual_seed(0)
    router = Router(D, cfg, init_std=1.0).double()
    x_nd = torch.randn(64, D, dtype=torch.float64)
    grouped = router(x_nd).expert_a.view(64, 2)
    unconstrained = Router(D, free).double()
    unconstrained.load_state_dict(router.state_dict())
    plain = unconstrained(x_nd).expert_a.view(64, 2)
    assert (grouped // 3 == grouped[:, :1] // 3).all()  # one group of 3 experts per token
    assert (plain // 3 != plain[:, :1] // 3).any()


def test_selection_bias_is_persistent_and_fixed():
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=4, score_func="sigmoid", selection_bias=True)
    router = Router(D, cfg)
    assert "expert_bias" in router.state_dict() and router.load_counts is None
    router.expert_bias[2] = 5.0
    x_nd = torch.randn(N, D)
    r = router.train()(x_nd)
    assert (r.expert_a.view(N, 2) == 2).any(1).all()
    router.record_load(r)
    router.update_bias()  # no aux-loss-free update without bias_update_rate
    assert router.expert_bias.tolist() == [0.0, 0.0, 5.0, 0.0]
    plain = Router(D, MoEConfig(num_experts=4, top_k=2, d_expert=4, score_func="sigmoid"))
    assert "expert_bias" not in plain.state_dict()


def test_old_config_dicts_load_with_the_defaults():
    saved = MoEConfig(num_experts=4, top_k=2, d_expert=4).to_dict()
    for name in ("n_group", "topk_group", "group_score", "routed_scaling_factor", "selection_bias"):
        saved.pop(name)
    cfg = MoEConfig.from_dict(saved)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.selection_bias) == (1, None, 1.0, False)
    assert not cfg.grouped_routing


@pytest.mark.parametrize(
    ("kw", "field", "hint"),
    [
        ({"n_group": 3}, "n_group", "divides num_experts=8"),
        ({"n_group": 0}, "n_group", ">= 1"),
        ({"n_group": 2, "topk_group": 3}, "topk_group", "[1, n_group=2]"),
        ({"n_group": 2, "topk_group": 0}, "topk_group", "[1, n_group=2]"),
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, "topk_group", "top_k=3"),
        ({"group_score": "mean"}, "group_score", "max, top2_sum"),
        ({"n_group": 8, "top_k": 2}, "group_score", ">= 2 experts per group"),
        ({"n_group": 2, "router": "switch", "top_k": 1}, "n_group", "router"),
        (
            {"n_group": 2, "router": "expert_choice", "capacity_factor": 1.0},
            "n_group",
            "topk",
        ),
        ({"n_group": 2, "modality_experts": [2, 2]}, "n_group", "modality_experts"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor", "> 0"),
        ({"routed_scaling_factor": math.inf}, "routed_scaling_factor", "finite"),
        (
            {"routed_scaling_factor": 2.0, "router": "expert_choice", "capacity_factor": 1.0},
            "routed_scaling_factor",
            "expert_choice",
        ),
        ({"selection_bias": 1}, "selection_bias", "true or false"),
        ({"selection_bias": True, "router": "expert_choice", "capacity_factor": 1.0}, "selection_bias", "token"),
    ],
)
def test_deepseek_fields_errors_name_the_field(kw, field, hint):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}=") as err:
        MoEConfig(**{"num_experts": 8, "top_k": 2, "d_expert": 4, **kw})
    assert hint in str(err.value)


def test_ungrouped_configs_mask_nothing():
    # n_group=1 (the default) and topk_group=n_group mask nothing: valid for every router.
    assert not MoEConfig(num_experts=8, top_k=1, d_expert=4, router="switch").grouped_routing
    assert not MoEConfig(num_experts=8, top_k=2, d_expert=4, n_group=2, topk_group=2).grouped_routing
