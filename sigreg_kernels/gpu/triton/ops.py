"""The Triton backend's four ops: launch by ``gpu/triton/plan.py``, registration with torch.

    sigreg::triton_ecf_partials(Tensor x, Tensor? directions, int knots, float t_max,
                                Tensor(a!)? arrivals, Tensor? weights=None) -> Tensor
    sigreg::triton_statistic(Tensor partials, int samples, int knots, float t_max, str reduction,
                             float? clip_value, float grad_factor, Tensor? arrivals=None,
                             Tensor? moments=None, bool unbiased=False) -> (Tensor, Tensor, Tensor)
    sigreg::triton_slice_gradient(Tensor coef, Tensor scale, Tensor x, Tensor? directions,
                                  int knots, float t_max, Tensor? weights=None) -> Tensor
    sigreg::triton_slice_gradient_(Tensor(a!) projection, Tensor coef, Tensor scale,
                                   int knots, float t_max, Tensor? weights=None) -> ()

Semantics: exactly ``gpu/contract.py``'s functions of the same names, each one kernel
launch (several only past the 65535 grid cap on huge batches) and no other device work
(outputs are allocated with torch.empty; ``statistic`` without ``arrivals`` zeroes a
counter of its own). ``weights`` / ``moments``: the contract's sample weights, a
constexpr switch of the same kernels (the unweighted kernels compile as without it),
planned with the weighted kernels' resources. No autograd here: ``gpu/fused.py`` does it and
calls the four plain functions ``ecf_partials``, ``statistic``, ``slice_gradient``,
``slice_gradient_`` below. The kernels are in ``gpu/triton/kernels.py``.

Registration: ``torch.library.triton_op`` on the GPU, ``torch.library.custom_op`` under
``TRITON_INTERPRET=1``; one launcher function either way. triton_op + ``wrap_triton``
let torch.compile see the kernels (Inductor launches them from its generated code), and
triton_op traces the launcher itself as its fake kernel. Under the interpreter that
tracing cannot work (``wrap_triton`` hands back the interpreted kernel, which would run
on fake tensors), so the same launchers are registered as opaque custom_ops with
explicit fake kernels, which pass opcheck and torch.compile. The choice is made once,
when this module is first imported, the moment ``triton.jit`` decides whether the
kernels are compiled or interpreted. ``SIGREG_TRITON_REGISTRATION=triton_op|custom_op``,
read at that same import, overrides it (triton_op under the interpreter runs eager calls
only).

Eager calls skip the registration: ``ecf_partials``, ``statistic``, ``slice_gradient`` and
``slice_gradient_``, the functions gpu/fused.py calls, run their launchers directly on plain
tensors outside autograd and tracing (``_launches_directly``), since the registered op's
dispatch is host time and nothing else there; everywhere else they call the registered op.

``LAUNCHES`` counts the kernel launches of each op made by these launchers (eager calls;
under torch.compile with triton_op, Inductor launches the kernels itself).
"""

import collections
import contextlib
import functools
import os
import re
from typing import Optional

import torch
import triton

