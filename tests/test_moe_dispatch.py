"""Fast dispatch paths vs the reference: outputs, keep decisions and every gradient, across the config matrix."""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit.moe import dispatch
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import auto_dispatch, reference_keep, select_capacity
from moekit.moe.experts import RoutedExperts, grouped_mm_supported
from moekit.moe.layer import MoELayer

D = 8
# torch.default_generator.manual_seed: CPU-only seeding; torch.manual_seed also queues lazy CUDA/XPU/MTIA
# seeding with a formatted stack trace, which costs more than a whole test case here.


def _matrix() -> list[MoEConfig]:
    """Every valid combination, minus combinations that differ only in fields the router ignores
    (expert choice: order/renormalize/policy; dropless: policy; top-k-then-softmax and top-1: renormalize)."""
    cfgs, seen = [], set()
    axes = itertools.product(
        ("topk", "switch", "noisy_topk", "expert_choice"),
        ("softmax", "sigmoid"),
        ("softmax_then_topk", "topk_then_softmax"),
        (True, False),
        (None, 0.5, 1.0, 1.5),
        ("score", "position"),
        (0, 2),
        (False, True),
    )
    for router, score, order, renorm, cap, policy, shared, fine in axes:
        e, k, f = (16, 4, 4) if fine else (4, 2, 8)
        k = 1 if router == "switch" else k
        try:
            cfg = MoEConfig(
                num_experts=e,
                top_k=k,
                d_expert=f,
                num_shared_experts=shared,
                d_shared=4,
                router=router,
                score_func=score,
                topk_order=order,
                renormalize=renorm,
                capacity_factor=cap,
                drop_policy=policy,
                router_noise=0.5 if router == "noisy_topk" else 0.0,
                router_jitter=0.1 if router == "switch" else 0.0,
                router_dtype="model",
                z_loss_coef=0.01,
            )
        except ValueError:
            continue
        ignored = []
        if router == "expert_choice":
            ignored = ["topk_order", "renormalize", "drop_policy"]
        elif cap is None:
            ignored = ["drop_policy"]
        if router != "expert_choice" and (order == "topk_then_softmax" or k == 1):
            ignored.append("renormalize")
        key = tuple(sorted((n, repr(v)) for n, v in cfg.to_dict().items() if n not in ignored))
        if key not in seen:
            seen.add(key)
            cfgs.append(cfg)
    return cfgs


def _deepseek_matrix() -> list[MoEConfig]:
    """DeepSeek routing (group-limited top-k, routed scaling, fixed selection bias, gated shared experts) on
    the token-choice routers, dropless and capacity-limited."""
    axes = itertools.product(("topk", "noisy_topk"), ("softmax", "sigmoid"), ("max", "top2_sum"), (None, 1.0))
    cfgs = []
    for i, (router, score, group_score, cap) in enumerate(axes):
        cfgs.append(
            MoEConfig(
                num_experts=16,
                top_k=4,
                d_expert=4,
                num_shared_experts=(0, 1, 2)[i % 3],
                d_shared=4,
                shared_gate=i % 3 == 1,
                router=router,
                score_func=score,
                renormalize=i % 2 == 0,
                capacity_factor=cap,
                router_noise=0.5 if router == "noisy_topk" else 0.0,
                router_dtype="model",
                z_loss_coef=0.01,
                n_group=4,
                topk_group=2 if i % 4 else 1,
                group_score=group_score,
                routed_scaling_factor=2.5 if i % 2 else 1.0,
                selection_bias=i % 4 != 3,
                bias_update_rate=0.01 if i % 4 == 3 else 0.0,
            )
        )
    return cfgs


MATRIX = _matrix() + _deepseek_matrix()


def _cfg_id(cfg: MoEConfig) -> str:
    return (
        f"{cfg.router}-{cfg.score_func}-{cfg.topk_order[:4]}-rn{int(cfg.renormalize)}-cap{cfg.capacity_factor}"
        f"-{cfg.drop_policy}-sh{cfg.num_shared_experts}-E{cfg.num_experts}K{cfg.top_k}"
        + (f"-G{cfg.n_group}of{cfg.topk_group}{cfg.group_score}" if cfg.n_group > 1 else "")
        + (f"-rsf{cfg.routed_scaling_factor}" if cfg.routed_scaling_factor != 1 else "")
        + ("-gate" if cfg.shared_gate else "")
    )


