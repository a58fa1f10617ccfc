"""The HF converter's family table: for each Hugging Face ``*ForCausalLM`` family, its tensor names (weight
rules of :mod:`moekit.core.hf_rules`), the config defaults of its transformers class, and what is refused (with
the field, its value and the missing feature).

Families whose checkpoints need a feature moekit does not have yet are listed with ``missing`` so that the
refusal names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moekit.core.config import ModelConfig
from moekit.core.hf_rules import (
    ATTN,
    CORRECTION_BIAS,
    DEEPSEEK_SHARED,
    DENSE_MLP,
    GLOBAL_RULES,
    GRANITE_MOE,
    GRANITE_MOE_FUSED,
    GRANITE_SHARED,
    IGNORED_SUFFIXES,
    LM_HEAD,
    MIXTRAL_MOE,
    MLA_KV,
    MLA_Q,
    MLA_Q_LORA,
    MOE_FUSED,
    NORMS,
    OUT_BIAS,
    PHI3_ATTN,
    PHI3_MLP,
    QK_NORM,
    QKV_BIAS,
    QWEN2_SHARED,
    QWEN_MOE,
    Fused,
    PerExpert,
    Rule,
    Same,
    StackedExperts,
)

__all__ = [  # the weight rules stay importable from here
    "GLOBAL_RULES", "IGNORED_SUFFIXES", "LM_HEAD", "NORMS", "Fused", "PerExpert", "Rule", "Same", "StackedExperts",
]  # fmt: skip


# ---- families ------------------------------------------------------------------------------------
_COMMON_DEFAULTS = dict(hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, rope_theta=10000.0)
# transformers 5.24 class defaults of the Qwen families (what a config.json without the field means). Their
# num_key_value_heads defaults are fixed numbers (not num_attention_heads, as Llama's None means), set per family.
_QWEN_DEFAULTS = dict(
    max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False, num_key_value_heads=32
)
_QWEN_MOE_DEFAULTS = dict(
    _QWEN_DEFAULTS,
    attention_bias=False,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)


# transformers 5.24 class defaults shared by DeepSeek-V2 and V3 (what a config.json without the field means).
# transformers 5.24 class defaults of the Granite families; the multipliers default to 1.0, attention's too.
_GRANITE_DEFAULTS = dict(
    max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False, embedding_multiplier=1.0,
    logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0,
)  # fmt: skip
_GRANITE_MOE_DEFAULTS = dict(
    _GRANITE_DEFAULTS, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001
)  # fmt: skip


_DEEPSEEK_DEFAULTS = dict(
    rms_norm_eps=1e-6, attention_bias=False, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128,
)  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One HF model family: names, transformers-class defaults, weight layouts, and what is refused.

    ``moe_layouts``: alternative layouts of an MoE feed-forward (the first is written, any is read);
    ``dense_layout`` None means the family has no dense feed-forward layers. ``missing`` (a sentence
    naming the features moekit lacks) makes the whole family a clear refusal. ``window_field``: the family
    has a ``sliding_window`` field (every layer); ``window_flag``: ``use_sliding_window`` decides whether
    ``sliding_window`` applies at all, on the layers ``layer_types`` / ``max_window_layers`` name (Qwen).

    Attention: ``bias`` is None (no projection biases), or (HF flag field or None for always on, "all" for
    q/k/v/o or "qkv"); ``qk_norm`` the family's fixed QK-norm ("none", "head", "full"); ``clip_qkv``
    whether it has OLMoE's field; ``head_dim_free`` whether ``head_dim`` may differ from hidden/heads.
    MoE: ``experts_field`` / ``expert_width_field`` name the expert count and width; ``norm_topk`` the
    family has ``norm_topk_prob`` (else the top-k weights are always renormalised, Mixtral);
    ``sparse_step`` it has ``decoder_sparse_step`` / ``mlp_only_layers``; ``shared_expert`` it has
    Qwen2-MoE's gated shared expert; ``ungated_shared`` names the width field of an ungated shared expert
    (0 = none; GraniteMoeShared); ``topk_first`` the router softmaxes the top-k logits (Granite-MoE).
    ``granite``: the four Granite multipliers (embedding, residual, attention softmax scale, logits).
    """

    name: str
    title: str
    architecture: str
    model_type: str
    defaults: dict[str, Any] = field(default_factory=dict)
    attn_layout: tuple[Rule, ...] = ATTN
    dense_layout: tuple[Rule, ...] | None = DENSE_MLP
    moe_layouts: tuple[tuple[Rule, ...], ...] = ()
    window_field: bool = False
    window_flag: bool = False
    rope_types: tuple[str, ...] = ("default", "llama3", "yarn")
    bias: tuple[str | None, str] | None = None
    qk_norm: str = "none"
    clip_qkv: bool = False
    head_dim_free: bool = True
    experts_field: str = "num_local_experts"
    expert_width_field: str = "intermediate_size"
    norm_topk: bool = False
    sparse_step: bool = False
    shared_expert: bool = False
    ungated_shared: str | None = None
    topk_first: bool = False
    granite: bool = False
    # Training-only fields (dropouts, router jitter): dropped on the way in, written as 0 on the way out.
    training_only: tuple[str, ...] = ("attention_dropout",)
    # "v2" / "v3": multi-head latent attention and DeepSeek routing (config mapping in moekit.core.hf_deepseek)
    deepseek: str | None = None
    # Tensors of layers past num_hidden_layers are not read (DeepSeek-V3's multi-token-prediction modules,
    # which transformers ignores too); a round trip does not write them back.
    extra_layers_ignored: bool = False
    # (moekit, HF) name suffixes of tensors transformers keeps in float32 when the model is loaded in fp16 or
    # bf16 (its _keep_in_fp32_modules_strict): such a --dtype leaves them float32, both ways.
    fp32_tensors: tuple[tuple[str, str], ...] = ()
    missing: str | None = None
    note: str = ""  # what converts, for --help

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layouts)

    def defaults_full(self) -> dict[str, Any]:
        return {**_COMMON_DEFAULTS, **self.defaults}


