"""The Triton backend: parity with the float64 oracle, determinism, opcheck, torch.compile.

Every test runs on two devices:
- "cpu": the kernels under the Triton interpreter. It is chosen when the kernels are
  defined, at the first import of ``sigreg_kernels.triton_op``; the ``device`` fixture sets
  TRITON_INTERPRET=1 before that import (and keeps it set for backends.py's check).
  Where CUDA is present, the process compiles the kernels for the GPU instead and
  these skip, unless TRITON_INTERPRET=1 was set for the whole run.
- "cuda": the compiled kernels; skipped without a GPU.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_matches_oracle, assert_relative_close, oracle, random_case, values_and_grads

from sigreg_kernels import sigreg

pytest.importorskip("triton")

DEVICES = ("cpu", "cuda")

# (batch_shape, N, D, K, scale, knots, t_max)
SHAPES = [
    # Interpreter blocks are 32 wide: N, D, K span several blocks and D two dx chunks;
    # the rows fall in 3 splits of 2, 2 and 1 (partial) tiles.
    pytest.param((), 150, 70, 70, 1.0, 17, 3.0, id="multi-block"),
    pytest.param((), 1000, 3, 5, 1.0, 17, 3.0, id="long-N"),  # 8 splits of 4 tiles
    pytest.param((2, 3), 33, 5, 17, 1.0, 17, 3.0, id="batch-dims"),
    pytest.param((), 1, 1, 1, 1.0, 17, 3.0, id="N=D=K=1"),
    pytest.param((3,), 40, 1, 3, 1.0, 5, 2.0, id="D=1-knots=5"),
    pytest.param((), 64, 16, 1, 1.0, 2, 3.0, id="K=1-knots=2"),
    pytest.param((), 100, 20, 40, 100.0, 17, 3.0, id="x-scale-100"),
]
HALF_SHAPES = [
    pytest.param((), 150, 70, 70, 1.0, 17, 3.0, id="multi-block"),
    pytest.param((2,), 40, 24, 33, 10.0, 17, 3.0, id="batch-scale-10"),
]


def _import_op_module():
    return importlib.import_module("sigreg_kernels.triton_op")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    loaded = sys.modules.get("sigreg_kernels.triton_op")
    if request.param == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
            pytest.skip("CUDA is present: this process compiles the kernels for the GPU "
                        "(run with TRITON_INTERPRET=1 to test the interpreter on CPU)")
        if loaded is not None and not loaded.INTERPRET:
            pytest.skip("sigreg_kernels.triton_op was imported without TRITON_INTERPRET=1: "
                        "its kernels are compiled, not interpreted")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if os.environ.get("TRITON_INTERPRET") == "1" or (loaded is not None and loaded.INTERPRET):
            pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, not compiled for the GPU")
    _import_op_module()
    return request.param


def triton_sigreg(x, directions, **kwargs):
    return sigreg(x, directions, backend="triton", **kwargs)


def _run_all(x, directions, weight, knots, t_max):
    kwargs = {"knots": knots, "t_max": t_max, "reduction": "none"}
    triton = values_and_grads(lambda a, b: sigreg(a, b, backend="triton", **kwargs), x, directions, weight)
    truth = values_and_grads(lambda a, b: oracle(a, b, **kwargs), x, directions, weight)
    return triton, truth, kwargs


@pytest.mark.parametrize("batch_shape, samples, dim, slices, scale, knots, t_max", SHAPES)
def test_fp32_matches_oracle(device, batch_shape, samples, dim, slices, scale, knots, t_max):
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale, device=device)
    weight = torch.randn(*batch_shape, slices, generator=torch.Generator().manual_seed(1)).to(device)
    assert_matches_oracle(triton_sigreg, x, directions, weight, knots=knots, t_max=t_max)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_shape, samples, dim, slices, scale, knots, t_max", HALF_SHAPES)
def test_half_matches_oracle(device, dtype, batch_shape, samples, dim, slices, scale, knots, t_max):
    x, directions = random_case(batch_shape, samples, dim, slices, scale=scale, dtype=dtype, device=device)
    weight = torch.randn(*batch_shape, slices, generator=torch.Generator().manual_seed(1)).to(device)
    assert_matches_oracle(triton_sigreg, x, directions, weight, knots=knots, t_max=t_max)


def test_ecf_sums_contract(device):
    op = _import_op_module()
    x, directions = random_case((2,), 50, 9, 37, device=device)
    sums, projection = op.ecf_sums_triton(x, directions, 17, 3.0)
    assert sums.shape == (2, 2, 37, 17) and sums.dtype == torch.float32
    assert projection.shape == (0,)
    # Knot 0 (t = 0): cos = 1 and sin = 0 for every sample, exactly.
    assert torch.equal(sums[:, 0, :, 0], torch.full_like(sums[:, 0, :, 0], 50.0))
    assert torch.equal(sums[:, 1, :, 0], torch.zeros_like(sums[:, 1, :, 0]))
    t = torch.linspace(0, 3.0, 17, dtype=torch.float64, device=device)
    angles = (x.double() @ directions.double()).unsqueeze(-1) * t
    expected = torch.stack((angles.cos().sum(dim=1), angles.sin().sum(dim=1)), dim=1)
    assert_relative_close("sums", sums, expected, 1e-6)


def test_strided_inputs(device):
    x, directions = random_case((2,), 45, 20, 36, device=device)
    x_strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, N, D] with D-major storage
    directions_strided = directions.t().contiguous().t()
    assert not x_strided.is_contiguous() and not directions_strided.is_contiguous()
    weight = torch.randn(2, 36, generator=torch.Generator().manual_seed(1)).to(device)
    triton, truth, _ = _run_all(x_strided, directions_strided, weight, 17, 3.0)
    for name, actual, exact in zip(("value", "grad_x", "grad_directions"), triton, truth):
        assert_relative_close(name, actual, exact, 1e-5)


def test_batch_beyond_grid_limit(device, monkeypatch):
    # CUDA caps grid axis 2, which carries the batch, at 65535 programs; a larger batch
    # is launched in chunks. A lowered cap makes 5 batch indices take 2 launches for
    # the forward and dx kernels and 3 for dA (2 row splits per index): the results
    # must be those of a single launch, bit for bit.
    op = _import_op_module()
    x, directions = random_case((5,), 40, 8, 16, device=device)
    weight = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(device)

    def run():
        return values_and_grads(lambda a, b: sigreg(a, b, backend="triton", reduction="none"), x, directions, weight)

    single = run()
    monkeypatch.setattr(op, "MAX_GRID_Z", 4)
    assert op._batch_chunks(5) == [(0, 4), (4, 1)] and op._batch_chunks(5, 2) == [(0, 2), (2, 2), (4, 1)]
    for chunked, expected in zip(run(), single):
        assert torch.equal(chunked, expected)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic-algorithms"])
def test_bit_identical_reruns(device, deterministic):
    x, directions = random_case((2,), 100, 40, 40, device=device)
    weight = torch.randn(2, 40, generator=torch.Generator().manual_seed(1)).to(device)

    def run():
        return values_and_grads(lambda a, b: sigreg(a, b, backend="triton", reduction="none"), x, directions, weight)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for first, second in zip(run(), run()):
            assert torch.equal(first, second)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_opcheck(device):
    op = _import_op_module()
    x, directions = random_case((2,), 40, 8, 16, device=device)
    for requires_grad in (False, True):
        args = (x.clone().requires_grad_(requires_grad), directions.clone().requires_grad_(requires_grad), 17, 3.0)
        torch.library.opcheck(op.ecf_sums_triton, args)
    grad_sums = torch.randn(2, 2, 16, 17, device=device)
    for need_grad_directions in (False, True):
        args = (grad_sums, x, directions, x.new_empty((0,)), 17, 3.0, need_grad_directions)
        torch.library.opcheck(op.ecf_sums_triton_backward, args)


def test_compile_fullgraph(device):
    x, directions = random_case((2,), 40, 8, 16, device=device)

    def loss_fn(x, directions):
        return sigreg(x, directions, backend="triton", reduction="sum") * 2

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager = values_and_grads(loss_fn, x, directions, torch.ones((), device=device))
    traced = values_and_grads(compiled, x, directions, torch.ones((), device=device))
    for name, actual, expected in zip(("value", "grad_x", "grad_directions"), traced, eager):
        assert_relative_close(name, actual, expected, 1e-6)


def test_dot_precision_follows_torch(device):
    op = _import_op_module()
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert op.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert op.dot_precision(torch.float32) == "tf32"
        assert op.dot_precision(torch.bfloat16) == "tf32"  # ignored for half inputs
    finally:
        torch.set_float32_matmul_precision(previous)


def test_rejects_float64_and_mixed_dtypes(device):
    op = _import_op_module()
    x, directions = random_case((), 8, 4, 3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        op.ecf_sums_triton(x, directions, 17, 3.0)
    with pytest.raises(RuntimeError, match="float64"):  # backends.py turns it away first
        sigreg(x, directions, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        op.ecf_sums_triton(x.float(), directions.half(), 17, 3.0)


@pytest.mark.parametrize("triton_version, numpy_version, fails", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.10.1", "2.5.0rc1", False),
    ("3.6rc1", "2.4.0", True),
])
def test_interpreter_numpy_incompatibility_is_named(device, monkeypatch, triton_version, numpy_version, fails):
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
            if device == "cpu":
                x, directions = random_case((1,), 8, 4, 3)
                with pytest.raises(RuntimeError, match="numpy<2.4"):
                    op.ecf_sums_triton(x, directions, 17, 3.0)
        else:
            assert problem is None
    finally:
        op._interpreter_numpy_problem.cache_clear()


# The interpreter checks no compile-time rules (tl.dot's minimum sizes, constexpr
# branches, layouts) nor the shared memory a config needs: compile each kernel in
# every GPU config for sm_90 in a clean process, no GPU needed, and check that it
# fits in the shared memory an H100 block may have (227 KiB).
_COMPILE_FOR_H100 = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sigreg_kernels import triton_kernels as k, triton_op as op

    kernels = [(k._sigreg_fwd_kernel, config, {"KNOTS_PAD": 32}) for config in op._GPU_FWD_CONFIGS]
    kernels += [(k._sigreg_bwd_dx_kernel, config, {"BLOCK_DX": 256}) for config in op._GPU_BWD_CONFIGS]
    kernels += [(k._sigreg_bwd_da_kernel, config, {"BLOCK_DA": 128}) for config in op._GPU_BWD_CONFIGS]
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        for fn, config, extra in kernels:
            constants = {"KNOTS": 17, "PRECISION": precision, "DOT_UPCAST": False, **extra, **config.kwargs}
            signature = {}
            for name in fn.arg_names:
                if name in constants:
                    signature[name] = "constexpr"
                elif name in ("x_ptr", "a_ptr", "dx_ptr"):
                    signature[name] = "*" + dtype
                else:
                    signature[name] = "*fp32" if name.endswith("_ptr") else "fp32" if name == "delta" else "i32"
            source = ASTSource(fn, signature, {(fn.arg_names.index(n),): v for n, v in constants.items()})
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            assert compiled.metadata.shared <= 227 * 1024, (fn.__name__, config, compiled.metadata.shared)
""")


