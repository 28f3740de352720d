"""SIGReg on the GPU backends: three kernels and the library's matrix products, with autograd.

A backend (``cuda``, ``triton``) provides the kernels of ``gpu/contract.py``; this file
strings them together. (With sample weights: the kernels take them, the weights' sums
are one op more, and a weighted "mean" divides by the count of non-empty batch
indices, one op in each pass.) Per call, without torch.distributed:

    forward   ecf_partials -> statistic                       (2 device ops)
    backward  slice_gradient -> G @ Aᵀ -> xᵀ @ G              (3 device ops)

Why this split: the sums over the samples need a grid over (slice tiles × row
splits) and the gradient ``G`` a grid over (row tiles × slice tiles); the two
plain products ``G·Aᵀ`` and ``xᵀ·G`` run fastest as library GEMMs (Hopper's
tensor-core instructions, tuned tiles), at the price of one transient ``N×K``
tensor ``G`` in the input dtype (SPEC §3). The statistic kernel folds the
reduction's factor, ``clip_value`` and the distributed scaling into ``coef`` =
d loss / d sums, so the backward starts from the loss's gradient as a ``[B, K]``
view, with no elementwise op of its own. It also reduces the statistics to the
loss (mean or sum) in the same launch, a deterministic cross-block sum whose
arrival counter ``ecf_partials`` zeroes (gpu/contract.py), so no reduction op follows.

float32 at "highest" precision (no TF32, like torch.matmul): the projection is
an SGEMM first (one more op per pass: 3 in the forward, 4 in the backward), then the kernels read it
(``directions=None``); in the backward ``G`` overwrites that projection in place,
so the backward still holds one ``N×K`` tensor.
"""

import torch

from ..core.distributed import all_reduce_sums_and_count, is_distributed

# The module that provides the kernels of gpu/contract.py, per backend name; "primitives"
# runs the contract itself, on any device (register_kernels adds others, e.g. in tests).
_KERNELS = {}


def register_kernels(name: str, module) -> None:
    _KERNELS[name] = module


def backend_kernels(name: str):
    if name not in _KERNELS:  # imported on first use: importing triton is slow
        # Import statements, not importlib: torch.compile traces them.
        if name == "cuda":
            from .cuda import ops as module
        elif name == "triton":
            from .triton import ops as module
        elif name == "primitives":
            from . import contract as module
        else:
            raise ValueError(f"no kernels registered for backend {name!r}")
        _KERNELS[name] = module
    return _KERNELS[name]


@torch.compiler.assume_constant_result
def _fp32_matmul_is_highest() -> bool:
    # Read once while torch.compile traces (some torch versions cannot trace a str-valued query);
    # a compiled graph keeps the route it was traced with.
    return torch.get_float32_matmul_precision() == "highest"


def projection_first(x: torch.Tensor) -> bool:
    """float32 without TF32: the projection by SGEMM beats an FMA tile inside the kernels."""
    return x.dtype == torch.float32 and _fp32_matmul_is_highest()


def weight_moments(weights):
    """``[B, 2]``: the sum of each batch index's weights, and of their squares (three device ops:
    each is host time on a GPU)."""
    return torch.stack((weights, weights * weights), dim=-1).sum(dim=-2)


def mean_divisor(moments, slices: int):
    """What a weighted "mean" divides the sum of the statistics by: the slices of the batch
    indices that hold any weight (at least 1: a loss of 0 when none does); an integer tensor."""
    return (torch.count_nonzero(moments[:, 0]) * slices).clamp_min(1)


def _gemm(a, b):
    """``a @ b``, a library GEMM. On CPU tensors (the kernels under the Triton interpreter or the
    CUDA emulation) 16-bit products skip oneDNN: its bf16 GEMM lets a NaN row leak into the next
    row of the result (seen with torch 2.13), which would break the NaN semantics. (One op either
    way; on a GPU, cuBLAS; under torch.compile, which cannot trace the switch, the plain product.)"""
    if a.device.type != "cpu" or a.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return torch.matmul(a, b)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.matmul(a, b)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _weighted(weights):
    """The trailing argument of a kernel call: nothing without weights (the unweighted call stays as it was)."""
    return () if weights is None else (weights,)