# Both Granite-MoE classes: all four attention biases or none, every layer MoE, softmax over the top-k logits.
_GRANITE_MOE_LAYOUT: dict[str, Any] = dict(
    bias=("attention_bias", "all"), dense_layout=None, moe_layouts=(GRANITE_MOE, GRANITE_MOE_FUSED), topk_first=True,
    granite=True,
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            "Llama",
            "LlamaForCausalLM",
            "llama",
            dict(max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False),
            bias=("attention_bias", "all"),
            note="default, llama3 or yarn RoPE; attention_bias",
        ),
        Family(
            "mistral",
            "Mistral",
            "MistralForCausalLM",
            "mistral",
            dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, num_key_value_heads=8, sliding_window=4096),
            window_field=True,
            note="sliding_window (every layer) or null",
        ),
        Family(
            "phi3",
            "Phi-3",
            "Phi3ForCausalLM",
            "phi3",
            dict(max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064),
            attn_layout=PHI3_ATTN,
            dense_layout=PHI3_MLP,
            window_field=True,
            rope_types=("default",),
            training_only=("attention_dropout", "resid_pdrop", "embd_pdrop"),
            note="fused qkv/gate_up split; no longrope",
        ),
        Family(
            "mixtral",
            "Mixtral",
            "MixtralForCausalLM",
            "mixtral",
            dict(
                max_position_embeddings=4096 * 32,
                rms_norm_eps=1e-5,
                rope_theta=1e6,
                num_key_value_heads=8,
                num_experts_per_tok=2,
                num_local_experts=8,
                router_aux_loss_coef=0.001,
                sliding_window=None,
            ),
            dense_layout=None,
            moe_layouts=(MIXTRAL_MOE, MOE_FUSED),
            window_field=True,
            # Mixtral's jitter also scales the experts' input, but only in training.
            training_only=("attention_dropout", "router_jitter_noise"),
            note="every layer MoE; sliding_window",
        ),
        Family(
            "qwen2",
            "Qwen2",
            "Qwen2ForCausalLM",
            "qwen2",
            dict(_QWEN_DEFAULTS, max_window_layers=28),
            window_flag=True,
            bias=(None, "qkv"),
            note="q/k/v biases; sliding window on all layers or none",
        ),
        Family(
            "qwen3",
            "Qwen3",
            "Qwen3ForCausalLM",
            "qwen3",
            dict(_QWEN_DEFAULTS, head_dim=128, attention_bias=False, max_window_layers=28),
            window_flag=True,
            bias=("attention_bias", "all"),
            qk_norm="head",
            note="per-head QK-norm, explicit head_dim",
        ),
        Family(
            "qwen3_moe",
            "Qwen3-MoE",
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            dict(
                _QWEN_MOE_DEFAULTS,
                num_key_value_heads=4,
                num_local_experts=128,
                num_experts_per_tok=8,
                moe_intermediate_size=768,
            ),
            window_flag=True,
            bias=("attention_bias", "all"),
            qk_norm="head",
            moe_layouts=(QWEN_MOE, MOE_FUSED),
            expert_width_field="moe_intermediate_size",
            norm_topk=True,
            sparse_step=True,
            note="per-head QK-norm; decoder_sparse_step, mlp_only_layers",
        ),
        Family(
            "olmoe",
            "OLMoE",
            "OlmoeForCausalLM",
            "olmoe",
            dict(
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
                attention_bias=False,
                clip_qkv=None,
                norm_topk_prob=False,
                num_experts=64,
                num_experts_per_tok=8,
                router_aux_loss_coef=0.01,
            ),
            bias=("attention_bias", "all"),
            qk_norm="full",
            clip_qkv=True,
            head_dim_free=False,
            dense_layout=None,
            moe_layouts=(QWEN_MOE, MOE_FUSED),
            experts_field="num_experts",
            norm_topk=True,
            note="full-width QK-norm, clip_qkv; every layer MoE",
        ),
        Family(
            "qwen2_moe",
            "Qwen2-MoE",
            "Qwen2MoeForCausalLM",
            "qwen2_moe",
            dict(
                _QWEN_MOE_DEFAULTS,
                num_key_value_heads=16,
                qkv_bias=True,
                max_window_layers=28,
                num_experts=60,
                num_experts_per_tok=4,
                moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632,
            ),
            window_flag=True,
            bias=("qkv_bias", "qkv"),
            moe_layouts=(QWEN_MOE + QWEN2_SHARED, MOE_FUSED + QWEN2_SHARED),
            experts_field="num_experts",
            expert_width_field="moe_intermediate_size",
            norm_topk=True,
            sparse_step=True,
            shared_expert=True,
            note="q/k/v biases, sigmoid-gated shared expert",
        ),
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            "DeepseekV2ForCausalLM",
            "deepseek_v2",
            dict(
                _DEEPSEEK_DEFAULTS,
                max_position_embeddings=2048,
                first_k_dense_replace=0,
                n_group=None,
                n_routed_experts=64,
                n_shared_experts=2,
                routed_scaling_factor=1.0,
                topk_group=None,
                topk_method="greedy",
                norm_topk_prob=False,
                num_experts_per_tok=None,
                moe_intermediate_size=1407,
                mlp_bias=False,
            ),  # fmt: skip
            moe_layouts=(QWEN_MOE + DEEPSEEK_SHARED, MOE_FUSED + DEEPSEEK_SHARED),
            rope_types=("default", "yarn"),
            experts_field="n_routed_experts",
            expert_width_field="moe_intermediate_size",
            deepseek="v2",
            fp32_tensors=(("ffn.router.weight", "mlp.gate.weight"),),
            note="MLA (interleaved RoPE, yarn), greedy or group-limited (max) softmax routing, shared experts, "
            "first_k_dense_replace",
        ),
        Family(
            "deepseek_v3",
            "DeepSeek-V3",
            "DeepseekV3ForCausalLM",
            "deepseek_v3",
            dict(
                _DEEPSEEK_DEFAULTS,
                max_position_embeddings=4096,
                first_k_dense_replace=3,
                n_group=8,
                n_routed_experts=256,
                n_shared_experts=1,
                routed_scaling_factor=2.5,
                topk_group=4,
                norm_topk_prob=True,
                num_experts_per_tok=8,
                moe_intermediate_size=2048,
                rope_interleave=True,
            ),
            # fmt: skip
            moe_layouts=(
                QWEN_MOE + DEEPSEEK_SHARED + CORRECTION_BIAS,
                MOE_FUSED + DEEPSEEK_SHARED + CORRECTION_BIAS,
            ),
            rope_types=("default", "yarn"),
            experts_field="n_routed_experts",
            expert_width_field="moe_intermediate_size",
            norm_topk=True,
            deepseek="v3",
            fp32_tensors=(
                ("ffn.router.weight", "mlp.gate.weight"),
                ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias"),
            ),
            extra_layers_ignored=True,
            note="MLA (rope_interleave, yarn), sigmoid group-limited (top-2 sum) routing with the correction "
            "bias, shared experts, first_k_dense_replace",
        ),
        Family(
            "granite",
            "Granite",
            "GraniteForCausalLM",
            "granite",
            dict(_GRANITE_DEFAULTS, mlp_bias=False),
            bias=("attention_bias", "all"),
            granite=True,
            note="embedding/residual/attention/logit multipliers; attention_bias",
        ),
        Family(
            "granitemoe",
            "Granite-MoE",
            "GraniteMoeForCausalLM",
            "granitemoe",
            _GRANITE_MOE_DEFAULTS,
            **_GRANITE_MOE_LAYOUT,
            note="Granite multipliers; every layer MoE, softmax over the top-k logits",
        ),
        Family(
            "granitemoeshared",
            "Granite-MoE-Shared",
            "GraniteMoeSharedForCausalLM",
            "granitemoeshared",
            dict(_GRANITE_MOE_DEFAULTS, shared_intermediate_size=0),
            **_GRANITE_MOE_LAYOUT,
            ungated_shared="shared_intermediate_size",
            note="Granite-MoE with an ungated shared expert",
        ),
        # ---- refused until moekit has the feature (issue 13) ----
        Family(
            "gpt_oss",
            "GPT-OSS",
            "GptOssForCausalLM",
            "gpt_oss",
            missing="attention sinks, alternating sliding-window attention, biases and clamped SwiGLU",
        ),
    )
}
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
SUPPORTED = tuple(f.name for f in FAMILIES.values() if f.missing is None)
WRITABLE_DENSE = tuple(f.name for f in FAMILIES.values() if f.missing is None and not f.is_moe)
WRITABLE_MOE = tuple(f.name for f in FAMILIES.values() if f.missing is None and f.is_moe)


