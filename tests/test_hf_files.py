"""Checkpoint files of the HF converter: sharded input and output, outputs that never touch their source
(issue 11: ``--from-hf X --out X`` overwrote X), atomic output folders, and peak memory about one model."""

import hashlib
import json
import runpy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.core import hf as hf_mod  # noqa: E402
from moekit.core.hf import load_hf_state_dict  # noqa: E402
from moekit.core.model import Transformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAIN = runpy.run_path(str(REPO / "recipes" / "convert_hf.py"))["main"]
BENCH = runpy.run_path(str(REPO / "recipes" / "bench_convert_hf.py"))["run"]
BENCH_MAIN = runpy.run_path(str(REPO / "recipes" / "bench_convert_hf.py"))["main"]
V = 61


def hf_llama(tied: bool = False) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-2,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tree_hash(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def same_logits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    assert (la - lb).abs().max() <= 1e-4 * lb.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_sharded_checkpoint_converts_both_ways(tmp_path, tied):
    hf = hf_llama(tied)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()

    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    ours = Transformer.from_pretrained(tmp_path / "m").eval()
    same_logits(ours, hf)

    MAIN(["--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back"), "--max-shard-size", "20KB"])
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(p.name for p in (tmp_path / "back").glob("model-*.safetensors"))
    assert all((tmp_path / "back" / f).stat().st_size <= 20_000 + 4096 for f in files)  # + one header
    same_logits(ours, transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval())
    a, b = load_hf_state_dict(tmp_path / "back"), load_hf_state_dict(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_index_listing_a_missing_shard_is_named(tmp_path):
    hf_llama().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(SystemExit) as exc:
        MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and not (tmp_path / "m").exists()


@pytest.fixture()
def folders(tmp_path):
    hf_llama().save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    MAIN(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")])
    return tmp_path


@pytest.mark.parametrize("direction", ["--from-hf", "--to-hf"])
@pytest.mark.parametrize("where", ["same", "inside", "parent", "non-empty"])
def test_output_never_overwrites_the_source_or_anything(folders, capsys, direction, where):
    src = folders / ("hf" if direction == "--from-hf" else "m")
    (folders / "full").mkdir()
    (folders / "full" / "keep.txt").write_text("mine")
    out = {"same": src, "inside": src / "sub", "parent": folders, "non-empty": folders / "full"}[where]
    before = tree_hash(folders)
    with pytest.raises(SystemExit) as exc:
        MAIN([direction, str(src), "--out", str(out)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert tree_hash(folders) == before  # source byte-identical, nothing added anywhere


def test_empty_output_folder_is_used(folders):
    (folders / "empty").mkdir()
    MAIN(["--to-hf", str(folders / "m"), "--out", str(folders / "empty")])
    assert (folders / "empty" / "config.json").is_file() and (folders / "empty" / "model.safetensors").is_file()


def test_failed_write_leaves_no_output(folders, monkeypatch):
    """The output folder appears complete or not at all: a crash while writing leaves neither it nor debris."""

    def crash(path, tensors):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_tensors", crash)
    before = sorted(p.name for p in folders.iterdir())
    with pytest.raises(OSError, match="disk full"):
        hf_mod.hf_to_moekit(folders / "hf", folders / "new")
    assert sorted(p.name for p in folders.iterdir()) == before


@pytest.mark.slow
def test_peak_memory_is_about_one_model_not_two(tmp_path):
    """recipes/bench_convert_hf.py in fresh processes: converting a 9-shard checkpoint peaks at about the model
    plus one shard (gathering all shards first and then converting would be about twice the model)."""
    r = BENCH(tmp_path / "bench", layers=4, hidden=256, ffn=704, vocab=8192, shard_mb=4.0)
    assert r["num_shards"] >= 3
    model_mb = r["model_mb"]
    shard_mb = max(r["shard_mb"], r["largest_tensor_mb"])  # a shard holds at least one tensor
    # Reading: the converted model plus the shard in flight (and allocator slack); writing: a shard or two.
    assert r["from_hf"]["peak_above_base_mb"] < model_mb + 2 * shard_mb + 8, r
    assert r["to_hf"]["peak_above_base_mb"] < 3 * shard_mb + 8, r


def test_bench_convert_refuses_a_non_empty_out_in_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")  # was a ValueError traceback (exit 1)
    with pytest.raises(SystemExit) as exc:
        BENCH_MAIN(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == f"bench_convert_hf: error: --out {tmp_path} is not empty; " + (
        "choose a new or empty folder (nothing is overwritten)\n"
    )
