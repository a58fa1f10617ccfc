"""The DeepSeek-V2/V3 half of the HF config mapping (see :mod:`moekit.core.hf_config`): multi-head latent
attention <-> :class:`~moekit.core.config.MLAConfig`, DeepSeek routing <-> :class:`MoEConfig`, refusing by
name what the other side cannot represent. The math is transformers 5.24's ``DeepseekV2/V3ForCausalLM``:

- attention: MLA for every layer; V2 always rotates adjacent pairs (complex RoPE), V3 when ``rope_interleave``;
  the two latent norms use transformers' fixed eps 1e-6. transformers expands a key/value per query head
  whatever ``num_key_value_heads`` says (it only breaks when it is below ``num_attention_heads``).
- feed-forward: layers ``i < first_k_dense_replace`` dense (``intermediate_size``), the rest MoE
  (``moe_intermediate_size``) with ``n_shared_experts`` ungated shared experts (one SwiGLU of width
  ``n_shared_experts * moe_intermediate_size``).
- V2 routing: softmax, top-k of all experts (``topk_method='greedy'``) or of the ``topk_group`` groups with
  the best max (``'group_limited_greedy'``), never renormalised (``norm_topk_prob`` has no effect), times
  ``routed_scaling_factor``.
- V3 routing (``noaux_tc``): sigmoid; the ``e_score_correction_bias`` is added for the choice only (moekit's
  ``selection_bias``); ``topk_group`` of ``n_group`` groups by the sum of their two best biased scores;
  renormalised by ``norm_topk_prob``, times ``routed_scaling_factor``.

Neither family has an auxiliary loss in transformers: ``load_balance_coef`` and ``z_loss_coef`` come in as 0.
"""

from __future__ import annotations

from typing import Any

from moekit.core.config import MLAConfig, ModelConfig
from moekit.core.hf_families import Family, refuse
from moekit.moe.config import MoEConfig

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with their default eps
_MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_V2_METHODS = ("greedy", "group_limited_greedy")
# MoEConfig fields the DeepSeek families map (on top of hf_moe_config.MOE_MAPPED).
DEEPSEEK_MOE_MAPPED = {"n_group", "topk_group", "group_score", "routed_scaling_factor", "selection_bias"}


# ---- HF -> moekit --------------------------------------------------------------------------------
def mla_from_hf(hf: dict[str, Any], fam: Family) -> MLAConfig:
    """``hf`` is the config with the family's class defaults filled in."""
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads < heads:
        refuse("num_key_value_heads", kv_heads, f"MLA has a key/value per query head; >= num_attention_heads={heads}")
    interleave = True if fam.deepseek == "v2" else hf["rope_interleave"]
    if not isinstance(interleave, bool):
        refuse("rope_interleave", interleave, "must be true or false")
    for name in _MLA_FIELDS:
        if name != "q_lora_rank" or hf[name] is not None:  # q_lora_rank null: a plain q projection (V2-Lite)
            _positive_int(hf, name)
    try:
        return MLAConfig(**{k: hf[k] for k in _MLA_FIELDS}, rope_interleave=interleave, latent_norm_eps=LATENT_NORM_EPS)
    except ValueError as err:
        refuse("qk_rope_head_dim", hf["qk_rope_head_dim"], str(err))


