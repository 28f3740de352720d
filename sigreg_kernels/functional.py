"""``sigreg``: the public function."""

import torch

from . import backends
from ._validation import check_sigreg_args
from .distributed import all_reduce_ecf_sums, is_distributed
from .fused import fused_sigreg
from .quadrature import phi_minus_one, quadrature

# Backends that run the kernels of primitives.py through fused.py; the others
# (reference, cpu) compute the ECF sums with one op and the statistic in torch.
FUSED_BACKENDS = ("cuda", "triton")


def statistic_from_sums(sums, samples: int, knots: int, t_max: float, clip_value=None):
    """Per-slice statistic ``[B, K]`` from the ECF sums ``[B, 2, K, T]`` of ``samples`` samples.

    ``sums[:, 0]`` holds the sums of ``cos(t_j p) - 1``, ``sums[:, 1]`` those of
    ``sin(t_j p)`` (op_registration.py): ``C - phi = sums[:, 0] / N - (phi - 1)``
    keeps its digits where both ``C`` and ``phi`` are close to 1.
    Statistics below ``clip_value`` are set to 0 (and pass no gradient).
    """
    _, _, w = quadrature(knots, t_max, dtype=sums.dtype, device=sums.device)
    phi_m1 = phi_minus_one(knots, t_max, dtype=sums.dtype, device=sums.device)
    ecf_cos_minus_phi, ecf_sin = sums[:, 0] / samples - phi_m1, sums[:, 1] / samples
    err = ecf_cos_minus_phi.square() + ecf_sin.square()
    stat = (err * w).sum(dim=-1) * samples
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
           clip_value: float | None = None, backend: str = "auto", distributed: bool | None = None):
    """SIGReg with the Epps-Pulley test (SPEC §1) of ``x: [*B, N, D]`` along ``directions: [D, K]``.

    ``directions=None`` tests the columns of ``x`` as they are (``K = D``, no
    product): the univariate Epps-Pulley test of already-projected samples.
    One test per batch index; ``reduction`` is ``"mean"`` (default) or ``"sum"`` over
    all batch indices and slices, or ``"none"`` for the ``[*B, K]`` statistics.
    Per-slice statistics below ``clip_value`` count as 0 (and pass no gradient).
    ``backend`` is ``"auto"`` (the fastest one built for ``x``'s device),
    ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``. Under an initialized
    ``torch.distributed`` the statistic is that of the global batch; ``distributed=False``
    keeps it to this rank's batch (``None``: global whenever a process group of more than
    one rank is up; ``True`` asks for the same and is the same without one).
    The LeJEPA paper's Algorithm 1 integrates over ``[-5, 5]`` with 17 trapezoid points:
    that is exactly ``t_max=5.0, knots=9`` (``[-a, a]`` with ``2m + 1`` points is
    ``t_max=a, knots=m + 1``).
    """
    check_sigreg_args(x, directions, knots, t_max, reduction, clip_value)
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
    across_ranks = is_distributed() and distributed is not False
    name = backends.resolve_backend(backend, x.device, x.dtype)
    x, directions = _computation_dtypes(x, directions)
    batch_shape, samples, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
    slices = dim if directions is None else directions.shape[1]
    x = x.reshape(-1, samples, dim)
    if name in FUSED_BACKENDS:
        stat = fused_sigreg(name, x, directions, knots, float(t_max), reduction, clip_value, across_ranks)
        return stat.reshape(*batch_shape, slices) if reduction == "none" else stat
    sums = backends.ecf_sums(name, x, directions, knots, t_max)
    if across_ranks:
        sums, samples = all_reduce_ecf_sums(sums, samples)
    stat = statistic_from_sums(sums, samples, knots, t_max, clip_value).reshape(*batch_shape, slices)
    if reduction == "mean":
        return stat.mean()
    if reduction == "sum":
        return stat.sum()
    return stat
