"""The three kernels every GPU backend provides, written in plain PyTorch: their contract.

The GPU backends (``triton``, ``cuda``) compute SIGReg with three kernels, each one
device launch, which ``gpu/fused.py`` strings together with the library's own matrix
products (cuBLAS through ``torch.matmul``). These functions say what each kernel
computes, and run the same orchestration on any device (the tests use them to
check the orchestration, and as a readable statement of the contract).

Shapes: ``x`` is ``[B, N, D]``; ``directions`` is ``[D, K]``, or ``None`` for the
univariate test of ``x``'s own columns (``P = x``, ``K = D``). ``T`` = ``knots``,
``t_j = j * t_max / (T - 1)``.

1. ``ecf_partials(x, directions, knots, t_max, arrivals=None) -> partials [B, S, 2, K, T]`` (float32):
   the ECF sums over the rows of each of ``S`` row splits,
   ``partials[b, s, 0, k, j] = sum_{n in split s} (cos(t_j P[b, n, k]) - 1)`` and ``[.., 1, ..]``
   the sum of ``sin(t_j P[b, n, k])``; ``cos - 1`` to full relative precision (a
   kernel carries ``cos - 1`` through its angle-addition recurrence, not ``cos``),
   so that ``C - phi`` keeps its digits where both are near 1 (small ``t |P|``), ``P = x_b @ directions`` (16-bit inputs: exact products,
   float32 accumulation; float32 inputs: TF32 only where
   ``torch.get_float32_matmul_precision() != "highest"``). Split ``s`` holds rows
   ``[s * R, min((s + 1) * R, N))``; ``S`` and ``R`` are the backend's choice, a
   function of the shapes (and the device) only, so reruns sum in the same order.
   Knot 0 is ``sum (cos(0 * p) - 1)``: 0 for finite ``p``, NaN where ``p`` is NaN or
   infinite, as the reference computes it. ``arrivals``: None, or an int32 tensor of
   one element that the kernel sets to 0 (one store): the statistic kernel's arrival
   counter, zeroed by this kernel because it always runs first, so that the
   statistic's reduction needs no memset launch of its own.

2. ``statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None,
   moments=None, unbiased=False) -> (stat [B, K], coef [B, 2, K, T], loss [])`` (float32): with ``sums = partials.sum(1)``
   (a fixed order over splits), ``C - phi = sums[:, 0] / samples - (phi - 1)`` with
   ``phi - 1 = expm1(-t^2 / 2)`` (``quadrature.phi_minus_one``), ``S = sums[:, 1] / samples``:
   ``stat_k = samples * sum_j w_j ((C_kj - phi_j)^2 + S_kj^2)``, set to 0 where
   ``stat_k < clip_value`` (``clip_value`` None: no clipping; a NaN statistic stays NaN). ``coef`` is the
   derivative of the reduced loss with respect to ``sums``, times ``grad_factor``:
   ``coef[b, 0, k, j] = f * 2 w_j (C_kj - phi_j)``, ``coef[b, 1, k, j] = f * 2 w_j S_kj``,
   0 on clipped slices, with ``f = grad_factor / (B * K)`` for ``reduction="mean"``,
   ``f = grad_factor`` for ``"sum"`` and ``"none"``. (The loss's gradient
   reaches the kernels as a ``[B, K]`` scale, an expanded view for a scalar loss,
   so the backward starts with no elementwise op of its own.)
   ``loss = sum_{b,k} stat[b, k] / d`` over the returned (clipped, float32) statistics,
   summed in float64 in an order fixed by the shapes, divided and rounded once, with
   ``d = B * K`` for ``"mean"`` and 1 for ``"sum"`` and ``"none"``: the reduced
   loss in the same launch (the block that arrives last sums the blocks' partial sums
   in block order; one integer atomic, no float atomics). ``arrivals`` is the counter
   ``ecf_partials`` zeroed (int32, one element, holding 0); the kernel leaves it at 0
   again. None: the op zeroes a counter of its own (one device op more; the fused
   path always passes one).

3. ``slice_gradient(coef, scale, x, directions, knots, t_max) -> G [B, N, K]`` in x's dtype:
   ``G[b, n, k] = scale[b, k] * sum_{j>=1} t_j (coef[b, 1, k, j] cos(t_j P) - coef[b, 0, k, j] sin(t_j P))``,
   ``P = P[b, n, k]`` as in 1 (recomputed, never stored). ``scale`` is ``[B, K]``
   float32 with any strides (stride 0 for the gradient of a scalar loss).
   ``slice_gradient_(projection, coef, scale, knots, t_max)`` is the same with
   ``directions=None`` on a float32 ``projection`` that it overwrites with ``G``:
   the float32 "highest" route, so that the backward holds one ``N x K`` tensor.

The gradients are then ``grad_x = G @ directions.T`` (``G`` itself when
``directions`` is None) and ``grad_directions = sum_b x_b^T G_b``, library GEMMs.

Sample weights (``sigreg(..., weights=)``): each kernel takes ``weights``, None or a
float32 ``[B, N]`` contiguous tensor of non-negative weights on x's device, and
``statistic`` the weights' moments ``[B, 2]`` float32 (``sum w``, ``sum w^2`` per batch
index). A row whose weight is 0 counts as ``P = 0`` there, whatever ``x`` holds (NaN
and Inf included), so that it contributes exactly 0 to the sums and gets ``G = 0``:
1. ``partials`` are the weighted sums ``sum_n w_n (cos(t_j P~) - 1)``, ``sum_n w_n sin(t_j P~)``,
   ``P~ = P`` where ``w > 0``, else 0 (knot 0: ``sum_n w_n (0 * P~)``).
2. With ``moments`` (``W1 = sum w``, ``W2 = sum w^2``), ``samples`` is not used:
   ``C - phi = sums[:, 0] / W1 - (phi - 1)``, ``S = sums[:, 1] / W1``, the statistic's ``N`` is
   the effective sample size ``W1^2 / W2``, ``stat_k = W1^2 / W2 * sum_j w_j (...)``, and
   ``coef`` is its derivative, ``f * 2 w_j (C - phi) W1 / W2`` and ``f * 2 w_j S W1 / W2``.
   A batch index with ``W1 = 0`` has ``stat = 0`` and ``coef = 0`` (not NaN). (The reduced
   loss of a weighted "mean" leaves those batch indices out of its divisor, a count known
   only on the device: ``gpu/fused.py`` asks the kernel for the "sum" and divides.)
3. ``G[b, n, k] = w_n * scale[b, k] * sum_j ...`` at ``P~``: 0 where ``w_n = 0``.

The unbiased statistic (``sigreg(..., unbiased=True)``): ``statistic(..., moments, unbiased=True)``
returns the U-statistic, ``|ECF|^2`` without the ``i = j`` terms of its double sum. With ``N``
the statistic's size (``samples``, or ``W1^2 / W2``), ``r = N / (N - 1)``, ``u = C - 1 =
sums[:, 0] / W1`` (``W1 = samples`` without weights):
``stat_k = (biased stat_k) - r * sum_j w_j (1 - C_kj^2 - S_kj^2)``, the spread
``1 - C^2 - S^2`` formed as ``-u (2 + u) - S^2``; ``coef`` gains ``f * 2 w_j r C_kj / W1`` and
``f * 2 w_j r S_kj / W1``. NaN (statistic and coefficients) where ``N <= 1``: no pair of
samples; a batch index with ``W1 = 0`` is still 0. Clipping applies to the unbiased statistic.
"""

