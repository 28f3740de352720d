#!/usr/bin/env bash
# The GPU check: what one short GPU lease must bring back, most essential first.
#
#   bash bench/gpu_check.sh quick              # every stage, 9 minutes at most, on a bare GPU machine
#   bash bench/gpu_check.sh quick --dry-run    # the plan (limits, commands) on any machine; checks its budget
#   bash bench/gpu_check.sh bench sweep        # chosen stages, e.g. a rerun once the build is there
#
# Stages, in this order, each under its own `timeout`; one that fails or runs out of
# time does not stop the next:
#   build     versions, nvidia-smi; the extension for this GPU's arch only, with the
#             ptxas -v register/spill report and cuobjdump's resource usage
#   parity    bench/parity_smoke.py: cuda and triton x fp32/bf16/fp16 against a float64 oracle
#   bench     headline benchmark (N=4096, D=512, K=1024), bf16 and fp32, all providers
#   profile   the headline's kernels: the torch profiler (GPU busy vs wall), then Nsight Compute
#             (duration, occupancy, SM/DRAM throughput, registers, shared memory, stalls, tensor pipes)
#   sanitize  compute-sanitizer: memcheck for cuda and triton, racecheck for cuda
#   sweep     bf16 fwd+bwd over K and over D at N=4096
#   tests     the GPU tests and the extension's toolchain check, pytest -n 8
#   train     a short pretraining run: steps/s with the cuda and the reference backend (bench.txt)
#   step      bench/bench_step.py --device cuda --quick, where the checkout has it (bench.txt)
# The last three also share whatever time the others leave. Output goes to at most
# 8 files directly under $OUT (default bench/results/<gpu>-<date>), appended as it
# is printed (no pipe holds it), so a stage cut off by its limit keeps what it wrote.
# Commands name their output files as $OUT/<file> arguments: that is how the plan
# check counts them. GPU_CHECK_LIMITS="bench=150 sweep=60" overrides stage limits;
# a plan over the 9-minute budget is refused, dry run or not.
set -uo pipefail
START=$(date +%s)  # the 9 minutes count from here
HERE=$(cd "$(dirname "$0")" && pwd) || exit 2
SELF=$HERE/$(basename "$0")  # run_stages runs each stage as `bash $SELF __stage NAME`
cd "$HERE/.." || exit 2

BUDGET=540   # seconds: a 10-minute device call, less the machine's start and the transfers
MAX_FILES=8  # files that come back from $OUT
PLAN=(build parity bench profile sanitize sweep tests train step)
declare -A LIMIT=([build]=120 [parity]=75 [bench]=85 [profile]=75 [sanitize]=35 [sweep]=70 [tests]=40 [train]=30
                  [step]=10)
SHARE_LEFTOVER=" tests train step "
declare -A WHAT=(
  [build]="versions, nvidia-smi; build for this GPU's arch only (FORCE_CUDA=1, MAX_JOBS=16), ptxas -v, cuobjdump"
  [parity]="parity smoke: cuda, triton x fp32/bf16/fp16 vs a float64 oracle on the GPU (unbiased=True too), bit-identical rerun, the losses = their statistics' sum"
  [bench]="headline N=4096 D=512 K=1024: reference, reference+compile, triton, cuda, and each fused one and the reference replayed from a CUDA graph (GPU time alone); bf16, fp32; memory, floor"
  [profile]="kernels at the headline, bf16 fwd+bwd, cuda and triton: torch profiler (GPU busy vs wall), then ncu"
  [sanitize]="compute-sanitizer: memcheck cuda, memcheck triton, racecheck cuda, side by side"
  [sweep]="bf16 fwd+bwd at N=4096: K 256, 4096 at D=512; D 64, 2048 at K=1024 (the headline is the middle), the fused ones also from a CUDA graph"
  [tests]="GPU tests (test_cuda.py, test_cuda_graphs.py, test_triton.py on the GPU; test_extension_toolchain.py), pytest -n 8"
  [train]="python/pretrain_vit.py on the GPU (bf16 autocast): steps/s, cuda vs reference SIGReg backend (into bench.txt)"
  [step]="bench/bench_step.py --device cuda --quick, if the checkout has it (into bench.txt)"
)
PY=${PYTHON:-python3}
DRY_RUN=0
STAGE_RC=0
BG_PIDS=()
declare -A WRITES=()  # files under $OUT the plan writes, collected by step

