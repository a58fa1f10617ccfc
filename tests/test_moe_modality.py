"""Per-modality routing: modality expert groups, LIMoE entropy losses, modality purity, per-group telemetry."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.experts import grouped_mm_supported
from moekit.moe.layer import MoELayer
from moekit.moe.losses import global_entropy_loss, local_entropy_loss
from moekit.moe.modality import allowed_experts_table, mean_purity, modality_expert_ranges, modality_purity
from moekit.moe.telemetry import summarize_routing

D = 8
GROUPS = [3, 2, 2]  # E = 8: experts 0-2 text, 3-4 image, 5-6 audio, 7 common to all
ALLOWED = {0: {0, 1, 2, 7}, 1: {3, 4, 7}, 2: {5, 6, 7}}


def _inputs(dtype=torch.float64, b=3, t=7):
    gen = torch.Generator().manual_seed(0)
    x_btd = torch.randn(b, t, D, generator=gen, dtype=dtype)
    group_bt = torch.randint(0, 3, (b, t), generator=gen)
    mask_bt = torch.ones(b, t, dtype=torch.bool)
    mask_bt[0, -2:] = False
    mask_bt[2, :1] = False
    return x_btd, group_bt, mask_bt


def _layer(**kw) -> MoELayer:
    base = dict(num_experts=8, top_k=2, d_expert=4, modality_experts=GROUPS, router_dtype="model")
    base.update(kw)
    torch.default_generator.manual_seed(0)
    return MoELayer(D, MoEConfig(**base), init_std=0.5).double()


# ---------------------------------------------------------------- config and tables
@pytest.mark.parametrize(
    ("kw", "field", "hint"),
    [
        ({"modality_experts": [2, 2, 2, 2]}, "modality_experts", "num_groups=3"),
        ({"modality_experts": [4, 4, 1]}, "modality_experts", "more than num_experts=8"),
        ({"modality_experts": [4, 4, 0]}, "modality_experts", "groups [2]"),
        ({"modality_experts": [3, -1]}, "modality_experts", ">= 0"),
        ({"modality_experts": []}, "modality_experts", "non-empty"),
        ({"local_entropy_coef": -0.1}, "local_entropy_coef", ">= 0"),
        ({"global_entropy_coef": -1}, "global_entropy_coef", ">= 0"),
        ({"global_entropy_threshold": 0.0}, "global_entropy_threshold", "> 0"),
        ({"entropy_groups": [0, 3]}, "entropy_groups", "num_groups=3"),
    ],
)
def test_config_errors_name_the_field(kw, field, hint):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}=") as err:
        MoEConfig(num_experts=8, top_k=2, **kw)
    assert hint in str(err.value)


def test_expert_choice_groups_need_one_expert_only():
    cfg = MoEConfig(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0, modality_experts=[3, 1])
    assert cfg.modality_experts == [3, 1]
    assert MoEConfig(entropy_groups=[2, 1, 2]).entropy_group_ids == [1, 2]
    assert MoEConfig().entropy_group_ids == [0, 1, 2]


def test_expert_ranges_and_table_by_hand():
    ranges, common = modality_expert_ranges([2, 0, 1], 6)
    assert ranges == [range(0, 2), range(2, 2), range(2, 3)] and common == range(3, 6)
    table = allowed_experts_table([2, 0, 1], 6)
    want = [
        [1, 1, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],  # a group with no reserved experts uses the common ones
        [0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],  # ids outside [0, 3)
    ]
    assert table.tolist() == [[bool(v) for v in row] for row in want]


# ---------------------------------------------------------------- tokens stay inside their group
ROUTER_CASES = {
    "topk-softmax": {},
    "topk-sigmoid": {"score_func": "sigmoid"},
    "mixtral-order": {"topk_order": "topk_then_softmax"},
    "switch": {"router": "switch", "top_k": 1, "router_jitter": 0.1},
    "noisy": {"router": "noisy_topk", "router_noise": 1.0},
    "capacity": {"capacity_factor": 0.5},
    "aux-free-bias": {"bias_update_rate": 0.1},
    "expert-choice": {"router": "expert_choice", "capacity_factor": 2.0},
}


@pytest.mark.parametrize("case", ROUTER_CASES, ids=list(ROUTER_CASES))
def test_tokens_never_leave_their_groups_experts(case):
    layer = _layer(**ROUTER_CASES[case]).train()
    if layer.router.expert_bias is not None:  # make every forbidden expert as attractive as possible
        layer.router.expert_bias.fill_(-100.0)
        layer.router.expert_bias[[2, 4, 6]] = 100.0
    x_btd, group_bt, mask_bt = _inputs()
    group_bt[1, 3] = 7  # an id without reserved experts: may use any expert
    routing = layer.route(x_btd.reshape(-1, D), mask_bt.reshape(-1), group_bt.reshape(-1))
    group_a = group_bt.reshape(-1)[routing.token_a]
    checked = 0
    for g, e, valid in zip(group_a.tolist(), routing.expert_a.tolist(), routing.valid_a.tolist()):
        if valid and g in ALLOWED:
            assert e in ALLOWED[g], (g, e)
            checked += 1
    assert checked > 10
    probs = routing.probs_ne
    for g, allowed in ALLOWED.items():
        rows = group_bt.reshape(-1) == g
        forbidden = [e for e in range(8) if e not in allowed]
        assert bool((probs[rows][:, forbidden] == 0).all())
        torch.testing.assert_close(probs[rows].sum(-1), torch.ones(int(rows.sum()), dtype=probs.dtype))
    out = layer(x_btd, token_mask=mask_bt, group_ids=group_bt)
    assert torch.isfinite(out.y).all() and torch.isfinite(out.aux_loss)
    by_group = out.stats.tokens_per_expert_by_group  # kept assignments: the same rule after capacity
    for g, allowed in ALLOWED.items():
        assert all(by_group[g, e] == 0 for e in range(8) if e not in allowed)


def test_no_group_ids_means_group_zero_and_unmasked_layers_ignore_groups():
    layer = _layer().eval()
    x_btd, group_bt, mask_bt = _inputs()
    routing = layer.route(x_btd.reshape(-1, D), mask_bt.reshape(-1))
    assert set(routing.expert_a.tolist()) <= ALLOWED[0]
    text = layer.route(x_btd.reshape(-1, D), mask_bt.reshape(-1), torch.zeros(21, dtype=torch.long))
    assert torch.equal(routing.expert_a, text.expert_a)
    shared = _layer(modality_experts=None)
    a = shared.route(x_btd.reshape(-1, D), None, group_bt.reshape(-1))
    b = shared.route(x_btd.reshape(-1, D), None, None)
    assert torch.equal(a.expert_a, b.expert_a) and torch.equal(a.probs_ne, b.probs_ne)
    assert len(set(a.expert_a.tolist())) > 4  # shared routing reaches across the groups' blocks


# ---------------------------------------------------------------- reference vs fast dispatch with groups
def _matrix() -> list[MoEConfig]:
    cfgs = []
    for kw, shared in itertools.product(ROUTER_CASES.values(), (0, 1)):
        base = dict(num_experts=8, top_k=2, d_expert=4, modality_experts=GROUPS, router_dtype="model")
        base.update(kw, num_shared_experts=shared, d_shared=4, z_loss_coef=0.01, local_entropy_coef=0.05)
        base.update(global_entropy_coef=0.05, global_entropy_threshold=1.0)
        cfgs.append(MoEConfig(**base))
    return cfgs


MATRIX = _matrix()


def _run(cfg: MoEConfig, impl: str, state, x_btd, mask_bt, group_bt, proj):
    layer = MoELayer(D, cfg, dispatch=impl).to(x_btd.dtype)
    layer.load_state_dict(state)
    layer.train()
    x = x_btd.clone().requires_grad_(True)
    torch.default_generator.manual_seed(1234)  # same noise / jitter draws for every implementation
    out = layer(x, token_mask=mask_bt, group_ids=group_bt)
    assert layer.resolve_dispatch(x) == impl
    ((out.y * proj).sum() + out.aux_loss).backward()
    return out, {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def _check_same(cfg: MoEConfig, dtype, impls, atol, rtol):
    x_btd, group_bt, mask_bt = _inputs(dtype)
    proj = torch.randn(x_btd.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    torch.default_generator.manual_seed(0)
    state = MoELayer(D, cfg, init_std=0.5).to(dtype).state_dict()
    (out_a, g_a), (out_b, g_b) = (_run(cfg, i, state, x_btd, mask_bt, group_bt, proj) for i in impls)
    assert torch.equal(out_a.stats.tokens_per_expert_by_group, out_b.stats.tokens_per_expert_by_group)
    torch.testing.assert_close(out_b.y, out_a.y, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_b.aux_loss, out_a.aux_loss, atol=atol, rtol=rtol)
    for name, g in g_a.items():
        assert g is not None and torch.isfinite(g).all(), name
        torch.testing.assert_close(g_b[name], g, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "cfg", MATRIX, ids=lambda c: f"{c.router}-{c.score_func}-cap{c.capacity_factor}-sh{c.num_shared_experts}"
)
def test_sorted_matches_reference_with_groups_float64(cfg):
    _check_same(cfg, torch.float64, ("reference", "sorted"), atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not grouped_mm_supported(torch.device("cpu"), torch.float32, D, 4), reason="no _grouped_mm")
@pytest.mark.parametrize("cfg", MATRIX[::3], ids=lambda c: f"{c.router}-cap{c.capacity_factor}")
def test_grouped_mm_matches_sorted_with_groups_float32(cfg):
    _check_same(cfg, torch.float32, ("sorted", "grouped_mm"), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- LIMoE entropy losses by hand
# 5 tokens, 3 experts; token 3 is padding; groups [0, 0, 1, 0, 2]; expert 2 masked for token 0 (p = 0).
PROBS = torch.tensor(
    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5], [0.25, 0.25, 0.5]],
    dtype=torch.float64,
)
GROUP_N = torch.tensor([0, 0, 1, 0, 2])
MASK_N = torch.tensor([True, True, True, False, True])
H_03 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of group 0's mean [0.75, 0.25, 0]
H_EDGE = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))  # [0.25, 0.25, 0.5]


def test_local_entropy_by_hand():
    got = local_entropy_loss(PROBS, GROUP_N, MASK_N, [0, 1, 2])
    torch.testing.assert_close(got, torch.tensor([math.log(2) / 2, math.log(3), H_EDGE], dtype=torch.float64))
    # padding ignored: without the mask token 3 joins group 0
    h3 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert local_entropy_loss(PROBS, GROUP_N, None, [0])[0].item() == pytest.approx((math.log(2) + h3) / 3)
    # a group without tokens gives 0; group_n=None puts every real token in group 0
    assert local_entropy_loss(PROBS, GROUP_N, MASK_N, [5]).tolist() == [0.0]
    all_real = (0 + math.log(2) + math.log(3) + H_EDGE) / 4
    assert local_entropy_loss(PROBS, None, MASK_N, [0])[0].item() == pytest.approx(all_real)


def test_global_entropy_by_hand_with_and_without_threshold():
    got = global_entropy_loss(PROBS, GROUP_N, MASK_N, [0, 1, 2, 5])
    want = [-H_03, -math.log(3), -H_EDGE, 0.0]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    tau = 1.0  # H_03 = 0.562 < 1 < ln 3 = 1.099: only group 0 is below the threshold; group 5 is empty
    got = global_entropy_loss(PROBS, GROUP_N, MASK_N, [0, 1, 2, 5], threshold=tau)
    torch.testing.assert_close(got, torch.tensor([tau - H_03, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_entropy_losses_have_finite_gradients_through_masked_softmax():
    logits = torch.tensor([[2.0, -math.inf, 0.5], [0.1, 0.2, -math.inf]], dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    loss = local_entropy_loss(probs, None, None, [0]).sum() + global_entropy_loss(probs, None, None, [0]).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 2] == 0
    # local gradient descent sharpens the routing of a token
    x = torch.tensor([[0.3, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    local_entropy_loss(torch.softmax(x, -1), None, None, [0]).sum().backward()
    sharper = torch.softmax(x - 0.5 * x.grad, -1)
    assert sharper.max() > torch.softmax(x, -1).max()


def test_layer_weights_entropy_losses_into_aux():
    layer = _layer(local_entropy_coef=0.3, global_entropy_coef=0.7, entropy_groups=[1, 2], z_loss_coef=0.0)
    x_btd, group_bt, mask_bt = _inputs()
    out = layer(x_btd, token_mask=mask_bt, group_ids=group_bt)
    routing = layer.route(x_btd.reshape(-1, D), mask_bt.reshape(-1), group_bt.reshape(-1))
    local = local_entropy_loss(routing.probs_ne, group_bt.reshape(-1), mask_bt.reshape(-1), [1, 2]).sum()
    glob = global_entropy_loss(routing.probs_ne, group_bt.reshape(-1), mask_bt.reshape(-1), [1, 2]).sum()
    torch.testing.assert_close(out.losses["local_entropy"], local)
    torch.testing.assert_close(out.losses["global_entropy"], glob)
    want = 0.01 * out.losses["load_balance"] + 0.3 * local + 0.7 * glob
    torch.testing.assert_close(out.aux_loss, want)
    assert set(_layer()(x_btd).losses) == {"load_balance", "z"}  # off by default


# ---------------------------------------------------------------- purity and per-modality telemetry
def test_purity_by_hand():
    by_group = torch.tensor([[4.0, 0.0, 2.0, 0.0], [0.0, 3.0, 3.0, 0.0]])
    tokens = torch.tensor([2.0, 3.0])  # s = [[2, 0, 1, 0], [0, 1, 1, 0]]
    assert modality_purity(by_group, tokens).tolist() == [1.0, 1.0, 0.5, 0.0]
    assert mean_purity(by_group, tokens).item() == pytest.approx((2 + 1 + 1) / (2 + 1 + 2))
    # normalising by token counts: 6 text tokens sending 6 assignments and 2 image tokens sending 2 to the
    # same expert is an even split, not 75% text
    assert modality_purity(torch.tensor([[6.0], [2.0]]), torch.tensor([6.0, 2.0])).tolist() == [0.5]
    # an absent modality is left out
    absent = modality_purity(torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0, 2.0]))
    assert absent.tolist() == pytest.approx([1 / 1.5, 1.0])


@pytest.mark.parametrize(
    "kw", [{"modality_experts": None}, {"capacity_factor": 0.5}, {}], ids=["shared", "drops", "groups"]
)
def test_per_modality_telemetry_sums_to_overall(kw):
    layer = _layer(**kw).train()
    x_btd, group_bt, mask_bt = _inputs()
    s = layer(x_btd, token_mask=mask_bt, group_ids=group_bt).stats
    assert torch.equal(s.tokens_per_expert_by_group.sum(0), s.tokens_per_expert)
    assert s.tokens_by_group.sum() == s.num_tokens == mask_bt.sum()
    real_counts = [int(((group_bt == g) & mask_bt).sum()) for g in range(3)]
    assert s.tokens_by_group.tolist() == real_counts
    torch.testing.assert_close((s.router_entropy_by_group * s.tokens_by_group).sum() / s.num_tokens, s.router_entropy)
    if "capacity_factor" in kw:
        assert s.dropped_assignments > 0
    d = s.to_dict()
    json.dumps(d)
    assert len(d["modality_purity"]) == 8 and 0 <= d["mean_modality_purity"] <= 1
    if kw == {}:  # with reserved blocks only the common expert 7 can mix modalities
        assert all(p == 1.0 for e, p in enumerate(d["modality_purity"]) if e != 7 and s.tokens_per_expert[e] > 0)
    summary = summarize_routing([s, s])
    assert summary["moe/modality_purity"] == pytest.approx(d["mean_modality_purity"])


def test_no_group_ids_no_group_telemetry():
    s = _layer(modality_experts=None)(_inputs()[0]).stats
    assert s.tokens_by_group is None and s.modality_purity is None and "modality_purity" not in s.to_dict()
    assert "moe/modality_purity" not in summarize_routing([s])


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_forbidden_expert_never_selected_when_allowed_scores_underflow(score_func):
    """One logit 200 above the rest: the other allowed experts' scores underflow to exactly 0, the forbidden
    experts' score. Without a selection bias they were not masked to -inf, and top-k picked a forbidden one
    (E=4, modality_experts=[2, 1]: group 0 token selected [0, 2])."""
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=4, modality_experts=[2, 1], score_func=score_func)
    layer = MoELayer(4, cfg).train()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x_btd = (200.0 * torch.eye(4)).repeat(2, 1)[None]  # [1, 8, 4]: each expert hot once per group
    group_bt = torch.tensor([[0] * 4 + [1] * 4])
    allowed = {0: {0, 1, 3}, 1: {2, 3}}
    routing = layer.route(x_btd.reshape(-1, 4), None, group_bt.reshape(-1))
    for g, experts in zip(group_bt.reshape(-1).tolist(), routing.expert_idx_nk.tolist()):
        assert set(experts) <= allowed[g], (g, experts)
    by_group = layer(x_btd, group_ids=group_bt).stats.tokens_per_expert_by_group
    for g, ok in allowed.items():
        assert all(by_group[g, e] == 0 for e in range(4) if e not in ok), (g, by_group[g])
