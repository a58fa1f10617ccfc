"""moekit.moe: routed expert layers for the core's feed-forward slot.

Routers (token-choice top-k, Switch, noisy top-k, expert-choice, aux-loss-free bias), balance and z
losses, capacity with dropping or dropless, shared and fine-grained experts, a fast dispatch checked
against a naive reference, routing telemetry, dense twins and sparse upcycling.
"""

import importlib
from typing import Any

from moekit.moe.config import MoEConfig
from moekit.moe.ep_checkpoint import gather_full_model, load_expert_state, save_expert_state
from moekit.moe.experts import RoutedExperts, SharedExperts
from moekit.moe.layer import MoELayer, MoEOutput, update_router_biases
from moekit.moe.losses import assignment_counts, load_balance_loss, router_z_loss
from moekit.moe.parallel import (
    ExpertParallelGroups,
    allreduce_expert_grads,
    apply_expert_parallel,
    comm_volume,
    ep_clip_grad_norm_,
    exclude_experts_from_ddp,
    expert_parameters,
    init_expert_parallel,
    shard_experts,
    unshard_experts,
)
from moekit.moe.router import Router, Routing
from moekit.moe.telemetry import RoutingStats, summarize_routing

# upcycling builds on moekit.core, whose ModelConfig imports MoEConfig from this package:
# loading them on first use (PEP 562) keeps `import moekit.core` and `import moekit.moe` cycle-free.
_LAZY = {
    "upcycle": "moekit.moe.upcycling",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit.moe' has no attribute {name!r}")


__all__ = [
    "ExpertParallelGroups",
    "gather_full_model",
    "load_expert_state",
    "save_expert_state",
    "allreduce_expert_grads",
    "apply_expert_parallel",
    "comm_volume",
    "ep_clip_grad_norm_",
    "exclude_experts_from_ddp",
    "expert_parameters",
    "init_expert_parallel",
    "shard_experts",
    "unshard_experts",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "RoutedExperts",
    "Router",
    "Routing",
    "RoutingStats",
    "SharedExperts",
    "assignment_counts",
    "load_balance_loss",
    "router_z_loss",
    "summarize_routing",
    "update_router_biases",
    "upcycle",
]
