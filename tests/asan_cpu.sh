#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   bash tests/asan_cpu.sh              # build into a scratch folder, run the CPU tests and a short fuzz
#   FUZZ_EXAMPLES=300 bash tests/asan_cpu.sh
#   ASAN_BUILD_DIR=/tmp/asan bash tests/asan_cpu.sh  # build there, keep it, rebuild only when csrc/ changed
#
# It builds the extension's CPU sources (csrc/sigreg.cpp, csrc/cpu/*.cpp) with
# -fsanitize=address,undefined (and float-cast-overflow, which -fsanitize=undefined
# leaves out in GCC) into a scratch folder beside a copy of the Python package,
# runs the CPU tests and a short differential fuzz of the cpu backend with that
# package first on the path, and fails on any sanitizer report: every check
# aborts the process (-fno-sanitize-recover=all, halt_on_error). Python and torch
# are not instrumented, so libasan is preloaded; leak detection is off (the
# interpreter keeps its allocations to the end). Nothing outside the scratch
# folder is written: the installed extension is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python}
CXX=${CXX:-g++}
FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-40}

if [[ -n "${ASAN_BUILD_DIR:-}" ]]; then
  SCRATCH=$(mkdir -p "$ASAN_BUILD_DIR" && cd "$ASAN_BUILD_DIR" && pwd)
else
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/sigreg_asan.XXXXXX")
  trap 'rm -rf "$SCRATCH"' EXIT
fi
REPORTS="$SCRATCH/reports"
rm -rf "$REPORTS"
mkdir -p "$REPORTS" "$SCRATCH/sigreg_kernels"
find "$SCRATCH/sigreg_kernels" -name '*.py' -delete  # a reused folder: no module that is gone from the source

LIBASAN=$("$CXX" -print-file-name=libasan.so)
[[ -f "$LIBASAN" ]] || { echo "asan_cpu: $CXX has no libasan.so (install the compiler's sanitizer runtime)" >&2; exit 2; }

# A copy of the package, without its compiled extension: the sanitized one goes there.
(cd sigreg_kernels && find . -name '*.py' -not -path '*/__pycache__/*' -exec cp --parents {} "$SCRATCH/sigreg_kernels/" \;)

# Compiler and linker flags of a torch extension, from torch itself.
read -r -a TORCH_FLAGS <<<"$("$PYTHON" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension
flags = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
flags += [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
print(" ".join(flags))
EOF
)"
SUFFIX=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SANITIZE=(-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer)
COMMON=(-std=c++17 -O1 -g -fPIC -fopenmp -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -Icsrc)

LIBRARY="$SCRATCH/sigreg_kernels/_C$SUFFIX"
start=$SECONDS
if [[ -f "$LIBRARY" && -z "$(find csrc/sigreg.cpp csrc/*.h csrc/cpu -newer "$LIBRARY")" ]]; then
  echo "asan_cpu: reusing $LIBRARY (csrc/ unchanged)"
else
  echo "asan_cpu: compiling the CPU kernels with ${SANITIZE[*]} (a few minutes; compiler output in $SCRATCH/build.log)"
  objects=()
  pids=()
  : >"$SCRATCH/build.log"
  for source in csrc/sigreg.cpp csrc/cpu/*.cpp; do
    object="$SCRATCH/$(basename "$source" .cpp).o"
    objects+=("$object")
    "$CXX" "${COMMON[@]}" "${SANITIZE[@]}" "${TORCH_FLAGS[@]}" -c "$source" -o "$object" 2>>"$SCRATCH/build.log" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || { cat "$SCRATCH/build.log" >&2; echo "asan_cpu: compile failed" >&2; exit 2; }
  done
  "$CXX" -shared "${SANITIZE[@]}" -fopenmp "${objects[@]}" "${TORCH_FLAGS[@]}" -o "$LIBRARY"
  echo "asan_cpu: built in $((SECONDS - start)) s"
fi

# libstdc++ too: loaded later (by torch) ASan cannot find the real __cxa_throw, and the first
# C++ exception (any TORCH_CHECK) aborts in its interceptor.
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
export LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}"
# Reports go to files too: pytest captures the tests' stderr, and an aborted process never prints it.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
report() {
  local status=$?
  if compgen -G "$REPORTS/*" >/dev/null; then
    echo "asan_cpu: sanitizer report(s):" >&2
    for f in "$REPORTS"/*; do grep -v -e ' in _Py' -e ' in Py' -e 'Python/' -e 'Objects/' "$f" | head -40 >&2; done
    status=1
  fi
  [[ $status == 0 ]] || echo "asan_cpu: FAILED" >&2
  [[ -n "${ASAN_BUILD_DIR:-}" ]] || rm -rf "$SCRATCH"
  exit "$status"
}
trap report EXIT
# The tests run from the scratch folder: `python -m pytest` puts the working
# directory first on sys.path, so `import sigreg_kernels` finds the sanitized copy.
export PYTHONPATH="$SCRATCH${PYTHONPATH:+:$PYTHONPATH}"
cd "$SCRATCH"
"$PYTHON" - "$SCRATCH" <<'EOF'
import sys
import sigreg_kernels._C as extension
assert extension.__file__.startswith(sys.argv[1]), f"the tests would load {extension.__file__}, not the sanitized build"
print(f"asan_cpu: loaded {extension.__file__}")
EOF

# The tests of the CPU op (those that exist in this checkout), without torch.compile (Inductor would
# compile C++ under the preloaded runtime) and without the GPU backends' tests.
tests=()
for name in test_cpu_parity test_api test_op_registration test_directions_none test_clip; do
  [[ -f "$ROOT/tests/$name.py" ]] && tests+=("$ROOT/tests/$name.py")
done
echo "asan_cpu: CPU tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -x "${tests[@]}" -k "not compile and not triton and not cuda"
echo "asan_cpu: fuzz, $FUZZ_EXAMPLES examples"
"$PYTHON" "$ROOT/tests/fuzz_backends.py" --backends cpu --examples "$FUZZ_EXAMPLES" --seed "${FUZZ_SEED:-0}"
compgen -G "$REPORTS/*" >/dev/null && exit 1
echo "asan_cpu: no sanitizer report ($((SECONDS - start)) s)"
