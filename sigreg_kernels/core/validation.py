"""Argument checks with messages that name the argument and what was expected."""

import math

import torch

from .numerics import REDUCTIONS  # noqa: F401  (nn.py checks its reduction with it)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, min_dim: int, max_dim: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if value.dim() < min_dim or (max_dim is not None and value.dim() > max_dim):
        expected = f"{min_dim}-D" if max_dim == min_dim else f"at least {min_dim}-D"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")


def check_sigreg_args(x, directions, knots, t_max, reduction, clip_value=None) -> None:
    check_tensor("x", x, min_dim=2)
    samples, dim = x.shape[-2], x.shape[-1]
    if samples == 0:
        raise ValueError(f"x must hold at least one sample (N = x.shape[-2] > 0), got shape {tuple(x.shape)}")
    if dim == 0:
        raise ValueError(f"x must have at least one feature (D = x.shape[-1] > 0), got shape {tuple(x.shape)}")
    check_quadrature_args(knots, t_max)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_clip_value(clip_value)
    if directions is None:  # the univariate test of x's own columns
        return
    check_tensor("directions", directions, min_dim=2, max_dim=2)
    if directions.shape[0] != dim:
        raise ValueError(
            f"directions must have shape (D, K) with D = x.shape[-1] = {dim}, got {tuple(directions.shape)}"
        )
    if directions.shape[1] == 0:
        raise ValueError("directions must hold at least one slice (K = directions.shape[1] > 0)")
    if x.device != directions.device:
        raise ValueError(f"x and directions must be on the same device, got {x.device} and {directions.device}")
    if x.dtype != directions.dtype and torch.float64 in (x.dtype, directions.dtype):
        raise TypeError(
            f"x ({x.dtype}) and directions ({directions.dtype}) cannot be combined: "
            "float64 is only computed with float64"
        )


def check_clip_value(clip_value) -> None:
    if clip_value is None:
        return
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)):
        raise TypeError(f"clip_value must be a float or None, got {type(clip_value).__name__}")
    if math.isnan(clip_value):
        raise ValueError("clip_value must not be NaN")


def check_quadrature_args(knots, t_max) -> None:
    if isinstance(knots, bool) or not isinstance(knots, int):
        raise TypeError(f"knots must be an int, got {type(knots).__name__}")
    if knots < 2:
        raise ValueError(f"knots must be >= 2, got {knots}")
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)):
        raise TypeError(f"t_max must be a float, got {type(t_max).__name__}")
    if not math.isfinite(t_max) or t_max <= 0:
        raise ValueError(f"t_max must be finite and > 0, got {t_max}")


def check_weights(weights, x) -> None:
    """Sample weights ``[*B, N]``, broadcastable to ``x.shape[:-1]``: bool or floating point, on x's
    device. Negative, NaN and infinite weights are errors too, but only checked for CPU tensors:
    on a GPU the check would wait for the device (a host sync per call)."""
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
    if weights.dtype != torch.bool and not weights.is_floating_point():
        raise TypeError(f"weights must be bool (a mask) or floating point, got {weights.dtype}")
    rows = tuple(x.shape[:-1])
    if weights.dim() < 1 or weights.shape[-1] != rows[-1] or weights.dim() > len(rows):
        raise ValueError(f"weights must have shape (*B, N) with N = x.shape[-2] = {rows[-1]}, broadcastable to "
                         f"x.shape[:-1] = {rows}, got {tuple(weights.shape)}")
    # (By hand: torch.broadcast_shapes costs tens of microseconds a call.)
    if any(w != r and w != 1 for w, r in zip(reversed(weights.shape), reversed(rows))):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not broadcast to x.shape[:-1] = {rows}")
    if weights.device != x.device:
        raise ValueError(f"weights must be on x's device {x.device}, got {weights.device}")
    if weights.device.type == "cpu" and weights.dtype != torch.bool:
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
