"""DeepSeek-V2 and DeepSeek-V3 through the CLI, both ways: tiny random transformers models with multi-head
latent attention, dense first layers, shared experts and DeepSeek's routing (V3: sigmoid, 2+ groups scored by
their top-2 sum, a non-zero score-correction bias, routed_scaling_factor != 1, yarn with mscale_all_dim; V2:
softmax, group-limited greedy by the group max, V2-Lite's plain q projection). Logits equal transformers'
(float32, 1e-4 of the logit scale), the round trip is bit-exact with dtypes kept, KV-cache generation equals
full recompute; what the other side cannot hold is refused by name."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import (  # noqa: E402
    MAIN,
    V,
    assert_converts_both_ways,
    assert_same_tensors,
    max_rel_logit_diff,
    measure,
    print_table,
    randomize,
)
from hf_checks import SHAPE as BASE_SHAPE  # noqa: E402

from moekit.core.generate import generate  # noqa: E402
from moekit.core.hf import config_from_hf, config_to_hf, load_hf_state_dict  # noqa: E402
from moekit.core.model import Transformer  # noqa: E402

# The families' shape (non-default eps), plus MLA's widths; rope_theta travels in rope_parameters. The latent
# norms keep transformers' fixed 1e-6, so mixing them up with rms_norm_eps shows.
SHAPE = {k: v for k, v in BASE_SHAPE.items() if k != "rope_theta"}
SHAPE.update(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=8,
             kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 500.0}
YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.7}  # fmt: skip
V3, V2 = transformers.DeepseekV3ForCausalLM, transformers.DeepseekV2ForCausalLM
CASES = {
    # 8 experts in 4 groups, 2 groups kept, top-3, one dense layer first, yarn (DeepSeek-V3's own RoPE)
    "deepseek_v3": (V3, dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                             routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
                             rope_parameters=YARN)),  # fmt: skip
    # half-split RoPE (rope_interleave=False), 2 groups keep 1, raw (not renormalised) sigmoid weights
    "deepseek_v3_half_split": (V3, dict(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                                        norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=2,
                                        first_k_dense_replace=2, rope_interleave=False, rope_parameters=ROPE)),
    # V2-Lite (no q bottleneck), group-limited greedy: 4 groups of 2, keep 2, top-3
    "deepseek_v2": (V2, dict(q_lora_rank=None, n_routed_experts=8, topk_method="group_limited_greedy", n_group=4,
                             topk_group=2, num_experts_per_tok=3, routed_scaling_factor=6.0, n_shared_experts=2,
                             first_k_dense_replace=1, rope_parameters=ROPE)),
    # V2 with the q bottleneck, greedy top-2 over all experts, every layer MoE, yarn
    "deepseek_v2_greedy": (V2, dict(n_routed_experts=4, topk_method="greedy", num_experts_per_tok=2,
                                    n_shared_experts=1, first_k_dense_replace=0, rope_parameters=YARN)),
}  # fmt: skip
EXPECTED = {  # what each converted config must hold, so that a silently dropped feature cannot pass
    "deepseek_v3": lambda c: c.ffn_kinds() == ["dense", "moe", "moe"] and c.mla.q_lora_rank == 10
    and c.mla.rope_interleave and c.moe.n_group == 4 and c.moe.topk_group == 2 and c.moe.group_score == "top2_sum"
    and c.moe.selection_bias and c.moe.routed_scaling_factor == 2.5 and c.moe.score_func == "sigmoid"
    and c.moe.renormalize and c.rope_scaling.mscale_all_dim == 0.7,
    "deepseek_v3_half_split": lambda c: c.ffn_kinds() == ["dense", "dense", "moe"] and not c.mla.rope_interleave
    and not c.moe.renormalize and c.moe.num_shared_experts == 2,
    "deepseek_v2": lambda c: c.mla.q_lora_rank is None and c.moe.group_score == "max" and c.moe.grouped_routing
    and c.moe.score_func == "softmax" and not c.moe.renormalize and not c.moe.selection_bias,
    "deepseek_v2_greedy": lambda c: c.ffn_kinds() == ["moe"] * 3 and c.moe.n_group == 1,
}  # fmt: skip


def hf_model(case: str, **changes) -> torch.nn.Module:
    cls, extra = CASES[case]
    config_cls = transformers.DeepseekV3Config if cls is V3 else transformers.DeepseekV2Config
    model = cls(config_cls(**{**SHAPE, **extra, **changes}))
    randomize(model, seed=len(case))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # buffers are not parameters: a non-zero correction bias that changes the choice
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(0.3 * torch.randn(bias.shape, generator=g))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_deepseek_converts_both_ways_through_the_cli(tmp_path, case):
    hf = hf_model(case)
    ours = assert_converts_both_ways(hf, tmp_path)
    assert EXPECTED[case](ours.cfg)
    # Greedy decoding through moekit's latent cache gives transformers' tokens.
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(ours, ids, max_new_tokens=8, temperature=0), theirs)


@pytest.mark.parametrize(
    "case,changes",
    [
        ("deepseek_v3", dict(topk_group=None)),  # no group limit
        ("deepseek_v3", dict(selection_bias=False)),  # no correction bias
        ("deepseek_v3", dict(routed_scaling_factor=1.0)),
        ("deepseek_v2", dict(topk_group=None)),
        ("deepseek_v2", dict(group_score="top2_sum")),
    ],
)
def test_the_test_models_exercise_each_routing_feature(tmp_path, case, changes):
    """Switching one routing feature off moves the logits past the tolerance: the models above test it."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    ours = Transformer.from_pretrained(tmp_path / "m")
    cfg = dataclasses.replace(ours.cfg, moe=dataclasses.replace(ours.cfg.moe, **changes))
    other = Transformer(cfg)
    sd = {k: v for k, v in ours.state_dict().items() if k in other.state_dict()}
    other.load_state_dict(sd)
    assert max_rel_logit_diff(other.eval(), hf) > 1e-3


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2"])
def test_v3_multi_token_prediction_layers_are_ignored_as_transformers_does(tmp_path, capsys, case):
    """A DeepSeek-V3 checkpoint carries its MTP module as layer num_hidden_layers; it is not read (V2 has none:
    such a tensor is refused)."""
    from safetensors.torch import load_file, save_file

    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "model.layers.3.eh_proj.weight": torch.ones(32, 64)}, path, metadata={"format": "pt"})
    if case == "deepseek_v2":
        with pytest.raises(SystemExit):
            MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
        assert re.search(r"tensors moekit cannot represent.*model.layers.3.eh_proj.weight", capsys.readouterr().err)
        return
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    assert max_rel_logit_diff(Transformer.from_pretrained(tmp_path / "m").eval(), hf) < 1e-4


