#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA kernels, run the GPU tests,
# compute-sanitizer on small cases, and the benchmark. In stages, so that each
# command stays short (a cold build is a few minutes, each benchmark dtype a few
# more, mostly torch.compile of the reference):
#
#   bash bench/gpu_check.sh build test sanitize     # then, on the same machine:
#   bash bench/gpu_check.sh bench-bf16
#   bash bench/gpu_check.sh bench-fp32
#   bash bench/gpu_check.sh all                     # everything in one go
#
# Any stage builds first if the installed extension lacks its CUDA kernels.
# Results go under $OUT (default bench/results/<gpu>-<date>): check.log, and per
# dtype cuda-<dtype>.csv/.png and bench-<dtype>.txt (at most 7 files); commit them
# under bench/results/ with the device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9._-')
OUT=${OUT:-bench/results/${GPU_NAME:-gpu}-$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
# This machine's architecture only (CI compiles sm_80 and sm_90a); override to build more.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
  "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")}
LOG="$OUT/check.log"
# torch infers the toolkit root from `which nvcc`, wrong when that is a wrapper script.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi

log() { echo "== $* ($(date -u +%T))" | tee -a "$LOG"; }

cuda_kernels_built() {
  $PY -c "from sigreg_kernels import ops; raise SystemExit(0 if ops.CUDA_KERNELS_BUILT else 1)" 2>/dev/null
}

stage_build() {
  log "build for CUDA arch ${TORCH_CUDA_ARCH_LIST}"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  } 2>&1 | tee -a "$LOG"
  cuda_kernels_built || { log "FAILED: the extension has no CUDA kernels"; exit 1; }
}

stage_test() {
  log "GPU tests"
  $PY -m pytest tests/test_cuda.py tests/test_triton.py tests/test_cpu_parity.py tests/test_api.py \
    -q -rs -p no:cacheprovider 2>&1 | tail -40 | tee -a "$LOG"
}

stage_sanitize() {
  for tool in memcheck racecheck synccheck; do
    for backend in cuda triton; do
      log "compute-sanitizer $tool, $backend"
      compute-sanitizer --tool $tool --error-exitcode 1 $PY bench/sanitizer_case.py $backend 2>&1 \
        | tail -5 | tee -a "$LOG"
    done
  done
}

stage_bench() {  # $1: bfloat16 or float32
  log "benchmark $1"
  $PY bench/bench_sigreg.py --device cuda --dtype "$1" --csv "$OUT/cuda-$1.csv" 2>&1 | tee "$OUT/bench-$1.txt"
  $PY bench/plot_results.py "$OUT/cuda-$1.csv"
}

[ $# -gt 0 ] || set -- all
for stage in "$@"; do
  case "$stage" in
    build | test | sanitize | bench-bf16 | bench-fp32 | all) ;;
    *) echo "unknown stage '$stage': build, test, sanitize, bench-bf16, bench-fp32 or all" >&2; exit 2 ;;
  esac
done
for stage in "$@"; do
  [ "$stage" = build ] || cuda_kernels_built || stage_build
  case "$stage" in
    build) stage_build ;;
    test) stage_test ;;
    sanitize) stage_sanitize ;;
    bench-bf16) stage_bench bfloat16 ;;
    bench-fp32) stage_bench float32 ;;
    all) stage_test; stage_sanitize; stage_bench bfloat16; stage_bench float32 ;;
  esac
done
