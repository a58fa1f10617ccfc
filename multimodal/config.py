"""Typed configs of the multimodal package: image and audio encoders, projectors, and the whole model.

Pure dataclasses (no torch import), validated in ``__post_init__``; errors name the field and the
allowed values. Token-count arithmetic lives here too, so that the sequence builder can lay out
placeholder spans from the config alone, before any encoder runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moekit.core.checks import is_finite_number, is_int
from moekit.core.config import ModelConfig

PROJECTOR_KINDS = ("linear", "mlp", "pool")


def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}")


def as_tuple(cls: str, name: str, value: Any, example: str) -> tuple:
    """A list/tuple field as a tuple; a text or a number is refused (``tuple('en+f2')`` splits it into letters,
    ``tuple(0.5)`` is a TypeError), the message shows the list to write instead (``example``)."""
    if not isinstance(value, (list, tuple)):
        _fail(cls, name, value, f"must be a list, e.g. {name}={example}")
    return tuple(value)


def _positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(type(obj).__name__, name, value, "must be a positive integer")


def _check_transformer(obj: Any) -> None:
    """Shared checks of the optional small transformer (width, depth, n_heads, mlp_hidden, dropout)."""
    cls = type(obj).__name__
    if not isinstance(obj.depth, int) or isinstance(obj.depth, bool) or obj.depth < 0:
        _fail(cls, "depth", obj.depth, "must be an integer >= 0 (0 = no transformer layers)")
    if obj.width % obj.n_heads:
        _fail(cls, "width", obj.width, f"must be divisible by n_heads={obj.n_heads}")
    if obj.mlp_hidden is None:
        obj.mlp_hidden = 4 * obj.width
    _positive_ints(obj, ("mlp_hidden",))
    if not 0.0 <= obj.dropout < 1.0:
        _fail(cls, "dropout", obj.dropout, "must be in [0, 1)")


def conv_out_len(length: int, stride: int) -> int:
    """Output length of a 'same'-padded odd-kernel convolution: floor((L - 1) / stride) + 1."""
    return (length - 1) // stride + 1


@dataclass
class ImageEncoderConfig:
    """ViT-style encoder: a patch stem (or a torchvision backbone), learned positions, ``depth`` layers.

    ``backbone`` names any torchvision classification constructor (e.g. ``"resnet18"``); its weights come
    only from ``weights_path`` on disk (safetensors or a ``torch.save``'d state dict), never a download;
    ``weights_path=None`` keeps the random init. ``backbone_node`` is the feature node whose output becomes
    the tokens (default per family, e.g. ``layer4`` for ResNets); 4-D features must be [N, C, h, w].
    """

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    width: int = 64
    depth: int = 1
    n_heads: int = 4
    mlp_hidden: int | None = None  # None = 4 * width
    dropout: float = 0.0
    mean: tuple[float, ...] = (0.1307,)  # per-channel normalisation (MNIST statistics by default)
    std: tuple[float, ...] = (0.3081,)
    augment: bool = True  # light random affine on training images only
    backbone: str | None = None
    backbone_node: str | None = None
    weights_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = as_tuple("ImageEncoderConfig", name, getattr(self, name), "[0.5]")
            if not all(is_finite_number(v) for v in value):
                _fail("ImageEncoderConfig", name, value, "entries must be finite numbers, one per channel")
            setattr(self, name, value)
        _positive_ints(self, ("image_size", "in_channels", "patch_size", "width", "n_heads"))
        _check_transformer(self)
        if self.backbone is None:
            if self.image_size % self.patch_size:
                _fail("ImageEncoderConfig", "patch_size", self.patch_size, f"must divide image_size={self.image_size}")
            for name in ("backbone_node", "weights_path"):
                if getattr(self, name) is not None:
                    _fail("ImageEncoderConfig", name, getattr(self, name), "needs backbone to be set")
        elif not isinstance(self.backbone, str) or not self.backbone:
            _fail("ImageEncoderConfig", "backbone", self.backbone, "must be a torchvision model name or None")
        if self.weights_path is not None and not Path(self.weights_path).is_file():
            raise FileNotFoundError(
                f"ImageEncoderConfig.weights_path={self.weights_path!r} does not exist; give the path of a "
                "local .safetensors or .pt state dict (weights are never downloaded), or None for random init"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.in_channels):
                _fail("ImageEncoderConfig", name, value, f"needs 1 or in_channels={self.in_channels} entries")
        if any(s <= 0 for s in self.std):
            _fail("ImageEncoderConfig", "std", self.std, "entries must be > 0")

    @property
    def num_patches(self) -> int:
        """Tokens of the patch stem (backbones report theirs after a probe forward)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AudioEncoderConfig:
    """Whisper-style encoder: log-mel front-end, two strided GELU convolutions, ``depth`` layers.

    The STFT is centred with zero (``constant``) padding rather than Whisper's reflection so that a
    zero-padded clip and the bare clip give identical valid frames (see ``moekit.multimodal.audio``).
    """

    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    width: int = 64
    kernel_size: int = 3
    strides: tuple[int, int] = (2, 2)
    depth: int = 1
    n_heads: int = 4
    mlp_hidden: int | None = None  # None = 4 * width
    dropout: float = 0.0
    max_seconds: float = 2.0  # longest clip accepted; also the length FLOP reports assume

    def __post_init__(self) -> None:
        self.strides = as_tuple("AudioEncoderConfig", "strides", self.strides, "[2, 2]")
        _positive_ints(self, ("sample_rate", "n_mels", "n_fft", "hop_length", "width", "kernel_size", "n_heads"))
        _check_transformer(self)
        if self.kernel_size % 2 == 0:
            _fail("AudioEncoderConfig", "kernel_size", self.kernel_size, "must be odd ('same' padding)")
        if len(self.strides) != 2 or any(not is_int(s) or s < 1 for s in self.strides):
            _fail("AudioEncoderConfig", "strides", self.strides, "must be two positive integers (conv1, conv2)")
        if self.width % 2:
            _fail("AudioEncoderConfig", "width", self.width, "must be even (sinusoidal positions)")
        if self.hop_length > self.n_fft:
            _fail("AudioEncoderConfig", "hop_length", self.hop_length, f"must be <= n_fft={self.n_fft}")
        if not self.max_seconds > 0:
            _fail("AudioEncoderConfig", "max_seconds", self.max_seconds, "must be > 0")

    @property
    def max_samples(self) -> int:
        return math.floor(self.max_seconds * self.sample_rate)

    def num_frames(self, num_samples: int) -> int:
        """Mel frames of an unpadded clip (centred STFT)."""
        return num_samples // self.hop_length + 1

    def num_tokens(self, num_samples: int) -> int:
        """Encoder tokens of an unpadded clip of ``num_samples`` samples."""
        return conv_out_len(conv_out_len(self.num_frames(num_samples), self.strides[0]), self.strides[1])


@dataclass
class ProjectorConfig:
    """Encoder width -> d_model. ``linear``, 2-layer ``mlp`` (GELU), or ``pool``: adaptive average pooling
    of the token axis down to ``num_tokens`` tokens, then a linear map."""

    kind: str = "mlp"
    hidden: int | None = None  # mlp hidden width; None = d_model
    num_tokens: int | None = None  # pool only

    def __post_init__(self) -> None:
        if self.kind not in PROJECTOR_KINDS:
            _fail("ProjectorConfig", "kind", self.kind, f"allowed: {list(PROJECTOR_KINDS)}")
        if self.kind == "pool":
            _positive_ints(self, ("num_tokens",))
        elif self.num_tokens is not None:
            _fail("ProjectorConfig", "num_tokens", self.num_tokens, "only kind='pool' takes num_tokens; use None")
        if self.hidden is not None:
            if self.kind != "mlp":
                _fail("ProjectorConfig", "hidden", self.hidden, "only kind='mlp' takes hidden; use None")
            _positive_ints(self, ("hidden",))

    def out_tokens(self, in_tokens: int) -> int:
        return self.num_tokens if self.kind == "pool" else in_tokens


_NESTED = {
    "lm": ModelConfig,
    "image": ImageEncoderConfig,
    "audio": AudioEncoderConfig,
    "image_projector": ProjectorConfig,
    "audio_projector": ProjectorConfig,
}


@dataclass
class MultimodalConfig:
    """A core decoder (``lm``) plus optional image and audio encoders, each with its projector.

    ``image=None`` / ``audio=None`` drops that modality. ``bidirectional_media`` lets the tokens of one
    media span attend to each other both ways (text stays causal).
    """

    lm: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=272, max_seq_len=256))
    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    image_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    audio_projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    bidirectional_media: bool = False

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value) if cls is ModelConfig else cls(**value))
            elif value is not None and not isinstance(value, cls):
                _fail("MultimodalConfig", name, value, f"must be a {cls.__name__} (or a dict of its fields)")
        if self.lm is None:
            _fail("MultimodalConfig", "lm", None, "must be a ModelConfig")
        if self.image is None and self.audio is None:
            _fail("MultimodalConfig", "image", None, "image and audio cannot both be None")
        if not isinstance(self.bidirectional_media, bool):
            _fail("MultimodalConfig", "bidirectional_media", self.bidirectional_media, "must be a bool")

    @property
    def d_model(self) -> int:
        return self.lm.d_model

    def num_image_tokens(self, encoder_tokens: int | None = None) -> int:
        """Placeholders per image. ``encoder_tokens`` overrides the patch count (backbone stems)."""
        if self.image is None:
            raise ValueError("MultimodalConfig.image is None: this model takes no images")
        n = self.image.num_patches if encoder_tokens is None else encoder_tokens
        return self.image_projector.out_tokens(n)

    def num_audio_tokens(self, num_samples: int) -> int:
        """Placeholders for a clip of ``num_samples`` samples at ``audio.sample_rate``."""
        if self.audio is None:
            raise ValueError("MultimodalConfig.audio is None: this model takes no audio")
        return self.audio_projector.out_tokens(self.audio.num_tokens(num_samples))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultimodalConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MultimodalConfig got unknown fields {unknown}; allowed fields are {sorted(known)}")
        return cls(**d)
