"""The CUDA kernels' device code, run on the CPU by the host emulation, against the float64 oracle.

No GPU is needed: the source of ``csrc/cuda/sigreg_cuda_kernels.cu`` is built
with g++ against ``tests/cuda_host_emulation`` (see ``emulated_cuda.py`` for
what this covers and what it does not). ``test_cuda.py`` runs the same kinds of
checks through the real extension on a GPU.
"""

import shutil
from functools import partial

import pytest
import torch
from emulated_cuda import EmulatedKernels, build
from helpers import CUDA_KERNEL_SHAPES, assert_matches_oracle, assert_relative_close, weighted_case

from sigreg_kernels.backends import reference_ecf_sums

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the emulated kernels")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return EmulatedKernels(build(tmp_path_factory.mktemp("cuda_host_emulation")))


SHAPES = CUDA_KERNEL_SHAPES


def case(batch_shape, samples, dim, slices, scale=1.0, dtype=torch.float32, seed=0):
    return weighted_case(batch_shape, samples, dim, slices, scale=scale, dtype=dtype, seed=seed)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_exact_path_matches_oracle(kernels, shape, scale):
    x, directions, weight = case(*shape, scale=scale)
    assert_matches_oracle(kernels.sigreg, x, directions, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_core_path_matches_oracle(kernels, shape, dtype):
    x, directions, weight = case(*shape, dtype=dtype, seed=1)
    assert_matches_oracle(partial(kernels.sigreg, tensor_cores=True), x, directions, weight, tolerance=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_fma_path_matches_oracle(kernels, dtype):
    x, directions, weight = case((2,), 70, 40, 70, dtype=dtype, seed=2)
    assert_matches_oracle(partial(kernels.sigreg, tensor_cores=False), x, directions, weight)


@pytest.mark.parametrize("knots", [2, 3, 16, 17, 18, 33, 40])
def test_knot_counts_across_passes(kernels, knots):
    """The forward keeps 16 knots per pass in registers: 1, 2 and 3 passes, partial last pass."""
    x, directions, weight = case((2,), 70, 40, 70, seed=3)
    assert_matches_oracle(kernels.sigreg, x, directions, weight, knots=knots, t_max=4.0)


def test_sine_cosine_fallback_for_large_arguments(kernels):
    """|t p| above 8192 takes the accurate library path instead of the polynomial."""
    x, directions, weight = case((), 65, 9, 33, scale=1e5, seed=4)
    assert (x @ directions).abs().max() * 3.0 > 8192 * 4
    assert_matches_oracle(kernels.sigreg, x, directions, weight)


def test_forward_chunks_of_several_row_tiles(kernels):
    """Enough slices and rows that each forward block sums several 64-row tiles."""
    x, directions, weight = case((3,), 1500, 20, 1025, seed=5)
    sums = kernels.ecf_sums(x, directions, 17, 3.0, tensor_cores=False)
    assert_relative_close("sums", sums, reference_ecf_sums(x.double(), directions.double(), 17, 3.0), 1e-6)


def test_backward_feature_chunks_and_chunks_across_batch(kernels):
    """D > 256 (two grad_x feature chunks) and grad_directions chunks that span two batch indices."""
    x, directions, weight = case((3,), 400, 300, 65, seed=6)
    assert_matches_oracle(kernels.sigreg, x, directions, weight)


def test_many_samples_split_into_chunks(kernels):
    """N = 70,000: forward blocks sum two 64-row tiles each; grad_directions sums 69 per chunk, 16 chunks."""
    assert_matches_oracle(kernels.sigreg, *case((), 70_000, 16, 8, scale=2.0, seed=13))


@pytest.mark.parametrize("dtype,tensor_cores", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_results_do_not_depend_on_thread_order(kernels, dtype, tensor_cores):
    """A missing barrier or a cross-block race changes results when threads and blocks run in reverse."""
    x, directions, _ = case((2,), 200, 300, 130, dtype=dtype, seed=7)
    grad_sums = torch.randn(2, 2, 130, 17, generator=torch.Generator().manual_seed(8))

    def run():
        sums = kernels.ecf_sums(x, directions, 17, 3.0, tensor_cores)
        return (sums, *kernels.ecf_sums_backward(grad_sums, x, directions, 17, 3.0, tensor_cores, True))

    ascending = run()
    with kernels.descending():
        descending = run()
    for name, a, d in zip(("sums", "grad_x", "grad_directions"), ascending, descending):
        assert torch.equal(a, d), f"{name} depends on the order threads run in"
        assert torch.isfinite(a).all(), f"{name} has NaN: a read of unwritten (poisoned) memory"


def test_batch_beyond_the_grid_cap_takes_several_launches(kernels):
    """Grid z carries batch x knot passes (forward) and the batch (grad_x); past the cap,
    the launches split the batch. Lowered to 4: 5 batch indices with 3 passes take 5
    forward launches and 2 grad_x launches, and give the single-launch results."""
    x, directions, _ = case((5,), 70, 12, 65, seed=11)
    grad_sums = torch.randn(5, 2, 65, 40, generator=torch.Generator().manual_seed(12))

    def run():
        sums = kernels.ecf_sums(x, directions, 40, 3.0, tensor_cores=False)
        return (sums, *kernels.ecf_sums_backward(grad_sums, x, directions, 40, 3.0, False, True))

    single = run()
    with kernels.max_grid_yz(4):
        split = run()
    for name, a, b in zip(("sums", "grad_x", "grad_directions"), single, split):
        assert torch.equal(a, b), name


def test_nan_input_reaches_only_its_batch_index(kernels):
    x, directions, _ = case((2,), 70, 12, 65, seed=9)
    x[0, 5, 3] = float("nan")
    sums = kernels.ecf_sums(x, directions, 17, 3.0, tensor_cores=False)
    expected = reference_ecf_sums(x.double(), directions.double(), 17, 3.0)
    assert torch.equal(sums.isnan(), expected.isnan())
    assert sums[1].isfinite().all()


def test_empty_feature_dimension(kernels):
    """D = 0: every projection is 0, so cos sums are N and the gradients are empty."""
    x, directions, weight = case((2,), 10, 0, 5, seed=10)
    assert_matches_oracle(kernels.sigreg, x, directions, weight)


# The emulation itself: each bug it is meant to catch, caught.

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


@pytest.mark.parametrize("name,message", [
    ("selftest_divergent_barrier", "__syncthreads() reached by 128 threads while 128 had exited"),
    ("selftest_partial_shuffle", "shuffle was not reached by every lane"),
    ("selftest_misaligned_wmma", "not 32-byte aligned"),
])
def test_emulation_reports_launch_failures(kernels, name, message):
    out = torch.zeros(256 * 2)
    assert kernels.run(name, out) != 0
    assert message in kernels.failure()
