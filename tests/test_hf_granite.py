"""Granite, Granite-MoE and Granite-MoE-Shared through the CLI, both ways: tiny random transformers models with
non-default embedding/residual/attention/logit multipliers (each one needed: dropping it moves the logits),
Granite-MoE's top-k-then-softmax router and stacked input_linear/output_linear experts, the ungated shared
expert. Logits equal transformers' (float32, 1e-4 of the logit scale), the round trip is bit-exact with dtypes
kept, KV-cache generation equals full recompute; what the other side cannot hold is refused by name."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import (  # noqa: E402
    MAIN,
    SHAPE,
    assert_converts_both_ways,
    assert_export_refused,
    assert_same_tensors,
    max_rel_logit_diff,
    measure,
    print_table,
    randomize,
)

from moekit.core.config import ModelConfig  # noqa: E402
from moekit.core.hf import config_from_hf, config_to_hf, load_hf_state_dict, state_dict_from_hf  # noqa: E402
from moekit.core.model import Transformer  # noqa: E402
from moekit.moe.config import MoEConfig  # noqa: E402

# Granite-3-like multipliers (embedding 12, residual 0.22; logits / 2.5, not 8, keeps the tiny logits O(1));
# attention 0.2, not the 1/sqrt(8) a forgotten attention_multiplier would give.
MULT = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.2, logits_scaling=2.5)
MOE = dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
CASES = {
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                dict(intermediate_size=40, attention_bias=True, tie_word_embeddings=True)),
    "granitemoe": (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM,
                   dict(MOE, num_experts_per_tok=3)),
    "granitemoeshared": (transformers.GraniteMoeSharedConfig, transformers.GraniteMoeSharedForCausalLM,
                         dict(MOE, shared_intermediate_size=12, attention_bias=True)),
    "granitemoeshared_none": (transformers.GraniteMoeSharedConfig, transformers.GraniteMoeSharedForCausalLM,
                              dict(MOE, shared_intermediate_size=0)),
}  # fmt: skip
EXPECTED = {  # what each converted config must hold, so that a silently dropped feature cannot pass
    "granite": lambda c: c.qkv_bias and c.out_bias and c.tie_embeddings and c.moe is None,
    "granitemoe": lambda c: c.moe.top_k == 3 and c.moe.topk_order == "topk_then_softmax" and not c.qkv_bias,
    "granitemoeshared": lambda c: (c.moe.num_shared_experts, c.moe.d_shared, c.moe.shared_gate) == (1, 12, False),
    "granitemoeshared_none": lambda c: c.moe.num_shared_experts == 0,
}
SCALES = dict(embed_scale=12.0, residual_scale=0.22, attn_scale=0.2, logit_divisor=2.5)


def hf_model(case: str, **changes) -> torch.nn.Module:
    config_cls, model_cls, extra = CASES[case]
    model = model_cls(config_cls(**{**SHAPE, **MULT, **extra, **changes}))
    randomize(model, seed=len(case))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_granite_family_converts_both_ways_through_the_cli(tmp_path, case):
    ours = assert_converts_both_ways(hf_model(case), tmp_path)
    assert EXPECTED[case](ours.cfg)
    assert {k: getattr(ours.cfg, k) for k in SCALES} == SCALES
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: written[k] for k in MULT} == MULT


@pytest.mark.parametrize("case", ["granite", "granitemoeshared"])
def test_every_multiplier_is_needed(case):
    """With any one of the four scalings left at moekit's default the logits leave transformers' by far: the
    agreement above is not a coincidence of small multipliers."""
    hf = hf_model(case)
    cfg = config_from_hf(hf.config.to_dict())
    sd = state_dict_from_hf(dict(hf.state_dict()), cfg, hf.config.model_type)
    ours = Transformer(cfg)
    ours.load_state_dict(sd, strict=not cfg.tie_embeddings)
    assert max_rel_logit_diff(ours.eval(), hf) < 1e-4
    for name, default in dict(embed_scale=1.0, residual_scale=1.0, attn_scale=None, logit_divisor=1.0).items():
        off = Transformer(dataclasses.replace(cfg, **{name: default}))
        off.load_state_dict(ours.state_dict())
        assert max_rel_logit_diff(off.eval(), hf) > 1e-2, name


@pytest.mark.parametrize("case", ["granitemoe", "granitemoeshared"])
def test_in_memory_and_on_disk_expert_layouts_convert(tmp_path, case):
    """On disk the experts are block_sparse_moe.input_linear [E, 2F, D] (rows gate, then up) and output_linear
    [E, D, F], the router router.layer; transformers 5 holds them as experts.gate_up_proj / down_proj."""
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    disk = load_hf_state_dict(tmp_path / "hf")
    assert disk["model.layers.0.block_sparse_moe.input_linear.weight"].shape == (4, 16, 32)
    assert "model.layers.0.block_sparse_moe.router.layer.weight" in disk
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    ours = Transformer.from_pretrained(tmp_path / "m")
    gate_up = hf.model.layers[1].block_sparse_moe.experts.gate_up_proj  # [E, 2F, D]
    assert torch.equal(gate_up[2, :8], ours.layers[1].ffn.experts.w_gate[2].T)
    assert torch.equal(gate_up[2, 8:], ours.layers[1].ffn.experts.w_up[2].T)
    cfg = config_from_hf(hf.config.to_dict())
    mem = Transformer(cfg)
    mem.load_state_dict(state_dict_from_hf(dict(hf.state_dict()), cfg, hf.config.model_type))
    assert max_rel_logit_diff(mem.eval(), hf) < 1e-4


@pytest.mark.slow
def test_bf16_stays_bf16(tmp_path):
    hf = hf_model("granitemoeshared").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    assert {t.dtype for t in load_hf_state_dict(tmp_path / "m").values()} == {torch.bfloat16}
    MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_tensors(load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf"))


@pytest.mark.parametrize(
    "source,family,cls",
    [
        (transformers.LlamaForCausalLM, "granite", transformers.GraniteForCausalLM),
        (transformers.MixtralForCausalLM, "granitemoe", transformers.GraniteMoeForCausalLM),
    ],
)
def test_other_families_write_as_granite(tmp_path, source, family, cls):
    """A Llama (Mixtral) written as Granite (Granite-MoE) computes the same in transformers: multipliers 1,
    attention_multiplier = 1/sqrt(head dim), Mixtral's renormalised top-2 = Granite's softmax over the top-2."""
    config_cls = getattr(transformers, source.__name__.replace("ForCausalLM", "Config"))
    extra = MOE if family == "granitemoe" else dict(intermediate_size=40)
    hf = source(config_cls(**SHAPE, **extra))
    randomize(hf, seed=5)
    hf.eval().save_pretrained(tmp_path / "hf")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "g"), "--family", family])
    written = json.loads((tmp_path / "g" / "config.json").read_text())
    assert written["attention_multiplier"] == 8**-0.5 and written["embedding_multiplier"] == 1.0
    assert max_rel_logit_diff(cls.from_pretrained(tmp_path / "g").eval(), hf) < 1e-4


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case,family,message",
    [
        ("granite", "llama", r"ModelConfig.embed_scale=12.0 has no LlamaForCausalLM equivalent: only the default 1.0"),
        ("granitemoe", "mixtral", r"ModelConfig.embed_scale=12.0 has no MixtralForCausalLM equivalent"),
        ("granitemoeshared", "granitemoe", r"ModelConfig.moe.num_shared_experts=1 has no GraniteMoeForCausalLM"),
    ],
)
def test_writing_what_the_family_cannot_hold_is_refused(tmp_path, capsys, case, family, message):
    assert_export_refused(hf_model(case), tmp_path, family, message, lambda: capsys.readouterr().err)


def test_a_gated_shared_expert_is_no_granite_shared_expert():
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=8, num_shared_experts=1, d_shared=12, shared_gate=True)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=8, moe=moe)
    assert config_to_hf(dataclasses.replace(cfg, moe=dataclasses.replace(moe, shared_gate=False)),
                        family="granitemoeshared")["shared_intermediate_size"] == 12  # fmt: skip
    with pytest.raises(ValueError, match=r"moe.shared_gate=True has no GraniteMoeSharedForCausalLM equivalent"):
        config_to_hf(cfg, family="granitemoeshared")


@pytest.mark.parametrize(
    "case,changes,field,words",
    [
        ("granite", dict(embedding_multiplier=0.0), "embedding_multiplier", "must be a finite number > 0"),
        ("granitemoe", dict(logits_scaling=-8.0), "logits_scaling", "must be a finite number > 0"),
        ("granite", dict(mlp_bias=True), "mlp_bias", "Granite has no such projection biases"),
        ("granitemoeshared", dict(shared_intermediate_size=-1), "shared_intermediate_size", "integer >= 0"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_field(case, changes, field, words):
    config_cls, _, extra = CASES[case]
    d = {**config_cls(**{**SHAPE, **MULT, **extra}).to_dict(), **changes}
    with pytest.raises(ValueError, match=rf"field {field}=.*{words}"):
        config_from_hf(d)


def test_a_config_json_without_the_multipliers_gets_transformers_defaults():
    """transformers' class default is 1.0 for all four, attention's too (not 1/sqrt(head dim))."""
    d = transformers.GraniteConfig(**SHAPE, intermediate_size=40).to_dict()
    for name in MULT:
        d.pop(name)
    cfg = config_from_hf(d)
    assert (cfg.embed_scale, cfg.residual_scale, cfg.attn_scale, cfg.logit_divisor) == (1.0, 1.0, 1.0, 1.0)


def test_help_lists_the_granite_families(capsys):
    with pytest.raises(SystemExit):
        MAIN(["--help"])
    text = capsys.readouterr().out
    for name in ("Granite", "GraniteMoe", "GraniteMoeShared"):
        assert re.search(rf"{name}ForCausalLM +--from-hf and --to-hf", text), name


def measure_cases(tmp: Path) -> list[tuple[str, str, float, float, bool]]:
    return [(case, *measure(hf_model(case), tmp / case)) for case in sorted(CASES)]


if __name__ == "__main__":  # prints the README's Granite rows: python tests/test_hf_granite.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print_table(measure_cases(Path(tmp)))
