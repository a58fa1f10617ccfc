"""What the Trainer optimises: an ``Objective`` turns (model, micro-batch) into a ``StepOutput``.

The Trainer knows nothing about the task: it backpropagates ``loss + aux_loss``, logs ``loss`` as
``train_loss``, ``aux_loss`` and every entry of ``metrics`` (means over micro-batches and ranks), weights
``val_loss`` by ``num_tokens``, and counts ``tokens_seen``, tokens/s and MFU in ``num_tokens`` summed over
micro-batches and ranks. ``LMObjective`` is next-token prediction, for any model whose output has ``loss``
(mean CE over its targets) and, optionally, ``aux_loss`` and ``moe_losses``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

# Label of a position without a target (padding, prompt, media): cross_entropy's default, = core.model's.
IGNORE_INDEX = -100

__all__ = ["LMObjective", "Objective", "StepOutput"]


@dataclass
class StepOutput:
    """One micro-batch's result. ``loss`` and ``aux_loss`` are scalars with gradients; ``num_tokens`` is a
    scalar integer tensor (the real targets that ``loss`` averages over); ``metrics`` are scalar tensors to
    log as means; ``output`` is the model's own output, for callers that want more."""

    loss: Tensor
    aux_loss: Tensor
    num_tokens: Tensor
    metrics: Mapping[str, Tensor] = field(default_factory=dict)
    output: Any = None


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> StepOutput: ...


class LMObjective:
    """Cross-entropy over the targets ``labels != -100`` (the model's own ``loss``), its ``aux_loss`` (0 when
    absent) and its unweighted auxiliary loss components ``moe_losses`` as metrics ``moe_loss/<name>``.
    ``num_tokens`` counts the real targets, so padded rows count for nothing."""

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> StepOutput:
        if "labels" not in batch:
            raise KeyError(f"LMObjective: the batch has no 'labels' (keys: {sorted(batch)})")
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise ValueError(f"LMObjective: {type(model).__name__} returned no loss for a batch with labels")
        aux = getattr(out, "aux_loss", None)
        aux = torch.zeros_like(out.loss) if aux is None else aux
        components = getattr(out, "moe_losses", None) or {}
        metrics = {f"moe_loss/{k}": v for k, v in components.items()}
        num_tokens = (batch["labels"] != IGNORE_INDEX).sum()
        return StepOutput(out.loss, aux, num_tokens, metrics, out)
