"""Shared checks of the HF converter tests: O(1) random weights, logits against transformers relative to the
logit scale, bit-exact tensors, cached generation, and one family's trip through the CLI both ways."""

import json
import re
import runpy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moekit.core.generate import generate, greedy_recompute
from moekit.core.hf import load_hf_state_dict
from moekit.core.model import Transformer

REPO = Path(__file__).resolve().parents[1]
MAIN = runpy.run_path(str(REPO / "recipes" / "convert_hf.py"))["main"]
V, T = 61, 12
# Non-default eps and theta so that a field the converter forgets to map shows up in the logits.
SHAPE = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-2,
    rope_theta=500.0,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) weights, and norm gains away from 1, so that any misplaced or transposed tensor moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.dim() == 1 else 0.3 * noise)


def batches() -> list[dict[str, torch.Tensor]]:
    """A full batch, and a left-padded one with the usual position ids (count real tokens)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :4] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return [dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask, position_ids=pos)]


def max_rel_logit_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """max |ours - theirs| / max |theirs| over every real position (padded query rows are unspecified)."""
    worst = 0.0
    with torch.no_grad():
        for batch in batches():
            a, b = ours(**batch).logits, theirs(**batch).logits
            real = batch.get("attention_mask", torch.ones(a.shape[:2])).bool()
            scale = b[real].abs().max().item()
            assert scale > 1, "logits too small for a relative check to mean anything"
            worst = max(worst, (a[real] - b[real]).abs().max().item() / scale)
    return worst


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_cache_matches_recompute(model: Transformer) -> None:
    """Greedy decoding with the KV cache gives the tokens that recomputing the whole prefix gives."""
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(generate(model, ids, max_new_tokens=8, temperature=0), greedy_recompute(model, ids, 8))


def convert_both_ways(hf: torch.nn.Module, tmp: Path) -> tuple[Transformer, torch.nn.Module]:
    """``hf`` saved, converted to moekit and back through the CLI: (the moekit model, the HF model read back).
    The HF class and the token ids come back (from hf_source.json)."""
    hf.save_pretrained(tmp / "hf")
    MAIN(["--from-hf", str(tmp / "hf"), "--out", str(tmp / "m")])
    ours = Transformer.from_pretrained(tmp / "m").eval()
    MAIN(["--to-hf", str(tmp / "m"), "--out", str(tmp / "back")])
    hf_cfg = json.loads((tmp / "back" / "config.json").read_text())
    assert hf_cfg["architectures"] == [type(hf).__name__]
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (hf.config.bos_token_id, hf.config.eos_token_id)
    return ours, type(hf).from_pretrained(tmp / "back").eval()


def assert_converts_both_ways(hf: torch.nn.Module, tmp: Path) -> Transformer:
    """Through the CLI both ways: logits as transformers' (1e-4 of the logit scale) each way, KV-cache generation
    as recompute, the round trip bit-exact (names, dtypes, values). Returns the moekit model."""
    ours, back = convert_both_ways(hf, tmp)
    assert max_rel_logit_diff(ours, hf) < 1e-4
    assert_cache_matches_recompute(ours)
    assert max_rel_logit_diff(ours, back) < 1e-4
    assert_same_tensors(load_hf_state_dict(tmp / "back"), load_hf_state_dict(tmp / "hf"))
    return ours


def assert_export_refused(hf: torch.nn.Module, tmp: Path, family: str, message: str, err: Callable[[], str]) -> None:
    """``hf`` converted to moekit, then written as ``family``: exit code 2, nothing written, ``message`` (a regex)
    in what ``err()`` returns (the captured stderr)."""
    hf.save_pretrained(tmp / "hf")
    MAIN(["--from-hf", str(tmp / "hf"), "--out", str(tmp / "m")])
    with pytest.raises(SystemExit) as exc:
        MAIN(["--to-hf", str(tmp / "m"), "--out", str(tmp / "x"), "--family", family])
    assert exc.value.code == 2 and not (tmp / "x").exists()
    assert re.search(message, err())


def measure(hf: torch.nn.Module, tmp: Path) -> tuple[str, float, float, bool]:
    """(HF class, max rel logit diff HF -> moekit, moekit -> HF, round trip bit-exact) for the README's table."""
    ours, back = convert_both_ways(hf, tmp)
    exact = same_tensors(load_hf_state_dict(tmp / "back"), load_hf_state_dict(tmp / "hf"))
    return type(hf).__name__, max_rel_logit_diff(ours, hf), max_rel_logit_diff(ours, back), exact


def print_table(rows: list[tuple[str, str, float, float, bool]]) -> None:
    print("| family (test model) | HF class | HF -> moekit | moekit -> HF | round trip |")
    print("|---|---|---|---|---|")
    for family, cls, there, back, exact in rows:
        print(f"| {family} | `{cls}` | {there:.1e} | {back:.1e} | {'bit-exact' if exact else 'DIFFERS'} |")
