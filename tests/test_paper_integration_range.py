"""The LeJEPA paper's Algorithm 1 integrates over ``[-5, 5]`` with 17 trapezoid points.

The integrand ``|ψ_N(t) − φ(t)|² φ(t)`` is even, so a symmetric grid of ``2m + 1``
points on ``[-a, a]`` (``0`` is a knot) folds onto the grid of ``m + 1`` points on
``[0, a]`` with the doubled weights ``[Δ, 2Δ, ..., 2Δ, Δ]`` (SPEC §1): the paper's
integral is exactly ``t_max=5.0, knots=9``.
"""

import pytest
import torch
from helpers import random_case

from sigreg_kernels import SIGReg, sigreg
from sigreg_kernels.nn import sample_directions


def paper_statistic(x, directions, half_width=5.0, points=17):
    """Algorithm 1 written out in float64: ``N · trapz(|ecf − φ|² φ, linspace(-a, a, points))`` per slice."""
    t = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    window = torch.exp(-0.5 * t.square())
    projection = x.double() @ directions.double()
    ecf = torch.exp(1j * projection.unsqueeze(-1) * t).mean(dim=-3)  # [*B, K, T]
    err = (ecf - window).abs().square() * window
    return torch.trapezoid(err, t, dim=-1) * x.shape[-2]


@pytest.mark.parametrize("half_width, points", [(5.0, 17), (3.0, 33), (2.0, 3)])
def test_the_paper_range_is_t_max_and_half_the_points_plus_one(half_width, points):
    x, directions = random_case((2,), 70, 9, 13, scale=1.3, dtype=torch.float64, seed=1)
    ours = sigreg(x, directions, t_max=half_width, knots=(points + 1) // 2, reduction="none")
    truth = paper_statistic(x, directions, half_width, points)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=0)


def test_the_paper_range_in_float32_and_in_the_module():
    x, _ = random_case((3,), 50, 8, 1, scale=1.1, seed=2)
    stats = sigreg(x, sample_directions(0, 8, 21, "cpu"), t_max=5.0, knots=9, reduction="none")
    truth = paper_statistic(x, sample_directions(0, 8, 21, "cpu"))
    torch.testing.assert_close(stats.double(), truth, rtol=1e-5, atol=0)
    loss = SIGReg(num_slices=21, t_max=5.0, knots=9)(x)  # step 0: the same directions
    torch.testing.assert_close(loss.double(), truth.mean(), rtol=1e-5, atol=0)


def test_the_default_quadrature_is_not_the_papers():
    """[0, 3] with 17 knots and [-5, 5] with 17 points are different integrals: the option matters."""
    x, directions = random_case((), 60, 6, 10, scale=1.5, dtype=torch.float64, seed=3)
    default = sigreg(x, directions, reduction="none")
    assert not torch.allclose(default, paper_statistic(x, directions), rtol=1e-3)
