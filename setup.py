"""Builds sigreg_kernels._C: the CPU kernels always, the CUDA kernels when CUDA is there.

Switches (environment variables):
  FORCE_CUDA=1            require the CUDA kernels: stop with the reason instead of building CPU only
  SIGREG_SKIP_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0a": A100, H100)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
SKIP_CUDA = os.environ.get("SIGREG_SKIP_CUDA", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"


def build_cuda() -> bool:
    if SKIP_CUDA:
        return False
    if not FORCE_CUDA and (torch.version.cuda is None or CUDA_HOME is None):
        return False
    check_cuda_toolchain()
    return True


def check_cuda_toolchain() -> None:
    """Fail here, with what to do, rather than deep inside the compile."""
    skip = "or set SIGREG_SKIP_CUDA=1 to build the CPU kernels only"
    if torch.version.cuda is None:
        raise SystemExit(f"sigreg_kernels: FORCE_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} "
                         f"is CPU-only (its headers lack c10/cuda): install a CUDA torch, {skip}")
    if CUDA_HOME is None:
        raise SystemExit(f"sigreg_kernels: FORCE_CUDA=1 but no CUDA toolkit found: put nvcc on PATH or set "
                         f"CUDA_HOME, {skip}")
    # torch takes CUDA_HOME from `which nvcc` when unset: a wrapper script in
    # /usr/local/bin makes that /usr/local, which has no CUDA headers.
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        raise SystemExit(f"sigreg_kernels: the CUDA toolkit root {CUDA_HOME} (CUDA_HOME, or found from nvcc) has "
                         f"no include/cuda_runtime.h: set CUDA_HOME to the toolkit's root (e.g. "
                         f"/usr/local/cuda), {skip}")


def extension():
    sources = [os.path.join(CSRC, "sigreg.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # at::parallel_for only spreads over cores when the caller is built with OpenMP.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not build_cuda():
        why = "SIGREG_SKIP_CUDA=1" if SKIP_CUDA else "no CUDA torch or toolkit; FORCE_CUDA=1 requires them"
        print(f"sigreg_kernels: building the CPU kernels only ({why})")
        return CppExtension("sigreg_kernels._C", sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")) + glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    # Register spills are reported (tests/test_cuda_compile.py makes them fatal for sm_80 and
    # sm_90a; other architectures in TORCH_CUDA_ARCH_LIST still build if one spills).
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-warn-spills"]
    print(f"sigreg_kernels: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension("sigreg_kernels._C", sources, include_dirs=[CSRC],
                         define_macros=[("SIGREG_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


setup(
    name="sigreg_kernels",
    version="0.1.0",
    description="Fused SIGReg (LeJEPA's Epps-Pulley sliced test) kernels for PyTorch",
    packages=find_packages(include=["sigreg_kernels", "sigreg_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch"],
)
