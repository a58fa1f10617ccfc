"""Every supported HF family through the CLI, both ways: logits equal transformers' (float32, 1e-4 of the
logit scale), the round trip is bit-exact with dtypes kept, KV-cache generation equals full recompute; the
families moekit cannot represent yet are refused, naming the missing feature."""

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import (  # noqa: E402
    MAIN,
    SHAPE,
    V,
    assert_converts_both_ways,
    assert_export_refused,
    assert_same_tensors,
    max_rel_logit_diff,
    measure,
    print_table,
    randomize,
)

from moekit.core.hf import config_from_hf, load_hf_state_dict  # noqa: E402
from moekit.core.model import Transformer  # noqa: E402

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # at head dim 8: one kept, one blended, two slowed frequencies
}
YARN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(intermediate_size=40)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(intermediate_size=40, sliding_window=None),
    ),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(intermediate_size=40)),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    ),
    "mistral_window": (  # window 5 < the test's 12 tokens
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(intermediate_size=40, sliding_window=5),
    ),
    "qwen2_window": (  # every layer slides (max_window_layers=0)
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(intermediate_size=40, use_sliding_window=True, sliding_window=5, max_window_layers=0),
    ),
    "phi3_window": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(intermediate_size=40, sliding_window=6),
    ),
    "mixtral_window": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    ),
    "qwen3_yarn": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(intermediate_size=40, rope_parameters=YARN),
    ),
    "llama_yarn_mscale": (  # DeepSeek-style yarn: no factor (context ratio 64/16), mscale / mscale_all_dim
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(intermediate_size=40, rope_parameters={**YARN, "factor": None, "mscale": 1.0, "mscale_all_dim": 0.5}),
    ),
    "llama_bias": (  # attention_bias=True: q/k/v and o biases
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(intermediate_size=40, attention_bias=True),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(intermediate_size=40)),
    # head_dim 12 != hidden_size / heads = 8
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(intermediate_size=40, head_dim=12)),
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(intermediate_size=40, rope_parameters=LLAMA3),
    ),
    "qwen3_moe": (  # layer 0 dense (mlp_only_layers), layer 1 MoE; renormalised top-2
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=8,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            head_dim=12,
        ),
    ),  # fmt: skip
    "olmoe": (  # every layer MoE, raw (not renormalised) top-2 probabilities, clip_qkv that clips
        transformers.OlmoeConfig,
        transformers.OlmoeForCausalLM,
        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, clip_qkv=0.8),
    ),
    "qwen2_moe": (  # decoder_sparse_step=2: layer 0 dense, layer 1 MoE with the gated shared expert
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(
            intermediate_size=40,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=12,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
        ),
    ),  # fmt: skip
}


def hf_model(family: str, tied: bool = False, **changes) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    model = model_cls(config_cls(**{**SHAPE, **extra, **changes}, tie_word_embeddings=tied))
    randomize(model, seed=len(family))
    return model.eval()


