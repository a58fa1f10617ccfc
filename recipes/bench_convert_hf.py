"""Peak memory of converting a sharded HF checkpoint, against the size of the model.

    python recipes/bench_convert_hf.py --out runs/bench-convert [--layers 8 --hidden 512 --shard-mb 16]

Writes a random Llama-shaped checkpoint split into shards (``model.safetensors.index.json``), converts it
with ``recipes/convert_hf.py --from-hf`` and back with ``--to-hf --max-shard-size``, each in a fresh process,
and reports each process's peak RSS above its RSS just before converting (after imports), in MB and as a
multiple of the model size. A loader that first gathers the whole checkpoint and then converts peaks at
about twice the model; shard by shard it is about one model plus one shard. Writes ``bench.json`` in --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from moekit.core.files import atomic_write_json
from moekit.core.hf_io import ShardWriter, check_output_folder, read_headers

MB = 1e6
# Child process: RSS after imports, then the peak RSS of the conversion alone. Importing torch has a
# transient peak of its own, so the kernel's high-water mark (VmHWM) is reset first (clear_refs 5, Linux);
# where that is not possible, a psutil thread samples RSS every millisecond instead.
_CHILD = """
import json, runpy, sys, threading, time, psutil
main = runpy.run_path(sys.argv[1])["main"]
proc = psutil.Process()
base = proc.memory_info().rss
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    method = "VmHWM"
except OSError:
    method = "sampled"
sampled, done = [base], []
def sample():
    while not done:
        sampled.append(proc.memory_info().rss)
        time.sleep(0.001)
t = threading.Thread(target=sample, daemon=True)
t.start()
main(sys.argv[2:])
done.append(1)
t.join()
peak = hwm() if method == "VmHWM" else max(sampled)
print(json.dumps({"base_rss": base, "peak_rss": peak, "sampled_peak_rss": max(sampled), "method": method}))
"""


def write_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, vocab: int, shard_bytes: int) -> dict:
    """A random untied Llama checkpoint in shards of ``shard_bytes``; returns its config dict."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    }
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, shard_bytes)
    g = torch.Generator().manual_seed(0)

    def add(name: str, *shape: int) -> None:
        writer.add(name, torch.randn(shape, generator=g) * 0.02)

    add("model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", hidden)
        add(f"{p}.post_attention_layernorm.weight", hidden)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            add(f"{p}.self_attn.{n}.weight", hidden, hidden)
        add(f"{p}.mlp.gate_proj.weight", ffn, hidden)
        add(f"{p}.mlp.up_proj.weight", ffn, hidden)
        add(f"{p}.mlp.down_proj.weight", hidden, ffn)
    add("model.norm.weight", hidden)
    add("lm_head.weight", vocab, hidden)
    writer.finish()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def measure(argv: list[str]) -> dict:
    """Peak RSS of one ``convert_hf.py`` run in a fresh process."""
    script = Path(__file__).resolve().parent / "convert_hf.py"
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(script), *argv], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"convert_hf.py {' '.join(argv)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(out: Path, layers: int, hidden: int, ffn: int, vocab: int, shard_mb: float) -> dict:
    check_output_folder(out)
    shard_bytes = int(shard_mb * MB)
    write_checkpoint(out / "hf", layers, hidden, ffn, vocab, shard_bytes)
    shards = sorted((out / "hf").glob("model-*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest = max(s.numel() * 4 for s in (torch.Size(v[0]) for v in read_headers(shards).values()))
    result: dict = {
        "model_mb": model_bytes / MB,
        "shard_mb": shard_mb,
        "num_shards": len(shards),
        "largest_tensor_mb": largest / MB,  # a shard holds at least one tensor
    }
    runs = {
        "from_hf": ["--from-hf", str(out / "hf"), "--out", str(out / "moekit")],
        "to_hf": ["--to-hf", str(out / "moekit"), "--out", str(out / "back"), "--max-shard-size", f"{shard_bytes}B"],
    }
    for name, argv in runs.items():
        m = measure(argv)
        above = m["peak_rss"] - m["base_rss"]
        result[name] = {
            "peak_above_base_mb": above / MB,
            "x_model": above / model_bytes,
            "sampled_peak_above_base_mb": (m["sampled_peak_rss"] - m["base_rss"]) / MB,
            "method": m["method"],
        }
    atomic_write_json(out / "bench.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="new or empty folder for the checkpoints and bench.json")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard-mb", type=float, default=16.0)
    args = parser.parse_args(argv)
    try:  # a non-empty --out (or a file): one line and exit 2, as the other recipes (it was a traceback)
        check_output_folder(args.out)
    except ValueError as err:
        parser.exit(2, f"bench_convert_hf: error: {err}\n")
    r = run(Path(args.out), args.layers, args.hidden, args.ffn, args.vocab, args.shard_mb)
    print(f"model {r['model_mb']:.1f} MB in {r['num_shards']} shards of <= {r['shard_mb']:.1f} MB")
    for name in ("from_hf", "to_hf"):
        print(f"{name}: peak RSS above start {r[name]['peak_above_base_mb']:.1f} MB = {r[name]['x_model']:.2f} x model")


if __name__ == "__main__":
    main()
