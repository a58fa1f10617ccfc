"""Multimodal encoders and projectors: configs, shapes, parameter/FLOP accounting, padding invariance."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchaudio
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.vision_transformer import EncoderBlock

from moekit.multimodal.audio import AudioEncoder, LogMel
from moekit.multimodal.blocks import EncoderLayer
from moekit.multimodal.config import (
    AudioEncoderConfig,
    ImageEncoderConfig,
    MultimodalConfig,
    ProjectorConfig,
)
from moekit.multimodal.image import ImageEncoder, build_image_transform
from moekit.multimodal.projector import Projector, masked_adaptive_avg_pool


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def counted_flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def tiny_image(**kw) -> ImageEncoderConfig:
    base = dict(image_size=8, in_channels=1, patch_size=4, width=16, depth=2, n_heads=2, mlp_hidden=24)
    base.update(kw)
    return ImageEncoderConfig(**base)


def tiny_audio(**kw) -> AudioEncoderConfig:
    base = dict(sample_rate=8000, n_mels=8, n_fft=64, hop_length=32, width=16, depth=2, n_heads=2, mlp_hidden=24)
    base.update(kw)
    return AudioEncoderConfig(**base)


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: tiny_image(patch_size=3), r"ImageEncoderConfig\.patch_size=3.*divide image_size=8"),
        (lambda: tiny_image(width=15), r"ImageEncoderConfig\.width=15.*n_heads=2"),
        (lambda: tiny_image(depth=-1), r"ImageEncoderConfig\.depth=-1"),
        (lambda: tiny_image(dropout=1.0), r"ImageEncoderConfig\.dropout"),
        (lambda: tiny_image(mean=(0.1, 0.2)), r"ImageEncoderConfig\.mean.*in_channels=1"),
        (lambda: tiny_image(weights_path="/x.pt"), r"ImageEncoderConfig\.weights_path.*needs backbone"),
        # tuple(0.5) was a TypeError, tuple('0.3') three "channels", ['a'] a TypeError at the std > 0 check
        (
            lambda: tiny_image(mean=0.5),
            r"ImageEncoderConfig\.mean=0\.5 is invalid: must be a list, e\.g\. mean=\[0\.5\]",
        ),
        (lambda: tiny_image(std="0.3"), r"ImageEncoderConfig\.std='0\.3' is invalid: must be a list"),
        (lambda: tiny_image(std=["a"]), r"ImageEncoderConfig\.std=\('a',\) is invalid: entries must be finite numbers"),
        (
            lambda: tiny_audio(strides=2),
            r"AudioEncoderConfig\.strides=2 is invalid: must be a list, e\.g\. strides=\[2, 2\]",
        ),
        (lambda: tiny_audio(strides=(True, 2)), r"AudioEncoderConfig\.strides"),
        (lambda: tiny_audio(kernel_size=4), r"AudioEncoderConfig\.kernel_size=4.*odd"),
        (lambda: tiny_audio(strides=(2,)), r"AudioEncoderConfig\.strides"),
        (lambda: tiny_audio(width=15, n_heads=3), r"AudioEncoderConfig\.width=15.*even"),
        (lambda: tiny_audio(hop_length=100), r"AudioEncoderConfig\.hop_length=100.*n_fft=64"),
        (lambda: tiny_audio(n_mels=0), r"AudioEncoderConfig\.n_mels=0"),
        (lambda: ProjectorConfig(kind="conv"), r"ProjectorConfig\.kind='conv'.*\['linear', 'mlp', 'pool'\]"),
        (lambda: ProjectorConfig(kind="pool"), r"ProjectorConfig\.num_tokens=None"),
        (lambda: ProjectorConfig(kind="linear", num_tokens=4), r"ProjectorConfig\.num_tokens=4.*pool"),
        (lambda: ProjectorConfig(kind="linear", hidden=8), r"ProjectorConfig\.hidden=8.*mlp"),
        (lambda: MultimodalConfig(image=None, audio=None), r"MultimodalConfig\.image.*both be None"),
        (lambda: MultimodalConfig(image="resnet"), r"MultimodalConfig\.image='resnet'.*ImageEncoderConfig"),
    ],
)
def test_config_errors_name_field_and_allowed_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_missing_weights_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights_path=.*nope\.safetensors.*never downloaded"):
        ImageEncoderConfig(backbone="resnet18", weights_path=str(tmp_path / "nope.safetensors"))


def test_config_from_dict_and_token_counts():
    cfg = MultimodalConfig.from_dict(
        {
            "lm": {"vocab_size": 272, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
            "image": {"image_size": 28, "patch_size": 4},
            "audio": {"strides": [2, 2]},
            "image_projector": {"kind": "pool", "num_tokens": 5},
        }
    )
    assert cfg.num_image_tokens() == 5 and cfg.image.num_patches == 49
    assert cfg.audio.strides == (2, 2)
    # 16000 samples -> 101 frames -> conv s2 -> 51 -> conv s2 -> 26 tokens (Whisper: 100 frames/s)
    assert cfg.audio.num_frames(16000) == 101 and cfg.num_audio_tokens(16000) == 26
    assert MultimodalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['vision'\]"):
        MultimodalConfig.from_dict({"vision": {}})


# ---------------------------------------------------------------- transformer layer
def test_encoder_layer_matches_torchvision_encoder_block():
    """Same math as torchvision's EncoderBlock (weights copied); with a key mask, padded rows match the bare item."""
    torch.manual_seed(0)
    ours = EncoderLayer(16, 2, 24).double().eval()
    ref = EncoderBlock(2, 16, 24, 0.0, 0.0).double().eval()
    state = ours.state_dict()
    ref.load_state_dict(
        {
            "ln_1.weight": state["ln_1.weight"],
            "ln_1.bias": state["ln_1.bias"],
            "self_attention.in_proj_weight": state["qkv.weight"],
            "self_attention.in_proj_bias": state["qkv.bias"],
            "self_attention.out_proj.weight": state["out_proj.weight"],
            "self_attention.out_proj.bias": state["out_proj.bias"],
            "ln_2.weight": state["ln_2.weight"],
            "ln_2.bias": state["ln_2.bias"],
            "mlp.0.weight": state["mlp.0.weight"],
            "mlp.0.bias": state["mlp.0.bias"],
            "mlp.3.weight": state["mlp.3.weight"],
            "mlp.3.bias": state["mlp.3.bias"],
        }
    )
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 16, dtype=torch.float64)
    out, out_ref = ours(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((out_ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    x = x.detach()
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    out = ours(x, mask)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n], ref(x[i : i + 1, :n])[0], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- image
def test_image_encoder_shapes_params_flops():
    cfg = tiny_image()
    enc = ImageEncoder(cfg)
    out = enc(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 4, 16) and enc.num_tokens == 4
    assert enc.num_params() == numel(enc)
    flops = counted_flops(lambda: enc(torch.randn(1, 1, 8, 8)))
    assert enc.flops_per_item() == pytest.approx(flops, rel=0.02)
    with pytest.raises(ValueError, match=r"images \[N, 1, 8, 8\]"):
        enc(torch.randn(2, 3, 8, 8))


def test_image_encoder_without_transformer():
    enc = ImageEncoder(tiny_image(depth=0, image_size=12, patch_size=3))
    assert enc(torch.randn(2, 1, 12, 12)).shape == (2, 16, 16)
    assert enc.num_params() == numel(enc)
    assert enc.flops_per_item() == counted_flops(lambda: enc(torch.randn(1, 1, 12, 12)))


def test_image_transform_normalises_and_augments():
    cfg = tiny_image(image_size=28, mean=(0.5,), std=(0.25,))
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    evaled = build_image_transform(cfg, train=False)(img)
    torch.testing.assert_close(evaled, (img.float() / 255 - 0.5) / 0.25)
    train = build_image_transform(cfg, train=True)
    torch.manual_seed(1)
    a = train(img)
    torch.manual_seed(1)
    assert torch.equal(a, train(img)) and not torch.equal(a, evaled)
    rgb = build_image_transform(tiny_image(image_size=32, in_channels=3, mean=(0.5,), std=(0.5,)), train=False)
    out = rgb(img)
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])