class _FusedSigreg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, directions, backend, knots, t_max, reduction, clip_value, across_ranks, weights, first,
                unbiased):
        kernels = backend_kernels(backend)
        samples = x.shape[1]
        # Decided once per call (by the caller): the backward takes the same route even if the
        # precision changes meanwhile.
        ctx.projection_first = first
        # The statistic kernel's arrival counter: an allocation (no launch) that ecf_partials zeroes.
        arrivals = torch.empty(1, dtype=torch.int32, device=x.device)
        if ctx.projection_first:
            partials = kernels.ecf_partials(torch.matmul(x, directions), None, knots, t_max, arrivals,
                                            *_weighted(weights))
        else:
            partials = kernels.ecf_partials(x, directions, knots, t_max, arrivals, *_weighted(weights))
        # Weights: their sums per batch index (one op), and a weighted "mean" asks the kernel for the
        # sum: its divisor counts the batch indices that hold any weight, known only on the device.
        moments = None if weights is None else weight_moments(weights)
        kernel_reduction = "sum" if weights is not None and reduction == "mean" else reduction
        grad_factor = 1.0
        if across_ranks:
            # The statistic is that of the global batch (SPEC §2): one all-reduce of the sums.
            partials, samples, grad_factor, moments = all_reduce_sums_and_count(
                partials.sum(dim=1, keepdim=True), samples, moments)
        # Trailing arguments only where used: the plain call stays as it was.
        extra = (moments, True) if unbiased else () if moments is None else (moments,)
        stat, coef, loss = kernels.statistic(partials, samples, knots, t_max, kernel_reduction, clip_value,
                                             grad_factor, arrivals, *extra)
        divisor = None
        if kernel_reduction != reduction:
            divisor = mean_divisor(moments, coef.shape[2])  # (an integer: a true division below)
            loss = loss / divisor
        ctx.save_for_backward(x, directions, coef, weights, divisor)
        ctx.kernels, ctx.knots, ctx.t_max, ctx.reduction = kernels, knots, t_max, reduction
        return stat if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, directions, coef, weights, divisor = ctx.saved_tensors
        kernels, knots, t_max = ctx.kernels, ctx.knots, ctx.t_max
        batch, slices = coef.shape[0], coef.shape[2]
        # coef already holds the reduction's 1 / (B K): a scalar's gradient is just expanded.
        scale = grad_loss.to(coef.dtype)
        if divisor is not None:  # a weighted mean: coef is that of the sum
            scale = scale / divisor
        scale = scale.expand(batch, slices) if ctx.reduction != "none" else scale
        weighted = _weighted(weights)
        nothing = (None,) * 9
        if directions is None:
            g = kernels.slice_gradient(coef, scale, x, None, knots, t_max, *weighted)
            if weights is not None:  # exactly 0 on rows of weight 0, whatever the statistic (NaN) is
                g = torch.where(weights.unsqueeze(-1) > 0, g, 0.0)
            return g, None, *nothing
        if ctx.projection_first:
            g = torch.matmul(x, directions)
            kernels.slice_gradient_(g, coef, scale, knots, t_max, *weighted)
        else:
            g = kernels.slice_gradient(coef, scale, x, directions, knots, t_max, *weighted)
        grad_x = _gemm(g, directions.mT) if ctx.needs_input_grad[0] else None
        if grad_x is not None and weights is not None:  # exactly 0 on rows of weight 0, NaN directions or not
            grad_x = torch.where(weights.unsqueeze(-1) > 0, grad_x, 0.0)
        grad_directions = None
        if ctx.needs_input_grad[1]:  # sum over the batch: one GEMM over all B·N rows, no atomics
            rows = x.reshape(-1, x.shape[-1])
            if weights is not None:  # a row of weight 0 has G = 0, and must not bring NaN or Inf into x^T G
                rows = torch.where(weights.reshape(-1, 1) > 0, rows, 0.0)
            grad_directions = _gemm(rows.mT, g.reshape(-1, slices))
        return grad_x, grad_directions, *nothing


def fused_sigreg(backend: str, x, directions, knots: int, t_max: float, reduction: str, clip_value,
                 across_ranks: bool | None = None, weights=None, unbiased: bool = False):
    """SIGReg of ``x: [B, N, D]`` with ``backend``'s kernels: a scalar, or ``[B, K]`` for "none".
    ``across_ranks``: the statistic of the global batch (None: whenever torch.distributed is up).
    ``weights``: None, or float32 ``[B, N]`` contiguous sample weights (gpu/contract.py);
    ``unbiased``: the U-statistic (gpu/contract.py)."""
    across_ranks = is_distributed() if across_ranks is None else across_ranks
    first = directions is not None and projection_first(x)
    return _FusedSigreg.apply(x, directions, backend, knots, t_max, reduction, clip_value, across_ranks, weights,
                              first, unbiased)
