"""The differential fuzzer (``fuzz_backends.py``): a short run per backend, and proof that it catches bugs.

The runs use fixed seeds, so CI is repeatable; other seeds and longer runs are
``python tests/fuzz_backends.py --seed S --examples N`` or ``--soak MINUTES``.
Each run is a subprocess: the Triton interpreter must be chosen before
``sigreg_kernels.triton_op`` is first imported, and the CLI is what users run.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fuzz_backends
from fuzz_backends import Backend, Case, public_api, run_case

SCRIPT = Path(__file__).resolve().parent / "fuzz_backends.py"

# Examples per backend in CI: about 100 s in all on 2 cores (one process at a time). Each example is
# one case, shrunk to the backend's budget; the float64 oracle is much of the time.
CI_RUNS = {"cpu": 120, "triton": 40, "cuda-emulated": 60}


def run_fuzzer(*args, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the fuzzer decides (interpreter without a GPU)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


@pytest.mark.parametrize("backend", sorted(CI_RUNS))
def test_fuzz_backend_against_the_oracle(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "cuda-emulated" and shutil.which("g++") is None:
        pytest.skip("g++ is needed to build the emulated CUDA kernels")
    proc = run_fuzzer("--backends", backend, "--examples", CI_RUNS[backend], "--seed", 2026)
    assert proc.returncode == 0, f"failures, each with its reproducer:\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
    summary = proc.stdout.rstrip().splitlines()
    assert summary[-1] == "0 failures" and f"{CI_RUNS[backend]} examples, seed 2026" in proc.stdout


def test_replaying_a_printed_case():
    case = Case(seed=3, batch=[2], n=40, d=9, k=13, x_layout="transposed", reduction="none")
    proc = run_fuzzer("--backends", "cpu", "--case", case.to_json(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("cpu: ok")


# ----------------------------------------------------------------------------- the fuzzer catches bugs

CPU = fuzz_backends.backend_table()["cpu"]


def mutant(wrong):
    """A backend that computes ``sigreg`` on the cpu backend with ``wrong`` applied to its call."""
    correct = public_api("cpu")

    def fn(case, x, a, weight, clip_value):
        return correct(case, *wrong(x, a, clip_value), weight, clip_value)
    return Backend("mutant", fn, CPU.budget, CPU.dtypes)


def as_contiguous_strides(t):
    """Reads the storage as if the tensor were contiguous: a kernel that ignores strides."""
    return torch.as_strided(t, t.shape, torch.empty(t.shape).stride(), t.storage_offset())


BASE = Case(seed=11, batch=[2], n=60, d=12, k=20, reduction="none", grad="both")
MUTANTS = [
    # (what is wrong, the mutant's call, the case it shows on, what the fuzzer reports)
    ("value off by 3e-5", lambda x, a, c: (x * (1 + 3e-5), a), BASE, "value: relative error"),
    ("last sample dropped", lambda x, a, c: (x[..., :-1, :], a), BASE, "relative error"),
    ("strides ignored", lambda x, a, c: (as_contiguous_strides(x), a),
     dataclasses.replace(BASE, x_layout="transposed"), "relative error"),
    ("NaN scrubbed", lambda x, a, c: (x.nan_to_num(0.0, 0.0, 0.0), a),
     dataclasses.replace(BASE, nonfinite={"in": "x", "value": "nan", "rows": [0.3]}), "non-finite entries"),
    ("no gradient to the directions", lambda x, a, c: (x, a.detach()), BASE, "grad_directions: no gradient"),
    ("bf16 projection rounded to bf16", lambda x, a, c: (x @ a, None),
     dataclasses.replace(BASE, dtype="bfloat16", a_dtype="bfloat16"), "value: relative error"),
]


@pytest.mark.parametrize("name, wrong, case, report", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_a_wrong_kernel_is_caught(name, wrong, case, report):
    assert not run_case(case, CPU).problems, "the correct kernel must pass this case"
    result = run_case(case, mutant(wrong))
    assert any(report in problem for problem in result.problems), result.problems
    assert result.reproducer().startswith("python tests/fuzz_backends.py --backends mutant --case '{")
    assert Case.from_json(result.reproducer().split("--case ")[1].strip("'")) == case


def test_ignoring_clip_value_is_caught():
    if not fuzz_backends.api_features()["clip_value"]:
        pytest.skip("sigreg has no clip_value here")
    case = dataclasses.replace(BASE, clip=0.5)
    assert not run_case(case, CPU).problems
    ignores_clip = Backend("mutant", lambda case, x, a, w, c: public_api("cpu")(case, x, a, w, None), CPU.budget)
    assert any("relative error" in p for p in run_case(case, ignores_clip).problems)


# ----------------------------------------------------------------------------- the oracle and the cases


def test_chunked_oracle_is_the_reference(monkeypatch):
    """Slice chunks (forced small here) give the reference's own statistics, clipping included."""
    from sigreg_kernels import sigreg_reference

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 7, dtype=torch.float64, generator=generator)
    a = torch.randn(7, 11, dtype=torch.float64, generator=generator)
    monkeypatch.setattr(fuzz_backends, "ORACLE_CHUNK", 2 * 30 * 17 * 3)  # 3 slices per chunk
    for directions in (a, None):
        # A threshold halfway between two statistics: the last bit of a sum, which the
        # chunks may round differently, cannot flip a slice across it.
        stats = sigreg_reference(x, directions, reduction="none").flatten().sort().values
        middle = stats.numel() // 2
        clip = ((stats[middle - 1] + stats[middle]) / 2).item()
        whole = sigreg_reference(x, directions, reduction="none", clip_value=clip)
        chunked = fuzz_backends.reference_stats(x, directions, 17, 3.0, torch.float64, clip_value=clip)
        torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=0)
        assert 0 < (whole == 0).sum() < whole.numel()  # some slices clipped, not all