TIED = ("phi3", "qwen2", "qwen3_moe")  # tie_word_embeddings, as the small Qwen checkpoints do
# What each converted config must hold, so that a family whose feature was silently dropped cannot pass.
EXPECTED = {
    "llama_bias": lambda c: c.qkv_bias and c.out_bias,
    "mistral_window": lambda c: c.sliding_window == 5,
    "qwen2_window": lambda c: c.sliding_window == 5 and c.qkv_bias,
    "mixtral_window": lambda c: c.sliding_window == 4,
    "phi3_window": lambda c: c.sliding_window == 6,
    "qwen3_yarn": lambda c: c.rope_scaling.rope_type == "yarn" and c.rope_scaling.attention_scaling > 1,
    "llama_yarn_mscale": lambda c: c.rope_scaling.factor == 4.0 and c.rope_scaling.mscale_all_dim == 0.5,
    "qwen2": lambda c: c.qkv_bias and not c.out_bias and c.tie_embeddings,
    "qwen3": lambda c: c.qk_norm == "head" and c.head_dim == 12 and not c.qkv_bias,
    "llama3": lambda c: c.rope_scaling.factor == 8.0 and c.rope_scaling.original_max_seq_len == 32,
    "qwen3_moe": lambda c: c.ffn_kinds() == ["dense", "moe"] and c.moe.renormalize and c.head_dim == 12,
    "olmoe": lambda c: c.qk_norm == "full" and c.clip_qkv == 0.8 and not c.moe.renormalize,
    "qwen2_moe": lambda c: c.ffn_kinds() == ["dense", "moe"] and c.moe.shared_gate and c.moe.d_shared == 12,
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_converts_both_ways_through_the_cli(tmp_path, family):
    # Lossless both ways: the very same tensors, names and dtypes (Phi-3's fused qkv/gate_up re-fused exactly).
    ours = assert_converts_both_ways(hf_model(family, tied=family in TIED), tmp_path)
    assert EXPECTED.get(family, lambda c: True)(ours.cfg)


def test_phi3_fused_projections_are_split_in_order(tmp_path):
    """Phi-3's qkv_proj rows are q, then k, then v; gate_up_proj rows are gate, then up."""
    hf = hf_model("phi3")
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    ours = Transformer.from_pretrained(tmp_path / "m")
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight
    attn = ours.layers[1].attn
    assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert attn.k_proj.weight.shape == (2 * 8, 32)
    gate_up = hf.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(gate_up[:40], ours.layers[0].ffn.w_gate.weight)
    assert torch.equal(gate_up[40:], ours.layers[0].ffn.w_up.weight)


def test_family_can_be_chosen_on_the_way_out(tmp_path):
    """A Llama checkpoint written as Mistral and Phi-3 (fused) computes the same function in transformers."""
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    for family, cls in (("phi3", transformers.Phi3ForCausalLM), ("mistral", transformers.MistralForCausalLM)):
        MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / family), "--family", family])
        other = cls.from_pretrained(tmp_path / family).eval()
        assert max_rel_logit_diff(other, hf) < 1e-4
    with pytest.raises(SystemExit) as exc:  # a dense model is no Mixtral
        MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--family", "mixtral"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_stays_bf16_unless_asked(tmp_path, family):
    hf = hf_model(family).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    assert {t.dtype for t in load_hf_state_dict(tmp_path / "m").values()} == {torch.bfloat16}
    MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_tensors(load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf"))

    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m32"), "--dtype", "float32"])
    m32 = load_hf_state_dict(tmp_path / "m32")
    assert {t.dtype for t in m32.values()} == {torch.float32}
    assert torch.equal(m32["embed.weight"], hf.model.embed_tokens.weight.float())


# ---- refusals ------------------------------------------------------------------------------------
def _config(cls_name: str, **kw) -> dict:
    return getattr(transformers, cls_name)(**kw).to_dict()


REFUSED = [
    ("GptOssConfig", "GPT-OSS needs attention sinks"),
]


@pytest.mark.parametrize("cls_name,message", REFUSED)
def test_families_needing_missing_features_are_refused_by_name(cls_name, message):
    d = _config(cls_name)
    with pytest.raises(ValueError, match=r"field model_type='\w+'.*" + message.replace("(", r"\(").replace(")", r"\)")):
        config_from_hf({k: v for k, v in d.items() if k != "architectures"})
    d["architectures"] = [cls_name.replace("Config", "ForCausalLM")]
    with pytest.raises(ValueError, match="field architectures=.*not supported yet"):
        config_from_hf(d)


def test_refusal_through_the_cli_names_the_feature_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    d = transformers.GptOssConfig(**{**SHAPE, "intermediate_size": 40}).to_dict()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**d, "architectures": ["GptOssForCausalLM"]}))
    with pytest.raises(SystemExit) as exc:
        MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "GPT-OSS needs attention sinks" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary folder


