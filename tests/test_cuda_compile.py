"""The CUDA sources build without a GPU: nvcc for sm_80 and sm_90a, warnings fatal.

The device code (every ``.cu``/``.cuh`` in ``csrc/cuda``) is torch-free, so it
compiles with the CUDA toolkit alone, with no register spills; the registers and
shared memory ptxas reports for sm_90a are the ones the plans count with
(``sigreg_kernels/gpu/cuda/plan.py``; the C++ plans run in test_cuda_emulated.py).
The ATen launcher (``sigreg_cuda.cpp``) needs a CUDA build of torch; it is
syntax-checked against the installed torch headers when they carry the c10/cuda
headers.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sigreg_kernels.gpu.cuda import plan as cuda_plan

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


def run(command, cwd, timeout=300):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
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


# ptxas: report registers and shared memory, warn on spills; warnings are errors.
PTXAS_FLAGS = ["-Xptxas", "-v,-warn-spills,-Werror"]
INSTANCE = re.compile(r"(ecf_partials_kernel|slice_gradient_kernel)I(f|6__half|13__nv_bfloat16)"
                      r"LNS0_4TileE(\d)ELNS0_4ModeE(\d)ELb([01])E")
MANGLED_TYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}


def ptxas_resources(report: str, arch: str) -> dict:
    """{(kernel, ctype, tile, mode, weighted): (registers, shared bytes)} of the templated kernels in a
    ``-v`` report."""
    found, current = {}, None
    for line in report.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if entry:
            current = entry.group(1) if entry.group(2) == arch else None
            continue
        used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", line)
        if used and current:
            match = INSTANCE.search(current)
            if match:
                key = (match.group(1), MANGLED_TYPES[match.group(2)], cuda_plan.TILES[int(match.group(3))],
                       cuda_plan.MODES[int(match.group(4))], match.group(5) == "1")
                found[key] = (int(used.group(1)), int(used.group(2)))
            current = None
    return found


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """Each .cu compiled for sm_80 and sm_90a, warnings fatal (spills too): {source name: ptxas report}."""
    tmp = tmp_path_factory.mktemp("nvcc")
    reports = {}
    for source in (p for p in torch_free_sources() if p.suffix == ".cu"):
        result = run([NVCC, "-c", str(source), "-o", str(tmp / f"{source.stem}.o"), "--threads", "2", *NVCC_FLAGS,
                      *ARCHS, *PTXAS_FLAGS], cwd=tmp, timeout=900)
        reports[source.name] = result.stdout + result.stderr
    return reports


@needs_nvcc
def test_nvcc_compiles_for_sm80_and_sm90a_without_spills(ptxas_reports):
    assert "sigreg_cuda_kernels.cu" in ptxas_reports
    for name, report in ptxas_reports.items():
        spills = [line for line in report.splitlines() if re.search(r"[1-9]\d* bytes spill", line)]
        assert not spills, f"{name}: {spills}"


@needs_nvcc
def test_plans_know_the_compiled_resources(ptxas_reports):
    """cuda_plan.RESOURCES and the blocks-per-SM tables (Python and C++) are the compiler's (sm_90a)."""
    found = ptxas_resources(ptxas_reports["sigreg_cuda_kernels.cu"], "sm_90a")
    assert set(found) == set(cuda_plan.RESOURCES), "an instance is missing from cuda_plan.RESOURCES, or left over"
    changed = {k: (v, cuda_plan.RESOURCES[k]) for k, v in found.items() if v != cuda_plan.RESOURCES[k]}
    assert not changed, f"update cuda_plan.RESOURCES, (compiled, listed): {changed}"
    header = (CUDA_DIR / "sigreg_cuda_kernels.cuh").read_text()
    for kernel, table, name in (("ecf_partials_kernel", cuda_plan.PARTIALS_BLOCKS_PER_SM, "kPartialsBlocksPerSm"),
                                ("slice_gradient_kernel", cuda_plan.GRADIENT_BLOCKS_PER_SM, "kGradientBlocksPerSm")):
        for projected in (False, True):
            modes = ("projected",) if projected else ("tensor_cores", "fma")
            for tile in cuda_plan.TILES:
                per_sm = {cuda_plan.blocks_per_sm(*found[kernel, ctype, tile, mode, weighted])
                          for ctype in cuda_plan.CTYPES.values() for mode in modes for weighted in (False, True)}
                assert per_sm == {table[projected][tile]}, (kernel, projected, tile, per_sm)
        rows = ["{" + ", ".join(str(table[projected][tile]) for tile in cuda_plan.TILES) + "}"
                for projected in (False, True)]
        assert f"{name}[2][2] = {{{', '.join(rows)}}};" in header, f"{name}: the C++ header differs from cuda_plan"


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
