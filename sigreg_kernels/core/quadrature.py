"""Quadrature of the Epps-Pulley integral (SPEC §1), shared by every backend."""

import torch


def knot_spacing(knots: int, t_max: float) -> float:
    """Distance between consecutive knots t_j = j * t_max / (knots - 1)."""
    return t_max / (knots - 1)


def quadrature(knots: int, t_max: float, dtype=torch.float32, device=None):
    """Knots ``t``, target characteristic function ``phi`` and weights ``w``, each ``[knots]``.

    Trapezoid weights on ``[0, t_max]`` doubled for the even integrand, times the
    Gaussian window ``phi = exp(-t^2 / 2)``. Built in float64, then cast, so every
    dtype sees the correctly rounded values.
    """
    delta = knot_spacing(knots, t_max)
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)
    phi = torch.exp(-0.5 * t.square())
    trapezoid = torch.full((knots,), 2.0 * delta, dtype=torch.float64)
    trapezoid[0] = trapezoid[-1] = delta
    w = trapezoid * phi
    return tuple(v.to(dtype=dtype, device=device) for v in (t, phi, w))


def phi_minus_one(knots: int, t_max: float, dtype=torch.float32, device=None):
    """``phi - 1 = expm1(-t^2 / 2)`` at the knots, ``[knots]``, to full relative precision.

    The kernels sum ``cos(t p) - 1`` rather than ``cos(t p)``, and form ``C - phi`` as
    ``mean(cos - 1) - (phi - 1)``: at small ``t`` both terms are tiny and keep
    their digits, where ``C`` and ``phi`` would both round to within a few ulps of 1.
    """
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)
    return torch.expm1(-0.5 * t.square()).to(dtype=dtype, device=device)