def _run(cfg: MoEConfig, impl: str, state: dict, x_btd: torch.Tensor, mask_bt: torch.Tensor, proj: torch.Tensor):
    layer = MoELayer(D, cfg, dispatch=impl).to(x_btd.dtype)
    layer.load_state_dict(state)
    layer.train()
    x = x_btd.clone().requires_grad_(True)
    torch.default_generator.manual_seed(1234)  # same noise / jitter draws for every implementation
    out = layer(x, token_mask=mask_bt)
    assert layer.resolve_dispatch(x) == impl
    ((out.y * proj).sum() + out.aux_loss).backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out, grads


def _inputs(dtype: torch.dtype, cfg: MoEConfig):
    gen = torch.Generator().manual_seed(0)
    x_btd = torch.randn(2, 5, D, generator=gen, dtype=dtype)
    mask_bt = torch.ones(2, 5, dtype=torch.bool)
    mask_bt[0, 4:] = False  # right padding
    mask_bt[1, :2] = False  # left padding: positions matter for drop_policy='position'
    proj = torch.randn(2, 5, D, generator=gen, dtype=dtype)
    torch.default_generator.manual_seed(0)
    state = MoELayer(D, cfg, init_std=0.5).to(dtype).state_dict()
    if "router.expert_bias" in state:  # a non-zero selection bias, so that it changes the routing
        state["router.expert_bias"] = torch.randn(cfg.num_experts, generator=gen, dtype=dtype) * 0.2
    return x_btd, mask_bt, proj, state


