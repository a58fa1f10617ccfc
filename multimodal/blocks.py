"""The small pre-norm transformer shared by the image and audio encoders, and its exact accounting.

Shapes: ``N`` media items, ``L`` tokens per item, ``W`` encoder width, ``H`` heads, ``Dh`` head dim,
``M`` hidden width of the MLP.

The layout follows torchvision's ``vision_transformer.EncoderBlock`` (``ln_1`` -> self-attention ->
residual, ``ln_2`` -> ``torchvision.ops.MLP`` with GELU -> residual), and the MLP *is* torchvision's. The
attention is our own SDPA call because ``EncoderBlock`` cannot take a key-padding mask (audio clips of
different lengths share a batch) and its ``nn.MultiheadAttention`` switches to a fused inference kernel
that FLOP counters cannot see.

FLOP convention (as ``moekit.core.accounting``): 2*m*k*n per matmul; norms, activations, softmax,
additions are not counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MLP

LN_EPS = 1e-6  # torchvision's ViT value


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention + GELU MLP; padded keys are masked out."""

    def __init__(self, width: int, n_heads: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"EncoderLayer: width={width} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = MLP(width, [mlp_hidden, width], activation_layer=nn.GELU, dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_nlw: Tensor, key_mask_nl: Tensor | None = None) -> Tensor:
        """``key_mask_nl``: bool [N, L], True = real token; None = all real."""
        N, L, W = x_nlw.shape
        qkv = self.qkv(self.ln_1(x_nlw)).view(N, L, 3, self.n_heads, W // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, Dh]
        mask = None if key_mask_nl is None else key_mask_nl[:, None, None, :]  # [N, 1, 1, L]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x_nlw = x_nlw + self.drop(self.out_proj(a.transpose(1, 2).reshape(N, L, W)))
        return x_nlw + self.mlp(self.ln_2(x_nlw))


def layer_params(width: int, mlp_hidden: int) -> int:
    """Parameters of one EncoderLayer: 2 LayerNorms, qkv + out projections, the MLP (all with biases)."""
    W, M = width, mlp_hidden
    return 2 * 2 * W + (3 * W * W + 3 * W) + (W * W + W) + (W * M + M) + (M * W + W)


def layer_flops(width: int, mlp_hidden: int, num_tokens: int) -> int:
    """Forward FLOPs of one EncoderLayer on one item of ``num_tokens`` tokens (full L x L scores)."""
    W, M, L = width, mlp_hidden, num_tokens
    return 2 * L * W * 3 * W + 2 * L * W * W + 2 * 2 * L * L * W + 2 * 2 * L * W * M


def sinusoids(
    length: int, channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Whisper's fixed positions [length, channels]: sin on the first half, cos on the second."""
    half = channels // 2
    inc = math.log(10000.0) / max(half - 1, 1)
    inv = torch.exp(-inc * torch.arange(half, device=device, dtype=torch.float64))
    t = torch.arange(length, device=device, dtype=torch.float64)[:, None] * inv[None, :]  # [L, W/2]
    return torch.cat([t.sin(), t.cos()], dim=1).to(dtype or torch.get_default_dtype())
