"""The CUDA sources build without a GPU: nvcc for sm_80 and sm_90a, warnings fatal.

The device code (every ``.cu``/``.cuh`` in ``csrc/cuda``) is torch-free, so it
compiles with the CUDA toolkit alone; the launch plans are plain host C++ and
run here. The ATen launcher (``sigreg_cuda.cpp``) needs a CUDA build of torch;
it is syntax-checked against the installed torch headers when they carry the
c10/cuda headers.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
LAUNCHER = CUDA_DIR / "sigreg_cuda.cpp"
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else None
)
needs_nvcc = pytest.mark.skipif(
    NVCC is None or not Path(NVCC).exists(), reason="nvcc (the CUDA toolkit) is not installed"
)

# What torch.utils.cpp_extension and setup.py pass to nvcc, plus fatal warnings.
NVCC_FLAGS = [
    "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", f"-I{CSRC}",
]
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
TORCH_HEADER = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
LOCAL_INCLUDE = re.compile(r'#\s*include\s*"([^"]+)"')


def run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def torch_free_sources():
    return sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh"))


def test_device_code_includes_no_torch_header():
    seen, pending = set(), list(torch_free_sources())
    assert pending, f"no CUDA sources in {CUDA_DIR}"
    while pending:  # the files and every local header they pull in
        path = pending.pop().resolve()
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text()
        assert not TORCH_HEADER.search(text), f"{path.relative_to(ROOT)} includes a torch header"
        pending += [path.parent / name for name in LOCAL_INCLUDE.findall(text)]


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in torch_free_sources() if p.suffix == ".cu"])
def test_nvcc_compiles_for_sm80_and_sm90a(source, tmp_path):
    run([NVCC, "-c", str(CUDA_DIR / source), "-o", str(tmp_path / "out.o"), "--threads", "2", *NVCC_FLAGS, *ARCHS],
        cwd=tmp_path)


PLAN_TEST = r"""
#include "cuda/sigreg_cuda_kernels.cuh"
#include <cstdio>
#include <initializer_list>
#include <cstdlib>
using namespace sigreg::cuda;
#define EXPECT(c) \
  do { if (!(c)) { std::printf("%s:%d: %s failed\n", __FILE__, __LINE__, #c); std::exit(1); } } while (0)

static void check_chunking(int64_t tiles, int64_t chunks, int64_t per_chunk) {
  EXPECT(chunks >= 1 && per_chunk >= 1);
  EXPECT(chunks * per_chunk >= tiles);        // every tile in a chunk
  EXPECT((chunks - 1) * per_chunk < tiles);   // no empty chunk
}

int main() {
  const int64_t sizes[] = {1, 2, 63, 64, 65, 127, 1000, 4096, 100003};
  for (int64_t batch : {1, 3, 17})
    for (int64_t n : sizes)
      for (int64_t d : {0, 1, 255, 256, 257, 512})
        for (int64_t k : {1, 64, 65, 1024})
          for (int64_t knots : {2, 17, 18, 33, 100}) {
            const Problem p{batch, n, d, k, knots, 0.1f};
            EXPECT(unsupported_reason(p) == nullptr);
            const int64_t n_tiles = ceil_div(n, kTile);
            const ForwardPlan f = plan_forward(p);
            check_chunking(n_tiles, f.chunks, f.tiles_per_chunk);
            EXPECT(f.k_tiles * kTile >= k && (f.k_tiles - 1) * kTile < k);
            EXPECT(f.passes * kKnotsPerPass >= knots - 1 && (f.passes - 1) * kKnotsPerPass < knots - 1);
            EXPECT(f.chunks <= kMaxGridYZ && f.batch_per_launch * f.passes <= kMaxGridYZ);
            const int64_t capped = plan_forward(p, 4).batch_per_launch;  // a grid cap of 4 blocks
            EXPECT(f.batch_per_launch >= 1 && capped == (f.passes <= 2 ? 4 / f.passes : 1));
            EXPECT(f.workspace_floats == f.chunks * batch * 2 * k * knots);
            // the workspace does not grow with N: at most about kTargetBlocks column tiles of partials
            EXPECT(f.chunks == 1 || f.chunks * f.k_tiles * batch * f.passes < 2 * kTargetBlocks);
            for (bool dirs : {false, true}) {
              const BackwardPlan b = plan_backward(p, dirs);
              EXPECT(b.coef_floats == 2 * batch * knots * k);
              EXPECT(b.n_tiles == n_tiles && b.d_chunks * kOutColumns >= d && b.d_chunks <= kMaxGridYZ);
              EXPECT(b.batch_per_launch == kMaxGridYZ);
              if (!dirs) { EXPECT(b.directions_floats == 0); continue; }
              check_chunking(batch * n_tiles, b.chunks, b.tiles_per_chunk);
              EXPECT(b.chunks <= kMaxGradDirChunks && b.directions_floats == b.chunks * d * k);
            }
          }
  const int64_t big = int64_t{1} << 31;
  EXPECT(unsupported_reason(Problem{1, big, 8, 8, 17, 0.1f}) != nullptr);
  EXPECT(unsupported_reason(Problem{1, 8, 8, big, 17, 0.1f}) != nullptr);
  // Batches past the grid's cap of 65535 take several launches.
  EXPECT(unsupported_reason(Problem{70000, 8, 8, 8, 17, 0.1f}) == nullptr);
  EXPECT(plan_forward(Problem{40000, 8, 8, 8, 33, 0.1f}).batch_per_launch == 32767);  // 2 passes per index
  std::printf("ok\n");
  return 0;
}
"""


@needs_nvcc
def test_launch_plans_cover_every_tile(tmp_path):
    source = tmp_path / "plan_test.cpp"
    source.write_text(PLAN_TEST)
    run([NVCC, str(source), "-o", str(tmp_path / "plan_test"), "-std=c++17", f"-I{CSRC}",
         "-Xcompiler", "-Wall,-Wextra,-Werror"], cwd=tmp_path)
    assert run([str(tmp_path / "plan_test")], cwd=tmp_path).stdout.strip() == "ok"


TORCH_INCLUDE = Path(torch.__file__).parent / "include"


@needs_nvcc
@pytest.mark.skipif(not (TORCH_INCLUDE / "c10" / "cuda" / "CUDAGuard.h").exists(),
                    reason="the installed torch has no c10/cuda headers")
def test_launcher_syntax_against_torch_headers(tmp_path):
    # A CPU wheel lacks only the generated c10/cuda/impl/cuda_cmake_macros.h; an empty one stands in.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (TORCH_INCLUDE / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parent.parent,
             "/usr/local/cuda"]  # nvcc itself may be a wrapper script
    includes = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()]
    if not includes:
        pytest.skip("no CUDA include directory found (set CUDA_HOME)")
    cuda_include = includes[0]
    run(["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DSIGREG_WITH_CUDA",
         "-isystem", str(tmp_path / "stub"), "-isystem", str(TORCH_INCLUDE),
         "-isystem", str(TORCH_INCLUDE / "torch" / "csrc" / "api" / "include"), "-isystem", str(cuda_include),
         str(LAUNCHER)], cwd=tmp_path)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch case")
def test_force_cuda_on_cpu_torch_stops_with_the_reason():
    # `setup.py --name` evaluates the extension (and its checks) without building it.
    env = {**os.environ, "FORCE_CUDA": "1"}
    env.pop("SIGREG_SKIP_CUDA", None)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "FORCE_CUDA=1 needs a CUDA build of torch" in result.stderr + result.stdout
    assert "SIGREG_SKIP_CUDA=1" in result.stderr + result.stdout
