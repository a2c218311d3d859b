#!/usr/bin/env bash
# GPU check, < 8 minutes on one H100/H200: real-size sampling and training benchmarks with random
# weights in bf16, then a 2 + 2 iteration distillation smoke test on a random VAR-d16.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]            # default OUT_DIR: $OUT, else benchmarks/results/gpu
#     DD2_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh  # the same python steps at toy size on CPU (dry run)
#
# Writes OUT_DIR/{bench_bf16.json, bench_fp32.json, distill_smoke.txt, env.txt} and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}

if [ "${DD2_GPU_CHECK_TINY:-0}" = 1 ]; then
  # CPU dry run: every python entry point below, at the smallest sizes, in fp32
  DEVICE=cpu PRECISION=fp32 MODELS=var-digits,llamagen-digits FP32_MODELS=var-digits BATCHES=1,2 TRAIN=mini
  SMOKE=var-mini-random REPEATS=1 SIZE=--quick
else
  DEVICE=cuda PRECISION=bf16 MODELS=var-digits,llamagen-digits,var-d16,llamagen-b,llamagen-l
  FP32_MODELS=var-d16,llamagen-l BATCHES=1,64 TRAIN=d16 SMOKE=var-d16-random REPEATS=3 SIZE=
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/env.txt" || true
fi
"$PY" -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version(),
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee -a "$OUT_DIR/env.txt"

step() { echo; echo "== $1 ($(date +%T))"; }

# 1. sampling + training steps + closed-form score at real size, bf16 autocast (closed form stays fp32)
step "benchmarks, $PRECISION, $DEVICE"
timeout 300 "$PY" benchmarks/run.py $SIZE --device "$DEVICE" --precision "$PRECISION" --models "$MODELS" \
  --batch-sizes "$BATCHES" --repeats "$REPEATS" --train-config "$TRAIN" --json-out "$OUT_DIR/bench_bf16.json"

# 2. the teachers' samplers in fp32 too, for the paper's per-image speed-up comparison (VAR-d16, GPT-L)
step "sampling, fp32, $DEVICE"
timeout 120 "$PY" benchmarks/run.py --device "$DEVICE" --only sampling --models "$FP32_MODELS" \
  --batch-sizes "$BATCHES" --repeats "$REPEATS" --json-out "$OUT_DIR/bench_fp32.json"

# 3. two stage-1 and two stage-2 iterations of `dd2 distill` on a random-weight teacher
step "distillation smoke test ($SMOKE)"
rm -rf "$OUT_DIR/smoke-run"
timeout 180 "$PY" benchmarks/distill_smoke.py --teacher "$SMOKE" --out "$OUT_DIR/smoke-run" --device "$DEVICE" \
  --precision "$PRECISION" | tee "$OUT_DIR/distill_smoke.txt"

step "done"
