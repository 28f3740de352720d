"""``unbiased=True``: the U-statistic, ``|ECF|^2`` without the ``i = j`` terms of its double sum.

The truth here is that double sum written out over pairs of samples, in float64:
``|ECF_j|^2_U = sum_{i != k} w_i w_k cos(t_j (p_i - p_k)) / sum_{i != k} w_i w_k`` (unit weights:
``1 / (N (N - 1))``), and the statistic ``N_eff sum_j w_j (|ECF_j|^2_U - 2 phi_j C_j + phi_j^2)``.
The reference is held to it, values and gradients; every backend is held to the reference
(the CPU kernel and the GPU path's orchestration on the kernels' contract here; the Triton
and CUDA statistic kernels in test_triton.py and test_cuda_emulated.py).
"""

import pytest
import torch
from helpers import assert_relative_close

from sigreg_kernels import SIGReg, sigreg, sigreg_reference
from sigreg_kernels.gpu.fused import fused_sigreg
from sigreg_kernels.core.quadrature import quadrature


def pair_formula(x, directions, weights=None, knots=17, t_max=3.0):
    """``[B, K]`` U-statistics of ``x [B, N, D]``, from the pairs themselves."""
    p = x @ directions  # [B, N, K]
    t, phi, quad = quadrature(knots, t_max, dtype=torch.float64)
    w = torch.ones(p.shape[:2], dtype=torch.float64) if weights is None else weights.double()
    pair_w = w[:, :, None] * w[:, None, :] * (1 - torch.eye(p.shape[1], dtype=torch.float64))  # [B, N, N], i != k
    differences = p[:, :, None, :] - p[:, None, :, :]  # [B, N, N, K]
    pairs = (pair_w[..., None, None] * torch.cos(differences[..., None] * t)).sum(dim=(1, 2))  # [B, K, T]
    square = pairs / pair_w.sum(dim=(1, 2))[:, None, None]
    ecf_cos = (w[:, :, None, None] * torch.cos(p[..., None] * t)).sum(dim=1) / w.sum(dim=1)[:, None, None]
    size = w.sum(dim=1) ** 2 / w.square().sum(dim=1)
    return ((square - 2 * phi * ecf_cos + phi.square()) @ quad) * size[:, None]


def problem(batch=2, samples=9, dim=5, slices=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, samples, dim, generator=g, dtype=torch.float64) * scale
    directions = torch.randn(dim, slices, generator=g, dtype=torch.float64)
    weights = torch.rand(batch, samples, generator=g, dtype=torch.float64)
    return x, directions / directions.norm(dim=0), weights


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*inputs)
    return (value.detach(), *torch.autograd.grad(value.sum(), inputs))


@pytest.mark.parametrize("weighted", [False, True])
def test_reference_is_the_pair_formula(weighted):
    x, directions, weights = problem()
    w = weights if weighted else None
    ours = grads(lambda u, a: sigreg_reference(u, a, reduction="none", weights=w, unbiased=True), x, directions)
    truth = grads(lambda u, a: pair_formula(u, a, w), x, directions)
    for name, a, b in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, a, b, 1e-12)
    biased = sigreg_reference(x, directions, reduction="none", weights=w)
    assert not torch.allclose(biased, ours[0]), "the unbiased statistic differs from the biased one"


