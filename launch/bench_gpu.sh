#!/usr/bin/env bash
# The GPU benchmark of BENCHMARKS.md section 1, as one prepared run:
#
#   launch/bench_gpu.sh OUT_DIR [BASELINE_SCRIPT]
#
# 1. what the machine has (card, driver, jax / flax / torch versions);
# 2. unless SMOKE=0, a smoke step of traser_3b's exact shapes with 2 decoder and 2 vision layers, with
#    the cuDNN fused attention (train.attention_impl=cudnn); if that fails, the other runs use `xla`;
# 3. the main run: the Hugging Face PyTorch baseline (../shared/bench/hf_torch_baseline.py) on the same
#    card, then in one process traser_3b's decoder alone (--lm-step-only) at batch 2 x 4096 tokens with
#    the settings that were fastest on an H100 (DECODER, below; the preset's remat) and the LM_VARIANTS:
#    the layer loops unrolled (train.unroll_layers), batch 3 unrolled, batch 3 looped; if it ends
#    without the batch-2 row, the decoder alone once more at batch 1 (the baseline's line is in main.log);
# 4. if the time allows, the decoder alone at batch 2 under each of XLA_FLAG_VARIANTS (none by default;
#    space-separated; one process each, as XLA reads its flags once per process);
# 5. if the time allows, the faster of step 3's batch-2 decoders (looped or unrolled) profiled;
# 6. if the time allows, the whole traser_3b step at batch 2 (32 frames at 448 px, 8 objects) with
#    DECODER's settings, looped or unrolled as step 5.
# Every step's log and JSON report land in OUT_DIR. PYTHON picks the interpreter (default python3);
# SMOKE_TIMEOUT / MAIN_TIMEOUT bound steps 2-3 in seconds, so one hang cannot eat the whole lease;
# steps 4 to 6 run only while the script is inside BUDGET seconds (default 570). Within a 15-minute
# lease on an H100: SMOKE=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 MAIN_TIMEOUT=360 BUDGET=545.
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

# 3. Batch 2 with DECODER's settings was the best on an H100 (59 GiB planned). Unrolled layer loops
#    remove the loops' copies of weight slices and stacked remat residuals (23 ms of a 378 ms step
#    there). Compiled for an H100 without one (BENCHMARKS.md), the unrolled step has none of those
#    copies and plans 59.0 GiB at batch 2 and 69.8 GiB at batch 3, as the loop (59.2 and 69.7 GiB).
LM_VARIANTS=(
    "train.unroll_layers=true"
    "batch=3 train.unroll_layers=true"
    "batch=3"
)
VARIANT_ARGS=()
for V in "${LM_VARIANTS[@]}"; do VARIANT_ARGS+=(--lm-variant "$V"); done
echo "== main: the PyTorch baseline, the decoder alone at batch 2, ${#LM_VARIANTS[@]} variants; attention_impl=$IMPL"
timeout "${MAIN_TIMEOUT:-420}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 --steps 8 \
    --warmup 2 --lm-step-only --baseline --baseline-script "$BASELINE" "${VARIANT_ARGS[@]}" \
    --out "$OUT_DIR/main.json" train.attention_impl=$IMPL "${DECODER[@]}" 2>&1 | tee "$OUT_DIR/main.log"
if ! grep -q '^lm step: ' "$OUT_DIR/main.log"; then  # a variant cut short by the timeout is no failure
    echo "== main failed: the decoder alone again at batch 1, no baseline, no variants"
    timeout "${FALLBACK_TIMEOUT:-200}" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 1 \
        --steps 8 --warmup 2 --lm-step-only --out "$OUT_DIR/main_b1.json" train.attention_impl=$IMPL \
        "${DECODER[@]}" 2>&1 | tee "$OUT_DIR/main_b1.log"
fi

# 4. If the time allows, and only with XLA_FLAG_VARIANTS set (space-separated): the decoder alone at batch
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

# 5. and 6. use the faster of step 3's batch-2 rows, looped or unrolled (read from the log: a run cut
#    short has its rows).
UNROLL=$("$PY" - "$OUT_DIR/main.log" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    for tag in ("lm step: ", "lm variant: "):
        if line.startswith(tag):
            row = json.loads(line[len(tag):])
            rows[row.get("variant", "")] = row.get("tokens_per_s", 0)
print("true" if rows.get("train.unroll_layers=true", 0) > rows.get("", float("inf")) else "false")
PY
)

# 5. If the time allows: that decoder at batch 2 once more, its device time traced and split by kernel
#    kind (lm_b2_profile.json; the trace in OUT_DIR/trace): what is left after the copies.
LEFT=$(( ${BUDGET:-570} - SECONDS ))
if [ "$LEFT" -gt 100 ]; then
    echo "== decoder alone, batch 2, train.unroll_layers=$UNROLL, profiled (${LEFT} s left)"
    timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b --seq 4096 --batch 2 --steps 8 --warmup 2 \
        --lm-step-only --profile "$OUT_DIR/trace" --out "$OUT_DIR/lm_b2_profile.json" train.attention_impl=$IMPL \
        "${DECODER[@]}" train.unroll_layers=$UNROLL 2>&1 | tee "$OUT_DIR/lm_b2_profile.log"
fi

# 6. If the time allows: the whole step at batch 2 (69 GiB planned on an H100), the same way.
LEFT=$(( ${BUDGET:-570} - SECONDS ))
if [ "$LEFT" -gt 100 ]; then
    echo "== whole step, batch 2, train.unroll_layers=$UNROLL (${LEFT} s left)"
    timeout "$LEFT" "$PY" -m traser_jax.bench --config traser_3b "${SHAPES[@]}" --batch 2 --steps 6 \
        --warmup 2 --out "$OUT_DIR/whole_b2.json" train.attention_impl=$IMPL "${DECODER[@]}" \
        train.unroll_layers=$UNROLL 2>&1 | tee "$OUT_DIR/whole_b2.log"
fi
