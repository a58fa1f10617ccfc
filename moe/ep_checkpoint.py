"""Checkpoints, final weights and inference copies of expert-parallel (EP) models: experts stored unsharded.

Shapes: ``E`` experts of a layer (all ranks), ``P`` expert-parallel size, ``El = E / P`` experts held per rank,
``...`` the rest of an expert tensor (``[D, F]`` for ``w_gate`` / ``w_up``, ``[F, D]`` for ``w_down``).

Under EP every rank holds a different ``[El, ...]`` slice of each routed expert weight, under the same
parameter name, while Accelerate's ``save_state`` writes the model and optimizer of the main process only.
So the routed experts of every MoE layer (sharded or not) live in a file of their own,
``experts.safetensors``, always unsharded:

- ``<param name>``: the full ``[E, ...]`` weight, e.g. ``layers.1.ffn.experts.w_gate``;
- ``<param name>::<state key>``: every optimizer state tensor of that parameter with the parameter's shape
  (AdamW: ``exp_avg``, ``exp_avg_sq``), full ``[E, ...]`` too. Scalar state (AdamW's ``step``) is the same
  on every rank and stays in Accelerate's ``optimizer.bin``.

Saving gathers each tensor onto global rank 0, which writes the file (:func:`save_expert_state`); loading
lets every rank read its own rows ``[ep_rank * El, (ep_rank + 1) * El)`` straight from the file
(:func:`load_expert_state`). The checkpoint therefore does not depend on the EP size: one saved with
``parallel.expert_parallel_size=2`` on 2 processes resumes with 1 process (EP 1), and the other way round.

:func:`gather_full_model` builds, on rank 0, a single-process copy of the model with the experts
unsharded: for sampling (a sharded MoE layer needs every EP rank in its all-to-all) and ``save_pretrained``.

Every function here that gathers is collective: every rank calls it, with the same model structure.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer
from moekit.moe.parallel import ExpertParallelGroups

EXPERTS_FILE = "experts.safetensors"
STATE_SEP = "::"  # "<param name>::<optimizer state key>"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def routed_expert_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
    """``(state-dict name, parameter, E)`` of every routed expert weight of every MoE layer in ``model``
    (sharded or not; names relative to ``model``, which must be the unwrapped model)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            prefix = f"{name}.experts." if name else "experts."
            out.extend((prefix + pname, p, module.cfg.num_experts) for pname, p in module.experts.named_parameters())
    return out


def local_expert_range(
    num_experts: int, local_rows: int, groups: ExpertParallelGroups | None, name: str = "an expert tensor"
) -> tuple[int, int]:
    """``[first, end)`` of the global experts a tensor with ``local_rows`` leading rows holds on this rank.

    ``local_rows == num_experts``: not sharded, all of them. Otherwise it must be this rank's EP slice.
    """
    if local_rows == num_experts:
        return 0, num_experts
    if groups is None or local_rows * groups.ep_size != num_experts:
        layout = (
            "no expert parallelism (it would hold all of them)"
            if groups is None
            else f"ParallelConfig.expert_parallel_size={groups.ep_size} ({num_experts // groups.ep_size} per rank)"
        )
        raise ValueError(f"{name} holds {local_rows} of {num_experts} experts, which does not fit {layout}")
    return groups.expert_range(num_experts)


@torch.no_grad()
def gather_expert_rows(local: Tensor, num_experts: int, groups: ExpertParallelGroups | None) -> Tensor | None:
    """The full ``[E, ...]`` tensor of ``local [El, ...]`` on global rank 0; None on every other rank.

    Collective over the EP group of rank 0 (ranks ``0 .. P-1`` in ``init_expert_parallel``'s layout): those
    ranks must call it for the same tensors in the same order. The other EP groups hold replicas of the same
    slices and return at once. An unsharded ``local`` (``El == E``) is returned as is on rank 0.
    """
    rank = _rank()
    local_expert_range(num_experts, local.shape[0], groups)  # validates the sharding
    if groups is None or local.shape[0] == num_experts:
        return local.detach() if rank == 0 else None
    if rank >= groups.ep_size:
        return None
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(groups.ep_size)] if rank == 0 else None
    dist.gather(local, parts, group=groups.ep_group, group_dst=0)
    return torch.cat(parts) if parts is not None else None  # [E, ...] in EP-rank order = expert order


def save_expert_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    groups: ExpertParallelGroups | None = None,
) -> list[str]:
    """Write the routed expert weights of ``model`` and their parameter-shaped optimizer state, unsharded,
    to ``directory/experts.safetensors``; return the weights' state-dict names (on every rank).

    Collective (see :func:`gather_expert_rows`); global rank 0 writes. Assumes what training guarantees:
    the ranks of an EP group hold the same optimizer state keys for their expert slices (they step together).
    A model without MoE layers writes nothing.
    """
    weights = routed_expert_weights(model)
    tensors: dict[str, Tensor] = {}
    for name, p, num_experts in weights:
        full = gather_expert_rows(p, num_experts, groups)
        if full is not None:
            tensors[name] = full.cpu().contiguous()
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape):
            full = gather_expert_rows(state[key], num_experts, groups)
            if full is not None:
                tensors[f"{name}{STATE_SEP}{key}"] = full.cpu().contiguous()
    if weights and _rank() == 0:
        save_file(tensors, str(Path(directory) / EXPERTS_FILE))
    return [name for name, _, _ in weights]


