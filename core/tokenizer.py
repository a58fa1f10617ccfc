"""ByteTokenizer: UTF-8 bytes as ids 0..255, then a fixed block of special ids.

Shapes: ``B`` batch, ``T`` tokens. ``encode(str) -> [T]``, ``encode(list[str]) -> [B, T]`` (padded with PAD).

The vocabulary never depends on data, so checkpoints, corpora and multimodal models all agree on it
without shipping a vocab file. Encoding and decoding go through numpy buffers (one C-level pass per
string), never a Python loop per byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch

IdsLike = torch.Tensor | np.ndarray | Sequence[int]


class ByteTokenizer:
    """Byte-level tokenizer with named special ids.

    ids 0..255 are raw UTF-8 bytes; 256..264 are the named specials below; 265..271 are reserved so
    that ``vocab_size`` is a multiple of 16 (friendlier matmul shapes) and new specials can be added
    without changing the embedding size.
    """

    PAD: int = 256
    BOS: int = 257
    EOS: int = 258
    IMAGE: int = 259  # one placeholder per image-embedding position
    AUDIO: int = 260  # one placeholder per audio-embedding position
    IMAGE_START: int = 261
    IMAGE_END: int = 262
    AUDIO_START: int = 263
    AUDIO_END: int = 264
    NUM_BYTES: int = 256
    vocab_size: int = 272

    special_tokens: Mapping[str, int] = MappingProxyType(
        {
            "pad": PAD,
            "bos": BOS,
            "eos": EOS,
            "image": IMAGE,
            "audio": AUDIO,
            "image_start": IMAGE_START,
            "image_end": IMAGE_END,
            "audio_start": AUDIO_START,
            "audio_end": AUDIO_END,
        }
    )

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        text: str | Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        padding_side: Literal["right", "left"] = "right",
    ) -> torch.Tensor:
        """UTF-8 encode ``text``.

        A ``str`` gives a 1-D LongTensor ``[T]``. A list of strings gives ``[B, T_max]`` padded with
        ``PAD`` on ``padding_side`` (use ``ids != PAD`` as the attention mask; left padding suits
        batched generation).
        """
        if isinstance(text, str):
            return self._encode_one(text, add_bos, add_eos)
        if not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"ByteTokenizer.encode: text must be a str or a list of str, got {type(text)}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"ByteTokenizer.encode: padding_side={padding_side!r}; allowed: 'right', 'left'")
        return self._encode_batch(list(text), add_bos, add_eos, padding_side)

    def _encode_one(self, text: str, add_bos: bool, add_eos: bool) -> torch.Tensor:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        ids_t = torch.empty(int(add_bos) + raw.size + int(add_eos), dtype=torch.long)  # [T]
        if add_bos:
            ids_t[0] = self.BOS
        if add_eos:
            ids_t[-1] = self.EOS
        ids_t[int(add_bos) : int(add_bos) + raw.size] = torch.from_numpy(raw.astype(np.int64))
        return ids_t

    def _encode_batch(self, texts: list[str], add_bos: bool, add_eos: bool, padding_side: str) -> torch.Tensor:
        encoded = [t.encode("utf-8") for t in texts]
        n_b = torch.tensor([len(e) for e in encoded], dtype=torch.long)  # [B] content bytes per row
        flat = torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64))
        bos, eos = int(add_bos), int(add_eos)
        len_b = n_b + bos + eos  # [B] row lengths incl. specials
        t_max = int(len_b.max()) if len(texts) else 0
        out_bt = torch.full((len(texts), t_max), self.PAD, dtype=torch.long)  # [B, T]
        start_b = (t_max - len_b) if padding_side == "left" else torch.zeros_like(len_b)
        # Position of each column relative to its row's first real token.
        rel_bt = torch.arange(t_max)[None, :] - start_b[:, None]  # [B, T]
        # Row-major boolean assignment fills rows in order, which matches the order of `flat`.
        out_bt[(rel_bt >= bos) & (rel_bt < bos + n_b[:, None])] = flat
        if add_bos:
            out_bt[rel_bt == 0] = self.BOS
        if add_eos:
            out_bt[rel_bt == (bos + n_b)[:, None]] = self.EOS
        return out_bt

    # ------------------------------------------------------------------ decode
    def token_name(self, token_id: int) -> str:
        """Printable form of one id: the byte as text when valid alone, else ``<|name|>``."""
        return self._decode_table()[token_id].decode("utf-8", errors="replace")

    def _decode_table(self) -> np.ndarray:
        names = {v: k for k, v in self.special_tokens.items()}
        table = [bytes([i]) for i in range(self.NUM_BYTES)]
        table += [f"<|{names.get(i, f'reserved_{i}')}|>".encode() for i in range(self.NUM_BYTES, self.vocab_size)]
        return np.array(table, dtype=object)

    def _as_numpy(self, ids: IdsLike) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            arr = ids.detach().cpu().numpy()
        else:
            arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ByteTokenizer.decode: ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(f"ByteTokenizer.decode: id {int(bad)} out of range [0, {self.vocab_size})")
        return arr

    def decode(self, ids: IdsLike, skip_special: bool = True) -> str:
        """Decode a 1-D id sequence. Invalid UTF-8 becomes U+FFFD.

        ``skip_special=False`` renders special and reserved ids as ``<|name|>`` (e.g. ``<|bos|>``).
        """
        arr = self._as_numpy(ids)
        if arr.ndim != 1:
            raise ValueError(f"ByteTokenizer.decode: ids must be 1-D, got shape {tuple(arr.shape)}")
        is_special = arr >= self.NUM_BYTES
        if skip_special or not is_special.any():
            raw = arr[~is_special].astype(np.uint8).tobytes()
        else:
            # Object-array gather + join runs in C; only taken when specials must be shown.
            raw = b"".join(self._decode_table()[arr].tolist())
        return raw.decode("utf-8", errors="replace")

    def decode_batch(self, ids: IdsLike | Sequence[IdsLike], skip_special: bool = True) -> list[str]:
        """Decode a ``[B, T]`` tensor/array or a list of 1-D sequences (ragged allowed)."""
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 2:
                raise ValueError(f"ByteTokenizer.decode_batch: ids must be 2-D, got shape {tuple(ids.shape)}")
            rows = list(self._as_numpy(ids))
        else:
            rows = list(ids)
        return [self.decode(row, skip_special=skip_special) for row in rows]
