"""``directions=None``: the univariate Epps-Pulley test of the columns of x, with no product (SPEC §2).

Every backend against the float64 oracle ``sigreg_reference(x.double(), None)``:
the reference and the C++ CPU op here, the GPU kernels' contract (gpu/contract.py
through gpu/fused.py), the Triton kernels under the interpreter (a subprocess: the
interpreter is chosen at import) and the CUDA kernels in the host emulation.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_relative_close, relative_error

from sigreg_kernels import sigreg, sigreg_reference
from sigreg_kernels.gpu.fused import fused_sigreg

ROOT = Path(__file__).resolve().parent.parent

# (batch dims, N, D, scale, knots, t_max): none a multiple of a block, the single-element edges.
SHAPES = [
    pytest.param((), 1, 1, 1.0, 17, 3.0, id="N=D=1"),
    pytest.param((), 37, 19, 1.0, 17, 3.0, id="plain"),
    pytest.param((2, 3), 41, 65, 1.0, 17, 3.0, id="batch-dims"),
    pytest.param((3,), 129, 70, 100.0, 17, 3.0, id="x-scale-100"),
    pytest.param((2,), 300, 5, 1e-3, 5, 2.0, id="tiny-x-knots=5"),
    pytest.param((), 64, 130, 1.0, 2, 3.0, id="knots=2"),
]


def case(batch_shape, samples, dim, scale=1.0, dtype=torch.float32, seed=0):
    """``x: [*batch_shape, samples, dim]`` and a random upstream weight ``[*batch_shape, dim]``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, samples, dim, generator=generator, dtype=torch.float64) * scale
    weight = torch.randn(*batch_shape, dim, generator=generator, dtype=torch.float64)
    return x.to(dtype), weight


def values_and_grad(fn, x, weight, **kwargs):
    x = x.detach().clone().requires_grad_()
    stat = fn(x, reduction="none", **kwargs)
    (grad_x,) = torch.autograd.grad((stat * weight.to(stat.dtype)).sum() * 2, x)
    return stat.detach(), grad_x


