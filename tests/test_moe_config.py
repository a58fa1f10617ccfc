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
        ({"top_k": 0}, "top_k", "must be in"),
        ({"router": "expert_choice", "capacity_factor": None}, "capacity_factor", "expert_choice"),
        ({"router": "switch", "top_k": 2}, "top_k", "top-1"),
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
