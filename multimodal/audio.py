"""Audio encoder: Whisper-style log-mel front-end, two strided GELU convolutions, optional transformer.

Shapes: ``N`` clips, ``Ls`` samples (padded), ``Fm`` mel bins, ``Lf`` frames, ``L1``/``L`` frames after
conv1/conv2 (= tokens), ``W`` encoder width.

Padding invariance is the contract: a clip zero-padded on the right inside a batch gives exactly the
tokens of the bare clip. Every step that could leak padding is made local to the valid region:
- the STFT is centred with zero padding, so the bare clip's implicit right padding equals our padding;
  valid frames are ``len // hop + 1``;
- Whisper's dynamic-range clamp ``max(x, x.max() - 8)`` takes the max per clip over valid frames only;
- padded frames are set to exactly zero before each convolution (that is what a 'same'-padded convolution
  sees past the end of the bare clip), and valid lengths follow the conv strides;
- the transformer masks padded keys; padded output tokens are zeroed and flagged in the returned mask.

FLOPs per clip count the mel filterbank matmul, both convolutions and the transformer; the FFT is left
out (FlopCounterMode does not count it either; it is ~0.2% of a small encoder).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from moekit.multimodal.blocks import LN_EPS, EncoderLayer, layer_flops, layer_params, sinusoids
from moekit.multimodal.config import AudioEncoderConfig, conv_out_len

# A "[C, Ls]" wave with more channels than this is almost surely a samples-first [Ls, C] array.
MAX_AUDIO_CHANNELS = 8


def check_sample_rate(rate: int, name: str = "sample_rate") -> None:
    """Refuse a sample rate that is not an int > 0 (torchaudio would fail deep inside resampling)."""
    if not isinstance(rate, numbers.Integral) or isinstance(rate, bool) or rate <= 0:
        raise ValueError(f"{name}={rate!r} is invalid: must be an int > 0 (samples per second)")


def check_wave(wave: Tensor, name: str = "wave") -> None:
    """Refuse a clip that is not float ``[Ls]`` (mono) or ``[C, Ls]`` (channels first), or that is empty."""
    if not isinstance(wave, Tensor):
        raise TypeError(f"{name} must be a float Tensor [Ls] or [C, Ls]; got {type(wave).__name__}")
    if not wave.is_floating_point():
        raise ValueError(
            f"{name} must be a float Tensor of samples in [-1, 1]; got dtype {wave.dtype} "
            "(divide int16 PCM by 32768 first)"
        )
    if wave.dim() not in (1, 2) or (wave.dim() == 2 and not 1 <= wave.shape[0] <= MAX_AUDIO_CHANNELS):
        raise ValueError(
            f"{name} must be [Ls] (mono) or [C, Ls] channels first with 1 <= C <= {MAX_AUDIO_CHANNELS} "
            f"(downmixed to mono); got shape {tuple(wave.shape)} (transpose a samples-first [Ls, C] array)"
        )
    if wave.shape[-1] == 0:
        raise ValueError(f"{name} has shape {tuple(wave.shape)}: no samples")


def to_mono(wave: Tensor, name: str = "wave") -> Tensor:
    """One clip as ``[Ls]``: mono as is; ``[C, Ls]`` (``torchaudio.load``'s layout) downmixed by the mean over
    channels, as Whisper's and librosa's loaders do. Checked by :func:`check_wave`."""
    check_wave(wave, name)
    if wave.dim() == 1:
        return wave
    return wave[0] if wave.shape[0] == 1 else wave.mean(dim=0)


def resample(wave: Tensor, orig_rate: int, target_rate: int) -> Tensor:
    """Resample along the last axis with torchaudio's windowed sinc; identity when rates match."""
    check_sample_rate(orig_rate, "orig_rate")
    check_sample_rate(target_rate, "target_rate")
    if orig_rate == target_rate:
        return wave
    return torchaudio.functional.resample(wave, orig_rate, target_rate)


def lengths_to_mask(lengths_n: Tensor, max_len: int) -> Tensor:
    """bool [N, max_len], True where position < length."""
    return torch.arange(max_len, device=lengths_n.device)[None, :] < lengths_n[:, None]


def conv_lengths(lengths_n: Tensor, stride: int) -> Tensor:
    """Tensor form of ``conv_out_len`` for odd 'same'-padded kernels."""
    return torch.div(lengths_n - 1, stride, rounding_mode="floor") + 1


class LogMel(nn.Module):
    """waves ``[N, Ls]`` + lengths ``[N]`` -> Whisper-normalised log-mel ``[N, Fm, Lf]`` and frames ``[N]``."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
            center=True,
            pad_mode="constant",  # zeros: the bare clip's edge padding equals a batch's right padding
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LogMel:
        super()._apply(fn, recurse)
        # A half-precision cast of the whole model stops here: FFTs reject bfloat16 on CPU and power
        # spectra span ~16 decades. Device moves and float64 casts pass through.
        for module in self.mel.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                    module._buffers[name] = buf.float()
        return self

    def frames(self, lengths_n: Tensor) -> Tensor:
        return torch.div(lengths_n, self.cfg.hop_length, rounding_mode="floor") + 1

    def forward(self, wave_ns: Tensor, lengths_n: Tensor) -> tuple[Tensor, Tensor]:
        window = self.mel.spectrogram.window
        wave_ns = wave_ns.to(window.dtype) * lengths_to_mask(lengths_n, wave_ns.shape[1]).to(window.dtype)
        # Power spectra span ~16 decades before the log: keep them out of reduced-precision autocast.
        with torch.autocast(device_type=wave_ns.device.type, enabled=False):
            spec = self.mel(wave_ns).clamp(min=1e-10).log10()  # [N, Fm, Lf]
        frames_n = self.frames(lengths_n)
        valid = lengths_to_mask(frames_n, spec.shape[-1])[:, None, :]  # [N, 1, Lf]
        peak_n = spec.masked_fill(~valid, float("-inf")).amax(dim=(1, 2))  # per clip, valid frames only
        spec = torch.maximum(spec, (peak_n - 8.0)[:, None, None])
        return ((spec + 4.0) / 4.0).masked_fill(~valid, 0.0), frames_n


def audio_encoder_params(cfg: AudioEncoderConfig) -> int:
    W, k = cfg.width, cfg.kernel_size
    convs = (cfg.n_mels * k * W + W) + (W * k * W + W)
    return convs + cfg.depth * layer_params(W, cfg.mlp_hidden) + 2 * W


def audio_encoder_flops(cfg: AudioEncoderConfig, num_samples: int | None = None) -> int:
    """Forward FLOPs for one unpadded clip of ``num_samples`` samples (default ``cfg.max_samples``)."""
    n = cfg.max_samples if num_samples is None else num_samples
    W, k = cfg.width, cfg.kernel_size
    frames = cfg.num_frames(n)
    l1 = conv_out_len(frames, cfg.strides[0])
    l2 = conv_out_len(l1, cfg.strides[1])
    mel = 2 * frames * (cfg.n_fft // 2 + 1) * cfg.n_mels
    convs = 2 * l1 * cfg.n_mels * k * W + 2 * l2 * W * k * W
    return mel + convs + cfg.depth * layer_flops(W, cfg.mlp_hidden, l2)


class AudioEncoder(nn.Module):
    """waves ``[N, Ls]`` at ``cfg.sample_rate`` + lengths ``[N]`` -> tokens ``[N, L, W]``, valid mask ``[N, L]``."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W, k = cfg.width, cfg.kernel_size
        self.frontend = LogMel(cfg)
        self.conv1 = nn.Conv1d(cfg.n_mels, W, k, stride=cfg.strides[0], padding=k // 2)
        self.conv2 = nn.Conv1d(W, W, k, stride=cfg.strides[1], padding=k // 2)
        self.layers = nn.ModuleList(EncoderLayer(W, cfg.n_heads, cfg.mlp_hidden, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(W, eps=LN_EPS)

    @property
    def out_dim(self) -> int:
        return self.cfg.width

    def _check(self, wave_ns: Tensor, lengths_n: Tensor) -> None:
        if wave_ns.dim() != 2 or lengths_n.shape != wave_ns.shape[:1]:
            raise ValueError(
                f"AudioEncoder expects wave [N, Ls] and lengths [N]; got {tuple(wave_ns.shape)} and "
                f"{tuple(lengths_n.shape)} (one row per mono clip: downmix [C, Ls] clips with to_mono)"
            )
        if wave_ns.shape[0] == 0:
            raise ValueError("AudioEncoder: wave has N=0 clips; need at least one")
        if not wave_ns.is_floating_point():
            raise ValueError(f"AudioEncoder: wave must be float samples in [-1, 1]; got dtype {wave_ns.dtype}")
        if lengths_n.dtype != torch.long:
            raise ValueError(f"AudioEncoder: lengths must be torch.long, got {lengths_n.dtype}")
        lo, hi = int(lengths_n.min()), int(lengths_n.max())
        if lo < 1 or hi > wave_ns.shape[1] or hi > self.cfg.max_samples:
            raise ValueError(
                f"AudioEncoder: lengths must be in [1, min(Ls={wave_ns.shape[1]}, max_samples="
                f"{self.cfg.max_samples})]; got [{lo}, {hi}] (raise AudioEncoderConfig.max_seconds for longer clips)"
            )

    def forward(self, wave_ns: Tensor, lengths_n: Tensor) -> tuple[Tensor, Tensor]:
        self._check(wave_ns, lengths_n)
        x, len_n = self.frontend(wave_ns, lengths_n)  # [N, Fm, Lf], zero past each clip's frames
        x = x.to(self.conv1.weight.dtype)
        for conv in (self.conv1, self.conv2):
            x = F.gelu(conv(x))  # [N, W, L_i]
            len_n = conv_lengths(len_n, conv.stride[0])
            x = x * lengths_to_mask(len_n, x.shape[-1])[:, None, :].to(x.dtype)  # padding must not reach the next conv
        x_nlw = x.transpose(1, 2)  # [N, L, W]
        valid_nl = lengths_to_mask(len_n, x_nlw.shape[1])
        x_nlw = x_nlw + sinusoids(x_nlw.shape[1], x_nlw.shape[2], x_nlw.device, x_nlw.dtype)
        for layer in self.layers:
            x_nlw = layer(x_nlw, valid_nl)
        return self.norm(x_nlw) * valid_nl[..., None].to(x_nlw.dtype), valid_nl

    def num_tokens(self, num_samples: int) -> int:
        return self.cfg.num_tokens(num_samples)

    def num_params(self) -> int:
        return audio_encoder_params(self.cfg)

    def flops_per_item(self, num_samples: int | None = None) -> int:
        return audio_encoder_flops(self.cfg, num_samples)
