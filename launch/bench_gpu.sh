#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md section 1, as one prepared run:
#
#   launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]
#
# 1. what the machine has (card, driver, jax / flax / torch versions);
# 2. unless SMOKE=0, a smoke step of traser_3b's exact shapes with 2 decoder and 2 vision layers, with
#    the cuDNN fused attention (train.attention_impl=cudnn); if that fails, the main run uses `xla`;
# 3. the main run: traser_3b (its preset's remat, dots_and_attention_saveable), batch 1 x 4096 tokens, 32 frames
#    at 448 px, 8 objects, and its decoder alone (--lm-step), after the Hugging Face PyTorch baseline
#    (../shared/bench/hf_torch_baseline.py) on the same card; if it fails (out of memory, on a card
#    smaller than an H100), once more with train.remat=FALLBACK_REMAT (default full);
# 4. the decoder alone at batch 2, then in the LM_VARIANTS below, all in one process (bench --lm-variant):
#    train.weight_cast=per_step, a bfloat16 first moment (optim.mu_dtype) and batch 3 in the memory it
#    frees, then batch 8 by gradient accumulation, which amortizes the AdamW update over more tokens;
# 5. the whole step at batch 2 with those settings, if the time allows;
# 6. then the decoder alone at batch 2 under each of XLA_FLAG_VARIANTS (space-separated), if the time allows.
# Every step's log and JSON report land in OUT_DIR. PYTHON picks the interpreter (default python3);
# SMOKE_TIMEOUT / MAIN_TIMEOUT / VARIANT_TIMEOUT bound steps 2-4 in seconds, so one hang cannot eat the
# whole lease; steps 5 and 6 run only while the script is inside BUDGET seconds (default 570). Within a
# 15-minute lease (2026-11-27, an H100): SMOKE=0 MAIN_TIMEOUT=270 VARIANT_TIMEOUT=220 BUDGET=545.
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
if [ "${SMOKE:-1}" != 0 ]; then
    echo "== smoke: traser_3b shapes, 2 + 2 layers, attention_impl=$IMPL"
    timeout "${SMOKE_TIMEOUT:-200}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 2 \
        --out "$OUT_DIR/smoke.json" train.attention_impl=$IMPL text.num_layers=2 vision.depth=2 \
        'vision.fullatt_block_indexes=[1]' 2>&1 | tee "$OUT_DIR/smoke.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { IMPL=xla; echo "== smoke failed with cudnn: the main run uses $IMPL"; }
fi

echo "== main: traser_3b, attention_impl=$IMPL, with the PyTorch baseline"
timeout "${MAIN_TIMEOUT:-420}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 8 \
    --warmup 2 --lm-step --baseline --baseline-script "$BASELINE" --out "$OUT_DIR/main.json" \
    train.attention_impl=$IMPL 2>&1 | tee "$OUT_DIR/main.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    # Out of memory: the same step with more rematerialization (the baseline's line is in main.log).
    echo "== main failed: again with train.remat=${FALLBACK_REMAT:-full}, no baseline"
    timeout "${FALLBACK_TIMEOUT:-300}" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --steps 8 \
        --warmup 2 --out "$OUT_DIR/remat.json" train.attention_impl=$IMPL train.remat=${FALLBACK_REMAT:-full} \
        2>&1 | tee "$OUT_DIR/remat.log"
fi

# The decoder alone (ratios against main.json's baseline, same card). On an H100 (2026-11-27) batch 2
# with per_step and a bfloat16 first moment was the best (59 GiB planned), so batch 3 is next (about
# 65 GiB); the last runs out of memory there (77 GiB planned with dots_saveable).
LM_VARIANTS=(
    "batch=2 train.weight_cast=per_step"
    "batch=2 train.weight_cast=per_step optim.mu_dtype=bfloat16"
    "batch=3 train.weight_cast=per_step optim.mu_dtype=bfloat16"
    "batch=8 train.weight_cast=per_step data.grad_accum_steps=4 optim.mu_dtype=bfloat16"
    "batch=8 train.weight_cast=per_step data.grad_accum_steps=4"
)
VARIANT_ARGS=()
for V in "${LM_VARIANTS[@]}"; do VARIANT_ARGS+=(--lm-variant "$V"); done
echo "== decoder alone: batch 2 and ${#LM_VARIANTS[@]} variants, attention_impl=$IMPL"
timeout "${VARIANT_TIMEOUT:-300}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 --steps 8 \
    --warmup 2 \
    --lm-step-only "${VARIANT_ARGS[@]}" --out "$OUT_DIR/lm_variants.json" train.attention_impl=$IMPL \
    2>&1 | tee "$OUT_DIR/lm_variants.log"

# 5. If the lease's time allows (BUDGET seconds for the whole script, default 570): the whole step at
#    batch 2, the layer stacks cast once per step, a bfloat16 first moment (69 GiB on an H100).
LEFT=$(( ${BUDGET:-570} - SECONDS ))
if [ "$LEFT" -gt 90 ]; then
    echo "== whole step, batch 2, weight_cast=per_step, mu_dtype=bfloat16 (${LEFT} s left)"
    timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --batch 2 --steps 6 \
        --warmup 2 --out "$OUT_DIR/whole_b2.json" train.attention_impl=$IMPL train.weight_cast=per_step \
        optim.mu_dtype=bfloat16 2>&1 | tee "$OUT_DIR/whole_b2.log"
fi

# 6. If the time allows: the decoder alone at batch 2 (as LM_VARIANTS' first row) under XLA flags that
#    may remove the layer loops' device-to-device copies (about 23 ms of a 378 ms step on an H100), one
#    process each: XLA flags are read once per process.
for FLAG in ${XLA_FLAG_VARIANTS:---xla_gpu_enable_dynamic_slice_fusion=true}; do
    LEFT=$(( ${BUDGET:-570} - SECONDS ))
    [ "$LEFT" -gt 60 ] || break
    NAME=$(echo "$FLAG" | tr -c 'a-z0-9\n' '_' | sed 's/^_*//')
    echo "== decoder alone, batch 2, weight_cast=per_step, XLA_FLAGS=$FLAG (${LEFT} s left)"
    XLA_FLAGS="$FLAG" timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 --steps 8 \
        --warmup 2 --lm-step-only --out "$OUT_DIR/lm_$NAME.json" train.attention_impl=$IMPL \
        train.weight_cast=per_step 2>&1 | tee "$OUT_DIR/lm_$NAME.log"
done