import torch

from ..core.numerics import accumulation_dtype, ecf_spread, loss_divisor, loss_factor, pair_factor
from ..core.quadrature import phi_minus_one, quadrature



def projection(x, directions):
    """``P = x @ directions`` in the accumulation dtype (``x`` itself when ``directions`` is None).

    (float64 inputs stay float64: the tests evaluate this contract in float64 as their oracle.)
    """
    acc = accumulation_dtype(x.dtype)
    if directions is None:
        return x.to(acc)
    return x.to(acc) @ directions.to(acc)  # products of 16-bit values are exact in float32


def weighted_projection(x, directions, weights):
    """``P``, and ``P~``: 0 on rows whose weight is 0 (whatever x holds), with the weights ``[B, N, 1]``."""
    p = projection(x, directions)
    if weights is None:
        return p, None
    w = weights.to(p.dtype).unsqueeze(-1)
    return torch.where(w > 0, p, 0.0), w


def ecf_partials(x, directions, knots: int, t_max: float, arrivals=None, weights=None):
    if arrivals is not None:
        arrivals.zero_()
    t, _, _ = quadrature(knots, t_max, dtype=accumulation_dtype(x.dtype), device=x.device)
    p, w = weighted_projection(x, directions, weights)
    angles = p.unsqueeze(-1) * t  # [B, N, K, T]
    cos_minus_one, sin = -2 * (angles / 2).sin().square(), angles.sin()  # cos - 1: full relative precision near 0
    if w is not None:
        cos_minus_one, sin = cos_minus_one * w.unsqueeze(-1), sin * w.unsqueeze(-1)
    sums = torch.stack((cos_minus_one.sum(dim=1), sin.sum(dim=1)), dim=1)  # [B, 2, K, T]
    return sums.unsqueeze(1)  # one split


