"""HF interop: converted Llama/Mixtral models reproduce transformers' logits both ways; bad configs are refused."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_checks import SHAPE, V, batches, randomize  # noqa: E402

from moekit.core.config import ModelConfig  # noqa: E402
from moekit.core.hf import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    hf_to_moekit,
    load_hf,
    load_hf_state_dict,
    moekit_to_hf,
    save_hf,
    state_dict_from_hf,
)
from moekit.core.model import Transformer  # noqa: E402
from moekit.moe.config import MoEConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def hf_llama(tied: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**SHAPE, intermediate_size=40, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg)
    randomize(model, seed=1)
    return model.eval()


def hf_mixtral(top_k: int, tied: bool) -> torch.nn.Module:
    cfg = transformers.MixtralConfig(
        **SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=top_k, tie_word_embeddings=tied
    )
    model = transformers.MixtralForCausalLM(cfg)
    randomize(model, seed=2)
    return model.eval()


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Logits agree on every real position (padded query rows are unspecified)."""
    with torch.no_grad():
        for batch in batches():
            a, b = ours(**batch).logits, theirs(**batch).logits
            real = batch.get("attention_mask", torch.ones(a.shape[:2])).bool()
            assert a.abs().max() > 1, "logits too small for a 1e-4 check to mean anything"
            torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- Llama ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_llama_round_trip_matches_transformers(tmp_path, tied):
    hf = hf_llama(tied)
    # A small shard size makes save_pretrained write several files plus model.safetensors.index.json.
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()

    cfg = hf_to_moekit(tmp_path / "hf", tmp_path / "moekit")
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_theta, cfg.norm_eps) == (2, tied, 500.0, 1e-2)
    ours = Transformer.from_pretrained(tmp_path / "moekit").eval()
    assert_same_logits(ours, hf)

    moekit_to_hf(tmp_path / "moekit", tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(ours, back)
    # The round trip is lossless: the very same tensors under the very same names.
    assert_same_tensors(load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf"))


def test_rope_convention_needs_no_permutation(tmp_path):
    """Negative control: Meta's interleaved q/k row order (what a permuting converter would produce)
    breaks the match, so the logits test above really checks the RoPE convention."""
    hf = hf_llama(tied=False)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert_same_logits(ours, hf)
    dh = ours.cfg.dh
    perm = torch.arange(dh).view(2, dh // 2).t().reshape(-1)  # [0, Dh/2, 1, Dh/2+1, ...]
    with torch.no_grad():
        for blk in ours.layers:
            for proj in (blk.attn.q_proj, blk.attn.k_proj):
                w = proj.weight.view(-1, dh, proj.weight.shape[1])
                proj.weight.copy_(w[:, perm].reshape_as(proj.weight))
    with pytest.raises(AssertionError):
        assert_same_logits(ours, hf)


@pytest.mark.slow
def test_cli_round_trip(tmp_path):
    hf = hf_llama(tied=True)
    hf.save_pretrained(tmp_path / "hf")
    script = str(REPO / "recipes" / "convert_hf.py")
    # One real process (the script runs standalone), then its main() in-process (no second torch import).
    args = ["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]
    subprocess.run([sys.executable, script, *args], check=True, capture_output=True)
    runpy.run_path(script)["main"](["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "b")])
    assert_same_logits(Transformer.from_pretrained(tmp_path / "m").eval(), hf)
    assert_same_tensors(load_hf_state_dict(tmp_path / "b"), load_hf_state_dict(tmp_path / "hf"))
    hf_cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"] and hf_cfg["model_type"] == "llama"


def test_moekit_model_exports_to_transformers(tmp_path):
    """The other starting point: a native moekit model, saved with save_hf, loads in transformers."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=24, norm_eps=1e-2)
    ours = Transformer(cfg).eval()
    randomize(ours, seed=4)
    save_hf(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert_same_logits(ours, theirs)


# ---- Mixtral -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("top_k,tied", [(2, False), (1, True)])
def test_mixtral_round_trip_matches_transformers(tmp_path, top_k, tied):
    hf = hf_mixtral(top_k, tied)
    hf.save_pretrained(tmp_path / "hf")  # per-expert block_sparse_moe.experts.{e}.w1/w2/w3 on disk

    cfg = hf_to_moekit(tmp_path / "hf", tmp_path / "moekit")
    assert cfg.moe is not None and (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_expert) == (4, top_k, 24)
    assert cfg.rope_theta == 500.0
    ours = Transformer.from_pretrained(tmp_path / "moekit").eval()
    assert_same_logits(ours, hf)

    # transformers 5 holds experts fused in memory (mlp.experts.gate_up_proj); that layout converts too.
    fused = Transformer(cfg).eval()
    fused.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg), strict=not tied)
    assert_same_logits(fused, hf)

    moekit_to_hf(tmp_path / "moekit", tmp_path / "back")
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(ours, back)
    assert_same_tensors(load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf"))
    hf_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["MixtralForCausalLM"]
    assert hf_cfg["router_aux_loss_coef"] == pytest.approx(hf.config.router_aux_loss_coef)


# ---- configs -------------------------------------------------------------------------------------
def llama_dict(**changes) -> dict:
    d = transformers.LlamaConfig(**SHAPE, intermediate_size=40).to_dict()
    d.update(changes)
    return d


def test_legacy_and_default_rope_theta():
    legacy = llama_dict(rope_theta=1234.0, rope_scaling=None)
    legacy.pop("rope_parameters", None)
    assert config_from_hf(legacy).rope_theta == 1234.0
    bare = {k: v for k, v in llama_dict().items() if k not in ("rope_parameters", "rope_theta")}
    assert config_from_hf(bare).rope_theta == 10000.0
    bare.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    assert config_from_hf(bare).rope_theta == 1e6  # Mixtral's own default


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(architectures=["MistralForCausalLM"], model_type="mistral", attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", head_dim=16), "head_dim"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters.rope_type"),
        (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type"),
        (dict(rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 2.0}), "rope_theta"),
        (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
        (dict(architectures=["LlamaForCausalLM"], model_type="mixtral"), "model_type"),
        (
            dict(
                architectures=["Qwen2ForCausalLM"],
                model_type="qwen2",
                use_sliding_window=True,
                sliding_window=16,
                max_window_layers=1,
            ),
            "max_window_layers",
        ),  # fmt: skip
        (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    ],
)
def test_unrepresentable_hf_config_is_refused(changes, field):
    with pytest.raises(ValueError, match=f"field {field}="):
        config_from_hf(llama_dict(**changes))


def test_unknown_tensors_are_refused():
    hf = hf_llama(tied=False)
    cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    with pytest.raises(ValueError, match="q_proj.bias"):
        state_dict_from_hf(sd, cfg)
    del sd["model.layers.0.self_attn.q_proj.bias"], sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj"):
        state_dict_from_hf(sd, cfg)


@pytest.mark.parametrize(
    "moe,field",
    [
        (dict(every_n_layers=2), "every_n_layers"),
        (dict(capacity_factor=1.25), "capacity_factor"),
        (dict(router="switch", top_k=1), "router"),
        (dict(score_func="sigmoid"), "score_func"),
        (dict(renormalize=False), "renormalize"),
        (dict(top_k=1), "renormalize"),  # skipped renormalisation at top-1 is not Mixtral's weight 1.0
        (dict(num_shared_experts=1), "num_shared_experts"),
        (dict(bias_update_rate=1e-3), "bias_update_rate"),
    ],
)
def test_unexportable_moekit_config_is_refused(moe, field):
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, moe=MoEConfig(num_experts=4, d_expert=8, **moe))
    with pytest.raises(ValueError, match=f"moe.{field}="):
        config_to_hf(cfg)