def attention_rules(fam: Family, cfg: ModelConfig) -> tuple[Rule, ...]:
    """The family's attention tensors plus the biases and QK-norm gains ``cfg`` has."""
    if cfg.mla is not None:
        return (MLA_Q if cfg.mla.q_lora_rank is None else MLA_Q_LORA) + MLA_KV
    rules = fam.attn_layout
    if cfg.qkv_bias:
        rules += QKV_BIAS
    if cfg.out_bias:
        rules += OUT_BIAS
    if cfg.qk_norm != "none":
        rules += QK_NORM
    return rules


def shared_rules(fam: Family, cfg: ModelConfig) -> tuple[Rule, ...]:
    """The ungated shared expert's tensors of an MoE layer, when the family has one and ``cfg`` uses it."""
    has_shared = cfg.moe is not None and cfg.moe.num_shared_experts > 0
    return GRANITE_SHARED if fam.ungated_shared is not None and has_shared else ()


def refuse(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"HF config field {field_name}={value!r} cannot be converted to moekit: {allowed}")


def detect_family(hf_cfg: dict[str, Any]) -> Family:
    """The :class:`Family` of an HF ``config.json`` dict, from ``architectures`` and/or ``model_type``.

    Unknown families, disagreeing fields and families that need a missing feature are refused by name.
    """
    archs = hf_cfg.get("architectures") or []
    by_arch = {BY_ARCHITECTURE[a].name for a in archs if a in BY_ARCHITECTURE}
    model_type = hf_cfg.get("model_type")
    supported = ", ".join(f"{f.architecture} ({f.model_type})" for f in FAMILIES.values() if f.missing is None)
    if archs and not by_arch:
        refuse("architectures", archs, f"supported architectures are {supported}")
    if len(by_arch) > 1:
        refuse("architectures", archs, "must name exactly one architecture")
    if model_type is not None and model_type not in BY_MODEL_TYPE:
        refuse("model_type", model_type, f"supported are {supported}")
    if by_arch and model_type is not None and BY_MODEL_TYPE[model_type].name not in by_arch:
        refuse("model_type", model_type, f"does not match architectures={archs}")
    if not by_arch and model_type is None:
        raise ValueError(f"HF config has neither 'architectures' nor 'model_type'; supported are {supported}")
    fam = FAMILIES[by_arch.pop()] if by_arch else BY_MODEL_TYPE[model_type]
    if fam.missing is not None:
        key, value = ("architectures", archs) if archs else ("model_type", model_type)
        refuse(key, value, f"{fam.title} needs {fam.missing} (not supported yet)")
    return fam


def family_table() -> str:
    """One line per family: what converts in which direction, or what it needs; used by ``--help``."""
    lines = []
    for f in FAMILIES.values():
        if f.missing is None:
            lines.append(f"  {f.title:<18} {f.architecture:<28} --from-hf and --to-hf ({f.note})")
        else:
            lines.append(f"  {f.title:<18} {f.architecture:<28} refused: needs {f.missing}")
    return "\n".join(lines)
