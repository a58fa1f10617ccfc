"""MultimodalLM end to end: splicing, masks through the core, MoE telemetry by modality, accounting."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moekit.core.config import ModelConfig
from moekit.core.tokenizer import ByteTokenizer
from moekit.moe.config import MoEConfig
from moekit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig, MultimodalConfig, ProjectorConfig
from moekit.multimodal.model import MultimodalLM
from moekit.multimodal.sequence import AudioPart, ImagePart, Sample, TextPart
from moekit.multimodal.speech import SpeechConfig
from moekit.multimodal.tasks import DigitTasksConfig, load_digit_tasks

TOK = ByteTokenizer()


def tiny_cfg(moe=None, tie=True, **kw) -> MultimodalConfig:
    lm = ModelConfig(
        vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=160, moe=moe,
        tie_embeddings=tie,
    )  # fmt: skip
    base = dict(
        lm=lm,
        image=ImageEncoderConfig(image_size=28, patch_size=7, width=16, depth=1, n_heads=2, mlp_hidden=32),
        audio=AudioEncoderConfig(n_mels=16, width=16, depth=1, n_heads=2, mlp_hidden=32),
        image_projector=ProjectorConfig(kind="mlp", hidden=24),
        audio_projector=ProjectorConfig(kind="pool", num_tokens=3),
    )
    base.update(kw)
    return MultimodalConfig(**base)


def synthetic_samples(n_audio=(1600, 900)) -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(n_audio):
        parts = (
            ImagePart(torch.randn(1, 28, 28, generator=gen)),
            TextPart(" and "),
            AudioPart(torch.randn(n, generator=gen) * 0.1, 16000),
            TextPart("same" if i % 2 else "diff", target=True, eos=True),
        )
        out.append(Sample(parts))
    return out


@pytest.mark.skipif(importlib.util.find_spec("espeakng_loader") is None, reason="espeakng-loader missing")
def test_end_to_end_on_real_tasks_forward_backward(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tie=False)  # untied: the input embedding's gradient is the lookup's alone
    tasks = load_digit_tasks(
        DigitTasksConfig(text_tokens=24),
        cfg,
        speech=SpeechConfig(voices=("en", "en-us", "en+f2"), rates=(160,), pitches=(50,)),
        cache_root=tmp_path,
        eval_voices=("en+f2",),
    )
    model = MultimodalLM(cfg)
    samples = tasks.batch(0, 8) + tasks.batch(0, 2, split="eval")
    assert {s.task for s in samples} == {"caption", "transcribe", "compare", "text"}
    batch = model.build_batch(samples)
    out = model(batch)
    assert out.logits.shape == (*batch["input_ids"].shape, 272) and torch.isfinite(out.loss)
    # the loss is the mean CE over exactly the text targets
    keep = batch["labels"] != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], batch["labels"][keep]))
    out.loss.backward()
    for name in ("image_encoder.patch.weight", "audio_encoder.conv1.weight", "image_projector.net.0.weight",
                 "audio_projector.net.weight", "lm.layers.0.attn.q_proj.weight"):  # fmt: skip
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    grad_rows = model.lm.embed.weight.grad
    assert bool((grad_rows[[TOK.IMAGE, TOK.AUDIO]] == 0).all()), "placeholders are overwritten: no gradient"


def test_embed_splices_projected_media_exactly():
    torch.manual_seed(0)
    model = MultimodalLM(tiny_cfg()).double().eval()
    batch = model.build_batch(synthetic_samples())
    ids = batch["input_ids"]
    x = model.embed(batch)
    img_tokens, _ = model.image_projector(model.image_encoder(batch["images"].double()))
    aud_tokens, aud_valid = model.audio_encoder(batch["audio"].double(), batch["audio_lengths"])
    aud_tokens, _ = model.audio_projector(aud_tokens, aud_valid)
    assert (ids == TOK.IMAGE).sum(1).tolist() == [16, 16] and (ids == TOK.AUDIO).sum(1).tolist() == [3, 3]
    for b in range(ids.shape[0]):
        img_pos = (ids[b] == TOK.IMAGE).nonzero().flatten()
        aud_pos = (ids[b] == TOK.AUDIO).nonzero().flatten()
        torch.testing.assert_close(x[b, img_pos], img_tokens[b], rtol=0, atol=0)
        torch.testing.assert_close(x[b, aud_pos], aud_tokens[b], rtol=0, atol=0)
        text_pos = ((ids[b] != TOK.IMAGE) & (ids[b] != TOK.AUDIO)).nonzero().flatten()
        torch.testing.assert_close(x[b, text_pos], model.lm.embed(ids[b, text_pos]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="placeholders but no 'images'"):
        model.embed({k: v for k, v in batch.items() if k != "images"})


@pytest.mark.parametrize("bidirectional", [False, True])
def test_media_spans_are_bidirectional_only_when_enabled(bidirectional):
    torch.manual_seed(0)
    model = MultimodalLM(tiny_cfg(bidirectional_media=bidirectional)).double().eval()
    batch = model.build_batch(synthetic_samples(), bidirectional_media=bidirectional)
    assert ("attention_mask_4d" in batch) == bidirectional
    ids = batch["input_ids"]
    x = model.embed(batch).detach()
    mask = batch.get("attention_mask_4d", batch["attention_mask"])
    base = model.lm(inputs_embeds=x, attention_mask=mask).logits
    img_pos = (ids[0] == TOK.IMAGE).nonzero().flatten()
    y = x.clone()
    y[0, img_pos[-1]] += 1.0  # perturb the last image token of row 0
    out = model.lm(inputs_embeds=y, attention_mask=mask).logits
    before = slice(0, int(img_pos[0]))
    assert torch.equal(out[0, before], base[0, before]), "text before the span never sees it"
    assert torch.equal(out[1], base[1]), "rows are independent"
    earlier_media_changed = not torch.allclose(out[0, img_pos[:-1]], base[0, img_pos[:-1]], rtol=0, atol=1e-12)
    assert earlier_media_changed == bidirectional
    assert torch.equal(model(batch).logits, base)  # forward picks the same mask from the batch / config


def test_moe_core_gets_modality_groups_and_skips_padding():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=16, num_groups=3)
    model = MultimodalLM(tiny_cfg(moe=moe))
    samples = synthetic_samples((1600, 500)) + [Sample((TextPart("just text", target=True),))]
    batch = model.build_batch(samples)
    out = model(batch)
    assert len(out.moe_stats) == 2 and out.aux_loss > 0
    real = batch["attention_mask"].bool()
    for stats in out.moe_stats:
        per_group = stats.tokens_per_expert_by_group.sum(1)  # [3] kept assignments per modality
        expected = [2 * int(((batch["modality_ids"] == g) & real).sum()) for g in range(3)]
        assert per_group.tolist() == expected
        assert int(stats.num_tokens) == int(real.sum())
    (out.loss + out.aux_loss).backward()


def test_report_counts_every_parameter_and_flops_match_the_counter():
    torch.manual_seed(0)
    model = MultimodalLM(tiny_cfg())
    rep = model.report()
    assert rep.params["total"] == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert rep.params["image_encoder"] == sum(p.numel() for p in model.image_encoder.parameters())
    assert rep.params["audio_projector"] == sum(p.numel() for p in model.audio_projector.parameters())
    batch = model.build_batch(synthetic_samples((1200, 1200)))  # equal lengths: no padding anywhere
    assert bool(batch["attention_mask"].all())
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    flops = model.batch_flops(batch)
    assert flops["total"] == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert flops["image"] == 2 * rep.flops["image_per_item"]
    one_clip = model.audio_item_flops(1200)
    assert flops["audio"] == 2 * one_clip and rep.flops["audio_per_item"] > one_clip


def test_model_rejects_small_vocab_and_missing_modality():
    small = tiny_cfg()
    small.lm = ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=4, d_ff=48)
    with pytest.raises(ValueError, match=r"lm\.vocab_size=260.*>= 272"):
        MultimodalLM(small)
    model = MultimodalLM(tiny_cfg(audio=None))
    assert model.audio_encoder is None and model.layout.audio_tokens is None
    with pytest.raises(ValueError, match="takes no audio"):
        model.build_batch(synthetic_samples())


@pytest.mark.parametrize("key", ["attention_mask", "modality_ids", "audio_lengths"])
def test_a_batch_missing_a_key_is_refused_naming_it(key):
    """Without modality_ids the media tokens would silently route as text; the others would be a bare KeyError."""
    torch.manual_seed(0)
    model = MultimodalLM(tiny_cfg())
    batch = {k: v for k, v in model.build_batch(synthetic_samples()).items() if k != key}
    with pytest.raises(ValueError, match=rf"MultimodalLM: the batch has no \['{key}'\]"):
        model(batch)