@pytest.mark.parametrize(
    "family,changes,field,words",
    [
        (
            "qwen2",
            dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
            "layer_types",
            "sliding-window attention on some layers only is not supported yet",
        ),
        ("olmoe", dict(head_dim=16), "head_dim", "OLMoE needs head_dim = hidden_size/num_attention_heads"),
        ("mistral", dict(sliding_window=0), "sliding_window", "must be a positive integer or null"),
        ("mistral", dict(attention_bias=True), "attention_bias", "Mistral has no such projection biases"),
        (
            "llama",
            dict(rope_parameters={**LLAMA3, "rope_type": "linear"}),
            "rope_parameters.rope_type",
            "'linear' RoPE",
        ),
        ("llama", dict(rope_parameters={**LLAMA3, "factor": None}), "rope_parameters", r"needs \['factor'\]"),
        (
            "phi3",
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 4,
                    "long_factor": [2.0] * 4,
                },
                original_max_position_embeddings=32,
            ),
            "rope_parameters.rope_type",
            "'longrope' RoPE scaling is not supported yet",
        ),  # fmt: skip
        ("phi3", dict(partial_rotary_factor=0.5), "rope_parameters.partial_rotary_factor", "partial RoPE"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_field(family, changes, field, words):
    config_cls, _, extra = FAMILIES[family]
    d = config_cls(**{**SHAPE, **extra, **changes}).to_dict()
    with pytest.raises(ValueError, match=rf"field {field}=.*{words}"):
        config_from_hf(d)


def test_sliding_window_defaults_and_windows_that_never_bind():
    """A Mistral config.json without sliding_window gets the class default (4096); a window >=
    max_position_embeddings has no effect (None); Qwen's window needs use_sliding_window, and
    max_window_layers >= the layer count leaves every layer full (None)."""
    d = transformers.MistralConfig(**SHAPE, intermediate_size=40).to_dict()
    d.pop("sliding_window")
    d["max_position_embeddings"] = 8192
    assert config_from_hf(d).sliding_window == 4096
    d["sliding_window"] = 8192
    assert config_from_hf(d).sliding_window is None and config_from_hf(d).max_seq_len == 8192
    qwen = dict(SHAPE, intermediate_size=40, sliding_window=5)
    assert config_from_hf(transformers.Qwen2Config(**qwen).to_dict()).sliding_window is None
    on = transformers.Qwen2Config(**qwen, use_sliding_window=True, max_window_layers=2).to_dict()
    assert config_from_hf(on).sliding_window is None  # layers 2.. slide: none of the two
    on.pop("layer_types")  # older config.json: max_window_layers decides
    assert config_from_hf(on).sliding_window is None
    on["max_window_layers"] = 0
    assert config_from_hf(on).sliding_window == 5


def test_help_lists_the_families_and_directions(capsys):
    with pytest.raises(SystemExit) as exc:
        MAIN(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    convertible = ("Llama", "Mistral", "Phi3", "Mixtral", "Qwen2", "Qwen3", "Qwen3Moe", "Olmoe", "Qwen2Moe",
                   "DeepseekV2", "DeepseekV3", "Granite", "GraniteMoe", "GraniteMoeShared")  # fmt: skip
    for name in convertible:
        assert re.search(rf"{name}ForCausalLM +--from-hf and --to-hf", text), name
    for title in ("GPT-OSS",):
        assert re.search(rf"{title} .*refused: needs", text), title


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_converted_dense_model_upcycles_to_an_moe_equal_at_init(tmp_path, family):
    """HF dense -> moekit -> upcycled MoE (every expert a copy of the dense FFN, renormalised top-2): at
    initialisation the MoE computes the dense model (biases, QK-norm and head_dim kept); a Llama's goes on to
    HF Mixtral and computes the same in transformers."""
    from moekit.moe import upcycle
    from moekit.moe.config import MoEConfig

    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    dense = Transformer.from_pretrained(tmp_path / "m").eval()
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=40, load_balance_coef=0.01, z_loss_coef=0.0)
    sparse = upcycle(dense, moe, seed=0).eval()
    assert max_rel_logit_diff(sparse, hf) < 1e-4
    if family != "llama":
        return
    sparse.save_pretrained(tmp_path / "up")
    MAIN(["--to-hf", str(tmp_path / "up"), "--out", str(tmp_path / "mixtral")])
    mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert max_rel_logit_diff(mixtral, hf) < 1e-4


def test_a_shape_mismatch_is_refused_before_reading_tensor_data(tmp_path, monkeypatch):
    """config.json and tensors disagree (intermediate_size edited): the header dry run names the tensor, and no
    shard is read."""
    import moekit.core.hf as hf_mod

    hf_model("phi3").save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "intermediate_size": 48}))
    monkeypatch.setattr(hf_mod, "iter_shards", lambda *a, **k: pytest.fail("tensor data was read"))
    with pytest.raises(
        ValueError, match=r"tensor model.layers.0.mlp.gate_up_proj.weight has 80 rows; the config implies 96"
    ):
        hf_mod.hf_to_moekit(tmp_path / "hf", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_moekit_field_this_converter_does_not_know_is_refused_on_export():
    """A ModelConfig field added to moekit later (here a made-up attention_sinks) exports only at its default, so a new
    attention feature can never be written to HF silently dropped."""
    from dataclasses import dataclass

    from moekit.core.config import ModelConfig
    from moekit.core.hf import config_to_hf

    @dataclass
    class Future(ModelConfig):
        attention_sinks: bool = False

    shape = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=40)
    assert config_to_hf(Future(**shape))["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="ModelConfig.attention_sinks=True has no HF equivalent"):
        config_to_hf(Future(**shape, attention_sinks=True))


# ---- the MoE families: layouts, routing and layer selection ----------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_in_memory_fused_expert_layout_converts(family):
    """transformers 5's in-memory state dict stacks the experts (gate_up_proj [E, 2F, D]); it converts too."""
    from moekit.core.hf import state_dict_from_hf

    hf = hf_model(family)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    cfg = config_from_hf(hf.config.to_dict())
    ours = Transformer(cfg)
    ours.load_state_dict(state_dict_from_hf(dict(hf.state_dict()), cfg, family), strict=not cfg.tie_embeddings)
    assert max_rel_logit_diff(ours.eval(), hf) < 1e-4


def test_decoder_sparse_step_and_mlp_only_layers_pick_the_layers_transformers_picks():
    from moekit.core.hf import config_to_hf

    kw = dict(
        SHAPE, num_hidden_layers=6, intermediate_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2
    )
    for changes in (dict(decoder_sparse_step=2), dict(decoder_sparse_step=2, mlp_only_layers=[3]), dict()):
        hf_cfg = transformers.Qwen3MoeConfig(**kw, **changes)
        hf = transformers.Qwen3MoeForCausalLM(hf_cfg)
        theirs = ["moe" if "SparseMoe" in type(layer.mlp).__name__ else "dense" for layer in hf.model.layers]
        cfg = config_from_hf(hf_cfg.to_dict())
        assert cfg.ffn_kinds() == theirs, changes
        back = transformers.Qwen3MoeConfig(**{k: v for k, v in config_to_hf(cfg, family="qwen3_moe").items()})
        again = ["moe" if "SparseMoe" in type(layer.mlp).__name__ else "dense"
                 for layer in transformers.Qwen3MoeForCausalLM(back).model.layers]  # fmt: skip
        assert again == theirs, changes
    assert config_from_hf(transformers.Qwen3MoeConfig(**kw, decoder_sparse_step=2).to_dict()).moe.every_n_layers == 2


@pytest.mark.parametrize("norm,top_k", [(True, 1), (True, 2), (False, 1), (False, 2)])
def test_norm_topk_prob_maps_onto_moekit_routing_and_back(norm, top_k):
    """HF renormalises the selected probabilities iff norm_topk_prob (1.0 at top-1 = top-k-then-softmax)."""
    from moekit.core.hf import config_to_hf

    d = transformers.OlmoeConfig(**SHAPE, intermediate_size=16, num_experts=4, num_experts_per_tok=top_k,
                                 norm_topk_prob=norm).to_dict()  # fmt: skip
    moe = config_from_hf(d).moe
    renormalised = moe.topk_order == "topk_then_softmax" or (moe.renormalize and moe.top_k > 1)
    assert renormalised == norm
    assert config_to_hf(config_from_hf(d), family="olmoe")["norm_topk_prob"] == norm


@pytest.mark.parametrize(
    "source,target,message",
    [
        ("qwen3", "llama", r"ModelConfig.qk_norm='head' has no LlamaForCausalLM equivalent: Llama needs 'none'"),
        ("llama", "qwen2", r"ModelConfig.qkv_bias=False has no Qwen2ForCausalLM equivalent: Qwen2 always has"),
        ("llama", "qwen3", r"ModelConfig.qk_norm='none' has no Qwen3ForCausalLM equivalent"),
        ("qwen2", "mistral", r"ModelConfig.qkv_bias=True has no MistralForCausalLM equivalent"),
        ("llama3", "phi3", r"ModelConfig.rope_scaling=.* has no Phi3ForCausalLM equivalent"),
        ("qwen3", "mistral", r"ModelConfig.qk_norm='head'"),
        ("olmoe", "mixtral", r"ModelConfig.qk_norm='full' has no MixtralForCausalLM equivalent"),
        ("qwen2_moe", "qwen3_moe", r"ModelConfig.out_bias=False has no Qwen3MoeForCausalLM equivalent: .*qkv_bias"),
        ("mixtral", "qwen2_moe", r"ModelConfig.moe.shared_gate=False has no Qwen2MoeForCausalLM equivalent"),
    ],
)
def test_writing_another_family_refuses_what_it_cannot_hold(tmp_path, capsys, source, target, message):
    assert_export_refused(hf_model(source), tmp_path, target, message, lambda: capsys.readouterr().err)


def test_qwen2_moe_without_a_gated_shared_expert_is_refused():
    from moekit.core.config import ModelConfig
    from moekit.core.hf import config_to_hf
    from moekit.moe.config import MoEConfig

    moe = MoEConfig(num_experts=4, top_k=2, d_expert=8, num_shared_experts=1, d_shared=8)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=40, qkv_bias=True, moe=moe)
    with pytest.raises(ValueError, match=r"moe.shared_gate=False has no Qwen2MoeForCausalLM equivalent"):
        config_to_hf(cfg, family="qwen2_moe")