def _positive_int(hf: dict[str, Any], name: str, minimum: int = 1) -> int:
    value = hf[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        refuse(name, value, f"must be an integer >= {minimum}")
    return value


def _routing_from_hf(hf: dict[str, Any], fam: Family) -> dict[str, Any]:
    """Score function, groups, renormalisation and selection bias of ``fam``'s router."""
    if fam.deepseek == "v3":
        for name, only in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if hf.get(name, only) != only:
                refuse(name, hf[name], f"DeepSeek-V3 in transformers routes with {only!r} only")
        n_group, topk_group = _positive_int(hf, "n_group"), _positive_int(hf, "topk_group")
        if hf["norm_topk_prob"] and hf["num_experts_per_tok"] == 1:
            refuse("norm_topk_prob", True, "at num_experts_per_tok=1 it makes every weight 1 (not representable with "
                   "sigmoid scores); only false")  # fmt: skip
        return dict(score_func="sigmoid", renormalize=bool(hf["norm_topk_prob"]), n_group=n_group,
                    topk_group=topk_group, group_score="top2_sum", selection_bias=True)  # fmt: skip
    if hf.get("scoring_func", "softmax") != "softmax":
        refuse("scoring_func", hf["scoring_func"], "DeepSeek-V2 in transformers routes with 'softmax' only")
    method = hf["topk_method"]
    if method not in _V2_METHODS:
        refuse("topk_method", method, f"transformers' DeepSeek-V2 knows {_V2_METHODS}")
    groups = {}
    if method == "group_limited_greedy":
        groups = dict(n_group=_positive_int(hf, "n_group"), topk_group=_positive_int(hf, "topk_group"))
    return dict(score_func="softmax", renormalize=False, group_score="max", **groups)


def deepseek_moe_from_hf(hf: dict[str, Any], fam: Family) -> MoEConfig:
    n_layers = hf["num_hidden_layers"]
    first_moe = _positive_int(hf, "first_k_dense_replace", minimum=0)
    if first_moe >= n_layers:
        refuse("first_k_dense_replace", first_moe, f"leaves no MoE layer of num_hidden_layers={n_layers}")
    scale = hf["routed_scaling_factor"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        refuse("routed_scaling_factor", scale, "must be a number")
    selection = dict(every_n_layers=1) if first_moe == 0 else dict(layers=list(range(first_moe, n_layers)))
    try:
        return MoEConfig(
            num_experts=_positive_int(hf, "n_routed_experts"),
            top_k=_positive_int(hf, "num_experts_per_tok"),
            d_expert=_positive_int(hf, "moe_intermediate_size"),
            num_shared_experts=_positive_int(hf, "n_shared_experts"),
            router="topk",
            topk_order="softmax_then_topk",
            routed_scaling_factor=float(scale),
            capacity_factor=None,
            router_noise=0.0,
            router_jitter=0.0,
            load_balance_coef=0.0,
            z_loss_coef=0.0,
            **_routing_from_hf(hf, fam),
            **selection,
        )
    except ValueError as err:  # e.g. n_group not dividing the experts: name the HF routing fields
        routing = {k: hf.get(k) for k in ("n_group", "topk_group", "num_experts_per_tok")}
        refuse("n_group/topk_group/num_experts_per_tok", routing, str(err))


# ---- moekit -> HF --------------------------------------------------------------------------------
def check_deepseek_exportable(cfg: ModelConfig, fam: Family) -> None:
    """Refuse, naming the ``ModelConfig`` field, what ``fam`` cannot hold (MoE presence is checked by the caller)."""

    def bad(name: str, value: Any, allowed: str) -> None:
        raise ValueError(f"ModelConfig.{name}={value!r} has no {fam.architecture} equivalent: {allowed}")

    mla, moe = cfg.mla, cfg.moe
    if mla is None:
        bad("mla", None, f"{fam.title} needs multi-head latent attention (an MLAConfig)")
    if mla.latent_norm_eps != LATENT_NORM_EPS:
        bad("mla.latent_norm_eps", mla.latent_norm_eps, f"transformers fixes it at {LATENT_NORM_EPS}")
    if fam.deepseek == "v2" and not mla.rope_interleave:
        bad("mla.rope_interleave", False, "DeepSeek-V2 always rotates adjacent pairs; only True (or write DeepSeek-V3)")
    if moe is None:
        return
    kinds = cfg.ffn_kinds()
    first = kinds.index("moe")
    if "dense" in kinds[first:]:
        bad("moe.layers", moe.layers, "DeepSeek has dense layers first, then MoE only (first_k_dense_replace)")
    if moe.router != "topk":
        bad("moe.router", moe.router, "only 'topk'")
    for name in ("capacity_factor", "eval_capacity_factor", "modality_experts"):
        if getattr(moe, name) is not None:
            bad(f"moe.{name}", getattr(moe, name), "only None")
    if moe.shared_gate or moe.num_shared_experts < 1 or (moe.num_shared_experts * moe.shared_width) % moe.d_expert:
        bad("moe.num_shared_experts", moe.num_shared_experts,
            "needs >= 1 ungated shared experts of total width a multiple of d_expert (n_shared_experts)")  # fmt: skip
    grouped = moe.n_group > 1
    if fam.deepseek == "v3":
        if moe.score_func != "sigmoid":
            bad("moe.score_func", moe.score_func, "DeepSeek-V3 needs 'sigmoid'")
        if not (moe.selection_bias or moe.bias_update_rate > 0):
            bad("moe.selection_bias", False, "DeepSeek-V3 always has the correction bias; set selection_bias=True")
        if grouped and moe.group_score != "top2_sum":
            bad("moe.group_score", moe.group_score, "DeepSeek-V3 scores groups by 'top2_sum'")
        if moe.n_group * 2 > moe.num_experts:
            bad("moe.n_group", moe.n_group, "DeepSeek-V3 needs >= 2 experts per group")
        return
    if moe.score_func != "softmax":
        bad("moe.score_func", moe.score_func, "DeepSeek-V2 needs 'softmax'")
    if moe.topk_order != "softmax_then_topk" or (moe.renormalize and moe.top_k > 1):
        bad("moe.renormalize", moe.renormalize, "DeepSeek-V2 never renormalises: renormalize=False, softmax_then_topk")
    if moe.selection_bias or moe.bias_update_rate > 0:
        bad("moe.selection_bias", moe.selection_bias, "DeepSeek-V2 has no selection bias")
    if grouped and moe.group_score != "max":
        bad("moe.group_score", moe.group_score, "DeepSeek-V2 scores groups by 'max' (group_limited_greedy)")


def deepseek_to_hf(cfg: ModelConfig, fam: Family) -> dict[str, Any]:
    """The DeepSeek fields of ``cfg`` as ``fam`` (checked by :func:`check_deepseek_exportable` first)."""
    mla, moe = cfg.mla, cfg.moe
    assert mla is not None and moe is not None
    hf: dict[str, Any] = {k: getattr(mla, k) for k in _MLA_FIELDS}
    hf.update(
        head_dim=mla.qk_rope_head_dim,  # what transformers sets: the rotary width
        num_key_value_heads=cfg.n_heads,
        attention_bias=False,
        first_k_dense_replace=cfg.ffn_kinds().index("moe"),
        n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.d_expert,
        n_shared_experts=moe.num_shared_experts * moe.shared_width // moe.d_expert,
        routed_scaling_factor=moe.routed_scaling_factor,
        n_group=moe.n_group,
        topk_group=moe.n_group if moe.topk_group is None else moe.topk_group,
    )
    if fam.deepseek == "v3":
        # moekit keeps the raw score at top-1 whatever renormalize says; transformers' renormalised top-1 is 1.
        hf.update(rope_interleave=mla.rope_interleave, norm_topk_prob=moe.renormalize and moe.top_k > 1)
    else:
        grouped = moe.n_group > 1
        hf.update(
            topk_method="group_limited_greedy" if grouped else "greedy",
            n_group=moe.n_group if grouped else None,
            topk_group=hf["topk_group"] if grouped else None,
            norm_topk_prob=False,
            mlp_bias=False,
        )
    return hf
