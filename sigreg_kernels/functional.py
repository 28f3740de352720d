"""``sigreg``: the public function."""

import torch

from . import dispatch
from .core.distributed import all_reduce_ecf_sums, is_distributed
from .core.numerics import accumulation_dtype, ecf_spread, pair_factor
from .core.quadrature import phi_minus_one, quadrature
from .core.validation import check_sigreg_args, check_weights
from .gpu.fused import fused_sigreg, mean_divisor, weight_moments

# Backends that run the kernels of gpu/contract.py through gpu/fused.py; the others
# (reference, cpu) compute the ECF sums with one op and the statistic in torch.
FUSED_BACKENDS = ("cuda", "triton")


def statistic_from_sums(sums, samples: int, knots: int, t_max: float, clip_value=None, moments=None,
                        unbiased: bool = False):
    """Per-slice statistic ``[B, K]`` from the ECF sums ``[B, 2, K, T]`` of ``samples`` samples.

    ``sums[:, 0]`` holds the sums of ``cos(t_j p) - 1``, ``sums[:, 1]`` those of
    ``sin(t_j p)`` (cpu/registration.py): ``C - phi = sums[:, 0] / N - (phi - 1)``
    keeps its digits where both ``C`` and ``phi`` are close to 1.
    ``moments [B, 2]``: ``(sum w, sum w^2)`` of weighted sums; then ``N`` is ``sum w`` in the
    means and the effective size ``(sum w)^2 / sum w^2`` in the statistic (0 where ``sum w = 0``).
    Statistics below ``clip_value`` are set to 0 (and pass no gradient). ``unbiased``: the
    U-statistic (gpu/contract.py), NaN where the size is 1 or less.
    """
    _, _, w = quadrature(knots, t_max, dtype=sums.dtype, device=sums.device)
    phi_m1 = phi_minus_one(knots, t_max, dtype=sums.dtype, device=sums.device)
    if moments is None:
        total = size = torch.full(sums.shape[:1], float(samples), dtype=sums.dtype, device=sums.device)
    else:  # where sum w = 0 the sums are 0 too: divide by 1 (no 0 / 0, not even in the backward)
        moments = moments.to(sums.dtype)
        present = moments[:, 0] > 0
        total = torch.where(present, moments[:, 0], 1.0)
        size = torch.where(present, moments[:, 0].square() / torch.where(present, moments[:, 1], 1.0), 0.0)
    ecf_cos_minus_phi = sums[:, 0] / total[:, None, None] - phi_m1
    ecf_sin = sums[:, 1] / total[:, None, None]
    err = ecf_cos_minus_phi.square() + ecf_sin.square()
    stat = (err * w).sum(dim=-1) * size[:, None]
    if unbiased:  # minus r sum_j w_j (1 - |ECF_j|^2), r = N / (N - 1)
        spread = ecf_spread(sums[:, 0] / total[:, None, None], ecf_sin)
        stat = stat - pair_factor(size)[:, None] * (spread * w).sum(dim=-1)
    if moments is not None:  # no weight: 0, even where non-finite directions made the sums NaN
        stat = torch.where(present[:, None], stat, 0.0)
    if clip_value is not None:
        stat = torch.where(stat < clip_value, 0.0, stat)
    return stat


def _computation_dtypes(x, directions):
    """The dtype the projection is computed in, as ``x @ directions`` would choose it."""
    device_type = x.device.type
    if directions is None:
        return x, None
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), directions.to(dtype)
    # Mixed half/float inputs: the directions follow x, as for a low-precision model.
    return x, directions.to(x.dtype)