def measure_families(tmp: Path) -> list[tuple[str, str, float, float, bool]]:
    """(family key, HF class, max rel logit diff HF -> moekit, moekit -> HF, round trip bit-exact) per family,
    through the CLI as in :func:`test_family_converts_both_ways_through_the_cli`."""
    return [(family, *measure(hf_model(family, tied=family in TIED), tmp / family)) for family in sorted(FAMILIES)]


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "phi3", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmoe", "qwen2_moe"]
)
def test_a_config_json_without_num_key_value_heads_gets_the_class_default(family):
    """transformers' Qwen classes default num_key_value_heads to fixed numbers (32, 32, 4, 16), not to
    num_attention_heads as Llama's does; 64 heads fit each of them and differ from each, so the mapping must
    follow the class."""
    config_cls, _, extra = FAMILIES[family]
    kwargs = {**SHAPE, **extra, "num_attention_heads": 64, "hidden_size": 128}
    kwargs.pop("num_key_value_heads")
    kwargs.pop("head_dim", None)
    d = config_cls(**kwargs).to_dict()
    expected = d.pop("num_key_value_heads")
    assert config_from_hf(d).n_kv_heads == expected


def test_an_absent_num_key_value_heads_that_does_not_fit_is_refused_naming_the_hf_field():
    d = transformers.Qwen2Config(**{**SHAPE, "num_attention_heads": 14, "hidden_size": 56}).to_dict()
    d.pop("num_key_value_heads")
    with pytest.raises(ValueError, match=r"num_key_value_heads=32 .*num_attention_heads=14 \(absent from config.json"):
        config_from_hf(d)
    with pytest.raises(ValueError, match=r"num_key_value_heads=4 .*must divide num_attention_heads=14$"):
        config_from_hf({**d, "num_key_value_heads": 4})


if __name__ == "__main__":  # prints the README's table: python tests/test_hf_families.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print_table(measure_families(Path(tmp)))
