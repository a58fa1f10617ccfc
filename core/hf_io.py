"""Checkpoint files for the HF converter: sharded safetensors read shard by shard, sharded writes, and
output folders that are written atomically and never overwrite what they read.

Memory: a conversion holds the converted model plus about one input shard (reading) or one output shard
(writing), never two copies of the model. Tensor headers are read first (no data) so that a checkpoint that
does not fit its config is refused before gigabytes are loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.core.files import atomic_write_json, fsync_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what save_pretrained uses: 5 GB per shard

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---- reading -------------------------------------------------------------------------------------
def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index lists, or ``model.safetensors``."""
    d = Path(folder)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map' object): {err}") from err
        files = [d / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return files
    if (d / SINGLE_FILE).is_file():
        return [d / SINGLE_FILE]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (pytorch_model.bin is not read)")
    return files


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in ``files``, from the headers only (no tensor data)."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in out:
                    raise ValueError(f"tensor {name!r} is stored twice (again in {path})")
                sl = f.get_slice(name)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {sl.get_dtype()}")
                out[name] = (tuple(sl.get_shape()), dtype)
    return out


def iter_shards(files: list[Path], skip: frozenset[str] = frozenset()) -> Iterator[dict[str, Tensor]]:
    """The tensors of each file in turn (one shard in memory at a time, unless the caller keeps them)."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            yield {name: f.get_tensor(name) for name in f.keys() if name not in skip}


def load_state_dict(folder: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder (all shards) in one dict; for tests and small models."""
    sd: dict[str, Tensor] = {}
    for shard in iter_shards(weight_files(folder)):
        sd.update(shard)
    return sd


# ---- writing -------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tensors(path: str | Path, tensors: dict[str, Tensor]) -> None:
    """One safetensors file, fsynced. safetensors >= 0.6 writes from the tensors' memory without a copy."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(Path(path))


class ShardWriter:
    """Writes tensors as HF does: ``model.safetensors`` when they fit one shard of ``max_shard_bytes``, else
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Holds at most one shard."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []  # tensor names of each flushed shard
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        save_tensors(self.folder / f".shard-{len(self.shards):05d}.safetensors", self.buffer)
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names (the count is known now); returns the file names."""
        self.flush()
        n = len(self.shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for k, name in enumerate(names):
            os.replace(self.folder / f".shard-{k:05d}.safetensors", self.folder / name)
        if n > 1:
            weight_map = {t: name for name, ts in zip(names, self.shards) for t in ts}
            atomic_write_json(
                self.folder / INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        return names


# ---- output folders ------------------------------------------------------------------------------
def check_output_folder(out: str | Path, *sources: str | Path) -> Path:
    """Refuse an ``out`` that is (or lies inside, or contains) a source folder, or that already holds files.

    A converter must never write into what it reads (issue 11: ``--from-hf X --out X`` overwrote X).
    """
    out_r = Path(out).resolve()
    for src in sources:
        src_r = Path(src).resolve()
        if out_r == src_r or src_r in out_r.parents:
            raise ValueError(f"--out {out} is the source folder {src} or inside it; choose a new folder")
        if out_r in src_r.parents:
            raise ValueError(f"--out {out} contains the source folder {src}; choose a new folder")
    if out_r.exists():
        if not out_r.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        if any(out_r.iterdir()):
            raise ValueError(f"--out {out} is not empty; choose a new or empty folder (nothing is overwritten)")
    return out_r


@contextlib.contextmanager
def atomic_folder(out: str | Path, *sources: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; on success it is renamed to ``out`` in one step.

    Readers see no ``out``, or a complete one; on an error the temporary folder is removed. ``out`` is
    checked with :func:`check_output_folder` first (an empty existing folder is replaced).
    """
    final = check_output_folder(out, *sources)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if final.exists():
            final.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
