"""What the Trainer optimises: an ``Objective`` turns (model, micro-batch) into a ``StepOutput``.

The Trainer knows nothing about the task: it backpropagates ``loss + aux_loss``, logs ``loss`` as
``train_loss``, ``aux_loss`` and every entry of ``metrics`` (means over micro-batches and ranks), weights
``val_loss`` by ``num_tokens``, and counts ``tokens_seen``, tokens/s and MFU in ``num_tokens`` summed over
micro-batches and ranks. ``LMObjective`` is next-token prediction, for any model whose output has ``loss``
(mean CE over its targets) and, optionally, ``aux_loss`` and ``moe_losses``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    ``num_tokens`` counts the real targets, so padded rows count for nothing; ``num_targets(batch)`` counts them
    before the forward (the Trainer weights micro-batches by it)."""

    def num_targets(self, batch: Mapping[str, Tensor]) -> Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

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
        return StepOutput(out.loss, aux, self.num_targets(batch), metrics, out)


def micro_batch_weights(
    objective: Objective, batches: Sequence[Mapping[str, Tensor]], accelerator: Accelerator
) -> list[Tensor | None]:
    """Per micro-batch ``n_m * world * accum / N`` for a step of ``accum = len(batches)`` micro-batches
    holding ``n_m`` real targets each (``N``: all of them, on every process; one all-reduce). Accelerate
    divides each backward by ``accum`` and DDP averages over processes, so ``loss_m * weight_m`` makes the
    step's gradient that of the mean over its N targets. None each when the objective does not count its
    targets (``num_targets``): equal weights."""
    count = getattr(objective, "num_targets", None)
    if count is None:
        return [None] * len(batches)
    n_m = torch.stack([torch.as_tensor(count(b), device=accelerator.device) for b in batches]).double()
    total = accelerator.reduce(n_m.sum(), reduction="sum")
    scale = accelerator.num_processes * len(batches)
    return list((n_m * scale / total.clamp(min=1)).float().unbind())
