"""MoEConfig: everything that shapes a routed expert layer (saved with the weights), and ParallelConfig: where
and how the layers run (a run's ``parallel`` section, never saved with the weights). Pure dataclasses (no torch
import)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ROUTERS = ("topk", "switch", "noisy_topk", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")
TOPK_ORDERS = ("softmax_then_topk", "topk_then_softmax")
DROP_POLICIES = ("score", "position")
DISPATCH_IMPLS = ("auto", "reference", "sorted", "sorted_autograd", "grouped_mm", "padded_bmm")
BALANCE_SCOPES = ("local", "global")
ROUTER_DTYPES = ("float32", "float64", "model")
GROUP_SCORES = ("max", "top2_sum")  # DeepSeek-V2 group_limited_greedy, DeepSeek-V3 noaux_tc
# MoEConfig fields of earlier versions that described placement, not the model (now ParallelConfig's, or gone).
LEGACY_PLACEMENT_FIELDS = ("dispatch", "expert_parallel_size", "extra")

log = logging.getLogger(__name__)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: Any, lo: int, tail: str = "") -> None:
    if not _is_int(value) or value < lo:
        _fail(name, value, f"must be an integer >= {lo}{tail}")


@dataclass
class MoEConfig:
    """Routed feed-forward configuration; nested as ``ModelConfig(moe=MoEConfig(...))``.

    ``d_expert`` is each expert's SwiGLU hidden width. Fine-grained segmentation (DeepSeekMoE) means
    more, narrower experts with a larger ``top_k`` at the same active compute.
    ``capacity_factor=None`` is dropless; otherwise each expert takes at most
    ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments (never more than ``tokens``, which
    changes nothing: a token picks an expert at most once), counting real (unpadded) tokens only. For
    ``router='expert_choice'`` that number is how many tokens each expert picks, and ``top_k`` is the average
    number of experts per token.

    ``renormalize`` rescales the selected weights to sum to 1 only when ``top_k > 1``: at top-1 it would
    pin the weight at 1.0 and cut the router off from the task gradient (Switch scales by the raw
    probability). ``topk_order='topk_then_softmax'`` weights sum to 1 by construction, so at ``top_k=1`` the
    weight is always 1.0 (the softmax of one logit) and the router gets no task gradient, only the auxiliary
    losses' (none when their coefficients are 0). ``router='topk'`` accepts it (HF top-1
    imports and upcycling use it: HF's renormalised top-1 weight is 1.0 too); ``router='switch'``, whose
    weight is the raw probability, refuses it. Expert choice ignores ``topk_order``, ``renormalize`` and
    ``drop_policy``.

    ``balance_scope='global'`` (with an initialised process group) sums the load-balance assignment counts
    (``f_e``) and the aux-loss-free load over the data-parallel ranks; ``P_e`` stays each rank's mean over its
    own real tokens. Each rank's loss is then ``E * sum_e f_e(global) * P_e(rank)``, and the gradient mean
    over ranks weights the ranks equally, not their tokens: it is the global batch's loss only when every rank
    holds as many real tokens. The logged routing telemetry (``MoEExtension``) covers all ranks whatever the
    scope.

    ``dead_expert_window`` counts training forwards, not optimizer steps: under gradient accumulation each
    micro-batch advances it (an activation-checkpointing recompute too).

    Per-modality routing (group ids = modality ids, passed as ``group_ids`` to the layer; ``None`` means
    every token is group 0):

    - ``modality_experts=[n_0, n_1, ...]`` reserves experts for each group: group ``g`` owns the contiguous
      block ``[n_0 + ... + n_{g-1}, ... + n_g)``, and experts from ``sum(n)`` to ``num_experts`` are common to
      all groups. A token of group ``g`` can only be routed to its block and the common experts (ids outside
      ``[0, len(modality_experts))`` may use every expert); see ``moekit.moe.modality``. ``None`` is
      learned shared routing over all experts.
    - ``local_entropy_coef`` / ``global_entropy_coef``: LIMoE's per-modality entropy losses (Mustafa et al.
      2022) for the groups in ``entropy_groups`` (``None`` = every group in ``[0, num_groups)``), with
      ``global_entropy_threshold`` (nats) as LIMoE's threshold ``tau``; formulas in ``moekit.moe.losses``.

    DeepSeek routing (token-choice routers ``topk`` / ``noisy_topk``; see ``moekit.moe.router``):

    - group-limited top-k: the experts form ``n_group`` contiguous equal blocks; each token scores every
      block (``group_score``: ``"max"`` selection score, DeepSeek-V2's ``group_limited_greedy``, or
      ``"top2_sum"``, the sum of the two best, DeepSeek-V3's ``noaux_tc``), keeps its ``topk_group`` best
      blocks (``None`` = all) and picks its ``top_k`` experts among theirs. Group scores use the selection
      scores (with the bias, as in V3). Not combinable with ``modality_experts`` (two competing masks).
    - ``routed_scaling_factor`` multiplies the routed combine weights after renormalisation.
    - ``selection_bias=True`` keeps the persistent ``expert_bias [E]`` buffer even without aux-loss-free
      updates: a fixed selection bias (HF's ``e_score_correction_bias``) for the top-k and group choice,
      never in the combine weights; ``bias_update_rate > 0`` also trains it.
    """

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 256
    num_shared_experts: int = 0
    d_shared: int | None = None  # hidden width of each shared expert; None = d_expert
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x @ w) per token (Qwen2-MoE)
    router: str = "topk"  # one of ROUTERS
    score_func: str = "softmax"  # one of SCORE_FUNCS
    topk_order: str = "softmax_then_topk"  # one of TOPK_ORDERS (softmax routers only)
    renormalize: bool = True  # renormalise the selected top-k weights to sum to 1
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None  # None = same as capacity_factor
    drop_policy: str = "score"  # which assignments survive capacity: by router score or by position
    router_noise: float = 0.0  # noisy top-k only: scale of the learned, input-dependent logit noise
    router_jitter: float = 0.0  # multiplicative router-input jitter eps (Switch), any router, training only
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # >0 enables DeepSeek-V3 aux-loss-free balancing
    balance_scope: str = "local"  # "global": load-balance f_e and aux-loss-free load over all ranks (docstring)
    every_n_layers: int = 1  # layer i is MoE when (i + 1) % every_n_layers == 0 ...
    layers: list[int] | None = None  # ... unless an explicit list of layer indices is given
    router_dtype: str = "float32"  # router math dtype under mixed precision
    dead_expert_window: int = 100  # an expert is dead after this many training forwards (micro-batches) without tokens
    num_groups: int = 3  # telemetry: group ids in [0, num_groups) get a per-group expert histogram
    modality_experts: list[int] | None = None  # experts reserved per group id; the rest are common; None = shared
    local_entropy_coef: float = 0.0  # LIMoE local entropy loss (per token, minimised)
    global_entropy_coef: float = 0.0  # LIMoE global entropy loss (per group marginal, entropy maximised)
    global_entropy_threshold: float | None = None  # tau in nats: global loss max(0, tau - H); None = -H
    entropy_groups: list[int] | None = None  # groups the entropy losses apply to; None = all of [0, num_groups)
    n_group: int = 1  # DeepSeek group-limited routing: experts split into n_group contiguous equal blocks
    topk_group: int | None = None  # blocks a token may pick experts from; None = all
    group_score: str = "top2_sum"  # one of GROUP_SCORES: how a block is scored per token
    routed_scaling_factor: float = 1.0  # multiplies the routed combine weights (after renormalisation)
    selection_bias: bool = False  # keep expert_bias (a fixed selection bias) even with bias_update_rate=0

    def __post_init__(self) -> None:
        # Types first, so that every refusal names its field (a str or a float would otherwise fail a comparison
        # below with a bare TypeError, or pass it: top_k=2.5, renormalize="no").
        for name, lo in (("num_experts", 1), ("d_expert", 1), ("num_shared_experts", 0), ("every_n_layers", 1)):
            _check_int(name, getattr(self, name), lo)
        _check_int("dead_expert_window", self.dead_expert_window, 1, " (training forwards)")
        _check_int("num_groups", self.num_groups, 1)
        if self.d_shared is not None:
            _check_int("d_shared", self.d_shared, 1, ", or None for d_expert")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]")
        for name in ("renormalize", "shared_gate"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        for name in ("router_noise", "load_balance_coef", "z_loss_coef", "bias_update_rate"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        jitter = self.router_jitter
        if not _is_finite_number(jitter) or not 0 <= jitter < 1:
            _fail("router_jitter", jitter, "must be a finite number in [0, 1) (the input is scaled by U(1-eps, 1+eps))")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not _is_finite_number(value) or value <= 0):
                _fail(name, value, "must be a finite number > 0 or null (None, dropless)")
        for name, allowed in (
            ("router", ROUTERS),
            ("score_func", SCORE_FUNCS),
            ("topk_order", TOPK_ORDERS),
            ("drop_policy", DROP_POLICIES),
            ("balance_scope", BALANCE_SCOPES),
            ("router_dtype", ROUTER_DTYPES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                _fail(name, value, f"allowed values are {', '.join(allowed)}")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "router='switch' is top-1 routing; set top_k=1 or router='topk'")
        if self.router == "switch" and self.topk_order == "topk_then_softmax":
            _fail(
                "topk_order",
                self.topk_order,
                "router='switch' weights by the raw top-1 probability; 'topk_then_softmax' would pin the weight at "
                "1.0 and cut the router off from the task gradient: use 'softmax_then_topk' (or router='topk')",
            )
        if self.router == "expert_choice" and self.capacity_factor is None:
            _fail(
                "capacity_factor",
                None,
                "router='expert_choice' needs a capacity (each expert picks its top-C tokens); "
                "dropless is undefined for expert choice",
            )
        if self.score_func == "sigmoid" and self.topk_order == "topk_then_softmax":
            _fail("topk_order", self.topk_order, "only applies with score_func='softmax'")
        if self.router == "noisy_topk" and self.router_noise <= 0:
            _fail("router_noise", self.router_noise, "router='noisy_topk' needs router_noise > 0")
        if self.router != "noisy_topk" and self.router_noise != 0:
            _fail("router_noise", self.router_noise, "only applies to router='noisy_topk' (see router_jitter)")
        if self.bias_update_rate > 0 and self.router == "expert_choice":
            _fail("bias_update_rate", self.bias_update_rate, "aux-loss-free bias applies to token-choice routers")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or any(not _is_int(i) or i < 0 for i in self.layers):
                _fail("layers", self.layers, "must be a list of non-negative integer layer indices, or None")
            self.layers = sorted(set(self.layers))
        if self.shared_gate and self.num_shared_experts < 1:
            _fail("shared_gate", self.shared_gate, "gates the shared experts; needs num_shared_experts >= 1")
        self._check_modality_fields()
        self._check_deepseek_fields()

    def _check_deepseek_fields(self) -> None:
        token_choice = ("topk", "noisy_topk")
        g = self.n_group
        if not _is_int(g) or g < 1 or self.num_experts % g:
            _fail("n_group", g, f"must be an integer >= 1 that divides num_experts={self.num_experts}")
        if self.group_score not in GROUP_SCORES:
            _fail("group_score", self.group_score, f"allowed values are {', '.join(GROUP_SCORES)}")
        tg = self.topk_group
        if tg is not None and (not _is_int(tg) or not 1 <= tg <= g):
            _fail("topk_group", tg, f"must be an integer in [1, n_group={g}], or None for all groups")
        per_group = self.num_experts // g
        if g > 1:
            if self.router not in token_choice:
                _fail("n_group", g, f"group-limited routing needs router in {token_choice}; got {self.router!r}")
            if self.modality_experts is not None:
                _fail("n_group", g, "group-limited routing cannot be combined with modality_experts (set one)")
            if self.group_score == "top2_sum" and per_group < 2:
                _fail("group_score", self.group_score, f"needs >= 2 experts per group (have {per_group}); use 'max'")
            if tg is not None and tg * per_group < self.top_k:
                _fail(
                    "topk_group",
                    tg,
                    f"{tg} groups of {per_group} experts hold fewer than top_k={self.top_k}; need topk_group * "
                    f"num_experts / n_group >= top_k",
                )
        rsf = self.routed_scaling_factor
        if not _is_finite_number(rsf) or rsf <= 0:
            _fail("routed_scaling_factor", rsf, "must be a finite number > 0")
        if rsf != 1 and self.router == "expert_choice":
            _fail("routed_scaling_factor", rsf, "scales token-choice combine weights; use 1.0 with expert_choice")
        if not isinstance(self.selection_bias, bool):
            _fail("selection_bias", self.selection_bias, "must be true or false")
        if self.selection_bias and self.router == "expert_choice":
            _fail("selection_bias", True, "the selection bias applies to token-choice routers")

    @property
    def grouped_routing(self) -> bool:
        """Whether group-limited top-k masks any experts (``n_group > 1`` and fewer than all groups kept)."""
        return self.n_group > 1 and self.topk_group is not None and self.topk_group < self.n_group

    def _check_modality_fields(self) -> None:
        me = self.modality_experts
        if me is not None:
            if not isinstance(me, (list, tuple)) or not me or any(not _is_int(n) or n < 0 for n in me):
                _fail(
                    "modality_experts", me, "must be a non-empty list of expert counts >= 0 (one per group id), or None"
                )
            self.modality_experts = me = list(me)
            if len(me) > self.num_groups:
                _fail("modality_experts", me, f"has more entries than num_groups={self.num_groups}")
            common = self.num_experts - sum(me)
            if common < 0:
                _fail("modality_experts", me, f"reserves {sum(me)} experts, more than num_experts={self.num_experts}")
            need = 1 if self.router == "expert_choice" else self.top_k
            short = [g for g, n in enumerate(me) if n + common < need]
            if short:
                _fail(
                    "modality_experts",
                    me,
                    f"groups {short} can reach fewer than {need} experts (own + {common} common); each needs "
                    + ("at least one" if need == 1 else f"top_k={self.top_k}"),
                )
        for name in ("local_entropy_coef", "global_entropy_coef"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                _fail(name, value, "must be a finite number >= 0")
        tau = self.global_entropy_threshold
        if tau is not None and (not _is_finite_number(tau) or tau <= 0):
            _fail(
                "global_entropy_threshold",
                tau,
                "must be a finite number > 0 (nats, e.g. ln(4) for a soft minimum of 4 experts) or None",
            )
        groups = self.entropy_groups
        if groups is not None:
            if (
                not isinstance(groups, (list, tuple))
                or not groups
                or any(not _is_int(g) or not 0 <= g < self.num_groups for g in groups)
            ):
                _fail(
                    "entropy_groups",
                    groups,
                    f"must be a non-empty list of group ids in [0, num_groups={self.num_groups}), or None",
                )
            self.entropy_groups = sorted(set(groups))

    @property
    def entropy_group_ids(self) -> list[int]:
        """Groups the LIMoE entropy losses cover."""
        return self.entropy_groups if self.entropy_groups is not None else list(range(self.num_groups))

    @property
    def shared_width(self) -> int:
        return self.d_shared if self.d_shared is not None else self.d_expert

    def is_moe_layer(self, i: int) -> bool:
        if self.layers is not None:
            return i in self.layers
        return (i + 1) % self.every_n_layers == 0

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Per-expert capacity in assignments, or None when dropless."""
        factor = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        if factor is None:
            return None
        raw = factor * num_tokens * self.top_k / self.num_experts - 1e-9
        # An expert takes each token at most once, so a capacity above the token count changes nothing; capping
        # before the ceil keeps a huge factor (1e30, or a product that overflows to inf) an exact small integer,
        # the same one capacity_tensor computes. Ceil keeps capacity >= 1 and makes factor 1.0 fit uniform routing.
        return max(1, math.ceil(min(raw, float(num_tokens))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        """Build from a saved dict (``config.json``). Placement fields that older versions saved here
        (``dispatch``, ``expert_parallel_size``, ``extra``) are dropped with a logged note: they belong to the
        run's ``parallel`` section now, and a saved model describes only the model."""
        d = dict(d)
        dropped = {k: d.pop(k) for k in LEGACY_PLACEMENT_FIELDS if k in d}
        if dropped:
            log.warning(
                "MoEConfig: ignoring saved placement fields %s (older moekit); set dispatch / expert_parallel_size "
                "in the run's parallel section (ParallelConfig) instead",
                dropped,
            )
        return cls(**d)


@dataclass
class ParallelConfig:
    """Where and how the MoE layers run: a run config's top-level ``parallel`` section (YAML
    ``parallel: {expert_parallel_size: 2}``, override ``parallel.expert_parallel_size=2``). Not part of the
    saved model: a checkpoint trained with one setting resumes or loads with another.

    ``expert_parallel_size`` P shards each MoE layer's routed experts over P consecutive ranks (it must divide
    the world size and every layer's ``num_experts``; see ``moekit.moe.parallel``). ``dispatch`` picks the
    dispatch implementation of every MoE layer (one of DISPATCH_IMPLS; see ``MoELayer.resolve_dispatch``).
    """

    expert_parallel_size: int = 1
    dispatch: str = "auto"  # one of DISPATCH_IMPLS

    def __post_init__(self) -> None:
        ep = self.expert_parallel_size
        if not _is_int(ep) or ep < 1:
            raise ValueError(f"ParallelConfig.expert_parallel_size={ep!r} is invalid: must be an int >= 1")
        if self.dispatch not in DISPATCH_IMPLS:
            raise ValueError(
                f"ParallelConfig.dispatch={self.dispatch!r} is invalid: allowed values are {', '.join(DISPATCH_IMPLS)}"
            )
