"""Attention options (q/k/v and output biases, per-head and full-width QK-norm, clip_qkv, explicit head_dim,
llama3 RoPE scaling, Granite's softmax scale): SDPA path vs a slow per-head float64 reference (outputs and
gradients), KV-cache generation vs full recompute, config validation, and old configs loading unchanged."""

import dataclasses
import math

import pytest
import torch
from generation_checks import assert_cached_generation_equals_recompute

from moekit.core.config import ModelConfig, RopeScaling
from moekit.core.generate import generate, greedy_recompute
from moekit.core.layers import Attention, rope_cos_sin, rope_inv_freq
from moekit.core.model import Transformer

SHAPE = dict(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=40, max_seq_len=64)
LLAMA3 = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32)
YARN = RopeScaling(rope_type="yarn", factor=4.0, original_max_seq_len=16)
OPTIONS = {
    "bias": dict(qkv_bias=True, out_bias=True),
    "qwen3": dict(qk_norm="head", head_dim=12),
    "olmoe": dict(qk_norm="full", clip_qkv=0.7),
    "llama3": dict(rope_scaling=LLAMA3),
    "yarn": dict(rope_scaling=YARN, head_dim=16),
    "all": dict(qkv_bias=True, qk_norm="head", head_dim=6, clip_qkv=0.9, rope_scaling=LLAMA3),
    "granite": dict(attn_scale=0.9),  # Granite's attention_multiplier: the softmax scale, not 1/sqrt(Dh)
}


def llama3_inv_freq_scalar(dh: int, theta: float, s: RopeScaling) -> list[float]:
    """Llama 3.1's rule written per frequency, as in Meta's reference code."""
    out = []
    for j in range(0, dh, 2):
        f = 1.0 / theta ** (j / dh)
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def yarn_inv_freq_scalar(dh: int, theta: float, s: RopeScaling) -> list[float]:
    """YaRN per dim pair j: r_j = L / wavelength_j rotations over the original context L; pairs with r_j above
    beta_fast keep their frequency, below beta_slow are interpolated (divided by factor), linearly between in
    the pair index (the band's ends rounded outwards)."""
    freqs = [1.0 / theta ** (j / dh) for j in range(0, dh, 2)]

    def pair_at(rotations: float) -> float:  # solve L * f_j / (2 pi) = rotations for the pair index j
        return dh * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(pair_at(s.beta_fast)), 0), min(math.ceil(pair_at(s.beta_slow)), dh - 1)
    out = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f * (1 - ramp) + f / s.factor * ramp)
    return out


