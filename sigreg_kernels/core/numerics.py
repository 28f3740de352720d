"""Numerics every backend shares: the dtype sums accumulate in, and how a reduction turns
per-slice statistics into the loss and its gradient."""

import torch

REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (16-bit inputs are summed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_factor(size: torch.Tensor) -> torch.Tensor:
    """The U-statistic's ``r = N / (N - 1)`` for each size ``N``: NaN where ``0 < N <= 1`` (no pair
    of samples), 0 where ``N = 0`` (no sample: the statistic is 0, and a 0 here keeps a NaN out of
    its gradient)."""
    more = size > 1
    return torch.where(more, size / torch.where(more, size - 1, 1.0), torch.where(size > 0, torch.nan, 0.0))


def ecf_spread(mean_cos_m1: torch.Tensor, mean_sin: torch.Tensor) -> torch.Tensor:
    """``1 - |ECF|^2 = 1 - C^2 - S^2``, formed as ``-u (2 + u) - S^2`` from ``u = C - 1`` (the mean of
    ``cos - 1``): no cancellation where ``C`` is near 1."""
    return -mean_cos_m1 * (2 + mean_cos_m1) - mean_sin.square()


def loss_factor(reduction: str, batch: int, slices: int, grad_factor: float) -> float:
    """The factor that turns d stat_k / d sums into d loss / d sums."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return grad_factor / (batch * slices) if reduction == "mean" else grad_factor


def loss_divisor(reduction: str, batch: int, slices: int) -> int:
    """What the sum of the statistics is divided by to give the reduced loss."""
    return batch * slices if reduction == "mean" else 1
