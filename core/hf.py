"""Hugging Face interop: HF ``*ForCausalLM`` checkpoints <-> moekit, driven by the family table in
:mod:`moekit.core.hf_families` (tensor names, config defaults, refusals).

Shapes: V vocab, D d_model, F FFN / expert hidden width, E experts.

Configs are read and written as plain JSON (transformers is not a dependency of moekit); weights go
through safetensors only, shard by shard (:mod:`moekit.core.hf_io`). Tensors keep their dtype unless a
``dtype`` is asked for, which every floating tensor gets except those transformers keeps in float32 in fp16
and bf16 (``Family.fp32_tensors``: DeepSeek's router weight, V3's correction bias). Anything that would
convert silently wrong is refused, naming the HF config field and its value (HF -> moekit) or the
``ModelConfig`` field (moekit -> HF).

Training-only fields do not travel exactly: HF dropouts and ``router_jitter_noise`` are dropped, moekit's
``dropout``/``z_loss_coef`` are not exported. The load-balance coefficient is rescaled (see
:func:`config_from_hf`). ``hf_to_moekit`` leaves ``hf_source.json`` (family and original HF config) next to
the moekit checkpoint, so that ``moekit_to_hf`` writes the same family back with its token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from moekit.core.config import ModelConfig
from moekit.core.files import atomic_write_json
from moekit.core.hf_config import (
    DTYPES,
    check_exportable,
    choose_family,
    config_from_hf,
    config_to_hf,
    detect_architecture,
    load_hf_config,
)
from moekit.core.hf_families import (
    FAMILIES,
    GLOBAL_RULES,
    IGNORED_SUFFIXES,
    LM_HEAD,
    NORMS,
    Family,
    Rule,
    attention_rules,
    detect_family,
    family_table,
    shared_rules,
)
from moekit.core.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    SINGLE_FILE,
    ShardWriter,
    atomic_folder,
    iter_shards,
    load_state_dict,
    read_headers,
    save_tensors,
    weight_files,
)
from moekit.core.model import Transformer

SOURCE_FILE = "hf_source.json"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
__all__ = [
    "DTYPES",
    "FAMILIES",
    "family_table",
    "config_from_hf",
    "config_to_hf",
    "detect_architecture",
    "hf_to_moekit",
    "load_hf",
    "load_hf_config",
    "load_hf_state_dict",
    "moekit_to_hf",
    "save_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]


# ---- weights -------------------------------------------------------------------------------------
def _plan(cfg: ModelConfig, fam: Family, hf_names: set[str] | None) -> list[tuple[Rule, int]]:
    """The rules, with their layer index, that convert a whole model. With ``hf_names`` (reading), each MoE
    layer uses the layout whose tensors are present; without (writing), the family's first layout."""
    plan: list[tuple[Rule, int]] = [(r, -1) for r in GLOBAL_RULES]
    if not cfg.tie_embeddings:
        plan.append((LM_HEAD, -1))
    for i in range(cfg.n_layers):
        plan += [(r, i) for r in NORMS + attention_rules(fam, cfg)]
        if cfg.is_moe_layer(i):
            layout = fam.moe_layouts[0]
            for candidate in fam.moe_layouts if hf_names is not None else ():
                if all(n in hf_names for r in candidate for n in r.hf_names(i, cfg)):
                    layout = candidate
                    break
            plan += [(r, i) for r in layout + shared_rules(fam, cfg)]
        else:
            if fam.dense_layout is None:
                raise ValueError(f"{fam.title} has no dense layers, but layer {i} of the config is dense")
            plan += [(r, i) for r in fam.dense_layout]
    return plan


def _cast(name: str, t: Tensor, dtype: torch.dtype | None, fp32_suffixes: tuple[str, ...]) -> Tensor:
    """``t`` in ``dtype`` (None: as stored); in a half dtype the family's float32-kept tensors go to float32
    instead (transformers keeps them so for fp16/bf16 only)."""
    if dtype is None or not t.is_floating_point():
        return t
    kept = dtype in (torch.float16, torch.bfloat16) and name.endswith(fp32_suffixes)
    return t.to(torch.float32 if kept else dtype)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``Transformer(cfg)``'s state dict (built on the meta device: free)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    return expected


