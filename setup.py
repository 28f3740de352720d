"""Builds sigreg_kernels and its compiled extension sigreg_kernels._C: the CPU kernels
always, the CUDA kernels when CUDA is there. Metadata and extras are in pyproject.toml.

The extension is compiled against the torch it will run with: the one installed in the
environment pip runs in (under pip's default build isolation, found in the interpreter's
own site-packages; ``--no-build-isolation`` also works). Without torch, a C++ compiler
or Python's headers, the package installs without the extension (backends ``reference``,
and ``triton`` on GPUs) and says why in ``available_backends`` and ``python -m sigreg_kernels``.

Switches (environment variables):
  SIGREG_BUILD_EXTENSION  unset: build the extension where it can be built; 1: require it
                          (stop with the reason); 0: never build it (pure Python)
  FORCE_CUDA=1            require the CUDA kernels (so the extension too): stop with the reason
                          instead of building CPU only
  SIGREG_SKIP_CUDA=1      never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0a": A100, H100)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import site
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
BUILD_EXTENSION = os.environ.get("SIGREG_BUILD_EXTENSION", "")
SKIP_CUDA = os.environ.get("SIGREG_SKIP_CUDA", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
if BUILD_EXTENSION not in ("", "0", "1"):
    raise SystemExit(f"sigreg_kernels: SIGREG_BUILD_EXTENSION must be 0, 1 or unset, got {BUILD_EXTENSION!r}")

# What this build compiled, and why not: written into the package as _build_info.py,
# so that an install without the kernels can say why (sigreg_kernels/dispatch.py).
build_info = {"EXTENSION": False, "WHY_NO_EXTENSION": None, "CUDA_ARCHS": None, "WHY_NO_CUDA": None,
              "TORCH": None}


def missing_prerequisite():
    """Why the extension cannot be built here (None if it can), checked before compiling."""
    if BUILD_EXTENSION == "0":
        return "SIGREG_BUILD_EXTENSION=0 was set at build time"
    try:
        import torch
    except ImportError:
        # pip's default build isolation hides the environment's packages, torch among them. The
        # extension must be compiled against the torch it will run with, which is the one in this
        # interpreter's own site-packages (not one pip would fetch into the isolated environment):
        # look there, appended after the isolated environment's paths.
        site.addsitedir(sysconfig.get_paths()["purelib"])
        try:
            import torch
        except ImportError:
            return "torch was not importable at build time (install torch first, then sigreg_kernels)"
    from torch.utils.cpp_extension import get_cxx_compiler

    build_info["TORCH"] = torch.__version__
    compiler = get_cxx_compiler()  # $CXX, else c++ (what torch compiles with)
    if not compiler.strip() or shutil.which(compiler.split()[0]) is None:
        return f"no C++ compiler was found at build time ({compiler!r}: set CXX, or put c++ on PATH)"
    if not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "Python's C headers (Python.h) were missing at build time (e.g. the python3-dev package)"
    return None


def build_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if SKIP_CUDA:
        build_info["WHY_NO_CUDA"] = "SIGREG_SKIP_CUDA=1 was set at build time"
        return False
    if not FORCE_CUDA and (torch.version.cuda is None or CUDA_HOME is None):
        build_info["WHY_NO_CUDA"] = (f"torch {torch.__version__} is CPU-only" if torch.version.cuda is None
                                     else "no CUDA toolkit (nvcc, CUDA_HOME) was found at build time")
        return False
    check_cuda_toolchain()
    return True


def check_cuda_toolchain() -> None:
    """Fail here, with what to do, rather than deep inside the compile."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

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
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # Sources relative to this folder: setuptools refuses absolute ones in a wheel build.
    sources = ["csrc/sigreg.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # at::parallel_for only spreads over cores when the caller is built with OpenMP.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    build_info["EXTENSION"] = True
    if not build_cuda():
        print(f"sigreg_kernels: building the CPU kernels only ({build_info['WHY_NO_CUDA']}; FORCE_CUDA=1 "
              f"requires the CUDA kernels)")
        return CppExtension("sigreg_kernels._C", sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    build_info["CUDA_ARCHS"] = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT) + glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    # Register spills are reported (tests/test_cuda_compile.py makes them fatal for sm_80 and
    # sm_90a; other architectures in TORCH_CUDA_ARCH_LIST still build if one spills).
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-warn-spills"]
    print(f"sigreg_kernels: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    return CUDAExtension("sigreg_kernels._C", sources, include_dirs=[CSRC],
                         define_macros=[("SIGREG_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


class BuildPyWithInfo(build_py):
    """Also writes sigreg_kernels/_build_info.py: into the wheel, or beside the sources for ``pip install -e``."""

    def run(self):
        super().run()
        root = ROOT if self.editable_mode else self.build_lib
        if not build_info["EXTENSION"] and not self.editable_mode:
            # An earlier build's extension left in build/ would otherwise ship in this wheel.
            for stale in glob.glob(os.path.join(root, "sigreg_kernels", "_C.*")):
                os.remove(stale)
        lines = ["# Written by setup.py: what this install's build compiled, and why not.\n"]
        lines += [f"{key} = {value!r}\n" for key, value in build_info.items()]
        with open(os.path.join(root, "sigreg_kernels", "_build_info.py"), "w") as file:
            file.writelines(lines)


why_not = missing_prerequisite()
if why_not is None:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, cmdclass = [extension()], {"build_ext": BuildExtension}
else:
    required_by = "SIGREG_BUILD_EXTENSION=1" if BUILD_EXTENSION == "1" else "FORCE_CUDA=1" if FORCE_CUDA else None
    if required_by:  # (with SIGREG_BUILD_EXTENSION=0, FORCE_CUDA=1 contradicts it: stop too)
        raise SystemExit(f"sigreg_kernels: {required_by} but the extension cannot be built: {why_not}")
    print(f"sigreg_kernels: installing without the compiled kernels: {why_not} (SIGREG_BUILD_EXTENSION=1 "
          f"makes this an error)")
    build_info["WHY_NO_EXTENSION"] = why_not
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithInfo})
