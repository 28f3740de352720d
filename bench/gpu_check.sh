#!/usr/bin/env bash
# On a GPU machine: build the extension with its CUDA kernels, run the GPU tests,
# compute-sanitizer on a small case, and the benchmark (bf16 and fp32).
# Writes at most 8 files under $OUT (default bench/results/gpu-<date>); commit them
# under bench/results/ with the device and date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
  FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  $PY -m pytest tests/test_cuda.py tests/test_triton.py tests/test_cpu_parity.py tests/test_api.py -q -rs 2>&1 | tail -40
  for backend in cuda triton; do
    compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/sanitizer_case.py $backend 2>&1 | tail -5
  done
} 2>&1 | tee "$OUT/check.log"
for dtype in bfloat16 float32; do
  $PY bench/bench_sigreg.py --device cuda --dtype $dtype --csv "$OUT/cuda-$dtype.csv" 2>&1 | tee "$OUT/bench-$dtype.txt"
  $PY bench/plot_results.py "$OUT/cuda-$dtype.csv"
done
