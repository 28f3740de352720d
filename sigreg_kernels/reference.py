"""The SIGReg statistic in plain PyTorch: the oracle of the tests, the baseline of the benchmarks.

It materializes the ``(*B, N, K, T)`` tensor of angles on purpose: short and
obviously correct beats fast here.
"""

import torch

from .quadrature import quadrature


def sigreg_reference(x, directions, *, knots: int = 17, t_max: float = 3.0, reduction: str = "mean",
                     clip_value: float | None = None):
    """Epps-Pulley SIGReg of ``x: [*B, N, D]`` along ``directions: [D, K]`` (SPEC §1).

    ``directions=None`` tests the columns of ``x`` as they are (``K = D``).
    Per-slice statistics below ``clip_value`` are set to 0 (no gradient through them).
    Returns a scalar for ``reduction="mean"|"sum"``, or ``[*B, K]`` for ``"none"``.
    """
    proj = x if directions is None else x @ directions  # [*B, N, K]
    t, phi, w = quadrature(knots, t_max, dtype=torch.promote_types(proj.dtype, torch.float32), device=x.device)
    angles = proj.unsqueeze(-1) * t  # [*B, N, K, T]
    ecf_cos = angles.cos().mean(dim=-3)  # [*B, K, T]
    ecf_sin = angles.sin().mean(dim=-3)
    err = (ecf_cos - phi).square() + ecf_sin.square()
    stat = (err * w).sum(dim=-1) * x.shape[-2]  # [*B, K]
    if clip_value is not None:
        stat = torch.where(stat < clip_value, torch.zeros_like(stat), stat)
    if reduction == "mean":
        return stat.mean()
    if reduction == "sum":
        return stat.sum()
    return stat