def test_kernels_compile_for_h100():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], check=False, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("no ptxas to compile with")
    assert result.returncode == 0, result.stderr[-3000:]


# ---- GPU only: sizes where the autotuned blocks, the row splits and the D chunks all matter.

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_large(device, dtype, tol):
    if device != "cuda":
        pytest.skip("GPU-sized case")
    x, directions = random_case((2,), 2048, 384, 300, dtype=dtype, device=device)
    weight = torch.randn(2, 300, generator=torch.Generator().manual_seed(1)).to(device)
    triton, truth, _ = _run_all(x, directions, weight, 17, 3.0)
    for name, actual, exact in zip(("value", "grad_x", "grad_directions"), triton, truth):
        assert_relative_close(name, actual, exact, tol)
    again, _, _ = _run_all(x, directions, weight, 17, 3.0)
    for first, second in zip(triton, again):
        assert torch.equal(first, second)


def test_cuda_autocast_bf16(device):
    if device != "cuda":
        pytest.skip("autocast to bf16 on the GPU")
    x, directions = random_case((2,), 512, 96, 128, device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        stat, grad_x, _ = values_and_grads(lambda a, b: sigreg(a, b, backend="triton", reduction="none"),
                                            x, directions, torch.ones(2, 128, device=device))
    truth = values_and_grads(lambda a, b: oracle(a.bfloat16(), b.bfloat16(), reduction="none"),
                              x, directions, torch.ones(2, 128, device=device))
    assert grad_x.dtype == torch.float32  # the gradient returns to the input's dtype
    assert_relative_close("value", stat, truth[0], 2e-2)
    assert_relative_close("grad_x", grad_x, truth[1], 2e-2)


def test_cuda_tf32_when_allowed(device):
    if device != "cuda":
        pytest.skip("TF32 exists on the GPU only")
    x, directions = random_case((), 1024, 256, 256, device=device)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        stat = sigreg(x, directions, backend="triton", reduction="none")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_relative_close("value", stat, oracle(x, directions, reduction="none"), 1e-2)
