"""Multi-head latent attention: the SDPA path against a slow per-head float64 reference (outputs and
gradients; plain and interleaved RoPE, with and without the q bottleneck, yarn's logit temperature), the
latent KV cache (what it holds, generation equal to full recompute), and config validation."""

import math

import pytest
import torch
from generation_checks import assert_cached_generation_equals_recompute

from moekit.core.config import MLAConfig, ModelConfig, RopeScaling
from moekit.core.generate import generate, greedy_recompute
from moekit.core.layers import rope_cos_sin, rope_inv_freq
from moekit.core.mla import LatentKV, MLAttention
from moekit.core.model import Transformer

SHAPE = dict(vocab_size=53, d_model=32, n_layers=2, n_heads=4, d_ff=40, max_seq_len=64)
V3 = dict(kv_lora_rank=12, q_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
YARN = RopeScaling(rope_type="yarn", factor=4.0, original_max_seq_len=16, mscale=1.0, mscale_all_dim=0.7)
OPTIONS = {
    "v3": dict(mla=MLAConfig(**V3)),
    "v3_half_split": dict(mla=MLAConfig(**V3, rope_interleave=False)),
    "v2_lite": dict(mla=MLAConfig(**{**V3, "q_lora_rank": None})),
    "yarn": dict(mla=MLAConfig(**{**V3, "qk_rope_head_dim": 8}), rope_scaling=YARN),
}
EPS = 1e-2


def reference_mla(attn: MLAttention, x_btd: torch.Tensor, inv_freq: torch.Tensor, gain: float, scale: float):
    """MLA written per head from its definition: latent, per-head expansion of the kv_b rows, RoPE on each
    (adjacent or half-split) pair by explicit rotation, causal softmax attention."""
    m, H = attn.mla, attn.n_heads
    B, T, _ = x_btd.shape
    dn, dr, dv, R = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + EPS)

    if m.q_lora_rank is None:
        q = x_btd @ attn.q_proj.weight.T
    else:
        q = rms(x_btd @ attn.q_a_proj.weight.T, attn.q_a_norm.weight) @ attn.q_b_proj.weight.T
    a = x_btd @ attn.kv_a_proj.weight.T
    c, k_r = rms(a[..., :R], attn.kv_a_norm.weight), a[..., R:]  # [B, T, R], [B, T, Dr]
    pairs = [(2 * j, 2 * j + 1) if m.rope_interleave else (j, j + dr // 2) for j in range(dr // 2)]

    def rotate(t_td: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t_td)
        for t in range(T):
            for j, (i0, i1) in enumerate(pairs):
                co, si = gain * math.cos(t * inv_freq[j].item()), gain * math.sin(t * inv_freq[j].item())
                out[t, i0], out[t, i1] = t_td[t, i0] * co - t_td[t, i1] * si, t_td[t, i1] * co + t_td[t, i0] * si
        return out

    y = torch.zeros(B, T, H * dv, dtype=x_btd.dtype)
    w_b = attn.kv_b_proj.weight
    for b in range(B):
        kr = rotate(k_r[b])
        for h in range(H):
            qh = q[b, :, h * (dn + dr) : (h + 1) * (dn + dr)]
            rows = w_b[h * (dn + dv) : (h + 1) * (dn + dv)]
            k_nope, v = c[b] @ rows[:dn].T, c[b] @ rows[dn:].T
            scores = (qh[:, :dn] @ k_nope.T + rotate(qh[:, dn:]) @ kr.T) * scale
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            y[b, :, h * dv : (h + 1) * dv] = scores.softmax(-1) @ v
    return y @ attn.o_proj.weight.T


def mla_model(name: str) -> Transformer:
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**SHAPE, **OPTIONS[name], init_std=0.3)).eval()
    for p in model.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.2)
    return model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_mla_matches_the_reference_in_float64_with_gradients(name):
    cfg = ModelConfig(**SHAPE, **OPTIONS[name])
    m = cfg.mla
    torch.manual_seed(0)
    attn = MLAttention(cfg.d_model, cfg.n_heads, MLAConfig(**{**m.__dict__, "latent_norm_eps": EPS}),
                       scaling=cfg.rope_scaling).double()  # fmt: skip
    with torch.no_grad():  # O(1) activations and gains away from 1
        for p in attn.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 3 * p)
    x = torch.randn(2, 6, cfg.d_model, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(6).expand(2, 6), m.qk_rope_head_dim, cfg.rope_theta, torch.float64,
                            cfg.rope_scaling)  # fmt: skip
    fast, cache = attn(x, cos, sin, None)
    rs = cfg.rope_scaling
    gain = 1.0 if rs is None else rs.attention_scaling
    scale = 1 / math.sqrt(m.qk_nope_head_dim + m.qk_rope_head_dim)
    if rs is not None:  # DeepSeek's temperature: (0.1 mscale_all_dim ln(factor) + 1)^2 on every logit
        scale *= (0.1 * 0.7 * math.log(4.0) + 1) ** 2
    ref = reference_mla(attn, x, rope_inv_freq(m.qk_rope_head_dim, cfg.rope_theta, rs), gain, scale)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(fast)
    params = list(attn.parameters())
    grads_fast = torch.autograd.grad(fast, [x, *params], g)
    grads_ref = torch.autograd.grad(ref, [x, *params], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert isinstance(cache, LatentKV) and cache.c_kv.shape == (2, 6, m.kv_lora_rank)
    assert cache.k_rope.shape == (2, 6, m.qk_rope_head_dim)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_mla_kv_cache_generation_equals_full_recompute(name):
    assert_cached_generation_equals_recompute(mla_model(name))


def test_sliding_window_generation_with_the_latent_cache_equals_recompute():
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**SHAPE, mla=MLAConfig(**V3), sliding_window=3, init_std=0.3)).eval()
    assert_cached_generation_equals_recompute(model)  # 13 tokens, past the window


