"""Kernel times measured on a GPU, read from bench/profile_kernels.py's output (the profile
stage's profile.txt), in the cost model's kernel names.

Two sources, each optional in the file:
- the torch profiler's table per backend (``cuda: wall W us per fwd+bwd, GPU busy B us``,
  then ``launches  mean-us  name`` lines): per-iteration time of each kernel, and the wall time;
- Nsight Compute's report (``ncu --print-kernel-base mangled``): each profiled launch's
  ``Duration``. The CUDA kernels' names are mangled (``_Z...``), Triton's are not; the library
  GEMMs between them belong to the backend whose kernel came last.
"""

import re
from collections import defaultdict

# The cost model's kernel for a launched kernel's name; None: not one the model times (fills, adds).
_KERNELS = (("ecf_partials", "ecf_partials"), ("statistic", "statistic"), ("slice_gradient", "slice_gradient"),
            ("gemm", "gemm_grad_x"), ("nvjet", "gemm_grad_x"), ("xmma", "gemm_grad_x"), ("cutlass", "gemm_grad_x"),
            ("copy", "cast_directions"))
_TABLE_HEAD = re.compile(r"^(\w+): wall ([\d.]+) us per fwd\+bwd, GPU busy ([\d.]+) us")
_TABLE_ROW = re.compile(r"^\s+([\d.]+)\s+([\d.]+)\s+(\S.*)$")
_NCU_KERNEL = re.compile(r"^  (\S[^(]*?)(?:\(.*?\))? \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), ")
_NCU_DURATION = re.compile(r"^\s+Duration\s+(\w+)\s+([\d,.]+)\s*$")
_UNITS_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6,
             "second": 1e6}


def model_kernel(name: str):
    lowered = name.lower()
    return next((kernel for key, kernel in _KERNELS if key in lowered), None)


class Measured:
    """Per backend: ``wall`` and ``busy`` (us per fwd+bwd, torch profiler), ``profiler`` and
    ``ncu`` ({model kernel: us per fwd+bwd}); ``other`` ({backend: us of kernels the model has no
    row for}, torch profiler)."""

    def __init__(self):
        self.wall, self.busy = {}, {}
        self.profiler = defaultdict(lambda: defaultdict(float))
        self.ncu = defaultdict(lambda: defaultdict(float))
        self.other = defaultdict(float)


def read_profile(path) -> Measured:
    measured, backend, ncu_backend, ncu_kernel = Measured(), None, None, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            head = _TABLE_HEAD.match(line)
            if head:
                backend = head.group(1)
                measured.wall[backend], measured.busy[backend] = float(head.group(2)), float(head.group(3))
                continue
            row = _TABLE_ROW.match(line)
            if backend is not None and row:
                launches, mean_us, name = float(row.group(1)), float(row.group(2)), row.group(3)
                kernel = model_kernel(name)
                if kernel is None:
                    measured.other[backend] += launches * mean_us
                else:
                    measured.profiler[backend][kernel] += launches * mean_us
                continue
            if line and not line.startswith(" "):
                backend = None  # the table ended
            launch = _NCU_KERNEL.match(line)
            if launch:
                name = launch.group(1).strip()
                ncu_kernel = model_kernel(name)
                if ncu_kernel in ("ecf_partials", "statistic", "slice_gradient"):
                    ncu_backend = "cuda" if name.startswith("_Z") else "triton"
                continue
            duration = _NCU_DURATION.match(line)
            if duration and ncu_kernel is not None and ncu_backend is not None:
                unit, value = duration.group(1), float(duration.group(2).replace(",", ""))
                measured.ncu[ncu_backend][ncu_kernel] += value * _UNITS_US.get(unit, float("nan"))
                ncu_kernel = None
    return measured
