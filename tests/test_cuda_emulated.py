"""The CUDA kernels' device code, run on the CPU by the host emulation, against the contract.

No GPU is needed: the source of ``csrc/cuda/sigreg_cuda_kernels.cu`` is built
with g++ against ``tests/cuda_host_emulation`` (see ``emulated_cuda.py`` for
what this covers and what it does not). Each kernel is checked against its
function in ``sigreg_kernels/gpu/contract.py`` evaluated in float64 on the same
(rounded) inputs; the whole op (``gpu/fused.py`` around the kernels) against the
float64 oracle. ``test_cuda.py`` runs the same kinds of checks on a GPU.
"""

import contextlib
import itertools
import math
import shutil
from functools import partial

import pytest
import torch
from emulated_cuda import EmulatedKernels, build
from helpers import (CUDA_KERNEL_SHAPES, LOW_PRECISION_GRAD_TOL, LOW_PRECISION_VALUE_TOL, assert_matches_oracle,
                     assert_relative_close, random_case, relative_error, weighted_case)

from sigreg_kernels import sigreg_reference
from sigreg_kernels.gpu.cuda import plan as cuda_plan
from sigreg_kernels.gpu import contract
from sigreg_kernels.core.quadrature import quadrature

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the emulated kernels")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return EmulatedKernels(build(tmp_path_factory.mktemp("cuda_host_emulation")))


def f64(t):
    return None if t is None else t.double()


def flat_case(batch_shape, samples, dim, slices, dtype=torch.float32, scale=1.0, seed=0):
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale, dtype=dtype, seed=seed)
    return x.reshape(math.prod(batch_shape), samples, dim).contiguous(), directions


# (name, dtype, tensor_cores, with directions): the kernels' modes as the launcher picks them.
CONFIGS = {
    "fp32-fma": (torch.float32, False, True),        # exact products ("highest", called directly)
    "fp32-projected": (torch.float32, False, False),  # the SGEMM route: the kernels read P
    "tf32": (torch.float32, True, True),
    "bf16-wmma": (torch.bfloat16, True, True),
    "fp16-wmma": (torch.float16, True, True),
    "bf16-fma": (torch.bfloat16, False, True),        # SIGREG_CUDA_DISABLE_TENSOR_CORES=1
    "bf16-projected": (torch.bfloat16, False, False),  # directions=None on 16-bit x
}
# Not a multiple of any tile (32/64 rows and slices, 64-byte stages), the 1s, rows of
# whole 16-byte vectors (cp.async) and not, and enough blocks for the 64x64 tile.
SHAPES = [(math.prod(b), n, d, k) for b, n, d, k in CUDA_KERNEL_SHAPES] + [(2, 100, 64, 72), (2, 300, 48, 136)]


def tolerances(x, directions, tensor_cores, knots, t_max, fp32_error):
    """(statistic, gradient) bounds: 1e-5 for float32 inputs, tests/helpers.py's for 16-bit ones,
    or where larger twice the error of the contract itself run in float32, or one float32 ulp of
    the largest angle t * p (|x| ~ 100); TF32 products: 2e-2."""
    if tensor_cores and directions is not None and x.dtype == torch.float32:
        return 2e-2, 2e-2
    floors = (1e-5, 1e-5) if x.dtype == torch.float32 else (LOW_PRECISION_VALUE_TOL, LOW_PRECISION_GRAD_TOL)
    p = contract.projection(f64(x), f64(directions))
    angle_ulp = torch.finfo(torch.float32).eps * t_max * p.abs().max().item()
    return tuple(max(floor, 2 * e, angle_ulp) for floor, e in zip(floors, fp32_error()))


def contract_statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor):
    """contract.statistic: ``(stat, coef, loss)``; a NaN statistic is not clipped (NaN < clip is
    false), as in the reference (sigreg_reference: torch.where(stat < clip_value, 0, stat)) and the SPEC."""
    return contract.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor)


def loss_of(stat, reduction):
    """The kernel's loss, exactly: its own (float32) statistics summed in float64, scaled, rounded once."""
    return (stat.double().sum() / contract.loss_divisor(reduction, *stat.shape)).float()