def _assert_same(ref, fast, atol: float, rtol: float) -> None:
    (out_r, grads_r), (out_f, grads_f) = ref, fast
    assert torch.equal(out_r.stats.tokens_per_expert, out_f.stats.tokens_per_expert)
    assert torch.equal(out_r.stats.dropped_assignments, out_f.stats.dropped_assignments)
    torch.testing.assert_close(out_f.y, out_r.y, atol=atol, rtol=rtol)
    assert grads_r.keys() == grads_f.keys()
    for name, g_ref in grads_r.items():
        assert g_ref is not None, name
        torch.testing.assert_close(grads_f[name], g_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_matrix_covers_the_axes():
    # expert choice ignores the order, and switch refuses topk_then_softmax (no task gradient at top-1)
    assert len({(c.router, c.score_func, c.topk_order) for c in MATRIX}) == 4 * 3 - 2
    assert {c.capacity_factor for c in MATRIX} == {None, 0.5, 1.0, 1.5}
    assert len(MATRIX) > 300


# 'sorted': the fused autograd node (eager), gathering all rows at once at these sizes, and per expert
# ('sorted-per-expert', the large-batch form); 'sorted_autograd': the same permutation through autograd,
# the form torch.compile traces.
@pytest.mark.parametrize("impl", ["sorted", "sorted-per-expert", "sorted_autograd", "padded_bmm"])
@pytest.mark.parametrize("cfg", MATRIX, ids=_cfg_id)
def test_sorted_matches_reference_float64(cfg: MoEConfig, impl: str, monkeypatch):
    if impl == "sorted-per-expert":
        monkeypatch.setattr(dispatch, "GATHER_ONCE_MAX_BYTES", 0)
        impl = "sorted"
    x_btd, mask_bt, proj, state = _inputs(torch.float64, cfg)
    ref = _run(cfg, "reference", state, x_btd, mask_bt, proj)
    if cfg.capacity_factor == 0.5 and cfg.router != "expert_choice":
        assert ref[0].stats.dropped_assignments > 0  # the capacity branch really drops here
    _assert_same(ref, _run(cfg, impl, state, x_btd, mask_bt, proj), atol=1e-12, rtol=1e-10)


NO_GROUPED_MM = not grouped_mm_supported(torch.device("cpu"), torch.float32, D, 4)


# _grouped_mm has no float64 kernel: float32 with a tolerance (routing is shared code, so decisions are
# identical). Every combination against the float64-verified sorted path, a sample against the reference.
@pytest.mark.skipif(NO_GROUPED_MM, reason="no _grouped_mm")
@pytest.mark.parametrize("cfg", MATRIX, ids=_cfg_id)
def test_grouped_mm_matches_sorted_float32(cfg: MoEConfig):
    x_btd, mask_bt, proj, state = _inputs(torch.float32, cfg)
    ref = _run(cfg, "sorted", state, x_btd, mask_bt, proj)
    _assert_same(ref, _run(cfg, "grouped_mm", state, x_btd, mask_bt, proj), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(NO_GROUPED_MM, reason="no _grouped_mm")
@pytest.mark.parametrize("cfg", MATRIX[::7], ids=_cfg_id)
def test_grouped_mm_matches_reference_float32(cfg: MoEConfig):
    x_btd, mask_bt, proj, state = _inputs(torch.float32, cfg)
    ref = _run(cfg, "reference", state, x_btd, mask_bt, proj)
    _assert_same(ref, _run(cfg, "grouped_mm", state, x_btd, mask_bt, proj), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "impl", ["sorted", "sorted-per-expert", "sorted_autograd", "padded_bmm", "grouped_mm", "reference"]
)
def test_bf16_autocast_close_to_float32(impl: str, monkeypatch):
    if impl == "sorted-per-expert":
        monkeypatch.setattr(dispatch, "GATHER_ONCE_MAX_BYTES", 0)
        impl = "sorted"
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=16, capacity_factor=1.0, num_shared_experts=1)
    torch.default_generator.manual_seed(0)
    layer = MoELayer(D, cfg, dispatch=impl, init_std=0.3)
    x = torch.randn(2, 6, D, requires_grad=True)
    want = layer(x).y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.y.dtype == torch.bfloat16 and out.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.y.float(), want, atol=2e-2, rtol=5e-2)
    out.y.float().sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    want.sum().backward()  # float32 gradients of the same layer
    for name, p in layer.named_parameters():
        rel = (got[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)
        assert rel < 3e-2, f"{impl} {name}: bf16 autocast grad off by {rel:.3g} (relative norm)"


@pytest.mark.parametrize("gather_once", [True, False])
def test_fused_node_backward_inside_autocast_keeps_the_forward_dtype(gather_once: bool):
    """A loss built outside autocast may be backpropagated inside it (an autocast region around the whole
    step): the fused node's backward computes in its forward's dtype (float32 here), bit for bit as outside."""
    experts = RoutedExperts(4, D, 16, init_std=0.3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=gen, requires_grad=True)
    token_a = torch.tensor([0, 3, 5, 1, 2, 4, 0, 5, 2])  # grouped by expert: 3, 0, 4, 2 rows
    scale_a = torch.rand(9, generator=gen, requires_grad=True)
    grads = []
    for autocast in (False, True):
        x.grad = scale_a.grad = None
        experts.zero_grad(set_to_none=True)
        y = experts.forward_fused(x, token_a, [3, 0, 4, 2], scale_a, torch.float32, gather_once=gather_once)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y.square().sum().backward()
        grads.append([x.grad, scale_a.grad, *(p.grad for p in experts.parameters())])
    for want, got in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_grouped_mm_backward_accepts_expanded_grad():
    if not grouped_mm_supported(torch.device("cpu"), torch.float32, D, 8):
        pytest.skip("no _grouped_mm")
    torch.default_generator.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="grouped_mm")
    x = torch.randn(3, 4, D, requires_grad=True)
    layer(x).y.sum().backward()  # sum() hands an expanded (stride-0) grad to the last matmul
    assert torch.isfinite(layer.experts.w_down.grad).all() and layer.experts.w_down.grad.abs().sum() > 0


def test_grouped_mm_falls_back_to_sorted_where_unsupported():
    layer = MoELayer(6, MoEConfig(num_experts=4, top_k=2, d_expert=6), dispatch="grouped_mm")
    assert layer.resolve_dispatch(torch.zeros(1, 6)) == "sorted"  # 6 floats: row stride not 16-byte aligned
    assert layer.resolve_dispatch(torch.zeros(1, 6, dtype=torch.float64)) == "sorted"
    auto = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="auto")
    assert auto.resolve_dispatch(torch.zeros(1, 8)) == "sorted"  # auto: grouped_mm only on CUDA bf16