def test_backbone_loads_local_weights_and_counts_itself(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import squeezenet1_1

    from moekit.multimodal.image import _load_state_dict

    torch.manual_seed(0)
    ref = squeezenet1_1()
    path = tmp_path / "sq.safetensors"
    save_file(ref.state_dict(), str(path))
    kw = dict(image_size=64, in_channels=3, mean=(0.5,), std=(0.5,), backbone="squeezenet1_1")
    enc = ImageEncoder(ImageEncoderConfig(width=16, depth=1, n_heads=2, weights_path=str(path), **kw)).eval()
    for name in ("features.0.weight", "features.12.expand3x3.weight"):  # a fresh init differs: these were loaded
        assert torch.equal(enc.backbone.body.get_parameter(name), ref.state_dict()[name]), name
    assert (enc.num_tokens, enc.backbone.out_channels) == (9, 512)  # default node "features": 3x3 map at 64 px
    assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 9, 16)
    assert enc.num_params() == numel(enc)
    assert enc.flops_per_item() == pytest.approx(counted_flops(lambda: enc(torch.randn(1, 3, 64, 64))), rel=0.02)
    torch.save(ref.state_dict(), tmp_path / "sq.pt")
    loaded = _load_state_dict(str(tmp_path / "sq.pt"))
    assert loaded.keys() == ref.state_dict().keys() and torch.equal(loaded["features.0.weight"], ref.features[0].weight)
    with pytest.raises(ValueError, match=r"backbone='squeezenet9'.*allowed"):
        ImageEncoder(ImageEncoderConfig(**{**kw, "backbone": "squeezenet9"}))
    with pytest.raises(ValueError, match=r"backbone_node='nope'"):
        ImageEncoder(ImageEncoderConfig(**kw, backbone_node="nope"))
    with pytest.raises(ValueError, match=r"backbone_node=None has no default for backbone='googlenet'"):
        ImageEncoder(ImageEncoderConfig(**{**kw, "backbone": "googlenet"}))


