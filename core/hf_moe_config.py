"""The MoE half of the HF config mapping (see :mod:`moekit.core.hf_config`): HF routing fields of each MoE
family <-> :class:`MoEConfig`, refusing by name what the other side cannot represent.

Every supported family but DeepSeek (:mod:`moekit.core.hf_deepseek`) routes the same way: softmax over all
experts, top-k, the selected probabilities renormalised or not (Mixtral always; the others by
``norm_topk_prob``); Granite-MoE takes the top-k logits first and softmaxes them, the same weights computed
in moekit's ``topk_then_softmax`` order. moekit skips renormalisation at top-1, where HF's renormalised
weight is 1.0: that is top-k-then-softmax. Layer selection: MoE at layer ``i`` unless ``i in mlp_only_layers``,
when ``(i + 1) % decoder_sparse_step == 0`` (Qwen) -> moekit's ``every_n_layers`` (no ``mlp_only_layers``) or
an explicit ``layers`` list.
"""

from __future__ import annotations

from typing import Any

from moekit.core.config import ModelConfig
from moekit.core.hf_families import Family, refuse
from moekit.moe.config import MoEConfig

# MoEConfig fields an HF checkpoint does not need (training, telemetry, placement).
MOE_INERT = {
    "load_balance_coef", "z_loss_coef", "router_jitter", "balance_scope", "router_dtype", "dispatch",
    "dead_expert_window", "expert_parallel_size", "num_groups", "local_entropy_coef", "global_entropy_coef",
    "global_entropy_threshold", "entropy_groups", "extra", "drop_policy", "router_noise",
}  # fmt: skip
MOE_MAPPED = {
    "num_experts", "top_k", "d_expert", "num_shared_experts", "d_shared", "shared_gate", "router", "score_func",
    "topk_order", "renormalize", "capacity_factor", "eval_capacity_factor", "bias_update_rate", "every_n_layers",
    "layers", "modality_experts",
}  # fmt: skip
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts")  # transformers aliases one to the other


def _num_experts(hf_cfg: dict[str, Any], hf: dict[str, Any], fam: Family) -> int:
    given = {k: hf_cfg[k] for k in _EXPERT_COUNT_FIELDS if hf_cfg.get(k) is not None}
    if len(set(given.values())) > 1:
        refuse("num_experts", given, "num_experts and num_local_experts disagree")
    return next(iter(given.values())) if given else hf[fam.experts_field]


def _layer_selection(hf: dict[str, Any], fam: Family) -> dict[str, Any]:
    if not fam.sparse_step:
        return dict(every_n_layers=1)
    step, dense = hf["decoder_sparse_step"], hf["mlp_only_layers"] or []
    if not isinstance(step, int) or step < 1:
        refuse("decoder_sparse_step", step, "must be an integer >= 1")
    if not dense:
        return dict(every_n_layers=step)
    return dict(layers=[i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0])


def moe_from_hf(hf_cfg: dict[str, Any], hf: dict[str, Any], fam: Family) -> MoEConfig:
    """``hf`` is the config with the family's class defaults filled in, ``hf_cfg`` the file as written.

    HF's load-balancing loss counts top-k assignments per token (``top_k`` times moekit's per-layer loss)
    and pools its statistics over the MoE layers where moekit sums per-layer losses, hence
    ``load_balance_coef = router_aux_loss_coef * top_k / n_moe_layers`` (exact when the layers route alike).
    None of these families has a z-loss.
    """
    top_k = hf["num_experts_per_tok"]
    renorm = bool(hf["norm_topk_prob"]) if fam.norm_topk else True
    shared = {}
    if fam.shared_expert:
        width = hf["shared_expert_intermediate_size"]
        if not isinstance(width, int) or width < 1:
            refuse("shared_expert_intermediate_size", width, "must be an integer >= 1")
        shared = dict(num_shared_experts=1, d_shared=width, shared_gate=True)
    elif fam.ungated_shared is not None:
        width = hf[fam.ungated_shared]
        if not isinstance(width, int) or width < 0:
            refuse(fam.ungated_shared, width, "must be an integer >= 0 (0 = no shared expert)")
        shared = dict(num_shared_experts=1, d_shared=width) if width else {}
    selection = _layer_selection(hf, fam)
    n_layers = hf["num_hidden_layers"]
    n_moe = len(selection["layers"]) if "layers" in selection else n_layers // selection["every_n_layers"]
    return MoEConfig(
        num_experts=_num_experts(hf_cfg, hf, fam),
        top_k=top_k,
        d_expert=hf[fam.expert_width_field],
        router="topk",
        score_func="softmax",
        topk_order="topk_then_softmax" if fam.topk_first or (renorm and top_k == 1) else "softmax_then_topk",
        renormalize=renorm,
        capacity_factor=None,
        router_noise=0.0,
        router_jitter=0.0,
        load_balance_coef=hf["router_aux_loss_coef"] * top_k / max(n_moe, 1),
        z_loss_coef=0.0,
        **shared,
        **selection,
    )


