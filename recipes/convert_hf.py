"""Convert between Hugging Face Llama/Mixtral checkpoints and moekit checkpoints.

    python recipes/convert_hf.py --from-hf HF_DIR --out DIR     # LlamaForCausalLM / MixtralForCausalLM -> moekit
    python recipes/convert_hf.py --to-hf DIR --out HF_DIR       # moekit -> HF (dense: Llama, all-MoE: Mixtral)

The architecture is detected from the HF config's ``architectures`` / ``model_type`` (or from the moekit
config's ``moe`` field). Configs the other side cannot represent are refused with the offending field.
"""

from __future__ import annotations

import argparse

from moekit.core.hf import hf_to_moekit, moekit_to_hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="HF checkpoint folder (config.json + *.safetensors)")
    src.add_argument("--to-hf", metavar="DIR", help="moekit checkpoint folder (Transformer.save_pretrained)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        if args.from_hf:
            cfg = hf_to_moekit(args.from_hf, args.out)
            kind = "dense" if cfg.moe is None else f"MoE ({cfg.moe.num_experts} experts, top-{cfg.moe.top_k})"
            print(f"wrote moekit {kind} model ({cfg.n_layers} layers, d_model={cfg.d_model}) to {args.out}")
        else:
            hf_cfg = moekit_to_hf(args.to_hf, args.out)
            print(f"wrote {hf_cfg['architectures'][0]} to {args.out}")
    except (ValueError, KeyError, FileNotFoundError) as err:  # unconvertible input: message, not traceback
        parser.exit(2, f"convert_hf: error: {err}\n")


if __name__ == "__main__":
    main()