def test_yarn_inv_freq_and_attention_scaling():
    dh, theta = 32, 500.0
    ours = rope_inv_freq(dh, theta, YARN)
    assert torch.allclose(ours, torch.tensor(yarn_inv_freq_scalar(dh, theta, YARN), dtype=torch.float64))
    ratio = rope_inv_freq(dh, theta) / ours
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(YARN.factor)
    assert YARN.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    deepseek = RopeScaling(rope_type="yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.707)
    assert deepseek.attention_scaling == pytest.approx((0.1 * math.log(40) + 1) / (0.0707 * math.log(40) + 1))
    assert RopeScaling(rope_type="yarn", attention_factor=1.5).attention_scaling == 1.5
    assert LLAMA3.attention_scaling == 1.0
    pos = torch.arange(5)[None]
    cos, _ = rope_cos_sin(pos, dh, theta, torch.float64, YARN)
    assert cos[0, 0, 0, 0] == pytest.approx(YARN.attention_scaling)  # position 0: cos = 1, scaled


def test_llama3_inv_freq_matches_the_piecewise_rule_and_covers_all_three_bands():
    dh, theta = 32, 500.0
    ours = rope_inv_freq(dh, theta, LLAMA3)
    assert torch.allclose(ours, torch.tensor(llama3_inv_freq_scalar(dh, theta, LLAMA3), dtype=torch.float64))
    plain = rope_inv_freq(dh, theta)
    ratio = plain / ours
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(LLAMA3.factor)  # kept, and slowed by factor
    assert ((ratio > 1.01) & (ratio < LLAMA3.factor - 0.01)).any()  # the blended band


def reference_attention(
    attn: Attention, x_btd: torch.Tensor, inv_freq: torch.Tensor, eps: float, rope_gain: float = 1.0
) -> torch.Tensor:
    """Per (batch, head) loops with explicit rotations, causal softmax and kv-head sharing."""
    B, T, _ = x_btd.shape
    H, G, dh = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def proj(lin: torch.nn.Linear) -> torch.Tensor:
        y = x_btd @ lin.weight.T
        return y if lin.bias is None else y + lin.bias

    def rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    q, k, v = proj(attn.q_proj), proj(attn.k_proj), proj(attn.v_proj)
    if attn.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = q.view(B, T, H, dh), k.view(B, T, G, dh), v.view(B, T, G, dh)
    if attn.qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    if attn.clip_qkv is not None:
        q, k, v = (t.clamp(-attn.clip_qkv, attn.clip_qkv) for t in (q, k, v))

    def rotate(t_td: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(t_td)
        half = dh // 2
        for t in range(T):
            for j in range(half):
                c, s = rope_gain * math.cos(t * inv_freq[j].item()), rope_gain * math.sin(t * inv_freq[j].item())
                a, b = t_td[t, j], t_td[t, j + half]
                out[t, j], out[t, j + half] = a * c - b * s, b * c + a * s
        return out

    y = torch.zeros(B, T, H, dh, dtype=x_btd.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            qh, kh = rotate(q[b, :, h]), rotate(k[b, :, g])
            scores = qh @ kh.T * (1 / math.sqrt(dh) if attn.scale is None else attn.scale)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            y[b, :, h] = scores.softmax(-1) @ v[b, :, g]
    out = y.reshape(B, T, H * dh) @ attn.o_proj.weight.T
    return out if attn.o_proj.bias is None else out + attn.o_proj.bias


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_attention_matches_the_reference_in_float64_with_gradients(name):
    cfg = ModelConfig(**SHAPE, **OPTIONS[name], norm_eps=1e-2)
    torch.manual_seed(0)
    attn = Attention.from_config(cfg).double()
    with torch.no_grad():  # O(1) activations and gains away from 1, so that clip_qkv clips and norms matter
        for p in attn.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 2 * p)
    x = torch.randn(2, 6, cfg.d_model, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_cos_sin(pos, cfg.dh, cfg.rope_theta, torch.float64, cfg.rope_scaling)
    fast, _ = attn(x, cos, sin, None)
    gain = 1.0 if cfg.rope_scaling is None else cfg.rope_scaling.attention_scaling
    ref = reference_attention(attn, x, rope_inv_freq(cfg.dh, cfg.rope_theta, cfg.rope_scaling), 1e-2, gain)
    if cfg.clip_qkv is not None:
        unclipped = Attention.from_config(dataclasses.replace(cfg, clip_qkv=None)).double()
        unclipped.load_state_dict(attn.state_dict())
        assert not torch.allclose(unclipped(x, cos, sin, None)[0], fast), "clip_qkv clipped nothing"
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad(fast, [x, *attn.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x, *attn.parameters()], g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_kv_cache_generation_equals_full_recompute(name):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**SHAPE, **OPTIONS[name], init_std=0.3)).eval()
    for p in model.parameters():
        if p.dim() == 1:
            torch.nn.init.normal_(p, 1.0, 0.2)
    assert_cached_generation_equals_recompute(model)


def test_options_change_the_function():
    """Each option really is wired (a no-op option would pass every equivalence test)."""
    torch.manual_seed(3)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 40))
    base = ModelConfig(**SHAPE, init_std=0.3)
    torch.manual_seed(4)
    ref = Transformer(base).eval()
    options = (dict(qk_norm="full"), dict(qk_norm="head"), dict(clip_qkv=0.05), dict(rope_scaling=LLAMA3),
               dict(attn_scale=1.0))  # fmt: skip
    for kw in (*options, dict(rope_scaling=YARN)):
        m = Transformer(ModelConfig(**SHAPE, init_std=0.3, **kw)).eval()
        m.load_state_dict(ref.state_dict(), strict=False)
        assert not torch.allclose(m(ids).logits, ref(ids).logits), kw