def test_the_cache_holds_the_latent_not_the_expanded_keys_and_values():
    model = mla_model("v3")
    m = model.cfg.mla
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 53, (3, 7)), use_cache=True).past_key_values
    assert len(cache) == SHAPE["n_layers"]
    for layer in cache:
        assert isinstance(layer, LatentKV)
        assert sorted(vars(layer)) == ["c_kv", "k_rope"]
        assert layer.c_kv.shape == (3, 7, m.kv_lora_rank) and layer.k_rope.shape == (3, 7, m.qk_rope_head_dim)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    model = mla_model("v3")
    long_ids = torch.randint(0, 53, (1, 6), generator=torch.Generator().manual_seed(4))
    short_ids = long_ids[:, 2:]
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 2, dtype=torch.long), short_ids], 1)])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    out = generate(model, batch, max_new_tokens=5, temperature=0, attention_mask=mask)
    assert torch.equal(out[1, 6:], greedy_recompute(model, short_ids, 5)[0, 4:])
    assert torch.equal(out[0, 6:], greedy_recompute(model, long_ids, 5)[0, 6:])


def test_interleave_and_the_q_bottleneck_change_the_function():
    base = mla_model("v3")
    x = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        ref = base(input_ids=x).logits
        half = Transformer(ModelConfig(**SHAPE, mla=MLAConfig(**V3, rope_interleave=False)))
        half.load_state_dict(base.state_dict())
        assert not torch.allclose(half.eval()(input_ids=x).logits, ref, atol=1e-4)
    assert set(mla_model("v2_lite").layers[0].attn.state_dict()) == {
        "q_proj.weight", "kv_a_proj.weight", "kv_a_norm.weight", "kv_b_proj.weight", "o_proj.weight",
    }  # fmt: skip


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(mla=MLAConfig(**V3), n_kv_heads=2), "n_kv_heads"),
        (dict(mla=MLAConfig(**V3), qk_norm="head"), "qk_norm"),
        (dict(mla=MLAConfig(**V3), qkv_bias=True), "qkv_bias"),
        (dict(mla=MLAConfig(**V3), head_dim=8), "head_dim"),
        (dict(mla=dict(V3, qk_rope_head_dim=3)), "qk_rope_head_dim"),
        (dict(mla=dict(V3, kv_lora_rank=0)), "kv_lora_rank"),
        (dict(mla=dict(V3, q_lora_rank=-1)), "q_lora_rank"),
        (dict(mla=dict(V3, rope_interleave="yes")), "rope_interleave"),
        (dict(mla=dict(V3, latent_norm_eps=0.0)), "latent_norm_eps"),
    ],
)
def test_bad_mla_options_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**SHAPE, **kw)


def test_mla_config_round_trips_through_dicts():
    cfg = ModelConfig(**SHAPE, mla=MLAConfig(**V3), rope_scaling=YARN)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.mla, MLAConfig) and again.rope_dim == V3["qk_rope_head_dim"]
