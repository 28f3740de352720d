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
