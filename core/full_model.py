"""A plain, single-process copy of an FSDP-sharded model (for sampling and ``save_pretrained``)."""

from __future__ import annotations

from accelerate import Accelerator
from torch import nn

__all__ = ["fsdp_full_model"]


def fsdp_full_model(accelerator: Accelerator, model: nn.Module) -> nn.Module | None:
    """Collective: on the main process, a plain (unsharded, unwrapped) copy of an FSDP-wrapped ``model``,
    rebuilt from its ``cfg`` and the full state dict that ``accelerator.get_state_dict`` gathers; None
    elsewhere. A deep copy of the sharded module would hold DTensors whose forward needs every rank."""
    state = accelerator.get_state_dict(model)  # full tensors on the main process only
    if not accelerator.is_main_process:
        return None
    from torch.distributed.fsdp import FSDPModule

    wrapped = accelerator.unwrap_model(model)
    # FSDP2 swaps the module's class for a subclass of FSDPModule; build the original class.
    cls = next(c for c in type(wrapped).__mro__ if not issubclass(c, FSDPModule))
    if not hasattr(wrapped, "cfg"):
        raise TypeError(f"{cls.__name__} has no .cfg: cannot rebuild an unsharded copy of an FSDP model")
    plain = cls(wrapped.cfg)
    plain.load_state_dict(state)
    return plain
