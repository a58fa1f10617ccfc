"""recipes/bench_train_step.py on the debug comparison (--quick, seconds) and the saved-for-backward meter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_recipe

from moekit.core.accounting import flops_per_token
from moekit.core.meter import SavedTensorBytes
from moekit.experiment.plan import TASKS, load_comparison, plan_runs

CONFIG = "recipes/configs/compare-debug.yaml"  # MoE 4 experts top-2, d_expert 64


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bench_train_step")


@pytest.fixture(scope="module")
def result(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    threads = torch.get_num_threads()
    try:
        recipe.main(
            ["--config", CONFIG, "--quick", "--repeats", "1", "--threads", "1", "--fine-experts", "16"]
            + ["--json", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_json_structure(result):
    assert set(result) == {"meta", "summary", "rows"}
    rows = result["rows"]
    groups = {(r["pair"], r["dtype"], r["mode"]) for r in rows}
    assert groups == {(p, d, "eager") for p in ("demo", "fine") for d in ("float32", "bfloat16")}
    assert sorted(r["kind"] for r in rows) == ["dense"] * 4 + ["moe"] * 4
    assert len(result["summary"]) == 4
    for r in rows:
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert r["tokens_per_step"] == result["meta"]["batch_size"] * result["meta"]["seq_len"]
        assert r["activations_mib"] > 0 and r["compile_s"] is None
        # the tensors' bytes against the accounting's parameter count, fp32: gradients alike, AdamW two moments
        assert r["weights_mib"] * 2**20 == r["grads_mib"] * 2**20 == 4 * r["params_total"]
        assert 2 * r["weights_mib"] <= r["optimizer_state_mib"] < 2 * r["weights_mib"] + 0.01
    for s in result["summary"]:
        assert s["time_per_token_moe_vs_dense"] == pytest.approx(s["dense_tokens_per_s"] / s["moe_tokens_per_s"])


def test_twins_are_the_comparisons_and_flop_matched(result):
    cmp = load_comparison(CONFIG)
    task = TASKS[cmp.compare.task]
    specs = plan_runs(cmp)
    seq = task.seq_len(cmp.base)
    twin = task.decoder(next(s.run for s in specs if s.name == "dense"))
    by_pair = {p["pair"]: p for p in result["meta"]["pairs"]}
    assert by_pair["demo"]["dense_d_ff"] == twin.d_ff
    fine = by_pair["fine"]["moe"]
    assert (fine["num_experts"], fine["top_k"], fine["d_expert"]) == (16, 8, 16)  # each expert split 4 ways
    tol = cmp.compare.max_flops_mismatch
    for pair in ("demo", "fine"):
        moe, dense = (next(r for r in result["rows"] if r["pair"] == pair and r["kind"] == k) for k in ("moe", "dense"))
        assert abs(moe["flops_per_token"] - dense["flops_per_token"]) <= tol * dense["flops_per_token"]
        assert moe["params_active"] < moe["params_total"] and dense["params_active"] == dense["params_total"]
    assert next(r for r in result["rows"] if r["pair"] == "demo" and r["kind"] == "dense")[
        "flops_per_token"
    ] == flops_per_token(twin, seq)


def test_fine_experts_must_split_evenly(recipe):
    with pytest.raises(ValueError, match="fine-experts=6"):
        recipe.model_pairs(CONFIG, [], 6)


def test_saved_tensor_bytes_counts_storages_once_and_skips_excluded():
    w = torch.randn(8, 3, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorBytes(exclude=[w]) as saved:
        y = x[:2] @ w + x[2:] @ w  # both matmuls save a view of x's storage and w
    assert saved.nbytes == x.numel() * 4
    with SavedTensorBytes() as saved:
        (x @ w).sum()
    assert saved.nbytes == (x.numel() + w.numel()) * 4
    y.sum().backward()  # the hooks' unpack returns the tensor: backward still works
    assert torch.allclose(x.grad[:2], w.sum(1).expand(2, 8))


def test_compiled_rows_report_compile_time(recipe, tmp_path):
    """aot_eager traces forward and backward as inductor does, without code generation: seconds."""
    threads = torch.get_num_threads()
    argv = ["--config", CONFIG, "--quick", "--repeats", "1", "--threads", "1", "--fine-experts", "0"]
    try:
        result = recipe.main(argv + ["--dtypes", "float32", "--compile", "--compile-backend", "aot_eager"])
    finally:
        torch.set_num_threads(threads)
    rows = {(r["kind"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(k, m) for k in ("moe", "dense") for m in ("eager", "compiled")}
    for kind in ("moe", "dense"):
        compiled = rows[(kind, "compiled")]
        assert compiled["compile_s"] == pytest.approx(compiled["first_step_s"] - compiled["step_ms"] / 1e3)
        assert compiled["compile_s"] > 0 and compiled["activations_mib"] is None
        assert compiled["weights_mib"] == rows[(kind, "eager")]["weights_mib"]
    assert [s["mode"] for s in result["summary"]] == ["eager", "compiled"]
    assert result["meta"]["compile_backend"] == "aot_eager"


def test_several_dispatches_run_side_by_side_against_one_twin(recipe):
    threads = torch.get_num_threads()
    argv = ["--config", CONFIG, "--quick", "--repeats", "1", "--threads", "1", "--fine-experts", "0"]
    try:
        result = recipe.main(argv + ["--dtypes", "float32", "--dispatch", "sorted", "padded_bmm", "--clock", "cpu"])
    finally:
        torch.set_num_threads(threads)
    moe_rows = [r for r in result["rows"] if r["kind"] == "moe"]
    assert [r["dispatch"] for r in moe_rows] == ["sorted", "padded_bmm"]
    assert [r["kind"] for r in result["rows"]].count("dense") == 1
    assert [s["dispatch"] for s in result["summary"]] == ["sorted", "padded_bmm"]
    dense = next(r for r in result["rows"] if r["kind"] == "dense")
    for s, r in zip(result["summary"], moe_rows):
        assert s["time_per_token_moe_vs_dense"] == pytest.approx(r["step_ms"] / dense["step_ms"])
    assert result["meta"]["clock"] == "cpu" and result["meta"]["dispatch"] == ["sorted", "padded_bmm"]