# ---------------------------------------------------------------- audio
def whisper_log_mel_reference(wave: torch.Tensor, cfg: AudioEncoderConfig) -> torch.Tensor:
    """Bare clip [Ls] -> [n_mels, frames], written out with torch.stft (zero-padded centring)."""
    pad = cfg.n_fft // 2
    x = F.pad(wave, (pad, pad))
    window = torch.hann_window(cfg.n_fft).to(wave.dtype)  # built in float32, like the module's buffer
    spec = torch.stft(x, cfg.n_fft, cfg.hop_length, window=window, center=False, return_complex=True).abs() ** 2
    fb = torchaudio.functional.melscale_fbanks(
        cfg.n_fft // 2 + 1, 0.0, cfg.sample_rate / 2, cfg.n_mels, cfg.sample_rate, norm="slaney", mel_scale="slaney"
    ).to(wave.dtype)
    log = (fb.T @ spec).clamp(min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


def test_log_mel_matches_whisper_reference():
    cfg = tiny_audio()
    mel = LogMel(cfg).double()
    torch.manual_seed(0)
    wave = torch.randn(500, dtype=torch.float64) * torch.linspace(0, 1, 500, dtype=torch.float64) ** 3
    feats, frames = mel(wave[None], torch.tensor([500]))
    assert int(frames) == cfg.num_frames(500) == feats.shape[-1]
    torch.testing.assert_close(feats[0], whisper_log_mel_reference(wave, cfg), rtol=1e-9, atol=1e-9)
    assert float(feats.min()) == pytest.approx(float(feats.max()) - 2.0)  # the 8-decade clamp is active


@pytest.mark.parametrize("depth", [0, 2])
def test_padded_audio_gives_the_tokens_of_the_bare_clip(depth):
    cfg = tiny_audio(depth=depth)
    torch.manual_seed(0)
    enc = AudioEncoder(cfg).double().eval()
    lengths = [613, 100, 1, 257]
    bare = [torch.randn(n, dtype=torch.float64) * (1 + 20 * i) for i, n in enumerate(lengths)]  # loudness differs
    batch = torch.randn(len(bare), 700, dtype=torch.float64) * 100  # garbage past each clip must not matter
    for i, w in enumerate(bare):
        batch[i, : w.numel()] = w
    batch.requires_grad_(True)
    tokens, valid = enc(batch, torch.tensor(lengths))
    weights = torch.randn_like(tokens)
    (g_batch,) = torch.autograd.grad((tokens * weights).sum(), batch)
    for i, w in enumerate(bare):
        w = w.clone().requires_grad_(True)
        alone, alone_valid = enc(w[None], torch.tensor([w.numel()]))
        n = cfg.num_tokens(w.numel())
        assert alone.shape[1] == n and bool(alone_valid.all())
        assert valid[i].tolist() == [True] * n + [False] * (valid.shape[1] - n)
        torch.testing.assert_close(tokens[i, :n], alone[0], rtol=1e-10, atol=1e-10)
        assert bool((tokens[i, n:] == 0).all())
        (g_alone,) = torch.autograd.grad((alone[0] * weights[i, :n]).sum(), w)
        torch.testing.assert_close(g_batch[i, : w.numel()], g_alone, rtol=1e-9, atol=1e-12)
        assert bool((g_batch[i, w.numel() :] == 0).all()), "padding must get no gradient"


def test_audio_encoder_params_flops_and_errors():
    cfg = tiny_audio()
    enc = AudioEncoder(cfg)
    assert enc.num_params() == numel(enc)
    wave = torch.randn(1, 1000)
    flops = counted_flops(lambda: enc(wave, torch.tensor([1000])))
    assert enc.flops_per_item(1000) == pytest.approx(flops, rel=0.02)
    with pytest.raises(ValueError, match=r"lengths must be in \[1"):
        enc(wave, torch.tensor([0]))
    with pytest.raises(ValueError, match="max_seconds"):
        enc(torch.randn(1, 20000), torch.tensor([20000]))


def test_half_precision_model_keeps_a_float32_front_end():
    torch.manual_seed(0)
    enc = AudioEncoder(tiny_audio())
    wave, lengths = torch.randn(2, 800), torch.tensor([800, 500])
    ref, _ = enc(wave, lengths)
    enc = enc.to(torch.bfloat16)
    assert enc.frontend.mel.spectrogram.window.dtype == torch.float32 and enc.conv1.weight.dtype == torch.bfloat16
    out, _ = enc(wave.bfloat16(), lengths)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# ---------------------------------------------------------------- projector
def test_masked_pool_matches_adaptive_avg_pool_per_item():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 5, dtype=torch.float64, requires_grad=True)
    lengths = [9, 7, 3, 1]  # 3 and 1 < num_out: bins repeat tokens, as in PyTorch
    out = masked_adaptive_avg_pool(x, torch.tensor(lengths), 4)
    ref = torch.stack([F.adaptive_avg_pool1d(x[i, :n].T, 4).T for i, n in enumerate(lengths)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert bool((g[1, 7:] == 0).all())  # padding gets no gradient


def test_masked_pool_of_bf16_tokens_is_as_exact_as_bf16_allows():
    """A whole-model bf16 cast pools bf16 tokens: within bf16's rounding of the float32 result, not off by ~1."""
    torch.manual_seed(0)
    x = (3 + torch.randn(2, 200, 8)).bfloat16()
    lengths = torch.tensor([200, 150])
    out = masked_adaptive_avg_pool(x, lengths, 50)
    ref = masked_adaptive_avg_pool(x.float(), lengths, 50)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind,kw", [("linear", {}), ("mlp", {"hidden": 12}), ("mlp", {}), ("pool", {"num_tokens": 3})])
def test_projector_shapes_params_flops(kind, kw):
    proj = Projector(ProjectorConfig(kind=kind, **kw), in_dim=16, out_dim=8)
    x = torch.randn(2, 6, 16)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    y, y_valid = proj(x, valid)
    m = 3 if kind == "pool" else 6
    assert y.shape == (2, m, 8) and y_valid.shape == (2, m)
    assert y_valid.tolist() == ([[True] * 3] * 2 if kind == "pool" else valid.tolist())
    assert proj.num_params() == numel(proj)
    assert proj.flops_per_item(6) == counted_flops(lambda: proj(x[:1]))
    assert proj.num_tokens(6) == m


def test_encoder_flops_scale_with_clip_length():
    cfg = tiny_audio()
    enc = AudioEncoder(cfg)
    short, long = enc.flops_per_item(1000), enc.flops_per_item(4000)
    assert 3.5 < long / short < 5.0  # ~linear, plus the quadratic attention term
    assert enc.flops_per_item() == enc.flops_per_item(math.floor(cfg.max_seconds * cfg.sample_rate))
