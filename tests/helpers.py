"""Comparison helpers shared by the test files."""

import torch

from sigreg_kernels import sigreg_reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_relative_close(name: str, actual, expected, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def oracle(x, directions, **kwargs):
    """The reference evaluated in float64 on the same (rounded) inputs: the truth to compare against."""
    return sigreg_reference(x.double(), directions.double(), **kwargs)


def random_case(batch_shape, samples, dim, slices, scale=1.0, dtype=torch.float32, device="cpu", seed=0):
    """``x: [*batch_shape, samples, dim]`` of std ``scale`` and unit-column ``directions: [dim, slices]``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, samples, dim, generator=generator, dtype=torch.float64) * scale
    directions = torch.randn(dim, slices, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    return x.to(device=device, dtype=dtype), directions.to(device=device, dtype=dtype)


# (batch dims, N, D, K) for the CUDA kernels: none a multiple of their tiles (64 rows,
# 64 slices, 32 and 256 features), the single-element edges, and a batch of views.
CUDA_KERNEL_SHAPES = [
    ((), 1, 1, 1),
    ((), 2, 5, 3),
    ((), 300, 7, 1),
    ((2,), 37, 19, 65),
    ((2, 3), 41, 33, 129),
    ((3,), 129, 1, 70),
    ((), 130, 257, 67),
]


def weighted_case(batch_shape, samples, dim, slices, scale=1.0, dtype=torch.float32, device="cpu", seed=0):
    """``random_case`` and a random upstream weight ``[*batch_shape, slices]`` for the statistics."""
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale, dtype=dtype, device=device, seed=seed)
    weight = torch.randn(*batch_shape, slices, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return x, directions, weight


def values_and_grads(fn, x, directions, weight):
    """``fn``'s statistics (``reduction="none"``) and the gradients of ``2 * sum(weight * stats)``.

    A random upstream gradient, times two: a kernel that assumed an upstream
    gradient of one would fail.
    """
    x = x.detach().clone().requires_grad_()
    directions = directions.detach().clone().requires_grad_()
    stat = fn(x, directions)
    loss = (stat * weight.to(stat.dtype)).sum() * 2
    grad_x, grad_directions = torch.autograd.grad(loss, (x, directions))
    return stat.detach(), grad_x, grad_directions


def loss_and_grads(fn, x, directions=None):
    """``[loss, grad_x(, grad_directions)]`` of the scalar ``fn(x(, directions))``, on fresh leaf copies."""
    inputs = [x.clone().requires_grad_()] + ([] if directions is None else [directions.clone().requires_grad_()])
    loss = fn(*inputs)
    return [loss, *torch.autograd.grad(loss, inputs)]


# Bounds for 16-bit inputs (assert_matches_oracle says why they differ).
LOW_PRECISION_VALUE_TOL = 1e-4
LOW_PRECISION_GRAD_TOL = 2e-2


def assert_matches_oracle(fn, x, directions, weight, *, tolerance=None, **kwargs):
    """Values and gradients of ``fn(x, directions, reduction="none", **kwargs)`` against the float64 oracle.

    float32 inputs: within 1e-5, or where larger twice the float32 reference's own
    error, or one float32 ulp of the largest angle t * p (at |x| ~ 100 the rounding
    of t * p alone exceeds 1e-5; on a handful of elements the reference's own error
    can be luckily small, but no float32 evaluation can beat the angle's rounding),
    or where a gradient cancels, what that rounding does to it (``angle_rounding_bound``).
    16-bit inputs (the oracle sees the same rounded inputs): the statistics within
    1e-4, the gradients within 2e-2. A product of two 16-bit numbers is exact in
    float32 and every backend sums in float32, so the statistics are as accurate as
    with float32 inputs; the gradients come back rounded to the input dtype. At large
    N and |x| ~ 10 a dropped row tile moves the statistics by ~2e-3: 2e-2 would pass it.
    ``tolerance``: one bound for all three instead (float32 through TF32 tensor cores).
    """
    kwargs["reduction"] = "none"
    ours = values_and_grads(lambda a, b: fn(a, b, **kwargs), x, directions, weight)
    truth = values_and_grads(lambda a, b: oracle(a, b, **kwargs), x, directions, weight)
    if tolerance is not None:
        tolerances = [tolerance] * 3
    elif x.dtype == torch.float32:
        ref32 = values_and_grads(lambda a, b: sigreg_reference(a, b, **kwargs), x, directions, weight)
        largest_angle = kwargs.get("t_max", 3.0) * (x.double() @ directions.double()).abs().max().item()
        angle_ulp = torch.finfo(torch.float32).eps * largest_angle
        tolerances = [max(1e-5, 2 * relative_error(r, t), angle_ulp) for r, t in zip(ref32, truth)]
        if "weights" not in kwargs:
            bounds = angle_rounding_bound(x, directions, weight, truth, kwargs.get("knots", 17),
                                          kwargs.get("t_max", 3.0))
            tolerances = [tolerances[0]] + [max(tol, bound) for tol, bound in zip(tolerances[1:], bounds)]
    else:
        tolerances = [LOW_PRECISION_VALUE_TOL, LOW_PRECISION_GRAD_TOL, LOW_PRECISION_GRAD_TOL]
    for name, actual, expected, tol in zip(("value", "grad_x", "grad_directions"), ours, truth, tolerances):
        assert_relative_close(name, actual, expected, tol)
    assert ours[1].dtype == x.dtype and ours[2].dtype == directions.dtype, "gradients come back in the input dtype"


def angle_rounding_bound(x, directions, weight, truth, knots: int, t_max: float) -> list[float]:
    """The relative error of ``values_and_grads``' gradients to expect from rounding each angle
    ``t_j p`` (by ``eps |t_j p|``, independently over knots and elements), over the exact
    gradients. Large only where the gradient's terms cancel, e.g. one sample at |t p| ~ 500,
    where the exact gradient is the trapezoid rule's tiny error and float32 angles move it by O(1).

    ``G_nk = 2 s_k sum_j c_j [S_j cos(t_j p_nk) - (C_j - phi_j) sin(t_j p_nk)]``, ``c_j = 2 w_j t_j``
    (SPEC §1): an angle error ``e`` moves term ``j`` by at most ``(|S_j| + |C_j - phi_j|) e``.
    The errors add in quadrature through the knots and the GEMMs.
    """
    from sigreg_kernels.core.quadrature import quadrature

    x64, a64 = x.detach().double(), directions.detach().double()
    t, phi, w = quadrature(knots, t_max, dtype=torch.float64, device=x.device)
    angles = (x64 @ a64).unsqueeze(-1) * t  # [*B, N, K, T]
    dc = angles.cos().mean(dim=-3, keepdim=True) - phi  # [*B, 1, K, T]
    s = angles.sin().mean(dim=-3, keepdim=True)
    moved = 2 * w * t * (s.abs() + dc.abs()) * torch.finfo(torch.float32).eps * angles.abs()
    g_error = moved.square().sum(dim=-1).sqrt() * 2 * weight.double().abs().unsqueeze(-2)  # [*B, N, K]
    error_x = (g_error.square() @ a64.square().mT).sum().sqrt()
    rows = x64.reshape(-1, x64.shape[-1]).square()
    error_directions = (rows.mT @ g_error.reshape(-1, a64.shape[-1]).square()).sum().sqrt()
    return [(error / exact.double().norm().clamp_min(1e-300)).item()
            for error, exact in zip((error_x, error_directions), truth[1:])]


def run_steps(model, loss_fn, data, steps=2):
    """Loss and parameter gradients of ``steps`` training steps of ``loss_fn(model(data))``."""
    out = []
    for _ in range(steps):
        model.zero_grad()
        loss = loss_fn(model(data))
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return out
