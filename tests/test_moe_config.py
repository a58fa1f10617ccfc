"""MoEConfig validation: bad input fails at construction with the field name and the allowed values."""

from __future__ import annotations

import pytest
import torch

from moekit.moe.config import MoEConfig, ParallelConfig
from moekit.moe.layer import MoELayer, set_dispatch


@pytest.mark.parametrize(
    ("kw", "field", "hint"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k", "num_experts=4"),
        ({"top_k": 0}, "top_k", "an integer in [1"),
        ({"router": "expert_choice", "capacity_factor": None}, "capacity_factor", "expert_choice"),
        ({"router": "switch", "top_k": 2}, "top_k", "top-1"),
        ({"router": "switch", "top_k": 1, "topk_order": "topk_then_softmax"}, "topk_order", "task gradient"),
        ({"router": "hash"}, "router", "topk, switch, noisy_topk, expert_choice"),
        ({"score_func": "relu"}, "score_func", "softmax, sigmoid"),
        ({"drop_policy": "random"}, "drop_policy", "score, position"),
        ({"router_dtype": "float16"}, "router_dtype", "float32"),
        ({"score_func": "sigmoid", "topk_order": "topk_then_softmax"}, "topk_order", "softmax"),
        ({"router": "noisy_topk"}, "router_noise", "> 0"),
        ({"router_noise": 0.5}, "router_noise", "noisy_topk"),
        ({"capacity_factor": 0.0}, "capacity_factor", "> 0"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor", "> 0"),
        ({"capacity_factor": float("inf")}, "capacity_factor", "a finite number > 0 or null"),
        ({"capacity_factor": float("nan")}, "capacity_factor", "a finite number > 0 or null"),
        ({"eval_capacity_factor": float("inf")}, "eval_capacity_factor", "a finite number > 0 or null"),
        ({"eval_capacity_factor": float("nan")}, "eval_capacity_factor", "a finite number > 0 or null"),
        ({"router": "expert_choice", "capacity_factor": 1.0, "bias_update_rate": 0.1}, "bias_update_rate", "token"),
        ({"num_groups": 0}, "num_groups", ">= 1"),
        ({"d_shared": 0}, "d_shared", ">= 1"),
        ({"dead_expert_window": 0}, "dead_expert_window", ">= 1"),
    ],
)
def test_config_errors_name_the_field(kw, field, hint):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}=") as err:
        MoEConfig(**kw)
    assert hint in str(err.value)


NAN, INF = float("nan"), float("inf")


# Values that used to pass validation (a float, a bool or a str where an int / bool / finite number belongs), or
# failed with a bare TypeError that named no field (num_experts="8").
@pytest.mark.parametrize(
    ("kw", "field", "hint"),
    [
        ({"num_experts": 8.0}, "num_experts", "an integer >= 1"),
        ({"num_experts": "8"}, "num_experts", "an integer >= 1"),
        ({"top_k": 2.5}, "top_k", "an integer in [1, num_experts=8]"),
        ({"top_k": True}, "top_k", "an integer in [1, num_experts=8]"),
        ({"d_expert": 256.0}, "d_expert", "an integer >= 1"),
        ({"num_shared_experts": 1.0}, "num_shared_experts", "an integer >= 0"),
        ({"every_n_layers": True}, "every_n_layers", "an integer >= 1"),
        ({"dead_expert_window": 2.5}, "dead_expert_window", "an integer >= 1"),
        ({"num_groups": 3.0}, "num_groups", "an integer >= 1"),
        ({"d_shared": 4.5}, "d_shared", "an integer >= 1, or None"),
        ({"layers": [True, 2]}, "layers", "non-negative integer layer indices"),
        ({"layers": "12"}, "layers", "a list"),
        ({"renormalize": "no"}, "renormalize", "true or false"),
        ({"renormalize": 1}, "renormalize", "true or false"),
        ({"load_balance_coef": NAN}, "load_balance_coef", "a finite number >= 0"),
        ({"z_loss_coef": "0.001"}, "z_loss_coef", "a finite number >= 0"),
        ({"bias_update_rate": INF}, "bias_update_rate", "a finite number >= 0"),
        ({"router": "noisy_topk", "router_noise": NAN}, "router_noise", "a finite number >= 0"),
        ({"router_jitter": 1.5}, "router_jitter", "in [0, 1)"),
        ({"router_jitter": 1.0}, "router_jitter", "in [0, 1)"),
        ({"router_jitter": -0.1}, "router_jitter", "in [0, 1)"),
        ({"local_entropy_coef": INF}, "local_entropy_coef", "a finite number >= 0"),
        ({"global_entropy_threshold": NAN}, "global_entropy_threshold", "a finite number > 0"),
        ({"router": ["topk"]}, "router", "topk, switch"),
    ],
)
def test_config_refuses_wrong_types_naming_the_field(kw, field, hint):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}=") as err:
        MoEConfig(**kw)
    assert hint in str(err.value)


def test_config_accepts_ints_for_float_fields():
    cfg = MoEConfig(load_balance_coef=0, z_loss_coef=0, capacity_factor=1, router_jitter=0, layers=(3, 1, 3))
    assert cfg.capacity(8, training=True) == 2 and cfg.layers == [1, 3]


def test_grouped_mm_dispatch_needs_the_kernel(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with pytest.raises(ValueError, match="dispatch='grouped_mm'"):
        MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="grouped_mm")
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8))
    with pytest.raises(ValueError, match="dispatch='grouped_mm'"):
        set_dispatch(layer, "grouped_mm")


def test_dispatch_is_placement_not_config():
    """The implementation is chosen per layer (MoELayer(dispatch=) or set_dispatch), validated with the allowed
    values, and never stored in MoEConfig (so never in a saved config.json)."""
    with pytest.raises(ValueError, match=r"MoELayer dispatch='triton' is invalid.*auto, reference, sorted"):
        MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8), dispatch="triton")
    with pytest.raises(ValueError, match=r"ParallelConfig\.dispatch='triton' is invalid.*reference, sorted"):
        ParallelConfig(dispatch="triton")
    model = torch.nn.Sequential(MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_expert=8)), torch.nn.Linear(8, 8))
    assert model[0].dispatch_impl == "auto"
    assert set_dispatch(model, "reference") == ["0"] and model[0].dispatch_impl == "reference"
    assert model[0].resolve_dispatch(torch.zeros(1, 8)) == "reference"
    for legacy in ("dispatch", "expert_parallel_size", "extra"):
        assert legacy not in MoEConfig().to_dict()


def test_capacity_formula():
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert cfg.capacity(8, training=True) == 4  # 8 tokens * 2 / 4 experts: exactly uniform
    assert cfg.capacity(9, training=True) == 5
    assert cfg.capacity(8, training=False) == 8
    assert cfg.capacity(0, training=True) == 1
    assert MoEConfig().capacity(100, training=True) is None
    assert MoEConfig(d_expert=32, num_shared_experts=2).shared_width == 32


def test_run_configs_can_select_every_dispatch_path():
    from moekit.moe import FAST_IMPLS, ParallelConfig

    for impl in ("auto", "reference", *FAST_IMPLS):
        assert ParallelConfig(dispatch=impl).dispatch == impl
    with pytest.raises(ValueError, match="ParallelConfig.dispatch='fused'.*padded_bmm"):
        ParallelConfig(dispatch="fused")
