"""moekit.moe: routed expert layers for the core's feed-forward slot.

Routers (token-choice top-k, Switch, noisy top-k, expert-choice, aux-loss-free bias), balance and z
losses, capacity with dropping or dropless, shared and fine-grained experts, a fast dispatch checked
against a naive reference, routing telemetry, expert parallelism, the Trainer extension of MoE models
(``MoEExtension``) and sparse upcycling. Depends on torch, safetensors and this package only.
"""

from moekit.moe.config import MoEConfig, ParallelConfig
from moekit.moe.dispatch import FAST_IMPLS, auto_dispatch
from moekit.moe.ep_checkpoint import gather_full_model, load_expert_state, save_expert_state
from moekit.moe.experts import RoutedExperts, SharedExperts
from moekit.moe.extension import MoEExtension, check_bias_scope
from moekit.moe.layer import MoELayer, MoEOutput, set_dispatch, update_router_biases
from moekit.moe.losses import assignment_counts, load_balance_loss, router_z_loss
from moekit.moe.parallel import (
    ExpertParallelGroups,
    allreduce_expert_grads,
    apply_expert_parallel,
    ep_clip_grad_norm_,
    exclude_experts_from_ddp,
    expert_parameters,
    init_expert_parallel,
    shard_experts,
    unshard_experts,
)
from moekit.moe.router import Router, Routing, group_limited
from moekit.moe.telemetry import RoutingStats, summarize_routing
from moekit.moe.upcycling import function_preserving, upcycle

__all__ = [
    "FAST_IMPLS",
    "ExpertParallelGroups",
    "MoEConfig",
    "MoEExtension",
    "MoELayer",
    "MoEOutput",
    "ParallelConfig",
    "RoutedExperts",
    "Router",
    "Routing",
    "RoutingStats",
    "SharedExperts",
    "allreduce_expert_grads",
    "apply_expert_parallel",
    "assignment_counts",
    "auto_dispatch",
    "check_bias_scope",
    "ep_clip_grad_norm_",
    "exclude_experts_from_ddp",
    "expert_parameters",
    "gather_full_model",
    "group_limited",
    "init_expert_parallel",
    "load_balance_loss",
    "load_expert_state",
    "router_z_loss",
    "save_expert_state",
    "set_dispatch",
    "shard_experts",
    "summarize_routing",
    "unshard_experts",
    "update_router_biases",
    "function_preserving",
    "upcycle",
]