def check_kernels(kernels, x, directions, *, tensor_cores, knots=17, t_max=3.0, reduction="mean", clip_value=None,
                  grad_factor=2.0, scale=None):
    """ecf_partials, statistic and slice_gradient against contract.py in float64."""
    batch, samples, _ = x.shape
    slices = x.shape[2] if directions is None else directions.shape[1]
    partials = kernels.ecf_partials(x, directions, knots, t_max, tensor_cores=tensor_cores)
    plan = kernels.plan_ecf_partials(batch, samples, slices, knots, directions is None)
    assert partials.shape == (batch, plan["splits"], 2, slices, knots) and partials.dtype == torch.float32
    truth = contract.ecf_partials(f64(x), f64(directions), knots, t_max)
    stat, coef, loss = kernels.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor)
    true_stat, true_coef, true_loss = contract_statistic(truth, samples, knots, t_max, reduction, clip_value,
                                                         grad_factor)
    if scale is None:
        scale = torch.randn(batch, slices, generator=torch.Generator().manual_seed(5))
    g = kernels.slice_gradient(true_coef.float(), scale, x, directions, knots, t_max, tensor_cores=tensor_cores)
    true_g = contract.slice_gradient(true_coef, f64(scale), f64(x), f64(directions), knots, t_max)
    assert g.dtype == x.dtype and g.shape == true_g.shape

    def fp32_error():  # the contract itself run in float32: what float32 can do here
        p32 = contract.ecf_partials(x, directions, knots, t_max)
        s32, c32, _ = contract.statistic(p32, samples, knots, t_max, reduction, clip_value, grad_factor)
        g32 = contract.slice_gradient(true_coef.float(), scale, x, directions, knots, t_max)
        return max(relative_error(s32, true_stat), relative_error(c32, true_coef)), relative_error(g32, true_g)

    stat_tol, grad_tol = tolerances(x, directions, tensor_cores, knots, t_max, fp32_error)
    assert_relative_close("stat", stat, true_stat, stat_tol)
    assert_relative_close("coef", coef, true_coef, stat_tol)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.equal(loss, loss_of(stat, reduction))
    assert_relative_close("loss", loss, true_loss, stat_tol)
    assert_relative_close("G", g, true_g, grad_tol)
    return partials, stat, coef, g


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_the_contract(kernels, shape, config):
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((shape[0],), *shape[1:], dtype=dtype, seed=shape[1])
    if not with_directions:  # the univariate test of x's columns: K = D
        directions = None
    check_kernels(kernels, x, directions, tensor_cores=tensor_cores)


@pytest.mark.parametrize("knots", [2, 5, 17, 18, 40])
@pytest.mark.parametrize("config", ["fp32-fma", "bf16-wmma", "fp32-projected"])
def test_knot_counts(kernels, config, knots):
    """16 knots per pass: one pass (2, 5, 17), a second of one knot (18), three (40)."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((2,), 70, 40, 40, dtype=dtype, seed=3)
    check_kernels(kernels, x, directions if with_directions else None, tensor_cores=tensor_cores, knots=knots,
                  t_max=4.0)


@pytest.mark.parametrize("config", ["fp32-fma", "bf16-wmma", "fp32-projected"])
def test_large_magnitudes(kernels, config):
    """|x| up to 100, and |t p| beyond 8192, where sin/cos take the library's slow path."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    for scale, seed in ((30.0, 4), (3e4, 5)):
        x, directions = flat_case((2,), 65, 24, 33, dtype=dtype, scale=scale, seed=seed)
        assert x.abs().max() > 90
        check_kernels(kernels, x, directions if with_directions else None, tensor_cores=tensor_cores)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("clip_value", [None, 0.5])
def test_statistic_reductions_and_clipping(kernels, reduction, clip_value):
    """Partials of several splits, slices on both sides of the clip, a NaN slice."""
    generator = torch.Generator().manual_seed(6)
    samples, knots, slices = 50, 17, 70
    partials = torch.rand(3, 4, 2, slices, knots, generator=generator, dtype=torch.float64) * (samples / 4)
    _, phi, _ = quadrature(knots, 3.0, dtype=torch.float64)
    # Nearly normal (the partials sum cos - 1: phi - 1 per sample): below the clip.
    partials[:, :, 0, ::2] = (phi - 1) * samples / 4 + partials[:, :, 0, ::2] / 1000
    partials[:, :, 1, ::2] /= 1000
    partials[1, 2, 0, 5, 3] = float("nan")
    stat, coef, loss = kernels.statistic(partials.float(), samples, knots, 3.0, reduction, clip_value, 0.5)
    true_stat, true_coef, true_loss = contract_statistic(f64(partials.float()), samples, knots, 3.0, reduction,
                                                         clip_value, 0.5)
    assert torch.equal(stat.isnan(), true_stat.isnan()) and torch.equal(coef.isnan(), true_coef.isnan())
    if clip_value is not None:
        assert 0 < (true_stat == 0).sum() < true_stat.numel() - 1, "some slices clipped, some kept"
        assert stat[1, 5].isnan() and coef[1, :, 5].isnan().any(), "a NaN statistic is not clipped"
    assert loss.isnan() and true_loss.isnan(), "a NaN statistic makes the loss NaN"
    finite = true_stat.isfinite()
    assert_relative_close("stat", stat[finite], true_stat[finite], 1e-6)
    assert_relative_close("coef", coef.nan_to_num(), true_coef.nan_to_num(), 1e-6)
    partials[1, 2, 0, 5, 3] = 1.0  # all finite: the loss of the clipped statistics
    stat, _, loss = kernels.statistic(partials.float(), samples, knots, 3.0, reduction, clip_value, 0.5)
    _, _, true_loss = contract_statistic(f64(partials.float()), samples, knots, 3.0, reduction, clip_value, 0.5)
    assert torch.equal(loss, loss_of(stat, reduction))
    assert_relative_close("loss", loss, true_loss, 1e-6)