def check_moe_exportable(cfg: ModelConfig, fam: Family) -> None:
    moe = cfg.moe
    assert moe is not None

    def bad(name: str, allowed: str) -> None:
        raise ValueError(
            f"ModelConfig.moe.{name}={getattr(moe, name)!r} has no {fam.architecture} equivalent: {allowed}"
        )

    if not fam.sparse_step and not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        bad("every_n_layers" if moe.layers is None else "layers", f"{fam.title} needs every layer to be MoE")
    if moe.router != "topk":
        bad("router", "only 'topk'")
    if moe.score_func != "softmax":
        bad("score_func", "only 'softmax'")
    if not fam.norm_topk and not renormalised(moe):
        bad("renormalize", "use renormalize=True with top_k > 1, or topk_order='topk_then_softmax'")
    for name in ("capacity_factor", "eval_capacity_factor", "modality_experts"):
        if getattr(moe, name) is not None:
            bad(name, "only None")
    if fam.shared_expert:
        if not (moe.num_shared_experts >= 1 and moe.shared_gate):
            bad("shared_gate", f"{fam.title} needs shared experts with shared_gate=True")
    elif fam.ungated_shared is not None:
        if moe.shared_gate:
            bad("shared_gate", f"{fam.title}'s shared expert has no gate; only False")
    else:
        if moe.num_shared_experts:
            bad("num_shared_experts", "only 0")
        if moe.shared_gate:
            bad("shared_gate", "only False")
    if moe.bias_update_rate:
        bad("bias_update_rate", "only 0 (no selection bias)")


def renormalised(moe: MoEConfig) -> bool:
    """Whether the combine weights are the selected probabilities renormalised to sum to 1."""
    return moe.topk_order == "topk_then_softmax" or (moe.renormalize and moe.top_k > 1)


def moe_to_hf(cfg: ModelConfig, fam: Family) -> dict[str, Any]:
    """The HF MoE fields of ``cfg`` as ``fam`` (checked by :func:`check_moe_exportable` first)."""
    moe = cfg.moe
    assert moe is not None
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    hf: dict[str, Any] = {
        fam.experts_field: moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        fam.expert_width_field: moe.d_expert,
        "router_aux_loss_coef": moe.load_balance_coef * n_moe / moe.top_k,
    }
    if fam.norm_topk:
        hf["norm_topk_prob"] = renormalised(moe)
    if fam.sparse_step:
        if moe.layers is None:
            hf.update(decoder_sparse_step=moe.every_n_layers, mlp_only_layers=[])
        else:
            hf.update(decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe.layers])
    if fam.shared_expert:
        hf["shared_expert_intermediate_size"] = moe.num_shared_experts * moe.shared_width
    if fam.ungated_shared is not None:  # the shared experts side by side are one expert of their total width
        hf[fam.ungated_shared] = moe.num_shared_experts * moe.shared_width if moe.num_shared_experts else 0
    return hf