def statistic(partials, samples: int, knots: int, t_max: float, reduction: str, clip_value, grad_factor: float,
              arrivals=None, moments=None, unbiased: bool = False):
    _, _, w = quadrature(knots, t_max, dtype=partials.dtype, device=partials.device)
    phi_m1 = phi_minus_one(knots, t_max, dtype=partials.dtype, device=partials.device)
    sums = partials.sum(dim=1)
    if moments is None:  # N samples of weight 1
        total = size = torch.full(sums.shape[:1], float(samples), dtype=sums.dtype, device=sums.device)
    else:  # sum w, and the effective sample size (sum w)^2 / sum w^2
        moments = moments.to(sums.dtype)
        total, size = moments[:, 0], moments[:, 0] ** 2 / moments[:, 1]  # [B]
    ecf_cos_minus_phi = sums[:, 0] / total[:, None, None] - phi_m1  # [B, K, T]
    ecf_sin = sums[:, 1] / total[:, None, None]
    stat = (ecf_cos_minus_phi.square() + ecf_sin.square()) @ w * size[:, None]  # [B, K]
    factor = loss_factor(reduction, sums.shape[0], sums.shape[2], grad_factor)
    coef = torch.stack((2 * w * ecf_cos_minus_phi, 2 * w * ecf_sin), dim=1) * factor
    coef = coef * (size / total)[:, None, None, None]  # d stat / d sums: N / sum w (1 without weights)
    if unbiased:
        stat, coef = unbiased_statistic(stat, coef, sums, total, size, w, factor)
    if moments is not None:  # a batch index with no weight: statistic 0, no gradient
        empty = moments[:, 0] == 0
        stat = torch.where(empty[:, None], 0.0, stat)
        coef = torch.where(empty[:, None, None, None], 0.0, coef)
    if clip_value is not None:
        kept = ~(stat < clip_value)  # as stats[stats < clip_value] = 0: a NaN statistic stays NaN
        stat = torch.where(kept, stat, 0.0)
        coef = coef * kept[:, None, :, None]
    loss = stat.to(torch.float64).sum() / loss_divisor(reduction, stat.shape[0], stat.shape[1])  # 0 / 0: NaN
    return stat, coef, loss.to(stat.dtype)


def unbiased_statistic(stat, coef, sums, total, size, w, factor):
    """The U-statistic from the biased one: ``stat - r sum_j w_j (1 - C_j^2 - S_j^2)``,
    ``r = N / (N - 1)`` (``N`` the effective size; NaN where ``0 < N <= 1``), and its coefficients."""
    pairs = pair_factor(size)[:, None]  # [B, 1]
    mean_cos_m1, mean_sin = sums[:, 0] / total[:, None, None], sums[:, 1] / total[:, None, None]
    stat = stat - pairs * (ecf_spread(mean_cos_m1, mean_sin) @ w)
    # d(-r sum_j w_j spread_j) / d sums = r 2 w_j (C_j, S_j) / sum w
    extra = torch.stack((2 * w * (1 + mean_cos_m1), 2 * w * mean_sin), dim=1) * factor
    return stat, coef + extra * (pairs / total[:, None])[:, :, None, None]


def slice_gradient(coef, scale, x, directions, knots: int, t_max: float, weights=None):
    t, _, _ = quadrature(knots, t_max, dtype=accumulation_dtype(x.dtype), device=x.device)
    p, w = weighted_projection(x, directions, weights)
    angles = p.unsqueeze(-1) * t  # [B, N, K, T]
    coef, scale = coef.to(t.dtype), scale.to(t.dtype)
    weights_cos = (t * coef[:, 1]) * scale.unsqueeze(-1)  # [B, K, T]
    weights_sin = (t * coef[:, 0]) * scale.unsqueeze(-1)
    g = (angles.cos() * weights_cos.unsqueeze(1) - angles.sin() * weights_sin.unsqueeze(1)).sum(dim=-1)
    return (g if w is None else g * w).to(x.dtype)


def slice_gradient_(projection_, coef, scale, knots: int, t_max: float, weights=None):
    projection_.copy_(slice_gradient(coef, scale, projection_, None, knots, t_max, weights))
