"""The SIGReg statistic in plain PyTorch: the oracle of the tests, the baseline of the benchmarks.

It materializes the ``(*B, N, K, T)`` tensor of angles on purpose: short and
obviously correct beats fast here.
"""

import torch

from .core.quadrature import quadrature


def sigreg_reference(x, directions, *, knots: int = 17, t_max: float = 3.0, reduction: str = "mean",
                     clip_value: float | None = None, weights=None, unbiased: bool = False):
    """Epps-Pulley SIGReg of ``x: [*B, N, D]`` along ``directions: [D, K]`` (SPEC §1).

    ``directions=None`` tests the columns of ``x`` as they are (``K = D``).
    Per-slice statistics below ``clip_value`` are set to 0 (no gradient through them).
    ``weights [*B, N]`` (broadcast over the batch dims): weighted ECF means and the effective
    sample size ``(sum w)^2 / sum w^2``; a row of weight 0 counts for nothing, whatever it holds;
    a batch index of weight 0 has statistic 0 and is left out of the mean.
    ``unbiased``: the U-statistic, ``|ECF|^2`` without the ``i = j`` terms of its double sum
    (weighted: ``(W1^2 |ECF|^2 - W2) / (W1^2 - W2)``, ``Wk = sum w^k``); NaN where fewer than two
    samples carry weight.
    Returns a scalar for ``reduction="mean"|"sum"``, or ``[*B, K]`` for ``"none"``.
    """
    if weights is not None:
        weights = torch.broadcast_to(weights, x.shape[:-1]).to(torch.promote_types(x.dtype, torch.float32))
        x = torch.where(weights.unsqueeze(-1) > 0, x, torch.zeros_like(x))  # masked rows: NaN, Inf, anything
    proj = x if directions is None else x @ directions  # [*B, N, K]
    if weights is not None:  # and masked projections 0 even where non-finite directions make 0 * inf
        proj = torch.where(weights.unsqueeze(-1) > 0, proj, torch.zeros_like(proj))
    t, phi, w = quadrature(knots, t_max, dtype=torch.promote_types(proj.dtype, torch.float32), device=x.device)
    angles = proj.unsqueeze(-1) * t  # [*B, N, K, T]
    if weights is None:
        ecf_cos = angles.cos().mean(dim=-3)  # [*B, K, T]
        ecf_sin = angles.sin().mean(dim=-3)
        samples = torch.full(x.shape[:-2], float(x.shape[-2]), dtype=angles.dtype, device=x.device)  # [*B]
    else:
        total = weights.sum(dim=-1)  # [*B]
        safe_total = torch.where(total > 0, total, 1.0)  # (an empty batch index: no 0 / 0, not even in backward)
        row_weights = weights[..., None, None] / safe_total[..., None, None, None]  # [*B, N, 1, 1]
        ecf_cos = (angles.cos() * row_weights).sum(dim=-3)
        ecf_sin = (angles.sin() * row_weights).sum(dim=-3)
        samples = total.square() / torch.where(total > 0, weights.square().sum(dim=-1), 1.0)  # effective N
    err = (ecf_cos - phi).square() + ecf_sin.square()
    if unbiased:  # |ECF|^2 = sum_ij w_i w_j e^{i t (p_i - p_j)} / W1^2: drop its i = j terms (W2 of them)
        w1, w2 = (samples, samples) if weights is None else (total, weights.square().sum(dim=-1))
        w1, w2 = w1[..., None, None] ** 2, w2[..., None, None]
        square = ecf_cos.square() + ecf_sin.square()
        # No pair where one sample carries all the weight (0 < N <= 1): NaN, and NaN gradients with it
        # (a factor, not a constant NaN, which would pass none); none at all (N = 0): left to the mask below.
        no_pair = torch.where((w1 > w2) | (w1 == 0), 1.0, torch.nan)
        pairs_square = (w1 * square - w2) / torch.where(w1 > w2, w1 - w2, 1.0) * no_pair
        err = err - square + pairs_square
    stat = (err * w).sum(dim=-1) * samples[..., None]  # [*B, K]
    if weights is not None:  # a batch index without weight: 0, even where non-finite directions make it NaN
        stat = torch.where(total[..., None] > 0, stat, torch.zeros_like(stat))
    if clip_value is not None:
        stat = torch.where(stat < clip_value, torch.zeros_like(stat), stat)
    if reduction == "mean":
        if weights is None:
            return stat.mean()
        return stat.sum() / (stat.shape[-1] * (total > 0).sum()).clamp_min(1)  # empty batch indices left out
    if reduction == "sum":
        return stat.sum()
    return stat
