"""Dense core: causality, KV cache, GQA, masking, overfitting, persistence, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.core.config import ModelConfig
from moekit.core.generate import filter_logits, generate
from moekit.core.layers import Attention, rope_cos_sin
from moekit.core.model import IGNORE_INDEX, Transformer, lm_loss


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def model64():
    torch.manual_seed(0)
    return Transformer(tiny()).double().eval()


def test_causality(model64):
    x = torch.randint(0, 97, (2, 20))
    ref = model64(x).logits
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        out = model64(y).logits
        assert torch.equal(out[:, :t], ref[:, :t]), f"changing token {t} changed earlier logits"
        assert not torch.allclose(out[:, t], ref[:, t]), "the changed position itself must change"


def test_kv_cache_matches_full_forward(model64):
    x = torch.randint(0, 97, (3, 24))
    full = model64(x).logits
    out = model64(x[:, :10], use_cache=True)
    pieces = [out.logits]
    cache = out.past_key_values
    for t in range(10, 24, 3):  # mixed chunk sizes exercise the cached causal mask
        out = model64(x[:, t : t + 3], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


def test_greedy_generate_equals_recompute(model64):
    x = torch.randint(0, 97, (2, 5))
    got = generate(model64, x, max_new_tokens=12, temperature=0)
    seq = x
    for _ in range(12):  # no cache: recompute the whole prefix each step
        nxt = model64(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq)


def test_left_padded_batch_generation_matches_single(model64):
    a = torch.randint(1, 97, (1, 7))
    b = torch.randint(1, 97, (1, 4))
    pad = 0
    batch = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], 1)], 0)
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = generate(model64, batch, max_new_tokens=6, temperature=0, attention_mask=mask)
    solo_a = generate(model64, a, max_new_tokens=6, temperature=0)
    solo_b = generate(model64, b, max_new_tokens=6, temperature=0)
    assert torch.equal(out[0, 7:], solo_a[0, 7:])
    assert torch.equal(out[1, 7:], solo_b[0, 4:])


def test_eos_stops_and_pads(model64):
    x = torch.randint(0, 97, (1, 5))
    first = generate(model64, x, max_new_tokens=1, temperature=0)[0, -1].item()
    out = generate(model64, x, max_new_tokens=8, temperature=0, eos_token_id=first, pad_token_id=0)
    assert out.shape[1] == 6 and out[0, -1].item() == first


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert not torch.isinf(filter_logits(logits, top_k=2)[0, :2]).any()
    p = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7)[0])
    assert kept.tolist() == [True, True, False, False], p
    kept = ~torch.isinf(filter_logits(logits, top_p=0.5)[0])
    assert kept.tolist() == [True, False, False, False]
    g = torch.Generator().manual_seed(0)
    model = Transformer(tiny()).eval()
    out = generate(model, torch.zeros(4, 2, dtype=torch.long), max_new_tokens=5, top_k=1, generator=g)
    greedy = generate(model, torch.zeros(4, 2, dtype=torch.long), max_new_tokens=5, temperature=0)
    assert torch.equal(out, greedy), "top_k=1 sampling must be greedy"


def _plain_attention(attn: Attention, x, positions):
    """Textbook multi-head attention with an explicit causal softmax."""
    B, T, D = x.shape
    H, hd = attn.n_heads, attn.head_dim
    rep = attn.n_heads // attn.n_kv_heads
    q = (x @ attn.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(rep, dim=1)
    v = (x @ attn.v_proj.weight.T).view(B, T, -1, hd).transpose(1, 2).repeat_interleave(rep, dim=1)
    cos, sin = rope_cos_sin(positions, hd, 10000.0, x.dtype)

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat(
            [t1 * cos[..., : hd // 2] - t2 * sin[..., : hd // 2], t2 * cos[..., hd // 2 :] + t1 * sin[..., hd // 2 :]],
            -1,
        )

    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_attention_matches_textbook(n_kv):
    torch.manual_seed(0)
    attn = Attention(32, 4, n_kv).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float64)
    got, _ = attn(x, cos, sin, None)
    torch.testing.assert_close(got, _plain_attention(attn, x, pos))


def test_gqa_equals_mha_with_repeated_kv():
    torch.manual_seed(0)
    gqa = Attention(32, 4, 2).double()
    mha = Attention(32, 4, 4).double()
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # head g of GQA serves query heads 2g and 2g+1
            w = getattr(gqa, name).weight.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(9).expand(2, 9), 8, 10000.0, torch.float64)
    torch.testing.assert_close(gqa(x, cos, sin, None)[0], mha(x, cos, sin, None)[0])


def test_padding_mask_isolates_real_tokens(model64):
    x = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = model64(padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    torch.testing.assert_close(got, model64(x).logits)
    assert torch.isfinite(model64(padded, attention_mask=mask).logits).all()


def test_inputs_embeds_equals_input_ids(model64):
    x = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model64(inputs_embeds=model64.embed(x)).logits, model64(x).logits)
    with pytest.raises(ValueError, match="exactly one"):
        model64()


def test_loss_ignores_masked_targets():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    assert lm_loss(logits, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(dropout=0.0))
    x = torch.randint(0, 97, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(x[:, :-1], labels=x[:, 1:])
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert first > 4.0 and out.loss.item() < 0.1, (first, out.loss.item())


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    model = Transformer(tiny(tie_embeddings=tie)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = Transformer.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    x = torch.randint(0, 97, (2, 10))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_too_long_sequence_errors(model64):
    with pytest.raises(ValueError, match="max_seq_len"):
        model64(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=30, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=24, n_heads=8), "d_model"),  # odd head dim breaks RoPE
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(rope_theta=-1.0), "rope_theta"),
        # YAML's true passed isinstance(int) (a 1-layer model saved as n_layers: true); null, lists and text
        # reached a bare comparison (TypeError)
        (dict(n_layers=True), "n_layers"),
        (dict(d_ff="683"), "d_ff"),
        (dict(rope_theta=None), "rope_theta"),
        (dict(norm_eps=None), "norm_eps"),
        (dict(dropout=None), "dropout"),
        (dict(dropout=[0.1]), "dropout"),
        (dict(init_std=float("nan")), "init_std"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
        (dict(moe=dict(num_experts=4, top_k=2, d_expert=16, layers=[9])), "moe.layers"),  # named "moe" before
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        tiny(**kw)


def test_config_round_trips(tmp_path):
    cfg = tiny(moe=dict(num_experts=4, top_k=2, d_expert=16, every_n_layers=2))
    cfg.save_json(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert ModelConfig.load(tmp_path / "c.yaml") == cfg
    assert cfg.ffn_kinds() == ["dense", "moe"]
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({"d_modle": 3})


def test_dense_and_moe_with_one_seed_share_every_common_initial_weight():
    # The comparison pairs a dense twin and a MoE by seed; building the FFN (dense Linear vs experts)
    # consumes the global RNG differently, which must not change the shared parameters' initial values.
    from moekit.moe.config import MoEConfig

    torch.manual_seed(7)
    dense = Transformer(tiny(d_ff=64)).state_dict()
    torch.manual_seed(7)
    moe = Transformer(tiny(moe=MoEConfig(num_experts=4, top_k=2, d_expert=32))).state_dict()
    shared = [k for k in dense if k in moe]
    assert {k.split(".")[0] for k in shared} >= {"embed", "layers", "norm", "lm_head"}
    assert any(".attn." in k for k in shared)
    for k in shared:
        assert torch.equal(dense[k], moe[k]), k
    torch.manual_seed(8)
    other = Transformer(tiny(d_ff=64)).state_dict()
    assert not torch.equal(other["embed.weight"], dense["embed.weight"]), "the seed must still matter"
