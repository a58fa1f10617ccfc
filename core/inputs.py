"""Checks of the tensors users hand to the model at its public boundaries (``Transformer.forward``,
``generate``, ``MultimodalLM``): wrong dtype, shape or range is refused with a message naming the argument
before it fails deep inside a layer."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TOKEN_ID_DTYPES", "check_token_ids"]

TOKEN_ID_DTYPES = (torch.long, torch.int32)  # what nn.Embedding accepts


def check_token_ids(ids: Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Refuse token ids that would fail deep inside the model: dtype, ``[B, T]`` shape, empty, range.

    The range check is one ``aminmax`` reduction and one host sync. It is skipped while ``torch.compile``
    traces (a data-dependent branch would break the graph); there an out-of-range id fails in the embedding.
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a Tensor of token ids [B, T]; got {type(ids).__name__}")
    if ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"{name} must hold integer token ids (torch.long or torch.int32); got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be [B, T]; got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}: an empty batch or no tokens; need B >= 1 and T >= 1")
    if not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync for both
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} values must be in [0, vocab_size={vocab_size}); got min {lo}, max {hi}")