def test_in_memory_fused_expert_layout_converts():
    from moekit.core.hf import state_dict_from_hf

    hf = hf_model("deepseek_v3")
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    cfg = config_from_hf(hf.config.to_dict())
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(dict(hf.state_dict()), cfg, "deepseek_v3"))
    assert max_rel_logit_diff(ours.eval(), hf) < 1e-4


@pytest.mark.slow
def test_bf16_checkpoint_keeps_every_tensors_dtype(tmp_path):
    """transformers loads DeepSeek-V3 in bf16 with the router and its correction bias kept in float32, and saves
    it so: the conversion keeps each tensor's dtype both ways (bit-exact), and load_hf keeps them in memory."""
    from moekit.core.hf import load_hf

    hf_model("deepseek_v3").save_pretrained(tmp_path / "f32")
    hf = V3.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16).eval()
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    ours = load_hf_state_dict(tmp_path / "m")
    assert ours["layers.1.ffn.router.weight"].dtype == ours["layers.1.ffn.router.expert_bias"].dtype == torch.float32
    assert ours["layers.1.attn.kv_b_proj.weight"].dtype == torch.bfloat16
    MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")])
    assert_same_tensors(load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf"))
    model = load_hf(tmp_path / "hf")
    assert model.layers[1].ffn.router.weight.dtype == torch.float32 and model.embed.weight.dtype == torch.bfloat16
    assert max_rel_logit_diff(model.eval(), hf) < 3e-2  # bf16 rounding, both sides


@pytest.mark.parametrize("case", ["deepseek_v3", "deepseek_v2"])
def test_explicit_dtype_keeps_the_router_in_float32_as_transformers_does(tmp_path, case):
    """--dtype bfloat16 casts every floating tensor except the ones transformers keeps in float32 when it loads
    the model in bf16 (the router weight; V3's correction bias too), both ways: each tensor's dtype equals
    transformers' own bf16 load of the float32 checkpoint."""
    hf_model(case).save_pretrained(tmp_path / "f32")
    CASES[case][0].from_pretrained(tmp_path / "f32", dtype=torch.bfloat16).save_pretrained(tmp_path / "theirs")
    theirs = {n: t.dtype for n, t in load_hf_state_dict(tmp_path / "theirs").items()}
    assert torch.float32 in theirs.values() and torch.bfloat16 in theirs.values()
    MAIN(["--from-hf", str(tmp_path / "f32"), "--out", str(tmp_path / "m"), "--dtype", "bfloat16"])
    ours = load_hf_state_dict(tmp_path / "m")
    assert ours["layers.1.ffn.router.weight"].dtype == torch.float32
    assert ours["layers.1.attn.kv_b_proj.weight"].dtype == torch.bfloat16
    for out, dtype in [("back", []), ("again", ["--dtype", "bfloat16"])]:
        MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / out), *dtype])
        assert {n: t.dtype for n, t in load_hf_state_dict(tmp_path / out).items()} == theirs


