"""The ``cuda`` backend's registered ops (``torch.ops.sigreg.*``) without a GPU.

For the duration of this module each GPU kernel op gets a CPU kernel that runs the
CUDA kernels' device code in the host emulation (``emulated_cuda.py``), planned
for 132 SMs as the ops' fake kernels assume. What runs is then the real path of
``sigreg(..., backend="cuda")``: ``gpu/fused.py`` -> ``gpu/cuda/ops.py`` -> the schemas of
``csrc/sigreg.cpp`` (optional and mutable ``arrivals`` included) -> a device
kernel, so this checks what the schemas and fake kernels promise: the fused
path's op count, ``opcheck`` and ``torch.compile``. The ATen launcher itself
(``csrc/cuda/sigreg_cuda.cpp``) needs a GPU: ``test_cuda.py``.
"""

import shutil

import pytest
import torch
from emulated_cuda import EmulatedKernels, build
from helpers import assert_relative_close, loss_and_grads, random_case
from op_counter import OpCounter

from sigreg_kernels.gpu import fused

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the emulated kernels")

extension = pytest.importorskip("sigreg_kernels.extension", reason="the compiled extension defines the ops")
SMS = extension._num_sms(torch.device("cpu"))  # what the fake kernels plan with


def tensor_cores(dtype: torch.dtype) -> bool:
    """The launcher's product mode: tensor cores unless float32 at "highest" precision."""
    return dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest"


@pytest.fixture(scope="module", autouse=True)
def emulated_ops(tmp_path_factory):
    kernels = EmulatedKernels(build(tmp_path_factory.mktemp("cuda_host_emulation")), num_sms=SMS)
    library = torch.library.Library("sigreg", "IMPL")

    def ecf_partials(x, directions, knots, t_max, arrivals=None, weights=None):
        directions = None if directions is None else directions.contiguous()
        return kernels.ecf_partials(x.contiguous(), directions, knots, t_max, arrivals, weights,
                                    tensor_cores=tensor_cores(x.dtype)).clone()

    def statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None, moments=None,
                  unbiased=False):
        outputs = kernels.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals,
                                    moments, unbiased)
        return tuple(t.clone() for t in outputs)

    def slice_gradient(coef, scale, x, directions, knots, t_max, weights=None):
        directions = None if directions is None else directions.contiguous()
        return kernels.slice_gradient(coef, scale, x.contiguous(), directions, knots, t_max, weights,
                                      tensor_cores=tensor_cores(x.dtype)).clone()

    def slice_gradient_(projection, coef, scale, knots, t_max, weights=None):
        kernels.slice_gradient_(projection, coef, scale, knots, t_max, weights)

    for name, kernel in [("ecf_partials", ecf_partials), ("statistic", statistic),
                         ("slice_gradient", slice_gradient), ("slice_gradient_", slice_gradient_)]:
        library.impl(name, kernel, "CPU")
    yield kernels
    library._destroy()  # the ops have no CPU kernel again for the tests that follow


@pytest.fixture
def precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def cuda_path(x, directions, reduction="mean", clip_value=0.01):
    return fused.fused_sigreg("cuda", x, directions, 17, 3.0, reduction, clip_value)


def primitives_path(x, directions, reduction="mean", clip_value=0.01):
    return fused.fused_sigreg("primitives", x.double(), None if directions is None else directions.double(), 17,
                              3.0, reduction, clip_value)


