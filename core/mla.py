"""Multi-head latent attention (DeepSeek-V2, Liu et al. 2024), with a KV cache of the compressed latent.

Shapes: B batch, T new tokens, S key/value length (cache + new), D d_model, H heads, R ``kv_lora_rank``,
Rq ``q_lora_rank``, Dn ``qk_nope_head_dim``, Dr ``qk_rope_head_dim``, Dv ``v_head_dim``.

Per token: ``c_kv = norm(x W_kva)[:R]`` and one rotary key ``k_r = rope(x W_kva[R:])`` shared by the heads;
head ``h`` reads ``k_h = [c_kv W_kvb^{k,h}, k_r]`` and ``v_h = c_kv W_kvb^{v,h}``. Only ``c_kv`` and ``k_r``
are cached (R + Dr numbers per token and layer instead of 2 H Dh), and expanded per head at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moekit.core.config import MLAConfig, ModelConfig, RopeScaling
from moekit.core.layers import RMSNorm, apply_rope


@dataclass
class LatentKV:
    """The MLA cache of one layer for all cached positions: the normed latent and the rotated shared key."""

    c_kv: Tensor  # [B, S, R]
    k_rope: Tensor  # [B, S, Dr], after RoPE

    @property
    def seq_len(self) -> int:
        return self.c_kv.shape[1]


def deinterleave(x: Tensor) -> Tensor:
    """``(x0, x1, x2, x3, ...)`` -> ``(x0, x2, ..., x1, x3, ...)``: DeepSeek's adjacent rotary pairs become the
    half-split pairs :func:`apply_rope` rotates. q and k are permuted alike, so every q.k product is unchanged."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def mla_softmax_scale(mla: MLAConfig, scaling: RopeScaling | None) -> float:
    """``1/sqrt(Dn + Dr)``, times ``mscale(factor, mscale_all_dim)^2`` under yarn with ``mscale_all_dim`` set:
    DeepSeek puts the long-context temperature on the logits (transformers' ``yarn_apply_mscale``)."""
    scale = mla.qk_head_dim**-0.5
    if scaling is not None and scaling.rope_type == "yarn" and scaling.mscale_all_dim and scaling.factor > 1:
        m = 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """Causal multi-head latent attention through SDPA; drop-in for :class:`~moekit.core.layers.Attention`.

    Parameters: ``q_proj [H*(Dn+Dr), D]`` (``q_lora_rank=None``) or ``q_a_proj [Rq, D]``, ``q_a_norm [Rq]``,
    ``q_b_proj [H*(Dn+Dr), Rq]``; ``kv_a_proj [R+Dr, D]``, ``kv_a_norm [R]``, ``kv_b_proj [H*(Dn+Dv), R]``
    (rows per head: Dn key dims then Dv value dims), ``o_proj [D, H*Dv]``; no biases.
    """

    def __init__(
        self, d_model: int, n_heads: int, mla: MLAConfig, dropout: float = 0.0, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        self.n_heads, self.mla, self.dropout = n_heads, mla, dropout
        self.scale = mla_softmax_scale(mla, scaling)
        qk = n_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, mla.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(mla.q_lora_rank, mla.latent_norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, qk, bias=False)
        self.kv_a_proj = nn.Linear(d_model, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(mla.kv_lora_rank, mla.latent_norm_eps)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * mla.v_head_dim, d_model, bias=False)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MLAttention:
        assert cfg.mla is not None
        return cls(cfg.d_model, cfg.n_heads, cfg.mla, cfg.dropout, cfg.rope_scaling)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rope(deinterleave(x) if self.mla.rope_interleave else x, cos, sin)

    def forward(
        self,
        x_btd: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask_b1ts: Tensor | None,
        past: LatentKV | None = None,
    ) -> tuple[Tensor, LatentKV]:
        """``cos``/``sin`` ``[B, 1, T, Dr]``; ``mask_b1ts`` a bool mask (True = may attend) or None (causal)."""
        m, H = self.mla, self.n_heads
        q = self.q_proj(x_btd) if m.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_btd)))
        q = rearrange(q, "b t (h d) -> b h t d", h=H)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj(x_btd).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv)  # [B, T, R]
        k_rope = self._rope(k_rope[:, None], cos, sin)[:, 0]  # [B, T, Dr]
        if past is not None:
            c_kv = torch.cat([past.c_kv, c_kv], dim=1)  # [B, S, R]
            k_rope = torch.cat([past.k_rope, k_rope], dim=1)
        cache = LatentKV(c_kv, k_rope)
        kv = rearrange(self.kv_b_proj(c_kv), "b s (h d) -> b h s d", h=H)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)  # [B, H, S, Dn], [B, H, S, Dv]
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, H, -1, -1)], dim=-1)  # [B, H, S, Dn+Dr]
        q = torch.cat([q_nope, self._rope(q_rope, cos, sin)], dim=-1)  # [B, H, T, Dn+Dr]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask_b1ts,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask_b1ts is None and past is None,
            scale=self.scale,
        )  # [B, H, T, Dv]
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)")), cache
