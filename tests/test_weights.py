"""Sample weights and masks (``sigreg(..., weights=)``): the semantics users rely on, per backend.

A 0/1 mask must give exactly the statistic of the batch with the masked rows removed
(the compacted batch ``x[mask]``, per batch index), values and both gradients; garbage
(NaN, Inf) in masked rows must change nothing; a batch index with no weight has
statistic 0, no gradient, and is left out of the mean. The backends here: the plain
reference, the CPU kernel, and the GPU path's orchestration (``gpu/fused.py``) on the
kernels' contract (``gpu/contract.py``); the Triton and CUDA kernels themselves are held
to the same contract in ``test_triton.py`` and ``test_cuda_emulated.py``, and end to end
by the fuzzer, which draws weights and masks too.
"""

import pytest
import torch
from helpers import assert_relative_close

from sigreg_kernels import SIGReg, sigreg, sigreg_reference
from sigreg_kernels.gpu.fused import fused_sigreg

BACKENDS = ["reference", "cpu", "contract"]


def run(backend, x, directions, weights, reduction="mean", clip_value=None):
    """``sigreg`` with ``backend``; "contract": gpu/fused.py on gpu/contract.py (flat [B, N, D] inputs)."""
    if backend != "contract":
        return sigreg(x, directions, weights=weights, reduction=reduction, clip_value=clip_value, backend=backend)
    flat = x.reshape(-1, *x.shape[-2:])
    w = torch.broadcast_to(weights, x.shape[:-1]).reshape(flat.shape[:2]).to(flat.dtype).contiguous()
    out = fused_sigreg("primitives", flat, directions, 17, 3.0, reduction, clip_value, False, w)
    return out.reshape(*x.shape[:-2], -1) if reduction == "none" else out


def problem(batch=(3,), samples=40, dim=6, slices=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, samples, dim, generator=g, dtype=torch.float64)
    directions = torch.randn(dim, slices, generator=g, dtype=torch.float64)
    mask = torch.rand(*batch, samples, generator=g) > 0.35
    return x.to(dtype), (directions / directions.norm(dim=0)).to(dtype), mask


def compacted(x, directions, mask, reduction="mean"):
    """The float64 statistics of each batch index's unmasked rows (the second oracle)."""
    flat_x, flat_mask = x.reshape(-1, *x.shape[-2:]).double(), mask.reshape(-1, mask.shape[-1])
    stats = [sigreg_reference(flat_x[b][flat_mask[b]][None], directions.double(), reduction="none")[0]
             for b in range(flat_x.shape[0]) if flat_mask[b].any()]
    stats = torch.stack(stats)
    return {"mean": stats.mean, "sum": stats.sum}[reduction]()


def grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*inputs)
    return (value.detach(), *torch.autograd.grad(value, inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_mask_is_the_compacted_batch(backend, reduction):
    x, directions, mask = problem()
    ours = grads(lambda u, a: run(backend, u, a, mask, reduction), x, directions)
    # The compacted batch, differentiated through the same x: masked rows get exactly 0.
    truth = grads(lambda u, a: compacted(u, a, mask, reduction), x, directions)
    assert_relative_close("value", ours[0], truth[0], 1e-12)
    assert_relative_close("grad_x", ours[1], truth[1], 1e-10)
    assert_relative_close("grad_directions", ours[2], truth[2], 1e-10)
    assert torch.equal(ours[1][~mask], torch.zeros_like(ours[1][~mask]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_in_masked_rows_changes_nothing(backend):
    x, directions, mask = problem(seed=1)
    dirty = x.clone()
    dirty[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.0, 3.0], dtype=x.dtype).repeat(
        (~mask).sum().item(), 1)
    clean = grads(lambda u, a: run(backend, u, a, mask), x, directions)
    ours = grads(lambda u, a: run(backend, u, a, mask), dirty, directions)
    for name, a, b in zip(("value", "grad_x", "grad_directions"), ours, clean):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ones_is_no_weights_and_a_common_scale_changes_nothing(backend):
    x, directions, _ = problem(seed=2)
    plain = grads(lambda u, a: run(backend, u, a, torch.ones(x.shape[:-1], dtype=x.dtype)), x, directions)
    unweighted = grads(lambda u, a: sigreg(u, a, backend="cpu" if backend == "contract" else backend), x, directions)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(x.shape[:-1], generator=g, dtype=x.dtype)
    weighted = grads(lambda u, a: run(backend, u, a, w), x, directions)
    scaled = grads(lambda u, a: run(backend, u, a, 37.5 * w), x, directions)
    for a, b, c, d in zip(plain, unweighted, weighted, scaled):
        assert_relative_close("ones", a, b, 1e-12)
        assert_relative_close("scale", d, c, 1e-12)


def test_weights_are_the_weighted_formula():
    """Float weights: weighted ECF means, N the effective size (sum w)^2 / sum w^2 (float64, by hand)."""
    x, directions, _ = problem(batch=(), seed=4)
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    t = torch.linspace(0, 3.0, 17, dtype=x.dtype)
    angles = (x @ directions).unsqueeze(-1) * t
    cos = (angles.cos() * w[:, None, None]).sum(0) / w.sum()
    sin = (angles.sin() * w[:, None, None]).sum(0) / w.sum()
    trapezoid = torch.full((17,), 2 * 3.0 / 16, dtype=x.dtype)
    trapezoid[0] = trapezoid[-1] = 3.0 / 16
    phi = torch.exp(-t.square() / 2)
    stat = ((cos - phi).square() + sin.square()) @ (trapezoid * phi) * w.sum() ** 2 / w.square().sum()
    for backend in BACKENDS:
        assert_relative_close(backend, run(backend, x, directions, w, "none"), stat, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_index_without_weight_is_zero_and_left_out_of_the_mean(backend):
    x, directions, mask = problem(batch=(2, 2), seed=6)
    mask[1, 0] = False
    stat = run(backend, x, directions, mask, "none")
    assert torch.equal(stat[1, 0], torch.zeros_like(stat[1, 0])) and (stat[0] > 0).all()
    value, grad_x, _ = grads(lambda u, a: run(backend, u, a, mask), x, directions)
    assert_relative_close("mean", value, stat[mask.any(-1)].mean(), 1e-12)
    assert torch.equal(grad_x[1, 0], torch.zeros_like(grad_x[1, 0]))
    nothing = grads(lambda u, a: run(backend, u, a, torch.zeros_like(mask)), x, directions)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in nothing), "no weight at all: a loss of 0, no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_index_is_zero_even_with_non_finite_directions(backend):
    x, directions, mask = problem(batch=(2,), seed=11)
    mask[1] = False
    directions = directions.clone()
    directions[0, 0] = -float("inf")
    stat = run(backend, x, directions, mask, "none")
    assert torch.equal(stat[1], torch.zeros_like(stat[1])) and stat[0, 0].isnan()
    mask[0] = False  # nothing left: a loss of 0, and no gradient (not 0 * NaN)
    _, grad_x, grad_directions = grads(lambda u, a: run(backend, u, a, mask), x, directions)
    assert torch.equal(grad_x, torch.zeros_like(grad_x)) and torch.equal(grad_directions, torch.zeros_like(grad_directions))


def test_weights_broadcast_over_the_batch_dims_and_the_module_takes_them():
    x, directions, mask = problem(batch=(2, 3), seed=7)
    per_time_step = mask[0]  # [3, N]: the same validity for every index of the first batch dim
    expected = sigreg(x, directions, weights=per_time_step.expand(2, 3, -1), reduction="none")
    assert torch.equal(sigreg(x, directions, weights=per_time_step, reduction="none"), expected)
    module = SIGReg(num_slices=9)
    torch.testing.assert_close(module(x.float(), weights=mask), SIGReg(num_slices=9)(x.float(), mask), rtol=0, atol=0)


def test_float32_and_16_bit_inputs_follow_the_oracle():
    x, directions, mask = problem(seed=8)
    truth = compacted(x, directions, mask)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)):
        for backend in ("cpu", "reference"):
            value = sigreg(x.to(dtype), directions.to(dtype), weights=mask, backend=backend)
            # 16-bit inputs: the oracle sees the same rounded inputs
            exact = compacted(x.to(dtype), directions.to(dtype), mask) if dtype != torch.float32 else truth
            assert_relative_close(f"{backend} {dtype}", value, exact, tol)


@pytest.mark.parametrize("weights, error, message", [
    (torch.ones(3, 41), ValueError, "weights must have shape"),
    (torch.ones(40), None, None),  # broadcast over the batch dim: fine
    (torch.ones(2, 40), ValueError, "do not broadcast"),
    (torch.ones(3, 40, dtype=torch.int64), TypeError, "weights must be bool"),
    ([1.0] * 40, TypeError, "weights must be a torch.Tensor"),
    (-torch.ones(3, 40), ValueError, "finite and non-negative"),
    (torch.full((3, 40), float("nan")), ValueError, "finite and non-negative"),
    (torch.ones(3, 40, device="meta"), ValueError, "weights must be on x's device"),
])
def test_bad_weights_give_a_clear_error(weights, error, message):
    x, directions, _ = problem(dtype=torch.float32)
    if error is None:
        sigreg(x, directions, weights=weights)
        return
    with pytest.raises(error, match=message):
        sigreg(x, directions, weights=weights)


def test_no_gradient_flows_to_the_weights():
    x, directions, _ = problem(dtype=torch.float32)
    w = torch.rand(x.shape[:-1], requires_grad=True)
    loss = sigreg(x.requires_grad_(), directions, weights=w)
    loss.backward()
    assert w.grad is None and x.grad is not None


def test_cpu_op_with_weights_passes_opcheck_and_gradcheck():
    x, directions, mask = problem(batch=(2,), samples=12, dim=4, slices=5, seed=9)
    w = mask.double() * torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.library.opcheck(torch.ops.sigreg.ecf_sums.default, (x.float(), directions.float(), 17, 3.0, w.float()))
    torch.autograd.gradcheck(lambda u, a: sigreg(u, a, weights=w, backend="cpu", reduction="none"),
                             (x.clone().requires_grad_(), directions.clone().requires_grad_()))
    torch.autograd.gradcheck(lambda u: sigreg(u, None, weights=w, backend="cpu", reduction="none"),
                             (x.clone().requires_grad_(),))


def test_compiled_weighted_loss_matches_eager():
    x, directions, mask = problem(dtype=torch.float32, seed=10)
    fn = lambda u, a, w: sigreg(u, a, weights=w, backend="cpu")  # noqa: E731
    eager = grads(lambda u, a: fn(u, a, mask), x, directions)
    compiled_fn = torch.compile(fn, fullgraph=True)
    compiled = grads(lambda u, a: compiled_fn(u, a, mask), x, directions)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
