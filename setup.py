"""Builds sigreg_kernels._C: the CPU kernels always, the CUDA kernels when CUDA is there.

Switches (environment variables):
  FORCE_CUDA=1            build the CUDA kernels even if no GPU / CUDA torch is detected
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


def build_cuda() -> bool:
    if os.environ.get("SIGREG_SKIP_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = [os.path.join(CSRC, "sigreg.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # at::parallel_for only spreads over cores when the caller is built with OpenMP.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not build_cuda():
        print("sigreg_kernels: building the CPU kernels only (no CUDA torch or toolkit; FORCE_CUDA=1 overrides)")
        return CppExtension("sigreg_kernels._C", sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")) + glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
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
