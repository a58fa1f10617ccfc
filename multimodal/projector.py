"""Projectors from encoder width to the decoder's d_model: linear, 2-layer MLP, or pooling.

Shapes: ``N`` media items, ``L`` encoder tokens (padded), ``M`` output tokens, ``Di`` encoder width,
``Dh`` MLP hidden width, ``D`` d_model.

Pooling averages the *valid* tokens of each item into ``num_tokens`` bins with PyTorch's adaptive
average pooling bins (bin m covers ``[floor(m*L/M), ceil((m+1)*L/M))``), computed from prefix sums so a
batch of different lengths needs no per-item loop and padded tokens never enter a bin.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import MLP

from moekit.multimodal.config import ProjectorConfig


def masked_adaptive_avg_pool(x_nld: Tensor, lengths_n: Tensor, num_out: int) -> Tensor:
    """Per item, ``adaptive_avg_pool1d`` over its first ``lengths_n[i]`` tokens -> ``[N, num_out, Di]``.

    The prefix sums run in float32 at least (in bf16 they would lose the small terms to the running total:
    errors near 1.0 on values around 3 at L=200) and the result comes back in ``x_nld``'s dtype."""
    out_dtype = x_nld.dtype
    x_nld = x_nld.to(torch.promote_types(out_dtype, torch.float32))
    N, _, Di = x_nld.shape
    m = torch.arange(num_out, device=x_nld.device)[None, :]  # [1, M]
    ln = lengths_n[:, None]  # [N, 1]
    start_nm = torch.div(m * ln, num_out, rounding_mode="floor")
    end_nm = torch.div((m + 1) * ln + num_out - 1, num_out, rounding_mode="floor")
    csum = torch.cat([x_nld.new_zeros(N, 1, Di), x_nld.cumsum(dim=1)], dim=1)  # [N, L+1, Di]
    end = csum.gather(1, end_nm[..., None].expand(-1, -1, Di))  # [N, M, Di]
    sums = end - csum.gather(1, start_nm[..., None].expand(-1, -1, Di))
    return (sums / (end_nm - start_nm)[..., None].to(x_nld.dtype)).to(out_dtype)


class Projector(nn.Module):
    """``(tokens [N, L, Di], valid [N, L] | None) -> (tokens [N, M, D], valid [N, M])``."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg, self.in_dim, self.out_dim = cfg, in_dim, out_dim
        self.hidden = (cfg.hidden or out_dim) if cfg.kind == "mlp" else None
        if cfg.kind == "mlp":
            self.net: nn.Module = MLP(in_dim, [self.hidden, out_dim], activation_layer=nn.GELU)
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def num_tokens(self, in_tokens: int) -> int:
        return self.cfg.out_tokens(in_tokens)

    def forward(self, x_nld: Tensor, valid_nl: Tensor | None = None) -> tuple[Tensor, Tensor]:
        N, L, _ = x_nld.shape
        if valid_nl is None:
            valid_nl = torch.ones(N, L, dtype=torch.bool, device=x_nld.device)
        if self.cfg.kind == "pool":
            # Valid tokens are a prefix of each row (right padding), so the count is the length.
            x_nld = masked_adaptive_avg_pool(x_nld, valid_nl.sum(1), self.cfg.num_tokens)
            valid_nl = torch.ones(N, self.cfg.num_tokens, dtype=torch.bool, device=x_nld.device)
        return self.net(x_nld), valid_nl

    def num_params(self) -> int:
        Di, D = self.in_dim, self.out_dim
        if self.cfg.kind == "mlp":
            return Di * self.hidden + self.hidden + self.hidden * D + D
        return Di * D + D

    def flops_per_item(self, in_tokens: int) -> int:
        """Forward FLOPs for one item of ``in_tokens`` valid encoder tokens (pooling itself is free)."""
        n = self.num_tokens(in_tokens)
        if self.cfg.kind == "mlp":
            return 2 * n * (self.in_dim * self.hidden + self.hidden * self.out_dim)
        return 2 * n * self.in_dim * self.out_dim
