"""The fused CPU kernel against the float64 oracle: values and gradients."""

import pytest
import torch

from helpers import assert_matches_oracle, assert_relative_close, oracle, random_case, relative_error
from sigreg_kernels import sigreg, sigreg_reference

# (batch dims, N, D, K): none a multiple of the kernel's blocks (64 slices, 128 rows), plus the edges.
SHAPES = [
    ((), 1, 5, 3),
    ((), 2, 1, 1),
    ((), 300, 7, 1),
    ((2,), 37, 19, 65),
    ((2, 3), 41, 33, 129),
    ((3,), 129, 1, 70),
]
SCALES = [1e-3, 1.0, 100.0]


def cpu_sigreg(x, directions, **kwargs):
    return sigreg(x, directions, backend="cpu", **kwargs)


def upstream_weight(batch_shape, slices, seed=1):
    return torch.randn(*batch_shape, slices, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_values_and_gradients_fp32(batch_shape, samples, dim, slices, scale):
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale)
    assert_matches_oracle(cpu_sigreg, x, directions, upstream_weight(batch_shape, slices))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES[2:5])
def test_low_precision_inputs(dtype, batch_shape, samples, dim, slices):
    x, directions = random_case(batch_shape, samples, dim, slices, dtype=dtype)
    assert_matches_oracle(cpu_sigreg, x, directions, upstream_weight(batch_shape, slices, seed=2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_reference(reduction):
    x, directions = random_case((2, 3), 50, 16, 40)
    expected = oracle(x, directions, reduction=reduction)
    actual = sigreg(x, directions, reduction=reduction, backend="cpu")
    assert actual.shape == expected.shape
    assert_relative_close(reduction, actual, expected, 1e-5)


def test_loss_times_two_doubles_the_gradient():
    """An upstream gradient other than 1 must reach the kernel (a shortcut for 1.0 would pass otherwise)."""
    x, directions = random_case((2,), 64, 12, 30)
    grads = []
    for factor in (1.0, 2.0):
        xg = x.clone().requires_grad_()
        (factor * sigreg(xg, directions, backend="cpu")).backward()
        grads.append(xg.grad)
    expected = x.double().clone().requires_grad_()
    (2.0 * oracle(expected, directions)).backward()
    assert_relative_close("2 * loss", grads[1], expected.grad, 1e-5)
    torch.testing.assert_close(grads[1], 2 * grads[0], rtol=1e-6, atol=0)


def test_gradcheck_fp64():
    x, directions = random_case((2,), 9, 4, 5, dtype=torch.float64)
    x.requires_grad_()
    directions.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: sigreg(a, b, reduction="none", backend="cpu", knots=7, t_max=2.5), (x, directions)
    )


def test_non_contiguous_inputs():
    x, directions = random_case((3,), 40, 24, 33)
    x_t = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major
    d_t = directions.t().contiguous().t()
    assert not x_t.is_contiguous() and not d_t.is_contiguous()
    x_slice = torch.stack([x, -x], dim=-1)[..., 0]  # stride-2 view holding the values of x
    assert_relative_close("transposed", sigreg(x_t, d_t, backend="cpu"), oracle(x, directions), 1e-5)
    assert torch.equal(x_slice, x) and x_slice.stride(-1) == 2
    assert_relative_close("strided", sigreg(x_slice, directions, backend="cpu"), oracle(x, directions), 1e-5)


@pytest.mark.parametrize("knots, t_max", [(2, 1.0), (5, 3.0), (33, 4.5)])
def test_other_quadratures(knots, t_max):
    x, directions = random_case((2,), 70, 10, 20)
    expected = oracle(x, directions, knots=knots, t_max=t_max, reduction="none")
    actual = sigreg(x, directions, knots=knots, t_max=t_max, reduction="none", backend="cpu")
    assert_relative_close(f"knots={knots}", actual, expected, 1e-5)


def test_reruns_are_bit_identical():
    x, directions = random_case((2,), 1000, 64, 200, scale=3.0)
    results = []
    for _ in range(2):
        xg, dg = x.clone().requires_grad_(), directions.clone().requires_grad_()
        loss = sigreg(xg, dg, backend="cpu")
        loss.backward()
        results.append((loss, xg.grad, dg.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_result_does_not_depend_on_thread_count():
    x, directions = random_case((2,), 300, 32, 150)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_()
            loss = sigreg(xg, directions, backend="cpu")
            loss.backward()
            results.append((loss, xg.grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])


def test_nan_and_inf_propagate_as_nan():
    x, directions = random_case((), 20, 6, 8)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 2] = bad
        xb.requires_grad_()
        loss = sigreg(xb, directions, backend="cpu")
        assert torch.isnan(loss), bad
        assert torch.isnan(sigreg_reference(xb.detach(), directions))
        loss.backward()  # must not crash


def test_huge_projections_stay_accurate():
    """Angles beyond the polynomial sin/cos range take the exact fallback."""
    x, directions = random_case((), 64, 3, 7, scale=1e5)
    expected = oracle(x, directions, reduction="none")
    reference32 = sigreg_reference(x, directions, reduction="none")
    tol = max(1e-5, 2 * relative_error(reference32, expected))
    assert_relative_close("|x| ~ 1e5", sigreg(x, directions, reduction="none", backend="cpu"), expected, tol)
