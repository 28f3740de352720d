"""The GPU side of the Triton backend, run on CPU under the interpreter, in eager mode.

On a GPU, ``sigreg_kernels.triton_op`` registers its ops with ``torch.library.triton_op``
and autotunes over several block configs; under ``TRITON_INTERPRET=1`` it uses an
opaque ``custom_op`` and one 32-wide config, which test_triton.py tests. These tests
run the GPU's choices instead, each in a fresh process, since both are made when the
module is first imported:
- the triton_op registration (``SIGREG_TRITON_REGISTRATION=triton_op``): values and
  gradients through autograd. Eager only: opcheck and torch.compile trace the op
  with fake tensors, which the interpreted kernels cannot take.
- every GPU block config, one at a time, with the GPU's row quantum and D chunks
  (choosing among several configs needs a GPU to time them).
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
    import triton
    from helpers import assert_matches_oracle, random_case
    from sigreg_kernels import sigreg, triton_kernels as kernels, triton_op as op

    assert op.INTERPRET and op.REGISTRATION == "triton_op", (op.INTERPRET, op.REGISTRATION)


    def check(batch_shape, samples, dim, slices, dtype=torch.float32):
        x, directions = random_case(batch_shape, samples, dim, slices, dtype=dtype)
        weight = torch.randn(*batch_shape, slices, generator=torch.Generator().manual_seed(1))
        assert_matches_oracle(lambda a, b, **kwargs: sigreg(a, b, backend="triton", **kwargs),
                              x, directions, weight, knots=17, t_max=3.0)
"""

_REGISTRATION = """
    # wrap_triton must find every kernel the launchers can run: AOTAutograd's cache
    # key hashes their source (a private registry: checked where it exists).
    registry = getattr(torch._library.triton, "get_triton_kernels_for_op", None)
    if registry is not None:
        found = {id(k) for k in registry("sigreg::ecf_sums_triton")}
        assert found == {id(op._fwd_tuned), id(op._fwd_fixed)}, found
        found = {id(k) for k in registry("sigreg::ecf_sums_triton_backward")}
        assert found == {id(k) for k in (op._bwd_dx_tuned, op._bwd_dx_fixed, op._bwd_da_tuned,
                                         op._bwd_da_fixed)}, found

    check((), 150, 70, 70)  # several blocks of N, D and K; 3 row splits
    check((2, 3), 33, 5, 17)  # batch dims
    check((2,), 40, 24, 33, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)  # the single-config kernels
    check((), 70, 40, 40)
"""

_GPU_CONFIGS = """
    def run_alone(name, kernel, config):
        setattr(op, name, triton.autotune(configs=[config], key=op._KEY)(kernel))


    op.ROW_QUANTUM, op.MAX_BLOCK_DX, op.MAX_BLOCK_DA = op._GPU_BLOCK_LIMITS
    for i, fwd_config in enumerate(op._GPU_FWD_CONFIGS):
        bwd_config = op._GPU_BWD_CONFIGS[min(i, len(op._GPU_BWD_CONFIGS) - 1)]
        run_alone("_fwd_tuned", kernels._sigreg_fwd_kernel, fwd_config)
        run_alone("_bwd_dx_tuned", kernels._sigreg_bwd_dx_kernel, bwd_config)
        run_alone("_bwd_da_tuned", kernels._sigreg_bwd_da_kernel, bwd_config)
        # 3 splits of 128 rows, the last one partial; K spans partial blocks of every width.
        check((), 300, 70, 70)
"""


def _run_interpreted(body: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "SIGREG_TRITON_REGISTRATION": "triton_op",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(TESTS_DIR), os.environ.get("PYTHONPATH"))))}
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def test_triton_op_registration_eager():
    _run_interpreted(_REGISTRATION)


def test_each_gpu_config_alone():
    _run_interpreted(_GPU_CONFIGS)


def test_rejects_unknown_registration():
    env = {**os.environ, "SIGREG_TRITON_REGISTRATION": "triton-op"}
    result = subprocess.run([sys.executable, "-c", "import sigreg_kernels.triton_op"], env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "SIGREG_TRITON_REGISTRATION must be" in result.stderr
