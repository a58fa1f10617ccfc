"""Sequence builder: samples of text + media -> one right-padded batch with placeholder spans.

Shapes: ``B`` batch rows, ``T`` tokens (padded), ``D`` d_model, ``N`` media tokens spliced in (all rows),
``Ni``/``Na`` images/audio clips in the batch, ``C``/``S`` image channels/side, ``Ls`` audio samples.

Layout of one media item: ``IMAGE_START, IMAGE x n, IMAGE_END`` (audio likewise), where ``n`` comes from
a ``TokenLayout`` (the encoder + projector token count). Markers are ordinary text tokens (modality 0);
the placeholders carry modality 1 (image) or 2 (audio) and are overwritten by ``splice`` with the
projected encoder outputs, in order of appearance (row-major).

Labels are aligned with positions (``labels[t]`` is the target after token ``t``): ``labels[t] =
input_ids[t+1]`` when token ``t+1`` is a target text token, else -100. So placeholders, markers, prompts
(``TextPart(target=False)``), BOS and padding are never targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from moekit.core.model import IGNORE_INDEX
from moekit.core.tokenizer import ByteTokenizer
from moekit.multimodal.audio import check_sample_rate, check_wave, resample, to_mono
from moekit.multimodal.config import MultimodalConfig

MODALITY_TEXT, MODALITY_IMAGE, MODALITY_AUDIO = 0, 1, 2


@dataclass(frozen=True)
class TextPart:
    """Text as a string (encoded by the batch's tokenizer) or ready ids ``[n]``; ``eos`` appends EOS."""

    text: str | Tensor
    target: bool = False
    eos: bool = False


@dataclass(frozen=True)
class ImagePart:
    """One image ``[C, S, S]``: float, already normalised (``build_image_transform``), or uint8 0..255, which
    the image encoder scales to [0, 1] and normalises with its config's mean/std. Channel count and size
    are checked against the encoder when the batch is encoded."""

    pixels: Tensor  # [C, S, S] float (normalised) or uint8

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, Tensor):
            raise TypeError(f"ImagePart.pixels must be a Tensor [C, S, S]; got {type(p).__name__}")
        if not (p.is_floating_point() or p.dtype == torch.uint8):
            raise ValueError(
                f"ImagePart.pixels must be float (normalised) or uint8 (0..255, normalised by the encoder); "
                f"got dtype {p.dtype}"
            )
        if p.dim() != 3:
            raise ValueError(f"ImagePart.pixels must be one image [C, S, S]; got shape {tuple(p.shape)}")


@dataclass(frozen=True)
class AudioPart:
    """One clip: float ``[Ls]``, or ``[C, Ls]`` channels first (downmixed to mono by the mean over channels
    when the batch is built); resampled to the layout's rate. Checked here, at construction."""

    wave: Tensor  # [Ls] or [C, Ls] float
    sample_rate: int

    def __post_init__(self) -> None:
        check_wave(self.wave, "AudioPart.wave")
        check_sample_rate(self.sample_rate, "AudioPart.sample_rate")


Part = TextPart | ImagePart | AudioPart


@dataclass(frozen=True)
class Sample:
    parts: tuple[Part, ...]
    task: str = ""


@dataclass(frozen=True)
class TokenLayout:
    """How many placeholders each media item takes; ``None`` = that modality is not accepted."""

    image_tokens: int | None
    audio_tokens: Callable[[int], int] | None  # clip samples (at audio_sample_rate) -> tokens
    audio_sample_rate: int | None

    @classmethod
    def from_config(cls, cfg: MultimodalConfig, image_encoder_tokens: int | None = None) -> TokenLayout:
        """``image_encoder_tokens`` overrides the patch count (backbone stems know theirs after a probe)."""
        return cls(
            image_tokens=None if cfg.image is None else cfg.num_image_tokens(image_encoder_tokens),
            audio_tokens=None if cfg.audio is None else cfg.num_audio_tokens,
            audio_sample_rate=None if cfg.audio is None else cfg.audio.sample_rate,
        )