show() {  # a command line as one would type it
  local arg words=()
  for arg in "$@"; do
    if [[ $arg =~ [[:space:]] ]]; then [[ $arg == *"'"* ]] && arg="\"$arg\"" || arg="'$arg'"; fi
    words+=("$arg")
  done
  echo "${words[*]}"
}

record_writes() {  # record_writes FILE ARGS...: FILE and every $OUT/... argument
  local arg
  WRITES[$1]=1
  for arg in "${@:2}"; do [[ $arg == "$OUT"/* ]] && WRITES[${arg#"$OUT"/}]=1; done
  return 0
}

step() {  # step FILE CMD...: run CMD, its output appended to $OUT/FILE (dry run: print it)
  local file=$1 rc
  shift
  record_writes "$file" "$@"
  if ((DRY_RUN)); then echo "      \$ $(show "$@") >> \$OUT/$file"; return 0; fi
  echo "\$ $(show "$@")    # $(date -u +%T)" >> "$OUT/$file"
  "$@" >> "$OUT/$file" 2>&1
  rc=$?
  ((rc == 0)) || { STAGE_RC=$rc; echo "[exit status $rc]" >> "$OUT/$file"; }
  return $rc
}

step_bg() {  # step_bg TAG FILE CMD...: like step, in the background, each line tagged [TAG]
  local tag=$1 file=$2
  shift 2
  record_writes "$file" "$@"
  if ((DRY_RUN)); then echo "      \$ $(show "$@") >> \$OUT/$file    (in parallel, lines tagged [$tag])"; return 0; fi
  # sed -u writes each line whole, so lines of parallel runs never mix in the file.
  { echo "\$ $(show "$@")"; "$@" 2>&1; rc=$?; echo "exit status $rc"; exit $rc; } \
    | sed -u "s/^/[$tag] /" >> "$OUT/$file" &
  BG_PIDS+=($!)
}

wait_bg() {
  local pid
  for pid in "${BG_PIDS[@]}"; do wait "$pid" || STAGE_RC=1; done
  BG_PIDS=()
}

# ---------------------------------------------------------------- the stages

stage_build() {
  step check.log nvidia-smi
  step check.log "$PY" -c "import platform, torch, triton; p = torch.cuda.get_device_properties(0); print('python',\
 platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, '|', p.name, 'sm_%d%d' % (p.major,\
 p.minor), p.multi_processor_count, 'SMs', p.total_memory >> 20, 'MiB')"
  step check.log nvcc --version
  step check.log bash -c 'echo "CXX=${CXX:-(unset: c++ is $(command -v c++))}"; ${CXX:-c++} --version | head -1'
  # NVCC_APPEND_FLAGS reaches every nvcc call without touching setup.py; ninja prints ptxas's report.
  step build.log env FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" NVCC_APPEND_FLAGS="-Xptxas -v" \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . || return
  step build.log "$PY" -c "from sigreg_kernels import extension; assert extension.CUDA_KERNELS_BUILT, 'no CUDA kernels'" || return
  step build.log bash -c "cuobjdump --dump-resource-usage sigreg_kernels/_C*.so"
}

stage_parity() {
  # One process per (backend, dtype), side by side: Triton compiles and autotunes each in parallel.
  step parity.txt "$PY" bench/parity_smoke.py --device cuda --backends cuda triton \
    --dtypes float32 bfloat16 float16 --headline 4096,512,1024 --jobs 6
}

stage_bench() {
  step bench.txt "$PY" bench/bench_sigreg.py --device cuda --dtype bfloat16 float32 --sizes 4096,512,1024 \
    --providers reference reference+compile triton cuda reference+graph triton+graph cuda+graph --one-compile \
    --csv "$OUT/bench.csv"
}

# Our kernels and the library GEMMs between them; launches: both backends' fwd+bwd with room to spare.
NCU_KERNELS='regex:ecf_partials|statistic|slice_gradient|gemm|nvjet|xmma|cutlass'

ncu_reads_counters() {  # one line in profile.txt: can ncu read this GPU's counters?
  local probe
  if ((DRY_RUN)); then echo "      (one line: whether ncu can read the counters; if not, the ncu step is skipped)"; return 0; fi
  probe=$(ncu --metrics gpu__time_duration.sum "$PY" -c "import torch; torch.ones(8, device='cuda').add_(1)" 2>&1)
  if grep -q "gpu__time_duration.sum" <<< "$probe" && ! grep -q "ERR_NVGPUCTRPERM" <<< "$probe"; then
    echo "ncu: reads the GPU's counters" >> "$OUT/profile.txt"
    return 0
  fi
  echo "ncu: cannot read the GPU's counters here ($(grep -m1 -E 'ERR|==ERROR==|not found' <<< "$probe")): no ncu profile" \
    >> "$OUT/profile.txt"
  return 1
}

stage_profile() {
  local tensor metrics=""
  step profile.txt "$PY" bench/profile_kernels.py --backends cuda triton --dtype bfloat16 --size 4096,512,1024
  ncu_reads_counters || return 0
  # The tensor pipes' utilization, by the names this ncu knows (HMMA; GMMA, Hopper's wgmma).
  if ((!DRY_RUN)); then
    for tensor in $(ncu --query-metrics 2>/dev/null | grep -oE 'sm__pipe_tensor_op_[a-z]*mma_cycles_active' | sort -u); do
      metrics+=${metrics:+,}$tensor.avg.pct_of_peak_sustained_active
    done
  fi
  step profile.txt ncu --clock-control none --profile-from-start off --kernel-name "$NCU_KERNELS" --launch-count 24 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    ${metrics:+--metrics "$metrics"} \
    "$PY" bench/profile_kernels.py --backends cuda triton --dtype bfloat16 --size 4096,512,1024 --ncu-range
}

stage_sanitize() {
  # Without the caching allocator every tensor is its own allocation, so an access
  # past a tensor's end is outside any allocation, where memcheck sees it.
  local tool_backend tool backend
  for tool_backend in memcheck:cuda memcheck:triton racecheck:cuda; do
    tool=${tool_backend%:*} backend=${tool_backend#*:}
    step_bg "$tool $backend" sanitizer.txt env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
      --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" bench/sanitizer_case.py "$backend"
  done
  wait_bg
}

stage_sweep() {
  step bench.txt "$PY" bench/bench_sigreg.py --device cuda --dtype bfloat16 --modes fwd+bwd --no-memory \
    --sizes K:4096,512,256 K:4096,512,4096 D:4096,64,1024 D:4096,2048,1024 \
    --providers reference reference+compile triton cuda triton+graph cuda+graph --csv "$OUT/bench.csv"
}

stage_tests() {
  # Left out: the interpreter, emulation and nvcc-only tests and the CPU kernel's (CPU matters), and
  # test_cuda_large (the headline cases of the parity stage cover it).
  step tests.txt "$PY" -m pytest tests/test_cuda.py tests/test_cuda_graphs.py tests/test_triton.py tests/test_extension_toolchain.py -n 8 -v -rfEs -p no:cacheprovider \
    -k "not cpu and not compile_for_h100 and not cuda_large"
}

stage_train() {
  local backend run
  for backend in cuda reference; do
    run=runs/gpu_check/pretrain-$backend
    ((DRY_RUN)) || rm -rf "$run"
    # --steps sets a long schedule, --stop-after ends the run early: no final evaluation.
    step bench.txt "$PY" python/pretrain_vit.py --device cuda --sigreg-backend "$backend" \
      --steps 100000 --stop-after 300 --max-minutes 0 --out "$run" || continue
    step bench.txt "$PY" -c "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); s, t = c['step'],\
 c['trained_seconds']; print('pretrain_vit, SIGReg backend', sys.argv[2] + ':', s, 'steps in', round(t, 1), 's,',\
 round(s / t, 1), 'steps/s (warm-up included)')" "$run/checkpoint.pt" "$backend"
  done
}

stage_step() {
  if [ -f bench/bench_step.py ]; then
    step bench.txt "$PY" bench/bench_step.py --device cuda --quick
  elif ((DRY_RUN)); then
    echo "      (skipped: bench/bench_step.py is not in this checkout; with it:)"
    step bench.txt "$PY" bench/bench_step.py --device cuda --quick
  else
    echo "bench/bench_step.py is not in this checkout: skipped" >> "$OUT/bench.txt"
  fi
}

# ---------------------------------------------------------------- the plan

later_limits() {  # the limits of the stages after position $1 of STAGES
  local total=0 s
  for s in "${STAGES[@]:$1+1}"; do total=$((total + LIMIT[$s])); done
  echo $total
}

walk_plan() {  # print every stage and the commands it would run
  local DRY_RUN=1 OUT='$OUT' ARCH="<arch of this GPU: 9.0a on Hopper>" i s extra
  for i in "${!STAGES[@]}"; do
    s=${STAGES[$i]}
    extra=""
    [[ $SHARE_LEFTOVER == *" $s "* ]] && extra=" + time left by earlier stages"
    printf '[%d/%d] %-9s %3d s%s: %s\n' $((i + 1)) ${#STAGES[@]} "$s" "${LIMIT[$s]}" "$extra" "${WHAT[$s]}"
    "stage_$s"
  done
}

check_plan() {  # the plan's files and time against the lease's limits; prints the verdict
  local total=0 s f files nested=() ok=0
  for s in "${STAGES[@]}"; do total=$((total + LIMIT[$s])); done
  WRITES[check.log]=1
  for f in "${!WRITES[@]}"; do [[ $f == */* ]] && nested+=("$f"); done
  files=$(printf '%s\n' "${!WRITES[@]}" | sort)
  echo "plan: ${#WRITES[@]} files directly under \$OUT (at most $MAX_FILES): ${files//$'\n'/ }"
  echo "plan: stage limits add up to $total s (at most $BUDGET s)"
  if ((${#WRITES[@]} > MAX_FILES)); then echo "plan error: ${#WRITES[@]} files, more than $MAX_FILES come back"; ok=1; fi
  if ((${#nested[@]})); then echo "plan error: not directly under \$OUT: ${nested[*]}"; ok=1; fi
  if ((total > BUDGET)); then echo "plan error: limits add up to $total s, over the $BUDGET s budget"; ok=1; fi
  return $ok
}

apply_limit_overrides() {
  local pair name seconds
  for pair in ${GPU_CHECK_LIMITS:-}; do
    name=${pair%%=*} seconds=${pair#*=}
    if [[ -z ${LIMIT[$name]+set} || ! $seconds =~ ^[0-9]+$ ]]; then
      echo "GPU_CHECK_LIMITS: '$pair' is not STAGE=SECONDS with a stage of: ${PLAN[*]}" >&2
      exit 2
    fi
    LIMIT[$name]=$seconds
  done
}

# ---------------------------------------------------------------- running it

log() { echo "$*" | tee -a "$OUT/check.log"; }

summary() {  # the lines that matter, last, where a reply that keeps only the output's tail shows them
  echo "== summary"
  [ -f "$OUT/build.log" ] && echo "ptxas -v: $(grep -cE '[1-9][0-9]* bytes spill (stores|loads)' "$OUT/build.log")" \
    "functions with spills (build.log has the report)"
  pick parity.txt '^(FAIL|ERROR)|^# parity'
  pick bench.txt '^# |^sweep|fwd\+bwd|failed'
  pick sanitizer.txt 'SUMMARY|exit status'
  pick tests.txt '^=+ .*(passed|failed|error|skipped)'
  pick profile.txt '^(cuda|triton):|^ncu:'
  pick bench.txt 'steps/s|skipped|Error'
  return 0
}

pick() {  # pick FILE PATTERN: the output lines of $OUT/FILE that match (not the commands echoed)
  [ -f "$OUT/$1" ] && grep -E "$2" "$OUT/$1" | grep -v '^\$ '
}

run_stages() {
  local i s limit avail rc began status failed=()
  export OUT PY ARCH PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
  for i in "${!STAGES[@]}"; do
    s=${STAGES[$i]}
    avail=$((START + BUDGET - $(date +%s) - $(later_limits "$i")))
    limit=$avail
    [[ $SHARE_LEFTOVER == *" $s "* ]] || ((limit <= ${LIMIT[$s]})) || limit=${LIMIT[$s]}
    if ((limit < 10)); then log "== $s: skipped, ${limit} s left"; continue; fi
    log "== $s ($((i + 1))/${#STAGES[@]}), limit $limit s, $(date -u +%T): ${WHAT[$s]}"
    began=$(date +%s)
    # TERM at limit - 3 s, KILL 3 s later: the stage and all its children end by its limit.
    timeout --kill-after=3 $((limit - 3)) bash "$SELF" __stage "$s" >> "$OUT/check.log" 2>&1 < /dev/null
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status="TIMED OUT" ;; *) status="FAILED (exit status $rc)" ;; esac
    ((rc == 0)) || failed+=("$s")
    log "== $s: $status after $(($(date +%s) - began)) s"
  done
  summary | tee -a "$OUT/check.log"
  log "== stages that failed or timed out: ${failed[*]:-none}"
  ((${#failed[@]} == 0))
}

usage() {
  echo "usage: bash bench/gpu_check.sh quick|STAGE... [--dry-run]   (stages: ${PLAN[*]})" >&2
  exit 2
}

if [ "${1:-}" = __stage ]; then  # one stage, run by run_stages under its timeout
  "stage_$2"
  wait_bg
  exit $STAGE_RC
fi

STAGES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    quick) STAGES+=("${PLAN[@]}") ;;
    *) [[ -n ${LIMIT[$arg]+set} ]] || usage; STAGES+=("$arg") ;;
  esac
done
((${#STAGES[@]})) || usage
apply_limit_overrides

if ((DRY_RUN)); then
  echo "GPU check, dry run of: ${STAGES[*]} (nothing is run). Environment of every stage: PYTHONUNBUFFERED=1,"
  echo "MAX_JOBS=16, CUDA_HOME=/usr/local/cuda where unset and present; \$OUT: default bench/results/<gpu>-<date>."
  echo "A run of chosen stages without build builds first where the CUDA kernels are missing."
  walk_plan
  check_plan
  exit
fi

# This GPU's arch only (CI compiles sm_80 and sm_90a); 'a' for Hopper's wgmma.
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))") \
  || { echo "torch sees no CUDA device: nothing to check here (--dry-run shows the plan)" >&2; exit 2; }
# Stages other than build need the CUDA kernels: build first where they are missing.
if [[ " ${STAGES[*]} " != *" build "* ]] \
  && ! $PY -c "from sigreg_kernels import extension; assert extension.CUDA_KERNELS_BUILT" 2>/dev/null; then
  STAGES=(build "${STAGES[@]}")
fi
walk_plan > /dev/null
check_plan > /dev/null || { check_plan >&2; exit 1; }
# "NVIDIA H200" -> h200: bench/results/h200-<date>
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^NVIDIA //' | tr ' A-Z' '-a-z' \
  | tr -cd 'a-z0-9._-')
OUT=${OUT:-bench/results/${GPU_NAME:-gpu}-$(date +%F)}
mkdir -p "$OUT"
# torch infers the toolkit root from `which nvcc`, wrong when that is a wrapper script.
if [ -z "${CUDA_HOME:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ]; then export CUDA_HOME=/usr/local/cuda; fi
# The system compiler, which links the shared libstdc++ torch uses: a default c++ that links it
# statically puts a second copy into the extension, whose error messages then crash
# (tests/test_extension_toolchain.py says why).
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
run_stages
