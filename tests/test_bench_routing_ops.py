"""recipes/bench_routing_ops.py: the layer's per-row ops against their alternatives, agreeing before timed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import load_recipe


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bench_routing_ops")


def test_every_alternative_agrees_with_the_current_op_and_is_timed_beside_it(recipe, tmp_path, keep_threads):
    out = tmp_path / "ops.json"
    rows = recipe.main(["--repeats", "1", "--calls", "2", "--point", "8x2x64x16", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    ops = {r["op"]: [] for r in rows}
    for r in rows:
        ops[r["op"]].append(r["variant"])
        assert r["agrees"] is True and r["us"] > 0 and r["point"] == "8x2x64x16", r
    assert set(ops) == {"topk", "argsort", "gather", "combine", "entropy"}
    assert all(v[0] == "current" and len(v) >= 2 for v in ops.values())
    assert all(r["vs_current"] == 1.0 for r in rows if r["variant"] == "current")


def test_the_alternatives_compute_the_same_thing(recipe):
    """Top-k by rounds of max on a known input, the inverse-permutation combine against index_add_, and the
    agreement check reporting a wrong order (so a broken alternative shows as 'NO', not as a faster op)."""
    fns = recipe.variants(8, 3, 50, 4)
    idx = fns["topk"]["current"]()
    assert idx.shape == (50, 3) and torch.equal(
        recipe._topk_by_max_rounds(torch.eye(8)[:5] + 0.5, 3)[:, 0], torch.arange(5)
    )
    ys = fns["combine"]["current"]()
    assert torch.allclose(fns["combine"]["inverse_permutation_sum"](), ys, atol=1e-5)
    assert not recipe._agrees(torch.tensor([0, 1]), torch.tensor([1, 0]))  # a wrong order is reported


def test_bad_point_is_refused_by_name(recipe):
    with pytest.raises(argparse.ArgumentTypeError, match="--point '4x8x64x16'"):
        recipe._point("4x8x64x16")
