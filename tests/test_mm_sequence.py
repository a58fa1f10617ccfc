"""Sequence builder: placeholder layout, loss masking, splicing and the media attention mask."""

import pytest
import torch

from moekit.core.model import build_attention_mask
from moekit.core.tokenizer import ByteTokenizer
from moekit.multimodal.sequence import (
    MODALITY_AUDIO,
    MODALITY_IMAGE,
    AudioPart,
    ImagePart,
    Sample,
    TextPart,
    TokenLayout,
    build_batch,
    media_attention_mask,
    splice,
)

TOK = ByteTokenizer()
BOS, EOS, PAD = TOK.BOS, TOK.EOS, TOK.PAD
IMG, IS, IE = TOK.IMAGE, TOK.IMAGE_START, TOK.IMAGE_END
AUD, AS, AE = TOK.AUDIO, TOK.AUDIO_START, TOK.AUDIO_END
LAYOUT = TokenLayout(image_tokens=2, audio_tokens=lambda n: n // 4, audio_sample_rate=100)


def img(v: float) -> ImagePart:
    return ImagePart(torch.full((1, 4, 4), v))


def aud(n: int, v: float = 1.0) -> AudioPart:
    return AudioPart(torch.full((n,), v), sample_rate=100)


def two_samples():
    a = Sample((img(1.0), TextPart("ab", target=True, eos=True)), task="caption")
    b = Sample((aud(12, 2.0), TextPart("q"), img(3.0), aud(8, 4.0), TextPart("z", target=True)), task="mixed")
    return [a, b]


def test_layout_labels_and_masks_by_hand():
    batch = build_batch(two_samples(), TOK, LAYOUT)
    a, b, q, z = ord("a"), ord("b"), ord("q"), ord("z")
    row0 = [BOS, IS, IMG, IMG, IE, a, b, EOS]
    row1 = [BOS, AS, AUD, AUD, AUD, AE, q, IS, IMG, IMG, IE, AS, AUD, AUD, AE, z]
    assert batch["input_ids"].tolist() == [row0 + [PAD] * 8, row1]
    N = -100
    # labels[t] = target after t: only "ab<EOS>" in row 0 and "z" in row 1 are targets
    assert batch["labels"].tolist() == [
        [N, N, N, N, a, b, EOS, N] + [N] * 8,
        [N] * 14 + [z, N],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 8 + [0] * 8, [1] * 16]
    assert batch["modality_ids"].tolist() == [
        [0, 0, 1, 1, 0, 0, 0, 0] + [0] * 8,
        [0, 0, 2, 2, 2, 0, 0, 0, 1, 1, 0, 0, 2, 2, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [list(range(16))] * 2
    assert batch["images"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # order of appearance, row-major
    assert batch["audio"].tolist() == [[2.0] * 12, [4.0] * 8 + [0.0] * 4]
    assert batch["audio_lengths"].tolist() == [12, 8]
    assert "attention_mask_4d" not in batch


def test_labels_match_a_token_by_token_reference():
    """Random mixtures: label t is the next token exactly when that token belongs to a target text part."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(6):
        parts = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            kind = int(torch.randint(0, 4, (1,), generator=gen))
            if kind == 0:
                parts.append(img(0.0))
            elif kind == 1:
                parts.append(aud(int(torch.randint(4, 20, (1,), generator=gen))))
            else:
                parts.append(TextPart("xyz"[: 1 + kind], target=kind == 3, eos=kind == 3))
        samples.append(Sample(tuple(parts)))
    batch = build_batch(samples, TOK, LAYOUT, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    for r, sample in enumerate(samples):
        flags = [False]  # BOS
        for p in sample.parts:
            if isinstance(p, TextPart):
                flags += [p.target] * (len(p.text) + p.eos)
            else:
                n = LAYOUT.image_tokens if isinstance(p, ImagePart) else LAYOUT.audio_tokens(p.wave.numel())
                flags += [False] * (n + 2)
        ids = batch["input_ids"][r].tolist()
        expected = [ids[t + 1] if t + 1 < len(flags) and flags[t + 1] else -100 for t in range(len(ids))]
        assert batch["labels"][r].tolist() == expected
        assert batch["attention_mask"][r].sum() == len(flags)


def test_build_batch_resamples_audio_and_rejects_bad_input():
    batch = build_batch([Sample((AudioPart(torch.randn(300), sample_rate=300),))], TOK, LAYOUT)
    assert batch["audio_lengths"].tolist() == [100]  # 300 Hz -> 100 Hz
    assert (batch["input_ids"][0] == AUD).sum() == 25
    with pytest.raises(ValueError, match="max_len=10"):
        build_batch(two_samples(), TOK, LAYOUT, max_len=10)
    with pytest.raises(ValueError, match="takes no images"):
        build_batch(two_samples(), TOK, TokenLayout(None, lambda n: n, 100))
    with pytest.raises(TypeError, match="allowed: TextPart, ImagePart, AudioPart"):
        build_batch([Sample(("text",))], TOK, LAYOUT)
    with pytest.raises(ValueError, match="empty"):
        build_batch([], TOK, LAYOUT)
    with pytest.raises(ValueError, match="placeholder/marker ids"):
        build_batch([Sample((TextPart(torch.tensor([65, IMG, 66])),))], TOK, LAYOUT)
    for special in (TOK.PAD, TOK.BOS):  # a PAD inside text would become a target label
        with pytest.raises(ValueError, match=r"PAD \(256\) or BOS \(257\) ids"):
            build_batch([Sample((TextPart(torch.tensor([65, special])),))], TOK, LAYOUT)


def test_rounding_up_to_a_multiple_never_refuses_a_sample_that_fits():
    """max_len is checked on the longest sample, then the rounded length is capped at it."""
    fits = [Sample((TextPart("x" * 150),))]  # 151 tokens with BOS
    batch = build_batch(fits, TOK, LAYOUT, max_len=160, pad_to_multiple_of=64)
    assert batch["input_ids"].shape == (1, 160) and int(batch["attention_mask"].sum()) == 151
    assert build_batch(fits, TOK, LAYOUT, max_len=512, pad_to_multiple_of=64)["input_ids"].shape == (1, 192)
    with pytest.raises(ValueError, match="longest sample needs 151 tokens > max_len=150"):
        build_batch(fits, TOK, LAYOUT, max_len=150, pad_to_multiple_of=64)


def test_splice_lands_exactly_on_placeholders():
    batch = build_batch(two_samples(), TOK, LAYOUT)
    ids = batch["input_ids"]
    B, T, D = *ids.shape, 5
    embeds = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    positions = ids == AUD
    media = torch.randn(int(positions.sum()), D, dtype=torch.float64, requires_grad=True)
    out = splice(embeds, media, positions)
    k = 0
    for b in range(B):  # slow reference walk
        for t in range(T):
            if ids[b, t] == AUD:
                assert torch.equal(out[b, t], media[k])
                k += 1
            else:
                assert torch.equal(out[b, t], embeds[b, t])
    assert k == media.shape[0] == 5
    w = torch.randn_like(out)
    g_embeds, g_media = torch.autograd.grad((out * w).sum(), (embeds, media))
    assert torch.equal(g_media, w[positions])
    assert torch.equal(g_embeds, w * (~positions)[..., None])
    with pytest.raises(ValueError, match="5 placeholder positions"):
        splice(embeds, media[:4], positions)
    with pytest.raises(ValueError, match="bool"):
        splice(embeds, media, positions.long())


def reference_mask(modality, attn, bidirectional):
    B, T = modality.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        span, spans = 0, []
        for t in range(T):
            m = int(modality[b, t])
            if m and (t == 0 or int(modality[b, t - 1]) != m):
                span += 1
            spans.append(span if m else 0)
        for q in range(T):
            for k in range(T):
                ok = k <= q or (bidirectional and spans[q] and spans[q] == spans[k])
                mask[b, 0, q, k] = (ok and bool(attn[b, k])) or q == k
    return mask


@pytest.mark.parametrize("bidirectional", [False, True])
def test_media_attention_mask_against_reference(bidirectional):
    batch = build_batch(two_samples(), TOK, LAYOUT)
    mod, attn = batch["modality_ids"], batch["attention_mask"]
    mask = media_attention_mask(mod, attn, bidirectional)
    assert torch.equal(mask, reference_mask(mod, attn, bidirectional))
    # back-to-back spans of one modality stay separate (the markers between them are text)
    mod2 = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0, 2, 2]])
    attn2 = torch.ones_like(mod2)
    assert torch.equal(media_attention_mask(mod2, attn2, True), reference_mask(mod2, attn2, True))
    if not bidirectional:  # plain causal + padding: identical to the core's own mask
        core = build_attention_mask(attn, *attn.shape, past_len=0, device=attn.device)
        assert torch.equal(mask, core)


def test_media_attention_mask_semantics():
    batch = build_batch(two_samples(), TOK, LAYOUT, bidirectional_media=True)
    mask = batch["attention_mask_4d"][:, 0]  # [B, Tq, Tk]
    mod, attn = batch["modality_ids"], batch["attention_mask"].bool()
    T = mask.shape[-1]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    text_q = (mod == 0)[:, :, None]
    assert not (mask & future & text_q).any(), "a text query saw a future token"
    assert not (mask & ~attn[:, None, :] & attn[:, :, None]).any(), "a real token saw padding"
    row1_audio = (mod[1] == MODALITY_AUDIO).nonzero().flatten().tolist()  # [2, 3, 4, 12, 13]
    assert mask[1, 2, 4] and mask[1, 12, 13] and not mask[1, 4, 12] and not mask[1, 2, 12]
    assert row1_audio == [2, 3, 4, 12, 13]
    img = (mod[1] == MODALITY_IMAGE).nonzero().flatten().tolist()
    assert mask[1, img[0], img[1]] and not mask[1, img[0] - 1, img[0]]  # the marker before a span stays causal
