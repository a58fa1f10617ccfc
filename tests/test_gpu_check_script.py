"""recipes/gpu_check.sh embeds Python that only runs on a CUDA machine, where a stale call costs a lent GPU's
time: check here that every block compiles and that its moekit calls use arguments that exist."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "gpu_check.sh"
BLOCKS = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), flags=re.S)
ACCEPTS = {
    "MoEConfig": {f.name for f in dataclasses.fields(MoEConfig)},
    "MoELayer": set(inspect.signature(MoELayer.__init__).parameters) - {"self"},
}


def test_the_script_has_its_python_blocks():
    assert len(BLOCKS) >= 2, "the heredoc pattern no longer matches gpu_check.sh"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_embedded_python_compiles_and_calls_moekit_with_known_arguments(index: int):
    tree = ast.parse(BLOCKS[index], filename=f"gpu_check.sh block {index}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ACCEPTS:
            unknown = {kw.arg for kw in node.keywords} - ACCEPTS[node.func.id]
            assert not unknown, f"line {node.lineno}: {node.func.id} has no argument(s) {sorted(unknown)}"
