#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md section 1, as one prepared run:
#
#   launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]
#
# 1. what the machine has (card, driver, jax / flax / torch versions);
# 2. a smoke step of traser_3b's exact shapes with 2 decoder and 2 vision layers, with the cuDNN
#    fused attention (train.attention_impl=cudnn); if that fails, the main run uses `xla`;
# 3. the main run: traser_3b (its preset's remat, dots_saveable), batch 1 x 4096 tokens, 32 frames
#    at 448 px, 8 objects, and its decoder alone (--lm-step), after the Hugging Face PyTorch baseline
#    (../shared/bench/hf_torch_baseline.py) on the same card; if it fails (out of memory, on a card
#    smaller than an H100), once more with train.remat=FALLBACK_REMAT (default full);
# 4. after a main run that fits, the decoder alone at batch 2 with each train.weight_cast (per_layer,
#    per_step: the layer stacks cast to bf16 once per step), about 20 s each.
# Every step's log and JSON report land in OUT_DIR. PYTHON picks the interpreter (default python3);
# SMOKE_TIMEOUT / MAIN_TIMEOUT bound each step in seconds, so one hang cannot eat the whole lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]}
BASELINE=${2:-../shared/bench/hf_torch_baseline.py}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
SHAPES=(--seq 4096 --frames 32 --res 448 --objects 8 --batch 1)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/machine.txt"
"$PY" - <<'PY' | tee -a "$OUT_DIR/machine.txt"
import importlib
for name in ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers"]:
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as err:  # noqa: BLE001 - report and go on
        print(name, "missing", type(err).__name__)
PY

IMPL=cudnn
echo "== smoke: traser_3b shapes, 2 + 2 layers, attention_impl=$IMPL"
timeout "${SMOKE_TIMEOUT:-200}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 2 \
    --out "$OUT_DIR/smoke.json" train.attention_impl=$IMPL text.num_layers=2 vision.depth=2 \
    'vision.fullatt_block_indexes=[1]' 2>&1 | tee "$OUT_DIR/smoke.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { IMPL=xla; echo "== smoke failed with cudnn: the main run uses $IMPL"; }

echo "== main: traser_3b, attention_impl=$IMPL, with the PyTorch baseline"
timeout "${MAIN_TIMEOUT:-420}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 10 \
    --warmup 2 --lm-step --baseline --baseline-script "$BASELINE" --out "$OUT_DIR/main.json" \
    train.attention_impl=$IMPL 2>&1 | tee "$OUT_DIR/main.log"
if [ "${PIPESTATUS[0]}" -eq 0 ]; then
    for CAST in per_layer per_step; do
        echo "== variant: decoder alone, batch 2, train.weight_cast=$CAST"
        timeout "${VARIANT_TIMEOUT:-120}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 \
            --steps 10 --warmup 2 --lm-step-only --out "$OUT_DIR/lm_b2_$CAST.json" train.attention_impl=$IMPL \
            train.weight_cast=$CAST 2>&1 | tee "$OUT_DIR/lm_b2_$CAST.log"
    done
    exit 0
fi
# Out of memory: the same step with more rematerialization (the baseline's line is in main.log).
echo "== main failed: again with train.remat=${FALLBACK_REMAT:-full}, no baseline"
timeout "${FALLBACK_TIMEOUT:-300}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 10 \
    --warmup 2 --out "$OUT_DIR/remat.json" train.attention_impl=$IMPL train.remat=${FALLBACK_REMAT:-full} \
    2>&1 | tee "$OUT_DIR/remat.log"