def assert_matches_oracle(fn, x, weight, **kwargs):
    """Statistics and grad_x of ``fn(x, reduction="none", **kwargs)`` against float64 (tolerances as helpers.py)."""
    ours = values_and_grad(fn, x, weight, **kwargs)
    truth = values_and_grad(lambda a, **k: sigreg_reference(a.double(), None, **k), x, weight, **kwargs)
    if x.dtype == torch.float32:
        ref32 = values_and_grad(lambda a, **k: sigreg_reference(a, None, **k), x, weight, **kwargs)
        angle_ulp = torch.finfo(torch.float32).eps * kwargs.get("t_max", 3.0) * x.double().abs().max().item()
        tolerances = [max(1e-5, 2 * relative_error(r, t), angle_ulp) for r, t in zip(ref32, truth)]
    elif x.dtype == torch.float64:
        tolerances = [1e-10, 1e-10]
    else:
        tolerances = [1e-4, 2e-2]
    for name, actual, expected, tol in zip(("value", "grad_x"), ours, truth, tolerances):
        assert_relative_close(name, actual, expected, tol)
    assert ours[1].dtype == x.dtype, "grad_x comes back in x's dtype"
    assert ours[0].shape == (*x.shape[:-2], x.shape[-1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("batch_shape, samples, dim, scale, knots, t_max", SHAPES)
def test_matches_oracle(backend, batch_shape, samples, dim, scale, knots, t_max):
    x, weight = case(batch_shape, samples, dim, scale)
    fn = lambda a, **k: sigreg(a, None, backend=backend, **k)  # noqa: E731
    assert_matches_oracle(fn, x, weight, knots=knots, t_max=t_max)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_other_dtypes(backend, dtype):
    x, weight = case((2,), 70, 33, dtype=dtype, seed=1)
    assert_matches_oracle(lambda a, **k: sigreg(a, None, backend=backend, **k), x, weight)


def test_contract_of_the_gpu_kernels():
    """gpu/contract.py (what the cuda and triton kernels implement) through gpu/fused.py's autograd."""
    for shape in [((), 37, 19), ((2, 3), 41, 65)]:
        x, weight = case(*shape, seed=2)

        def fn(a, reduction, **kwargs):
            flat = a.reshape(-1, a.shape[-2], a.shape[-1])
            stat = fused_sigreg("primitives", flat, None, 17, 3.0, reduction, None)
            return stat.reshape(*a.shape[:-2], a.shape[-1])

        assert_matches_oracle(fn, x, weight)


def test_is_the_test_along_the_identity():
    """No directions = the identity directions, for every reduction."""
    x, _ = case((2,), 50, 12, seed=3)
    identity = torch.eye(12)
    for backend in ("reference", "cpu"):
        for reduction in ("mean", "sum", "none"):
            torch.testing.assert_close(sigreg(x, None, backend=backend, reduction=reduction),
                                       sigreg(x, identity, backend=backend, reduction=reduction),
                                       rtol=1e-6, atol=1e-7)


def test_columns_are_independent_and_permutation_invariant():
    x, _ = case((), 80, 6, seed=4)
    stats = sigreg(x, None, reduction="none", backend="cpu")
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(sigreg(x[:, perm], None, reduction="none", backend="cpu"), stats[perm])
    rows = torch.randperm(80, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigreg(x[rows], None, reduction="none", backend="cpu"), stats, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64():
    x, _ = case((2,), 9, 4, dtype=torch.float64, seed=5)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: sigreg(a, None, reduction="none", backend="cpu"), (x,))
    assert torch.autograd.gradgradcheck(lambda a: sigreg(a, None, reduction="none", backend="reference"), (x,))


def test_cpu_op_runs_no_matrix_product():
    """The op with directions=None computes no product (no identity matmul) in either pass."""
    x, _ = case((2,), 64, 32, seed=6)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sigreg(x, None, backend="cpu").backward()
    names = {event.name for event in prof.events()}
    assert "sigreg::ecf_sums" in names and "sigreg::ecf_sums_backward" in names
    products = {"aten::mm", "aten::bmm", "aten::matmul", "aten::addmm", "aten::baddbmm", "aten::mm_out"}
    assert not names & products, sorted(names & products)


def test_cpu_op_contract():
    x, _ = case((2,), 20, 7, seed=7)
    sums, projection = torch.ops.sigreg.ecf_sums(x, None, 9, 2.0)
    assert sums.shape == (2, 2, 7, 9) and sums.dtype == torch.float32
    assert projection.shape == (0,), "without directions the forward keeps nothing (the backward reads x)"
    t = torch.linspace(0, 2.0, 9, dtype=torch.float64)
    angles = x.double().unsqueeze(-1) * t
    expected = torch.stack(((angles.cos() - 1).sum(dim=1), angles.sin().sum(dim=1)), dim=1)  # cos - 1 (contract)
    assert_relative_close("sums", sums, expected, 1e-6)
    grad_sums = torch.randn(2, 2, 7, 9)
    grad_x, grad_directions = torch.ops.sigreg.ecf_sums_backward(grad_sums, x, None, projection, 9, 2.0, False)
    assert grad_x.shape == x.shape and grad_directions.shape == (0,)
    with pytest.raises(RuntimeError, match="need_grad_directions requires directions"):
        torch.ops.sigreg.ecf_sums_backward(grad_sums, x, None, projection, 9, 2.0, True)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, _ = case((2,), 33, 10, seed=8)
    compiled = torch.compile(lambda a: sigreg(a, None, backend="cpu") * 3.0, fullgraph=True)
    xc = x.clone().requires_grad_()
    loss = compiled(xc)
    loss.backward()
    xe = x.double().requires_grad_()
    expected = sigreg_reference(xe, None) * 3.0
    expected.backward()
    assert_relative_close("compiled loss", loss, expected, 1e-5)
    assert_relative_close("compiled grad_x", xc.grad, xe.grad, 1e-5)


def test_autocast_leaves_x_as_it_is():
    """Nothing to multiply: autocast changes nothing (x is tested in its own dtype)."""
    x, _ = case((2,), 40, 8, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sigreg(x, None, backend="cpu")
    torch.testing.assert_close(ours, sigreg(x, None, backend="cpu"), rtol=0, atol=0)


# The Triton kernels under the interpreter, in a fresh process (the interpreter is
# chosen when sigreg_kernels.gpu.triton.ops is first imported).
TRITON_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_directions_none import case, values_and_grad
    from helpers import relative_error
    from sigreg_kernels import sigreg, sigreg_reference
    errors = []
    for batch_shape, samples, dim, scale, dtype in [((), 37, 19, 1.0, torch.float32),
                                                    ((2, 3), 41, 65, 1.0, torch.float32),
                                                    ((2,), 70, 40, 10.0, torch.float32),
                                                    ((), 1, 1, 1.0, torch.float32),
                                                    ((2,), 50, 33, 1.0, torch.bfloat16)]:
        x, weight = case(batch_shape, samples, dim, scale, dtype=dtype)
        for clip_value in (None, 1.0):
            ours = values_and_grad(lambda a, **k: sigreg(a, None, backend="triton", **k), x, weight,
                                   clip_value=clip_value)
            truth = values_and_grad(lambda a, **k: sigreg_reference(a.double(), None, **k), x, weight,
                                    clip_value=clip_value)
            errors.append(dict(shape=[list(batch_shape), samples, dim], dtype=str(dtype), clip=clip_value,
                               value=relative_error(ours[0], truth[0]), grad=relative_error(ours[1], truth[1]),
                               grad_dtype=str(ours[1].dtype)))
    print(json.dumps(errors))
""")


def test_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(Path(__file__).parent)], env=env,
                            capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    for row in json.loads(result.stdout.strip().splitlines()[-1]):
        value_tol, grad_tol = (1e-4, 2e-2) if "bfloat16" in row["dtype"] else (1e-5, 1e-5)
        assert row["value"] <= value_tol and row["grad"] <= grad_tol, row
        assert row["grad_dtype"] == row["dtype"], row


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the emulated kernels")
def test_cuda_emulation(tmp_path):
    """The CUDA kernels' device code in the host emulation (tests/emulated_cuda.py)."""
    from emulated_cuda import EmulatedKernels, build

    kernels = EmulatedKernels(build(tmp_path))
    for batch_shape, samples, dim in [((), 37, 19), ((2, 3), 41, 65), ((), 130, 257)]:
        x, weight = case(batch_shape, samples, dim, seed=10)
        fn = lambda a, **k: kernels.sigreg(a, None, **k)  # noqa: E731
        assert_matches_oracle(fn, x, weight)
