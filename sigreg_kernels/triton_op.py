"""The Triton op ``sigreg::ecf_sums_triton`` and its backward: launch, autotuning, registration.

The contract of both ops is in ``op_registration.py``; the kernels are in
``triton_kernels.py``.

Registration: ``torch.library.triton_op`` on the GPU, ``torch.library.custom_op``
under ``TRITON_INTERPRET=1``; one launcher function either way. triton_op +
``wrap_triton`` let torch.compile see the kernels and the small torch ops around
them (Inductor launches the kernels from its generated code, with no Python op call
per step, and may fuse the partial-sum reduction into what follows), and triton_op
traces this function itself as its fake kernel. Under the interpreter that tracing
cannot work: ``wrap_triton`` hands back the interpreted kernel, which then runs on
fake tensors, so opcheck and torch.compile fail. There the same launcher is
registered as an opaque custom_op with explicit fake kernels, which passes both, so
CPU CI tests the kernels, autograd, opcheck and compile. The choice is made once,
when this module is first imported, the moment ``triton.jit`` decides whether the
kernels are compiled or interpreted.

``SIGREG_TRITON_REGISTRATION=triton_op|custom_op``, read at that same import,
overrides the default. With ``triton_op`` under the interpreter, eager calls work
(the op runs the launcher with wrap_triton off, which hands back the kernels
themselves), so the CPU tests run the GPU's registration, autograd included, in
eager mode; opcheck and torch.compile still need the default there.
"""

import contextlib
import functools
import os
import re

import torch
import triton

from . import triton_kernels as kernels
from .op_registration import fake_ecf_sums, fake_ecf_sums_backward, register_ecf_autograd
from .quadrature import knot_spacing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _registration_choice() -> str:
    choice = os.environ.get("SIGREG_TRITON_REGISTRATION") or ("custom_op" if INTERPRET else "triton_op")
    if choice not in ("triton_op", "custom_op"):
        raise ValueError(f"SIGREG_TRITON_REGISTRATION must be 'triton_op' or 'custom_op', got {choice!r}")
    return choice


REGISTRATION = _registration_choice()

if REGISTRATION == "triton_op":
    # Called by name in the launchers below: triton_op finds their kernels by reading
    # the source for wrap_triton(...) calls.
    from torch.library import wrap_triton
else:
    def wrap_triton(kernel):
        """An opaque custom_op launches its kernels directly. (Before torch 2.13, torch's
        wrap_triton outside a triton_op returns a tracing wrapper that fails on an
        interpreted kernel.)"""
        return kernel

# Block sizes. GPU: a few configs for H100, tuned per problem (_KEY). Compiled for sm_90a
# (ptxas -v, no GPU needed), the first config of each list spills no registers in
# bf16 and at most ~200 bytes in fp32, whose tl.dot (FMA when TF32 is off) needs more
# registers than the tensor cores, hence BLOCK_D = 32. What fills the registers: the
# [BLOCK_N, BLOCK_K] tiles of cos, sin and their rotation step, and the backward's
# [BLOCK_N, BLOCK_DX <= 256] fp32 dx accumulator.
# The interpreter cannot autotune over several configs and pays per program, so it
# gets one config with 32-wide blocks (small test shapes still span several blocks).
# ROW_QUANTUM (rows per split are a multiple of it) is at least every BLOCK_N, so a
# split never depends on the config the autotuner picks.
# The GPU lists exist in every process, so that the CPU tests can run each GPU
# config, one at a time, under the interpreter.
_GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=3),
]
_GPU_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
]
_GPU_BLOCK_LIMITS = (128, 256, 128)  # ROW_QUANTUM, MAX_BLOCK_DX, MAX_BLOCK_DA
if INTERPRET:
    _FWD_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32})]
    _BWD_CONFIGS = _FWD_CONFIGS
    ROW_QUANTUM, MAX_BLOCK_DX, MAX_BLOCK_DA = 32, 64, 64
else:
    _FWD_CONFIGS, _BWD_CONFIGS = _GPU_FWD_CONFIGS, _GPU_BWD_CONFIGS
    ROW_QUANTUM, MAX_BLOCK_DX, MAX_BLOCK_DA = _GPU_BLOCK_LIMITS

