#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md section 1, as one prepared run:
#
#   launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]
#
# 1. what the machine has (card, driver, jax / flax / torch versions);
# 2. unless SMOKE=0, a smoke step of traser_3b's exact shapes with 2 decoder and 2 vision layers, with
#    the cuDNN fused attention (train.attention_impl=cudnn); if that fails, the other runs use `xla`;
# 3. the main run: the Hugging Face PyTorch baseline (../shared/bench/hf_torch_baseline.py) on the same
#    card, then in one process traser_3b's decoder alone (--lm-step-only) at batch 3 x 4096 tokens with
#    the settings that were fastest on an H100 (DECODER, below; the preset's remat and unrolled layer
#    loops) and the LM_VARIANTS (none by default: each costs about 2 minutes of compiling); if it ends
#    without the batch-3 row, the decoder alone once more at batch 2 (the baseline's line is in main.log);
# 4. if the time allows, the whole traser_3b step at batch 2 (32 frames at 448 px, 8 objects) with
#    DECODER's settings;
# 5. if the time allows, the decoder alone at batch 2 under each of XLA_FLAG_VARIANTS (none by default;
#    space-separated; one process each, as XLA reads its flags once per process);
# 6. if the time allows, the batch-3 decoder once more, profiled.
# Every step's log and JSON report land in OUT_DIR. PYTHON picks the interpreter (default python3);
# SMOKE_TIMEOUT / MAIN_TIMEOUT bound steps 2-3 in seconds, so one hang cannot eat the whole lease;
# steps 4 to 6 run only while the script is inside BUDGET seconds (default 570). Within a 15-minute
# lease on an H100: SMOKE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 MAIN_TIMEOUT=300 BUDGET=545. On an H100
# the unrolled decoder takes about 2.5 minutes with its compile, the PyTorch baseline about 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]}
BASELINE=${2:-../shared/bench/hf_torch_baseline.py}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
SHAPES=(--seq 4096 --frames 32 --res 448 --objects 8)
# The fastest decoder settings on an H100 (2026-11-27; BENCHMARKS.md): the layer stacks cast once per
# step, a bfloat16 first moment.
DECODER=(train.weight_cast=per_step optim.mu_dtype=bfloat16)

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
if [ "${SMOKE:-1}" != 0 ]; then
    echo "== smoke: traser_3b shapes, 2 + 2 layers, attention_impl=$IMPL"
    timeout "${SMOKE_TIMEOUT:-200}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 2 \
        --out "$OUT_DIR/smoke.json" train.attention_impl=$IMPL text.num_layers=2 vision.depth=2 \
        'vision.fullatt_block_indexes=[1]' 2>&1 | tee "$OUT_DIR/smoke.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { IMPL=xla; echo "== smoke failed with cudnn: the other runs use $IMPL"; }
fi

# 3. Batch 3 with DECODER's settings and the preset's unrolled layer loops was the best on an H100
#    (0.502 s, 50.3 % MFU, 69.7 GiB planned; BENCHMARKS.md). Batch 2 unrolled was 0.342 s, looped 0.371 s
#    (--lm-variant "batch=2 train.unroll_layers=false").
LM_VARIANTS=()
VARIANT_ARGS=()
for V in "${LM_VARIANTS[@]}"; do VARIANT_ARGS+=(--lm-variant "$V"); done
echo "== main: the PyTorch baseline, the decoder alone at batch 3, ${#LM_VARIANTS[@]} variants; attention_impl=$IMPL"
timeout "${MAIN_TIMEOUT:-420}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 3 --steps 8 \
    --warmup 2 --lm-step-only --baseline --baseline-script "$BASELINE" "${VARIANT_ARGS[@]}" \
    --out "$OUT_DIR/main.json" train.attention_impl=$IMPL "${DECODER[@]}" 2>&1 | tee "$OUT_DIR/main.log"
if ! grep -q '^lm step: ' "$OUT_DIR/main.log"; then  # a variant cut short by the timeout is no failure
    echo "== main failed: the decoder alone again at batch 2, no baseline, no variants"
    timeout "${FALLBACK_TIMEOUT:-200}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 \
        --steps 8 --warmup 2 --lm-step-only --out "$OUT_DIR/main_b2.json" train.attention_impl=$IMPL \
        "${DECODER[@]}" 2>&1 | tee "$OUT_DIR/main_b2.log"
fi

# 4. If the time allows: the whole step at batch 2 (68 GiB planned on an H100 with the layer loops
#    unrolled, 70.2 GiB looped).
LEFT=$(( ${BUDGET:-570} - SECONDS ))
if [ "$LEFT" -gt 100 ]; then
    echo "== whole step, batch 2 (${LEFT} s left)"
    timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --batch 2 --steps 6 \
        --warmup 2 --out "$OUT_DIR/whole_b2.json" train.attention_impl=$IMPL "${DECODER[@]}" \
        2>&1 | tee "$OUT_DIR/whole_b2.log"
fi

# 5. If the time allows, and only with XLA_FLAG_VARIANTS set (space-separated): the decoder alone at batch
#    2 under each, one process each (XLA reads its flags once per process). The dynamic-slice fusion
#    flag, the last lease's guess at the copies, leaves the compiled step as it is (BENCHMARKS.md).
for FLAG in ${XLA_FLAG_VARIANTS:-}; do
    LEFT=$(( ${BUDGET:-570} - SECONDS ))
    [ "$LEFT" -gt 90 ] || break
    NAME=$(echo "$FLAG" | tr -c 'a-z0-9\n' '_' | sed 's/^_*//')
    echo "== decoder alone, batch 2, XLA_FLAGS=$FLAG (${LEFT} s left)"
    XLA_FLAGS="$FLAG" timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 --steps 8 \
        --warmup 2 --lm-step-only --out "$OUT_DIR/lm_$NAME.json" train.attention_impl=$IMPL "${DECODER[@]}" \
        2>&1 | tee "$OUT_DIR/lm_$NAME.log"
done

# 6. If the time allows: the batch-3 decoder once more, its device time traced and split by kernel
#    kind (lm_b3_profile.json; the trace in OUT_DIR/trace, and its Perfetto file as lm_b3_trace.json.gz).
LEFT=$(( ${BUDGET:-570} - SECONDS ))
if [ "$LEFT" -gt 100 ]; then
    echo "== decoder alone, batch 3, profiled (${LEFT} s left)"
    timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 3 --steps 8 --warmup 2 \
        --lm-step-only --profile "$OUT_DIR/trace" --out "$OUT_DIR/lm_b3_profile.json" train.attention_impl=$IMPL \
        "${DECODER[@]}" 2>&1 | tee "$OUT_DIR/lm_b3_profile.log"
    TRACE=$(find "$OUT_DIR/trace" -name '*trace.json.gz' 2>/dev/null | head -n 1)
    [ -z "$TRACE" ] || cp "$TRACE" "$OUT_DIR/lm_b3_trace.json.gz"
fi