def test_auto_follows_the_measured_cpu_rules():
    layer = MoELayer(64, MoEConfig(num_experts=16, top_k=2, d_expert=86))  # the demo's layer
    demo_batch = torch.zeros(32, 128, 64)  # 8,192 assignments x 64 wide: 0.5M elements
    assert layer.resolve_dispatch(demo_batch) == "sorted"  # fp32: per-expert MKL matmuls
    assert layer.resolve_dispatch(demo_batch.bfloat16()) == "padded_bmm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.resolve_dispatch(demo_batch) == "padded_bmm"  # autocast's dtype counts, not x's
    wide = MoELayer(512, MoEConfig(num_experts=8, top_k=2, d_expert=1024))
    assert wide.resolve_dispatch(torch.zeros(1, 1024, 512, dtype=torch.bfloat16)) == "padded_bmm"  # 1M
    assert wide.resolve_dispatch(torch.zeros(1, 2048, 512, dtype=torch.bfloat16)) == "sorted"  # 2M: lost
    assert wide.resolve_dispatch(torch.zeros(1, 4096, 512, dtype=torch.bfloat16)) == "sorted"  # 4M
    fine = MoELayer(512, MoEConfig(num_experts=64, top_k=16, d_expert=128))
    fine_batch = torch.zeros(1, 1024, 512, dtype=torch.bfloat16)  # 16,384 assignments, 256 per expert: 8M
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fine.resolve_dispatch(fine_batch) == "sorted"  # one thread: a tie, sorted kept
        torch.set_num_threads(2)
        assert fine.resolve_dispatch(fine_batch) == "padded_bmm"  # two threads: one bmm spreads, 64 mm do not
        assert fine.resolve_dispatch(torch.zeros(1, 2048, 512, dtype=torch.bfloat16)) == "sorted"  # 16M
        assert wide.resolve_dispatch(torch.zeros(1, 2048, 512, dtype=torch.bfloat16)) == "sorted"  # 512 per expert
    finally:
        torch.set_num_threads(threads)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert auto_dispatch(cpu, bf16, 16384, 512, False, num_experts=64, threads=2) == "padded_bmm"
    assert auto_dispatch(cpu, bf16, 16384, 512, False, num_experts=64, threads=1) == "sorted"
    # few large experts at the same load per expert and size: never measured to gain, so the one-thread rule
    assert auto_dispatch(cpu, bf16, 2048, 4096, False, num_experts=8, threads=2) == "sorted"
    choice = MoELayer(
        512, MoEConfig(num_experts=8, top_k=2, d_expert=1024, router="expert_choice", capacity_factor=2.0)
    )
    # expert choice fills E x C = 8 x 512 slots at 1,024 tokens (2M elements), not N x k = 2,048 rows (1M)
    assert choice.resolve_dispatch(torch.zeros(1, 1024, 512, dtype=torch.bfloat16)) == "sorted"
    pinned = MoELayer(64, MoEConfig(num_experts=16, top_k=2, d_expert=86), dispatch="sorted_autograd")
    assert pinned.resolve_dispatch(demo_batch.bfloat16()) == "sorted_autograd"  # a named path runs as given


# Hand-made keep rule: 6 tokens, top-1, every assignment's expert and score chosen by hand.
EXPERT_A = torch.tensor([0, 0, 1, 0, 0, 1])
SCORE_A = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.3, 0.7])
TOKEN_A = torch.arange(6)


@pytest.mark.parametrize(
    ("capacity", "policy", "valid", "expected"),
    [
        (2, "score", [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1]),  # expert 0 keeps its two 0.9s
        (1, "score", [1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 1]),  # tie 0.9/0.9 -> the earlier token
        (2, "position", [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]),  # earliest tokens win
        (2, "position", [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]),  # padded tokens take no slot
        (1, "score", [1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 1, 1]),  # padded 0.9s cannot win; 0.3 beats 0.1
        (None, "score", [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]),  # dropless keeps every real one
    ],
)
def test_keep_rule_by_hand(capacity, policy, valid, expected):
    valid_a = torch.tensor(valid, dtype=torch.bool)
    want = torch.tensor(expected, dtype=torch.bool)
    ref = reference_keep(TOKEN_A, EXPERT_A, SCORE_A, valid_a, 2, capacity, policy)
    assert torch.equal(ref, want)
    if capacity is not None:
        fast = select_capacity(EXPERT_A, SCORE_A, valid_a, 2, torch.tensor(capacity), policy)
        assert torch.equal(fast, want)