def test_statistic_without_the_shared_memory_cache(kernels):
    """More knots than a block's cache holds: the sums are read again instead."""
    knots = 1100
    assert not kernels.plan_statistic(2, 3, knots)["cached"]
    partials = torch.rand(2, 3, 2, 3, knots, generator=torch.Generator().manual_seed(7)) * 10
    stat, coef, loss = kernels.statistic(partials, 20, knots, 3.0, "sum", None, 1.0)
    true_stat, true_coef, true_loss = contract.statistic(f64(partials), 20, knots, 3.0, "sum", None, 1.0)
    assert_relative_close("stat", stat, true_stat, 1e-6)
    assert_relative_close("coef", coef, true_coef, 1e-6)
    assert_relative_close("loss", loss, true_loss, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_scale_strides_and_in_place(kernels, dtype):
    """A scalar loss's expanded scale (strides 0), a transposed one; slice_gradient_ overwrites P."""
    x, directions = flat_case((2,), 90, 24, 40, dtype=dtype, seed=8)
    coef = torch.randn(2, 2, 40, 17, generator=torch.Generator().manual_seed(9)) / 100
    for scale in (torch.tensor(1.5).expand(2, 40), torch.randn(40, 2).t()):
        check_kernels(kernels, x, directions, tensor_cores=True, scale=scale)
        projection = (x.float() @ directions.float()).to(dtype)
        expected = kernels.slice_gradient(coef, scale, projection, None, 17, 3.0)
        kernels.slice_gradient_(projection, coef, scale, 17, 3.0)
        assert torch.equal(projection, expected)


def test_empty_feature_dimension(kernels):
    """D = 0: every projection is 0 (cos sums are the row counts), a product of no stages."""
    x, directions = flat_case((2,), 10, 0, 5, seed=10)
    check_kernels(kernels, x, directions, tensor_cores=False)
    check_kernels(kernels, x.bfloat16(), directions.bfloat16(), tensor_cores=True)


def test_nan_input_reaches_only_its_batch_index(kernels):
    x, directions = flat_case((2,), 70, 12, 65, seed=11)
    x[0, 5, 3] = float("nan")
    partials = kernels.ecf_partials(x, directions, 17, 3.0, tensor_cores=False)
    truth = contract.ecf_partials(f64(x), f64(directions), 17, 3.0)
    assert torch.equal(partials.sum(1).isnan(), truth.sum(1).isnan())
    assert partials[0, :, 0, :, 0].isnan().any() and partials[1].isfinite().all()


# ---- Sample weights: each kernel against contract.py's weighted contract in float64 ----

def sample_weights(batch, samples, kind, seed):
    """float32 [B, N]: "random" (in [0, 2), about a third exactly 0) or "mask" (0/1)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mask":
        return (torch.rand(batch, samples, generator=generator) < 0.6).float()
    weights = torch.rand(batch, samples, generator=generator) * 2
    return torch.where(torch.rand(batch, samples, generator=generator) < 0.35, 0.0, weights)


def moments_of(weights):
    """(sum w, sum w^2) per batch index, float32 [B, 2], as the caller passes them."""
    w = weights.double()
    return torch.stack((w.sum(1), w.square().sum(1)), dim=1).float()


def check_weighted_kernels(kernels, x, directions, weights, *, tensor_cores, knots=17, t_max=3.0, clip_value=None):
    """The three kernels with sample weights against contract.py in float64: finite (x's
    rows of weight 0 may hold NaN/Inf), and G exactly 0 on rows of weight 0."""
    batch, samples, _ = x.shape
    slices = x.shape[2] if directions is None else directions.shape[1]
    moments = moments_of(weights)
    partials = kernels.ecf_partials(x, directions, knots, t_max, None, weights, tensor_cores=tensor_cores)
    truth = contract.ecf_partials(f64(x), f64(directions), knots, t_max, weights=f64(weights))
    stat, coef, loss = kernels.statistic(partials, samples, knots, t_max, "sum", clip_value, 2.0, moments=moments)
    true_stat, true_coef, true_loss = contract.statistic(truth, samples, knots, t_max, "sum", clip_value, 2.0,
                                                           moments=f64(moments))
    scale = torch.randn(batch, slices, generator=torch.Generator().manual_seed(5))
    g = kernels.slice_gradient(true_coef.float(), scale, x, directions, knots, t_max, weights,
                               tensor_cores=tensor_cores)
    true_g = contract.slice_gradient(true_coef, f64(scale), f64(x), f64(directions), knots, t_max, f64(weights))
    for name, value in (("partials", partials), ("stat", stat), ("coef", coef), ("loss", loss), ("G", g)):
        assert value.isfinite().all(), f"{name}: a row of weight 0 leaked NaN/Inf"
    assert (g[weights == 0] == 0).all(), "G is 0 on rows of weight 0"

    def fp32_error():  # the weighted contract run in float32
        p32 = contract.ecf_partials(x, directions, knots, t_max, weights=weights)
        s32, c32, _ = contract.statistic(p32, samples, knots, t_max, "sum", clip_value, 2.0, moments=moments)
        g32 = contract.slice_gradient(true_coef.float(), scale, x, directions, knots, t_max, weights)
        return max(relative_error(s32, true_stat), relative_error(c32, true_coef)), relative_error(g32, true_g)

    x_finite = torch.where(weights[..., None] > 0, x, 0)  # (the angle bound of the rows that count)
    stat_tol, grad_tol = tolerances(x_finite, directions, tensor_cores, knots, t_max, fp32_error)
    assert_relative_close("stat", stat, true_stat, stat_tol)
    assert_relative_close("coef", coef, true_coef, stat_tol)
    assert torch.equal(loss, loss_of(stat, "sum"))
    assert_relative_close("loss", loss, true_loss, stat_tol)
    assert_relative_close("G", g, true_g, grad_tol)
    return partials, stat, coef, g


WEIGHTED_CONFIGS = ["fp32-fma", "fp32-projected", "bf16-wmma", "fp16-wmma", "bf16-fma", "bf16-projected"]


@pytest.mark.parametrize("kind", ["random", "mask"])
@pytest.mark.parametrize("config", WEIGHTED_CONFIGS, ids=str)
def test_weighted_kernels_match_the_contract(kernels, config, kind):
    """Random weights with zeros, or a 0/1 mask whose masked rows hold NaN and Inf; several row
    splits (N = 300 on the emulation's 4 SMs) and blocks, rows not a multiple of the tiles."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((2,), 300, 48, 72, dtype=dtype, seed=20)
    weights = sample_weights(2, 300, kind, seed=21)
    if kind == "mask":
        masked = (weights == 0).nonzero()
        x[masked[::2, 0], masked[::2, 1]] = float("nan")
        x[masked[1::2, 0], masked[1::2, 1], 0] = float("inf")
    assert kernels.plan_ecf_partials(2, 300, 72, 17, not with_directions)["splits"] > 1
    check_weighted_kernels(kernels, x, directions if with_directions else None, weights, tensor_cores=tensor_cores)


@pytest.mark.parametrize("config", ["fp32-fma", "bf16-wmma", "fp32-projected"])
def test_weighted_knot_passes(kernels, config):
    """knots = 40: three passes of 16 knots, each weighted (the gradient's passes accumulate w G)."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((2,), 70, 40, 40, dtype=dtype, seed=22)
    check_weighted_kernels(kernels, x, directions if with_directions else None, sample_weights(2, 70, "random", 23),
                           tensor_cores=tensor_cores, knots=40, t_max=4.0)


def test_weighted_empty_batch_index(kernels):
    """A batch index whose weights are all 0: statistic 0 and coef 0 exactly (not 0 / 0), G 0,
    even where its rows hold NaN; a clip value keeps the other indices' slices apart."""
    x, directions = flat_case((3,), 90, 24, 40, seed=24)
    weights = sample_weights(3, 90, "random", seed=25)
    weights[1] = 0
    x[1, 7] = float("nan")
    _, stat, coef, g = check_weighted_kernels(kernels, x, directions, weights, tensor_cores=False, clip_value=0.01)
    assert (stat[1] == 0).all() and (coef[1] == 0).all() and (g[1] == 0).all()
    assert (stat[0] != 0).any() and (stat[2] != 0).any()


@pytest.mark.parametrize("config", ["fp32-fma", "bf16-wmma", "fp32-projected"])
def test_unit_weights_are_no_weights(kernels, config):
    """All weights 1 (moments N, N): w u is u, w (c, s) is (c, s), N^2 / N is N, so the weighted
    kernels give the unweighted results bit for bit."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((2,), 150, 40, 70, dtype=dtype, seed=26)
    directions = directions if with_directions else None
    ones = torch.ones(2, 150)
    plain = kernels.ecf_partials(x, directions, 17, 3.0, tensor_cores=tensor_cores)
    weighted = kernels.ecf_partials(x, directions, 17, 3.0, None, ones, tensor_cores=tensor_cores)
    assert torch.equal(plain, weighted)
    plain_stat = kernels.statistic(plain, 150, 17, 3.0, "sum", None, 1.0)
    weighted_stat = kernels.statistic(plain, 150, 17, 3.0, "sum", None, 1.0, moments=moments_of(ones))
    for a, b in zip(plain_stat, weighted_stat):
        assert torch.equal(a, b)
    coef, scale = plain_stat[1], torch.randn(2, 70, generator=torch.Generator().manual_seed(27))
    g = kernels.slice_gradient(coef, scale, x, directions, 17, 3.0, tensor_cores=tensor_cores)
    assert torch.equal(g, kernels.slice_gradient(coef, scale, x, directions, 17, 3.0, ones,
                                                 tensor_cores=tensor_cores))


def test_weighted_gradient_in_place(kernels):
    """slice_gradient_ with weights overwrites the projection with the weighted G."""
    x, directions = flat_case((2,), 90, 24, 40, dtype=torch.bfloat16, seed=28)
    weights = sample_weights(2, 90, "mask", seed=29)
    coef = torch.randn(2, 2, 40, 17, generator=torch.Generator().manual_seed(30)) / 100
    scale = torch.randn(40, 2).t()
    projection = (x.float() @ directions.float()).to(torch.bfloat16)
    projection[weights == 0] = float("nan")  # left out whatever they hold
    true_g = contract.slice_gradient(f64(coef), f64(scale), f64(projection), None, 17, 3.0, f64(weights))
    expected = kernels.slice_gradient(coef, scale, projection, None, 17, 3.0, weights)
    kernels.slice_gradient_(projection, coef, scale, 17, 3.0, weights)
    assert torch.equal(projection, expected) and (projection[weights == 0] == 0).all()
    assert projection.isfinite().all() and true_g.isfinite().all()
    assert_relative_close("G", projection, true_g, LOW_PRECISION_GRAD_TOL)


def test_weighted_kernels_in_any_thread_order(kernels):
    """The weighted instances (their weight staging included) do not depend on thread order."""
    x, directions = flat_case((2,), 150, 70, 130, dtype=torch.bfloat16, seed=31)
    weights = sample_weights(2, 150, "random", seed=32)

    def run():
        partials = kernels.ecf_partials(x, directions, 17, 3.0, None, weights)
        _, coef, _ = kernels.statistic(partials, 150, 17, 3.0, "sum", None, 1.0, moments=moments_of(weights))
        return partials, kernels.slice_gradient(coef, torch.ones(2, 130), x, directions, 17, 3.0, weights)

    ascending = run()
    with kernels.descending():
        descending = run()
    for a, b in zip(ascending, descending):
        assert torch.equal(a, b) and a.isfinite().all()


# ---- The whole op: gpu/fused.py around the emulated kernels, against the float64 oracle ----

@pytest.mark.parametrize("dtype,tensor_cores", [(torch.float32, False), (torch.bfloat16, True),
                                                (torch.float16, False)], ids=str)
@pytest.mark.parametrize("shape", [((2, 3), 41, 33, 129), ((), 130, 64, 67)], ids=str)
def test_op_matches_oracle(kernels, shape, dtype, tensor_cores):
    """Values and both gradients, batch dims, through gpu/fused.py (float32: its SGEMM route)."""
    x, directions, weight = weighted_case(*shape, dtype=dtype, seed=12)
    assert_matches_oracle(partial(kernels.sigreg, tensor_cores=tensor_cores), x, directions, weight)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_without_directions_and_clipped(kernels, reduction):
    """directions=None (the columns of x), clip_value, a scalar loss times 2."""
    x = torch.randn(2, 60, 20, generator=torch.Generator().manual_seed(13), dtype=torch.float64) * 1.5
    x[:, :, :4] += 3.0  # far from normal: slices above the clip

    def loss_and_grad(fn, xx):
        xx = xx.detach().clone().requires_grad_()
        loss = 2 * fn(xx, None, reduction=reduction, clip_value=0.3)
        (grad,) = torch.autograd.grad(loss, xx)
        return loss.detach(), grad

    ours = loss_and_grad(kernels.sigreg, x.float())
    truth = loss_and_grad(sigreg_reference, x.float().double())
    assert_relative_close("loss", ours[0], truth[0], 1e-5)
    assert_relative_close("grad_x", ours[1], truth[1], 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_reductions_with_batch_dims(kernels, reduction):
    """The loss through gpu/fused.py (the statistic kernel's own reduction): value and both gradients
    against the float64 oracle; the scalar is the float64 sum of the "none" statistics, rounded once."""
    x, directions, weight = weighted_case((2, 3), 41, 33, 129, seed=18)

    def value_and_grads(fn, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        out = fn(a, b, reduction=reduction, clip_value=0.01)
        loss = 2 * (out * weight.to(out.dtype)).sum() if reduction == "none" else 2 * out
        return (out.detach(), *torch.autograd.grad(loss, (a, b)))

    ours = value_and_grads(kernels.sigreg, x, directions)
    truth = value_and_grads(sigreg_reference, x.double(), directions.double())
    assert ours[0].shape == truth[0].shape and ours[0].dtype == torch.float32
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, actual, expected, 1e-5)
    if reduction != "none":
        stat = kernels.sigreg(x, directions, reduction="none", clip_value=0.01).reshape(6, 129)
        assert torch.equal(ours[0], loss_of(stat, reduction))


# ---- Launches, thread order, the grid cap ----

def run_all(kernels, x, directions, tensor_cores, knots=17, reduction="none"):
    """Each kernel once, as gpu/fused.py strings them (the arrival counter starts as garbage):
    {name: output} and each call's launch count."""
    batch, samples, _ = x.shape
    slices = x.shape[2] if directions is None else directions.shape[1]
    launches = []
    arrivals = torch.tensor([12345], dtype=torch.int32)
    kernels.take_launches()
    partials = kernels.ecf_partials(x, directions, knots, 3.0, arrivals, tensor_cores=tensor_cores)
    launches.append(kernels.take_launches())
    assert arrivals.item() == 0, "ecf_partials zeroes the arrival counter"
    stat, coef, loss = kernels.statistic(partials, samples, knots, 3.0, reduction, None, 1.0, arrivals)
    launches.append(kernels.take_launches())
    assert arrivals.item() == 0, "statistic leaves the arrival counter at 0"
    scale = torch.linspace(-1, 1, batch * slices).reshape(batch, slices)
    g = kernels.slice_gradient(coef, scale, x, directions, knots, 3.0, tensor_cores=tensor_cores)
    launches.append(kernels.take_launches())
    outputs = {"partials": partials, "stat": stat, "coef": coef, "loss": loss, "G": g}
    if directions is None:
        projection = x.clone()
        kernels.slice_gradient_(projection, coef, scale, knots, 3.0)
        launches.append(kernels.take_launches())
        outputs["G in place"] = projection
    return outputs, launches


THREAD_ORDER_CASES = [("bf16-wmma", (2, 150, 70, 130)), ("bf16-wmma", (2, 300, 48, 136)),
                      ("fp32-fma", (2, 100, 40, 70)), ("fp32-projected", (2, 200, 72, 72)),
                      ("fp16-wmma", (1, 64, 64, 64))]


@pytest.mark.parametrize("config,shape", THREAD_ORDER_CASES, ids=str)
def test_one_launch_each_and_no_thread_order_dependence(kernels, config, shape):
    """A missing barrier, an unwaited copy or a cross-block race changes results when threads
    and blocks run in reverse; poisoned shared memory shows as NaN. The loss's last block is
    then another block: the sum must not change."""
    dtype, tensor_cores, with_directions = CONFIGS[config]
    x, directions = flat_case((shape[0],), *shape[1:], dtype=dtype, seed=14)
    directions = directions if with_directions else None
    ascending, launches = run_all(kernels, x, directions, tensor_cores)
    assert launches == [1] * len(launches), "one launch per kernel"
    with kernels.descending():
        descending, _ = run_all(kernels, x, directions, tensor_cores)
    for name, a in ascending.items():
        assert torch.equal(a, descending[name]), f"{name} depends on the order threads run in"
        assert a.isfinite().all(), f"{name} has NaN: a read of unwritten (poisoned) memory"


def test_grids_beyond_the_cap_take_several_launches(kernels):
    """Past the grid's x cap (lowered to 7 blocks) each kernel launches several times, same results
    (the loss: the last block of the last launch sums; the counter ends at 0)."""
    x, directions = flat_case((3,), 70, 12, 65, seed=15)
    single, _ = run_all(kernels, x, directions, False, knots=40, reduction="mean")
    with kernels.max_grid_x(7):
        split, launches = run_all(kernels, x, directions, False, knots=40, reduction="mean")
        plans = [kernels.plan_ecf_partials(3, 70, 65, 40, False), kernels.plan_statistic(3, 65, 40),
                 kernels.plan_slice_gradient(3, 70, 65, 40, False)]
    assert launches == [p["launches"] for p in plans] and min(launches) > 1
    for name, a in single.items():
        assert torch.equal(a, split[name]), name


# ---- The loss: the statistics' mean or sum, reduced across blocks in the statistic launch ----

def loss_partials(batch, slices, knots, samples, seed):
    """Partials of 3 splits whose statistics spread over a few orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    partials = torch.rand(batch, 3, 2, slices, knots, generator=generator, dtype=torch.float64) * (samples / 3)
    _, phi, _ = quadrature(knots, 3.0, dtype=torch.float64)
    near = torch.rand(batch, 1, slices, 1, generator=generator, dtype=torch.float64) < 0.5  # statistics ~0.005
    partials[:, :, 0] = torch.where(near, (phi - 1) * samples / 3 + partials[:, :, 0] / 100, partials[:, :, 0])
    partials[:, :, 1] = torch.where(near, partials[:, :, 1] / 100, partials[:, :, 1])
    return partials.float()


# (B, K, knots): slices per block 7 (knots 17), 1 (knots 130: more blocks than a block's
# threads, so the last block's threads each add several), 32 (knots 2).
LOSS_SHAPES = [(3, 70, 17), (5, 300, 17), (4, 150, 130), (2, 1000, 2), (1, 1, 17)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=str)
def test_loss_matches_the_contract_in_any_block_order(kernels, shape, reduction):
    batch, slices, knots = shape
    samples = 40
    partials = loss_partials(batch, slices, knots, samples, seed=sum(shape))
    plan = kernels.plan_statistic(batch, slices, knots)
    assert plan["blocks"] == batch * math.ceil(slices / plan["slices_per_block"])
    clip_value = 0.05
    arrivals = torch.zeros(1, dtype=torch.int32)
    kernels.take_launches()
    stat, coef, loss = kernels.statistic(partials, samples, knots, 3.0, reduction, clip_value, 1.0, arrivals)
    assert kernels.take_launches() == 1, "the loss in the statistic's own launch"
    assert arrivals.item() == 0, "the counter is left at 0"
    true_stat, _, true_loss = contract.statistic(f64(partials), samples, knots, 3.0, reduction, clip_value, 1.0)
    assert 0 < (true_stat == 0).sum() < true_stat.numel() or true_stat.numel() == 1, "some slices clipped"
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.equal(loss, loss_of(stat, reduction)), "the float32 statistics summed in float64, rounded once"
    assert_relative_close("loss", loss, true_loss, 1e-6)
    with kernels.descending():  # another block arrives last
        again = kernels.statistic(partials, samples, knots, 3.0, reduction, clip_value, 1.0, arrivals)
    assert arrivals.item() == 0
    for name, a, b in zip(("stat", "coef", "loss"), (stat, coef, loss), again):
        assert torch.equal(a, b), f"{name} depends on the order blocks arrive in"
    kernels.take_launches()
    with kernels.max_grid_x(3):  # several launches: the last block of the last one sums
        split = kernels.statistic(partials, samples, knots, 3.0, reduction, clip_value, 1.0, arrivals)
        assert kernels.take_launches() == kernels.plan_statistic(batch, slices, knots)["launches"]
    assert arrivals.item() == 0
    assert torch.equal(split[2], loss)
    own = kernels.statistic(partials, samples, knots, 3.0, reduction, clip_value, 1.0)  # a counter of its own
    assert torch.equal(own[2], loss)


def test_loss_of_nan_statistics_is_nan(kernels):
    partials = loss_partials(2, 40, 17, 40, seed=16)
    partials[1, 0, 1, 33, 4] = float("nan")
    for reduction in ("mean", "sum", "none"):
        arrivals = torch.zeros(1, dtype=torch.int32)
        stat, _, loss = kernels.statistic(partials, 40, 17, 3.0, reduction, 0.05, 1.0, arrivals)
        assert stat[1, 33].isnan() and stat.isnan().sum() == 1 and loss.isnan(), reduction
        assert arrivals.item() == 0, "a NaN loss still resets the counter"


def test_loss_of_an_empty_problem(kernels):
    """No launch: the mean of nothing is NaN, a sum 0."""
    for batch, slices in ((0, 5), (3, 0)):
        partials = torch.zeros(batch, 1, 2, slices, 17)
        kernels.take_launches()
        losses = {r: kernels.statistic(partials, 10, 17, 3.0, r, None, 1.0)[2] for r in ("mean", "sum", "none")}
        assert kernels.take_launches() == 0
        assert losses["mean"].isnan() and losses["sum"] == 0 and losses["none"] == 0


def test_ecf_partials_zeroes_the_counter_once(kernels):
    """Garbage in the counter: block 0 stores 0, once, in whichever launch holds it."""
    x, directions = flat_case((3,), 70, 12, 65, seed=17)
    expected = kernels.ecf_partials(x, directions, 40, 3.0, tensor_cores=False)
    for limit in (2**31 - 1, 7):
        for order in (contextlib.nullcontext(), kernels.descending()):
            arrivals = torch.tensor([12345], dtype=torch.int32)
            with kernels.max_grid_x(limit), order:
                kernels.take_launches()
                partials = kernels.ecf_partials(x, directions, 40, 3.0, arrivals, tensor_cores=False)
                assert kernels.take_launches() == kernels.plan_ecf_partials(3, 70, 65, 40, False)["launches"]
            assert arrivals.item() == 0 and torch.equal(partials, expected)


# ---- The plans: C++ (the launchers') against gpu/cuda/plan.py (the fake kernels' and the cost model's) ----

BENCHMARK_GRID = list(itertools.product([1, 8], [1024, 4096, 16384], [64, 512, 2048], [256, 1024, 4096]))
AWKWARD = [(1, 1, 1, 1), (3, 37, 19, 65), (6, 41, 33, 129), (1, 70_000, 16, 8), (2, 130, 257, 67), (0, 5, 3, 4)]


def test_cpp_and_python_plans_agree(kernels):
    for (batch, n, d, k), projected, num_sms, knots in itertools.product(
            BENCHMARK_GRID + AWKWARD, (False, True), (132, 114, 4), (17, 2, 40)):
        slices = k  # projected: the columns of the given projection (d is ignored)
        cpp = kernels.plan_ecf_partials(batch, n, slices, knots, projected, num_sms)
        py = cuda_plan.plan_ecf_partials(batch, n, d, k, knots, torch.bfloat16, True, projected, num_sms)
        assert (py.tile["BLOCK_N"], py.splits, py.rows_per_split, py.blocks, py.launches) == (
            cuda_plan.TILE_SHAPES[cuda_plan.TILES[cpp["tile"]]][0], cpp["splits"], cpp["rows_per_split"],
            cpp["blocks"], cpp["launches"]), (batch, n, d, k, projected, num_sms, knots)
        cpp = kernels.plan_slice_gradient(batch, n, slices, knots, projected, num_sms)
        py = cuda_plan.plan_slice_gradient(batch, n, d, k, knots, torch.float32, False, projected, num_sms)
        assert (py.tile["BLOCK_N"], py.blocks, py.launches) == (
            cuda_plan.TILE_SHAPES[cuda_plan.TILES[cpp["tile"]]][0], cpp["blocks"], cpp["launches"])
        cpp = kernels.plan_statistic(batch, slices, knots)
        py = cuda_plan.plan_statistic(batch, 1, slices, knots, num_sms)
        assert (py.tile["slices_per_block"], py.blocks, py.tile["cached"]) == (
            cpp["slices_per_block"], cpp["blocks"], bool(cpp["cached"]))


def test_plans_cover_every_row_and_fill_the_machine():
    """Splits partition the rows; at every benchmark shape with N K >= 2^20 both big kernels
    launch at least 2 full waves on 132 SMs at the compiled blocks per SM (the design's criterion)."""
    for (batch, n, d, k), dtype, projected in itertools.product(BENCHMARK_GRID + AWKWARD[:-1],
                                                                 (torch.bfloat16, torch.float32), (False, True)):
        slices = k  # projected (float32's SGEMM route): the projection's columns
        plans = {"ecf_partials": cuda_plan.plan_ecf_partials(batch, n, d, k, 17, dtype, True, projected, 132),
                 "slice_gradient": cuda_plan.plan_slice_gradient(batch, n, d, k, 17, dtype, True, projected, 132)}
        p = plans["ecf_partials"]
        assert (p.splits - 1) * p.rows_per_split < n <= p.splits * p.rows_per_split
        assert p.rows_per_split <= cuda_plan.MAX_ROWS_PER_SPLIT
        if n * slices < 2**20:
            continue
        for name, plan in plans.items():
            registers, smem = plan.tile["registers"], plan.tile["static_smem"]
            waves = plan.blocks / (132 * cuda_plan.blocks_per_sm(registers, smem))
            assert waves >= 2, (name, batch, n, d, k, dtype, projected, waves)


# ---- The emulation itself: each bug it is meant to catch, caught ----

def test_emulation_exposes_a_missing_barrier(kernels):
    def run(name):
        out = torch.zeros(256)
        assert kernels.run(name, out) == 0
        return out

    with_barrier = run("selftest_with_barrier")
    assert torch.equal(with_barrier, torch.arange(1, 257).float() % 256)
    with kernels.descending():
        assert torch.equal(run("selftest_with_barrier"), with_barrier)
    racy_ascending = run("selftest_missing_barrier")
    with kernels.descending():
        racy_descending = run("selftest_missing_barrier")
    assert not torch.equal(racy_ascending, racy_descending)
    assert racy_ascending.isnan().any(), "unwritten shared memory reads as NaN"


def test_emulation_lands_asynchronous_copies_at_the_wait(kernels):
    source = torch.arange(256, dtype=torch.float32)
    out = torch.zeros(2 * 256)
    assert kernels.run("selftest_async_copy", source, out) == 0
    assert out[:256].isnan().all(), "before the wait: the poisoned shared memory"
    assert torch.equal(out[256:], source), "after the wait and a barrier: the copied data"


@pytest.mark.parametrize("name,message", [
    ("selftest_divergent_barrier", "__syncthreads() reached by 128 threads while 128 had exited"),
    ("selftest_partial_shuffle", "shuffle was not reached by every lane"),
    ("selftest_misaligned_wmma", "not 32-byte aligned"),
    ("selftest_misaligned_async_copy", "misaligned or non-shared address"),
])
def test_emulation_reports_launch_failures(kernels, name, message):
    out = torch.zeros(256 * 2)
    assert kernels.run(name, out) != 0
    assert message in kernels.failure()


# ---- unbiased=True: the U-statistic (contract.py) ----

@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction, clip", [("mean", False), ("none", True)])
def test_unbiased_statistic_matches_the_contract(kernels, weighted, reduction, clip):
    x, directions = flat_case((3,), 30, 6, 21, seed=21)
    weights = sample_weights(3, 30, "random", seed=22) if weighted else None
    moments = None if weights is None else moments_of(weights)
    partials = contract.ecf_partials(f64(x), f64(directions), 17, 3.0,
                                       weights=None if weights is None else weights.double()).float()
    args = (30, 17, 3.0, reduction)
    moments64 = None if moments is None else moments.double()
    clip_value = None
    if clip:  # halfway between two statistics of batch index 0: rounding decides nothing
        stats = contract.statistic(f64(partials), *args, None, 1.0, None, moments64, True)[0]
        clip_value = stats[0].sort().values[10:12].mean().item()
    truth = contract.statistic(f64(partials), *args, clip_value, 0.5, None, moments64, True)
    ours = kernels.statistic(partials, *args, clip_value, 0.5, None, moments, True)
    biased = kernels.statistic(partials, *args, clip_value, 0.5, None, moments)
    assert not torch.allclose(ours[0], biased[0])
    for name, a, b in zip(("stat", "coef", "loss"), ours, truth):
        assert_relative_close(name, a, b, 1e-5)


def test_unbiased_statistic_of_one_weighted_row_is_nan(kernels):
    partials = torch.rand(3, 2, 2, 5, 17, generator=torch.Generator().manual_seed(23))
    moments = torch.tensor([[1.5, 2.25], [2.0, 1.0], [0.0, 0.0]])  # one row of weight 1.5; two rows; none
    stat, coef, _ = kernels.statistic(partials, 7, 17, 3.0, "none", None, 1.0, None, moments, True)
    assert stat[0].isnan().all() and coef[0].isnan().all()
    assert stat[1].isfinite().all() and (stat[2] == 0).all() and (coef[2] == 0).all()
    # A weight whose square rounds in float32 (w^2 in double is not the rounded sum of squares): still one row.
    w = torch.tensor([1.0436, 1.1, 0.675])
    moments = torch.stack((w, w.square()), dim=1)
    stat, coef, _ = kernels.statistic(partials, 7, 17, 3.0, "none", None, 1.0, None, moments, True)
    assert stat.isnan().all() and coef.isnan().all()


@pytest.mark.parametrize("weighted", [False, True])
def test_unbiased_op_matches_oracle(kernels, weighted):
    """gpu/fused.py around the emulated kernels, values and both gradients, against the float64 oracle."""
    x, directions, weight = weighted_case((2,), 37, 19, 65, seed=24)
    weights = sample_weights(2, 37, "mask", seed=25) if weighted else None
    assert_matches_oracle(kernels.sigreg, x, directions, weight, unbiased=True, weights=weights)