# PRECISION: an fp32 dot in IEEE (FMA) and in TF32 (tensor cores) differ in speed and
# registers, so each gets its own choice. (The autotuner adds the tensors' dtypes.)
_KEY = ["N", "D", "K", "KNOTS", "PRECISION"]
# Every program stores its whole output block, so autotuning reruns are harmless.
# Results are bit-identical run to run either way; the block sizes set the summation
# order, so under torch.use_deterministic_algorithms(True) the first config is used
# every time, and results also agree across processes, whatever the timings.
_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_KEY)(kernels._sigreg_fwd_kernel)
_fwd_fixed = triton.autotune(configs=_FWD_CONFIGS[:1], key=_KEY)(kernels._sigreg_fwd_kernel)
_bwd_dx_tuned = triton.autotune(configs=_BWD_CONFIGS, key=_KEY)(kernels._sigreg_bwd_dx_kernel)
_bwd_dx_fixed = triton.autotune(configs=_BWD_CONFIGS[:1], key=_KEY)(kernels._sigreg_bwd_dx_kernel)
_bwd_da_tuned = triton.autotune(configs=_BWD_CONFIGS, key=_KEY)(kernels._sigreg_bwd_da_kernel)
_bwd_da_fixed = triton.autotune(configs=_BWD_CONFIGS[:1], key=_KEY)(kernels._sigreg_bwd_da_kernel)


def _register(name: str):
    if REGISTRATION == "custom_op":
        return torch.library.custom_op(name, mutates_args=())
    return torch.library.triton_op(name, mutates_args=())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision, following torch.matmul: fp32 uses TF32 only when allowed."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp16/bf16 ignore it


@functools.cache
def _target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: a couple per SM; a few in the interpreter."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _row_splits(rows: int, other_programs: int, device: torch.device):
    """(rows_per_split, splits): slabs of rows, each reduced by one program per slice block.

    Enough splits to fill the device; the partials are O(splits * K * T), not O(N).
    """
    wanted = max(1, min(triton.cdiv(_target_programs(device), max(other_programs, 1)),
                        triton.cdiv(rows, ROW_QUANTUM)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, wanted), ROW_QUANTUM) * ROW_QUANTUM
    return rows_per_split, triton.cdiv(rows, rows_per_split)


# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2^31 - 1); axis 2 carries
# the batch index, so a larger batch takes several launches.
MAX_GRID_Z = 65535


def _batch_chunks(batch: int, programs_per_index: int = 1) -> list[tuple[int, int]]:
    """(first batch index, count) per launch, each with at most MAX_GRID_Z programs on grid axis 2."""
    step = max(1, MAX_GRID_Z // programs_per_index)
    if batch <= step:  # the usual case: one launch, with no loop over a (maybe symbolic) batch size
        return [(0, batch)]
    return [(start, min(step, batch - start)) for start in range(0, batch, step)]


def _grid(axis0: int, block: str, axis1: int, axis2: int):
    """The launch grid: ``axis0`` in blocks of the autotuned ``block``, then two fixed counts."""

    def grid(meta):
        return (triton.cdiv(axis0, meta[block]), axis1, axis2)

    return grid


def _feature_block(dim: int, largest: int) -> int:
    """A chunk of D held by one program's accumulator: all of D up to ``largest``, and >= 16 (tl.dot)."""
    return max(16, min(triton.next_power_of_2(dim), largest))


def _check_inputs(x: torch.Tensor, directions: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32 x, got {x.dtype} "
                        "(float64 runs on the 'cpu' and 'reference' backends)")
    if directions.dtype != x.dtype:
        raise TypeError(f"directions ({directions.dtype}) must have x's dtype ({x.dtype})")
    if x.dim() != 3 or directions.dim() != 2 or directions.shape[0] != x.shape[2]:
        raise ValueError(f"expected x: [B, N, D] and directions: [D, K], got {tuple(x.shape)} and "
                         f"{tuple(directions.shape)}")
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the triton kernels of this process were compiled for CUDA: set "
                           "TRITON_INTERPRET=1 before sigreg_kernels.triton_op is first imported "
                           "to run them on CPU tensors")
    if x.device.type == "cpu" and (problem := _interpreter_numpy_problem()):
        raise RuntimeError(problem)


@functools.cache
def _interpreter_numpy_problem() -> str | None:
    """Why this triton's interpreter cannot run here, or None.

    Before triton 3.7 the interpreter turns its 1-element arrays into loop bounds with
    int(), which numpy 2.4 rejects (a deprecation since numpy 1.25): every kernel with
    a loop fails with "only 0-dimensional arrays can be converted to Python scalars".
    """
    import numpy

    def major_minor(version: str) -> tuple[int, int]:  # "3.6.0", "3.7rc1", "2.5.0+git1" -> (3, 6), (3, 7), (2, 5)
        major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
        return int(major), int(minor)

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
                f"{numpy.__version__}: install numpy<2.4, or triton>=3.7")
    return None


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _common_flags(x: torch.Tensor, knots: int) -> dict:
    return {"KNOTS": knots, "PRECISION": dot_precision(x.dtype), "DOT_UPCAST": INTERPRET}


