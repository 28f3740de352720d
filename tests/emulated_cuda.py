"""The CUDA kernels' own source, built for the CPU with the host emulation in
``cuda_host_emulation/`` and called through ctypes, so CI can run their device
code without a GPU (see ``cuda_host_emulation/cuda_host_emulation.h`` for the
execution model and what it catches).

What this covers: the kernels' indexing, masking, tiling, shared-memory phases
and barriers, the launch plans and reduction order, the fp16/bf16 conversions,
the WMMA operand layouts and alignment. What it does not: the hardware's own
arithmetic (tensor-core rounding and accumulation order, the CUDA math
library), timing, and the ATen launcher (``csrc/cuda/sigreg_cuda.cpp``), whose
host-side steps ``emulated_launchers.cpp`` repeats.
"""

import contextlib
import ctypes
import math
import re
import subprocess
from pathlib import Path

import torch

from sigreg_kernels.functional import statistic_from_sums

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_host_emulation"
KERNELS = ROOT / "csrc" / "cuda" / "sigreg_cuda_kernels.cu"
SELFTEST = EMULATION / "selftest_kernels.cu"

# kernel<<<grid, block, shared, stream>>>(  ->  ::emu::launch(grid, block, shared, stream, kernel,
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>()]*>)?)<<<([^<>]*?)>>>\(")
SHARED = re.compile(r"__shared__\s+__align__\((\d+)\)\s+unsigned char\s+(\w+)\[([^\]]+)\];")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # sigreg::cuda::DType


def rewrite_for_host(source: str) -> str:
    """The two CUDA constructs g++ cannot parse, in the emulation's spelling."""
    source, launches = LAUNCH.subn(r"::emu::launch(\2, \1, ", source)
    source, arrays = SHARED.subn(r"unsigned char* \2 = ::emu::block_shared_memory(\3, \1);", source)
    assert "<<<" not in source, "a kernel launch the rewrite does not recognize"
    assert "__shared__" not in source, "a __shared__ declaration unlike `__shared__ __align__(A) unsigned char s[B];`"
    assert launches > 0
    return source


def build(build_dir: Path) -> Path:
    """Compiles the rewritten kernels, their C interface and the self-test kernels into one library."""
    (build_dir / "sigreg_cuda_kernels.host.cpp").write_text(rewrite_for_host(KERNELS.read_text()))
    (build_dir / "selftest_kernels.host.cpp").write_text(rewrite_for_host(SELFTEST.read_text()))
    library = build_dir / "libsigreg_cuda_emulated.so"
    command = [
        "g++", "-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
        f"-I{EMULATION / 'include'}", f"-I{build_dir}", f"-I{KERNELS.parent}", f"-I{ROOT / 'csrc'}",
        str(EMULATION / "emulated_launchers.cpp"), str(build_dir / "selftest_kernels.host.cpp"), "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"building the emulated kernels failed:\n{result.stderr}"
    return library


GUARD_ELEMENTS, GUARD_VALUE = 4096, -1234.5


class GuardedOutput:
    """An output tensor filled with NaN (an entry the kernel does not write stays NaN),
    between guard regions that must keep their value: no write past either end."""

    def __init__(self, shape, dtype):
        numel = math.prod(shape)
        self.buffer = torch.full((numel + 2 * GUARD_ELEMENTS,), GUARD_VALUE, dtype=dtype)
        self.tensor = self.buffer[GUARD_ELEMENTS:GUARD_ELEMENTS + numel].view(shape).fill_(float("nan"))

    def checked(self, name):
        guards = torch.cat((self.buffer[:GUARD_ELEMENTS], self.buffer[GUARD_ELEMENTS + self.tensor.numel():]))
        assert (guards == GUARD_VALUE).all(), f"the kernels wrote outside {name}"
        return self.tensor


class EmulatedKernels:
    """The forward and backward launches, on contiguous CPU tensors."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        sizes = [i64] * 5 + [ctypes.c_double]
        self.lib.sigreg_emu_ecf_sums.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, *sizes]
        self.lib.sigreg_emu_ecf_sums_backward.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, *sizes]
        self.lib.sigreg_emu_failure.restype = ctypes.c_char_p
        self.lib.sigreg_emu_set_descending.argtypes = [ctypes.c_int]
        self.lib.sigreg_emu_set_max_grid_yz.argtypes = [ctypes.c_int64]
        self.lib.sigreg_emu_set_max_grid_yz.restype = ctypes.c_int64

    def failure(self) -> str:
        return self.lib.sigreg_emu_failure().decode()

    def check(self, code: int) -> None:
        assert code != -1, "the kernels reject this problem size"
        assert code != -2, "the kernels wrote outside a workspace"
        assert code == 0, f"launch failed with CUDA error {code}: {self.failure()}"

    @contextlib.contextmanager
    def descending(self):
        """Threads and blocks run in descending order (ascending is the default)."""
        self.lib.sigreg_emu_set_descending(1)
        try:
            yield
        finally:
            self.lib.sigreg_emu_set_descending(0)

    @contextlib.contextmanager
    def max_grid_yz(self, limit: int):
        """Grid y/z capped at ``limit`` blocks instead of the hardware's cap."""
        previous = self.lib.sigreg_emu_set_max_grid_yz(limit)
        try:
            yield
        finally:
            self.lib.sigreg_emu_set_max_grid_yz(previous)

    def run(self, name: str, *args) -> int:
        """A self-test launcher of selftest_kernels.cu: its CUDA error code."""
        function = getattr(self.lib, name)
        function.argtypes = [ctypes.c_void_p] * len(args)
        return function(*(a.data_ptr() for a in args))

    def ecf_sums(self, x, directions, knots, t_max, tensor_cores):
        batch, samples, dim = x.shape
        slices = directions.shape[1]
        sums = GuardedOutput((batch, 2, slices, knots), torch.float32)
        self.check(self.lib.sigreg_emu_ecf_sums(
            DTYPE_CODES[x.dtype], int(tensor_cores), x.data_ptr(), directions.data_ptr(), sums.tensor.data_ptr(),
            batch, samples, dim, slices, knots, t_max))
        return sums.checked("sums")

    def ecf_sums_backward(self, grad_sums, x, directions, knots, t_max, tensor_cores, need_grad_directions):
        batch, samples, dim = x.shape
        slices = directions.shape[1]
        grad_sums = grad_sums.to(torch.float32).contiguous()
        grad_x = GuardedOutput(x.shape, x.dtype)
        grad_directions = GuardedOutput(directions.shape, directions.dtype) if need_grad_directions else None
        if grad_directions is not None and batch == 0:
            grad_directions.tensor.zero_()
        self.check(self.lib.sigreg_emu_ecf_sums_backward(
            DTYPE_CODES[x.dtype], int(tensor_cores), grad_sums.data_ptr(), x.data_ptr(), directions.data_ptr(),
            grad_x.tensor.data_ptr(), None if grad_directions is None else grad_directions.tensor.data_ptr(),
            batch, samples, dim, slices, knots, t_max))
        return grad_x.checked("grad_x"), None if grad_directions is None else grad_directions.checked("grad_directions")

    def sigreg(self, x, directions, *, knots=17, t_max=3.0, reduction="none", tensor_cores=False):
        """Per-slice statistics ``[*B, K]`` as the ``cuda`` backend computes them, differentiable."""
        assert reduction == "none"
        batch_shape, samples, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
        x = x.reshape(math.prod(batch_shape), samples, dim).contiguous()
        sums = _EcfSums.apply(self, x, directions.contiguous(), knots, t_max, tensor_cores)
        return statistic_from_sums(sums, samples, knots, t_max).reshape(*batch_shape, directions.shape[1])


class _EcfSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, x, directions, knots, t_max, tensor_cores):
        ctx.save_for_backward(x, directions)
        ctx.config = (kernels, knots, t_max, tensor_cores)
        return kernels.ecf_sums(x, directions, knots, t_max, tensor_cores)

    @staticmethod
    def backward(ctx, grad_sums):
        x, directions = ctx.saved_tensors
        kernels, knots, t_max, tensor_cores = ctx.config
        grad_x, grad_directions = kernels.ecf_sums_backward(grad_sums, x, directions, knots, t_max, tensor_cores,
                                                            ctx.needs_input_grad[2])
        return None, grad_x, grad_directions, None, None, None
