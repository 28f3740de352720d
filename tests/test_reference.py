"""The reference against an independent NumPy form of the published statistic.

Here the Epps-Pulley statistic is written as the published test defines it:
N times the trapezoid integral over [-t_max, t_max] of |ECF(t) - exp(-t^2/2)|^2
weighted by exp(-t^2/2), with the complex ECF, on the symmetric grid. The
reference folds the even integrand onto [0, t_max]; both must agree.
"""

import numpy as np
import pytest
import torch

from helpers import random_case
from sigreg_kernels import quadrature, sigreg_reference


def epps_pulley_numpy(samples: np.ndarray, knots: int, t_max: float) -> float:
    t = np.linspace(-t_max, t_max, 2 * knots - 1)
    ecf = np.exp(1j * np.outer(samples, t)).mean(axis=0)
    target = np.exp(-0.5 * t**2)
    integrand = np.abs(ecf - target) ** 2 * target
    return len(samples) * np.trapezoid(integrand, t)


@pytest.mark.parametrize("knots, t_max", [(17, 3.0), (5, 2.0), (2, 1.0)])
def test_reference_matches_the_published_definition(knots, t_max):
    x, directions = random_case((2,), 60, 9, 13, dtype=torch.float64, scale=1.3)
    projections = (x @ directions).numpy()  # [2, N, K]
    expected = np.array([[epps_pulley_numpy(projections[b, :, k], knots, t_max) for k in range(13)] for b in range(2)])
    actual = sigreg_reference(x, directions, knots=knots, t_max=t_max, reduction="none").numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_quadrature_weights_follow_the_spec():
    t, phi, w = quadrature(17, 3.0, dtype=torch.float64)
    delta = 3.0 / 16
    torch.testing.assert_close(t, torch.arange(17, dtype=torch.float64) * delta)
    torch.testing.assert_close(phi, torch.exp(-0.5 * t**2))
    omega = torch.full((17,), 2 * delta, dtype=torch.float64)
    omega[0] = omega[-1] = delta
    torch.testing.assert_close(w, omega * phi)


def test_a_gaussian_sample_scores_low_and_a_collapsed_one_high():
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(4096, 16, generator=generator, dtype=torch.float64)
    directions = torch.randn(16, 64, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0)
    collapsed = gaussian * 0.01
    assert sigreg_reference(gaussian, directions) < 5.0  # O(1): only sampling noise
    assert sigreg_reference(collapsed, directions) > 100.0
