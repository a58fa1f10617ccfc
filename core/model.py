"""The decoder-only transformer with a pluggable feed-forward slot (dense SwiGLU or routed MoE).

Shapes: B batch, T new tokens, S key/value length (cache + new), D d_model, V vocab.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.config import ModelConfig
from moekit.core.generate import generate
from moekit.core.inputs import check_token_ids
from moekit.core.layers import Attention, LayerKV, RMSNorm, SwiGLU, rope_cos_sin
from moekit.core.mla import LatentKV, MLAttention
from moekit.core.pretrained import load_weights, read_config, save_pretrained_folder
from moekit.moe.layer import MoELayer

IGNORE_INDEX = -100

# One entry per layer: expanded keys/values (Attention) or the compressed latent (MLAttention).
KVCache = list[LayerKV | LatentKV]


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None = None  # mean next-token CE over labels != IGNORE_INDEX; excludes aux_loss
    aux_loss: Tensor | None = None  # weighted sum of the MoE layers' auxiliary losses (0 for dense)
    moe_losses: dict[str, Tensor] = field(default_factory=dict)  # layer-summed, unweighted
    moe_stats: list[Any] = field(default_factory=list)  # one RoutingStats per MoE layer
    past_key_values: KVCache | None = None
    hidden_states: Tensor | None = None  # final normed hidden states [B, T, D]


class Block(nn.Module):
    """Pre-norm residual block: x + s * attn(norm(x)), then x + s * ffn(norm(x)), s = ``cfg.residual_scale``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn: nn.Module = Attention.from_config(cfg) if cfg.mla is None else MLAttention.from_config(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if self.is_moe:
            out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
            self.ffn: nn.Module = MoELayer(cfg.d_model, cfg.moe, init_std=cfg.init_std, out_init_std=out_std)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)
        self.residual_scale = cfg.residual_scale

    def _residual(self, x_btd: Tensor, out_btd: Tensor) -> Tensor:
        out_btd = self.drop(out_btd)
        # Skipped at 1.0 so that models without Granite's scaling compute exactly what they did before it.
        return x_btd + (out_btd if self.residual_scale == 1.0 else out_btd * self.residual_scale)

    def forward(
        self,
        x_btd: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask_b1ts: Tensor | None,
        past: LayerKV | LatentKV | None,
        token_mask_bt: Tensor | None,
        group_ids_bt: Tensor | None,
    ) -> tuple[Tensor, LayerKV | LatentKV, Any]:
        a, kv = self.attn(self.attn_norm(x_btd), cos, sin, mask_b1ts, past)
        x_btd = self._residual(x_btd, a)
        h = self.ffn_norm(x_btd)
        moe_out = None
        if self.is_moe:
            moe_out = self.ffn(h, token_mask=token_mask_bt, group_ids=group_ids_bt)
            f = moe_out.y
        else:
            f = self.ffn(h)
        return self._residual(x_btd, f), kv, moe_out


def _check_like_bt(name: str, t: Tensor | None, B: int, T: int, batch_may_broadcast: bool = False) -> None:
    """``t`` is None or ``[B, T]`` (``[1, T]`` too when ``batch_may_broadcast``)."""
    if t is None:
        return
    ok = t.dim() == 2 and t.shape[1] == T and (t.shape[0] == B or (batch_may_broadcast and t.shape[0] == 1))
    if not ok:
        want = f"[B, T]=[{B}, {T}]" + (" or [1, T]" if batch_may_broadcast else "")
        raise ValueError(f"{name} must be {want}; got shape {tuple(t.shape)}")


def _check_attention_mask(mask: Tensor, B: int, H: int, T: int, S: int) -> None:
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(
            f"attention_mask must be bool or integer (1 / True = may attend); got dtype {mask.dtype} "
            "(additive float masks are not supported)"
        )
    two_d = mask.dim() == 2 and tuple(mask.shape) == (B, S)
    four_d = mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H) and mask.shape[2:] == (T, S)
    if not (two_d or four_d):
        raise ValueError(
            f"attention_mask must be a padding mask [B, S]=[{B}, {S}] or a bool mask [B, 1, T, S]=[{B}, 1, {T}, {S}] "
            f"(batch dim 1 or B, head dim 1 or n_heads={H}; S = cached + new tokens); got shape {tuple(mask.shape)}"
        )