def test_clip_value_is_placed_away_from_every_statistic():
    stats = torch.tensor([1.0, 1.0001, 2.0, 2.0002, 5.0])
    # Quantile 0.5 is at 2.0: the nearest gap wider than 2 * margin is (1.0001, 2.0).
    assert fuzz_backends.resolve_clip(dataclasses.replace(BASE, clip=0.5), stats, margin=0.01) == pytest.approx(1.50005)
    assert fuzz_backends.resolve_clip(dataclasses.replace(BASE, clip=0.9), stats, margin=0.01) == pytest.approx(3.5001)
    # No gap is wide enough: below them all (nothing clipped) or above them all.
    assert fuzz_backends.resolve_clip(dataclasses.replace(BASE, clip=0.2), stats, margin=2.0) < 1.0 - 2.0
    assert fuzz_backends.resolve_clip(dataclasses.replace(BASE, clip=0.8), stats, margin=2.0) > 5.0 + 2.0


def test_cases_are_shrunk_to_the_budget_and_reproducible():
    import random

    features = {"clip_value": True, "no_directions": True}
    drawn = [fuzz_backends.draw_case(random.Random(f"5:{i}"), features) for i in range(200)]
    assert drawn == [fuzz_backends.draw_case(random.Random(f"5:{i}"), features) for i in range(200)]
    assert {c.dtype for c in drawn} == {"float32", "bfloat16", "float16", "float64"}
    assert {c.x_layout for c in drawn} == set(fuzz_backends.LAYOUTS)
    assert {c.a_layout for c in drawn} == {*fuzz_backends.LAYOUTS, "none"}
    assert max(c.n for c in drawn) > 2000 and max(c.k for c in drawn) > 500 and min(c.n for c in drawn) == 1
    assert any(c.nonfinite for c in drawn) and any(c.clip is not None for c in drawn)
    for c in drawn:
        small = fuzz_backends.shrink(c, 4e4)
        assert fuzz_backends.cost(small) <= 4e4
        assert (small.dtype, small.x_layout, small.nonfinite) == (c.dtype, c.x_layout, c.nonfinite)


# ----------------------------------------------------------------------------- sanitizers


def _sanitizer_runtime_missing():
    if shutil.which("g++") is None:
        return "g++ is needed to build the sanitized extension"
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return None if os.path.isabs(libasan) and os.path.exists(libasan) else "g++ has no libasan (AddressSanitizer)"


@pytest.mark.skipif(os.environ.get("SIGREG_SKIP_ASAN") == "1", reason="SIGREG_SKIP_ASAN=1")
def test_cpu_kernel_under_address_and_undefined_behaviour_sanitizers():
    """``bash tests/asan_cpu.sh``: the CPU kernels built with ASan + UBSan, the CPU tests and a short fuzz.

    About 3 minutes on 2 cores, most of it the build (``SIGREG_SKIP_ASAN=1`` skips it
    for quick local runs; CI runs it). It found the polynomial sin/cos converting the
    quadrant of a NaN or Inf angle to int (undefined behaviour).
    """
    missing = _sanitizer_runtime_missing()
    if missing:
        pytest.skip(missing)
    proc = subprocess.run(["bash", str(SCRIPT.parent / "asan_cpu.sh")], capture_output=True, text=True,
                          timeout=1800, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "asan_cpu: no sanitizer report" in proc.stdout
