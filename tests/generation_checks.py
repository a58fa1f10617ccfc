"""Shared check of the attention tests: KV-cache generation against recomputing the whole prefix."""

import torch

from moekit.core.generate import generate, greedy_recompute
from moekit.core.model import Transformer


def assert_cached_generation_equals_recompute(model: Transformer) -> None:
    """Greedy tokens with the cache equal full recompute, and so do the logits of one cached step."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    seq = greedy_recompute(model, ids, 8)
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=0), seq)
    with torch.no_grad():
        # Logits too, not just argmax: one cached step against the recomputed last position.
        out = model(input_ids=seq[:, :-1], use_cache=True)
        step = model(input_ids=seq[:, -1:], past_key_values=out.past_key_values).logits[:, -1]
        torch.testing.assert_close(step, model(input_ids=seq).logits[:, -1], rtol=1e-5, atol=1e-5)
