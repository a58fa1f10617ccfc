"""moekit.moe: routed expert layers for the core's feed-forward slot.

Routers (token-choice top-k, Switch, noisy top-k, expert-choice, aux-loss-free bias), balance and z
losses, capacity with dropping or dropless, shared and fine-grained experts, a fast dispatch checked
against a naive reference, routing telemetry, dense twins and sparse upcycling.
"""

from moekit.moe.config import MoEConfig
from moekit.moe.experts import RoutedExperts, SharedExperts
from moekit.moe.layer import MoELayer, MoEOutput, update_router_biases
from moekit.moe.losses import assignment_counts, load_balance_loss, router_z_loss
from moekit.moe.matching import MatchReport, check_matched, dense_twin, describe, param_matched_twin
from moekit.moe.router import Router, Routing
from moekit.moe.telemetry import RoutingStats, summarize_routing
from moekit.moe.upcycle import upcycle

__all__ = [
    "MatchReport",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "RoutedExperts",
    "Router",
    "Routing",
    "RoutingStats",
    "SharedExperts",
    "assignment_counts",
    "check_matched",
    "dense_twin",
    "describe",
    "load_balance_loss",
    "param_matched_twin",
    "router_z_loss",
    "summarize_routing",
    "update_router_biases",
    "upcycle",
]