def test_padded_bmm_compiles_as_sorted():
    torch.default_generator.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=4, top_k=2, d_expert=8, capacity_factor=1.0), dispatch="padded_bmm")
    x = torch.randn(2, 6, D)
    want = layer(x).y
    seen = []

    def spy(x_nd, routing, impl=None):
        seen.append(layer.resolve_dispatch(x_nd))
        return MoELayer.dispatch(layer, x_nd, routing, impl)

    layer.dispatch = spy
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x).y
    assert seen == ["sorted"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _second_order(impl: str) -> dict[str, torch.Tensor]:
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=6)
    torch.default_generator.manual_seed(0)
    layer = MoELayer(D, cfg, dispatch=impl).double()
    torch.default_generator.manual_seed(1)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).y.sum() + (x**2).sum(), x, create_graph=True)
    (gx**2).sum().backward()  # a gradient penalty: needs the second derivative through the experts
    return {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


def test_fused_sorted_refuses_double_backward_and_names_the_alternative():
    with pytest.raises(RuntimeError, match="sorted_autograd"):
        _second_order("sorted")


def test_sorted_autograd_double_backward_equals_reference():
    ref, fast = _second_order("reference"), _second_order("sorted_autograd")
    for name, g in ref.items():
        assert g is not None and fast[name] is not None, name
        torch.testing.assert_close(fast[name], g, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
@pytest.mark.parametrize("impl", ["sorted", "sorted_autograd", "padded_bmm", "grouped_mm", "reference"])
def test_padded_token_state_never_reaches_the_output(impl: str, router: str):
    """A masked-out token's hidden state may be anything (NaN from an empty attention row): it reaches no real
    token's output, no loss and no gradient, the shared expert's and its gate's included (grouped_mm: d_expert
    8, so the kernel runs where it can)."""
    cap = 1.0 if router == "expert_choice" else None
    cfg = MoEConfig(
        num_experts=4, top_k=2, d_expert=8, router=router, capacity_factor=cap, z_loss_coef=0.01,
        local_entropy_coef=0.1, num_shared_experts=1, shared_gate=True,
    )  # fmt: skip
    torch.default_generator.manual_seed(0)
    layer = MoELayer(D, cfg, dispatch=impl)
    x = torch.randn(2, 5, D)
    x[0, 0] = float("nan")  # token 0: padding
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    x.requires_grad_(True)
    out = layer(x, token_mask=mask)
    assert torch.isfinite(out.y[mask]).all() and (out.y[0, 0] == 0).all()  # padding's output: zero
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    assert torch.isfinite(out.stats.router_entropy)
    (out.y[mask].sum() + out.aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(x.grad).all() and (x.grad[0, 0] == 0).all()


@pytest.mark.parametrize("factor", [1e30, 1e300])
def test_huge_capacity_factor_drops_nothing_on_every_path(factor: float):
    """A capacity above the token count is dropless: every path agrees with capacity_factor=None. Uncapped, the
    tensor capacity overflowed int64 (to its minimum) and the fast paths dropped every assignment."""
    base = {"num_experts": 4, "top_k": 2, "d_expert": 8}
    x_btd, mask_bt, proj, state = _inputs(torch.float64, MoEConfig(**base))
    dropless = _run(MoEConfig(**base), "reference", state, x_btd, mask_bt, proj)
    huge = MoEConfig(**base, capacity_factor=factor)
    assert huge.capacity(8, training=True) == 8  # capped at the token count
    for impl in ("reference", "sorted", "sorted_autograd", "padded_bmm"):
        out = _run(huge, impl, state, x_btd, mask_bt, proj)
        assert out[0].stats.dropped_assignments == 0, impl
        _assert_same(dropless, out, atol=1e-12, rtol=1e-10)