def sigreg(x, directions, *, knots: int = 17, t_max: float = 3.0, reduction: str = "mean",
           clip_value: float | None = None, backend: str = "auto", distributed: bool | None = None,
           weights=None, unbiased: bool = False):
    """SIGReg with the Epps-Pulley test (SPEC §1) of ``x: [*B, N, D]`` along ``directions: [D, K]``.

    ``directions=None`` tests the columns of ``x`` as they are (``K = D``, no
    product): the univariate Epps-Pulley test of already-projected samples.
    One test per batch index; ``reduction`` is ``"mean"`` (default) or ``"sum"`` over
    all batch indices and slices, or ``"none"`` for the ``[*B, K]`` statistics.
    Per-slice statistics below ``clip_value`` count as 0 (and pass no gradient).
    ``backend`` is ``"auto"`` (the fastest one built for ``x``'s device),
    ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    ``weights``: sample weights ``[*B, N]`` (broadcast over the batch dims), a bool mask or
    non-negative floats, no gradient: the ECF means become weighted means and the statistic's
    ``N`` the effective sample size ``(sum w)^2 / sum w^2``, so a mask gives exactly the
    statistic of the batch without the masked rows. A row of weight 0 counts for nothing, even
    if it holds NaN or Inf, and gets a zero gradient; a batch index whose weights are all 0 has
    statistic 0, no gradient, and is left out of the ``"mean"`` (a loss of 0 if all are).
    Negative, NaN or infinite weights are errors, checked on CPU tensors only (on a GPU the
    check would synchronize with the device). Under an initialized
    ``torch.distributed`` the statistic is that of the global batch; ``distributed=False``
    keeps it to this rank's batch (``None``: global whenever a process group of more than
    one rank is up; ``True`` asks for the same and is the same without one).
    ``unbiased=True``: the U-statistic form the LeJEPA paper suggests, ``|ECF|^2`` without the
    ``i = j`` terms of its double sum (its ``1 / N`` bias removed; weighted: the pairs' weights
    ``w_i w_j``, ``i != j``). It needs two samples (``N >= 2``; with weights, a batch index with a
    single weighted row has a NaN statistic); it can be negative. Prefer it at small ``N``, where
    the biased statistic's floor ``sum_j w_j (1 - |phi_j|^2)`` is a sizeable part of the loss.
    The LeJEPA paper's Algorithm 1 integrates over ``[-5, 5]`` with 17 trapezoid points:
    that is exactly ``t_max=5.0, knots=9`` (``[-a, a]`` with ``2m + 1`` points is
    ``t_max=a, knots=m + 1``).
    """
    check_sigreg_args(x, directions, knots, t_max, reduction, clip_value)
    check_weights(weights, x)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
    across_ranks = is_distributed() and distributed is not False
    if unbiased and x.shape[-2] < 2 and not across_ranks:
        raise ValueError(f"unbiased=True needs at least 2 samples (N = x.shape[-2]), got shape {tuple(x.shape)}")
    name = dispatch.resolve_backend(backend, x.device, x.dtype)
    x, directions = _computation_dtypes(x, directions)
    batch_shape, samples, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
    slices = dim if directions is None else directions.shape[1]
    x = x.reshape(-1, samples, dim)
    if weights is not None:  # [B, N] in the accumulation dtype, as the kernels read them
        weights = torch.broadcast_to(weights.detach(), (*batch_shape, samples)).reshape(-1, samples)
        weights = weights.to(accumulation_dtype(x.dtype)).contiguous()
    if name in FUSED_BACKENDS:
        stat = fused_sigreg(name, x, directions, knots, float(t_max), reduction, clip_value, across_ranks, weights,
                            unbiased)
        return stat.reshape(*batch_shape, slices) if reduction == "none" else stat
    sums = dispatch.ecf_sums(name, x, directions, knots, t_max, weights)
    moments = None if weights is None else weight_moments(weights)
    if across_ranks:
        sums, samples, moments = all_reduce_ecf_sums(sums, samples, moments)
    stat = statistic_from_sums(sums, samples, knots, t_max, clip_value, moments, unbiased)
    if reduction == "mean":
        return stat.mean() if moments is None else stat.sum() / mean_divisor(moments, slices)
    stat = stat.reshape(*batch_shape, slices)
    return stat.sum() if reduction == "sum" else stat