@_register("sigreg::ecf_sums_triton")
def ecf_sums_triton(x: torch.Tensor, directions: torch.Tensor, knots: int,
                    t_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sums [B, 2, K, knots]`` (fp32) of cos/sin(t_j p) over the N samples of ``x: [B, N, D]``."""
    _check_inputs(x, directions)
    batch, samples, dim = x.shape
    slices = directions.shape[1]
    rows_per_split, splits = _row_splits(samples, batch * triton.cdiv(slices, 64), x.device)
    partial = x.new_empty((batch, splits, 2, slices, knots), dtype=torch.float32)
    fwd = _fwd_fixed if torch.are_deterministic_algorithms_enabled() else _fwd_tuned
    with _device_guard(x):
        for start, count in _batch_chunks(batch):
            wrap_triton(fwd)[_grid(slices, "BLOCK_K", splits, count)](
                x, directions, partial,
                samples, dim, slices, rows_per_split, start,
                *x.stride(), *directions.stride(), *partial.stride(),
                knot_spacing(knots, t_max),
                KNOTS_PAD=triton.next_power_of_2(knots), **_common_flags(x, knots),
            )
    # Fixed-order sum of the per-split partials: deterministic, no atomics.
    sums = partial[:, 0] if splits == 1 else partial.sum(dim=1)
    return sums, x.new_empty((0,), dtype=torch.float32)


@_register("sigreg::ecf_sums_triton_backward")
def ecf_sums_triton_backward(grad_sums: torch.Tensor, x: torch.Tensor, directions: torch.Tensor,
                             projection: torch.Tensor, knots: int, t_max: float,
                             need_grad_directions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x [B, N, D], grad_directions [D, K] or [0])`` from ``grad_sums [B, 2, K, knots]``."""
    _check_inputs(x, directions)
    batch, samples, dim = x.shape
    slices = directions.shape[1]
    grad_sums = grad_sums.to(torch.float32)
    delta = knot_spacing(knots, t_max)
    flags = _common_flags(x, knots)
    grad_x = torch.empty_like(x)
    block_dx = _feature_block(dim, MAX_BLOCK_DX)
    deterministic = torch.are_deterministic_algorithms_enabled()
    bwd_dx = _bwd_dx_fixed if deterministic else _bwd_dx_tuned
    with _device_guard(x):
        for start, count in _batch_chunks(batch):
            wrap_triton(bwd_dx)[_grid(samples, "BLOCK_N", triton.cdiv(dim, block_dx), count)](
                x, directions, grad_sums, grad_x,
                samples, dim, slices, start,
                *x.stride(), *directions.stride(), *grad_sums.stride(), *grad_x.stride(),
                delta, BLOCK_DX=block_dx, **flags,
            )
    if not need_grad_directions:
        return grad_x, directions.new_empty((0,))

    block_da = _feature_block(dim, MAX_BLOCK_DA)
    da_blocks = triton.cdiv(dim, block_da)
    rows_per_split, splits = _row_splits(samples, batch * da_blocks * triton.cdiv(slices, 64), x.device)
    partial = x.new_empty((batch * splits, dim, slices), dtype=torch.float32)
    bwd_da = _bwd_da_fixed if deterministic else _bwd_da_tuned
    with _device_guard(x):
        for start, count in _batch_chunks(batch, splits):
            wrap_triton(bwd_da)[_grid(slices, "BLOCK_K", da_blocks, count * splits)](
                x, directions, grad_sums, partial,
                samples, dim, slices, rows_per_split, splits, start * splits,
                *x.stride(), *directions.stride(), *grad_sums.stride(), *partial.stride(),
                delta, BLOCK_DA=block_da, **flags,
            )
    # Fixed-order sum over batch indices and splits: deterministic, no atomics.
    grad_directions = partial[0] if partial.shape[0] == 1 else partial.sum(dim=0)
    return grad_x, grad_directions.to(directions.dtype)


if REGISTRATION == "custom_op":  # triton_op traces the launcher as its fake kernel; custom_op needs them spelled out
    @ecf_sums_triton.register_fake
    def _fake_ecf_sums_triton(x, directions, knots, t_max):
        return fake_ecf_sums(x, directions, knots, t_max, keeps_projection=False)

    ecf_sums_triton_backward.register_fake(fake_ecf_sums_backward)

register_ecf_autograd(ecf_sums_triton, ecf_sums_triton_backward)
