"""The registered op: opcheck, torch.compile without graph breaks, its own checks."""

import pytest
import torch

from helpers import assert_relative_close, oracle, random_case
from sigreg_kernels import sigreg

SAMPLES = [((1,), 5, 3, 2), ((2,), 37, 19, 65), ((3,), 9, 1, 1)]


@pytest.mark.parametrize("batch_shape, samples, dim, slices", SAMPLES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(batch_shape, samples, dim, slices, requires_grad, dtype):
    x, directions = random_case(batch_shape, samples, dim, slices, dtype=dtype)
    x.requires_grad_(requires_grad)
    directions.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.sigreg.ecf_sums.default, (x, directions, 17, 3.0))


@pytest.mark.parametrize("batch_shape, samples, dim, slices", SAMPLES)
@pytest.mark.parametrize("need_grad_directions", [False, True])
def test_opcheck_backward(batch_shape, samples, dim, slices, need_grad_directions):
    x, directions = random_case(batch_shape, samples, dim, slices)
    _, projection = torch.ops.sigreg.ecf_sums(x, directions, 9, 2.0)
    grad_sums = torch.randn(x.shape[0], 2, slices, 9)
    args = (grad_sums, x, directions, projection, 9, 2.0, need_grad_directions)
    torch.library.opcheck(torch.ops.sigreg.ecf_sums_backward.default, args)


@pytest.mark.parametrize("batch_shape, samples, dim, slices", SAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_without_directions(batch_shape, samples, dim, slices, dtype):
    x, _ = random_case(batch_shape, samples, dim, slices, dtype=dtype)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), None, 9, 2.0)
        torch.library.opcheck(torch.ops.sigreg.ecf_sums.default, args)
    grad_sums = torch.randn(x.shape[0], 2, dim, 9, dtype=dtype)
    args = (grad_sums, x, None, x.new_empty((0,)), 9, 2.0, False)
    torch.library.opcheck(torch.ops.sigreg.ecf_sums_backward.default, args)


def test_backward_op_recomputes_a_missing_projection():
    x, directions = random_case((2,), 20, 6, 9)
    _, projection = torch.ops.sigreg.ecf_sums(x, directions, 17, 3.0)
    grad_sums = torch.randn(2, 2, 9, 17)
    kept = torch.ops.sigreg.ecf_sums_backward(grad_sums, x, directions, projection, 17, 3.0, True)
    recomputed = torch.ops.sigreg.ecf_sums_backward(grad_sums, x, directions, torch.empty(0), 17, 3.0, True)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x, directions = random_case((2,), 33, 10, 21)
    compiled = torch.compile(lambda a, b: sigreg(a, b, backend="cpu") * 3.0, fullgraph=True)
    xc = x.clone().requires_grad_()
    loss = compiled(xc, directions)
    loss.backward()
    xe = x.double().requires_grad_()
    expected = oracle(xe, directions) * 3.0
    expected.backward()
    assert_relative_close("compiled loss", loss, expected, 1e-5)
    assert_relative_close("compiled grad_x", xc.grad, xe.grad, 1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, a: torch.ops.sigreg.ecf_sums(x[0], a, 17, 3.0), "x must be 3-D"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, a[:-1], 17, 3.0), "directions must have D"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, a.double(), 17, 3.0), "dtype of x"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, a, 1, 3.0), "knots must be >= 2"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, a, 17, float("nan")), "t_max must be finite"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x.int(), a.int(), 17, 3.0), "x must be float16"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x[:, :0], a, 17, 3.0), "at least one sample"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x[0], None, 17, 3.0), "x must be 3-D"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x[:, :0], None, 17, 3.0), "at least one sample"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x[..., :0], None, 17, 3.0), "at least one column"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x.int(), None, 17, 3.0), "x must be float16"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, None, 1, 3.0), "knots must be >= 2"),
        (lambda x, a: torch.ops.sigreg.ecf_sums(x, None, 17, -1.0), "t_max must be finite"),
        (lambda x, a: torch.ops.sigreg.ecf_sums_backward(torch.zeros(2, 2, 3, 17), x, None, torch.empty(0), 17, 3.0,
                                                         False), "grad_sums must have shape"),
    ],
)
def test_op_checks_its_arguments(call, message):
    x, directions = random_case((2,), 8, 4, 3)
    with pytest.raises(RuntimeError, match=message):
        call(x, directions)