def _span(start: int, placeholder: int, end: int, n: int, modality: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((n + 2,), placeholder, dtype=torch.long)
    ids[0], ids[-1] = start, end
    mod = torch.full((n + 2,), modality, dtype=torch.long)
    mod[0] = mod[-1] = MODALITY_TEXT
    return ids, mod


def _lay_out_part(part: Part, tok: ByteTokenizer, layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One part -> (ids [n], is_target [n], modality [n], media tensor or None)."""
    if isinstance(part, TextPart):
        ids = tok.encode(part.text) if isinstance(part.text, str) else part.text.to(torch.long).reshape(-1)
        if bool(((ids >= tok.IMAGE) & (ids <= tok.AUDIO_END)).any()):
            raise ValueError("build_batch: a TextPart contains media placeholder/marker ids (259..264)")
        if bool(((ids == tok.PAD) | (ids == tok.BOS)).any()):  # a PAD would become a target label
            raise ValueError(f"build_batch: a TextPart contains PAD ({tok.PAD}) or BOS ({tok.BOS}) ids")
        if part.eos:
            ids = torch.cat([ids, torch.tensor([tok.EOS])])
        return ids, torch.full(ids.shape, part.target, dtype=torch.bool), torch.zeros_like(ids), None
    if isinstance(part, ImagePart):
        if layout.image_tokens is None:
            raise ValueError("build_batch: a sample has an image but the layout takes no images")
        ids, mod = _span(tok.IMAGE_START, tok.IMAGE, tok.IMAGE_END, layout.image_tokens, MODALITY_IMAGE)
        return ids, torch.zeros(ids.shape, dtype=torch.bool), mod, part.pixels
    if isinstance(part, AudioPart):
        if layout.audio_tokens is None:
            raise ValueError("build_batch: a sample has audio but the layout takes no audio")
        wave = resample(to_mono(part.wave, "AudioPart.wave"), part.sample_rate, layout.audio_sample_rate)
        n = layout.audio_tokens(wave.numel())
        ids, mod = _span(tok.AUDIO_START, tok.AUDIO, tok.AUDIO_END, n, MODALITY_AUDIO)
        return ids, torch.zeros(ids.shape, dtype=torch.bool), mod, wave
    raise TypeError(f"build_batch: a part of type {type(part).__name__}; allowed: TextPart, ImagePart, AudioPart")


def build_batch(
    samples: Sequence[Sample],
    tokenizer: ByteTokenizer,
    layout: TokenLayout,
    *,
    add_bos: bool = True,
    bidirectional_media: bool = False,
    pad_to_multiple_of: int = 1,
    max_len: int | None = None,
) -> dict[str, Tensor]:
    """Lay out ``samples`` as one batch.

    Returns ``input_ids``, ``labels``, ``attention_mask`` (long, 1 = real), ``modality_ids`` and
    ``position_ids``, all ``[B, T]``; ``images [Ni, C, S, S]`` when any sample has an image;
    ``audio [Na, Ls]`` (right zero-padded) and ``audio_lengths [Na]`` when any has audio; and
    ``attention_mask_4d [B, 1, T, T]`` (bool) when ``bidirectional_media``.
    """
    if not samples:
        raise ValueError("build_batch: samples is empty")
    if pad_to_multiple_of < 1:
        raise ValueError(f"build_batch: pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
    tok = tokenizer
    bos = [(torch.tensor([tok.BOS]), torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long), None)]
    rows_ids, rows_tgt, rows_mod, lengths = [], [], [], []
    images: list[Tensor] = []
    waves: list[Tensor] = []
    for sample in samples:
        laid = [_lay_out_part(p, tok, layout) for p in sample.parts]
        for part, (_, _, _, media) in zip(sample.parts, laid):
            if isinstance(part, ImagePart):
                images.append(media)
            elif isinstance(part, AudioPart):
                waves.append(media)
        parts = (bos if add_bos else []) + laid
        rows_ids += [p[0] for p in parts]
        rows_tgt += [p[1] for p in parts]
        rows_mod += [p[2] for p in parts]
        lengths.append(sum(p[0].numel() for p in parts))

    lengths_b = torch.tensor(lengths)
    longest = int(lengths_b.max())
    if max_len is not None and longest > max_len:
        raise ValueError(f"build_batch: longest sample needs {longest} tokens > max_len={max_len}")
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if max_len is not None:
        T = min(T, max_len)  # a sample that fits never fails for the rounding
    valid_bt = torch.arange(T)[None, :] < lengths_b[:, None]  # [B, T]
    # Boolean assignment fills row-major, which is the order of the concatenated parts.
    input_ids = torch.full((len(samples), T), tok.PAD, dtype=torch.long)
    input_ids[valid_bt] = torch.cat(rows_ids)
    target_bt = torch.zeros_like(valid_bt)
    target_bt[valid_bt] = torch.cat(rows_tgt)
    modality_ids = torch.full_like(input_ids, MODALITY_TEXT)
    modality_ids[valid_bt] = torch.cat(rows_mod)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(target_bt[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    attention_mask = valid_bt.long()
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "modality_ids": modality_ids,
        "position_ids": torch.arange(T).expand(len(samples), T).clone(),
    }
    if images:
        if len({tuple(im.shape) for im in images}) != 1:
            raise ValueError(f"build_batch: images differ in shape {sorted({tuple(im.shape) for im in images})}")
        if len({im.dtype for im in images}) != 1:  # stacking would promote uint8 to float without scaling
            raise ValueError(
                f"build_batch: images differ in dtype {sorted(str(im.dtype) for im in images)}; "
                "pass all float (normalised) or all uint8"
            )
        batch["images"] = torch.stack(images)
    if waves:
        batch["audio"] = pad_sequence(waves, batch_first=True)  # zeros past each clip
        batch["audio_lengths"] = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    if bidirectional_media:
        batch["attention_mask_4d"] = media_attention_mask(modality_ids, attention_mask, bidirectional=True)
    return batch


def media_attention_mask(modality_ids_bt: Tensor, attention_mask_bt: Tensor, bidirectional: bool) -> Tensor:
    """bool ``[B, 1, T, T]`` (True = may attend): causal, plus (if ``bidirectional``) all pairs inside one
    media span; padded keys masked. Every query sees itself, so padding rows never softmax over nothing.

    A span is a maximal run of equal non-text modality ids; the START/END markers (text) separate
    neighbouring media of the same modality.
    """
    B, T = modality_ids_bt.shape
    pos = torch.arange(T, device=modality_ids_bt.device)
    allowed = (pos[None, :] <= pos[:, None]).expand(B, T, T)  # [B, Tq, Tk] causal
    if bidirectional:
        is_media = modality_ids_bt != MODALITY_TEXT
        prev = torch.nn.functional.pad(modality_ids_bt, (1, 0), value=MODALITY_TEXT)[:, :-1]
        starts = is_media & (modality_ids_bt != prev)
        span_bt = torch.cumsum(starts.long(), dim=1) * is_media  # 0 = not in a span
        allowed = allowed | ((span_bt[:, :, None] == span_bt[:, None, :]) & is_media[:, :, None])
    allowed = allowed & attention_mask_bt.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=allowed.device)
    return allowed[:, None]


def splice(embeds_btd: Tensor, media_nd: Tensor, positions_bt: Tensor) -> Tensor:
    """Write ``media_nd`` rows into ``embeds_btd`` at the True entries of ``positions_bt``, row-major.

    Differentiable in both inputs; positions left False keep their embeddings. The counts must match
    exactly (checked: a mismatch means the layout and the encoders disagree).
    """
    if positions_bt.dtype != torch.bool or positions_bt.shape != embeds_btd.shape[:2]:
        raise ValueError(
            f"splice: positions must be bool {tuple(embeds_btd.shape[:2])}, got {positions_bt.dtype} "
            f"{tuple(positions_bt.shape)}"
        )
    n = int(positions_bt.sum())
    if media_nd.dim() != 2 or media_nd.shape[0] != n or media_nd.shape[1] != embeds_btd.shape[2]:
        raise ValueError(
            f"splice: {n} placeholder positions of width {embeds_btd.shape[2]} but media has shape "
            f"{tuple(media_nd.shape)}"
        )
    return embeds_btd.masked_scatter(positions_bt[..., None], media_nd.to(embeds_btd.dtype))
