"""Convert between Hugging Face checkpoints and moekit checkpoints, both directions.

    python recipes/convert_hf.py --from-hf HF_DIR --out DIR      # HF *ForCausalLM -> moekit
    python recipes/convert_hf.py --to-hf DIR --out HF_DIR        # moekit -> HF (--family to choose)

The family is detected from the HF config's ``architectures`` / ``model_type``. On the way back it is the
family the checkpoint came from (recorded in ``hf_source.json``), else Llama (dense) or Mixtral (all-MoE);
``--family`` overrides. Sharded checkpoints (``model.safetensors.index.json``) are read shard by shard;
``--max-shard-size`` shards the HF output. Tensors keep their dtype (bf16 stays bf16) unless ``--dtype``.
``--out`` must be a new or empty folder outside the source; it appears complete or not at all, and the
source is never written. Configs the other side cannot represent are refused, naming the field.

Families:
{families}
"""

from __future__ import annotations

import argparse
import re

from moekit.core.hf import DTYPES, FAMILIES, family_table, hf_to_moekit, moekit_to_hf
from moekit.core.hf_io import DEFAULT_MAX_SHARD_BYTES

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"200MB"``, ``"64KiB"`` or a byte count -> bytes (HF's decimal units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: use a number with B/KB/MB/GB/KiB/MiB/GiB")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2).upper()]))


def build_parser() -> argparse.ArgumentParser:
    writable = [f.name for f in FAMILIES.values() if f.missing is None]
    parser = argparse.ArgumentParser(
        description=__doc__.format(families=family_table()), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + *.safetensors)")
    src.add_argument("--to-hf", metavar="DIR", help="moekit checkpoint folder (Transformer.save_pretrained)")
    parser.add_argument("--out", required=True, help="output folder: new, or empty (never the source)")
    parser.add_argument("--family", choices=writable, help="--to-hf: HF family to write (default: see above)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="cast floating tensors (default: keep their dtype; DeepSeek routers stay float32, as in transformers)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        metavar="SIZE",
        help="--to-hf: largest output shard, e.g. 5GB (default) or 200MB",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.from_hf and args.family:
        parser.error("--family applies to --to-hf only (the HF family is read from its config.json)")
    try:
        if args.from_hf:
            cfg = hf_to_moekit(args.from_hf, args.out, dtype=dtype)
            kind = "dense" if cfg.moe is None else f"MoE ({cfg.moe.num_experts} experts, top-{cfg.moe.top_k})"
            print(f"wrote moekit {kind} model ({cfg.n_layers} layers, d_model={cfg.d_model}) to {args.out}")
        else:
            hf_cfg = moekit_to_hf(args.to_hf, args.out, args.family, dtype, args.max_shard_size)
            print(f"wrote {hf_cfg['architectures'][0]} ({hf_cfg['dtype']}) to {args.out}")
    except (ValueError, KeyError, FileNotFoundError) as err:  # unconvertible input: message, not traceback
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        parser.exit(2, f"convert_hf: error: {msg}\n")


if __name__ == "__main__":
    main()
