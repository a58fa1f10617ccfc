"""One home for pretrained folders: ``config.json`` beside ``model.safetensors``.

``Transformer`` and ``TrainableMultimodalLM`` wrap these functions in their ``save_pretrained`` /
``from_pretrained`` (each parses the config dict with its own ``from_dict``, so config migrations apply);
the HF converter writes its output through :func:`write_pretrained` too.

Writing is all-or-nothing. Both files are written into a hidden staging folder beside the target and
fsynced; then, when the target is absent or an empty folder, the staging folder is renamed to it (one atomic
rename: the folder appears complete or not at all). When the target already holds files, each of the two
is moved over its old version with ``os.replace`` (atomic per file; other files in the folder are kept).
Any error removes the staging folder and leaves the target as it was.

Reading refuses, naming the folder or tensor: a Hugging Face checkpoint (pointing at the converter), a
missing or unreadable file, tensor names that do not fit the model, and a tensor whose dtype kind
(floating / integer / bool) differs from the model's: ``load_state_dict`` would cast int32 weights into
float parameters without a word.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from moekit.core.files import atomic_write_json, fsync_dir

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_weights", "read_config", "save_pretrained_folder", "write_pretrained"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys an HF config.json always has and ours never has; tensor name prefixes of HF Llama/Mixtral weights.
HF_CONFIG_KEYS = ("model_type", "architectures")
HF_TENSOR_PREFIXES = ("model.embed_tokens.", "model.layers.")
HF_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# ---------------------------------------------------------------- writing
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_pretrained(
    directory: str | os.PathLike, config: Mapping[str, Any], write_weights: Callable[[Path], None]
) -> Path:
    """Write ``config`` as ``config.json`` and let ``write_weights(path)`` write ``model.safetensors``, both
    into ``directory`` all-or-nothing (see the module docstring). Returns the folder's absolute path."""
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_pretrained: {target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it 0700) so that the renamed folder gets the usual permissions.
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        atomic_write_json(staging / CONFIG_FILE, dict(config), indent=2)
        write_weights(staging / WEIGHTS_FILE)
        _fsync_file(staging / WEIGHTS_FILE)
        fsync_dir(staging)
        try:
            os.replace(staging, target)  # POSIX: allowed onto a missing or empty folder, atomically
        except OSError:
            if not target.is_dir():
                raise
            # The target holds files: weights first, so that a crash in between leaves the old config,
            # whose shapes the new weights then fail to fit (a named error), rather than a silent mix.
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(staging / name, target / name)
        fsync_dir(target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful folder rename
    return target


def save_pretrained_folder(model: nn.Module, config: Mapping[str, Any], directory: str | os.PathLike) -> Path:
    """:func:`write_pretrained` of ``model``'s state (safetensors; tied weights stored once)."""
    return write_pretrained(directory, config, lambda path: save_model(model, str(path)))


# ---------------------------------------------------------------- reading
def _hf_hint(directory: Path, why: str) -> ValueError:
    return ValueError(
        f"{directory} looks like a Hugging Face checkpoint ({why}), not a moekit save_pretrained folder: convert "
        f"it with `python recipes/convert_hf.py --from-hf {directory} --out NEW_DIR`, or load it in memory with "
        f"moekit.core.load_hf({str(directory)!r})"
    )


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a pretrained folder; refuses missing folders/files and HF folders."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"from_pretrained: {d} is not a folder (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    path = d / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"from_pretrained: {d} has no {CONFIG_FILE} (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"from_pretrained: {path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"from_pretrained: {path} holds a {type(config).__name__}, expected a JSON object")
    hf_keys = [k for k in HF_CONFIG_KEYS if k in config]
    if hf_keys:
        raise _hf_hint(d, f"{CONFIG_FILE} has {hf_keys}")
    return config


def _dtype_kind(dtype: str | torch.dtype) -> str:
    """'float', 'int', 'bool' or 'complex', from a torch dtype or a safetensors dtype string ('F32', 'I64')."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bool:
            return "bool"
        return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "int"
    if dtype == "BOOL":
        return "bool"
    return {"F": "float", "B": "float", "I": "int", "U": "int", "C": "complex"}.get(dtype[:1], dtype)


def load_weights(model: nn.Module, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` of ``directory`` into ``model`` strictly, after checking names and dtypes."""
    d = Path(directory)
    path = d / WEIGHTS_FILE
    if not path.is_file():
        hf_files = [name for name in HF_WEIGHT_FILES if (d / name).is_file()]
        if hf_files:
            raise _hf_hint(d, f"it has {hf_files} and no {WEIGHTS_FILE}")
        raise FileNotFoundError(f"from_pretrained: {d} has no {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"from_pretrained: {path} is not a readable safetensors file ({err})") from err
    if any(k.startswith(HF_TENSOR_PREFIXES) for k in stored):
        raise _hf_hint(d, f"{WEIGHTS_FILE} has Hugging Face tensor names such as 'model.embed_tokens.weight'")
    expected = model.state_dict()
    misshaped = []
    for name, (file_dtype, file_shape) in stored.items():
        if name not in expected:
            continue  # reported with the missing ones below
        want = expected[name]
        if _dtype_kind(file_dtype) != _dtype_kind(want.dtype):
            raise ValueError(
                f"from_pretrained: tensor {name!r} in {path} has dtype {file_dtype}; the model expects "
                f"{want.dtype} ({_dtype_kind(want.dtype)}), so it is refused rather than cast"
            )
        if file_shape != tuple(want.shape):
            misshaped.append(f"{name!r} has shape {list(file_shape)} (expected {list(want.shape)})")
    if misshaped:
        raise ValueError(
            f"from_pretrained: {len(misshaped)} tensors in {path} do not fit the model of {d / CONFIG_FILE}: "
            + "; ".join(misshaped[:6])
            + ("; ..." if len(misshaped) > 6 else "")
        )
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(map_location))
    except RuntimeError as err:  # shape mismatches; load_state_dict names the tensor
        raise ValueError(f"from_pretrained: {path} does not fit the model of {d / CONFIG_FILE}: {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"from_pretrained: {path} does not fit the model of {d / CONFIG_FILE}: missing tensors "
            f"{sorted(missing)[:10]}, unexpected tensors {sorted(unexpected)[:10]}"
            + (" (first 10 shown)" if max(len(missing), len(unexpected)) > 10 else "")
        )