@pytest.mark.parametrize("dtype, matmul", [(torch.bfloat16, "highest"), (torch.float32, "highest"),
                                           (torch.float32, "high")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_path_dispatches_few_ops(dtype, matmul, reduction, precision):
    """At most 3 device ops forward and 4 backward through the registered ops, each kernel op once."""
    precision(matmul)
    x, directions = random_case((2,), 70, 24, 40, dtype=dtype)
    inputs = [x.clone().requires_grad_(), directions.clone().requires_grad_()]
    with OpCounter() as forward:
        loss = cuda_path(*inputs, reduction)
    upstream = torch.ones_like(loss)
    with OpCounter() as backward:
        grads = torch.autograd.grad(loss, inputs, upstream)
    assert forward.total <= 3 and backward.total <= 4, (forward.ops, backward.ops)
    assert forward.ops["sigreg::ecf_partials"] == forward.ops["sigreg::statistic"] == 1, forward.ops
    sgemm_route = dtype == torch.float32 and matmul == "highest"
    assert forward.ops["aten::mm"] == int(sgemm_route), forward.ops
    gradient_op = "sigreg::slice_gradient_" if sgemm_route else "sigreg::slice_gradient"
    assert backward.ops[gradient_op] == 1, backward.ops
    expected = primitives_path(*inputs, reduction)
    assert_relative_close("loss", loss, expected, 1e-4 if sgemm_route else 2e-3)  # else 16-bit or TF32 products
    assert all(g.isfinite().all() for g in grads)


def test_the_counter_is_zeroed_by_ecf_partials_and_left_at_zero(emulated_ops):
    x, directions = random_case((2,), 300, 16, 200)
    arrivals = torch.full((1,), 12345, dtype=torch.int32)
    partials = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0, arrivals)
    assert arrivals.item() == 0
    stat, _, loss = torch.ops.sigreg.statistic(partials, 300, 17, 3.0, "mean", None, 1.0, arrivals)
    assert arrivals.item() == 0
    assert loss.item() == (stat.double().sum() / stat.numel()).float().item()
    assert emulated_ops.plan_statistic(2, 200, 17)["blocks"] > 1  # a reduction across blocks


def test_opcheck():
    x, directions = random_case((2,), 37, 19, 65)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    partials = torch.ops.sigreg.ecf_partials(x, directions, 17, 3.0)
    _, coef, _ = torch.ops.sigreg.statistic(partials, 37, 17, 3.0, "sum", 0.1, 1.0)
    scale = torch.randn(65, 2).t()
    arrivals = torch.zeros(1, dtype=torch.int32)
    weights = torch.rand(2, 37)
    weights[:, ::3] = 0
    moments = torch.stack((weights.sum(1), weights.square().sum(1)), dim=1)
    samples = [
        (torch.ops.sigreg.ecf_partials.default, (x, directions, 17, 3.0)),
        (torch.ops.sigreg.ecf_partials.default, (x_strided, None, 5, 2.0)),
        (torch.ops.sigreg.ecf_partials.default, (x, directions, 17, 3.0, arrivals)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "mean", None, 2.0)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "none", 0.5, 1.0, arrivals)),
        (torch.ops.sigreg.slice_gradient.default, (coef, scale, x_strided, directions, 17, 3.0)),
        (torch.ops.sigreg.slice_gradient_.default, ((x @ directions).contiguous(), coef, scale, 17, 3.0)),
        (torch.ops.sigreg.ecf_partials.default, (x, directions, 17, 3.0, arrivals, weights)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "sum", None, 1.0, arrivals, moments)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "mean", 0.1, 1.0, arrivals, moments, True)),
        (torch.ops.sigreg.statistic.default, (partials, 37, 17, 3.0, "none", None, 1.0, None, None, True)),
        (torch.ops.sigreg.slice_gradient.default, (coef, scale, x_strided, directions, 17, 3.0, weights)),
        (torch.ops.sigreg.slice_gradient_.default, ((x @ directions).contiguous(), coef, scale, 17, 3.0, weights)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("with_directions", [True, False])
def test_torch_compile_fullgraph_matches_eager(with_directions):
    """The mutable optional ``arrivals`` through functionalization: the same loss and gradients."""
    x, directions = random_case((2,), 50, 12, 30, dtype=torch.bfloat16)
    directions = directions if with_directions else None

    def sigreg_cuda(x, directions=None):
        return cuda_path(x, directions)

    eager = loss_and_grads(sigreg_cuda, x, directions)
    compiled = loss_and_grads(torch.compile(sigreg_cuda, fullgraph=True), x, directions)
    for actual, expected in zip(compiled, eager):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # the same kernels, in the same order
