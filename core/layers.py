"""Building blocks of the dense core: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Shapes: B batch, T new tokens, S key/value length (cache + new), D d_model, H query heads,
G kv heads, Dh head dim, F FFN hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from moekit.core.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 (or wider) for stability."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x if x.dtype == torch.float64 else x.float()  # float64 stays float64 (reference tests)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, device=None) -> Tensor:
    """RoPE's float64 inverse frequencies ``[Dh/2]``, scaled as ``scaling`` says (:class:`RopeScaling`).

    llama3: slow rotations (wavelength above ``original_max_seq_len / low_freq_factor``) are slowed ``factor``
    times more, fast ones (below ``original_max_seq_len / high_freq_factor``) are kept, and the band between
    blends the two linearly in ``original_max_seq_len / wavelength``. yarn: dim pair ``j`` turns
    ``L / wavelength_j`` times over ``L = original_max_seq_len`` positions; the pairs from the one turning
    ``beta_fast`` times to the one turning ``beta_slow`` times ramp linearly from kept to divided by ``factor``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).double() / head_dim))
    if scaling is None:
        return inv_freq
    ctx, factor = scaling.original_max_seq_len, scaling.factor
    if scaling.rope_type == "yarn":

        def dim_of(turns: float) -> float:  # the (fractional) dim whose frequency turns `turns` times over ctx
            return head_dim * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_of(scaling.beta_fast), dim_of(scaling.beta_slow)
        if scaling.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        hi = hi + 0.001 if lo == hi else hi  # a one-point ramp would divide by zero
        ramp = ((torch.arange(head_dim // 2, device=device).double() - lo) / (hi - lo)).clamp(0.0, 1.0)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp)
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = ((ctx / wavelen - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0 at the low-frequency end, 1 at the high
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(
    position_ids_bt: Tensor, head_dim: int, theta: float, dtype: torch.dtype, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables for the half-split (rotate_half) RoPE convention used by Llama, times yarn's attention
    scaling when set. -> [B, 1, T, Dh]."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, position_ids_bt.device)
    angles = position_ids_bt.double()[..., None] * inv_freq  # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, Dh]
    cos, sin = angles.cos(), angles.sin()
    if scaling is not None and scaling.attention_scaling != 1.0:
        cos, sin = cos * scaling.attention_scaling, sin * scaling.attention_scaling
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


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

    @property
    def seq_len(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    """Causal self-attention through SDPA with grouped-query attention (n_kv_heads <= n_heads).

    Options (see :class:`~moekit.core.config.ModelConfig`): ``head_dim`` (None = d_model / n_heads),
    ``qkv_bias`` / ``out_bias``, ``qk_norm`` ("head": ``q_norm.weight [Dh]``, ``k_norm.weight [Dh]``;
    "full": ``q_norm.weight [H*Dh]``, ``k_norm.weight [G*Dh]``), applied before RoPE, and ``clip_qkv``
    (q, k, v clamped to [-c, c] after the norm, as OLMoE does), ``scale`` (the softmax scale of q.k; None =
    1/sqrt(Dh)). Keys are cached after norm and RoPE.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        dropout: float = 0.0,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: str = "none",
        clip_qkv: float | None = None,
        norm_eps: float = 1e-5,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if (head_dim is None and d_model % n_heads) or n_heads % n_kv_heads:
            raise ValueError(
                f"Attention needs d_model % n_heads == 0 (or a head_dim) and n_heads % n_kv_heads == 0; "
                f"got d_model={d_model}, n_heads={n_heads}, n_kv_heads={n_kv_heads}"
            )
        if qk_norm not in ("none", "head", "full"):
            raise ValueError(f"Attention qk_norm={qk_norm!r} is invalid: allowed values are none, head, full")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.dropout = dropout
        self.qk_norm, self.clip_qkv, self.scale = qk_norm, clip_qkv, scale
        hq, hkv = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, hq, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, hkv, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, hkv, bias=qkv_bias)
        self.o_proj = nn.Linear(hq, d_model, bias=out_bias)
        if qk_norm != "none":
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else hq, norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else hkv, norm_eps)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Attention:
        """The attention layer ``cfg`` describes (heads, head dim, biases, QK-norm, clipping, scale, dropout)."""
        return cls(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.dropout,
            head_dim=cfg.dh,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            qk_norm=cfg.qk_norm,
            clip_qkv=cfg.clip_qkv,
            norm_eps=cfg.norm_eps,
            scale=cfg.attn_scale,
        )

    def _project(self, x_btd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, T, Dh], k and v [B, G, T, Dh], normed and clipped (before RoPE)."""
        q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b t (h dh) -> b h t dh", h=self.n_heads)
        k = rearrange(k, "b t (g dh) -> b g t dh", g=self.n_kv_heads)
        v = rearrange(v, "b t (g dh) -> b g t dh", g=self.n_kv_heads)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        return q, k, v

    def forward(
        self,
        x_btd: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask_b1ts: Tensor | None,
        past: LayerKV | None = None,
    ) -> tuple[Tensor, LayerKV]:
        """``mask_b1ts`` is a bool mask (True = may attend) or None for plain causal attention."""
        q, k, v = self._project(x_btd)
        # RoPE's float32 tables promote autocast's bf16 q/k: back to v's dtype (SDPA casts them so anyway), so
        # the cache does not hold float32 keys beside bf16 values.
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
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
            scale=self.scale,
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
