"""Routers: selection and weights against hand computations from the logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.moe.config import MoEConfig
from moekit.moe.router import Router, capacity_tensor

D, N = 6, 7


def _router(**kw) -> tuple[Router, torch.Tensor]:
    cfg = MoEConfig(**{"num_experts": 5, "top_k": 2, "d_expert": 4, "router_dtype": "float64", **kw})
    torch.manual_seed(0)
    router = Router(D, cfg, init_std=1.0).double()
    x_nd = torch.randn(N, D, dtype=torch.float64)
    return router, x_nd


def _by_token(routing, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] experts and weights, each row sorted by expert id (selection order is not part of the API)."""
    e_nk = routing.expert_a.view(-1, k)
    w_nk = routing.weight_a.view(-1, k)
    order = e_nk.argsort(dim=1)
    return e_nk.gather(1, order), w_nk.gather(1, order)


def _expected(sel_ne: torch.Tensor, w_ne: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sel_ne.topk(k, dim=1).indices.sort(dim=1).values
    return idx, w_ne.gather(1, idx)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_then_topk(renormalize: bool):
    router, x = _router(renormalize=renormalize)
    r = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    idx, w = _expected(probs, probs, 2)
    if renormalize:
        w = w / w.sum(1, keepdim=True)
    e_nk, w_nk = _by_token(r, 2)
    assert torch.equal(e_nk, idx)
    torch.testing.assert_close(w_nk, w)
    torch.testing.assert_close(r.probs_ne, probs)


def test_topk_then_softmax_is_softmax_over_selected_logits():
    router, x = _router(topk_order="topk_then_softmax", renormalize=False)
    logits = x @ router.weight.T
    idx = logits.topk(2, dim=1).indices.sort(dim=1).values
    w = torch.softmax(logits.gather(1, idx), dim=1)
    e_nk, w_nk = _by_token(router(x), 2)
    assert torch.equal(e_nk, idx)
    torch.testing.assert_close(w_nk, w)


def test_sigmoid_scores_renormalised():
    router, x = _router(score_func="sigmoid", renormalize=True)
    s = torch.sigmoid(x @ router.weight.T)
    idx, w = _expected(s, s, 2)
    r = router(x)
    e_nk, w_nk = _by_token(r, 2)
    assert torch.equal(e_nk, idx)
    torch.testing.assert_close(w_nk, w / w.sum(1, keepdim=True))
    torch.testing.assert_close(r.probs_ne, s / s.sum(1, keepdim=True))  # distribution for the balance loss


def test_switch_weight_is_the_raw_top1_probability():
    router, x = _router(router="switch", top_k=1, renormalize=True)  # renormalize would pin it at 1.0
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    r = router(x)
    assert torch.equal(r.expert_a, probs.argmax(1))
    torch.testing.assert_close(r.weight_a, probs.max(1).values)
    assert (r.weight_a < 1).all()


def test_switch_jitter_multiplies_the_input_in_training_only():
    router, x = _router(router="switch", top_k=1, router_jitter=0.2)
    router.eval()
    torch.testing.assert_close(router(x).logits_ne, x @ router.weight.T)
    router.train()
    torch.manual_seed(5)
    r = router(x)
    torch.manual_seed(5)
    u = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(r.logits_ne, (x * u) @ router.weight.T)
    assert not torch.allclose(r.logits_ne, x @ router.weight.T)


def test_noisy_topk_adds_learned_noise_in_training_only():
    router, x = _router(router="noisy_topk", router_noise=0.7, topk_order="topk_then_softmax")
    with torch.no_grad():
        router.w_noise.normal_()
    clean = x @ router.weight.T
    router.eval()
    e_eval, w_eval = _by_token(router(x), 2)
    assert torch.equal(e_eval, _expected(clean, clean, 2)[0])
    router.train()
    torch.manual_seed(3)
    r = router(x)
    torch.manual_seed(3)
    noisy = clean + torch.randn(N, 5, dtype=torch.float64) * F.softplus(x @ router.w_noise.T) * 0.7
    idx = noisy.topk(2, dim=1).indices.sort(dim=1).values
    e_nk, w_nk = _by_token(r, 2)
    assert torch.equal(e_nk, idx)
    torch.testing.assert_close(w_nk, torch.softmax(noisy.gather(1, idx), dim=1))
    torch.testing.assert_close(r.logits_ne, clean)  # z-loss sees the clean logits
    assert not torch.equal(e_nk, e_eval) or not torch.allclose(w_nk, w_eval)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_choice_each_expert_takes_its_top_c_real_tokens(score_func: str):
    router, x = _router(router="expert_choice", capacity_factor=1.0, score_func=score_func)
    mask = torch.tensor([True, True, False, True, True, False, True])
    r = router(x, mask)
    logits = x @ router.weight.T
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    c = router.cfg.capacity(int(mask.sum()), training=True)  # ceil(5 * 2 / 5) = 2
    assert c == 2
    real = mask.nonzero().flatten().tolist()
    for e in range(5):
        mine = r.valid_a & (r.expert_a == e)
        want = sorted(sorted(real, key=lambda n, e=e: -scores[n, e].item())[:c])
        assert sorted(r.token_a[mine].tolist()) == want
        torch.testing.assert_close(r.weight_a[mine], scores[r.token_a[mine], e])
    assert r.capacity is None and r.expert_idx_nk is None


def test_aux_free_bias_changes_selection_not_weights():
    router, x = _router(bias_update_rate=0.01, renormalize=False)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    router.expert_bias[3] = 10.0  # force expert 3 into every token's top-2
    e_nk, w_nk = _by_token(router(x), 2)
    assert (e_nk == 3).any(1).all()
    torch.testing.assert_close(w_nk, probs.gather(1, e_nk))  # unbiased probabilities as weights
    assert not torch.equal(e_nk, _expected(probs, probs, 2)[0])


def test_router_math_in_float32_under_bf16_autocast():
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=4)
    torch.manual_seed(0)
    router = Router(8, cfg)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
        model_dtype = Router(8, MoEConfig(num_experts=4, top_k=2, d_expert=4, router_dtype="model"))(x.bfloat16())
    assert r.logits_ne.dtype == torch.float32 and r.weight_a.dtype == torch.float32
    torch.testing.assert_close(r.logits_ne, F.linear(x, router.weight), rtol=0, atol=0)
    assert model_dtype.logits_ne.dtype == torch.bfloat16


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 1.5, 2.0, 3.7, 1e30, 1e307])
@pytest.mark.parametrize("training", [True, False])
def test_capacity_tensor_matches_config(factor: float, training: bool):
    cfg = MoEConfig(num_experts=6, top_k=2, d_expert=4, capacity_factor=factor, eval_capacity_factor=2 * factor)
    n = torch.arange(0, 300)
    got = capacity_tensor(cfg, n, training).tolist()
    assert got == [cfg.capacity(i, training) for i in range(300)]
    assert capacity_tensor(MoEConfig(num_experts=6, top_k=2), n, training) is None
    assert max(got) <= 299  # never above the token count (a huge factor once overflowed int64)
    if factor == 1.0 and training:
        assert cfg.capacity(30, True) == math.ceil(30 * 2 / 6)  # factor 1.0 fits uniform routing exactly
