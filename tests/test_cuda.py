"""The CUDA backend on a GPU: each kernel against ``contract.py`` in float64 (the
statistic's loss too), the op (``sigreg(..., backend="cuda")``: gpu/fused.py around the
kernels) against the float64 oracle, one launch per kernel, opcheck and torch.compile.

Every test skips, with the reason, where there is no GPU or the extension was
built without its CUDA kernels. Nothing touches the device at import time.
``test_cuda_emulated.py`` runs the kernels' device code on the CPU.
"""

import pytest
import torch
from helpers import (CUDA_KERNEL_SHAPES, LOW_PRECISION_GRAD_TOL, LOW_PRECISION_VALUE_TOL, assert_matches_oracle,
                     assert_relative_close, oracle, random_case, weighted_case)
from helpers import values_and_grads as with_grads

from sigreg_kernels import sigreg
from sigreg_kernels.gpu.cuda import plan as cuda_plan
from sigreg_kernels.gpu import contract


def cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from sigreg_kernels import extension
    except ImportError as error:
        return f"the compiled extension is not built ({error})"
    if not extension.CUDA_KERNELS_BUILT:
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


def f64(t):
    return None if t is None else t.double()


@pytest.fixture
def precision():
    """Restores torch's float32 matmul precision after the test."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


# ---- The op against the float64 oracle ----

@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_values_and_gradients_fp32(batch_shape, samples, dim, slices, scale):
    """float32 at "highest" precision: the SGEMM route (the kernels read the projection)."""
    assert_matches_oracle(cuda_sigreg, *case(batch_shape, samples, dim, slices, scale=scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_shape, samples, dim, slices", SHAPES[2:] + [((2,), 4096, 512, 1024)])
def test_low_precision_inputs(dtype, batch_shape, samples, dim, slices):
    """16-bit inputs: the kernels' tensor-core product; the headline shape among them."""
    assert_matches_oracle(cuda_sigreg, *case(batch_shape, samples, dim, slices, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_unbiased(dtype, weighted):
    """unbiased=True, the statistic kernel's U-statistic: values and both gradients (|x| ~ 3, away
    from the Gaussian, where the statistic is not a small difference)."""
    x, directions, weight = case((2,), 300, 24, 70, scale=3.0, dtype=dtype)
    weights = (torch.rand(2, 300, generator=torch.Generator().manual_seed(5)) < 0.7).cuda() if weighted else None
    assert_matches_oracle(cuda_sigreg, x, directions, weight, unbiased=True, weights=weights)


def test_tensor_cores_off_matches(monkeypatch):
    """SIGREG_CUDA_DISABLE_TENSOR_CORES=1: the FMA product, same accuracy for 16-bit inputs."""
    monkeypatch.setenv("SIGREG_CUDA_DISABLE_TENSOR_CORES", "1")
    assert_matches_oracle(cuda_sigreg, *case((2,), 100, 70, 80, dtype=torch.bfloat16))


def test_float32_matmul_precision(precision):
    """"highest" (the default) is exact float32; "high" lets the kernels' product use TF32, as torch.matmul does."""
    x, directions, weight = case((2,), 200, 300, 70)
    precision("highest")
    exact = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    precision("high")
    tf32 = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    truth = with_grads(lambda a, b: oracle(a, b, reduction="none"), x, directions, weight)
    for name, e, t, expected in zip(("value", "grad_x", "grad_directions"), exact, tf32, truth):
        assert_relative_close(name, e, expected, 1e-5)
        assert_relative_close(name + " (tf32)", t, expected, 2e-2)
    assert not torch.equal(exact[0], tf32[0]), "precision 'high' did not change the projection"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clip_value", [None, 0.3])
def test_scalar_loss_and_clipping(reduction, clip_value):
    """loss * 2 through a scalar reduction (a scale of strides 0), with and without clipping."""
    x, directions, _ = case((2,), 77, 40, 90)
    x[..., :3] += 2.0  # some slices far from normal: above the clip

    def grads(fn, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        loss = 2 * fn(a, b, reduction=reduction, clip_value=clip_value)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    ours = grads(cuda_sigreg, x, directions)
    truth = grads(lambda a, b, **kw: oracle(a, b, **kw), x, directions)
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, actual.double(), expected.double(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_directions(dtype):
    """directions=None: the univariate test of x's columns (the kernels' projected mode)."""
    x, _ = random_case((2,), 300, 48, 1, scale=1.5, dtype=dtype, device="cuda", seed=2)
    xg = x.clone().requires_grad_()
    stat = cuda_sigreg(xg, None, reduction="none")
    weight = torch.randn_like(stat.float())
    (stat * weight).sum().backward()
    xr = x.double().requires_grad_()
    truth = oracle_none(xr)
    (truth * weight.double()).sum().backward()
    value_tol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_VALUE_TOL
    grad_tol = 1e-5 if dtype == torch.float32 else LOW_PRECISION_GRAD_TOL
    assert_relative_close("value", stat, truth, value_tol)
    assert_relative_close("grad_x", xg.grad, xr.grad, grad_tol)


def oracle_none(x):
    from sigreg_kernels import sigreg_reference

    return sigreg_reference(x, None, reduction="none")


@pytest.mark.parametrize("knots", [2, 5, 17, 18, 40])
def test_any_knot_count(knots):
    """16 knots per pass: one, two (18: a second pass of one knot) and three passes."""
    x, directions, weight = case((2,), 70, 24, 66)
    assert_matches_oracle(cuda_sigreg, x, directions, weight, knots=knots, t_max=2.5)


def test_many_samples():
    """N large: many row splits, summed in a fixed order by the statistic kernel."""
    assert_matches_oracle(cuda_sigreg, *case((), 70_000, 16, 8, scale=2.0))


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


# ---- Each kernel against its contract (contract.py in float64) ----

KERNEL_CASES = [  # (dtype, with directions, float32 precision)
    (torch.bfloat16, True, "highest"), (torch.float16, True, "highest"), (torch.float32, True, "highest"),
    (torch.float32, False, "highest"), (torch.bfloat16, False, "highest"), (torch.float32, True, "high"),
]


def assert_kernels_close(ours, truth, x, directions, dtype, matmul):
    """``(stat, coef, loss, G)`` of the kernels against the contract's: 16-bit inputs within the op's
    bounds; float32 within 1e-5, or one ulp of the largest angle of ``x`` (finite) along
    ``directions``; TF32 products ("high", with directions) within 2e-2."""
    tf32 = dtype == torch.float32 and matmul == "high" and directions is not None
    if dtype != torch.float32:
        stat_tol, grad_tol = LOW_PRECISION_VALUE_TOL, LOW_PRECISION_GRAD_TOL
    else:
        largest_angle = 3.0 * contract.projection(f64(x), f64(directions)).abs().max().item()
        stat_tol = grad_tol = 2e-2 if tf32 else max(1e-5, torch.finfo(torch.float32).eps * largest_angle)
    for name, actual, expected, tol in zip(("stat", "coef", "loss", "G"), ours, truth, (stat_tol,) * 3 + (grad_tol,)):
        assert_relative_close(name, actual, expected, tol)


@pytest.mark.parametrize("dtype, with_directions, matmul", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("shape", [(2, 130, 257, 67), (6, 41, 33, 129), (1, 4096, 512, 1024)], ids=str)
def test_kernels_match_the_contract(shape, dtype, with_directions, matmul, precision):
    """ecf_partials (any split), statistic and slice_gradient (scale of strides 0) and slice_gradient_."""
    from sigreg_kernels.gpu.cuda import ops as cuda_ops

    precision(matmul)
    batch, samples, dim, slices = shape
    x, directions = random_case((batch,), samples, dim, slices, dtype=dtype, device="cuda", seed=1)
    directions = directions if with_directions else None
    slices = slices if with_directions else dim
    partials = cuda_ops.ecf_partials(x, directions, 17, 3.0)
    truth = contract.ecf_partials(f64(x), f64(directions), 17, 3.0)
    stat, coef, loss = cuda_ops.statistic(partials, samples, 17, 3.0, "mean", None, 2.0)
    true_stat, true_coef, true_loss = contract.statistic(truth, samples, 17, 3.0, "mean", None, 2.0)
    scale = torch.tensor(0.7, device="cuda").expand(batch, slices)
    g = cuda_ops.slice_gradient(true_coef.float(), scale, x, directions, 17, 3.0)
    true_g = contract.slice_gradient(true_coef, f64(scale), f64(x), f64(directions), 17, 3.0)
    assert_kernels_close((stat, coef, loss, g), (true_stat, true_coef, true_loss, true_g), x, directions, dtype,
                         matmul)
    if directions is None:
        projection = x.clone()
        cuda_ops.slice_gradient_(projection, true_coef.float(), scale, 17, 3.0)
        assert torch.equal(projection, g)


@pytest.mark.parametrize("dtype, with_directions, matmul", KERNEL_CASES, ids=str)
@pytest.mark.parametrize("shape, knots", [((3, 300, 48, 72), 17), ((2, 70, 40, 40), 40)], ids=str)
def test_weighted_kernels_match_the_contract(shape, knots, dtype, with_directions, matmul, precision):
    """Sample weights: random weights with zeros, NaN/Inf in rows of weight 0, a batch index of
    no weight (stat and coef exactly 0), against contract.py's weighted contract in float64;
    all-ones weights give the unweighted results."""
    from sigreg_kernels.gpu.cuda import ops as cuda_ops

    precision(matmul)
    batch, samples, dim, slices = shape
    x, directions = random_case((batch,), samples, dim, slices, dtype=dtype, device="cuda", seed=3)
    directions = directions if with_directions else None
    slices = slices if with_directions else dim
    generator = torch.Generator().manual_seed(4)
    weights = torch.rand(batch, samples, generator=generator) * 2
    weights = torch.where(torch.rand(batch, samples, generator=generator) < 0.35, 0.0, weights)
    weights[-1] = 0  # a batch index of no weight
    weights = weights.cuda()
    x_clean = x.clone()
    x[weights == 0] = float("nan")  # left out, whatever they hold
    x[(weights == 0).nonzero()[::2].unbind(1)] = float("inf")
    moments = torch.stack((weights.double().sum(1), weights.double().square().sum(1)), dim=1).float()
    partials = cuda_ops.ecf_partials(x, directions, knots, 3.0, None, weights)
    truth = contract.ecf_partials(f64(x), f64(directions), knots, 3.0, weights=f64(weights))
    stat, coef, loss = cuda_ops.statistic(partials, samples, knots, 3.0, "sum", None, 2.0, None, moments)
    true_stat, true_coef, true_loss = contract.statistic(truth, samples, knots, 3.0, "sum", None, 2.0,
                                                           moments=f64(moments))
    scale = torch.randn(batch, slices, generator=generator).cuda()
    g = cuda_ops.slice_gradient(true_coef.float(), scale, x, directions, knots, 3.0, weights)
    true_g = contract.slice_gradient(true_coef, f64(scale), f64(x), f64(directions), knots, 3.0, f64(weights))
    for value in (partials, stat, coef, loss, g):
        assert value.isfinite().all()
    assert (stat[-1] == 0).all() and (coef[-1] == 0).all() and (g[weights == 0] == 0).all()
    assert_kernels_close((stat, coef, loss, g), (true_stat, true_coef, true_loss, true_g), x_clean, directions,
                         dtype, matmul)
    if directions is None:
        projection = x.clone()
        cuda_ops.slice_gradient_(projection, true_coef.float(), scale, knots, 3.0, weights)
        assert torch.equal(projection, g)
    ones = torch.ones(batch, samples, device="cuda")
    plain = cuda_ops.ecf_partials(x_clean, directions, knots, 3.0)
    assert torch.equal(cuda_ops.ecf_partials(x_clean, directions, knots, 3.0, None, ones), plain)
    _, plain_coef, _ = cuda_ops.statistic(plain, samples, knots, 3.0, "sum", None, 1.0)
    assert torch.equal(cuda_ops.slice_gradient(plain_coef, scale, x_clean, directions, knots, 3.0, ones),
                       cuda_ops.slice_gradient(plain_coef, scale, x_clean, directions, knots, 3.0))


def loss_of(stat, reduction):
    """The statistic kernel's loss, exactly: its float32 statistics summed in float64, scaled, rounded once."""
    return (stat.double().sum() / contract.loss_divisor(reduction, *stat.shape)).float()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("batch, slices, knots", [(3, 70, 17), (5, 3000, 17), (4, 700, 130), (1, 1, 17)])
def test_statistic_reduces_the_loss(batch, slices, knots, reduction):
    """The loss of the statistic launch (many blocks; the last to arrive sums): the float64 contract's,
    the same on every rerun; the arrival counter, garbage before ecf_partials, is 0 after each kernel."""
    from sigreg_kernels.gpu.cuda import ops as cuda_ops

    x, directions = random_case((batch,), 200, 24, slices, scale=1.5, device="cuda", seed=3)
    x[..., :2] += 1.0  # some slices far from normal
    arrivals = torch.full((1,), 12345, dtype=torch.int32, device="cuda")
    partials = cuda_ops.ecf_partials(x, directions, knots, 3.0, arrivals)
    assert arrivals.item() == 0, "ecf_partials zeroes the counter"
    clip_value = 0.01
    stat, coef, loss = cuda_ops.statistic(partials, 200, knots, 3.0, reduction, clip_value, 1.0, arrivals)
    assert arrivals.item() == 0, "statistic leaves the counter at 0"
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device == x.device
    assert torch.equal(loss, loss_of(stat, reduction))
    _, _, true_loss = contract.statistic(f64(partials), 200, knots, 3.0, reduction, clip_value, 1.0)
    assert_relative_close("loss", loss, true_loss, 1e-6)
    for _ in range(3):
        again = cuda_ops.statistic(partials, 200, knots, 3.0, reduction, clip_value, 1.0, arrivals)
        assert all(torch.equal(a, b) for a, b in zip((stat, coef, loss), again)), "bit-identical reruns"
    own = cuda_ops.statistic(partials, 200, knots, 3.0, reduction, clip_value, 1.0)  # a counter of its own
    assert torch.equal(own[2], loss)
    partials[0, 0, 0, 0, 1] = float("nan")
    assert cuda_ops.statistic(partials, 200, knots, 3.0, reduction, clip_value, 1.0, arrivals)[2].isnan()
    assert arrivals.item() == 0


def test_statistic_of_an_empty_batch():
    partials = torch.zeros(0, 1, 2, 5, 17, device="cuda")
    losses = {r: torch.ops.sigreg.statistic(partials, 10, 17, 3.0, r, None, 1.0)[2] for r in ("mean", "sum", "none")}
    assert losses["mean"].isnan() and losses["sum"] == 0 and losses["none"] == 0


def test_unbiased_statistic_of_one_weighted_row_is_nan():
    """No pair of samples, whatever the weight's rounding: w^2 in float32 is the sum of squares of one row."""
    partials = torch.rand(4, 2, 2, 5, 17, generator=torch.Generator().manual_seed(23)).cuda()
    w = torch.tensor([1.5, 1.0436, 1.1, 0.675], device="cuda")
    stat, coef, _ = torch.ops.sigreg.statistic(partials, 7, 17, 3.0, "none", None, 1.0, None,
                                               torch.stack((w, w.square()), dim=1), True)
    assert stat.isnan().all() and coef.isnan().all()


def test_arrivals_is_checked():
    x, directions, _ = case((2,), 37, 19, 65)
    partials = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0)
    for bad in (torch.zeros(1, dtype=torch.int64, device="cuda"), torch.zeros(2, dtype=torch.int32, device="cuda"),
                torch.zeros(1, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="arrivals must be an int32 tensor of one element"):
            torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0, bad)
        with pytest.raises(RuntimeError, match="arrivals must be an int32 tensor of one element"):
            torch.ops.sigreg.statistic(partials, 37, 17, 3.0, "mean", None, 1.0, bad)


def test_fake_kernels_plan_the_real_splits():
    """The fake ecf_partials (for torch.compile) has the real partials' shape: the same plan, this GPU's SMs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for batch, samples, dim, slices in [(1, 4096, 512, 1024), (3, 37, 19, 65), (1, 70_000, 16, 8)]:
        x, directions = random_case((batch,), samples, dim, slices, device="cuda")
        real = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0)
        with FakeTensorMode() as mode:
            fake = torch.ops.sigreg.ecf_partials(mode.from_tensor(x), mode.from_tensor(directions), 17, 3.0)
        assert fake.shape == real.shape
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        plan = cuda_plan.plan_ecf_partials(batch, samples, dim, slices, 17, x.dtype, True, False, sms)
        assert real.shape[1] == plan.splits


def test_each_kernel_is_one_launch_and_nothing_else():
    """The profiler sees exactly the kernel's launch for each op: no fill, no copy."""
    from torch.profiler import ProfilerActivity, profile

    x, directions = random_case((2,), 3000, 64, 300, dtype=torch.bfloat16, device="cuda")
    arrivals = torch.empty(1, dtype=torch.int32, device="cuda")  # zeroed by ecf_partials, as in gpu/fused.py
    partials = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0, arrivals)
    _, coef, _ = torch.ops.sigreg.statistic(partials, 3000, 17, 3.0, "mean", None, 1.0, arrivals)
    scale = torch.ones(2, 300, device="cuda")
    calls = {
        "ecf_partials_kernel": lambda: torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0, arrivals),
        "statistic_kernel": lambda: torch.ops.sigreg.statistic(partials, 3000, 17, 3.0, "mean", None, 1.0,
                                                               arrivals),
        "slice_gradient_kernel": lambda: torch.ops.sigreg.slice_gradient(coef, scale, x, directions, 17, 3.0),
    }
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not kernels:
            pytest.skip("the profiler records no CUDA kernels here (CUPTI)")
        assert len(kernels) == 1 and name in kernels[0], (name, kernels)


@pytest.mark.parametrize("dtype, matmul", [(torch.bfloat16, "highest"), (torch.float32, "highest"),
                                           (torch.float32, "high")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_path_dispatches_few_ops(dtype, matmul, reduction, precision):
    """The whole op: at most 3 device ops forward and 4 backward (tests/test_op_count.py's
    bound, here through the registered CUDA ops), none dispatching another inside."""
    from op_counter import OpCounter

    from sigreg_kernels.gpu import fused
    precision(matmul)
    x, directions = random_case((2,), 3000, 64, 300, dtype=dtype, device="cuda")
    inputs = [x.clone().requires_grad_(), directions.clone().requires_grad_()]
    with OpCounter() as forward:
        loss = fused.fused_sigreg("cuda", *inputs, 17, 3.0, reduction, 0.01)
    upstream = torch.ones_like(loss)
    with OpCounter() as backward:
        torch.autograd.grad(loss, inputs, upstream)
    assert forward.total <= 3 and backward.total <= 4, (forward.ops, backward.ops)
    assert forward.ops["sigreg::ecf_partials"] == forward.ops["sigreg::statistic"] == 1, forward.ops
    inside = {name for counter in (forward, backward) for inner in counter.inside.values() for name in inner}
    assert not inside, inside


def test_float64_is_rejected_with_a_clear_message():
    x, directions, _ = case((), 10, 4, 3)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.sigreg.ecf_partials(x.double().reshape(1, 10, 4), directions.double(), 17, 3.0)


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck(contiguous):
    x, directions, _ = case((2,), 37, 19, 65)
    if not contiguous:
        x, directions = x.transpose(1, 2).contiguous().transpose(1, 2), directions.t().contiguous().t()
    partials = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0)
    _, coef, _ = torch.ops.sigreg.statistic(partials, 37, 17, 3.0, "sum", 0.1, 1.0)
    scale = torch.randn(65, 2, device="cuda").t()
    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")
    samples = [
        (torch.ops.sigreg.ecf_partials.default, (x, directions, 17, 3.0)),
        (torch.ops.sigreg.ecf_partials.default, (x, None, 5, 2.0)),
        (torch.ops.sigreg.ecf_partials.default, (x, directions, 17, 3.0, arrivals)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "mean", None, 2.0)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "none", 0.5, 1.0)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "sum", 0.1, 1.0, arrivals)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "mean", None, 1.0, arrivals, None, True)),
        (torch.ops.sigreg.slice_gradient.default, (coef, scale, x, directions, 17, 3.0)),
        (torch.ops.sigreg.slice_gradient_.default,
         ((x.contiguous() @ directions).contiguous(), coef, scale, 17, 3.0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    x, directions, weight = case((2,), 100, 33, 70)
    compiled = torch.compile(lambda a, b: cuda_sigreg(a, b, reduction="none"), fullgraph=True)
    eager = with_grads(lambda a, b: cuda_sigreg(a, b, reduction="none"), x, directions, weight)
    traced = with_grads(compiled, x, directions, weight)
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), traced, eager):
        assert_relative_close(name, actual, expected, 1e-6)

