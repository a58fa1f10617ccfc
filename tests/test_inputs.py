"""Bad inputs at the public boundaries: each gives an error naming the argument, before any computation.

Also the documented conversions (``[C, Ls]`` audio downmixed to mono, uint8 images scaled and normalised)
and the pretrained folders of ``moekit.core.pretrained`` (round trip, dtype and HF-folder refusals,
all-or-nothing writes).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit.core.pretrained as pretrained
from moekit.core.config import ModelConfig
from moekit.core.generate import generate
from moekit.core.hf import save_hf
from moekit.core.model import Transformer
from moekit.core.tokenizer import ByteTokenizer
from moekit.multimodal.audio import AudioEncoder, resample, to_mono
from moekit.multimodal.config import AudioEncoderConfig, ImageEncoderConfig, MultimodalConfig, ProjectorConfig
from moekit.multimodal.data import load_spoken_digits
from moekit.multimodal.image import ImageEncoder, build_image_transform
from moekit.multimodal.model import MultimodalLM
from moekit.multimodal.sequence import AudioPart, ImagePart, Sample, TextPart, TokenLayout, build_batch
from moekit.multimodal.train import TrainableMultimodalLM

V = 97
TOK = ByteTokenizer()


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(tiny()).eval()


def ids(B: int = 2, T: int = 5) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


# ---------------------------------------------------------------- Transformer.forward
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 5), r"input_ids must hold integer token ids .*float32"),
        (torch.zeros(2, 5, dtype=torch.int16), r"input_ids must hold integer token ids .*int16"),
        (torch.zeros(2, 5, dtype=torch.bool), r"input_ids must hold integer token ids .*bool"),
        (torch.full((2, 5), V), rf"input_ids values must be in \[0, vocab_size={V}\); got min {V}, max {V}"),
        (torch.tensor([[0, -1, 3]]), rf"input_ids values must be in \[0, vocab_size={V}\); got min -1"),
        (torch.zeros(0, 5, dtype=torch.long), r"input_ids has shape \(0, 5\): an empty batch"),
        (torch.zeros(2, 0, dtype=torch.long), r"input_ids has shape \(2, 0\): an empty batch or no tokens"),
        (torch.zeros(5, dtype=torch.long), r"input_ids must be \[B, T\]; got shape \(5,\)"),
        (torch.zeros(1, 65, dtype=torch.long), r"sequence length 65 exceeds ModelConfig.max_seq_len=64"),
    ],
)
def test_forward_refuses_bad_input_ids(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_int32_input_ids_are_accepted(model):
    x = ids()
    assert torch.equal(model(x.int()).logits, model(x).logits)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 5, 31), r"inputs_embeds must be \[B, T, D=32\]; got shape \(2, 5, 31\)"),
        (torch.zeros(2, 32), r"inputs_embeds must be \[B, T, D=32\]"),
        (torch.zeros(2, 5, 32, dtype=torch.long), r"inputs_embeds must be a floating-point Tensor .*int64"),
        (torch.zeros(0, 5, 32), r"inputs_embeds has shape \(0, 5, 32\): an empty batch"),
        (torch.zeros(2, 0, 32), r"inputs_embeds has shape \(2, 0, 32\): an empty batch or no tokens"),
    ],
)
def test_forward_refuses_bad_inputs_embeds(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(inputs_embeds=bad)


def test_forward_needs_exactly_one_input(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids(), inputs_embeds=torch.zeros(2, 5, 32))


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 4, dtype=torch.long), r"attention_mask must be a padding mask \[B, S\]=\[2, 5\]"),
        (torch.ones(3, 5, dtype=torch.long), r"attention_mask must be a padding mask .*got shape \(3, 5\)"),
        (torch.ones(2, 5, 5, dtype=torch.bool), r"attention_mask must be .*got shape \(2, 5, 5\)"),
        (torch.ones(2, 3, 5, 5, dtype=torch.bool), r"attention_mask must be .*\[B, 1, T, S\]=\[2, 1, 5, 5\]"),
        (torch.ones(2, 1, 5, 4, dtype=torch.bool), r"attention_mask must be .*got shape \(2, 1, 5, 4\)"),
        (torch.zeros(2, 5), r"attention_mask must be bool or integer .*float32 \(additive float masks"),
    ],
)
def test_forward_refuses_bad_attention_mask(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(ids(), attention_mask=mask)


def test_forward_accepts_both_mask_forms(model):
    x = ids()
    pad = torch.ones(2, 5, dtype=torch.long)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    ref = model(x).logits
    torch.testing.assert_close(model(x, attention_mask=pad).logits, ref)
    torch.testing.assert_close(model(x, attention_mask=causal[None, None].expand(2, 1, 5, 5)).logits, ref)
    torch.testing.assert_close(model(x, attention_mask=causal[None, None]).logits, ref)  # batch broadcast
    per_head = causal[None, None].expand(2, 4, 5, 5)  # n_heads=4
    torch.testing.assert_close(model(x, attention_mask=per_head).logits, ref)


@pytest.mark.parametrize("name", ["labels", "position_ids", "group_ids", "token_mask"])
def test_forward_refuses_misshaped_per_token_tensors(model, name):
    with pytest.raises(ValueError, match=rf"{name} must be \[B, T\]=\[2, 5\]"):
        model(ids(), **{name: torch.zeros(2, 4, dtype=torch.long)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_forward_refuses_labels_that_are_not_token_ids(model, dtype):
    with pytest.raises(ValueError, match=rf"labels must be integer token ids \(-100 = ignored\); got dtype {dtype}"):
        model(ids(), labels=torch.zeros(2, 5, dtype=dtype))


def test_forward_refuses_a_cache_of_another_depth(model):
    cache = model(ids(), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"past_key_values has 1 layers; the model has n_layers=2"):
        model(ids(T=1), past_key_values=cache[:1])


# ---------------------------------------------------------------- generate
@pytest.mark.parametrize(
    "prompt, kw, match",
    [
        (torch.full((1, 3), V), {}, r"input_ids values must be in \[0, vocab_size=97\)"),
        (torch.zeros(3, dtype=torch.long), {}, r"input_ids must be \[B, T\]"),
        (torch.zeros(0, 3, dtype=torch.long), {}, r"input_ids has shape \(0, 3\): an empty batch"),
        (torch.zeros(1, 65, dtype=torch.long), {}, r"input_ids has T=65 prompt tokens > ModelConfig.max_seq_len=64"),
        (
            torch.zeros(2, 3, dtype=torch.long),
            dict(attention_mask=torch.ones(2, 4)),
            r"attention_mask must be \[B, T\]",
        ),
        (torch.zeros(1, 3, dtype=torch.long), dict(eos_token_id=V), r"eos_token_id=97 must be a token id in \[0, "),
        (torch.zeros(1, 3, dtype=torch.long), dict(pad_token_id=-1), r"pad_token_id=-1 must be a token id"),
        (torch.zeros(1, 3, dtype=torch.long), dict(temperature=math.nan), r"temperature=nan must be a finite"),
        (torch.zeros(1, 3, dtype=torch.long), dict(top_p=0.0), r"top_p=0.0 must be None or in \(0, 1\]"),
        (torch.zeros(1, 3, dtype=torch.long), dict(top_k=-1), r"top_k=-1 must be None or >= 0"),
        (  # right padding: the first new token would come from a pad's logits
            torch.zeros(2, 3, dtype=torch.long),
            dict(attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]])),
            r"attention_mask must be left padding .* rows \[1\] are not",
        ),
        (
            torch.zeros(2, 3, dtype=torch.long),
            dict(attention_mask=torch.tensor([[0, 0, 0], [0, 1, 1]])),
            r"attention_mask must be left padding .* rows \[0\] are not",
        ),
        (
            torch.zeros(1, 4, dtype=torch.long),
            dict(attention_mask=torch.tensor([[0, 1, 0, 1]])),
            r"attention_mask must be left padding .* rows \[0\] are not",
        ),
    ],
)
def test_generate_refuses_bad_arguments(model, prompt, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, max_new_tokens=2, **kw)


def test_generate_restores_training_mode_when_the_forward_raises(monkeypatch):
    model = Transformer(tiny()).train()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    assert model.training


# ---------------------------------------------------------------- audio
LAYOUT = TokenLayout(image_tokens=2, audio_tokens=lambda n: n // 4, audio_sample_rate=100)


def test_multichannel_audio_is_downmixed_to_mono():
    wave = torch.randn(2, 40)
    batch = build_batch([Sample((AudioPart(wave, sample_rate=100),))], TOK, LAYOUT)
    assert batch["audio_lengths"].tolist() == [40]  # one clip of 40 samples, not 80
    assert torch.equal(batch["audio"][0], wave.mean(dim=0))
    mono = build_batch([Sample((AudioPart(wave[0], sample_rate=100),))], TOK, LAYOUT)
    one_channel = build_batch([Sample((AudioPart(wave[:1], sample_rate=100),))], TOK, LAYOUT)
    assert torch.equal(one_channel["audio"], mono["audio"]) and torch.equal(one_channel["input_ids"], mono["input_ids"])
    assert torch.equal(to_mono(wave), wave.mean(dim=0))


@pytest.mark.parametrize(
    "wave, match",
    [
        (torch.randn(40, 2), r"AudioPart.wave must be \[Ls\] \(mono\) or \[C, Ls\] .*got shape \(40, 2\)"),
        (torch.randn(1, 2, 40), r"AudioPart.wave must be \[Ls\] \(mono\) or \[C, Ls\]"),
        (torch.zeros(40, dtype=torch.int16), r"AudioPart.wave must be a float Tensor .*int16"),
        (torch.zeros(0), r"AudioPart.wave has shape \(0,\): no samples"),
    ],
)
def test_bad_audio_waves_are_refused(wave, match):
    with pytest.raises(ValueError, match=match):
        AudioPart(wave, sample_rate=100)


@pytest.mark.parametrize("rate", [0, -16000, 16000.0, True, None])
def test_bad_sample_rates_are_refused(tmp_path, rate):
    with pytest.raises(ValueError, match=rf"AudioPart.sample_rate={rate!r} is invalid: must be an int > 0"):
        AudioPart(torch.randn(40), sample_rate=rate)
    with pytest.raises(ValueError, match=r"orig_rate=.* is invalid: must be an int > 0"):
        resample(torch.randn(40), rate, 16000)
    with pytest.raises(ValueError, match=r"target_rate=.* is invalid"):
        resample(torch.randn(40), 16000, rate)
    with pytest.raises(ValueError, match=r"^sample_rate=.* is invalid"):  # before the folder is read
        load_spoken_digits(tmp_path / "missing", rate)


def test_audio_encoder_refuses_int_waves_and_empty_batches():
    enc = AudioEncoder(AudioEncoderConfig(n_mels=16, width=16, depth=0, n_heads=2))
    with pytest.raises(ValueError, match=r"AudioEncoder: wave must be float .*int16"):
        enc(torch.zeros(1, 400, dtype=torch.int16), torch.tensor([400]))
    with pytest.raises(ValueError, match=r"AudioEncoder: wave has N=0 clips"):
        enc(torch.zeros(0, 400), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------- images
def image_cfg(**kw) -> ImageEncoderConfig:
    base = dict(image_size=8, patch_size=4, width=16, depth=1, n_heads=2, augment=False)
    base.update(kw)
    return ImageEncoderConfig(**base)


@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_images_are_scaled_and_normalised_like_the_eval_transform(channels):
    cfg = image_cfg(in_channels=channels, mean=(0.2,) * channels, std=(0.3,) * channels)
    torch.manual_seed(0)
    enc = ImageEncoder(cfg).eval()
    raw = torch.randint(0, 256, (2, channels, 8, 8), dtype=torch.uint8)
    normalised = build_image_transform(cfg, train=False)(raw)
    assert normalised.dtype == torch.float32
    assert torch.equal(enc(raw), enc(normalised))
    assert not torch.equal(enc(raw), enc(raw.float()))  # a bare cast (0..255) would be wrong


def tiny_mm() -> MultimodalConfig:
    lm = ModelConfig(vocab_size=272, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)
    return MultimodalConfig(
        lm=lm,
        image=image_cfg(),
        audio=AudioEncoderConfig(n_mels=16, width=16, depth=0, n_heads=2),
        image_projector=ProjectorConfig(kind="linear"),
        audio_projector=ProjectorConfig(kind="pool", num_tokens=2),
    )


def test_uint8_image_parts_give_the_logits_of_normalised_ones():
    torch.manual_seed(0)
    mm = MultimodalLM(tiny_mm()).eval()
    raw = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    normalised = build_image_transform(mm.cfg.image, train=False)(raw)

    def logits(pixels):
        return mm(mm.build_batch([Sample((ImagePart(pixels), TextPart("ab", target=True)))])).logits

    assert torch.equal(logits(raw), logits(normalised))


@pytest.mark.parametrize(
    "pixels, match",
    [
        (torch.zeros(1, 8, 8, dtype=torch.int32), r"ImagePart.pixels must be float .* or uint8 .*int32"),
        (torch.zeros(1, 1, 8, 8), r"ImagePart.pixels must be one image \[C, S, S\]; got shape \(1, 1, 8, 8\)"),
        (torch.zeros(8, 8), r"ImagePart.pixels must be one image \[C, S, S\]"),
    ],
)
def test_bad_image_parts_are_refused(pixels, match):
    with pytest.raises(ValueError, match=match):
        ImagePart(pixels)


def test_mixed_image_dtypes_in_one_batch_are_refused():
    parts = (ImagePart(torch.zeros(1, 8, 8, dtype=torch.uint8)), ImagePart(torch.zeros(1, 8, 8)))
    with pytest.raises(ValueError, match=r"images differ in dtype"):
        build_batch([Sample(parts)], TOK, LAYOUT)


def test_image_encoder_names_channels_size_and_dtype():
    enc = ImageEncoder(image_cfg())
    with pytest.raises(ValueError, match=r"images \[N, 1, 8, 8\] \(ImageEncoderConfig.in_channels=1, image_size=8\)"):
        enc(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"images \[N, 1, 8, 8\].*got \(2, 1, 9, 9\)"):
        enc(torch.zeros(2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"images must be float \(normalised\) or uint8 .*int64"):
        enc(torch.zeros(2, 1, 8, 8, dtype=torch.long))


def test_multimodal_token_ids_are_range_checked():
    mm = MultimodalLM(tiny_mm())
    batch = mm.build_batch([Sample((TextPart("ab", target=True),))])
    batch["input_ids"][0, 1] = 272
    with pytest.raises(ValueError, match=r"batch\['input_ids'\] values must be in \[0, vocab_size=272\)"):
        mm(batch)


# ---------------------------------------------------------------- pretrained folders
@pytest.mark.parametrize("tie", [True, False])
def test_transformer_round_trip_is_exact(tmp_path, tie):
    torch.manual_seed(0)
    m = Transformer(tiny(tie_embeddings=tie, moe=dict(num_experts=4, top_k=2, d_expert=16, every_n_layers=2)))
    m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == m.cfg.to_dict()
    loaded = Transformer.from_pretrained(tmp_path / "m")
    assert loaded.cfg == m.cfg
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left beside it


def test_multimodal_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = TrainableMultimodalLM(tiny_mm())
    m.save_pretrained(tmp_path / "mm")
    loaded = TrainableMultimodalLM.from_pretrained(tmp_path / "mm")
    assert loaded.cfg == m.cfg
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saving_over_a_folder_replaces_our_files_and_keeps_others(tmp_path):
    torch.manual_seed(0)
    Transformer(tiny()).save_pretrained(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    torch.manual_seed(1)
    second = Transformer(tiny(d_ff=64))
    second.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert Transformer.from_pretrained(tmp_path).cfg.d_ff == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_int32_weights_are_refused_naming_the_tensor(tmp_path):
    Transformer(tiny()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["layers.1.attn.q_proj.weight"] = (sd["layers.1.attn.q_proj.weight"] * 100).to(torch.int32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'layers.1.attn.q_proj.weight' .* has dtype I32; .*torch.float32"):
        Transformer.from_pretrained(tmp_path)


def test_hf_folders_point_at_the_converter(tmp_path):
    save_hf(Transformer(tiny()), tmp_path / "hf")  # a real Llama folder: config.json has model_type
    with pytest.raises(ValueError, match=r"Hugging Face checkpoint .*model_type.*recipes/convert_hf.py.*load_hf"):
        Transformer.from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"Hugging Face checkpoint .*convert_hf.py"):
        TrainableMultimodalLM.from_pretrained(tmp_path / "hf")
    # Our config.json beside HF tensor names (e.g. a hand-copied config) is recognised by the names.
    (tmp_path / "hf" / "config.json").write_text(json.dumps(tiny().to_dict()))
    with pytest.raises(ValueError, match=r"Hugging Face tensor names such as 'model.embed_tokens.weight'"):
        Transformer.from_pretrained(tmp_path / "hf")


def test_missing_files_and_mismatched_tensors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a folder"):
        Transformer.from_pretrained(tmp_path / "nothing")
    Transformer(tiny()).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny(d_ff=64).to_dict()))
    shapes = r"'layers.0.ffn.w_gate.weight' has shape \[48, 32\] \(expected \[64, 32\]\)"
    with pytest.raises(ValueError, match=rf"6 tensors in .* do not fit the model of .*config.json: .*{shapes}"):
        Transformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        Transformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny().to_dict()))
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors"):
        Transformer.from_pretrained(tmp_path / "m")


def _failing_save(model, path):
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full (simulated)")


def test_a_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "save_model", _failing_save)
    with pytest.raises(OSError, match="simulated"):
        Transformer(tiny()).save_pretrained(tmp_path / "final")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging folder


def test_a_failed_save_over_a_folder_leaves_it_as_it_was(tmp_path, monkeypatch):
    Transformer(tiny()).save_pretrained(tmp_path / "final")
    before = {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()}
    monkeypatch.setattr(pretrained, "save_model", _failing_save)
    with pytest.raises(OSError, match="simulated"):
        Transformer(tiny(d_ff=64)).save_pretrained(tmp_path / "final")
    assert {p.name: p.read_bytes() for p in (tmp_path / "final").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