from ...core.numerics import loss_divisor, loss_factor
from ...core.quadrature import knot_spacing
from . import plan
from .kernels import (
    ecf_partials_kernel,
    ecf_partials_projected_kernel,
    slice_gradient_kernel,
    slice_gradient_projected_kernel,
    statistic_kernel,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Off the GPU the plans get one "SM" and no waves criterion (min_waves=0): the interpreter
# pays per tile, so it runs each kernel's first (largest) candidate, still in several splits.
INTERPRETER_NUM_SMS = 1


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

LAUNCHES: collections.Counter = collections.Counter()


def _counted(op: str) -> None:
    """Every launch below goes through here first: the op-count tests read LAUNCHES."""
    LAUNCHES[op] += 1


def _register(name: str, mutates_args=()):
    if REGISTRATION == "custom_op":
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision, following torch.matmul: fp32 uses TF32 only when allowed."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp16/bf16 ignore it


def tensor_cores(dtype: torch.dtype) -> bool:
    return dot_precision(dtype) == "tf32"


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """What the plans are given: the device's SM count, or a small fixed number off the GPU."""
    if device.type == "cuda":
        return _device_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_NUM_SMS


def _min_waves(device: torch.device) -> float:
    return plan.MIN_WAVES if device.type == "cuda" else 0


# CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2^31 - 1); axis 2 carries
# the batch index, so a larger batch takes several launches.
MAX_GRID_Z = 65535


def _batch_chunks(batch: int) -> list[tuple[int, int]]:
    """(first batch index, count) per launch, each with at most MAX_GRID_Z programs on grid axis 2."""
    if batch <= MAX_GRID_Z:  # the usual case: one launch, with no loop over a (maybe symbolic) batch size
        return [(0, batch)]
    return [(start, min(MAX_GRID_Z, batch - start)) for start in range(0, batch, MAX_GRID_Z)]


def _check_float(name: str, tensor: torch.Tensor, dims: int) -> None:
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32 {name}, got {tensor.dtype} "
                        "(float64 runs on the 'cpu' and 'reference' backends)")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(tensor.shape)}")


def _check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the triton kernels of this process were compiled for CUDA: set "
                           "TRITON_INTERPRET=1 before sigreg_kernels.gpu.triton.ops is first imported "
                           "to run them on CPU tensors")
    if tensor.device.type == "cpu" and (problem := _interpreter_numpy_problem()):
        raise RuntimeError(problem)


def _check_projection_inputs(x: torch.Tensor, directions: Optional[torch.Tensor]) -> None:
    _check_float("x", x, 3)
    if directions is not None:
        if directions.dtype != x.dtype:
            raise TypeError(f"directions ({directions.dtype}) must have x's dtype ({x.dtype})")
        if directions.dim() != 2 or directions.shape[0] != x.shape[2]:
            raise ValueError(f"expected x: [B, N, D] and directions: [D, K], got {tuple(x.shape)} and "
                             f"{tuple(directions.shape)}")
    _check_device(x)


def _check_arrivals(arrivals: Optional[torch.Tensor], device: torch.device) -> None:
    if arrivals is not None and (arrivals.dtype != torch.int32 or arrivals.numel() != 1
                                 or arrivals.device != device):
        raise ValueError(f"arrivals must be an int32 tensor of one element on {device}, got {arrivals.dtype} "
                         f"{tuple(arrivals.shape)} on {arrivals.device}")


