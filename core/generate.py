"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p, EOS, left-padded batches;
``sample_text`` does it from text prompts through a tokenizer.

Shapes: B batch, T prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.core.inputs import check_token_ids
from moekit.core.tokenizer import ByteTokenizer


def filter_logits(logits_bv: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Mask logits outside the top-k set and outside the smallest nucleus with mass >= top_p."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits_bv, min(top_k, logits_bv.shape[-1]), dim=-1).values[..., -1:]
        logits_bv = logits_bv.masked_fill(logits_bv < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits_bv, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top-1 always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_bv = logits_bv.masked_fill(drop, float("-inf"))
    return logits_bv


@torch.no_grad()
def greedy_recompute(model: nn.Module, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """The slow reference of ``generate(..., temperature=0)`` for unpadded prompts: every step runs the whole
    sequence again, without a KV cache. Returns [B, T + max_new_tokens]."""
    seq = input_ids
    for _ in range(max_new_tokens):
        seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Extend ``input_ids`` [B, T] by up to ``max_new_tokens``; returns [B, T + n].

    ``temperature=0`` is greedy. Batches of different prompt lengths are left-padded, with
    ``attention_mask`` [B, T] marking real tokens. A row that produced ``eos_token_id`` emits
    ``pad_token_id`` afterwards; generation stops once every row has finished.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not temperature >= 0 or temperature == float("inf"):  # `not >=` also catches NaN
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be None or >= 0 (0 = no top-k filter)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be None or in (0, 1] (1 = no nucleus filter)")
    vocab, max_len = model.cfg.vocab_size, model.cfg.max_seq_len
    check_token_ids(input_ids, vocab, "input_ids")
    for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tok is not None and not 0 <= tok < vocab:
            raise ValueError(f"{name}={tok} must be a token id in [0, vocab_size={vocab})")
    B, T = input_ids.shape
    if T > max_len:
        raise ValueError(f"input_ids has T={T} prompt tokens > ModelConfig.max_seq_len={max_len}")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [B, T]=[{B}, {T}] like input_ids; got {tuple(attention_mask.shape)}")
    if attention_mask is not None and T > 0:
        real_bt = attention_mask.bool()
        # Right padding would predict the first new token from a pad's logits and append after the pads.
        bad = (real_bt[:, 1:] < real_bt[:, :-1]).any(-1) | ~real_bt[:, -1]  # [B]: a 0 after a 1, or no 1 at all
        if bool(bad.any()):
            raise ValueError(
                f"attention_mask must be left padding (0s, then 1s, at least one 1 per row); rows "
                f"{bad.nonzero().flatten().tolist()} are not"
            )
    was_training = model.training
    model.eval()
    try:
        return _decode(
            model, input_ids, attention_mask, min(max_new_tokens, max_len - T), temperature, top_k, top_p,
            eos_token_id, pad_token_id, generator,
        )  # fmt: skip
    finally:
        model.train(was_training)


def _decode(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Tensor:
    """:func:`generate`'s loop on checked arguments (``max_new_tokens`` already capped at max_seq_len)."""
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0

    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    cache = out.past_key_values
    next_logits = out.logits[:, -1]  # [B, V]
    next_pos = position_ids[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = [input_ids]
    for step in range(max_new_tokens):
        if temperature == 0:
            nxt = next_logits.argmax(-1)
        else:
            probs = filter_logits(next_logits.float() / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt[:, None])
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return torch.cat(tokens, dim=1)


def sample_text(
    model: nn.Module,
    tokenizer: ByteTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt (batched, left-padded); returns prompt + continuation texts."""
    device = next(model.parameters()).device
    ids_bt = tokenizer.encode(list(prompts), add_bos=True, padding_side="left").to(device)  # [B, T]
    mask_bt = (ids_bt != tokenizer.PAD).long()
    gen = torch.Generator(device=device).manual_seed(seed)
    out_bt = generate(
        model,
        ids_bt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=tokenizer.EOS,
        pad_token_id=tokenizer.PAD,
        attention_mask=mask_bt,
        generator=gen,
    )
    return tokenizer.decode_batch(out_bt)
