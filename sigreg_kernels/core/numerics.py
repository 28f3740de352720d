"""Numerics every backend shares: the dtype sums accumulate in, and how a reduction turns
per-slice statistics into the loss and its gradient."""

import torch

REDUCTIONS = ("mean", "sum", "none")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (16-bit inputs are summed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_factor(reduction: str, batch: int, slices: int, grad_factor: float) -> float:
    """The factor that turns d stat_k / d sums into d loss / d sums."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return grad_factor / (batch * slices) if reduction == "mean" else grad_factor


def loss_divisor(reduction: str, batch: int, slices: int) -> int:
    """What the sum of the statistics is divided by to give the reduced loss."""
    return batch * slices if reduction == "mean" else 1
