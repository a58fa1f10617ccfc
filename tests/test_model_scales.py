"""Granite's model-level scalings (ModelConfig.embed_scale, residual_scale, logit_divisor; attn_scale is in
test_attention.py): the model against a float64 reference that applies them by hand (outputs and gradients),
with dense, MoE (shared expert) and latent-attention layers; KV-cache generation equals recompute; validation;
old configs load with the defaults and the fields are saved."""

import dataclasses

import pytest
import torch
from generation_checks import assert_cached_generation_equals_recompute

from moekit.core.config import MLAConfig, ModelConfig
from moekit.core.layers import rope_cos_sin
from moekit.core.model import Transformer
from moekit.moe.config import MoEConfig

SHAPE = dict(vocab_size=53, d_model=32, n_layers=2, n_heads=4, d_ff=40, max_seq_len=64, tie_embeddings=False)
SCALES = dict(embed_scale=3.0, residual_scale=0.4, logit_divisor=2.5)
DEFAULTS = dict(embed_scale=1.0, residual_scale=1.0, logit_divisor=1.0)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=8, num_shared_experts=1, d_shared=12, topk_order="topk_then_softmax")
MLA = MLAConfig(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)
CASES = {
    "dense": dict(n_kv_heads=2, attn_scale=0.2),
    "moe": dict(n_kv_heads=2, moe=MOE),
    "mla": dict(mla=MLA, moe=dataclasses.replace(MOE, every_n_layers=2)),
}


def model_of(case: str, **changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE, **CASES[case], **{**SCALES, **changes}))
    with torch.no_grad():  # O(1) weights and gains away from 1: every misplaced scale moves the logits
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.3 * torch.randn_like(p))
    return model.eval()


def reference_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The pre-norm decoder written out, each scaling applied where Granite applies it."""
    cfg = model.cfg
    B, T = ids.shape
    x = model.embed(ids) * cfg.embed_scale
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), cfg.rope_dim, cfg.rope_theta, x.dtype, cfg.rope_scaling)
    for blk in model.layers:
        a, _ = blk.attn(blk.attn_norm(x), cos, sin, None)
        x = x + cfg.residual_scale * a
        h = blk.ffn_norm(x)
        x = x + cfg.residual_scale * (blk.ffn(h).y if blk.is_moe else blk.ffn(h))
    return model.lm_head(model.norm(x)) / cfg.logit_divisor


@pytest.mark.parametrize("case", sorted(CASES))
def test_scalings_match_the_reference_in_float64_with_gradients(case):
    model = model_of(case).double()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    fast, ref = model(ids).logits, reference_logits(model, ids)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(fast)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # Each scaling changes the function (a field the model ignored would still match the reference above).
    for name, default in DEFAULTS.items():
        plain = Transformer(dataclasses.replace(model.cfg, **{name: default})).double().eval()
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain(ids).logits, fast, rtol=1e-3, atol=1e-3), name
    # inputs_embeds are scaled too, as transformers' Granite does
    torch.testing.assert_close(model(inputs_embeds=model.embed(ids)).logits, fast, rtol=0, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_cache_generation_with_scalings_equals_recompute(case):
    assert_cached_generation_equals_recompute(model_of(case))


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(embed_scale=0.0), r"ModelConfig.embed_scale=0.0 is invalid: must be a finite number > 0"),
        (dict(residual_scale=-0.5), r"ModelConfig.residual_scale=-0.5 is invalid"),
        (dict(logit_divisor=float("inf")), r"ModelConfig.logit_divisor=inf is invalid"),
        (dict(embed_scale=True), r"ModelConfig.embed_scale=True is invalid"),
        (dict(attn_scale=0.0), r"ModelConfig.attn_scale=0.0 is invalid: .*or None for 1/sqrt\(head dim\)"),
        (dict(attn_scale="0.1"), r"ModelConfig.attn_scale='0.1' is invalid"),
        (dict(attn_scale=0.1, mla=MLA), r"ModelConfig.attn_scale=0.1 is invalid: only None with mla"),
    ],
)
def test_bad_scalings_are_refused_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**SHAPE, **kw)


def test_old_configs_load_with_the_defaults_and_the_scalings_are_saved(tmp_path):
    cfg = ModelConfig(**SHAPE)
    old = {k: v for k, v in cfg.to_dict().items() if k not in (*DEFAULTS, "attn_scale")}
    assert ModelConfig.from_dict(old) == cfg
    assert (cfg.embed_scale, cfg.residual_scale, cfg.attn_scale, cfg.logit_divisor) == (1.0, 1.0, None, 1.0)
    model = model_of("dense")
    model.save_pretrained(tmp_path / "m")
    back = Transformer.from_pretrained(tmp_path / "m").eval()
    assert back.cfg == model.cfg and back.cfg.attn_scale == 0.2 and back.cfg.embed_scale == 3.0
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 5))
    assert torch.equal(back(ids).logits, model(ids).logits)
