#!/usr/bin/env bash
# The packed-GEMM kernels on an NVIDIA H100/H200, as one prepared run: the compiled kernels against
# float64 NumPy, then the timings, in priority order, inside a time budget.
#
#   OUT=runs/gpu_check BUDGET_S=420 bash experiments/gpu_check.sh [STAGE ...]
#
# Stages (each stopped at the budget's end; what finished is kept under $OUT):
#   env.txt        device, driver, clocks, jax/jaxlib/triton versions, load average
#   bench_*.json   experiments/bench_kernels.py: the targets first (M = 1, 16, 4096 at 4 and
#                  2 bits, K = N = 4096), then
#   on_device.log  pytest tests/pallas_kernels/test_on_device.py (TESTS_K=expr selects tests), then
#                  the targets at K = N = 8192, the crossover sweep, the other widths and a small-M
#                  sweep of Triton blocks beside dequantize + XLA.
# STAGE: targets4096 tests targets8192 crossover widths smallm (default: all, in that order).
# Needs jax with CUDA, pytest and pytest-xdist; run from the repository root.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
DEADLINE=$((SECONDS + ${BUDGET_S:-420}))
left() { echo $((DEADLINE - SECONDS > 0 ? DEADLINE - SECONDS : 1)); }

{
  date -u; uptime
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used \
    --format=csv
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  "$PY" -c "import triton; print('triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

bench() {  # name, then bench_kernels.py arguments
  local name=$1; shift
  echo "== bench $name ($(left) s left; load: $(cut -d' ' -f1-3 /proc/loadavg))"
  timeout "$(left)" "$PY" experiments/bench_kernels.py --repeats "${REPEATS:-5}" --min-time 0.02 \
    --out "$OUT/bench_$name.json" "$@" 2>&1 | grep -v "^$"
}
tests() {
  echo "== on-device correctness ($(left) s left)"
  timeout "$(( $(left) < ${TEST_S:-150} ? $(left) : ${TEST_S:-150} ))" \
    "$PY" -m pytest tests/pallas_kernels/test_on_device.py -q -n 8 -p no:cacheprovider --tb=short \
    ${TESTS_K:+-k "$TESTS_K"} > "$OUT/on_device.log" 2>&1
  echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/on_device.log" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/on_device.log" | head -20
}

stage() {
  case $1 in
    targets4096) bench targets4096 --kn 4096 --bits 4 2 --m 1 16 4096 --backend triton mosaic_gpu \
                   --triton-jnp-dequant ;;
    tests) tests ;;
    targets8192) bench targets8192 --kn 8192 --bits 4 2 --m 1 16 4096 --backend triton mosaic_gpu ;;
    crossover) bench crossover --kn 4096 --bits 4 2 --m 64 128 256 512 1024 2048 --backend triton reference ;;
    widths) bench widths --kn 4096 --bits 1 3 8 2+8 --m 1 16 4096 --backend triton mosaic_gpu ;;
    smallm) bench smallm --kn 8192 4096 --bits 4 2 --m 1 16 --backend triton reference mosaic_gpu \
              --triton-blocks 16,128,4,4,3 16,64,8,4,4 16,256,8,8,3 16,128,8,4,2,32 ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}
for s in ${@:-targets4096 tests targets8192 crossover widths smallm}; do stage "$s"; done
echo "== done ($(left) s left)"
