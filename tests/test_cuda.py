"""The CUDA kernels against the float64 oracle, and as a registered op (GPU only).

Every test skips, with the reason, where there is no GPU or the extension was
built without its CUDA kernels. Nothing touches the device at import time.
"""

import pytest
import torch
from helpers import CUDA_KERNEL_SHAPES, assert_matches_oracle, assert_relative_close, oracle, weighted_case
from helpers import values_and_grads as with_grads

from sigreg_kernels import sigreg
from sigreg_kernels.backends import reference_ecf_sums


def cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from sigreg_kernels import ops
    except ImportError as error:
        return f"the compiled extension is not built ({error})"
    if not ops.CUDA_KERNELS_BUILT:
        return "the extension was built without CUDA kernels (FORCE_CUDA=1 pip install ...)"
    return None


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


SHAPES = CUDA_KERNEL_SHAPES
SCALES = [1e-3, 1.0, 100.0]


def cuda_sigreg(x, directions, **kwargs):
    return sigreg(x, directions, backend="cuda", **kwargs)


def case(batch_shape, samples, dim, slices, scale=1.0, dtype=torch.float32, seed=0):
    return weighted_case(batch_shape, samples, dim, slices, scale=scale, dtype=dtype, device="cuda", seed=seed)


def check_fp32(x, directions, weight, **kwargs):
    assert_matches_oracle(cuda_sigreg, x, directions, weight, **kwargs)


@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_values_and_gradients_fp32(batch_shape, samples, dim, slices, scale):
    check_fp32(*case(batch_shape, samples, dim, slices, scale=scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES[2:])
def test_low_precision_inputs(dtype, batch_shape, samples, dim, slices):
    x, directions, weight = case(batch_shape, samples, dim, slices, dtype=dtype)
    assert_matches_oracle(cuda_sigreg, x, directions, weight)  # 2e-2 for 16-bit inputs
    xg, dg = x.clone().requires_grad_(), directions.clone().requires_grad_()
    cuda_sigreg(xg, dg).backward()
    assert xg.grad.dtype == dtype and dg.grad.dtype == dtype


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scaled_scalar_loss(reduction):
    """loss * 2 through a scalar reduction: an upstream gradient of exactly one is not special."""
    x, directions, _ = case((2,), 77, 40, 90)
    truth = [t.double() for t in _scalar_grads(lambda a, b: oracle(a, b, reduction=reduction), x, directions)]
    ours = _scalar_grads(lambda a, b: cuda_sigreg(a, b, reduction=reduction), x, directions)
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, actual.double(), expected, 1e-5)


def _scalar_grads(fn, x, directions):
    x = x.detach().clone().requires_grad_()
    directions = directions.detach().clone().requires_grad_()
    loss = 2 * fn(x, directions)
    loss.backward()
    return loss.detach(), x.grad, directions.grad


def test_gradient_of_x_only():
    """need_grad_directions=False: grad_x alone, and directions.grad stays None."""
    x, directions, weight = case((2,), 50, 20, 30)
    xg = x.clone().requires_grad_()
    (cuda_sigreg(xg, directions, reduction="none") * weight).sum().backward()
    truth = with_grads(lambda a, b: oracle(a, b, reduction="none"), x, directions, weight)[1]
    assert_relative_close("grad_x", xg.grad.double(), truth, 1e-5)


@pytest.mark.parametrize("knots", [2, 5, 17, 18, 40])
def test_ecf_sums_at_any_knot_count(knots):
    """The raw sums, including knot 0 (= N) and knots past the first 16 (a second and third pass)."""
    x, directions, _ = case((2,), 70, 24, 66)
    sums, projection = torch.ops.sigreg.ecf_sums(x, directions, knots, 2.5)
    assert projection.shape == (0,) and sums.dtype == torch.float32
    expected = reference_ecf_sums(x.double(), directions.double(), knots, 2.5)
    assert_relative_close("sums", sums.double(), expected, 1e-5)
    assert torch.all(sums[:, 0, :, 0] == 70) and torch.all(sums[:, 1, :, 0] == 0)
    check_fp32(x, directions, torch.randn(2, 66, device="cuda"), knots=knots, t_max=2.5)


def test_many_samples_split_into_chunks():
    """N large enough that blocks sum several tiles and grad_directions splits over 16 chunks."""
    check_fp32(*case((), 70_000, 16, 8, scale=2.0))


def test_tensor_cores_off_matches(monkeypatch):
    """SIGREG_CUDA_DISABLE_TENSOR_CORES=1: the FMA path, same accuracy for 16-bit inputs."""
    x, directions, weight = case((2,), 100, 70, 80, dtype=torch.bfloat16)
    monkeypatch.setenv("SIGREG_CUDA_DISABLE_TENSOR_CORES", "1")
    assert_matches_oracle(cuda_sigreg, x, directions, weight)  # 2e-2 for 16-bit inputs


def test_float32_matmul_precision():
    """"highest" (the default) is exact float32; "high" lets the projections use TF32, as torch.matmul does."""
    x, directions, weight = case((2,), 200, 300, 70)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
        torch.set_float32_matmul_precision("high")
        tf32 = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    finally:
        torch.set_float32_matmul_precision(previous)
    truth = with_grads(lambda a, b: oracle(a, b, reduction="none"), x, directions, weight)
    for name, e, t, expected in zip(("value", "grad_x", "grad_directions"), exact, tf32, truth):
        assert_relative_close(name, e, expected, 1e-5)
        assert_relative_close(name + " (tf32)", t, expected, 2e-2)
    assert not torch.equal(exact[0], tf32[0]), "precision 'high' did not change the projection"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_reruns(dtype):
    x, directions, weight = case((2,), 3000, 100, 200, dtype=dtype)
    first = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    for _ in range(2):
        again = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_non_finite_inputs_propagate():
    x, directions, _ = case((), 40, 8, 10)
    x[3, 2] = float("nan")
    assert torch.isnan(cuda_sigreg(x, directions))


def test_float64_is_rejected_with_a_clear_message():
    x, directions, _ = case((), 10, 4, 3)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.sigreg.ecf_sums(x.double(), directions.double(), 17, 3.0)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck(requires_grad, contiguous):
    x, directions, _ = case((2,), 37, 19, 65)
    if not contiguous:
        x, directions = x.transpose(1, 2).contiguous().transpose(1, 2), directions.t().contiguous().t()
    torch.library.opcheck(
        torch.ops.sigreg.ecf_sums.default,
        (x.requires_grad_(requires_grad), directions.requires_grad_(requires_grad), 17, 3.0),
    )
    grad_sums = torch.randn(2, 2, 65, 17, device="cuda")
    for need_grad_directions in (False, True):
        torch.library.opcheck(
            torch.ops.sigreg.ecf_sums_backward.default,
            (grad_sums, x.detach(), directions.detach(), torch.empty(0, device="cuda"), 17, 3.0, need_grad_directions),
        )


def test_torch_compile_fullgraph():
    x, directions, weight = case((2,), 100, 33, 70)
    compiled = torch.compile(lambda a, b: cuda_sigreg(a, b, reduction="none"), fullgraph=True)
    eager = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    traced = with_grads(compiled, x, directions, weight)
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), traced, eager):
        assert_relative_close(name, actual, expected, 1e-6)
