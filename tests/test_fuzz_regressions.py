"""Cases the differential fuzzer (``fuzz_backends.py``) found, kept as fixed tests.

Each is replayed exactly as the fuzzer printed it (``--case``), in a subprocess
(the Triton interpreter is chosen at import), against the float64 oracle.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sigreg_kernels import sigreg, sigreg_reference

SCRIPT = Path(__file__).resolve().parent / "fuzz_backends.py"

# clip_value must not hide a NaN statistic (SPEC §2: statistics *below* it are set to 0;
# NaN is not below anything, and the reference, the published library and the cpu
# backend keep it). Found with a NaN or Inf in x or in the directions and clip_value set:
# the Triton and CUDA statistic kernels (and primitives.statistic, their contract) keep
# a slice only where `stat >= clip_value`, so a NaN statistic became 0 and a diverging
# run's loss looked finite.
NAN_STATISTIC_CLIPPED = [
    ("triton", '{"seed":1565525984,"batch":[3,1],"n":55,"d":24,"k":4,"knots":17,"t_max":3.0,"scale":0.375,'
               '"dist":"normal","dtype":"float16","a_dtype":"float16","unit_columns":true,"x_layout":"expanded",'
               '"a_layout":"expanded","grad":"x","reduction":"none","clip":0.142,"nonfinite":{"in":"x",'
               '"value":"nan","rows":[0.6444579809365979,0.050487222257686315,0.018342026036296866]},'
               '"tensor_cores":true}'),
    ("cuda-emulated", '{"seed":24046662,"batch":[2],"n":7,"d":118,"k":6,"knots":17,"t_max":3.0,"scale":1150.0,'
                      '"dist":"normal","dtype":"bfloat16","a_dtype":"bfloat16","unit_columns":true,'
                      '"x_layout":"sliced","a_layout":"sliced","grad":"x","reduction":"none","clip":0.213,'
                      '"nonfinite":{"in":"directions","value":"nan","rows":[0.8857412148890643,0.5899183854516599]},'
                      '"tensor_cores":true}'),
]

CASES = [pytest.param(backend, case, id=f"nan-statistic-clipped-{backend}")
         for backend, case in NAN_STATISTIC_CLIPPED]


@pytest.mark.parametrize("backend, case", CASES)
def test_fuzzer_case(backend, case):
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cuda-emulated" and shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the emulated CUDA kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backends", backend, "--case", case],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith(f"{backend}: ok")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_statistic_survives_clip_value(backend):
    """The same property, readable: a NaN sample makes its batch index's statistics NaN, clip_value or not."""
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    x[0, 3, 0] = float("nan")
    directions = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    stat = sigreg(x, directions, reduction="none", clip_value=0.1, backend=backend)
    assert stat[0].isnan().all() and stat[1].isfinite().all()
    torch.testing.assert_close(stat, sigreg_reference(x, directions, reduction="none", clip_value=0.1),
                               equal_nan=True)
