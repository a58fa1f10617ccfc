import numpy as np
import pytest
import torch

from moekit.core.tokenizer import ByteTokenizer

TEXT = "Héllo, wörld! 你好 🎭 — to be, or not to be"


def test_special_ids_are_fixed():
    tok = ByteTokenizer()
    assert (tok.PAD, tok.BOS, tok.EOS, tok.IMAGE, tok.AUDIO) == (256, 257, 258, 259, 260)
    assert (tok.IMAGE_START, tok.IMAGE_END, tok.AUDIO_START, tok.AUDIO_END) == (261, 262, 263, 264)
    assert tok.vocab_size == 272 and tok.vocab_size % 16 == 0 and len(tok) == 272
    assert tok.special_tokens["bos"] == 257 and tok.special_tokens["audio_end"] == 264
    assert sorted(tok.special_tokens.values()) == list(range(256, 265))
    with pytest.raises(TypeError):
        tok.special_tokens["bos"] = 0  # read-only


def test_encode_matches_utf8_bytes_and_round_trips():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == list(TEXT.encode("utf-8"))  # reference: Python's own UTF-8 bytes
    assert tok.decode(ids) == TEXT
    assert tok.encode("").shape == (0,)
    assert tok.decode([]) == ""


def test_bos_eos():
    tok = ByteTokenizer()
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids.tolist() == [257, 97, 98, 258]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special=False) == "<|bos|>ab<|eos|>"
    assert tok.encode("", add_bos=True, add_eos=True).tolist() == [257, 258]


def test_decode_skips_or_renders_specials():
    tok = ByteTokenizer()
    ids = [tok.IMAGE_START, tok.IMAGE, tok.IMAGE, tok.IMAGE_END, *"hé".encode(), tok.PAD, 270]
    assert tok.decode(ids) == "hé"
    assert tok.decode(torch.tensor(ids), skip_special=False) == (
        "<|image_start|><|image|><|image|><|image_end|>hé<|pad|><|reserved_270|>"
    )
    assert tok.token_name(tok.AUDIO) == "<|audio|>" and tok.token_name(65) == "A"


def test_decode_invalid_utf8_uses_replacement_char():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 65, 0xE4, 0xBD]) == "\ufffdA\ufffd"  # lone byte, then truncated 3-byte seq
    # A multi-byte character split by a special still decodes when specials are skipped.
    assert tok.decode([0xC3, tok.BOS, 0xA9]) == "é"


def test_decode_rejects_bad_ids():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="272"):
        tok.decode([65, 272])
    with pytest.raises(ValueError, match="-1"):
        tok.decode(np.array([-1, 3]))
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("add_bos,add_eos", [(False, False), (True, True), (True, False), (False, True)])
def test_batch_encode_matches_per_string(padding_side, add_bos, add_eos):
    tok = ByteTokenizer()
    texts = ["a", "", TEXT, "xyz"]
    out = tok.encode(texts, add_bos=add_bos, add_eos=add_eos, padding_side=padding_side)
    singles = [tok.encode(t, add_bos=add_bos, add_eos=add_eos).tolist() for t in texts]
    width = max(len(s) for s in singles)
    assert out.shape == (len(texts), width) and out.dtype == torch.long
    for row, single in zip(out.tolist(), singles):
        pad = [tok.PAD] * (width - len(single))
        assert row == (single + pad if padding_side == "right" else pad + single)
    assert tok.decode_batch(out) == texts
    assert tok.decode_batch([torch.tensor(s) for s in singles]) == texts  # ragged list


def test_batch_edge_cases():
    tok = ByteTokenizer()
    assert tok.encode([]).shape == (0, 0)
    assert tok.encode([""]).shape == (1, 0)
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode(["a"], padding_side="middle")
    with pytest.raises(TypeError):
        tok.encode([b"bytes"])
    with pytest.raises(ValueError, match="2-D"):
        tok.decode_batch(torch.zeros(3, dtype=torch.long))
