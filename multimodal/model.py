"""MultimodalLM: image/audio encoders + projectors around a core ``Transformer`` (dense or MoE).

Shapes: ``B`` batch, ``T`` tokens, ``D`` d_model, ``Ni``/``Na`` images/clips, ``L`` encoder tokens,
``N`` spliced media tokens.

``forward(batch)`` takes the dict from ``build_batch``: it embeds the text ids, encodes and projects
the media, splices them over the placeholders and runs the core with ``group_ids = modality_ids`` (so
MoE routing telemetry splits by modality) and ``token_mask = attention_mask`` (padding is not routed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from moekit.core.accounting import count_params, flops_per_token
from moekit.core.inputs import check_token_ids
from moekit.core.model import ModelOutput, Transformer
from moekit.core.tokenizer import ByteTokenizer
from moekit.multimodal.audio import AudioEncoder
from moekit.multimodal.config import MultimodalConfig
from moekit.multimodal.image import ImageEncoder
from moekit.multimodal.projector import Projector
from moekit.multimodal.sequence import Sample, TokenLayout, build_batch, media_attention_mask, splice


@dataclass(frozen=True)
class MultimodalReport:
    """Parameters by component and forward FLOPs per image, per audio clip and per LM token."""

    params: dict[str, int]
    flops: dict[str, int]
    audio_seconds: float | None
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MultimodalLM(nn.Module):
    def __init__(self, cfg: MultimodalConfig, lm: Transformer | None = None) -> None:
        super().__init__()
        if cfg.lm.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(
                f"MultimodalConfig.lm.vocab_size={cfg.lm.vocab_size} is invalid: must be >= "
                f"{ByteTokenizer.vocab_size} (ByteTokenizer ids, placeholders included)"
            )
        if lm is not None and lm.cfg != cfg.lm:
            raise ValueError("MultimodalLM: the given lm's config differs from MultimodalConfig.lm")
        self.cfg = cfg
        self.lm = lm if lm is not None else Transformer(cfg.lm)
        D = cfg.lm.d_model
        self.image_encoder = ImageEncoder(cfg.image) if cfg.image is not None else None
        self.image_projector = (
            Projector(cfg.image_projector, self.image_encoder.out_dim, D) if self.image_encoder is not None else None
        )
        self.audio_encoder = AudioEncoder(cfg.audio) if cfg.audio is not None else None
        self.audio_projector = (
            Projector(cfg.audio_projector, self.audio_encoder.out_dim, D) if self.audio_encoder is not None else None
        )
        image_tokens = self.image_encoder.num_tokens if self.image_encoder is not None else None
        self.layout = TokenLayout.from_config(cfg, image_encoder_tokens=image_tokens)

    # ---- batches -------------------------------------------------------------------------------
    def build_batch(
        self, samples: Sequence[Sample], tokenizer: ByteTokenizer | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        """``build_batch`` with this model's token layout and ``max_len = lm.max_seq_len``."""
        kwargs.setdefault("max_len", self.cfg.lm.max_seq_len)
        return build_batch(samples, tokenizer or ByteTokenizer(), self.layout, **kwargs)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """``inputs_embeds [B, T, D]``: token embeddings with media tokens spliced over the placeholders."""
        ids_bt = batch["input_ids"]
        check_token_ids(ids_bt, self.cfg.lm.vocab_size, "batch['input_ids']")
        x_btd = self.lm.embed(ids_bt)
        media = (
            ("images", ByteTokenizer.IMAGE, self.image_encoder, self.image_projector),
            ("audio", ByteTokenizer.AUDIO, self.audio_encoder, self.audio_projector),
        )
        for key, placeholder, encoder, projector in media:
            positions_bt = ids_bt == placeholder
            if key not in batch:
                if bool(positions_bt.any()):
                    raise ValueError(f"MultimodalLM: batch has {key} placeholders but no '{key}' tensor")
                continue
            if encoder is None:
                raise ValueError(f"MultimodalLM: batch has '{key}' but MultimodalConfig.{key.rstrip('s')} is None")
            if key == "images":
                images = batch["images"]  # uint8 goes to the encoder as is: it scales and normalises
                images = images.to(x_btd.dtype) if images.is_floating_point() else images
                tokens_nld, valid_nl = projector(encoder(images))
            else:
                tokens_nld, valid_nl = encoder(batch["audio"], batch["audio_lengths"])  # front-end casts
                tokens_nld, valid_nl = projector(tokens_nld, valid_nl)
            x_btd = splice(x_btd, tokens_nld[valid_nl], positions_bt)  # [N, D] in row-major order
        return x_btd

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        """Core ``ModelOutput`` (``loss`` over text targets only; add ``aux_loss`` for MoE cores)."""
        needed = ["input_ids", "attention_mask", "modality_ids"] + (["audio_lengths"] if "audio" in batch else [])
        missing = [k for k in needed if k not in batch]
        if missing:  # without modality_ids media tokens would route and report as text (group 0)
            raise ValueError(
                f"MultimodalLM: the batch has no {missing} (needs {needed}, as moekit.multimodal.build_batch "
                f"makes them; it has {sorted(batch)})"
            )
        mask = batch.get("attention_mask_4d")
        if mask is None and self.cfg.bidirectional_media:
            mask = media_attention_mask(batch["modality_ids"], batch["attention_mask"], bidirectional=True)
        if mask is None:
            mask = batch["attention_mask"]
        return self.lm(
            inputs_embeds=self.embed(batch),
            attention_mask=mask,
            position_ids=batch.get("position_ids"),
            labels=batch.get("labels"),
            group_ids=batch.get("modality_ids"),
            token_mask=batch["attention_mask"].bool(),
        )

    # ---- accounting ----------------------------------------------------------------------------
    def image_item_flops(self) -> int:
        """Forward FLOPs of one image through encoder + projector."""
        enc = self.image_encoder
        return enc.flops_per_item() + self.image_projector.flops_per_item(enc.num_tokens)

    def audio_item_flops(self, num_samples: int) -> int:
        """Forward FLOPs of one unpadded clip of ``num_samples`` samples through encoder + projector."""
        enc = self.audio_encoder
        return enc.flops_per_item(num_samples) + self.audio_projector.flops_per_item(enc.num_tokens(num_samples))

    def report(self, seq_len: int | None = None, audio_seconds: float | None = None) -> MultimodalReport:
        """Parameters (encoders counted in full: they run for every item) and forward FLOPs per item.

        Audio FLOPs assume a clip of ``audio_seconds`` (default ``audio.max_seconds``); LM FLOPs per token
        assume context ``seq_len`` (default ``lm.max_seq_len``) and count active experts only.
        """
        lm_params = count_params(self.cfg.lm)
        params = {"lm_total": lm_params.total, "lm_active": lm_params.active}
        flops = {"lm_per_token": flops_per_token(self.cfg.lm, seq_len)}
        media = 0
        if self.image_encoder is not None:
            params["image_encoder"] = self.image_encoder.num_params()
            params["image_projector"] = self.image_projector.num_params()
            media += params["image_encoder"] + params["image_projector"]
            flops["image_per_item"] = self.image_item_flops()
        if self.audio_encoder is not None:
            a = self.cfg.audio
            seconds = a.max_seconds if audio_seconds is None else audio_seconds
            params["audio_encoder"] = self.audio_encoder.num_params()
            params["audio_projector"] = self.audio_projector.num_params()
            media += params["audio_encoder"] + params["audio_projector"]
            flops["audio_per_item"] = self.audio_item_flops(max(1, int(seconds * a.sample_rate)))
        params["total"] = lm_params.total + media
        params["active"] = lm_params.active + media
        return MultimodalReport(
            params=params,
            flops=flops,
            audio_seconds=None if self.audio_encoder is None else seconds,
            seq_len=self.cfg.lm.max_seq_len if seq_len is None else seq_len,
        )

    def batch_flops(self, batch: dict[str, Tensor]) -> dict[str, int]:
        """Forward FLOPs of ``batch`` without padding waste: each image, each clip at its own length, and
        the LM on real tokens at the batch's context length ``T`` (padding rows/frames excluded)."""
        B, T = batch["input_ids"].shape
        out = {"image": 0, "audio": 0}
        if "images" in batch:
            out["image"] = batch["images"].shape[0] * self.image_item_flops()
        if "audio_lengths" in batch:
            out["audio"] = sum(self.audio_item_flops(int(n)) for n in batch["audio_lengths"].tolist())
        out["lm"] = int(batch["attention_mask"].sum()) * flops_per_token(self.cfg.lm, T)
        out["total"] = out["image"] + out["audio"] + out["lm"]
        return out

    def num_parameters(self) -> int:
        """``numel`` over unique parameters (tied embeddings once); tests compare it with ``report``."""
        return sum(p.numel() for p in self.parameters())