def test_a_float_dtype_wider_than_half_casts_the_router_too():
    """transformers keeps the router in float32 for fp16/bf16 loads only: float64 casts it like the rest."""
    from moekit.core.hf import _cast

    w = torch.zeros(2, 2)
    keep = ("ffn.router.weight",)
    assert _cast("layers.1.ffn.router.weight", w, torch.float64, keep).dtype == torch.float64
    assert _cast("layers.1.ffn.router.weight", w, torch.float16, keep).dtype == torch.float32
    assert _cast("layers.1.attn.kv_b_proj.weight", w, torch.float16, keep).dtype == torch.float16


def _hf_config(case: str, **changes) -> dict:
    cls, extra = CASES[case]
    config_cls = transformers.DeepseekV3Config if cls is V3 else transformers.DeepseekV2Config
    return {**config_cls(**{**SHAPE, **extra}).to_dict(), **changes}


@pytest.mark.parametrize(
    "case,changes,field,words",
    [
        ("deepseek_v3", dict(num_key_value_heads=2), "num_key_value_heads", "a key/value per query head"),
        ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func", "'sigmoid' only"),
        ("deepseek_v3", dict(first_k_dense_replace=3), "first_k_dense_replace", "leaves no MoE layer"),
        ("deepseek_v3", dict(num_experts_per_tok=1, n_group=1, topk_group=1), "norm_topk_prob", "every weight 1"),
        ("deepseek_v3", dict(n_group=3), "n_group/topk_group/num_experts_per_tok", "divides num_experts"),
        ("deepseek_v3", dict(n_shared_experts=0), "n_shared_experts", "integer >= 1"),
        ("deepseek_v3", dict(attention_bias=True), "attention_bias", "no such projection biases"),
        ("deepseek_v3", dict(rope_parameters={**ROPE, "rope_type": "llama3"}), "rope_parameters.rope_type", "llama3"),
        ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method", "greedy"),
        ("deepseek_v2", dict(q_lora_rank=0), "q_lora_rank", "integer >= 1"),
    ],
)
def test_unrepresentable_deepseek_settings_are_refused_naming_the_field(case, changes, field, words):
    with pytest.raises(ValueError, match=rf"field {re.escape(field)}=.*{words}"):
        config_from_hf(_hf_config(case, **changes))


@pytest.mark.parametrize(
    "case,target,change,message",
    [
        ("deepseek_v3", "qwen3_moe", None, r"ModelConfig.mla=MLAConfig.* has no HF equivalent here"),
        ("deepseek_v3", "deepseek_v2", None, r"ModelConfig.moe.score_func='sigmoid' has no DeepseekV2ForCausalLM"),
        ("deepseek_v3_half_split", "deepseek_v2", None, r"ModelConfig.mla.rope_interleave=False .*adjacent pairs"),
        ("deepseek_v2", "deepseek_v3", None, r"ModelConfig.moe.score_func='softmax' has no DeepseekV3ForCausalLM"),
        ("deepseek_v2", "deepseek_v2", dict(renormalize=True), r"ModelConfig.moe.renormalize=True .*never renorm"),
        ("deepseek_v3", "deepseek_v3", dict(selection_bias=False), r"ModelConfig.moe.selection_bias=False"),
        ("deepseek_v3", "deepseek_v3", dict(layers=[0, 2]), r"ModelConfig.moe.layers=\[0, 2\] .*dense layers first"),
    ],
)
def test_writing_refuses_what_the_family_cannot_hold(case, target, change, message):
    cfg = config_from_hf(_hf_config(case))
    if change is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change))
    with pytest.raises(ValueError, match=message):
        config_to_hf(cfg, family=target)


def test_a_model_without_latent_attention_is_no_deepseek():
    from moekit.core.config import ModelConfig
    from moekit.moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, top_k=2, d_expert=8, num_shared_experts=1, score_func="sigmoid", selection_bias=True)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=40, moe=moe)
    with pytest.raises(ValueError, match=r"ModelConfig.mla=None has no DeepseekV3ForCausalLM equivalent"):
        config_to_hf(cfg, family="deepseek_v3")


def measure_cases(tmp: Path) -> list[tuple[str, str, float, float, bool]]:
    """The README rows, as :func:`test_deepseek_converts_both_ways_through_the_cli` converts."""
    return [(case, *measure(hf_model(case), tmp / case)) for case in sorted(CASES)]


if __name__ == "__main__":  # prints the README's DeepSeek rows: python tests/test_hf_deepseek.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print_table(measure_cases(Path(tmp)))
