"""SIGReg on the GPU backends: three kernels and the library's matrix products, with autograd.

A backend (``cuda``, ``triton``) provides the kernels of ``primitives.py``; this file
strings them together. Per call, without torch.distributed:

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
arrival counter ``ecf_partials`` zeroes (primitives.py), so no reduction op follows.

float32 at "highest" precision (no TF32, like torch.matmul): the projection is
an SGEMM first (one more op per pass: 3 in the forward, 4 in the backward), then the kernels read it
(``directions=None``); in the backward ``G`` overwrites that projection in place,
so the backward still holds one ``N×K`` tensor.
"""

import torch

from .distributed import all_reduce_sums_and_count, is_distributed

# The module that provides the kernels of primitives.py, per backend name; "primitives"
# runs the contract itself, on any device (register_kernels adds others, e.g. in tests).
_KERNELS = {}


def register_kernels(name: str, module) -> None:
    _KERNELS[name] = module


def backend_kernels(name: str):
    if name not in _KERNELS:  # imported on first use: importing triton is slow
        # Import statements, not importlib: torch.compile traces them.
        if name == "cuda":
            from . import cuda_ops as module
        elif name == "triton":
            from . import triton_op as module
        elif name == "primitives":
            from . import primitives as module
        else:
            raise ValueError(f"no kernels registered for backend {name!r}")
        _KERNELS[name] = module
    return _KERNELS[name]


def projection_first(x: torch.Tensor) -> bool:
    """float32 without TF32: the projection by SGEMM beats an FMA tile inside the kernels."""
    return x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


class _FusedSigreg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, directions, backend, knots, t_max, reduction, clip_value, across_ranks):
        kernels = backend_kernels(backend)
        samples = x.shape[1]
        # Decided once per call: the backward takes the same route even if the precision changes meanwhile.
        ctx.projection_first = directions is not None and projection_first(x)
        # The statistic kernel's arrival counter: an allocation (no launch) that ecf_partials zeroes.
        arrivals = torch.empty(1, dtype=torch.int32, device=x.device)
        if ctx.projection_first:
            partials = kernels.ecf_partials(torch.matmul(x, directions), None, knots, t_max, arrivals)
        else:
            partials = kernels.ecf_partials(x, directions, knots, t_max, arrivals)
        grad_factor = 1.0
        if across_ranks:
            # The statistic is that of the global batch (SPEC §2): one all-reduce of the sums.
            partials, samples, grad_factor = all_reduce_sums_and_count(partials.sum(dim=1, keepdim=True), samples)
        stat, coef, loss = kernels.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor,
                                             arrivals)
        ctx.save_for_backward(x, directions, coef)
        ctx.kernels, ctx.knots, ctx.t_max, ctx.reduction = kernels, knots, t_max, reduction
        return stat if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, directions, coef = ctx.saved_tensors
        kernels, knots, t_max = ctx.kernels, ctx.knots, ctx.t_max
        batch, slices = coef.shape[0], coef.shape[2]
        # coef already holds the reduction's 1 / (B K): a scalar's gradient is just expanded.
        scale = grad_loss.to(coef.dtype)
        scale = scale.expand(batch, slices) if ctx.reduction != "none" else scale
        if directions is None:
            return kernels.slice_gradient(coef, scale, x, None, knots, t_max), None, None, None, None, None, None, None
        if ctx.projection_first:
            g = torch.matmul(x, directions)
            kernels.slice_gradient_(g, coef, scale, knots, t_max)
        else:
            g = kernels.slice_gradient(coef, scale, x, directions, knots, t_max)
        grad_x = torch.matmul(g, directions.mT) if ctx.needs_input_grad[0] else None
        grad_directions = None
        if ctx.needs_input_grad[1]:  # sum over the batch: one GEMM over all B·N rows, no atomics
            grad_directions = torch.matmul(x.reshape(-1, x.shape[-1]).mT, g.reshape(-1, slices))
        return grad_x, grad_directions, None, None, None, None, None, None


def fused_sigreg(backend: str, x, directions, knots: int, t_max: float, reduction: str, clip_value,
                 across_ranks: bool | None = None):
    """SIGReg of ``x: [B, N, D]`` with ``backend``'s kernels: a scalar, or ``[B, K]`` for "none".
    ``across_ranks``: the statistic of the global batch (None: whenever torch.distributed is up)."""
    across_ranks = is_distributed() if across_ranks is None else across_ranks
    return _FusedSigreg.apply(x, directions, backend, knots, t_max, reduction, clip_value, across_ranks)
