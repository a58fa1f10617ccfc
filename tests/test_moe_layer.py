"""MoELayer: padding semantics, capacity bounds, shared experts, aux-loss-free balancing, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer, MoEOutput, update_router_biases

D = 8


def _layer(seed: int = 0, init_std: float = 0.5, dispatch: str = "auto", **kw) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 8, "router_dtype": "float64", **kw})
    torch.manual_seed(seed)
    return MoELayer(D, cfg, dispatch=dispatch, init_std=init_std).double()


def _swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


MASK = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"capacity_factor": 0.5, "drop_policy": "score"},
        {"capacity_factor": 0.5, "drop_policy": "position"},
        {"router": "expert_choice", "capacity_factor": 1.0},
        {"router": "switch", "top_k": 1, "capacity_factor": 1.0},
        {"num_shared_experts": 1, "capacity_factor": 1.0, "dispatch": "reference"},
        {"num_experts": 8, "n_group": 4, "topk_group": 2, "score_func": "sigmoid", "selection_bias": True},
        {"num_experts": 8, "n_group": 4, "topk_group": 1, "routed_scaling_factor": 2.5, "capacity_factor": 1.0},
    ],
)
def test_padded_tokens_are_invisible(kw):
    """Real tokens get exactly what they get with the padding cut out; a padded token's output is zero, the
    shared experts' part included (they see padding zeroed, so a NaN pad cannot reach their weight grads)."""
    layer = _layer(**kw)
    x = torch.randn(2, 6, D, dtype=torch.float64).masked_fill(~MASK[..., None], 100.0)
    out = layer(x, MASK)
    cut = layer(x[MASK][None])
    torch.testing.assert_close(out.y[MASK], cut.y[0])
    assert torch.equal(out.stats.tokens_per_expert, cut.stats.tokens_per_expert)
    assert out.stats.num_tokens.item() == MASK.sum().item()
    assert torch.equal(out.y[~MASK], torch.zeros_like(out.y[~MASK]))


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5])
def test_no_expert_exceeds_capacity(router: str, factor: float):
    k = 1 if router == "switch" else 2
    layer = _layer(router=router, top_k=k, capacity_factor=factor, init_std=2.0)  # skewed routing
    out = layer(torch.randn(2, 6, D, dtype=torch.float64), MASK)
    cap = layer.cfg.capacity(int(MASK.sum()), training=True)
    assert out.stats.tokens_per_expert.max().item() <= cap
    if router != "expert_choice":
        assert out.stats.routed_assignments.item() == MASK.sum().item() * k


def test_dropless_never_drops():
    layer = _layer(init_std=3.0)  # very skewed router: one expert would blow any capacity
    out = layer(torch.randn(4, 8, D, dtype=torch.float64))
    assert out.stats.dropped_assignments.item() == 0 and out.stats.dropped_tokens.item() == 0
    assert out.stats.tokens_per_expert.sum().item() == 4 * 8 * 2


def test_eval_capacity_factor_applies_in_eval():
    layer = _layer(capacity_factor=0.5, eval_capacity_factor=4.0, init_std=2.0)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    assert layer.train()(x).stats.dropped_assignments.item() > 0
    assert layer.eval()(x).stats.dropped_assignments.item() == 0


def test_single_expert_is_a_dense_swiglu():
    layer = _layer(num_experts=1, top_k=1, num_shared_experts=2, d_shared=3)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    ex, sh = layer.experts, layer.shared
    # Two shared experts = the two halves of the fused hidden layer, summed.
    shared = sum(
        _swiglu(x, sh.w_gate.weight[s].T, sh.w_up.weight[s].T, sh.w_down.weight[:, s].T)
        for s in (slice(0, 3), slice(3, 6))
    )
    want = _swiglu(x, ex.w_gate[0], ex.w_up[0], ex.w_down[0]) + shared  # softmax over one expert = 1
    out = layer(x)
    assert isinstance(out, MoEOutput) and out.y.shape == x.shape
    torch.testing.assert_close(out.y, want)


def test_init_std_and_output_projection_std():
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=128, num_shared_experts=1)
    torch.manual_seed(0)
    layer = MoELayer(128, cfg, init_std=0.05, out_init_std=0.01)
    for p, std in [
        (layer.router.weight, 0.05),
        (layer.experts.w_gate, 0.05),
        (layer.experts.w_up, 0.05),
        (layer.experts.w_down, 0.01),
        (layer.shared.w_down.weight, 0.01),
    ]:
        assert p.std().item() == pytest.approx(std, rel=0.1)
    assert tuple(layer.experts.w_gate.shape) == (4, 128, 128) and tuple(layer.experts.w_down.shape) == (4, 128, 128)


def _skewed_balancing_layer(rate: float) -> MoELayer:
    layer = _layer(num_experts=4, top_k=1, bias_update_rate=rate, init_std=0.1)
    with torch.no_grad():
        layer.router.weight[0] += 0.15  # expert 0 wins for most inputs with a positive mean
    return layer


