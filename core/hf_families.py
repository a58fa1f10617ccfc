"""The HF converter's family table: for each Hugging Face ``*ForCausalLM`` family, its tensor names next to
moekit's, the config defaults of its transformers class, and what is refused (with the field, its value and
the missing feature).

Shapes: V vocab, D d_model, H/G query/kv heads, Dh head dim, F FFN / expert hidden width, E experts.

A weight layout is a list of :class:`Rule`; each rule names HF tensors and moekit tensors and converts one
way and back, so the two directions cannot drift apart:

- :class:`Same`: one tensor, renamed (both sides use ``nn.Linear`` ``[out, in]`` and the half-split RoPE
  convention, so attention needs no q/k permutation);
- :class:`Fused`: one HF tensor = moekit tensors concatenated along rows (Phi-3 ``qkv_proj``, ``gate_up_proj``);
- :class:`PerExpert`: per-expert HF Linear weights (``experts.{e}.w1.weight [F, D]``) <-> one stacked moekit
  tensor of ``x @ w`` matrices (``experts.w_gate [E, D, F]``), i.e. stacked and transposed;
- :class:`StackedExperts`: transformers 5's in-memory fused experts (``gate_up_proj [E, 2F, D]``) <-> moekit's
  stacked ones; read only by default (the classic per-expert layout is written, every version loads it).

Templates use ``{i}`` for the layer and ``{e}`` for the expert. Families whose checkpoints need a feature
moekit does not have yet are listed with ``missing`` so that the refusal names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.core.config import ModelConfig


# ---- weight rules --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """HF tensors ``hf`` <-> moekit tensors ``ours`` (name templates with ``{i}``/``{e}``)."""

    hf: tuple[str, ...]
    ours: tuple[str, ...]

    def hf_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [t.format(i=i) for t in self.hf]

    def ours_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [t.format(i=i) for t in self.ours]

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        raise NotImplementedError

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        raise NotImplementedError


class Same(Rule):
    def __init__(self, hf: str, ours: str) -> None:
        super().__init__((hf,), (ours,))

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return ts

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return ts


class Fused(Rule):
    """``hf = cat(ours, dim=0)``, with row counts ``sizes(cfg)``; parts are cloned so they own their memory."""

    def __init__(self, hf: str, ours: tuple[str, ...], sizes: Callable[[ModelConfig], tuple[int, ...]]) -> None:
        super().__init__((hf,), ours)
        object.__setattr__(self, "sizes", sizes)

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        sizes = self.sizes(cfg)
        if ts[0].shape[0] != sum(sizes):
            raise ValueError(f"has {ts[0].shape[0]} rows; the config implies {sum(sizes)} = {sizes}")
        return [p.clone() for p in ts[0].split(list(sizes), dim=0)]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.cat(ts, dim=0)]


class PerExpert(Rule):
    """HF ``{e}``-templated ``[out, in]`` Linear weights <-> moekit ``[E, in, out]``."""

    def __init__(self, hf: str, ours: str) -> None:
        super().__init__((hf,), (ours,))

    def hf_names(self, i: int, cfg: ModelConfig) -> list[str]:
        return [self.hf[0].format(i=i, e=e) for e in range(cfg.moe.num_experts)]

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.stack([t.t() for t in ts])]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [w.t().contiguous() for w in ts[0]]


class StackedExperts(Rule):
    """HF ``[E, k*out, in]`` (k parts along dim 1) <-> k moekit ``[E, in, out]`` tensors."""

    def __init__(self, hf: str, ours: tuple[str, ...]) -> None:
        super().__init__((hf,), ours)

    def to_ours(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [p.transpose(1, 2).contiguous() for p in ts[0].chunk(len(self.ours), dim=1)]

    def to_hf(self, ts: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
        return [torch.cat([w.transpose(1, 2) for w in ts], dim=1).contiguous()]


L, M = "model.layers.{i}", "layers.{i}"
GLOBAL_RULES: tuple[Rule, ...] = (
    Same("model.embed_tokens.weight", "embed.weight"),
    Same("model.norm.weight", "norm.weight"),
)
LM_HEAD = Same("lm_head.weight", "lm_head.weight")
NORMS = (
    Same(f"{L}.input_layernorm.weight", f"{M}.attn_norm.weight"),
    Same(f"{L}.post_attention_layernorm.weight", f"{M}.ffn_norm.weight"),
)
ATTN = tuple(
    Same(f"{L}.self_attn.{n}.weight", f"{M}.attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "o_proj")
)
QKV_BIAS = tuple(Same(f"{L}.self_attn.{n}.bias", f"{M}.attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj"))
OUT_BIAS = (Same(f"{L}.self_attn.o_proj.bias", f"{M}.attn.o_proj.bias"),)
QK_NORM = tuple(Same(f"{L}.self_attn.{n}.weight", f"{M}.attn.{n}.weight") for n in ("q_norm", "k_norm"))
DENSE_MLP = tuple(
    Same(f"{L}.mlp.{h}.weight", f"{M}.ffn.{o}.weight")
    for h, o in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
)
_X = f"{M}.ffn.experts"
MIXTRAL_MOE = (
    Same(f"{L}.block_sparse_moe.gate.weight", f"{M}.ffn.router.weight"),  # [E, D]
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w1.weight", f"{_X}.w_gate"),
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w3.weight", f"{_X}.w_up"),
    PerExpert(f"{L}.block_sparse_moe.experts.{{e}}.w2.weight", f"{_X}.w_down"),
)
MOE_FUSED = (  # transformers 5's in-memory layout (what model.state_dict() gives), every MoE family
    Same(f"{L}.mlp.gate.weight", f"{M}.ffn.router.weight"),
    StackedExperts(f"{L}.mlp.experts.gate_up_proj", (f"{_X}.w_gate", f"{_X}.w_up")),  # [E, 2F, D]: gate, then up
    StackedExperts(f"{L}.mlp.experts.down_proj", (f"{_X}.w_down",)),  # [E, D, F]
)
QWEN_MOE = (  # Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints on disk
    Same(f"{L}.mlp.gate.weight", f"{M}.ffn.router.weight"),  # [E, D]
    PerExpert(f"{L}.mlp.experts.{{e}}.gate_proj.weight", f"{_X}.w_gate"),
    PerExpert(f"{L}.mlp.experts.{{e}}.up_proj.weight", f"{_X}.w_up"),
    PerExpert(f"{L}.mlp.experts.{{e}}.down_proj.weight", f"{_X}.w_down"),
)
QWEN2_SHARED = tuple(  # the shared expert (width shared_expert_intermediate_size) and its sigmoid gate [1, D]
    Same(f"{L}.mlp.shared_expert.{h}.weight", f"{M}.ffn.shared.{o}.weight")
    for h, o in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down"))
) + (Same(f"{L}.mlp.shared_expert_gate.weight", f"{M}.ffn.shared_gate.weight"),)
PHI3_ATTN = (
    Fused(
        f"{L}.self_attn.qkv_proj.weight",  # rows: q (H*Dh), k (G*Dh), v (G*Dh)
        tuple(f"{M}.attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")),
        lambda c: (c.n_heads * c.dh, c.n_kv_heads * c.dh, c.n_kv_heads * c.dh),
    ),
    Same(f"{L}.self_attn.o_proj.weight", f"{M}.attn.o_proj.weight"),
)
PHI3_MLP = (
    Fused(
        f"{L}.mlp.gate_up_proj.weight", (f"{M}.ffn.w_gate.weight", f"{M}.ffn.w_up.weight"), lambda c: (c.d_ff, c.d_ff)
    ),
    Same(f"{L}.mlp.down_proj.weight", f"{M}.ffn.w_down.weight"),
)
# Buffers some old checkpoints carry; moekit recomputes RoPE tables on the fly.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- families ------------------------------------------------------------------------------------
_COMMON_DEFAULTS = dict(hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, rope_theta=10000.0)
# transformers 5.24 class defaults of the Qwen families (what a config.json without the field means).
_QWEN_DEFAULTS = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False)
_QWEN_MOE_DEFAULTS = dict(
    _QWEN_DEFAULTS,
    attention_bias=False,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    router_aux_loss_coef=0.001,
)


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
    Qwen2-MoE's gated shared expert.
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
    # Training-only fields (dropouts, router jitter): dropped on the way in, written as 0 on the way out.
    training_only: tuple[str, ...] = ("attention_dropout",)
    missing: str | None = None
    note: str = ""  # what converts, for --help

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layouts)

    def defaults_full(self) -> dict[str, Any]:
        return {**_COMMON_DEFAULTS, **self.defaults}


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
            dict(_QWEN_MOE_DEFAULTS, num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
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
        # ---- refused until moekit has the feature (issue 13) ----
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            "DeepseekV2ForCausalLM",
            "deepseek_v2",
            missing="multi-head latent attention (MLA), interleaved RoPE and group-limited routing",
        ),
        Family(
            "deepseek_v3",
            "DeepSeek-V3",
            "DeepseekV3ForCausalLM",
            "deepseek_v3",
            missing="multi-head latent attention (MLA), interleaved RoPE, group-limited routing with "
            "routed_scaling_factor and a score-correction bias",
        ),
        Family(
            "gpt_oss",
            "GPT-OSS",
            "GptOssForCausalLM",
            "gpt_oss",
            missing="attention sinks, alternating sliding-window attention, biases and clamped SwiGLU",
        ),
        Family(
            "granitemoe",
            "Granite-MoE",
            "GraniteMoeForCausalLM",
            "granitemoe",
            missing="Granite's embedding/residual/attention/logit multipliers",
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
    rules = fam.attn_layout
    if cfg.qkv_bias:
        rules += QKV_BIAS
    if cfg.out_bias:
        rules += OUT_BIAS
    if cfg.qk_norm != "none":
        rules += QK_NORM
    return rules


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
            lines.append(f"  {f.title:<12} {f.architecture:<24} --from-hf and --to-hf ({f.note})")
        else:
            lines.append(f"  {f.title:<12} {f.architecture:<24} refused: needs {f.missing}")
    return "\n".join(lines)
