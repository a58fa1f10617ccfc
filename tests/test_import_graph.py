"""The package's static import graph: no cycles, and dependencies point one way.

Layers, bottom to top: ``moe`` (a leaf: torch and itself, plus the leaf helpers ``core.checks`` /
``core.files``), ``core`` (may take ``moe.config``, the nested config, and in ``core/model.py`` alone the MoE
layer for the FFN slot), ``multimodal`` (on core and moe), ``experiment`` (above all three). The graph is read
from the installed package's source with ``ast`` (nothing is imported), and every ``moekit`` import must sit
at module level: a lazy import inside a function would hide an edge.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import tokenize
from pathlib import Path

import pytest

PACKAGES = ("core", "moe", "multimodal", "experiment")
MOE_MAY_USE_FROM_CORE = {"moekit.core.checks", "moekit.core.files"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(f"moekit.{pkg}")
        assert spec is not None and spec.submodule_search_locations, f"moekit.{pkg} is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.glob("*.py")):
            name = f"moekit.{pkg}" if path.stem == "__init__" else f"moekit.{pkg}.{path.stem}"
            out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str, module: str, level: int, is_package: bool) -> str:
    if level == 0:
        return name
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported moekit module, line, at module level)`` of every import in ``module``'s source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", module, node.level, path.stem == "__init__")
            # `from moekit.moe import layer` imports the submodule; `from moekit.moe.layer import X` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("moekit."):
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]
                out.append((name, node.lineno, id(node) in top))
    return out


GRAPH = {m: sorted({t for t, _, _ in _imports(m) if t != m}) for m in MODULES}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_package_is_found():
    assert {_layer(m) for m in MODULES} == set(PACKAGES)
    assert "moekit.core.train" in MODULES and "moekit.moe.layer" in MODULES


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in GRAPH[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_lazy_moekit_imports():
    lazy = [f"{MODULES[m].name}:{line} imports {t}" for m in MODULES for t, line, top in _imports(m) if not top]
    assert not lazy, "moekit imports inside functions hide dependencies: " + "; ".join(lazy)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "moe"))
def test_moe_is_a_leaf(module):
    bad = [t for t in GRAPH[module] if _layer(t) != "moe" and t not in MOE_MAY_USE_FROM_CORE]
    assert not bad, f"{module} imports {bad}: moe/ may use only torch, itself and {sorted(MOE_MAY_USE_FROM_CORE)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "core"))
def test_core_uses_only_the_moe_config_and_the_ffn_slot(module):
    allowed = {"moekit.moe.config"} | ({"moekit.moe.layer"} if module == "moekit.core.model" else set())
    bad = [t for t in GRAPH[module] if _layer(t) in ("moe", "multimodal", "experiment") and t not in allowed]
    assert not bad, f"{module} imports {bad}; core may import only {sorted(allowed)} from above or beside it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) == "multimodal"))
def test_multimodal_does_not_reach_up(module):
    bad = [t for t in GRAPH[module] if _layer(t) == "experiment"]
    assert not bad, f"{module} imports the experiment layer {bad}"


def test_trainer_files_have_no_moe_code():
    """``grep moe core/train*.py`` finds at most comments: the Trainer knows MoE only through extensions."""
    hits = []
    for name, path in MODULES.items():
        if not name.startswith("moekit.core.train"):
            continue
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type != tokenize.COMMENT and "moe" in tok.string.lower().replace("moekit", ""):
                hits.append(f"{path.name}:{tok.start[0]}: {tok.string[:60]!r}")
    assert not hits, "MoE-specific code in the Trainer: " + "; ".join(hits)
