"""The Triton primitives (``sigreg::triton_*``) against ``contract.py`` in float64.

Every test runs on two devices:
- "cpu": the kernels under the Triton interpreter. It is chosen when the kernels are
  defined, at the first import of ``sigreg_kernels.gpu.triton.ops``; the ``device`` fixture sets
  TRITON_INTERPRET=1 before that import. Where CUDA is present, the process compiles
  the kernels for the GPU instead and these skip, unless TRITON_INTERPRET=1 was set for
  the whole run.
- "cuda": the compiled kernels; skipped without a GPU.
The interpreter pays per tile and per jit-function call: the shapes are small, but span
several slice blocks, row splits and row tiles, with N, D, K multiples of no block.
"""

import importlib
import os
import sys

import pytest
import torch
from helpers import assert_relative_close, random_case, relative_error

from sigreg_kernels.gpu import contract

pytest.importorskip("triton")

DEVICES = ("cpu", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _import_op_module():
    return importlib.import_module("sigreg_kernels.gpu.triton.ops")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    loaded = sys.modules.get("sigreg_kernels.gpu.triton.ops")
    if request.param == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
            pytest.skip("CUDA is present: this process compiles the kernels for the GPU "
                        "(run with TRITON_INTERPRET=1 to test the interpreter on CPU)")
        if loaded is not None and not loaded.INTERPRET:
            pytest.skip("sigreg_kernels.gpu.triton.ops was imported without TRITON_INTERPRET=1: "
                        "its kernels are compiled, not interpreted")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if os.environ.get("TRITON_INTERPRET") == "1" or (loaded is not None and loaded.INTERPRET):
            pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, not compiled for the GPU")
    op = _import_op_module()
    if request.param == "cpu" and op._interpreter_numpy_problem():
        pytest.skip(op._interpreter_numpy_problem())
    return request.param


def tolerance(x, directions, knots_t_max=3.0, value_16bit=1e-4):
    """fp32: 1e-5, or one float32 ulp of the largest angle t * p where larger (at |x| ~ 100
    the rounding of t * p alone exceeds 1e-5); 16-bit inputs: ``value_16bit`` (the oracle
    sees the same rounded inputs, the products are exact)."""
    projection = x.double() if directions is None else x.double() @ directions.double()
    angle_ulp = torch.finfo(torch.float32).eps * knots_t_max * projection.abs().max().item()
    return max(1e-5, 2 * angle_ulp) if x.dtype == torch.float32 else max(value_16bit, 2 * angle_ulp)


def _case(batch_shape, samples, dim, slices, dtype="fp32", scale=1.0, projected=False, device="cpu", seed=0):
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale, dtype=DTYPES[dtype], device=device,
                                seed=seed)
    x = x.reshape(-1, samples, dim)
    return (x, None) if projected else (x, directions)


def _double(x, directions):
    return x.double(), None if directions is None else directions.double()


def _coefficients(x, directions, knots, seed=1, scale_kind="full"):
    """A realistic coef (from the float64 statistic of x) and a scale of the given kind."""
    partials = contract.ecf_partials(*_double(x, directions), knots, 3.0)
    _, coef, _ = contract.statistic(partials, x.shape[1], knots, 3.0, "sum", None, 1.0)
    batch, slices = coef.shape[0], coef.shape[2]
    generator = torch.Generator().manual_seed(seed)
    if scale_kind == "stride0":  # the gradient of a scalar loss: an expanded view (made on the device:
        scale = torch.full((1, 1), 1.7, device=x.device).expand(batch, slices)  # a copy there is dense)
    else:
        scale = torch.randn(batch, slices, generator=generator).to(x.device)
    return coef.float().to(x.device), scale


# (batch dims, N, D, K, |x| scale, knots)
SHAPES = [
    pytest.param((), 70, 20, 70, 1.0, 17, id="multi-block"),  # several row tiles and splits, partial ones
    pytest.param((2, 3), 33, 5, 17, 1.0, 17, id="batch-dims"),
    pytest.param((), 1, 1, 1, 1.0, 17, id="N=D=K=1"),
    pytest.param((3,), 40, 1, 3, 1.0, 5, id="D=1-knots=5"),
    pytest.param((), 64, 16, 1, 1.0, 2, id="K=1-knots=2"),
    pytest.param((), 50, 20, 40, 100.0, 17, id="x-scale-100"),
    pytest.param((2,), 30, 9, 20, 1.0, 33, id="knots=33"),            # two knot chunks
]


