"""torch.compile: the Transformer (dense and MoE) traces without avoidable graph breaks and matches eager.

Backend ``aot_eager`` traces forward and backward the way inductor does (AOT autograd, functionalised
buffer updates, unbacked SymInts) but runs the captured graphs eagerly: no C++ compiler, seconds per test.
The sorted MoE dispatch needs ``torch._dynamo.config.capture_scalar_outputs = True`` to be one graph
(its per-expert slice sizes are data-dependent; see ``moekit.moe.dispatch``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch._dynamo
from torch import Tensor
from torch._dynamo.utils import counters

from moekit.core.config import ModelConfig
from moekit.core.data import PackedSequences
from moekit.core.model import IGNORE_INDEX, ModelOutput, Transformer
from moekit.core.train import TrainConfig, Trainer
from moekit.moe.config import MoEConfig
from moekit.moe.extension import MoEExtension
from moekit.moe.layer import MoELayer, set_dispatch, update_router_biases

B, T, V = 2, 8, 64
STATS = ("tokens_per_expert", "routed_assignments", "dropped_assignments", "dropped_tokens", "router_entropy")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled code is cached per function object; start every test from an empty cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _capture_scalars(on: bool = True):
    return torch._dynamo.config.patch(capture_scalar_outputs=on)


def _model(moe: MoEConfig | None = None, dispatch: str = "sorted") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16, moe=moe)
    model = Transformer(cfg)
    set_dispatch(model, dispatch)
    return model


def _moe(**kw) -> MoEConfig:
    # Layer 0 dense, layer 1 MoE: one model exercises both feed-forward kinds.
    return MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 16, "every_n_layers": 2, **kw})


def _batch(seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3 :] = 0  # padding: routed nowhere, no loss
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _forward_backward(model: torch.nn.Module, batch: dict[str, Tensor]) -> ModelOutput:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    (out.loss + out.aux_loss).backward()
    return out


def _compiled_vs_eager(eager: Transformer, capture: bool = True) -> tuple[Transformer, ModelOutput, ModelOutput]:
    """Compile a copy of ``eager`` (fullgraph: any graph break raises), run forward + backward on the same batch
    through the copy, then through ``eager``; returns ``(copy, eager output, compiled output)``."""
    src = copy.deepcopy(eager)
    compiled = torch.compile(src, backend="aot_eager", fullgraph=True)
    batch = _batch()
    with _capture_scalars(capture):
        out_c = _forward_backward(compiled, batch)
    return src, _forward_backward(eager, batch), out_c


def _assert_same(eager: Transformer, compiled_src: Transformer, out_e: ModelOutput, out_c: ModelOutput) -> None:
    tight = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.logits, out_e.logits, **tight)
    torch.testing.assert_close(out_c.loss, out_e.loss, **tight)
    torch.testing.assert_close(out_c.aux_loss, out_e.aux_loss, **tight)
    assert out_c.moe_losses.keys() == out_e.moe_losses.keys()
    for k in out_e.moe_losses:
        torch.testing.assert_close(out_c.moe_losses[k], out_e.moe_losses[k], **tight)
    assert len(out_c.moe_stats) == len(out_e.moe_stats)
    for s_c, s_e in zip(out_c.moe_stats, out_e.moe_stats):
        for name in STATS:
            torch.testing.assert_close(getattr(s_c, name), getattr(s_e, name), **tight)
    grads_e = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in compiled_src.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads_e[n], **tight, msg=lambda m, n=n: f"grad of {n}: {m}")
    # Training forwards update router buffers inside the graph (functionalised, copied back).
    buffers_e = dict(eager.named_buffers())
    for n, b in compiled_src.named_buffers():
        torch.testing.assert_close(b, buffers_e[n], msg=lambda m, n=n: f"buffer {n}: {m}")


def test_dense_model_compiles_fullgraph_and_matches_eager():
    eager = _model()
    src = copy.deepcopy(eager)
    compiled = torch.compile(src, backend="aot_eager", fullgraph=True)  # any graph break raises
    batch = _batch()
    _assert_same(eager, src, _forward_backward(eager, batch), _forward_backward(compiled, batch))


MOE_CASES = {
    "dropless": _moe(),
    "capacity_shared": _moe(capacity_factor=1.0, num_shared_experts=1),
    "capacity_position_bias_router": _moe(
        capacity_factor=1.0, drop_policy="position", bias_update_rate=0.01, score_func="sigmoid"
    ),
}


@pytest.mark.parametrize("moe", MOE_CASES.values(), ids=MOE_CASES.keys())
def test_moe_model_compiles_fullgraph_and_matches_eager(moe):
    eager = _model(moe)
    if moe.bias_update_rate > 0:  # a non-zero bias, so that the selection really depends on it
        for layer in eager.moe_layers:
            layer.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    src, out_e, out_c = _compiled_vs_eager(eager)
    if moe.capacity_factor is not None:  # the case really drops, so capacity is exercised
        assert out_e.moe_stats[0].dropped_assignments > 0
    _assert_same(eager, src, out_e, out_c)


def _explain(model: torch.nn.Module, batch: dict[str, Tensor]):
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(**batch)


def test_graph_break_counts():
    """Dense: 0. MoE with scalar capture: 0. MoE without it: the one documented break, at
    ``expert_split_sizes``; as it sits inside the model's loop over layers, Dynamo compiles each module
    separately (11 graphs for this 2-layer model in torch 2.11; a torch upgrade may change the count)."""
    batch = _batch()
    ex = _explain(_model(), batch)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0)
    moe_model = _model(_moe(capacity_factor=1.0, num_shared_experts=1, bias_update_rate=0.01))
    with _capture_scalars():
        ex = _explain(moe_model, batch)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0)
    with _capture_scalars(False):
        ex = _explain(moe_model, batch)
    assert {frame.name for b in ex.break_reasons for frame in b.user_stack[-1:]} == {"expert_split_sizes"}
    assert (ex.graph_count, ex.graph_break_count) == (11, 10)


ROUTER_CASES = {
    "expert_choice": _moe(router="expert_choice", capacity_factor=1.0),
    "noisy_topk_jitter": _moe(router="noisy_topk", router_noise=1.0, router_jitter=0.1),
    "switch_eval_capacity": _moe(router="switch", top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0),
    "modality_entropy": _moe(modality_experts=[1, 1], local_entropy_coef=0.1, global_entropy_coef=0.1),
    "deepseek_groups": _moe(
        num_experts=8, score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, selection_bias=True
    ),
}


@pytest.mark.parametrize("moe", ROUTER_CASES.values(), ids=ROUTER_CASES.keys())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_other_routers_trace_into_one_graph(moe, training):
    batch = {**_batch(), "group_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]] * B)}  # per-group telemetry too
    with _capture_scalars():
        ex = _explain(_model(moe).train(training), batch)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")
def test_grouped_mm_bf16_compiles_fullgraph_without_scalar_capture():
    """The GPU fast path (grouped_mm in bf16) has static shapes and no host sync: one graph as is."""
    eager = _model(_moe(capacity_factor=1.0), dispatch="grouped_mm").to(torch.bfloat16)
    assert eager.moe_layers[0].resolve_dispatch(torch.zeros(1, 32, dtype=torch.bfloat16)) == "grouped_mm"
    src, out_e, out_c = _compiled_vs_eager(eager, capture=False)
    torch.testing.assert_close(out_c.logits, out_e.logits)
    torch.testing.assert_close(out_c.aux_loss, out_e.aux_loss)
    for (n, p_c), p_e in zip(src.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_fp32_grouped_mm_falls_back_to_sorted_under_compile():
    """grouped_mm's fake kernel rejects fp32, so a compiled fp32 model takes the sorted path (eager keeps
    grouped_mm where it runs): same result up to summation order."""
    eager = _model(_moe(), dispatch="grouped_mm")
    src, out_e, out_c = _compiled_vs_eager(eager)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-6)
    for (n, p_c), p_e in zip(src.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"grad of {n}: {m}")


def test_reference_dispatch_runs_eagerly_inside_a_compiled_model():
    eager = _model(_moe(capacity_factor=1.0), dispatch="reference")
    src = copy.deepcopy(eager)
    compiled = torch.compile(src, backend="aot_eager")
    batch = _batch()
    with _capture_scalars():
        _assert_same(eager, src, _forward_backward(eager, batch), _forward_backward(compiled, batch))


def test_compiled_moe_training_matches_eager():
    """A few AdamW steps with the aux-loss-free bias update: same losses, weights and router state."""
    moe = _moe(capacity_factor=1.25, num_shared_experts=1, bias_update_rate=0.05)
    # Eager 'sorted' is the fused autograd node, compiled 'sorted' traces as 'sorted_autograd': same math,
    # other fp32 rounding, which three AdamW steps amplify past 1e-6. Compare the traced path with itself.
    eager = _model(moe, dispatch="sorted_autograd")
    src = copy.deepcopy(eager)
    compiled = torch.compile(src, backend="aot_eager", fullgraph=True)
    losses: dict[str, list[Tensor]] = {"eager": [], "compiled": []}
    for name, model, params in (("eager", eager, eager), ("compiled", compiled, src)):
        opt = torch.optim.AdamW(params.parameters(), lr=1e-2)
        for step in range(3):
            with _capture_scalars():
                out = _forward_backward(model, _batch(seed=step))
            opt.step()
            update_router_biases(params)
            losses[name].append(torch.stack([out.loss, out.aux_loss]).detach())
    torch.testing.assert_close(torch.stack(losses["compiled"]), torch.stack(losses["eager"]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(losses["eager"][0], losses["eager"][-1])  # the steps really trained
    layer_e, layer_c = eager.moe_layers[0], src.moe_layers[0]
    assert isinstance(layer_c, MoELayer) and layer_e.router.expert_bias.abs().sum() > 0
    torch.testing.assert_close(layer_c.router.expert_bias, layer_e.router.expert_bias)
    for (n, p_c), p_e in zip(src.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------- Trainer(TrainConfig(compile=True))
@pytest.mark.parametrize(
    "field, value, allowed",
    [("compile", "yes", "true or false"), ("compile_backend", "tensorrt", "inductor, aot_eager, eager, cudagraphs")],
)
def test_train_config_validates_compile_fields(field, value, allowed):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}=.*{allowed}"):
        TrainConfig(**{field: value})


def test_trainer_compile_matches_eager(tmp_path, fresh_accelerate):
    """Same metrics step for step; evaluation and checkpoints use the eager module (plain parameter names)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (900,), generator=gen)
    train, val = PackedSequences(tokens[:800], T), PackedSequences(tokens[800:], T)
    moe = _moe(capacity_factor=1.25, num_shared_experts=1, bias_update_rate=0.01)
    runs = {}
    for name, compile_on in (("eager", False), ("compiled", True)):
        fresh_accelerate()
        cfg = TrainConfig(
            steps=4, batch_size=4, micro_batch_size=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
            log_with="none", progress_bar=False, mfu_probe=False, cpu=True, compile=compile_on,
            compile_backend="aot_eager",
        )  # fmt: skip
        # MoEExtension: bias updates after each step, and its telemetry forward hooks trace into the graph.
        trainer = Trainer(_model(moe), cfg, tmp_path / name, train, val, extensions=[MoEExtension()])
        counters.clear()
        trainer.train()
        trainer.close()
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        keys = ("step", "train_loss", "aux_loss", "val_loss", "tokens_seen", "moe/router_entropy")
        runs[name] = [{k: e[k] for k in keys if k in e} for e in events]
        assert (trainer._compiled is not None) == compile_on
        assert counters["stats"]["unique_graphs"] == int(compile_on)  # one graph, reused by every step
        assert not counters["graph_break"]
    assert [e["step"] for e in runs["compiled"]] == [e["step"] for e in runs["eager"]]
    for e_c, e_e in zip(runs["compiled"], runs["eager"]):
        assert e_c.keys() == e_e.keys()
        for k in e_e:
            assert e_c[k] == pytest.approx(e_e[k], rel=1e-5, abs=1e-6), (e_e["step"], k)
    assert "moe/router_entropy" in runs["compiled"][0]  # telemetry recorded from inside the compiled graph
    final = Transformer.from_pretrained(tmp_path / "compiled" / "final")  # strict: no _orig_mod. prefixes
    assert final.cfg.moe == moe