@torch.no_grad()
def load_expert_state(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    groups: ExpertParallelGroups | None = None,
) -> list[str]:
    """Copy this rank's rows of ``directory/experts.safetensors`` into ``model``'s expert weights and their
    optimizer state; return the names of the weights restored ([] when the file is absent).

    Call after the rest of the state is loaded (``accelerator.load_state``): the optimizer state tensors of
    the experts are replaced, whatever shape the other file gave them. Every rank reads only its slice.
    """
    path = Path(directory) / EXPERTS_FILE
    if not path.is_file():
        return []
    weights = routed_expert_weights(model)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        saved = {k.split(STATE_SEP)[0] for k in keys}
        names = {name for name, _, _ in weights}
        if saved != names:
            raise ValueError(
                f"{path} was saved from a different model: experts only in the file {sorted(saved - names)}, "
                f"only in the model {sorted(names - saved)}"
            )
        for name, p, num_experts in weights:
            lo, hi = local_expert_range(num_experts, p.shape[0], groups, name)
            _check_shape(f, name, (num_experts, *p.shape[1:]), path)
            p.copy_(f.get_slice(name)[lo:hi])
            if optimizer is None:
                continue
            prefix = name + STATE_SEP
            for key in sorted(k for k in keys if k.startswith(prefix)):
                _check_shape(f, key, (num_experts, *p.shape[1:]), path)
                old = optimizer.state[p].get(key[len(prefix) :])
                dtype = old.dtype if torch.is_tensor(old) else p.dtype
                optimizer.state[p][key[len(prefix) :]] = f.get_slice(key)[lo:hi].to(device=p.device, dtype=dtype)
            # A parameter-shaped state tensor the file lacks came from the other checkpoint file, which holds
            # rank 0's slice: kept, it would silently give every other rank rank 0's moments.
            missing = [
                k
                for k, v in optimizer.state.get(p, {}).items()
                if torch.is_tensor(v) and v.dim() == p.dim() and prefix + k not in keys
            ]
            if missing:
                raise ValueError(
                    f"{path} has no {name}{STATE_SEP}{missing[0]}, and the optimizer's copy is another slice's "
                    "(save with the optimizer to restore it)"
                )
    return sorted(names)


def _check_shape(f: Any, key: str, expected: tuple[int, ...], path: Path) -> None:
    shape = tuple(f.get_slice(key).get_shape())
    if shape != expected:
        raise ValueError(f"{path}: {key} has shape {list(shape)}, the model expects {list(expected)}")


def expert_checkpoint_hooks(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, groups: ExpertParallelGroups | None
) -> tuple[Callable[[Path], list[str]] | None, Callable[[Path], list[str]] | None]:
    """``(extra_writer, extra_reader)`` for ``CheckpointManager.save`` / ``load``: :func:`save_expert_state`
    and :func:`load_expert_state` bound to ``model`` (unwrapped), ``optimizer`` and ``groups``;
    ``(None, None)`` for a model without MoE layers."""
    if not routed_expert_weights(model):
        return None, None
    kw = {"model": model, "optimizer": optimizer, "groups": groups}
    return partial(save_expert_state, **kw), partial(load_expert_state, **kw)


def gather_full_model(model: nn.Module, groups: ExpertParallelGroups | None = None) -> nn.Module | None:
    """Collective: on global rank 0, a single-process copy of ``model`` with every MoE layer unsharded;
    None on the other ranks. ``model`` is the unwrapped model; it is left untouched.

    The copy shares every parameter except the gathered expert weights with ``model`` (no extra memory for
    them): use it for inference or ``save_pretrained`` and drop it, do not train it. Its MoE layers run
    locally, see :func:`single_process_configs`.
    """
    weights = routed_expert_weights(model)
    full = {name: gather_expert_rows(p, num_experts, groups) for name, p, num_experts in weights}
    if _rank() != 0:
        return None
    memo = {id(p): p for p in model.parameters()}  # share, do not copy, the parameters
    out = copy.deepcopy(model, memo)
    for name, module in out.named_modules():
        if isinstance(module, MoELayer) and module.expert_parallel is not None:
            prefix = f"{name}.experts." if name else "experts."
            experts = module.experts
            for pname, p in list(experts.named_parameters()):
                setattr(experts, pname, nn.Parameter(full[prefix + pname], requires_grad=p.requires_grad))
            experts.num_experts = module.cfg.num_experts
            module.expert_parallel = None
    single_process_configs(out)
    return out


def single_process_configs(model: nn.Module) -> None:
    """Make the MoE layers of ``model`` (a copy that rank 0 runs alone) compute ``balance_scope='global'``
    locally: in a world of one process the two scopes agree, and no collective may run on rank 0 alone.
    Only the layers' (and routers') own config references change; the model's saved config is untouched."""
    local: dict[int, MoEConfig] = {}
    for module in model.modules():
        cfg = getattr(module, "cfg", None)
        if isinstance(cfg, MoEConfig) and cfg.balance_scope != "local":
            module.cfg = local.setdefault(id(cfg), dataclasses.replace(cfg, balance_scope="local"))
