"""Building blocks of the dense core: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Shapes: B batch, T new tokens, S key/value length (cache + new), D d_model, H query heads,
G kv heads, Dh head dim, F FFN hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(position_ids_bt: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables for the half-split (rotate_half) RoPE convention used by Llama. -> [B, 1, T, Dh]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_bt.device).double() / head_dim))
    angles = position_ids_bt.double()[..., None] * inv_freq  # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, Dh]
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x_bhtd: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x_bhtd.shape[-1] // 2
    x1, x2 = x_bhtd[..., :half], x_bhtd[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_bhtd * cos + rotated * sin


@dataclass
class LayerKV:
    """Keys/values of one layer for all cached positions: [B, G, S, Dh]."""

    k: Tensor
    v: Tensor


class Attention(nn.Module):
    """Causal self-attention through SDPA with grouped-query attention (n_kv_heads <= n_heads)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"Attention needs d_model % n_heads == 0 and n_heads % n_kv_heads == 0; "
                f"got d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}"
            )
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(
        self,
        x_btd: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask_b1ts: Tensor | None,
        past: LayerKV | None = None,
    ) -> tuple[Tensor, LayerKV]:
        """``mask_b1ts`` is a bool mask (True = may attend) or None for plain causal attention."""
        q = rearrange(self.q_proj(x_btd), "b t (h dh) -> b h t dh", h=self.n_heads)
        k = rearrange(self.k_proj(x_btd), "b t (g dh) -> b g t dh", g=self.n_kv_heads)
        v = rearrange(self.v_proj(x_btd), "b t (g dh) -> b g t dh", g=self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat([past.k, k], dim=2)  # [B, G, S, Dh]
            v = torch.cat([past.v, v], dim=2)
        kv = LayerKV(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask_b1ts,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask_b1ts is None and past is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [B, H, T, Dh]
        return self.o_proj(rearrange(y, "b h t dh -> b t (h dh)")), kv


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer 2020): w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