def test_aux_loss_free_bias_moves_toward_balance():
    layer = _skewed_balancing_layer(rate=0.01)
    x = torch.randn(16, 8, D, dtype=torch.float64).abs()
    first = layer(x).stats.load_imbalance.item()
    assert first > 3.0
    for _ in range(20):
        layer(x)
        update_router_biases(nn.Sequential(nn.Identity(), layer))
    assert layer.router.expert_bias[0].item() < 0 < layer.router.expert_bias[1:].max().item()
    assert layer(x).stats.load_imbalance.item() < first / 2


def test_bias_counts_accumulate_over_micro_batches_and_reset():
    layer = _skewed_balancing_layer(rate=0.1)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    a = layer(x[:1]).stats.tokens_per_expert
    b = layer(x[1:], torch.tensor([[True, True, True, False, False]])).stats.tokens_per_expert
    assert torch.equal(layer.router.load_counts, (a + b).long())
    counts = layer.router.load_counts.double()
    layer.update_bias()
    torch.testing.assert_close(layer.router.expert_bias, 0.1 * torch.sign(counts.mean() - counts))
    assert layer.router.load_counts.sum().item() == 0
    layer.eval()(x)  # eval forwards record nothing, so the next update is a no-op
    bias = layer.router.expert_bias.clone()
    layer.update_bias()
    assert torch.equal(layer.router.expert_bias, bias)
    assert "router.expert_bias" in layer.state_dict() and "router.load_counts" not in layer.state_dict()


def test_bias_update_sign_from_exact_counts_in_a_bf16_layer():
    """Counts of 257 and 256 are equal in bf16 (8 bits of mantissa): the sign must come from the integers."""
    layer = _skewed_balancing_layer(rate=0.01).to(torch.bfloat16)
    layer.router.load_counts.copy_(torch.tensor([257, 256, 256, 255]))  # mean 256: over, at, at, under
    layer.update_bias()
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.01, 0.0, 0.0, 0.01], rel=1e-2)


def test_layer_trains_on_toy_regression():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.5, num_shared_experts=1)
    layer = MoELayer(D, cfg, init_std=0.2)
    x = torch.randn(4, 16, D)
    target = torch.tanh(x @ torch.randn(D, D))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    router_init = layer.router.weight.detach().clone()
    losses = []
    for _ in range(30):
        out = layer(x)
        loss = F.mse_loss(out.y, target)
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.allclose(layer.router.weight, router_init)


def test_global_balance_scope_single_rank(tmp_path):
    """balance_scope='global' sums counts over ranks; with one rank it must equal the local result."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x = torch.randn(2, 6, D, dtype=torch.float64)
        local, glob = _skewed_balancing_layer(0.1), _skewed_balancing_layer(0.1)
        glob.cfg.balance_scope = "global"
        out_local, out_global = local(x), glob(x)
        torch.testing.assert_close(out_global.losses["load_balance"], out_local.losses["load_balance"])
        local.update_bias()
        glob.update_bias()
        assert torch.equal(glob.router.expert_bias, local.router.expert_bias)
        assert glob.router.expert_bias.abs().sum() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_sigmoid_scores_that_underflow_give_finite_outputs_and_losses(router: str):
    """Every logit at -120: float32 sigmoid scores are exactly 0, and the unguarded normalisations (probs_ne and
    the top-k renormalisation) were 0 / 0, so the weights, y, the load-balance loss and the gradients were NaN."""
    extra = {"capacity_factor": 1.0} if router == "expert_choice" else {"bias_update_rate": 0.01}
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=4, score_func="sigmoid", router=router, **extra)
    layer = MoELayer(4, cfg).train()
    with torch.no_grad():
        layer.router.weight.fill_(-30.0)  # x of ones: every logit -120
    x_btd = torch.ones(1, 3, 4, requires_grad=True)
    out = layer(x_btd)
    assert torch.isfinite(out.y).all() and torch.isfinite(out.aux_loss)
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    assert torch.isfinite(out.stats.router_entropy)  # telemetry reads probs_ne too (expert choice included)
    (out.y.sum() + out.aux_loss).backward()
    assert torch.isfinite(x_btd.grad).all() and torch.isfinite(layer.router.weight.grad).all()


@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_global_balance_scope_all_reduces_only_an_optimised_loss(monkeypatch, coef: float):
    """balance_scope='global' with load_balance_coef=0 (aux-loss-free) ran an all-reduce in every forward for a
    loss nothing optimises. Now it reports the local value and runs no collective; with coef > 0 it still does."""
    calls = []

    def fake_all_reduce(t, *args, **kwargs):  # a world of 2 identical ranks: the sum doubles the counts
        calls.append(t.shape)
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    local, glob = (_layer(num_experts=4, top_k=2, load_balance_coef=coef, balance_scope=s) for s in ("local", "global"))
    glob.load_state_dict(local.state_dict())
    out_local, out_global = local(x), glob(x)
    assert len(calls) == (1 if coef > 0 else 0)
    # f_e is a fraction of the counts: doubling every rank's counts leaves the value unchanged.
    torch.testing.assert_close(out_global.losses["load_balance"], out_local.losses["load_balance"])
    torch.testing.assert_close(out_global.aux_loss, out_local.aux_loss)
