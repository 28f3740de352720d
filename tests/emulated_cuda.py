"""The CUDA kernels' own source, built for the CPU with the host emulation in
``cuda_host_emulation/`` and called through ctypes, so CI can run their device
code without a GPU (see ``cuda_host_emulation/cuda_host_emulation.h`` for the
execution model and what it catches).

``EmulatedKernels`` offers the four kernels of ``sigreg_kernels/gpu/contract.py``
with the signatures of ``sigreg_kernels/gpu/cuda/ops.py`` (plus the emulation's
knobs: ``tensor_cores``, ``num_sms``), their C++ plans, a launch counter, and
``sigreg``: the whole op through ``sigreg_kernels/gpu/fused.py`` with these kernels.

What this covers: the kernels' indexing, masking, tiling, shared-memory phases,
barriers and asynchronous copies, the launch plans and reduction order, the
fp16/bf16 conversions, the WMMA operand layouts and alignment. What it does
not: the hardware's own arithmetic (tensor-core rounding and accumulation
order, the CUDA math library), timing, and the ATen launcher
(``csrc/cuda/sigreg_cuda.cpp``), whose host-side steps ``emulated_launchers.cpp``
repeats.
"""

import contextlib
import ctypes
import math
import re
import subprocess
from pathlib import Path

import torch

from sigreg_kernels.gpu import fused

ROOT = Path(__file__).resolve().parent.parent
EMULATION = Path(__file__).resolve().parent / "cuda_host_emulation"
KERNELS = ROOT / "csrc" / "cuda" / "sigreg_cuda_kernels.cu"
SELFTEST = EMULATION / "selftest_kernels.cu"

# kernel<<<grid, block, shared, stream>>>(  ->  ::emu::launch(grid, block, shared, stream, kernel,
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>()]*>)?)<<<([^<>]*?)>>>\(")
SHARED = re.compile(r"__shared__\s+__align__\((\d+)\)\s+unsigned char\s+(\w+)\[([^\]]+)\];")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # sigreg::cuda::DType
MODE_TENSOR_CORES, MODE_FMA, MODE_PROJECTED = 0, 1, 2  # sigreg::cuda::Mode
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}  # sigreg::cuda::Reduction
TILE_NAMES = ("small", "big")  # sigreg::cuda::Tile
NUM_SMS = 4  # the emulation's "device": a few SMs, so small problems still span several waves


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
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"building the emulated kernels failed:\n{result.stderr}"
    return library


GUARD_ELEMENTS, GUARD_VALUE = 4096, -1234.5


class GuardedOutput:
    """An output tensor filled with NaN (an entry the kernel does not write stays NaN),
    or with ``initial``, between guard regions that must keep their value: no write past either end."""

    def __init__(self, shape, dtype, initial=None):
        numel = math.prod(shape)
        self.guard = torch.tensor(GUARD_VALUE).to(dtype)  # (integer types: the value truncated)
        self.buffer = self.guard.repeat(numel + 2 * GUARD_ELEMENTS)
        self.tensor = self.buffer[GUARD_ELEMENTS:GUARD_ELEMENTS + numel].view(shape)
        if initial is None:
            self.tensor.fill_(float("nan"))
        else:
            self.tensor.copy_(initial)

    def checked(self, name):
        guards = torch.cat((self.buffer[:GUARD_ELEMENTS], self.buffer[GUARD_ELEMENTS + self.tensor.numel():]))
        assert (guards == self.guard).all(), f"the kernels wrote outside {name}"
        return self.tensor


def _ptr(t):
    return None if t is None else t.data_ptr()