def test_default_config_has_the_old_parameters_and_old_config_json_loads():
    cfg = ModelConfig(**SHAPE)
    names = set(Transformer(cfg).state_dict())
    assert not any(n.endswith(("bias", "q_norm.weight", "k_norm.weight")) for n in names)
    old = {k: v for k, v in cfg.to_dict().items()}
    for new in ("head_dim", "qkv_bias", "out_bias", "qk_norm", "clip_qkv", "rope_scaling"):
        old.pop(new)
    assert ModelConfig.from_dict(old) == cfg and cfg.head_dim is None and cfg.dh == 8
    scaled = ModelConfig(**SHAPE, head_dim=12, rope_scaling=LLAMA3)
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled  # nested RopeScaling survives JSON


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(qk_norm="layer"), r"ModelConfig.qk_norm='layer' is invalid: allowed values are none, head, full"),
        (dict(clip_qkv=0.0), r"ModelConfig.clip_qkv=0.0 is invalid"),
        (dict(clip_qkv=float("inf")), r"ModelConfig.clip_qkv=inf is invalid"),
        (dict(head_dim=7), r"ModelConfig.head_dim=7 is invalid: must be an even integer"),
        (dict(qkv_bias=1), r"ModelConfig.qkv_bias=1 is invalid: must be true or false"),
        (dict(rope_scaling=dict(rope_type="linear")), r"RopeScaling.rope_type='linear' is invalid: allowed values"),
        (dict(rope_scaling=dict(rope_type="yarn", mscale=0.0)), r"RopeScaling.mscale=0.0 is invalid"),
        (dict(rope_scaling=dict(factor=-1.0)), r"RopeScaling.factor=-1.0 is invalid"),
        (dict(rope_scaling=dict(low_freq_factor=4.0)), r"RopeScaling.high_freq_factor=4.0 is invalid"),
    ],
)
def test_bad_attention_options_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**SHAPE, **kw)


def test_explicit_head_dim_frees_d_model_from_n_heads():
    cfg = ModelConfig(**{**SHAPE, "d_model": 30}, head_dim=8)
    attn = Transformer(cfg).layers[0].attn
    assert attn.q_proj.weight.shape == (4 * 8, 30) and attn.o_proj.weight.shape == (30, 4 * 8)
    with pytest.raises(ValueError, match="ModelConfig.d_model=30 is invalid: must be divisible by n_heads=4"):
        ModelConfig(**{**SHAPE, "d_model": 30})


def test_sliding_window_equals_running_each_window_on_its_own():
    """One layer, window w: position i's logits are those of the model run on tokens i-w+1..i alone (same
    positions), with or without left padding in the batch."""
    torch.manual_seed(5)
    cfg = ModelConfig(**{**SHAPE, "n_layers": 1}, sliding_window=4, init_std=0.3)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for i in range(10):
            lo = max(0, i - 3)
            alone = model(input_ids=ids[:, lo : i + 1], position_ids=torch.arange(lo, i + 1)[None]).logits[:, -1]
            torch.testing.assert_close(full[:, i], alone, rtol=1e-5, atol=1e-5)
        plain = Transformer(ModelConfig(**{**SHAPE, "n_layers": 1}, init_std=0.3))
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(plain.eval()(input_ids=ids).logits[:, :4], full[:, :4], atol=1e-6)
        assert not torch.allclose(plain(input_ids=ids).logits[:, 4:], full[:, 4:], atol=1e-3)


def test_sliding_window_generation_with_cache_equals_recompute_past_the_window():
    torch.manual_seed(6)
    model = Transformer(ModelConfig(**SHAPE, sliding_window=3, qkv_bias=True, init_std=0.3)).eval()
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=0), greedy_recompute(model, ids, 8))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the window counts sequence indices, as transformers does
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = ids[:, :1]
        step = model(
            input_ids=nxt, attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=out.past_key_values
        )
        again = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, mask[:, :1]], 1))
        torch.testing.assert_close(step.logits[:, -1], again.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_sliding_window_is_validated():
    with pytest.raises(ValueError, match=r"ModelConfig.sliding_window=0 is invalid: must be a positive integer"):
        ModelConfig(**SHAPE, sliding_window=0)


@pytest.mark.parametrize("option", ["qwen3", "olmoe"])
def test_autocast_caches_keys_in_the_values_dtype_and_generates_as_before(option):
    """RoPE's float32 tables used to promote bf16 keys, so the cache held float32 keys beside bf16 values
    (1.5x the memory); SDPA casts q/k to bf16 under autocast anyway, so the outputs are unchanged."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, **OPTIONS[option]})).eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, use_cache=True)
        kv = out.past_key_values[0]
        assert kv.k.dtype == kv.v.dtype == torch.bfloat16
        cached = generate(model, x, max_new_tokens=5, temperature=0)
        full = greedy_recompute(model, x, 5)
    assert torch.equal(cached, full)
