"""Config layering: dataclass defaults, then a YAML file, then dotted command-line overrides.

    cfg = load_config(RunConfig, "recipes/configs/debug.yaml", ["model.d_model=128", "model.moe.num_experts=8"])

Generic over any (nested) dataclass; imports nothing from moekit. Layers are merged as nested dicts that
hold only what was set explicitly; the dataclasses supply every default when the tree is finally built, and
their ``__post_init__`` validates the values. Keys are checked against the dataclass fields at every level
(unknown key -> error naming it and the allowed keys). An override into a nested config that is ``None``
(``model.moe`` of a dense model) creates it with defaults. Override values are parsed with
``yaml.safe_load``: ``3``, ``0.5``, ``true``, ``null``, ``[1, 2]`` work, and numeric strings such as
``3e-4`` (YAML 1.1 reads them as text) are accepted where a float is expected, in a tuple, list or dict
field's elements too. A YAML syntax error names the file, line and column, or the override; a mapping or a
list given to a field of another type (``data.corpus=a: b`` reads as a mapping) is refused naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = [
    "build_dataclass",
    "config_to_dict",
    "flatten_dict",
    "load_config",
    "merge_tree",
    "parse_override",
    "read_yaml",
    "set_dotted",
]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of a file, refusing repeated keys; a syntax error, a repeated key or a missing file
    names the path (and line, column)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"config file {path}: invalid YAML{where}: {problem}") from None


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    ignore: Iterable[str] = (),
) -> T:
    """Build dataclass ``cls`` from its defaults, a YAML file and dotted overrides (later layers win); the
    file's top-level sections named in ``ignore`` are skipped (they belong to another recipe)."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        skip = set(ignore)
        merge_tree(cls, tree, {k: v for k, v in (loaded or {}).items() if k not in skip})
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        set_dotted(cls, tree, key, value)
    return build_dataclass(cls, tree)


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.d_model=128"`` -> ``("model.d_model", 128)``; the value is read as YAML (``read_yaml``'s
    loader); a value that is no valid YAML is refused naming the override."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like 'section.key=value' (e.g. 'train.steps=200')")
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"override {text!r}: the value {raw!r} is not valid YAML ({problem}); a list is written [0.9, 0.95], "
            "a text holding YAML syntax is quoted: key='\"a: b\"'"
        ) from None


def merge_tree(cls: type, tree: dict[str, Any], update: Mapping[str, Any], prefix: str = "") -> None:
    """Recursively merge ``update`` into ``tree``, validating keys against dataclass ``cls``.

    ``prefix`` (e.g. ``"model."``) locates ``tree`` in the whole config; it only serves error messages.
    """
    for key, value in update.items():
        set_dotted(cls, tree, str(key), value, prefix)


def set_dotted(cls: type, tree: dict[str, Any], key: str, value: Any, prefix: str = "") -> None:
    """Set ``tree[a][b][c] = value`` for ``key="a.b.c"``, checking every part against ``cls``'s fields.

    A mapping assigned to a nested-dataclass field is merged key by key (so a YAML section only changes
    what it names); ``None`` clears the field (e.g. ``model.moe=null`` makes the model dense).
    """
    parts = key.split(".")
    full = prefix + key
    node, node_cls = tree, cls
    for depth, part in enumerate(parts):
        hints = _field_types(node_cls)
        if part not in hints:
            where = (prefix + ".".join(parts[:depth])).rstrip(".") or "<top level>"
            raise ValueError(
                f"unknown config key {full!r}: {part!r} is not a field of {node_cls.__name__} ({where}); "
                f"allowed keys: {sorted(hints)}"
            )
        sub_cls = _nested_dataclass(hints[part])
        last = depth == len(parts) - 1
        if sub_cls is None:
            if not last:
                raise ValueError(
                    f"config key {full!r}: {prefix}{'.'.join(parts[: depth + 1])} is a plain value, not a section"
                )
            node[part] = value
            return
        if last and not isinstance(value, Mapping):
            nullable = type(None) in _union_args(hints[part])
            if value is not None or not nullable:
                allowed = "a mapping or null" if nullable else "a mapping (it cannot be null; {} keeps its defaults)"
                raise ValueError(f"config key {full!r} is a {sub_cls.__name__} section: give {allowed}, got {value!r}")
            node[part] = None
            return
        if not isinstance(node.get(part), dict):
            node[part] = {}  # absent or explicitly None: start from the section's defaults
        if last:
            merge_tree(sub_cls, node[part], value, f"{prefix}{'.'.join(parts)}.")
            return
        node, node_cls = node[part], sub_cls


def build_dataclass(cls: type[T], tree: Mapping[str, Any], prefix: str = "") -> T:
    """Instantiate ``cls`` from a (validated) nested dict; missing keys take the dataclass defaults."""
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        if key not in hints:
            raise ValueError(f"unknown config key {prefix + key!r}; allowed keys: {sorted(hints)}")
        sub_cls = _nested_dataclass(hints[key])
        if sub_cls is not None and isinstance(value, Mapping):
            kwargs[key] = build_dataclass(sub_cls, value, f"{prefix}{key}.")
        elif sub_cls is not None and value is not None and not isinstance(value, sub_cls):
            raise ValueError(f"config key {prefix + key!r} must be a mapping or null, got {value!r}")
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def config_to_dict(obj: Any) -> Any:
    """Dataclasses -> plain dicts, tuples -> lists: something ``yaml.safe_dump`` and JSON accept."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    return obj


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for experiment trackers that want flat hyper-parameters)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- type helpers
def _field_types(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _union_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside ``X`` or ``X | None``, else None."""
    for arg in _union_args(tp):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Light, explicit conversions only: int/numeric text -> float, list -> tuple, applied to the elements of
    ``tuple[...]`` / ``list[...]`` / ``dict[..., ...]`` fields too. Everything else as is, except a mapping or
    a list given to a field that holds neither, refused naming the key and the expected type.

    Range and choice checks stay in each dataclass's ``__post_init__``; this only fixes the representation
    gaps between YAML and Python (``1e-3`` is text in YAML 1.1, YAML has no tuples).
    """
    args = _union_args(tp)
    if value is None or Any in args:
        return value
    origins = {typing.get_origin(a) or a for a in args}
    if isinstance(value, Mapping) and not origins & {dict, Mapping}:
        hint = "; YAML reads 'a: b' as a mapping: quote a text that holds ': '" if str in origins else ""
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got a mapping {value!r}{hint}")
    if isinstance(value, (list, tuple)) and origins <= {str, int, float, bool, type(None)}:
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got a list {value!r}")
    if float in origins and not isinstance(value, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str) and int not in origins and str not in origins:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
    for arg in args:
        origin, params = typing.get_origin(arg), typing.get_args(arg)
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            if origin is list or (len(params) == 2 and params[1] is Ellipsis):
                params = (params[0] if params else Any,) * len(value)
            elif len(params) != len(value):  # the wrong length: __post_init__ names it; coerce none
                params = (Any,) * len(value)
            items = [_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, params))]
            return tuple(items) if origin is tuple else items
        if origin is dict and isinstance(value, Mapping):
            value_type = params[1] if params else Any
            return {k: _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)
