"""recipes/bench_layer_gap.py: the MoE layer's gap to dense, split into its matmuls and the rest."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bench_layer_gap")


def test_rows_split_the_gap_and_name_every_part(recipe, tmp_path, keep_threads):
    out = tmp_path / "gap.json"
    rows = recipe.main(["--repeats", "2", "--point", "4x2x8x16x64", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row == rows[0] and row["point"] == "4x2x8x16x64" and row["dtype"] == "float32"
    for part in ("moe_layer", "dense_layer", "moe_matmuls", "dense_matmuls", "moe_fixed"):
        assert row[f"{part}_ms"] > 0 and row["spread"][part] >= 0
    gap = row["moe_layer_ms"] - row["dense_layer_ms"]
    assert row["gap_ms"] == pytest.approx(gap, abs=2e-3)
    if row["gap_from_matmuls"] is not None:
        mm_gap = row["moe_matmuls_ms"] - row["dense_matmuls_ms"]
        assert row["gap_from_matmuls"] == pytest.approx(mm_gap / gap, abs=0.01)


def test_moe_matmuls_cover_every_row_and_expert(recipe, monkeypatch):
    """The MoE matmul replay issues 9 matmuls per expert over row blocks that add up to N*K."""
    seen = []
    real_mm = torch.mm

    def counting_mm(a, b, **kw):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, **kw)

    run = recipe._moe_matmuls(3, 2, 8, 16, 10, torch.float32)  # 20 rows over 3 experts: 7, 7, 6
    monkeypatch.setattr(torch, "mm", counting_mm)
    run()
    assert len(seen) == 3 * 8  # per expert 8 mm (3 forward, 5 backward) and one addmm_
    # [M, D] x [D, F]: gate and up forward, and dy @ w_down^T, once per expert each, M the expert's rows
    rows = sorted(a[0] for a, b in seen if a[1] == 16 and b == (16, 8))
    assert rows == sorted([7, 7, 6] * 3)


def test_bad_point_is_refused_by_name(recipe):
    with pytest.raises(argparse.ArgumentTypeError, match="--point '4x8x8x16x64'"):
        recipe._point("4x8x8x16x64")  # top-k above the expert count


def test_the_timed_layer_runs_the_fused_node_whose_matmuls_are_replayed(recipe, monkeypatch):
    """In bf16 'auto' would pick padded_bmm at small sizes: the split compares the fused node's matmuls only
    when the layer runs that node."""
    resolved = []
    real = recipe.MoELayer.resolve_dispatch

    def spy(self, x):
        resolved.append(real(self, x))
        return resolved[-1]

    monkeypatch.setattr(recipe.MoELayer, "resolve_dispatch", spy)
    threads = torch.get_num_threads()
    try:
        recipe.main(["--repeats", "1", "--point", "4x2x8x16x64", "--dtype", "bfloat16"])
    finally:
        torch.set_num_threads(threads)
    assert resolved and set(resolved) == {"sorted"}