def test_unbiased_removes_the_bias_on_gaussian_samples():
    """The point of the U-statistic: on Gaussian samples its mean is ~0, the biased one's is
    ``sum_j w_j (1 - phi_j^2)`` (every term's i = i part), whatever N."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 4, 1, generator=g, dtype=torch.float64)  # 4000 batch indices of N = 4
    directions = torch.ones(1, 1, dtype=torch.float64)
    _, phi, quad = quadrature(17, 3.0, dtype=torch.float64)
    floor = ((1 - phi.square()) @ quad).item()
    biased = sigreg_reference(x, directions).item()
    unbiased = sigreg_reference(x, directions, unbiased=True).item()
    assert abs(biased - floor) < 0.05 * floor, (biased, floor)
    assert abs(unbiased) < 0.05 * floor, (unbiased, floor)


def run(backend, x, directions, **kwargs):
    if backend != "contract":
        return sigreg(x, directions, backend=backend, unbiased=True, **kwargs)
    weights = kwargs.pop("weights", None)
    weights = None if weights is None else weights.to(x.dtype).contiguous()
    reduction = kwargs.pop("reduction", "mean")
    return fused_sigreg("primitives", x, directions, 17, 3.0, reduction, kwargs.pop("clip_value", None), False,
                        weights, True)


@pytest.mark.parametrize("backend", ["reference", "cpu", "contract"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_backends_match_the_reference(backend, reduction, weighted):
    x, directions, weights = problem(batch=3, samples=11, dim=6, slices=7, seed=1)
    w = weights if weighted else None
    ours = grads(lambda u, a: run(backend, u, a, reduction=reduction, weights=w), x, directions)
    truth = grads(lambda u, a: sigreg_reference(u, a, reduction=reduction, weights=w, unbiased=True), x, directions)
    for name, a, b in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, a, b, 1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu", "contract"])
def test_clipping_applies_to_the_unbiased_statistic(backend):
    x, directions, _ = problem(batch=2, samples=12, dim=4, slices=16, seed=2)
    stats = sigreg_reference(x, directions, reduction="none", unbiased=True)
    middle = stats.flatten().sort().values[15:17]
    clip_value = middle.mean().item()  # halfway between two statistics: half the slices clipped
    ours = grads(lambda u, a: run(backend, u, a, reduction="sum", clip_value=clip_value), x, directions)
    truth = grads(lambda u, a: sigreg_reference(u, a, reduction="sum", clip_value=clip_value, unbiased=True),
                  x, directions)
    for name, a, b in zip(("value", "grad_x", "grad_directions"), ours, truth):
        assert_relative_close(name, a, b, 1e-10)


def test_float32_inputs_float64_gradcheck():
    x, directions, weights = problem(batch=2, samples=5, dim=3, slices=2, seed=4)
    x, directions = x.requires_grad_(), directions.requires_grad_()
    for w in (None, weights):
        assert torch.autograd.gradcheck(lambda u, a: sigreg(u, a, backend="cpu", unbiased=True, weights=w,
                                                            reduction="none"), (x, directions))
    x32, d32 = x.detach().float(), directions.detach().float()
    assert_relative_close("float32", sigreg(x32, d32, backend="cpu", unbiased=True),
                          sigreg_reference(x.detach(), directions.detach(), unbiased=True), 1e-5)


def test_small_angles_keep_their_digits():
    """|x| ~ 1e-3: 1 - |ECF|^2 is ~1e-6 of its terms; formed from the sums of cos - 1 it keeps them."""
    x, directions, _ = problem(samples=16, scale=1e-3, seed=5)
    truth = sigreg_reference(x, directions, reduction="none", unbiased=True)
    for backend in ("cpu", "contract"):
        ours = run(backend, x.float(), directions.float(), reduction="none")
        assert_relative_close(backend, ours, truth, 1e-4)


def test_one_sample_is_an_error_and_one_weighted_row_is_nan():
    x, directions, _ = problem(samples=1)
    with pytest.raises(ValueError, match="unbiased=True needs at least 2 samples"):
        sigreg(x, directions, unbiased=True)
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        sigreg(x, directions, unbiased=1)
    x, directions, _ = problem(batch=3, samples=6)
    weights = torch.zeros(3, 6, dtype=torch.float64)
    weights[0, 2] = 1.0  # one row: no pair of samples
    weights[1, :4] = 0.5  # four rows
    # batch index 2: no weight at all, statistic 0 as ever
    for backend in ("reference", "cpu", "contract"):
        stats = run(backend, x, directions, weights=weights, reduction="none")
        assert stats[0].isnan().all() and stats[1].isfinite().all() and (stats[2] == 0).all(), backend


@pytest.mark.parametrize("backend", ["sigreg_reference", "reference", "cpu", "contract"])
def test_one_weighted_row_passes_nan_gradients_to_it(backend):
    """The NaN statistic of a batch index whose weight is all on one row has NaN gradients (the
    reference's included: found by the fuzzer, whose oracle had finite ones), on that row alone: its
    rows of weight 0 get 0, the other batch indices their finite gradients."""
    x, directions, _ = problem(batch=2, samples=6, seed=2)
    weights = torch.ones(2, 6, dtype=torch.float64)
    weights[0] = 0.0
    weights[0, 3] = 2.0
    if backend == "sigreg_reference":
        fn = lambda u, a: sigreg_reference(u, a, weights=weights, reduction="none", unbiased=True)  # noqa: E731
    else:
        fn = lambda u, a: run(backend, u, a, weights=weights, reduction="none")  # noqa: E731
    value, grad_x, _ = grads(fn, x, directions)
    assert value[0].isnan().all() and value[1].isfinite().all()
    assert grad_x[0, 3].isnan().all() and (grad_x[0, [0, 1, 2, 4, 5]] == 0).all() and grad_x[1].isfinite().all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "contract"])
def test_an_empty_batch_index_passes_no_gradient(backend):
    """A batch index of no weight: statistic 0 and gradients exactly 0 (not 0 * NaN), the
    others' gradients those of the batch without it."""
    x, directions, weights = problem(batch=3, samples=8, dim=4, slices=5, seed=6)
    weights[2] = 0.0
    ours = grads(lambda u, a: run(backend, u, a, weights=weights, reduction="sum"), x, directions)
    kept = grads(lambda u, a: run(backend, u, a, weights=weights[:2], reduction="sum"), x[:2], directions)
    assert all(t.isfinite().all() for t in ours)
    assert torch.equal(ours[1][2], torch.zeros_like(ours[1][2]))
    for name, a, b in zip(("value", "grad_x", "grad_directions"), (ours[0], ours[1][:2], ours[2]), kept):
        assert_relative_close(name, a, b, 1e-12)


def test_module_option():
    x, _, _ = problem(samples=8)
    module = SIGReg(num_slices=5, backend="cpu", unbiased=True)
    assert "unbiased=True" in repr(module)
    directions = SIGReg(num_slices=5).next_directions(x, 5)  # a fresh module's first draw: the same step
    assert_relative_close("module", module(x), sigreg_reference(x, directions, unbiased=True), 1e-12)
    with pytest.raises(TypeError, match="unbiased"):
        SIGReg(unbiased="yes")
