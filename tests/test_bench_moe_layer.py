"""recipes/bench_moe_layer.py's peers: transformers' MoE blocks hold moekit's weights and compute its layer."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from conftest import load_recipe

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

transformers = pytest.importorskip("transformers")

LOOPS = ("eager", "batched_mm", "grouped_mm")  # the experts_implementations that run on any CPU


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bench_moe_layer")


def _layer(seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(32, MoEConfig(num_experts=4, top_k=2, d_expert=16))


def test_every_cpu_implementation_is_offered(recipe):
    assert set(LOOPS) <= set(recipe.experts_implementations())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
@pytest.mark.parametrize("impl", LOOPS)
def test_peer_computes_moekits_layer(recipe, family, impl):
    layer = _layer()
    block = recipe.peer_block(family, layer, impl)
    assert block.experts.config._experts_implementation == impl
    assert recipe.peer_mismatch(layer, block) is None
    # independently of the gate: the peer's output on one token from its own weights, expert by expert
    x = torch.randn(1, 1, 32)
    probs = torch.softmax(x[0] @ block.gate.weight.T, -1)[0]
    w, idx = probs.topk(2)
    w = w / w.sum()
    gu, down = block.experts.gate_up_proj, block.experts.down_proj
    want = sum(
        wi * (down[e] @ (torch.nn.functional.silu(gu[e, :16] @ x[0, 0]) * (gu[e, 16:] @ x[0, 0])))
        for wi, e in zip(w, idx.tolist())
    )
    torch.testing.assert_close(layer(x).y[0, 0], want, rtol=1e-5, atol=1e-6)


def test_a_peer_that_computes_something_else_is_refused(recipe):
    layer = _layer()
    block = recipe.peer_block("olmoe", layer, "eager")
    block.gate.norm_topk_prob = False  # OLMoE's own default: combine weights not renormalised
    assert "output differs" in recipe.peer_mismatch(layer, block)
    block = recipe.peer_block("mixtral", layer, "grouped_mm")
    with torch.no_grad():
        block.experts.down_proj[1, 0, 0] += 1e-3
    assert recipe.peer_mismatch(layer, block) is not None


def test_rows_name_their_version_and_skips_say_why(recipe, tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "layer.json"
    argv = ["--repeats", "1", "--threads", "1", "--d-model", "32", "--grid", "4x2x16", "--tokens", "64"]
    try:
        recipe.main(argv + ["--dtypes", "float32", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    impls = {r["impl"]: r["version"] for r in result["rows"]}
    for family in ("mixtral", "qwen3_moe", "olmoe"):
        for impl in LOOPS:
            assert impls[f"transformers-{family}-{impl}"] == f"transformers {transformers.__version__}"
    assert impls["moekit-auto"].startswith("torch ") and "dense" in impls
    (auto,) = [r for r in result["rows"] if r["impl"] == "moekit-auto"]
    assert auto["dispatch"] in ("sorted", "sorted_autograd", "grouped_mm") and auto["fwdbwd_spread"] >= 0
    assert all(s["reason"] and s["impl"] not in impls for s in result["skipped"])


def test_batched_mm_is_skipped_past_its_memory_budget(recipe):
    threads = torch.get_num_threads()
    argv = ["--repeats", "1", "--threads", "1", "--d-model", "32", "--grid", "4x2x16", "--tokens", "64", "128"]
    gib = recipe.batched_mm_gib(MoEConfig(num_experts=4, top_k=2, d_expert=16), 32, 128, torch.float32)
    try:
        result = recipe.main(
            argv
            + ["--dtypes", "float32", "--peers", "mixtral", "--experts-impls", "batched_mm"]
            + ["--peer-max-gib", str(gib * 0.75)]
        )
    finally:
        torch.set_num_threads(threads)
    timed = [r["tokens"] for r in result["rows"] if r["impl"] == "transformers-mixtral-batched_mm"]
    assert timed == [64]
    (skip,) = result["skipped"]
    assert skip["tokens"] == 128 and "--peer-max-gib" in skip["reason"]


def test_torchtitan_peer_computes_moekits_layer_at_bf16_accuracy(recipe):
    pytest.importorskip("torchtitan")
    layer = _layer()
    block = recipe.titan_block(layer)
    assert recipe.peer_mismatch(layer, block, rtol=recipe.TITAN_RTOL) is None
    # its experts run in bfloat16 whatever the input: no float32 agreement, hence bfloat16 rows only
    assert "output differs" in recipe.peer_mismatch(layer, block)
    block.router.route_norm = False  # combine weights not renormalised: a different layer
    assert "output differs" in recipe.peer_mismatch(layer, block, rtol=recipe.TITAN_RTOL)
    with pytest.raises(ValueError, match="plain dropless softmax top-k"):
        recipe.titan_block(MoELayer(32, MoEConfig(num_experts=4, top_k=2, d_expert=16, score_func="sigmoid")))


def test_torchtitan_rows_are_bfloat16_and_name_their_version(recipe):
    pytest.importorskip("torchtitan")
    threads = torch.get_num_threads()
    argv = ["--repeats", "1", "--threads", "1", "--d-model", "32", "--grid", "4x2x16", "--tokens", "64"]
    try:
        result = recipe.main(argv + ["--dtypes", "float32", "bfloat16", "--peers", "torchtitan"])
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in result["rows"] if r["impl"] == "torchtitan-grouped_mm"]
    assert [r["dtype"] for r in rows] == ["bfloat16"]
    assert rows[0]["version"] == f"torchtitan {importlib.metadata.version('torchtitan')}"
    (skip,) = [s for s in result["skipped"] if s["impl"] == "torchtitan-grouped_mm"]
    assert skip["dtype"] == "float32" and "bfloat16 rows only" in skip["reason"]