def build_attention_mask(
    attention_mask: Tensor | None,
    B: int,
    T: int,
    past_len: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> Tensor | None:
    """Combine causality with a padding mask. Returns a bool [B, 1, T, S] mask or None (plain causal).

    ``attention_mask`` is a [B, S] padding mask (1 = real) or a ready [B, 1, T, S] bool mask. Every
    query may always see itself so that padding rows never softmax over an empty set (NaNs). With
    ``sliding_window`` a query at sequence index i sees keys j > i - sliding_window only (indices count
    padding, as transformers does).
    """
    S = past_len + T
    q_pos = torch.arange(past_len, S, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
    band_ts = None if sliding_window is None or S <= sliding_window else k_pos > q_pos - sliding_window
    if attention_mask is not None and attention_mask.dim() == 4:
        if tuple(attention_mask.shape[-2:]) != (T, S):
            raise ValueError(f"4-D attention_mask must end in (T, S)=({T}, {S}); got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(torch.bool)
        return mask if band_ts is None else mask & band_ts
    if attention_mask is None and past_len == 0 and band_ts is None:
        return None  # SDPA's is_causal path
    mask_ts = k_pos <= q_pos
    if band_ts is not None:
        mask_ts = mask_ts & band_ts
    mask = mask_ts[None, None].expand(B, 1, T, S)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"2-D attention_mask must be [B, S]=[{B}, {S}]; got {tuple(attention_mask.shape)}")
        mask = mask & attention_mask.to(torch.bool)[:, None, None, :]
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class Transformer(nn.Module):
    """Decoder-only LM: embeddings, RoPE, pre-norm blocks (GQA or latent attention + dense/MoE FFN), tied or
    untied head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Drawn before any submodule consumes the global RNG: a dense and a MoE model built after the same
        # torch.manual_seed then start from the same weights in every parameter they share (embeddings,
        # attention, norms, head), so a paired comparison differs in the FFN alone.
        self._init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-output projections shrink with depth (GPT-2) so the residual stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            # One generator per parameter name: a parameter's initial value does not depend on which
            # other modules exist (see _init_seed).
            gen = None
            if not p.is_meta:
                seed = (self._init_seed + zlib.crc32(name.encode()) * 0x9E3779B97F4A7C15) % 2**63
                gen = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("_proj.bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "ffn.w_down.weight")):
                nn.init.normal_(p, 0.0, out_std, generator=gen)
            elif ".ffn." in name and not name.endswith(("w_gate.weight", "w_up.weight")):
                continue  # MoE layers initialise their own router/experts
            else:
                nn.init.normal_(p, 0.0, std, generator=gen)

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [blk.ffn for blk in self.layers if blk.is_moe]

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        group_ids: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> ModelOutput:
        """Run the model. ``labels`` are aligned with positions (labels[t] is the target after token t).

        ``token_mask`` ([B, T] bool, True = real) tells MoE layers which tokens to route; by default it is
        derived from a 2-D ``attention_mask``. ``group_ids`` ([B, T] long) feeds routing telemetry
        (e.g. modality ids).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Transformer.forward: pass exactly one of input_ids or inputs_embeds")
        B, T = self._check_inputs(input_ids, inputs_embeds)
        if past_key_values and len(past_key_values) != self.cfg.n_layers:
            raise ValueError(
                f"past_key_values has {len(past_key_values)} layers; the model has n_layers={self.cfg.n_layers}"
            )
        past_len = 0 if not past_key_values else past_key_values[0].seq_len
        if past_len + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past_len + T} exceeds ModelConfig.max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is not None:
            _check_attention_mask(attention_mask, B, self.cfg.n_heads, T, past_len + T)
        _check_like_bt("position_ids", position_ids, B, T, batch_may_broadcast=True)
        for name, t in (("labels", labels), ("group_ids", group_ids), ("token_mask", token_mask)):
            _check_like_bt(name, t, B, T)
        if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
            raise ValueError(f"labels must be integer token ids ({IGNORE_INDEX} = ignored); got dtype {labels.dtype}")
        x_btd = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.cfg.embed_scale != 1.0:  # on inputs_embeds too, as transformers' Granite does
            x_btd = x_btd * self.cfg.embed_scale
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x_btd.device).expand(B, T)
        cfg = self.cfg
        cos, sin = rope_cos_sin(position_ids, cfg.rope_dim, cfg.rope_theta, x_btd.dtype, cfg.rope_scaling)
        mask = build_attention_mask(attention_mask, B, T, past_len, x_btd.device, self.cfg.sliding_window)
        if token_mask is None and attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, past_len:].to(torch.bool)

        x_btd = self.drop(x_btd)
        new_cache: KVCache = []
        aux = x_btd.new_zeros((), dtype=torch.float32)
        moe_losses: dict[str, Tensor] = {}
        moe_stats: list[Any] = []
        for i, blk in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            x_btd, kv, moe_out = blk(x_btd, cos, sin, mask, past, token_mask, group_ids)
            if use_cache:
                new_cache.append(kv)
            if moe_out is not None:
                aux = aux + moe_out.aux_loss
                for k, v in moe_out.losses.items():
                    moe_losses[k] = moe_losses.get(k, 0.0) + v
                moe_stats.append(moe_out.stats)
        h = self.norm(x_btd)
        logits = self.lm_head(h)  # [B, T, V]
        if cfg.logit_divisor != 1.0:
            logits = logits / cfg.logit_divisor
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels)
        return ModelOutput(
            logits=logits,
            loss=loss,
            aux_loss=aux,
            moe_losses=moe_losses,
            moe_stats=moe_stats,
            past_key_values=new_cache if use_cache else None,
            hidden_states=h,
        )

    def _check_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> tuple[int, int]:
        """(B, T) of valid ``input_ids`` or ``inputs_embeds``; named errors before any computation."""
        if input_ids is not None:
            check_token_ids(input_ids, self.cfg.vocab_size, "input_ids")
            return input_ids.shape[0], input_ids.shape[1]
        D = self.cfg.d_model
        if not isinstance(inputs_embeds, Tensor) or not inputs_embeds.is_floating_point():
            got = inputs_embeds.dtype if isinstance(inputs_embeds, Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds must be a floating-point Tensor [B, T, D={D}]; got {got}")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != D:
            raise ValueError(f"inputs_embeds must be [B, T, D={D}]; got shape {tuple(inputs_embeds.shape)}")
        if inputs_embeds.shape[0] == 0 or inputs_embeds.shape[1] == 0:
            raise ValueError(
                f"inputs_embeds has shape {tuple(inputs_embeds.shape)}: an empty batch or no tokens; need B, T >= 1"
            )
        return inputs_embeds.shape[0], inputs_embeds.shape[1]

    def generate(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """``moekit.core.generate.generate(self, input_ids, **kwargs)``."""
        return generate(self, input_ids, **kwargs)

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied weights stored once), all-or-nothing."""
        save_pretrained_folder(self, self.cfg.to_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
        """Load a ``save_pretrained`` folder; a Hugging Face folder is refused with the converter to use."""
        model = cls(ModelConfig.from_dict(read_config(directory)))
        load_weights(model, directory, map_location)
        return model


def lm_loss(logits_btv: Tensor, labels_bt: Tensor) -> Tensor:
    """Mean cross-entropy in float32 over targets != IGNORE_INDEX (0 if there are none)."""
    flat = labels_bt.reshape(-1)
    # Sum / count instead of reduction="mean": no host sync, and no NaN when every target is masked.
    ce = F.cross_entropy(
        logits_btv.float().reshape(-1, logits_btv.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return ce / (flat != IGNORE_INDEX).sum().clamp(min=1)