def _check_against_model(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    expected = _expected_shapes(cfg)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(f"converted state dict does not fit Transformer(cfg): missing {missing}, unexpected {extra}")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(f"tensor {k} has shape {tuple(shapes[k])}; the config implies {shape}")


def _from_hf(
    shards: Callable[[frozenset[str]], Iterable[dict[str, Tensor]]],
    headers: dict[str, tuple[tuple[int, ...], torch.dtype]],
    cfg: ModelConfig,
    fam: Family,
    dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    """Convert HF tensors arriving shard by shard; each rule runs as soon as all its inputs have arrived,
    and its inputs are released then, so memory holds the output plus about one shard."""
    skip = {n for n in headers if n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in headers:
        skip.add("lm_head.weight")  # HF ties it to the embedding on load, whatever the file holds
    if fam.extra_layers_ignored:  # DeepSeek-V3's multi-token-prediction layers: transformers drops them too
        skip |= {n for n in headers if (m := _LAYER.match(n)) and int(m.group(1)) >= cfg.n_layers}
    plan = _plan(cfg, fam, set(headers))
    owner = {n: k for k, (rule, i) in enumerate(plan) for n in rule.hf_names(i, cfg)}
    missing = [n for n in owner if n not in headers]
    if missing:
        raise KeyError(f"HF checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = sorted(set(headers) - set(owner) - skip)
    if extra:
        raise ValueError(
            f"HF checkpoint has {len(extra)} tensors moekit cannot represent (biases? other architecture?): "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    # Dry run on meta tensors: a shape mismatch is refused before any tensor data is read.
    meta = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in headers.items() if n in owner}
    shapes = {}
    for rule, i in plan:
        try:
            outs = rule.to_ours([meta[n] for n in rule.hf_names(i, cfg)], cfg)
        except ValueError as err:
            raise ValueError(f"tensor {', '.join(rule.hf_names(i, cfg))} {err}") from err
        shapes.update({n: tuple(t.shape) for n, t in zip(rule.ours_names(i, cfg), outs)})
    _check_against_model(shapes, cfg)

    out: dict[str, Tensor] = {}
    pending: dict[str, Tensor] = {}
    keep = tuple(ours for ours, _ in fam.fp32_tensors)
    for shard in shards(frozenset(skip)):
        pending.update(shard)
        for k in sorted({owner[n] for n in shard}):
            rule, i = plan[k]
            names = rule.hf_names(i, cfg)
            if all(n in pending for n in names):
                outs = rule.to_ours([pending.pop(n) for n in names], cfg)
                for n, t in zip(rule.ours_names(i, cfg), outs):
                    out[n] = _cast(n, t, dtype, keep).contiguous()
    return out


def _to_hf(
    get: Callable[[str], Tensor],
    names: set[str],
    cfg: ModelConfig,
    fam: Family,
    emit: Callable[[str, Tensor], None],
    dtype: torch.dtype | None,
) -> None:
    """moekit tensors (read one rule at a time through ``get``) -> HF tensors handed to ``emit``."""
    alias = {}
    keep = tuple(theirs for _, theirs in fam.fp32_tensors)
    if cfg.tie_embeddings and "embed.weight" not in names and "lm_head.weight" in names:
        alias["embed.weight"] = "lm_head.weight"  # save_model may keep either name of a tied pair
        names = (names - {"lm_head.weight"}) | {"embed.weight"}
    if cfg.tie_embeddings:
        names = names - {"lm_head.weight"}
    plan = _plan(cfg, fam, None)
    needed = {n for rule, i in plan for n in rule.ours_names(i, cfg)}
    missing, extra = sorted(needed - names), sorted(names - needed)
    if missing or extra:
        raise ValueError(f"moekit checkpoint does not fit {fam.architecture}: missing {missing}, unexpected {extra}")
    for rule, i in plan:
        outs = rule.to_hf([get(alias.get(n, n)) for n in rule.ours_names(i, cfg)], cfg)
        for n, t in zip(rule.hf_names(i, cfg), outs):
            emit(n, _cast(n, t, dtype, keep).contiguous())


def state_dict_from_hf(hf_sd: dict[str, Tensor], cfg: ModelConfig, family: str | None = None) -> dict[str, Tensor]:
    """Rename/split/restack in-memory HF tensors into moekit's state-dict names (``family`` default: Llama for
    dense ``cfg``, Mixtral for MoE). With ``cfg.tie_embeddings`` the result has no ``lm_head.weight``."""
    fam = choose_family(cfg, family, None)
    headers = {n: (tuple(t.shape), t.dtype) for n, t in hf_sd.items()}
    return _from_hf(lambda skip: [{k: v for k, v in hf_sd.items() if k not in skip}], headers, cfg, fam, None)


def state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig, family: str | None = None) -> dict[str, Tensor]:
    """moekit tensors -> HF names of ``family`` (default Llama / Mixtral; classic per-expert layout), as
    contiguous tensors that share no memory (safetensors refuses shared storage)."""
    fam = choose_family(cfg, family, None)
    check_exportable(cfg, fam)
    out: dict[str, Tensor] = {}
    _to_hf(sd.__getitem__, set(sd), cfg, fam, lambda n, t: out.__setitem__(n, t.detach().clone()), None)
    return out


def load_hf_state_dict(hf_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF checkpoint folder: ``model.safetensors``, or the shards its index lists."""
    return load_state_dict(hf_dir)


# ---- folders and models --------------------------------------------------------------------------
def _read_hf(hf_dir: str | Path, dtype: torch.dtype | None) -> tuple[ModelConfig, Family, dict[str, Any], dict]:
    hf_cfg = load_hf_config(hf_dir)
    fam = detect_family(hf_cfg)
    cfg = config_from_hf(hf_cfg)
    files = weight_files(hf_dir)
    sd = _from_hf(lambda skip: iter_shards(files, skip), read_headers(files), cfg, fam, dtype)
    return cfg, fam, hf_cfg, sd


def hf_to_moekit(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> ModelConfig:
    """Convert an HF folder into moekit's ``save_pretrained`` layout; returns the config.

    ``out_dir`` must be new or empty and outside ``hf_dir``; it appears complete or not at all. Tensors keep
    their dtype unless ``dtype`` is given (in fp16/bf16 DeepSeek's router stays float32, as in transformers).
    Memory: the model plus about one shard.
    """
    with atomic_folder(out_dir, hf_dir) as tmp:
        cfg, fam, hf_cfg, sd = _read_hf(hf_dir, dtype)
        atomic_write_json(tmp / "config.json", cfg.to_dict(), indent=2)
        save_tensors(tmp / SINGLE_FILE, sd)
        atomic_write_json(tmp / SOURCE_FILE, {"family": fam.name, "config": hf_cfg}, indent=2)
    return cfg


def _write_hf(
    get: Callable[[str], Tensor],
    names: set[str],
    cfg: ModelConfig,
    hf_dir: str | Path,
    family: str | None,
    source: dict[str, Any] | None,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    sources: tuple[str | Path, ...] = (),
) -> dict[str, Any]:
    fam = choose_family(cfg, family, source)
    check_exportable(cfg, fam)
    embed = "embed.weight" if "embed.weight" in names else "lm_head.weight"
    out_dtype = dtype or get(embed).dtype
    hf_cfg = config_to_hf(cfg, out_dtype, fam.name, source)
    with atomic_folder(hf_dir, *sources) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        _to_hf(get, names, cfg, fam, writer.add, dtype)
        writer.finish()
        atomic_write_json(tmp / "config.json", hf_cfg, indent=2)
    return hf_cfg


def moekit_to_hf(
    moekit_dir: str | Path,
    hf_dir: str | Path,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Convert a moekit ``save_pretrained`` folder into an HF folder (sharded above ``max_shard_bytes``);
    returns the HF config dict. ``family`` default: the one recorded in ``hf_source.json`` if it can hold
    the model, else Llama (dense) / Mixtral (MoE). Memory: about one output shard."""
    d = Path(moekit_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {moekit_dir}")
    cfg = ModelConfig.load(d / "config.json")
    src_path = d / SOURCE_FILE
    source = json.loads(src_path.read_text()) if src_path.is_file() else None
    _check_against_model(_moekit_shapes(cfg, read_headers([d / SINGLE_FILE])), cfg)
    path = str(d / SINGLE_FILE)

    def get(name: str) -> Tensor:
        # Opened per tensor: an open file stays memory-mapped, and its pages would count as resident until
        # the end, so that reading one file of the whole model would look like holding the whole model.
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
    return _write_hf(get, names, cfg, hf_dir, family, source, dtype, max_shard_bytes, (moekit_dir,))


def _moekit_shapes(cfg: ModelConfig, headers: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict:
    """Shapes by the names :func:`_check_against_model` expects (save_model may keep a tied pair as lm_head)."""
    shapes = {n: s for n, (s, _) in headers.items()}
    if cfg.tie_embeddings and "embed.weight" not in shapes and "lm_head.weight" in shapes:
        shapes["embed.weight"] = shapes["lm_head.weight"]
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def save_hf(
    model: Transformer,
    hf_dir: str | Path,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Write an in-memory :class:`Transformer` as an HF checkpoint folder."""
    sd = model.state_dict()
    return _write_hf(sd.__getitem__, set(sd), model.cfg, hf_dir, family, None, dtype, max_shard_bytes)


def load_hf(hf_dir: str | Path, dtype: torch.dtype | None = None) -> Transformer:
    """A :class:`Transformer` with the weights of an HF folder, in the checkpoint's dtype unless ``dtype``; each
    tensor keeps its own (DeepSeek's bf16 checkpoints hold the router and its bias in float32, and a ``dtype``
    leaves them so)."""
    cfg, _, _, sd = _read_hf(hf_dir, dtype)
    model = Transformer(cfg).to(sd["embed.weight"].dtype)
    for name, t in model.state_dict(keep_vars=True).items():
        if name in sd and sd[name].dtype != t.dtype:
            t.data = t.data.to(sd[name].dtype)
    model.load_state_dict(sd, strict=not cfg.tie_embeddings)  # tied: lm_head.weight is embed.weight
    return model