class EmulatedKernels:
    """The kernels of ``gpu/contract.py`` as the ``cuda`` backend runs them, on contiguous CPU tensors."""

    def __init__(self, library: Path, num_sms: int = NUM_SMS):
        self.lib = ctypes.CDLL(str(library))
        self.num_sms = num_sms
        ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib = self.lib
        lib.sigreg_emu_ecf_partials.argtypes = [i32, i32, ptr, ptr, ptr] + [i64] * 5 + [f64, i64, ptr, ptr]
        lib.sigreg_emu_statistic.argtypes = ([ptr, ptr, ptr] + [i64] * 5 + [f64, i32, i32, f64, f64] + [ptr] * 4
                                             + [i32])
        lib.sigreg_emu_slice_gradient.argtypes = ([i32, i32, ptr, ptr, i64, i64, ptr, ptr, ptr] + [i64] * 5
                                                  + [f64, i64, ptr])
        lib.sigreg_emu_plan_ecf_partials.argtypes = [i64] * 4 + [i32, i64, ptr]
        lib.sigreg_emu_plan_slice_gradient.argtypes = [i64] * 4 + [i32, i64, ptr]
        lib.sigreg_emu_plan_statistic.argtypes = [i64] * 3 + [ptr]
        lib.sigreg_emu_failure.restype = ctypes.c_char_p
        lib.sigreg_emu_set_descending.argtypes = [i32]
        lib.sigreg_emu_set_max_grid_x.argtypes = [i64]
        lib.sigreg_emu_set_max_grid_x.restype = i64
        lib.sigreg_emu_take_launches.restype = i64

    # ---- the emulation's knobs ----

    def failure(self) -> str:
        return self.lib.sigreg_emu_failure().decode()

    def check(self, code: int) -> None:
        assert code != -1, "the kernels reject this problem size"
        assert code == 0, f"launch failed with CUDA error {code}: {self.failure()}"

    def take_launches(self) -> int:
        """Kernel launches since the last call."""
        return self.lib.sigreg_emu_take_launches()

    @contextlib.contextmanager
    def descending(self):
        """Threads and blocks run in descending order (ascending is the default)."""
        self.lib.sigreg_emu_set_descending(1)
        try:
            yield
        finally:
            self.lib.sigreg_emu_set_descending(0)

    @contextlib.contextmanager
    def max_grid_x(self, limit: int):
        """Grid x capped at ``limit`` blocks instead of the hardware's 2^31 - 1."""
        previous = self.lib.sigreg_emu_set_max_grid_x(limit)
        try:
            yield
        finally:
            self.lib.sigreg_emu_set_max_grid_x(previous)

    def run(self, name: str, *args) -> int:
        """A self-test launcher of selftest_kernels.cu on tensors: its CUDA error code."""
        function = getattr(self.lib, name)
        function.argtypes = [ctypes.c_void_p] * len(args)
        return function(*(a.data_ptr() for a in args))

    # ---- the C++ plans (csrc/cuda/sigreg_cuda_kernels.cuh) ----

    def _plan(self, function, count, *args):
        out = (ctypes.c_int64 * count)()
        function(*args, out)
        return list(out)

    def plan_ecf_partials(self, batch, samples, slices, knots, projected, num_sms=None):
        names = ("tile", "k_tiles", "passes", "splits", "rows_per_split", "blocks", "launches")
        values = self._plan(self.lib.sigreg_emu_plan_ecf_partials, 7, batch, samples, slices, knots, int(projected),
                            num_sms or self.num_sms)
        return dict(zip(names, values))

    def plan_slice_gradient(self, batch, samples, slices, knots, projected, num_sms=None):
        names = ("tile", "n_tiles", "k_tiles", "passes", "blocks", "launches")
        values = self._plan(self.lib.sigreg_emu_plan_slice_gradient, 6, batch, samples, slices, knots,
                            int(projected), num_sms or self.num_sms)
        return dict(zip(names, values))

    def plan_statistic(self, batch, slices, knots):
        names = ("slices_per_block", "blocks", "launches", "cached")
        return dict(zip(names, self._plan(self.lib.sigreg_emu_plan_statistic, 4, batch, slices, knots)))

    # ---- the kernels (signatures of sigreg_kernels/gpu/cuda/ops.py) ----

    @staticmethod
    def _mode(directions, tensor_cores):
        return MODE_PROJECTED if directions is None else (MODE_TENSOR_CORES if tensor_cores else MODE_FMA)

    @staticmethod
    def _weights(weights, x):
        """Sample weights as the launcher takes them: float32 [B, N], contiguous (or None)."""
        if weights is None:
            return None
        assert weights.dtype == torch.float32 and weights.shape == x.shape[:2] and weights.is_contiguous(), \
            "weights: float32 [B, N], contiguous"
        return weights

    @staticmethod
    def _counter(arrivals):
        """``arrivals`` (int32, one element) in a guarded buffer, or None."""
        if arrivals is None:
            return None
        assert arrivals.dtype == torch.int32 and arrivals.numel() == 1, "arrivals: an int32 tensor of one element"
        return GuardedOutput((1,), torch.int32, initial=arrivals.reshape(1))

    def ecf_partials(self, x, directions, knots, t_max, arrivals=None, weights=None, *, tensor_cores=True,
                     num_sms=None):
        """``partials [B, S, 2, K, T]`` float32 of ``x [B, N, D]`` (contiguous); sets ``arrivals`` to 0."""
        batch, samples, dim = x.shape
        slices = dim if directions is None else directions.shape[1]
        num_sms = num_sms or self.num_sms
        plan = self.plan_ecf_partials(batch, samples, slices, knots, directions is None, num_sms)
        partials = GuardedOutput((batch, plan["splits"], 2, slices, knots), torch.float32)
        counter = self._counter(arrivals)
        self.check(self.lib.sigreg_emu_ecf_partials(
            DTYPE_CODES[x.dtype], self._mode(directions, tensor_cores), x.data_ptr(), _ptr(directions),
            partials.tensor.data_ptr(), batch, samples, dim, slices, knots, t_max, num_sms,
            None if counter is None else counter.tensor.data_ptr(), _ptr(self._weights(weights, x))))
        if counter is not None:
            arrivals.copy_(counter.checked("arrivals").reshape(arrivals.shape))
        return partials.checked("partials")

    def statistic(self, partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None,
                  moments=None, unbiased=False):
        """``(stat [B, K], coef [B, 2, K, T], loss [])`` float32; ``arrivals`` holds 0 (None: a zeroed
        counter of its own) and is left at 0. ``moments``: float32 ``[B, 2]`` (sum w, sum w^2) or None;
        ``unbiased``: the U-statistic."""
        partials = partials.contiguous()
        batch, splits, _, slices, _ = partials.shape
        if moments is not None:
            assert moments.dtype == torch.float32 and moments.shape == (batch, 2) and moments.is_contiguous(), \
                "moments: float32 [B, 2], contiguous"

        stat = GuardedOutput((batch, slices), torch.float32)
        coef = GuardedOutput((batch, 2, slices, knots), torch.float32)
        loss = GuardedOutput((), torch.float32)
        if batch * slices == 0:  # no launch, as in the ATen launcher
            loss.tensor.fill_(float("nan") if reduction == "mean" else 0.0)
        block_sums = GuardedOutput((self.plan_statistic(batch, slices, knots)["blocks"],), torch.float64)
        counter = self._counter(torch.zeros(1, dtype=torch.int32) if arrivals is None else arrivals)
        self.check(self.lib.sigreg_emu_statistic(
            partials.data_ptr(), stat.tensor.data_ptr(), coef.tensor.data_ptr(), batch, splits, slices, knots,
            samples, t_max, REDUCTION_CODES[reduction], clip_value is not None,
            0.0 if clip_value is None else clip_value, grad_factor, counter.tensor.data_ptr(),
            block_sums.tensor.data_ptr(), loss.tensor.data_ptr(), _ptr(moments), int(unbiased)))
        block_sums.checked("block_sums")
        if arrivals is not None:
            arrivals.copy_(counter.checked("arrivals").reshape(arrivals.shape))
        return stat.checked("stat"), coef.checked("coef"), loss.checked("loss")

    def _gradient(self, g, coef, scale, x, directions, knots, t_max, tensor_cores, num_sms, weights):
        batch, samples, dim = x.shape
        slices = dim if directions is None else directions.shape[1]
        self.check(self.lib.sigreg_emu_slice_gradient(
            DTYPE_CODES[x.dtype], self._mode(directions, tensor_cores), coef.contiguous().data_ptr(),
            scale.data_ptr(), scale.stride(0), scale.stride(1), x.data_ptr(), _ptr(directions), g.data_ptr(),
            batch, samples, dim, slices, knots, t_max, num_sms or self.num_sms, _ptr(self._weights(weights, x))))

    def slice_gradient(self, coef, scale, x, directions, knots, t_max, weights=None, *, tensor_cores=True,
                       num_sms=None):
        """``G [B, N, K]`` in x's dtype; ``scale [B, K]`` float32 with any strides."""
        slices = x.shape[2] if directions is None else directions.shape[1]
        g = GuardedOutput((*x.shape[:2], slices), x.dtype)
        self._gradient(g.tensor, coef, scale, x, directions, knots, t_max, tensor_cores, num_sms, weights)
        return g.checked("G")

    def slice_gradient_(self, projection, coef, scale, knots, t_max, weights=None, *, num_sms=None):
        """Overwrites ``projection [B, N, K]`` with ``G``."""
        g = GuardedOutput(projection.shape, projection.dtype, initial=projection)
        self._gradient(g.tensor, coef, scale, g.tensor, None, knots, t_max, False, num_sms, weights)
        projection.copy_(g.checked("projection"))

    # ---- the op ----

    def sigreg(self, x, directions, *, knots=17, t_max=3.0, reduction="none", tensor_cores=False, clip_value=None,
               weights=None, unbiased=False):
        """SIGReg of ``x [*B, N, D]`` as the ``cuda`` backend computes it (``gpu/fused.py`` around these
        kernels), differentiable; ``directions=None``: the columns of ``x``. ``tensor_cores``: WMMA
        products (TF32 for float32 inputs) instead of exact FMAs, where the kernels compute the product
        (float32 at "highest" precision takes the SGEMM route of gpu/fused.py instead). ``weights``: sample
        weights ``[*B, N]`` (broadcast over the batch dims), as ``sigreg`` takes them; ``unbiased``: the
        U-statistic."""
        batch_shape, samples, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
        name = f"cuda-emulated-{id(self)}-{int(tensor_cores)}"
        fused.register_kernels(name, _FusedKernels(self, tensor_cores))
        flat = x.reshape(math.prod(batch_shape), samples, dim).contiguous()
        if weights is not None:  # as sigreg hands them to the kernels: float32 [B, N], contiguous
            weights = torch.broadcast_to(weights, x.shape[:-1]).reshape(flat.shape[:2]).float().contiguous()
        out = fused.fused_sigreg(name, flat, None if directions is None else directions.contiguous(), knots, t_max,
                                 reduction, clip_value, None, weights, unbiased)
        if reduction != "none":
            return out
        return out.reshape(*batch_shape, dim if directions is None else directions.shape[1])


class _FusedKernels:
    """The four kernels with the signatures ``gpu/fused.py`` calls, on the emulation."""

    def __init__(self, kernels: EmulatedKernels, tensor_cores: bool):
        self.kernels, self.tensor_cores = kernels, tensor_cores

    def ecf_partials(self, x, directions, knots, t_max, arrivals=None, weights=None):
        return self.kernels.ecf_partials(x.contiguous(), None if directions is None else directions.contiguous(),
                                         knots, t_max, arrivals, weights, tensor_cores=self.tensor_cores)

    def statistic(self, partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None,
                  moments=None, unbiased=False):
        return self.kernels.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals,
                                      moments, unbiased)

    def slice_gradient(self, coef, scale, x, directions, knots, t_max, weights=None):
        return self.kernels.slice_gradient(coef, scale, x.contiguous(),
                                           None if directions is None else directions.contiguous(), knots, t_max,
                                           weights, tensor_cores=self.tensor_cores)

    def slice_gradient_(self, projection, coef, scale, knots, t_max, weights=None):
        self.kernels.slice_gradient_(projection, coef, scale, knots, t_max, weights)
