"""The GPU side of the Triton backend, run on CPU under the interpreter.

On a GPU, ``sigreg_kernels.gpu.triton.ops`` registers its ops with ``torch.library.triton_op``
and plans for the device's SMs under the waves criterion; under ``TRITON_INTERPRET=1``
it uses opaque ``custom_op`` registrations and each kernel's first candidate, which
test_triton.py tests. These tests run the GPU's choices instead, each in a fresh process
(both are made when the module is first imported):
- the triton_op registration (``SIGREG_TRITON_REGISTRATION=triton_op``): every op, eager
  (opcheck and torch.compile trace the op with fake tensors, which the interpreted
  kernels cannot take), and the kernels triton_op found for each op;
- every candidate config of the plans, alone, in the mode it is planned for (resident
  or streamed directions, several D chunks, row splits, partial tiles).
Compiling them for sm_90 is test_triton_plan.py's.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

TESTS_DIR = Path(__file__).resolve().parent

_PRELUDE = """
    import torch
    from helpers import assert_relative_close, random_case
    from sigreg_kernels.gpu import contract
    from sigreg_kernels.gpu.triton import kernels
    from sigreg_kernels.gpu.triton import ops as op
    from sigreg_kernels.gpu.triton import plan

    assert op.INTERPRET, op.INTERPRET


    def check(batch, samples, dim, slices, knots=17, dtype=torch.float32, projected=False, tol=2e-5):
        x, directions = random_case((batch,), samples, dim, slices, dtype=dtype)
        directions = None if projected else directions
        exact = (x.double(), None if projected else directions.double())
        partials = op.ecf_partials(x, directions, knots, 3.0)
        expected = contract.ecf_partials(*exact, knots, 3.0)
        assert_relative_close("sums", partials.sum(1), expected.sum(1), tol)
        stat, coef, loss = op.statistic(partials, samples, knots, 3.0, "mean", None, 2.0)
        expected_stat, _, expected_loss = contract.statistic(partials.double(), samples, knots, 3.0, "mean", None,
                                                               2.0)
        assert_relative_close("stat", stat, expected_stat, 1e-5)
        assert_relative_close("loss", loss, expected_loss, 1e-5)
        scale = torch.randn(batch, partials.shape[3], generator=torch.Generator().manual_seed(3))
        grad = op.slice_gradient(coef, scale, x, directions, knots, 3.0)
        expected = contract.slice_gradient(coef.double(), scale.double(), *exact, knots, 3.0)
        assert_relative_close("G", grad, expected, tol if dtype == torch.float32 else 2e-2)
        return partials
"""

_KERNELS_FOUND = """
    # wrap_triton must find every kernel the launchers can run: AOTAutograd's cache key
    # hashes their source (a private registry: checked where it exists). Compiled kernels
    # only: torch does not recognize the interpreter's.
    import torch
    from sigreg_kernels.gpu.triton import kernels
    from sigreg_kernels.gpu.triton import ops as op

    assert op.REGISTRATION == "triton_op" and not op.INTERPRET, (op.REGISTRATION, op.INTERPRET)
    registry = getattr(torch._library.triton, "get_triton_kernels_for_op", None)
    if registry is not None:
        expected = {
            "sigreg::triton_ecf_partials": {kernels.ecf_partials_kernel, kernels.ecf_partials_projected_kernel},
            "sigreg::triton_statistic": {kernels.statistic_kernel},
            "sigreg::triton_slice_gradient": {kernels.slice_gradient_kernel,
                                              kernels.slice_gradient_projected_kernel},
            "sigreg::triton_slice_gradient_": {kernels.slice_gradient_projected_kernel},
        }
        for name, found in expected.items():
            assert {id(k) for k in registry(name)} == {id(k) for k in found}, (name, registry(name))
"""

_REGISTRATION = """
    assert op.REGISTRATION == "triton_op", op.REGISTRATION
    check(2, 70, 20, 70)
    registered = op.triton_ecf_partials, op.triton_statistic, op.triton_slice_gradient
    op.triton_ecf_partials = op.triton_statistic = op.triton_slice_gradient = None  # must not be called
    with torch.no_grad():  # eager calls that launch without the op, wrap_triton switched off
        check(2, 70, 20, 70)
    op.triton_ecf_partials, op.triton_statistic, op.triton_slice_gradient = registered
    check(2, 40, 24, 33, dtype=torch.bfloat16, tol=1e-4)
    check(3, 33, 5, 5, knots=5, projected=True)
    x, directions = random_case((2,), 40, 8, 20)
    projection = x @ directions
    _, coef, _ = contract.statistic(contract.ecf_partials(projection.double(), None, 17, 3.0), 40, 17, 3.0,
                                      "sum", None, 1.0)
    scale = torch.ones(1, 1).expand(2, 20)
    expected = contract.slice_gradient(coef, scale.double(), projection.double(), None, 17, 3.0)
    op.slice_gradient_(projection, coef.float(), scale, 17, 3.0)
    assert_relative_close("G in place", projection, expected, 2e-5)
"""

_EACH_CONFIG = """
    # Each candidate alone, at a shape that takes it through its paths: streamed
    # directions loop over several D chunks (D = 70), resident ones hold D = 70 in a
    # 128-wide tile; rows span several tiles and splits, the last partial; K = 150 spans
    # a partial slice block.
    names = ("ECF_CANDIDATES", "GRAD_CANDIDATES", "ECF_PROJECTED_CANDIDATES", "GRAD_PROJECTED_CANDIDATES")
    lists = {name: getattr(plan, name) for name in names}
    for i in range(max(len(candidates) for candidates in lists.values())):
        chosen = {name: candidates[min(i, len(candidates) - 1)] for name, candidates in lists.items()}
        for name, candidate in chosen.items():
            setattr(plan, name, (candidate,))
        op._cached_plan.cache_clear()  # the plans made with the previous candidates
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 1e-4)):
            check(1, 75, 70, 150, dtype=dtype, tol=tol)
            ecf = op._ecf_plan(torch.empty(1, 75, 70, dtype=dtype), torch.empty(70, 150, dtype=dtype), 17)
            grad = op._slice_gradient_plan(torch.empty(1, 75, 70, dtype=dtype), torch.empty(70, 150, dtype=dtype), 17)
            for kernel_plan, name in ((ecf, "ECF_CANDIDATES"), (grad, "GRAD_CANDIDATES")):
                config, mode = chosen[name]
                assert (kernel_plan.tile["config"], kernel_plan.tile["mode"]) == (config.name, mode), kernel_plan
        if i < max(len(lists["ECF_PROJECTED_CANDIDATES"]), len(lists["GRAD_PROJECTED_CANDIDATES"])):
            check(2, 45, 70, 70, projected=True)
"""


def _run_interpreted(body: str, registration: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "SIGREG_TRITON_REGISTRATION": registration,
           "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS_DIR), os.environ.get("PYTHONPATH"))))}
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def test_triton_op_registration_eager():
    _run_interpreted(_REGISTRATION, "triton_op")


def test_triton_op_finds_its_kernels():
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRITON_INTERPRET", "SIGREG_TRITON_REGISTRATION")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_KERNELS_FOUND)], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def test_each_gpu_config_alone():
    _run_interpreted(_EACH_CONFIG, "custom_op")


def test_rejects_unknown_registration():
    env = {**os.environ, "SIGREG_TRITON_REGISTRATION": "triton-op"}
    result = subprocess.run([sys.executable, "-c", "import sigreg_kernels.gpu.triton.ops"], env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "SIGREG_TRITON_REGISTRATION must be" in result.stderr
