"""Routers: score every (token, expert) pair and pick the assignments the experts will process.

Shapes: ``N`` flattened tokens (B*T), ``D`` d_model, ``E`` experts, ``K`` top-k, ``C`` expert capacity,
``A`` assignments (``N*K`` for token choice, ``E*C`` for expert choice), ``Gx`` expert groups (``n_group``),
``M`` experts per group (``E / Gx``).

Every router returns the same flat :class:`Routing` (one row per assignment), so the dispatch code
does not care which router made the decision. Router math runs in ``cfg.router_dtype`` with autocast
switched off: top-k decisions on bf16 logits flip between nearly tied experts and the z-loss
(logsumexp squared) overflows its useful range in half precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe.config import MoEConfig
from moekit.moe.modality import allowed_experts_table, token_allowed_experts

_ROUTER_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Routing:
    """One routing decision, flattened to assignments (token, expert, weight)."""

    token_a: Tensor  # [A] long: row of x_nd this assignment reads and writes
    expert_a: Tensor  # [A] long: expert in [0, E)
    weight_a: Tensor  # [A] combine weight, router dtype, differentiable
    score_a: Tensor  # [A] unbiased router score, detached: priority for drop_policy='score'
    valid_a: Tensor  # [A] bool: False for padded tokens and unused expert-choice slots
    logits_ne: Tensor  # [N, E] clean router logits (no noise): z-loss
    probs_ne: Tensor  # [N, E] routing distribution: load-balance P_e and entropy
    expert_idx_nk: Tensor | None  # [N, K] token-choice selection (load-balance f_e); None for expert choice
    capacity: Tensor | None  # per-expert limit still to apply (token choice); None = dropless or applied
    num_real: Tensor  # scalar long: real (unpadded) tokens


def capacity_tensor(cfg: MoEConfig, num_real: Tensor, training: bool) -> Tensor | None:
    """``cfg.capacity`` evaluated on a device tensor, so a padded batch needs no host sync.

    Same float64 operations in the same order as :meth:`MoEConfig.capacity`, hence the same integer.
    """
    factor = cfg.capacity_factor if training or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
    if factor is None:
        return None
    n_real = num_real.to(torch.float64)
    raw = n_real * factor * cfg.top_k / cfg.num_experts - 1e-9
    # Capped at the token count before the integer conversion: a huge factor would overflow int64 (to its
    # minimum, which drops every assignment); a capacity above the token count changes nothing.
    return torch.minimum(raw, n_real).ceil().clamp(min=1).long()


def group_limited(select_ne: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """DeepSeek group-limited selection: ``select_ne`` with every expert outside each token's ``topk_group``
    best groups set to ``-inf``. A group's score is its best selection score (``'max'``, V2) or the sum of its
    two best (``'top2_sum'``, V3). Exact ties between groups or experts go to ``torch.topk``'s choice, which is
    also what transformers' DeepSeek routers use. transformers' V2 router fills the masked experts with 0.0
    rather than ``-inf``: the same choice, since its softmax scores are positive."""
    n, e = select_ne.shape
    sel_ngm = select_ne.view(n, n_group, e // n_group)  # [N, Gx, M]
    if group_score == "max":
        group_ng = sel_ngm.amax(dim=-1)
    else:
        group_ng = sel_ngm.topk(2, dim=-1).values.sum(dim=-1)
    keep_idx = group_ng.topk(topk_group, dim=-1).indices  # [N, topk_group]
    keep_ng = torch.zeros_like(group_ng, dtype=torch.bool).scatter_(1, keep_idx, True)
    return sel_ngm.masked_fill(~keep_ng[:, :, None], -math.inf).view(n, e)


def _positive(denom: Tensor) -> Tensor:
    """A normalising sum floored at the dtype's smallest normal number: sigmoid scores of logits near -120
    underflow to 0, and 0 / 0 would make the weights, the output and the losses NaN. Above the floor (every
    sum that has not underflowed) it is the identity, bit for bit; transformers' DeepSeek-V3 adds 1e-20
    instead, which differs from this only for top-k score sums below ~1e-13 (float32)."""
    return denom.clamp_min(torch.finfo(denom.dtype).tiny)


def router_compute_dtype(cfg: MoEConfig, x: Tensor) -> torch.dtype:
    return x.dtype if cfg.router_dtype == "model" else _ROUTER_DTYPES[cfg.router_dtype]


class Router(nn.Module):
    """Linear router ``logits = x @ weight.T`` (``weight [E, D]``) plus the selection rule of ``cfg.router``.

    - ``topk``: token choice; ``score_func`` softmax or sigmoid (DeepSeek-V3 style), ``topk_order``
      softmax-then-top-k or top-k-then-softmax (Mixtral), optional ``renormalize``.
    - ``switch``: top-1 token choice (Fedus et al. 2021); the weight is the raw probability.
    - ``noisy_topk``: Shazeer et al. 2017, logits + randn * softplus(x @ w_noise.T) * router_noise while
      training (``w_noise`` starts at zero as in the paper).
    - ``expert_choice``: Zhou et al. 2022; each expert picks its top-C real tokens by score, so a token
      may get zero or several experts. In causal LM training a token's routing then depends on later
      tokens of the batch (they compete for the same expert slots): information leaks from the future,
      and the training-time routing cannot be reproduced token by token at generation. It is offered
      for encoders, ablations and non-causal spans.

    ``router_jitter`` multiplies the router input by U(1-eps, 1+eps) while training (Switch).
    With ``bias_update_rate > 0`` (DeepSeek-V3 aux-loss-free balancing) or ``selection_bias`` (a fixed bias,
    HF's ``e_score_correction_bias``) the buffer ``expert_bias [E]`` is added to the scores for the top-k
    SELECTION only (and the group scores); combine weights use the unbiased scores.

    ``load_counts [E]`` accumulates selected real assignments of training forwards until
    :meth:`update_bias` consumes them, so gradient accumulation sees every micro-batch. ``expert_bias``
    follows ``module.to(dtype)``: keep the weights in fp32 (autocast for speed), or the +-rate steps
    round away in bf16.

    DeepSeek group-limited top-k (``cfg.grouped_routing``, token choice only): :func:`group_limited`
    masks the selection scores of experts outside a token's ``topk_group`` best groups before the top-k;
    ``probs_ne`` (load balance, entropy) stays over all experts. Token-choice combine weights are multiplied
    by ``routed_scaling_factor`` after renormalisation (DeepSeek-V2/V3).

    With ``cfg.modality_experts`` the bool buffer ``allowed_experts [G + 1, E]`` (not persistent) masks
    the logits of experts outside a token's modality group to ``-inf`` before anything else reads them
    (``moekit.moe.modality``); ``Routing.logits_ne`` and ``probs_ne`` are the masked ones.
    """

    def __init__(self, d_model: int, cfg: MoEConfig, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))  # [E, D]
        nn.init.normal_(self.weight, std=init_std)
        self.w_noise: nn.Parameter | None = None
        if cfg.router == "noisy_topk":
            self.w_noise = nn.Parameter(torch.zeros(cfg.num_experts, d_model))  # [E, D]
        self.expert_bias: Tensor | None
        self.load_counts: Tensor | None
        # Persistent: learned (aux-loss-free) or loaded (a checkpoint's correction bias) model state.
        bias_e = torch.zeros(cfg.num_experts) if cfg.bias_update_rate > 0 or cfg.selection_bias else None
        self.register_buffer("expert_bias", bias_e)
        # Integer counts: exact at any size, and untouched by module.to(dtype).
        counts_e = torch.zeros(cfg.num_experts, dtype=torch.long) if cfg.bias_update_rate > 0 else None
        self.register_buffer("load_counts", counts_e, persistent=False)
        self.allowed_experts: Tensor | None
        if cfg.modality_experts is not None:
            # Derived from the config (not learned state): rebuilt at construction, kept out of checkpoints.
            table_ge = allowed_experts_table(cfg.modality_experts, cfg.num_experts)  # [G + 1, E]
            self.register_buffer("allowed_experts", table_ge, persistent=False)
        else:
            self.allowed_experts = None

    def forward(self, x_nd: Tensor, mask_n: Tensor | None = None, group_n: Tensor | None = None) -> Routing:
        """Route ``x_nd [N, D]``; ``mask_n [N]`` bool (True = real token) or None (all real); ``group_n [N]``
        long modality ids, used only with ``cfg.modality_experts`` (None = every token is group 0)."""
        cfg = self.cfg
        n = x_nd.shape[0]
        dtype = router_compute_dtype(cfg, x_nd)
        with torch.autocast(device_type=x_nd.device.type, enabled=False):
            xr_nd = x_nd.to(dtype)
            if self.training and cfg.router_jitter > 0:
                jitter = torch.empty_like(xr_nd).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
                xr_nd = xr_nd * jitter
            logits_ne = F.linear(xr_nd, self.weight.to(dtype))  # [N, E]
            allowed_ne = None
            if self.allowed_experts is not None:  # modality expert groups: forbidden experts get -inf
                allowed_ne = token_allowed_experts(self.allowed_experts, group_n, n)  # [N, E]
                logits_ne = logits_ne.masked_fill(~allowed_ne, -math.inf)
            route_logits_ne = logits_ne
            if self.w_noise is not None and self.training:
                noise_std_ne = F.softplus(F.linear(xr_nd, self.w_noise.to(dtype))) * cfg.router_noise
                route_logits_ne = logits_ne + torch.randn_like(logits_ne) * noise_std_ne  # -inf stays -inf
            if cfg.score_func == "sigmoid":
                scores_ne = torch.sigmoid(route_logits_ne)
                probs_ne = scores_ne / _positive(scores_ne.sum(-1, keepdim=True))
            else:
                scores_ne = probs_ne = torch.softmax(route_logits_ne, dim=-1)
            if mask_n is None:
                num_real = torch.tensor(n, device=x_nd.device)
            else:
                num_real = mask_n.sum()
            if cfg.router == "expert_choice":
                return self._expert_choice(logits_ne, probs_ne, scores_ne, mask_n, num_real, allowed_ne)
            return self._token_choice(logits_ne, route_logits_ne, probs_ne, scores_ne, mask_n, num_real, allowed_ne)

    def _token_choice(
        self,
        logits_ne: Tensor,
        route_logits_ne: Tensor,
        probs_ne: Tensor,
        scores_ne: Tensor,
        mask_n: Tensor | None,
        num_real: Tensor,
        allowed_ne: Tensor | None = None,
    ) -> Routing:
        cfg = self.cfg
        n, k = scores_ne.shape[0], cfg.top_k
        select_ne = scores_ne.detach()
        if self.expert_bias is not None:
            select_ne = select_ne + self.expert_bias.to(select_ne.dtype)
        if allowed_ne is not None:
            # A forbidden expert's score is 0, but so is an allowed one's that underflowed (a logit far below the
            # best): top-k could pick either, and the bias could lift it. -inf ranks it below every allowed expert.
            select_ne = select_ne.masked_fill(~allowed_ne, -math.inf)
        if cfg.grouped_routing:
            select_ne = group_limited(select_ne, cfg.n_group, cfg.topk_group, cfg.group_score)
        expert_idx_nk = select_ne.topk(k, dim=-1).indices  # [N, K]
        score_nk = scores_ne.gather(1, expert_idx_nk)  # [N, K] unbiased
        if cfg.topk_order == "topk_then_softmax":
            weight_nk = torch.softmax(route_logits_ne.gather(1, expert_idx_nk), dim=-1)
        elif cfg.renormalize and k > 1:
            weight_nk = score_nk / _positive(score_nk.sum(-1, keepdim=True))
        else:
            weight_nk = score_nk
        if cfg.routed_scaling_factor != 1.0:
            weight_nk = weight_nk * cfg.routed_scaling_factor
        device = scores_ne.device
        token_a = torch.arange(n, device=device).repeat_interleave(k)  # [A] = [N*K], token-major
        if mask_n is None:
            valid_a = torch.ones(n * k, dtype=torch.bool, device=device)
        else:
            valid_a = mask_n.repeat_interleave(k)
        return Routing(
            token_a=token_a,
            expert_a=expert_idx_nk.reshape(-1),
            weight_a=weight_nk.reshape(-1),
            score_a=score_nk.detach().reshape(-1),
            valid_a=valid_a,
            logits_ne=logits_ne,
            probs_ne=probs_ne,
            expert_idx_nk=expert_idx_nk,
            capacity=capacity_tensor(cfg, num_real, self.training),
            num_real=num_real,
        )

    def _expert_choice(
        self,
        logits_ne: Tensor,
        probs_ne: Tensor,
        scores_ne: Tensor,
        mask_n: Tensor | None,
        num_real: Tensor,
        allowed_ne: Tensor | None = None,
    ) -> Routing:
        cfg = self.cfg
        n, e = scores_ne.shape
        # Static top-C size from the padded length, then the real capacity masks the tail: no host sync.
        c_max = min(n, cfg.capacity(n, self.training))
        c_real = torch.minimum(capacity_tensor(cfg, num_real, self.training), num_real)
        select_en = scores_ne.detach().t()  # [E, N]
        if mask_n is not None:
            select_en = select_en.masked_fill(~mask_n, -math.inf)  # padded tokens rank last
        if allowed_ne is not None:
            select_en = select_en.masked_fill(~allowed_ne.t(), -math.inf)  # so do other groups' tokens
        token_ec = select_en.topk(c_max, dim=1).indices  # [E, C]
        weight_ec = scores_ne.t().gather(1, token_ec)  # [E, C]
        rank_ec = torch.arange(c_max, device=scores_ne.device).expand(e, c_max)
        valid_ec = rank_ec < c_real
        if mask_n is not None:
            valid_ec = valid_ec & mask_n[token_ec]
        if allowed_ne is not None:  # an expert with fewer allowed tokens than C leaves the rest unused
            valid_ec = valid_ec & allowed_ne.t().gather(1, token_ec)
        return Routing(
            token_a=token_ec.reshape(-1),
            expert_a=torch.arange(e, device=scores_ne.device).repeat_interleave(c_max),
            weight_a=weight_ec.reshape(-1),
            score_a=weight_ec.detach().reshape(-1),
            valid_a=valid_ec.reshape(-1),
            logits_ne=logits_ne,
            probs_ne=probs_ne,
            expert_idx_nk=None,
            capacity=None,
            num_real=num_real,
        )

    @torch.no_grad()
    def record_load(self, routing: Routing) -> None:
        """Accumulate selected real assignments per expert (training forwards) for :meth:`update_bias`."""
        if self.load_counts is None:
            return
        self.load_counts.index_add_(0, routing.expert_a, routing.valid_a.long())

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3: ``bias += rate * sign(mean_load - load)``, then reset the counts.

        Call after ``optimizer.step()``; outside autograd. With ``balance_scope='global'`` and an
        initialised process group the counts are summed over ranks first, so every rank applies the
        same update. Without recorded load (no training forward since the last call) nothing moves.
        """
        if self.expert_bias is None or self.load_counts is None:
            return
        counts_e = self.load_counts
        if self.cfg.balance_scope == "global" and torch.distributed.is_available():
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts_e)
        # sign(mean - load) = sign(sum - E * load), in exact integers: counts converted to a bf16 bias's dtype
        # would round (above 256) and two different loads could compare equal.
        sign_e = torch.sign(counts_e.sum() - self.cfg.num_experts * counts_e).to(self.expert_bias.dtype)
        self.expert_bias.add_(sign_e, alpha=self.cfg.bias_update_rate)
        counts_e.zero_()