def _check_weights(weights: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """The sample weights: None, or float32 [B, N] contiguous on x's device (the kernels index them b * N + n)."""
    batch, samples = x.shape[0], x.shape[1]
    if weights is not None and (weights.dtype != torch.float32 or tuple(weights.shape) != (batch, samples)
                                or not weights.is_contiguous() or weights.device != x.device):
        raise ValueError(f"weights must be a contiguous float32 tensor [{batch}, {samples}] on {x.device}, got "
                         f"{weights.dtype} {tuple(weights.shape)} on {weights.device}")


def _check_moments(moments: Optional[torch.Tensor], partials: torch.Tensor) -> None:
    batch = partials.shape[0]
    if moments is not None and (moments.dtype != torch.float32 or tuple(moments.shape) != (batch, 2)
                                or moments.device != partials.device):
        raise ValueError(f"moments must be a float32 tensor [{batch}, 2] on {partials.device}, got {moments.dtype} "
                         f"{tuple(moments.shape)} on {moments.device}")


def _check_coefficients(coef: torch.Tensor, scale: torch.Tensor, batch: int, slices: int, knots: int) -> None:
    if coef.dtype != torch.float32 or tuple(coef.shape) != (batch, 2, slices, knots):
        raise ValueError(f"coef must be float32 [{batch}, 2, {slices}, {knots}], got {coef.dtype} "
                         f"{tuple(coef.shape)}")
    if coef.stride(3) != 1:
        raise ValueError("coef must have a contiguous knot axis")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (batch, slices):
        raise ValueError(f"scale must be float32 [{batch}, {slices}], got {scale.dtype} {tuple(scale.shape)}")


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


def _ints(*sizes) -> list[int]:
    """Plain ints for the plans (symbolic sizes under tracing are specialized: the grid and
    the splits are functions of the shapes)."""
    return [int(size) for size in sizes]


@functools.lru_cache(maxsize=1024)
def _cached_plan(planner, *args, **kwargs):
    """A plan is a pure function of its arguments (plain ints, a dtype, flags): planned once per
    shape, not at every call (choosing among the candidates costs tens of microseconds on the
    host). Code that changes the candidate lists clears this cache (``_cached_plan.cache_clear()``)."""
    return planner(*args, **kwargs)


def _ecf_plan(x: torch.Tensor, directions: Optional[torch.Tensor], knots: int, weighted: bool = False):
    batch, samples, dim = _ints(*x.shape)
    slices = dim if directions is None else int(directions.shape[1])
    return _cached_plan(plan.plan_ecf_partials, batch, samples, dim, slices, knots, x.dtype, tensor_cores(x.dtype),
                        directions is None, num_sms(x.device), min_waves=_min_waves(x.device), weighted=weighted)


# Launch arguments: (grid, positional args, keyword args incl. num_warps/num_stages), one
# function per kernel, used by the launchers and by the tests that compile each plan's
# kernels for sm_90 (with meta tensors).
def ecf_partials_args(x, directions, partials, kernel_plan, knots: int, t_max: float, start: int, count: int,
                      arrivals=None, weights=None):
    batch, samples, dim = x.shape
    slices = partials.shape[3]
    tile = kernel_plan.tile
    grid = (kernel_plan.grid[0], kernel_plan.splits, count)
    common = (kernel_plan.rows_per_split, plan.knot_chunks(knots), start)
    meta = {"KNOTS": knots, "KC": tile["KC"], "BLOCK_K": tile["BLOCK_K"], "BLOCK_N": tile["BLOCK_N"],
            "ZERO_ARRIVALS": arrivals is not None, "HAS_WEIGHTS": weights is not None,
            "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
    arrivals = partials if arrivals is None else arrivals  # pointers the kernel then never touches
    weights = partials if weights is None else weights
    if directions is None:
        args = (x, partials, arrivals, weights, samples, slices, *common, *x.stride(), *partials.stride()[:4],
                knot_spacing(knots, t_max))
    else:
        args = (x, directions, partials, arrivals, weights, samples, dim, slices, *common, *x.stride(),
                *directions.stride(), *partials.stride()[:4], knot_spacing(knots, t_max))
        meta.update(BLOCK_D=tile["BLOCK_D"], WARPS_N=tile["WARPS_N"], RESIDENT=tile["RESIDENT"],
                    PRECISION=dot_precision(x.dtype), DOT_UPCAST=INTERPRET, LEAN=tile["LEAN"])
    return grid, args, meta


def statistic_args(partials, stat, coef, block_sums, loss, arrivals, kernel_plan, samples: int, knots: int,
                   t_max: float, factor: float, clip_value: Optional[float], divisor: int, moments=None,
                   unbiased: bool = False):
    _, splits, _, slices, _ = partials.shape
    tile = kernel_plan.tile
    # Without moments: a pointer and strides the kernel never reads.
    moments_args = (partials, 0, 0) if moments is None else (moments, *moments.stride())
    args = (partials, stat, coef, block_sums, loss, arrivals, moments_args[0], splits, slices,
            triton.cdiv(slices, tile["BLOCK_K"]), kernel_plan.grid[0], divisor, *partials.stride()[:4],
            *stat.stride(), *coef.stride()[:3], *moments_args[1:],
            float(samples), knot_spacing(knots, t_max), factor, 0.0 if clip_value is None else float(clip_value))
    meta = {"KNOTS": knots, "KNOTS_PAD": tile["KNOTS_PAD"], "HAS_CLIP": clip_value is not None,
            "BLOCK_K": tile["BLOCK_K"], "SUM_BLOCK": tile["SUM_BLOCK"], "HAS_MOMENTS": moments is not None,
            "UNBIASED": unbiased, "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
    return kernel_plan.grid, args, meta


def slice_gradient_args(coef, scale, x, directions, out, kernel_plan, knots: int, t_max: float, start: int,
                        count: int, weights=None):
    batch, samples, dim = x.shape
    slices = out.shape[2]
    tile = kernel_plan.tile
    grid = (kernel_plan.grid[0], kernel_plan.grid[1], count)
    meta = {"KNOTS": knots, "KC": tile["KC"], "BLOCK_K": tile["BLOCK_K"], "BLOCK_N": tile["BLOCK_N"],
            "HAS_WEIGHTS": weights is not None, "num_warps": tile["num_warps"], "num_stages": tile["num_stages"]}
    head = (*coef.stride()[:3], *scale.stride())
    weights = coef if weights is None else weights  # a pointer the kernel then never touches
    if directions is None:
        args = (coef, scale, x, out, weights, samples, slices, kernel_plan.rows_per_split, start, *head,
                *x.stride(), *out.stride(), knot_spacing(knots, t_max))
        meta["SAME_STRIDES"] = x.stride()[1:] == out.stride()[1:]
    else:
        args = (coef, scale, x, directions, out, weights, samples, dim, slices, kernel_plan.rows_per_split, start,
                *head, *x.stride(), *directions.stride(), *out.stride(), knot_spacing(knots, t_max))
        meta.update(BLOCK_D=tile["BLOCK_D"], RESIDENT=tile["RESIDENT"], PRECISION=dot_precision(x.dtype),
                    DOT_UPCAST=INTERPRET)
    return grid, args, meta


# arrivals has no default: torch < 2.13 looks a mutated argument up among the arguments as
# passed, and an omitted one fails there (IndexError). ecf_partials below supplies it.
def _launch_ecf_partials(x: torch.Tensor, directions: Optional[torch.Tensor], knots: int, t_max: float,
                         arrivals: Optional[torch.Tensor],
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``partials [B, S, 2, K, knots]`` (float32), and ``arrivals`` set to 0: primitives.ecf_partials."""
    _check_projection_inputs(x, directions)
    _check_arrivals(arrivals, x.device)
    _check_weights(weights, x)
    batch, _, dim = x.shape
    slices = dim if directions is None else directions.shape[1]
    kernel_plan = _ecf_plan(x, directions, knots, weights is not None)
    partials = x.new_empty((batch, kernel_plan.splits, 2, slices, knots), dtype=torch.float32)
    with _device_guard(x):
        for start, count in _batch_chunks(batch):
            grid, args, meta = ecf_partials_args(x, directions, partials, kernel_plan, knots, t_max, start, count,
                                                 arrivals, weights)
            _counted("triton_ecf_partials")
            if directions is None:
                wrap_triton(ecf_partials_projected_kernel)[grid](*args, **meta)
            else:
                wrap_triton(ecf_partials_kernel)[grid](*args, **meta)
    return partials


triton_ecf_partials = _register("sigreg::triton_ecf_partials", mutates_args=("arrivals",))(_launch_ecf_partials)


# arrivals is written, but left as it was found (0): not declared as mutated.
def _launch_statistic(partials: torch.Tensor, samples: int, knots: int, t_max: float, reduction: str,
                      clip_value: Optional[float], grad_factor: float, arrivals: Optional[torch.Tensor] = None,
                      moments: Optional[torch.Tensor] = None,
                      unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(stat [B, K], coef [B, 2, K, knots], loss [])`` (float32): primitives.statistic."""
    if partials.dtype != torch.float32 or partials.dim() != 5 or partials.shape[2] != 2 or partials.shape[4] != knots:
        raise ValueError(f"partials must be float32 [B, S, 2, K, {knots}], got {partials.dtype} "
                         f"{tuple(partials.shape)}")
    if partials.stride(4) != 1:
        raise ValueError("partials must have a contiguous knot axis")
    _check_device(partials)
    _check_arrivals(arrivals, partials.device)
    _check_moments(moments, partials)
    batch, splits, _, slices, _ = partials.shape
    factor = loss_factor(reduction, batch, slices, grad_factor)
    kernel_plan = _cached_plan(plan.plan_statistic, *_ints(batch, splits, slices), knots, num_sms(partials.device))
    stat = partials.new_empty((batch, slices))
    coef = partials.new_empty((batch, 2, slices, knots))
    loss = partials.new_empty(())
    block_sums = partials.new_empty((kernel_plan.grid[0],), dtype=torch.float64)  # one partial loss per program
    if arrivals is None:
        arrivals = torch.zeros(1, dtype=torch.int32, device=partials.device)
    grid, args, meta = statistic_args(partials, stat, coef, block_sums, loss, arrivals, kernel_plan, samples, knots,
                                      t_max, factor, clip_value, loss_divisor(reduction, batch, slices), moments,
                                      unbiased)
    if grid[0] == 0:  # nothing to launch: the loss of no statistics
        return stat, coef, loss.fill_(float("nan") if reduction == "mean" else 0.0)
    with _device_guard(partials):
        _counted("triton_statistic")
        wrap_triton(statistic_kernel)[grid](*args, **meta)
    return stat, coef, loss


triton_statistic = _register("sigreg::triton_statistic")(_launch_statistic)


def _slice_gradient_plan(x: torch.Tensor, directions: Optional[torch.Tensor], knots: int,
                         weighted: bool = False):
    batch, samples, dim = _ints(*x.shape)
    slices = dim if directions is None else int(directions.shape[1])
    return _cached_plan(plan.plan_slice_gradient, batch, samples, dim, slices, knots, x.dtype,
                        tensor_cores(x.dtype), directions is None, num_sms(x.device),
                        min_waves=_min_waves(x.device), weighted=weighted)


def _launch_slice_gradient(coef: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                           directions: Optional[torch.Tensor], knots: int, t_max: float,
                           weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``G [B, N, K]`` in x's dtype: primitives.slice_gradient."""
    _check_projection_inputs(x, directions)
    _check_weights(weights, x)
    batch, samples, dim = x.shape
    slices = dim if directions is None else directions.shape[1]
    _check_coefficients(coef, scale, batch, slices, knots)
    kernel_plan = _slice_gradient_plan(x, directions, knots, weights is not None)
    grad = x.new_empty((batch, samples, slices))
    with _device_guard(x):
        for start, count in _batch_chunks(batch):
            grid, args, meta = slice_gradient_args(coef, scale, x, directions, grad, kernel_plan, knots, t_max,
                                                   start, count, weights)
            _counted("triton_slice_gradient")
            if directions is None:
                wrap_triton(slice_gradient_projected_kernel)[grid](*args, **meta)
            else:
                wrap_triton(slice_gradient_kernel)[grid](*args, **meta)
    return grad


triton_slice_gradient = _register("sigreg::triton_slice_gradient")(_launch_slice_gradient)


def _launch_slice_gradient_(projection: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, knots: int,
                            t_max: float, weights: Optional[torch.Tensor] = None) -> None:
    """Overwrites ``projection [B, N, K]`` with G: primitives.slice_gradient_ (each element is
    read, then written, by the same thread)."""
    _check_projection_inputs(projection, None)
    _check_weights(weights, projection)
    batch, _, slices = projection.shape
    _check_coefficients(coef, scale, batch, slices, knots)
    kernel_plan = _slice_gradient_plan(projection, None, knots, weights is not None)
    with _device_guard(projection):
        for start, count in _batch_chunks(batch):
            grid, args, meta = slice_gradient_args(coef, scale, projection, None, projection, kernel_plan, knots,
                                                   t_max, start, count, weights)
            _counted("triton_slice_gradient_")
            wrap_triton(slice_gradient_projected_kernel)[grid](*args, **meta)


triton_slice_gradient_ = _register("sigreg::triton_slice_gradient_",
                                   mutates_args=("projection",))(_launch_slice_gradient_)


if REGISTRATION == "custom_op":  # triton_op traces the launchers as their fake kernels
    @triton_ecf_partials.register_fake
    def _(x, directions, knots, t_max, arrivals, weights=None):
        batch, _, dim = x.shape
        slices = dim if directions is None else directions.shape[1]
        splits = _ecf_plan(x, directions, knots, weights is not None).splits
        return x.new_empty((batch, splits, 2, slices, knots), dtype=torch.float32)

    @triton_statistic.register_fake
    def _(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None, moments=None,
          unbiased=False):
        batch, _, _, slices, _ = partials.shape
        stat, coef = partials.new_empty((batch, slices)), partials.new_empty((batch, 2, slices, knots))
        return stat, coef, partials.new_empty(())

    @triton_slice_gradient.register_fake
    def _(coef, scale, x, directions, knots, t_max, weights=None):
        batch, samples, dim = x.shape
        slices = dim if directions is None else directions.shape[1]
        return x.new_empty((batch, samples, slices))

    @triton_slice_gradient_.register_fake
    def _(projection, coef, scale, knots, t_max, weights=None):
        return None


def _launches_directly(*tensors) -> bool:
    """Whether an eager call may run its launcher without the registered op around it: the op's
    dispatch (custom_op's Python layers, tens of microseconds per call) buys nothing for plain
    tensors outside any tracing. Not under torch.compile, a dispatch mode (FakeTensor, make_fx, op
    counters), a functorch transform or a tensor subclass; and not with grad mode on, where the
    op's missing autograd must still raise (e.g. a double backward through gpu/fused.py's)."""
    return (_DIRECT_LAUNCH is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or (type(t) is torch.Tensor and not _is_functorch_wrapped(t)) for t in tensors))


def _direct_launch_context():
    """Where a launcher runs outside its op: triton_op's eager calls launch the kernels with
    wrap_triton switched off (its higher-order-op dispatch costs about a millisecond per call);
    the custom_op registration's wrap_triton is the kernel itself."""
    if REGISTRATION == "custom_op":
        return contextlib.nullcontext()
    return _DIRECT_LAUNCH(False)


try:  # torch's switch for triton_op's eager calls; without it every call takes the registered op
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
    from torch._library.triton import set_wrap_triton_enabled as _DIRECT_LAUNCH
except ImportError:
    _DIRECT_LAUNCH = _is_functorch_wrapped = None


def _eager_or_registered(launcher, registered, args, tensors, mutated=None):
    """``launcher(*args)`` directly where _launches_directly allows (on ``tensors``), else the
    registered op ``registered(*args)``. ``mutated``: the tensor the op declares it writes, whose
    version a direct launch bumps as the op would (autograd then catches a saved tensor overwritten)."""
    if not _launches_directly(*tensors):
        return registered(*args)
    with _direct_launch_context():
        out = launcher(*args)
    if mutated is not None:
        torch.autograd.graph.increment_version(mutated)
    return out


# The plain callables gpu/fused.py routes backend="triton" to (ecf_partials with its counter
# optional, like the CUDA backend's). The registered ops are looked up at each call.
def ecf_partials(x: torch.Tensor, directions: Optional[torch.Tensor], knots: int, t_max: float,
                 arrivals: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _eager_or_registered(_launch_ecf_partials, triton_ecf_partials, (x, directions, knots, t_max, arrivals,
                                weights), (x, directions, arrivals, weights), mutated=arrivals)


def statistic(partials, samples: int, knots: int, t_max: float, reduction: str, clip_value, grad_factor: float,
              arrivals=None, moments=None, unbiased: bool = False):
    return _eager_or_registered(_launch_statistic, triton_statistic, (partials, samples, knots, t_max, reduction,
                                clip_value, grad_factor, arrivals, moments, unbiased), (partials, arrivals, moments))


def slice_gradient(coef, scale, x, directions, knots: int, t_max: float, weights=None):
    return _eager_or_registered(_launch_slice_gradient, triton_slice_gradient, (coef, scale, x, directions, knots,
                                t_max, weights), (coef, scale, x, directions, weights))


def slice_gradient_(projection, coef, scale, knots: int, t_max: float, weights=None):
    _eager_or_registered(_launch_slice_gradient_, triton_slice_gradient_, (projection, coef, scale, knots, t_max,
                         weights), (projection, coef, scale, weights), mutated=projection)