@pytest.mark.parametrize("projected", [False, True], ids=["directions", "projected"])
@pytest.mark.parametrize("batch_shape, samples, dim, slices, scale, knots", SHAPES)
def test_fp32_primitives_match(device, batch_shape, samples, dim, slices, scale, knots, projected):
    _check_all(device, batch_shape, samples, dim, slices, scale, knots, projected, "fp32")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("projected", [False, True], ids=["directions", "projected"])
@pytest.mark.parametrize("batch_shape, samples, dim, slices, scale, knots", [
    pytest.param((), 70, 20, 70, 1.0, 17, id="multi-block"),
    pytest.param((2,), 40, 24, 33, 10.0, 5, id="batch-scale-10"),
])
def test_16bit_primitives_match(device, batch_shape, samples, dim, slices, scale, knots, projected, dtype):
    _check_all(device, batch_shape, samples, dim, slices, scale, knots, projected, dtype)


def _check_all(device, batch_shape, samples, dim, slices, scale, knots, projected, dtype):
    op = _import_op_module()
    x, directions = _case(batch_shape, samples, dim, slices, dtype, scale, projected, device)
    exact = _double(x, directions)
    tol = tolerance(x, directions)

    partials = op.ecf_partials(x, directions, knots, 3.0)
    assert partials.dtype == torch.float32 and partials.shape[2:] == (2, slices if not projected else dim, knots)
    expected = contract.ecf_partials(*exact, knots, 3.0)
    assert_relative_close("sums", partials.sum(1), expected.sum(1).float(), tol)
    # Knot 0 is exact: cos(0) - 1 = 0 and sin(0) = 0 in every split.
    knot0 = partials[:, :, :, :, 0]
    assert torch.equal(knot0, torch.zeros_like(knot0))

    stat, coef, loss = op.statistic(partials, samples, knots, 3.0, "mean", None, 2.0)
    expected = contract.statistic(partials.double(), samples, knots, 3.0, "mean", None, 2.0)
    for name, value, exact_value in zip(("stat", "coef", "loss"), (stat, coef, loss), expected):
        assert_relative_close(name, value, exact_value, 1e-5)

    coef, scale_k = _coefficients(x, directions, knots)
    grad = op.slice_gradient(coef, scale_k, x, directions, knots, 3.0)
    assert grad.dtype == x.dtype and grad.shape == (x.shape[0], samples, coef.shape[2])
    expected_grad = contract.slice_gradient(coef.double(), scale_k.double(), *exact, knots, 3.0)
    assert_relative_close("G", grad, expected_grad, tol if x.dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("clip", [None, "median"])
def test_statistic_matches(device, reduction, clip):
    op = _import_op_module()
    x, directions = _case((3,), 60, 6, 37, device=device)
    # Partials of three row splits, from float64 sums rounded to float32.
    splits = [contract.ecf_partials(*_double(x[:, rows], directions), 17, 3.0) for rows in
              (slice(0, 20), slice(20, 45), slice(45, 60))]
    partials = torch.cat(splits, dim=1).float()
    expected = contract.statistic(partials.double(), 60, 17, 3.0, reduction, None, 1.5)
    clip_value = None if clip is None else expected[0].median().item()
    expected_stat, expected_coef, expected_loss = contract.statistic(partials.double(), 60, 17, 3.0, reduction,
                                                                       clip_value, 1.5)
    stat, coef, loss = op.statistic(partials, 60, 17, 3.0, reduction, clip_value, 1.5)
    assert stat.shape == (3, 37) and coef.shape == (3, 2, 37, 17) and loss.shape == ()
    assert_relative_close("stat", stat, expected_stat, 1e-5)
    assert_relative_close("coef", coef, expected_coef, 1e-5)
    # The loss is the float64 mean or sum of the statistics the kernel returned, rounded once.
    divisor = contract.loss_divisor(reduction, *stat.shape)
    assert loss.item() == float(torch.tensor(stat.double().sum().item() / divisor, dtype=torch.float32))
    assert_relative_close("loss", loss, expected_loss, 1e-5)
    if clip_value is not None:
        clipped = expected_stat == 0
        assert clipped.any() and torch.equal(stat == 0, clipped)
        assert torch.equal(coef.transpose(1, 2)[clipped], torch.zeros_like(coef.transpose(1, 2)[clipped]))


def test_strided_inputs(device):
    # D-major x, K-major directions, a stride-0 scale, a transposed projection for the
    # projected kernels: strides as given, no copies.
    op = _import_op_module()
    x, directions = _case((2,), 45, 20, 36, device=device)
    x_strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    directions_strided = directions.t().contiguous().t()
    assert not x_strided.is_contiguous() and not directions_strided.is_contiguous()
    tol = tolerance(x, directions)
    for inputs in ((x_strided, directions_strided), (x_strided, None)):
        exact = _double(*inputs)
        partials = op.ecf_partials(*inputs, 17, 3.0)
        assert_relative_close("sums", partials.sum(1), contract.ecf_partials(*exact, 17, 3.0).sum(1).float(), tol)
        coef, scale = _coefficients(*inputs, 17, scale_kind="stride0")
        assert scale.stride() == (0, 0)
        grad = op.slice_gradient(coef, scale, *inputs, 17, 3.0)
        expected = contract.slice_gradient(coef.double(), scale.double(), *exact, 17, 3.0)
        assert_relative_close("G", grad, expected, tol)


def test_slice_gradient_in_place(device):
    op = _import_op_module()
    x, directions = _case((2,), 50, 12, 40, device=device)
    projection = x @ directions  # float32 [B, N, K]: the "highest" route's SGEMM output
    coef, scale = _coefficients(x, directions, 17, scale_kind="stride0")
    expected = contract.slice_gradient(coef.double(), scale.double(), projection.double(), None, 17, 3.0)
    pointer = projection.data_ptr()
    assert op.slice_gradient_(projection, coef, scale, 17, 3.0) is None
    assert projection.data_ptr() == pointer
    assert_relative_close("G", projection, expected, tolerance(x, directions))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's NaN
def test_nan_and_inf_propagate(device):
    # Knot 0 is sum cos(0 * p): NaN where p is NaN or infinite, as the reference; a NaN
    # statistic survives clip_value (NaN is below nothing), its coefficients stay NaN.
    op = _import_op_module()
    x, directions = _case((3,), 40, 6, 10, device=device)
    x[0, 3, 2] = float("nan")
    x[1, 7, 1] = float("inf")
    for inputs in ((x, directions), (x, None)):
        partials = op.ecf_partials(*inputs, 5, 3.0)
        expected = contract.ecf_partials(*_double(*inputs), 5, 3.0).float()
        assert torch.equal(partials.sum(1).isnan(), expected.sum(1).isnan())
        finite = expected.sum(1).isfinite()
        assert torch.allclose(partials.sum(1)[finite], expected.sum(1)[finite], rtol=1e-5, atol=1e-4)
        stat, coef, loss = op.statistic(partials, 40, 5, 3.0, "none", 1e30, 1.0)
        expected_stat, expected_coef, _ = contract.statistic(partials.double(), 40, 5, 3.0, "none", 1e30, 1.0)
        assert loss.isnan()
        assert torch.equal(stat.isnan(), expected_stat.isnan()) and stat[0].isnan().any() and (stat[2] == 0).all()
        assert torch.equal(coef.isnan(), expected_coef.isnan()) and (coef[2] == 0).all()


def test_one_launch_per_op(device):
    op = _import_op_module()
    x, directions = _case((2,), 40, 8, 20, device=device)
    coef, scale = _coefficients(x, directions, 17)
    calls = [
        ("triton_ecf_partials", lambda: op.ecf_partials(x, directions, 17, 3.0)),
        ("triton_ecf_partials", lambda: op.ecf_partials(x, None, 17, 3.0)),
        ("triton_statistic", lambda: op.statistic(op.ecf_partials(x, directions, 17, 3.0), 40, 17, 3.0, "mean", 0.1,
                                                  1.0)),
        ("triton_slice_gradient", lambda: op.slice_gradient(coef, scale, x, directions, 17, 3.0)),
        ("triton_slice_gradient_", lambda: op.slice_gradient_((x @ directions), coef, scale, 17, 3.0)),
    ]
    for name, call in calls:
        before = op.LAUNCHES.copy()
        call()
        launched = op.LAUNCHES - before
        expected = {name: 1, "triton_ecf_partials": 1} if name == "triton_statistic" else {name: 1}
        assert dict(launched) == expected, (name, dict(launched))


@pytest.mark.parametrize("dtype, precision", [("bf16", "highest"), ("fp32", "highest"), ("fp32", "high")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_path_dispatches_few_ops(device, dtype, precision, reduction, monkeypatch):
    """The whole op with this backend: at most 3 device ops forward, 4 backward, each op
    of the backend one kernel launch with no device op of its own inside."""
    from op_counter import OpCounter

    from sigreg_kernels.gpu import fused
    op = _import_op_module()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    x, directions = _case((2,), 40, 8, 20, dtype=dtype, device=device)
    inputs = [x.clone().requires_grad_(), directions.clone().requires_grad_()]
    before = op.LAUNCHES.copy()
    with OpCounter() as forward:
        loss = fused.fused_sigreg("triton", *inputs, 17, 3.0, reduction, 0.01)
    upstream = torch.ones_like(loss)
    with OpCounter() as backward:
        grads = torch.autograd.grad(loss, inputs, upstream)
    assert forward.total <= 3 and backward.total <= 4, (forward.ops, backward.ops)
    ours = {name: n for counter in (forward, backward) for name, n in counter.ops.items() if name.startswith("sigreg")}
    assert dict(op.LAUNCHES - before) == {name.split("::")[1]: n for name, n in ours.items()}
    # Inside the ops, nothing but (under the interpreter) its copies of the arguments to numpy and back.
    interpreter_copies = {"aten::set_", "aten::copy_"} if device == "cpu" else set()
    inside = {name for counter in (forward, backward) for inner in counter.inside.values() for name in inner}
    assert inside <= interpreter_copies, inside
    expected = fused.fused_sigreg("primitives", *[t.detach().double().requires_grad_() for t in inputs], 17, 3.0,
                                  reduction, 0.01)
    # "high" on a GPU: the kernels' products round their inputs to TF32 (10-bit mantissas), as
    # cuBLAS does; the interpreter multiplies in float32 whatever the precision.
    tf32 = dtype == "fp32" and precision == "high" and device != "cpu"
    assert_relative_close("loss", loss, expected, 1e-4 if dtype == "fp32" and not tf32 else 5e-3)
    assert all(g is not None and g.isfinite().all() for g in grads)


def test_batch_beyond_grid_limit(device, monkeypatch):
    # CUDA caps grid axis 2, which carries the batch, at 65535 programs; a larger batch is
    # launched in chunks. A lowered cap makes 5 batch indices take 2 launches: the results
    # must be those of a single launch, bit for bit.
    op = _import_op_module()
    x, directions = _case((5,), 20, 4, 6, device=device)
    coef, scale = _coefficients(x, directions, 5)

    def run():
        return [op.ecf_partials(x, directions, 5, 3.0), op.ecf_partials(x, None, 5, 3.0),
                op.slice_gradient(coef, scale, x, directions, 5, 3.0)]

    single = run()
    monkeypatch.setattr(op, "MAX_GRID_Z", 4)
    assert op._batch_chunks(5) == [(0, 4), (4, 1)]
    before = op.LAUNCHES.copy()
    for chunked, expected in zip(run(), single):
        assert torch.equal(chunked, expected)
    assert dict(op.LAUNCHES - before) == {"triton_ecf_partials": 4, "triton_slice_gradient": 2}


def test_bit_identical_reruns(device):
    op = _import_op_module()
    x, directions = _case((2,), 70, 20, 40, device=device)
    coef, scale = _coefficients(x, directions, 17)

    def run():
        partials = op.ecf_partials(x, directions, 17, 3.0)
        return [partials, *op.statistic(partials, 70, 17, 3.0, "mean", None, 1.0),
                op.slice_gradient(coef, scale, x, directions, 17, 3.0)]

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_opcheck(device):
    op = _import_op_module()
    x, directions = _case((2,), 24, 8, 16, device=device)
    coef, scale = _coefficients(x, directions, 5)
    coef_p, scale_p = _coefficients(x, None, 5, scale_kind="stride0")
    partials = op.ecf_partials(x, directions, 5, 3.0)
    samples = [
        (op.triton_ecf_partials, (x, directions, 5, 3.0, None)),
        (op.triton_ecf_partials, (x, None, 5, 3.0, torch.empty(1, dtype=torch.int32, device=device))),
        (op.triton_statistic, (partials, 24, 5, 3.0, "mean", None, 1.0)),
        (op.triton_statistic, (partials, 24, 5, 3.0, "none", 0.5, 2.0)),
        (op.triton_slice_gradient, (coef, scale, x, directions, 5, 3.0)),
        (op.triton_slice_gradient, (coef_p, scale_p, x, None, 5, 3.0)),
        (op.triton_slice_gradient_, ((x @ directions), coef, scale, 5, 3.0)),
    ]
    weights = _sample_weights(2, 24, device=device)
    samples += [  # with sample weights
        (op.triton_ecf_partials, (x, directions, 5, 3.0, None, weights)),
        (op.triton_ecf_partials, (x, None, 5, 3.0, torch.empty(1, dtype=torch.int32, device=device), weights)),
        (op.triton_statistic, (partials, 24, 5, 3.0, "sum", 0.5, 1.0, None, _moments(weights))),
        (op.triton_statistic, (partials, 24, 5, 3.0, "mean", None, 1.0, None, _moments(weights), True)),
        (op.triton_statistic, (partials, 24, 5, 3.0, "none", None, 1.0, None, None, True)),
        (op.triton_slice_gradient, (coef, scale, x, directions, 5, 3.0, weights)),
        (op.triton_slice_gradient_, ((x @ directions), coef, scale, 5, 3.0, weights)),
    ]
    for fn, args in samples:
        torch.library.opcheck(fn, args)


def test_dot_precision_follows_torch(device):
    op = _import_op_module()
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert op.dot_precision(torch.float32) == "ieee" and not op.tensor_cores(torch.float32)
        torch.set_float32_matmul_precision("high")
        assert op.dot_precision(torch.float32) == "tf32" and op.tensor_cores(torch.float32)
        assert op.dot_precision(torch.bfloat16) == "tf32"  # ignored for half inputs
    finally:
        torch.set_float32_matmul_precision(previous)


def test_fp32_highest_uses_ieee_dot(device):
    # The fused route never sends fp32 at "highest" to the in-kernel dot, but it is right there
    # too (and TF32, when allowed, within TF32's rounding).
    op = _import_op_module()
    x, directions = _case((), 50, 40, 30, scale=3.0, device=device)
    expected = contract.ecf_partials(*_double(x, directions), 17, 3.0).sum(1).float()
    previous = torch.get_float32_matmul_precision()
    try:
        for precision, tol in (("highest", tolerance(x, directions)), ("high", 2e-2)):
            torch.set_float32_matmul_precision(precision)
            assert_relative_close(precision, op.ecf_partials(x, directions, 17, 3.0).sum(1), expected, tol)
    finally:
        torch.set_float32_matmul_precision(previous)


def test_rejects_bad_inputs(device):
    op = _import_op_module()
    x, directions = _case((), 8, 4, 3, device=device)
    with pytest.raises(TypeError, match="float64"):
        op.ecf_partials(x.double(), directions.double(), 17, 3.0)
    with pytest.raises(TypeError, match="dtype"):
        op.ecf_partials(x, directions.half(), 17, 3.0)
    with pytest.raises(ValueError, match="directions"):
        op.ecf_partials(x, directions[:3], 17, 3.0)
    coef, scale = _coefficients(x, directions, 17)
    with pytest.raises(ValueError, match="coef"):
        op.slice_gradient(coef[..., :5], scale, x, directions, 17, 3.0)
    with pytest.raises(ValueError, match="scale"):
        op.slice_gradient(coef, scale.double(), x, directions, 17, 3.0)


@pytest.mark.parametrize("triton_version, numpy_version, fails", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.10.1", "2.5.0rc1", False),
    ("3.6rc1", "2.4.0", True),
])
def test_interpreter_numpy_incompatibility_is_named(monkeypatch, triton_version, numpy_version, fails):
    # triton < 3.7's interpreter breaks on numpy >= 2.4: the op says so instead of
    # failing inside a kernel with numpy's message.
    op = _import_op_module()
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    op._interpreter_numpy_problem.cache_clear()
    try:
        problem = op._interpreter_numpy_problem()
        if fails:
            assert problem is not None and "numpy<2.4" in problem and triton_version in problem
            if op.INTERPRET:
                x, directions = random_case((1,), 8, 4, 3)
                with pytest.raises(RuntimeError, match="numpy<2.4"):
                    op.ecf_partials(x, directions, 17, 3.0)
        else:
            assert problem is None
    finally:
        op._interpreter_numpy_problem.cache_clear()


# ---- GPU only: sizes where the plans' large tiles, resident directions and splits matter.

@pytest.mark.parametrize("dtype, dim", [("bf16", 384), ("bf16", 1100), ("fp32", 384)])
def test_cuda_large(device, dtype, dim):
    if device != "cuda":
        pytest.skip("GPU-sized case")
    op = _import_op_module()
    x, directions = _case((2,), 2048, dim, 300, dtype, device=device)
    exact = _double(x, directions)
    partials = op.ecf_partials(x, directions, 17, 3.0)
    assert_relative_close("sums", partials.sum(1), contract.ecf_partials(*exact, 17, 3.0).sum(1).float(),
                          tolerance(x, directions))
    coef, scale = _coefficients(x, directions, 17)
    grad = op.slice_gradient(coef, scale, x, directions, 17, 3.0)
    expected = contract.slice_gradient(coef.double(), scale.double(), *exact, 17, 3.0)
    assert_relative_close("G", grad, expected, 2e-2 if dtype == "bf16" else tolerance(x, directions))
    assert torch.equal(grad, op.slice_gradient(coef, scale, x, directions, 17, 3.0))
    assert relative_error(partials, op.ecf_partials(x, directions, 17, 3.0)) == 0


# ---- sample weights (contract.py, "Sample weights"): each kernel against the contract in float64.

def _sample_weights(batch, samples, seed=2, zeros=0.3, device="cpu"):
    """Random weights in [0, 2) with a fraction ``zeros`` of exact zeros, float32 [B, N]."""
    generator = torch.Generator().manual_seed(seed)
    weights = 2 * torch.rand(batch, samples, generator=generator)
    weights[torch.rand(batch, samples, generator=generator) < zeros] = 0.0
    return weights.to(device)


def _moments(weights):
    return torch.stack((weights.double().sum(1), weights.double().square().sum(1)), dim=1).float()


def _weighted_coefficients(x, directions, knots, weights, seed=1):
    partials = contract.ecf_partials(*_double(x, directions), knots, 3.0, weights=weights.double())
    _, coef, _ = contract.statistic(partials, x.shape[1], knots, 3.0, "sum", None, 1.0,
                                      moments=_moments(weights).double())
    scale = torch.randn(coef.shape[0], coef.shape[2], generator=torch.Generator().manual_seed(seed))
    return coef.float().to(x.device), scale.to(x.device)


def _check_weighted(op, x, directions, weights, knots, tol, grad_tol):
    """Every kernel with ``weights`` against the contract; returns (partials, stat, coef, G)."""
    exact, exact_weights, moments = _double(x, directions), weights.double(), _moments(weights)
    partials = op.ecf_partials(x, directions, knots, 3.0, None, weights)
    expected = contract.ecf_partials(*exact, knots, 3.0, weights=exact_weights)
    assert_relative_close("weighted sums", partials.sum(1), expected.sum(1).float(), tol)
    stat, coef, loss = op.statistic(partials, x.shape[1], knots, 3.0, "sum", None, 2.0, None, moments)
    expected = contract.statistic(partials.double(), x.shape[1], knots, 3.0, "sum", None, 2.0,
                                    moments=moments.double())
    for name, value, exact_value in zip(("stat", "coef", "loss"), (stat, coef, loss), expected):
        assert_relative_close(f"weighted {name}", value, exact_value, 1e-5)
    coef, scale = _weighted_coefficients(x, directions, knots, weights)
    expected = contract.slice_gradient(coef.double(), scale.double(), *exact, knots, 3.0, exact_weights)
    grad = op.slice_gradient(coef, scale, x, directions, knots, 3.0, weights)
    assert grad.dtype == x.dtype
    assert_relative_close("weighted G", grad, expected, grad_tol)
    if directions is None and x.dtype == torch.float32:  # the "highest" route: G over the projection, in place
        projection = x.clone()
        assert op.slice_gradient_(projection, coef, scale, knots, 3.0, weights) is None
        assert_relative_close("weighted G in place", projection, expected, grad_tol)
    return partials, stat, coef, grad


# (dtype, route, B, N, D, K, knots): each route in fp32 and bf16, fp16 once.
WEIGHTED_CASES = [
    pytest.param(dtype, route, *shape, id=f"{dtype}-{route}-{name}")
    for name, shape, dtypes, routes in [
        ("multi-block", (1, 70, 20, 70, 17), ("fp32", "bf16", "fp16"), ("directions", "projected")),  # splits, tiles
        ("knots=33", (2, 30, 9, 20, 33), ("fp32", "bf16"), ("directions", "projected")),  # two knot chunks
        ("slice-blocks", (1, 20, 6, 130, 5), ("fp32",), ("directions",)),  # two slice blocks
    ]
    for dtype in dtypes for route in routes if not (dtype == "fp16" and route == "projected")
]


@pytest.mark.parametrize("dtype, route, batch, samples, dim, slices, knots", WEIGHTED_CASES)
def test_weighted_primitives_match(device, dtype, route, batch, samples, dim, slices, knots):
    projected = route == "projected"
    op = _import_op_module()
    x, directions = _case((batch,), samples, dim, slices, dtype, projected=projected, device=device)
    weights = _sample_weights(batch, samples, device=device)
    tol = tolerance(x, directions)
    _check_weighted(op, x, directions, weights, knots, tol, tol if dtype == "fp32" else 2e-2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's NaN
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weighted_mask_ignores_nan_and_empty_batch(device, dtype):
    # A 0/1 mask with NaN and Inf written into masked rows: those rows count as P = 0 with
    # weight 0, so every result is finite and as the contract says; a batch index whose
    # weights are all 0 has sums 0, statistic 0 and coefficients 0 (not 0 / 0), and G = 0.
    op = _import_op_module()
    x, directions = _case((3,), 40, 6, 10, dtype, device=device)
    weights = (_sample_weights(3, 40, seed=5, zeros=0.4, device=device) > 0).float()
    weights[2] = 0.0
    masked = weights == 0
    x[masked] = float("nan")
    x[0, masked[0].nonzero()[0, 0]] = float("inf")
    x[1, masked[1].nonzero()[-1, 0], 2] = -float("inf")
    for inputs in ((x, directions), (x, None)):
        tol = tolerance(x[~masked].reshape(1, -1, 6), None)
        partials, stat, coef, grad = _check_weighted(op, *inputs, weights, 17, tol,
                                                     tol if dtype == "fp32" else 2e-2)
        for value in (partials, stat, coef, grad):
            assert value.isfinite().all()
        assert (partials[2] == 0).all() and (stat[2] == 0).all() and (coef[2] == 0).all()
        assert (grad[masked] == 0).all()
        # As the reduction gpu/fused.py asks for: the loss sums the finite statistics.
        moments = _moments(weights)
        _, _, loss = op.statistic(partials, 40, 17, 3.0, "sum", 0.01, 1.0, None, moments)
        assert loss.isfinite()


@pytest.mark.parametrize("projected", [False, True], ids=["directions", "projected"])
def test_unit_weights_are_no_weights(device, projected):
    op = _import_op_module()
    x, directions = _case((2,), 45, 12, 36, projected=projected, device=device)
    weights = torch.ones(2, 45, device=device)
    tol = tolerance(x, directions)
    partials = op.ecf_partials(x, directions, 17, 3.0)
    weighted = op.ecf_partials(x, directions, 17, 3.0, None, weights)
    assert_relative_close("sums", weighted.sum(1), partials.sum(1), tol)
    results = op.statistic(partials, 45, 17, 3.0, "mean", 0.01, 1.5)
    weighted = op.statistic(partials, 45, 17, 3.0, "mean", 0.01, 1.5, None, _moments(weights))
    for name, value, expected in zip(("stat", "coef", "loss"), weighted, results):
        assert_relative_close(name, value, expected, 1e-6)
    coef, scale = _coefficients(x, directions, 17)
    assert_relative_close("G", op.slice_gradient(coef, scale, x, directions, 17, 3.0, weights),
                          op.slice_gradient(coef, scale, x, directions, 17, 3.0), tol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the interpreter's 0 / 0 (then replaced)
def test_weighted_statistic_clip(device):
    op = _import_op_module()
    x, directions = _case((3,), 30, 5, 37, device=device)
    weights = _sample_weights(3, 30, device=device)
    weights[1] = 0.0
    partials = contract.ecf_partials(*_double(x, directions), 17, 3.0, weights=weights.double()).float()
    moments = _moments(weights)
    expected = contract.statistic(partials.double(), 30, 17, 3.0, "none", None, 1.0, moments=moments.double())
    # Halfway between the two middle statistics of batch index 0: no statistic near the threshold,
    # where float32 rounding could put it on the other side.
    middle = expected[0][0].sort().values[17:19]
    clip_value = middle.mean().item()
    expected = contract.statistic(partials.double(), 30, 17, 3.0, "none", clip_value, 1.0,
                                    moments=moments.double())
    stat, coef, loss = op.statistic(partials, 30, 17, 3.0, "none", clip_value, 1.0, None, moments)
    assert torch.equal(stat == 0, expected[0] == 0) and (stat[1] == 0).all() and (coef[1] == 0).all()
    for name, value, exact_value in zip(("stat", "coef", "loss"), (stat, coef, loss), expected):
        assert_relative_close(name, value, exact_value, 1e-5)


def test_rejects_bad_weights(device):
    op = _import_op_module()
    x, directions = _case((2,), 8, 4, 3, device=device)
    with pytest.raises(ValueError, match="weights"):
        op.ecf_partials(x, directions, 17, 3.0, None, torch.ones(2, 7, device=device))
    with pytest.raises(ValueError, match="weights"):
        op.ecf_partials(x, directions, 17, 3.0, None, torch.ones(2, 8, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="weights"):
        op.ecf_partials(x, directions, 17, 3.0, None, torch.ones(8, 2, device=device).t())
    partials = op.ecf_partials(x, directions, 17, 3.0)
    with pytest.raises(ValueError, match="moments"):
        op.statistic(partials, 8, 17, 3.0, "sum", None, 1.0, None, torch.ones(2, 3, device=device))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction, clip", [("mean", False), ("none", True)])
def test_unbiased_statistic_matches_the_contract(device, weighted, reduction, clip):
    """unbiased=True, the U-statistic: stat, coef and loss against contract.statistic in float64."""
    op = _import_op_module()
    x, directions = _case((3,), 30, 5, 37, device=device)
    weights = _sample_weights(3, 30, device=device) if weighted else None
    moments = None if weights is None else _moments(weights)
    moments64 = None if moments is None else moments.double()
    partials = contract.ecf_partials(*_double(x, directions), 17, 3.0,
                                       weights=None if weights is None else weights.double()).float()
    clip_value = None
    if clip:  # halfway between two statistics of batch index 0
        stats = contract.statistic(partials.double(), 30, 17, 3.0, "none", None, 1.0, None, moments64, True)[0]
        clip_value = stats[0].sort().values[17:19].mean().item()
    truth = contract.statistic(partials.double(), 30, 17, 3.0, reduction, clip_value, 0.5, None, moments64, True)
    ours = op.statistic(partials, 30, 17, 3.0, reduction, clip_value, 0.5, None, moments, True)
    biased = op.statistic(partials, 30, 17, 3.0, reduction, clip_value, 0.5, None, moments)
    assert not torch.allclose(ours[0], biased[0])
    for name, value, exact in zip(("stat", "coef", "loss"), ours, truth):
        assert_relative_close(name, value, exact, 1e-5)
    one_row = torch.tensor([[1.5, 2.25], [2.0, 1.0], [0.0, 0.0]], device=device)  # one row; two rows; none
    stat, coef, _ = op.statistic(partials, 30, 17, 3.0, "none", None, 1.0, None, one_row, True)
    assert stat[0].isnan().all() and coef[0].isnan().all() and stat[1].isfinite().all() and (stat[2] == 0).all()
    w = torch.tensor([1.0436, 1.1, 0.675], device=device)  # one row whose weight's square rounds in float32
    stat, coef, _ = op.statistic(partials, 30, 17, 3.0, "none", None, 1.0, None, torch.stack((w, w.square()), 1), True)
    assert stat.isnan().all() and coef.isnan().all()


def test_eager_calls_launch_without_the_registered_op(device, monkeypatch):
    """Outside autograd and tracing the plain callables run their launchers directly (the registered
    op's dispatch is host time only), with the same results, bit for bit; with grad mode on, under a
    dispatch mode (what torch.compile and the op counters trace with) or on a tensor subclass they
    go through the registered op."""
    from op_counter import OpCounter

    op = _import_op_module()
    registered = {"triton_ecf_partials": op.triton_ecf_partials, "triton_statistic": op.triton_statistic,
                  "triton_slice_gradient": op.triton_slice_gradient}
    through_op = []
    for name, custom_op in registered.items():
        def counting(*args, name=name, custom_op=custom_op):
            through_op.append(name)
            return custom_op(*args)
        monkeypatch.setattr(op, name, counting)
    x, directions = _case((2,), 40, 8, 20, device=device)

    def run():
        partials = op.ecf_partials(x, directions, 17, 3.0)
        _, coef, loss = op.statistic(partials, 40, 17, 3.0, "mean", None, 1.0)
        grad = op.slice_gradient(coef, torch.ones(2, 20, device=device), x, directions, 17, 3.0)
        return partials, loss, grad

    with torch.no_grad():
        direct = run()
    assert through_op == []
    with torch.enable_grad():
        assert all(torch.equal(a, b) for a, b in zip(run(), direct))
    assert through_op == list(registered)
    through_op.clear()
    with torch.no_grad(), OpCounter() as counter:
        run()
    assert through_op == list(registered) and counter.ops["sigreg::triton_statistic"] == 1
    through_op.clear()

    class Subclass(torch.Tensor):
        pass

    with torch.no_grad():
        op.ecf_partials(x.as_subclass(Subclass), directions, 17, 3.0)
    assert through_op == ["triton_ecf_partials"]


def test_plans_are_made_once_per_shape(device):
    op = _import_op_module()
    x, directions = _case((2,), 40, 8, 20, device=device)
    op._cached_plan.cache_clear()
    first = op._ecf_plan(x, directions, 17)
    assert op._ecf_plan(x, directions, 17) is first and op._cached_plan.cache_info().hits == 1
    assert op._ecf_plan(x[:1], directions, 17) is not first  # another shape, another plan
    assert op._ecf_plan(x, directions, 17, weighted=True) is not first


def test_in_place_gradient_bumps_the_version_when_launched_directly(device):
    """slice_gradient_ writes its projection in place: launched without the op (which declares the
    mutation) it still tells autograd, so a saved tensor it overwrote is caught in the backward."""
    op = _import_op_module()
    x, directions = _case((2,), 40, 8, 20, device=device)
    coef, scale = _coefficients(x, directions, 17)
    projection = x @ directions
    before = projection._version
    with torch.no_grad():
        op.slice_gradient_(projection, coef, scale, 17, 3.0)
    assert projection._version > before
