"""The differential fuzzer (``fuzz_backends.py``): a short run per backend, and proof that it catches bugs.

The runs use fixed seeds, so CI is repeatable; other seeds and longer runs are
``python tests/fuzz_backends.py --seed S --examples N`` or ``--soak MINUTES``.
Each run is a subprocess: the Triton interpreter must be chosen before
``sigreg_kernels.gpu.triton.ops`` is first imported, and the CLI is what users run.
"""

import dataclasses
import math
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


@pytest.mark.parametrize("weights", [None, "mask", "float"])
def test_unbiased_cases_are_drawn_and_an_ignored_option_is_caught(weights):
    """The fuzzer draws ``unbiased=True`` (about a quarter of the cases) and holds it to the oracle: a
    backend that returns the biased statistic instead is caught, weighted or not."""
    import random

    drawn = [fuzz_backends.draw_case(random.Random(f"u:{i}"), {"clip_value": True, "no_directions": True})
             for i in range(200)]
    assert 25 < sum(c.unbiased for c in drawn) < 80 and all(c.n >= 2 for c in drawn if c.unbiased)
    assert all(fuzz_backends.shrink(c, 100).n >= 2 for c in drawn if c.unbiased)
    case = dataclasses.replace(BASE, unbiased=True, weights=weights)
    assert not run_case(case, CPU).problems, "the correct kernel must pass this case"
    biased = Backend("mutant", lambda c, *args: public_api("cpu")(dataclasses.replace(c, unbiased=False), *args),
                     CPU.budget, CPU.dtypes)
    assert any("value: relative error" in problem for problem in run_case(case, biased).problems)


# ----------------------------------------------------------------------------- each tolerance term still bites
# (the terms and allowances of fuzz_backends' docstring: a bug of each kind, on a case where that
# term is the tolerance, is caught; the same computation done right passes)


def perturbed_value(factor):
    """The cpu backend, its value multiplied by ``1 + factor`` (gradients untouched)."""
    def fn(case, x, a, weight, clip_value):
        value, _ = public_api("cpu")(case, x, a, weight, clip_value)
        value = value + (value * factor).detach()
        return value, (value * weight.to(value.dtype)).sum()
    return Backend("mutant", fn, CPU.budget, CPU.dtypes)


def recurrence_kernel(carry_cosm1=True, unit_error=0.0):
    """The forward in float32 as a kernel computes it, value only: ``p = x @ a``, the unit rotation
    by ``delta p``, the angle-addition recurrence over the knots, sums over the samples, the
    statistic. ``carry_cosm1=False`` rotates and sums ``cos`` and forms ``C - phi`` from ``phi``
    (the kernels before they carried ``cos - 1``); ``unit_error`` adds to the unit rotation's sine
    (a rotation off by that much at every step)."""
    from sigreg_kernels import quadrature
    from sigreg_kernels.core.quadrature import phi_minus_one

    def fn(case, x, a, weight, clip_value):
        batch = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:]).float()
        p = x if a is None else x @ a.float()  # [B, N, K]
        theta = p * (case.t_max / (case.knots - 1))
        c1, s1, u1 = theta.cos(), theta.sin() + unit_error, -2 * (theta / 2).sin().square()
        state, rotated = (u1 if carry_cosm1 else c1), s1
        sums_c, sums_s = [torch.zeros_like(p[:, 0]) if carry_cosm1 else torch.full_like(p[:, 0], x.shape[1])], \
            [torch.zeros_like(p[:, 0])]
        for _ in range(1, case.knots):
            sums_c.append(state.sum(dim=1))
            sums_s.append(rotated.sum(dim=1))
            if carry_cosm1:
                state, rotated = state * c1 + u1 - rotated * s1, rotated * c1 + (state * s1 + s1)
            else:
                state, rotated = state * c1 - rotated * s1, rotated * c1 + state * s1
        _, phi, w = quadrature(case.knots, case.t_max)
        target = phi_minus_one(case.knots, case.t_max) if carry_cosm1 else phi
        mean_c, mean_s = torch.stack(sums_c, -1) / x.shape[1], torch.stack(sums_s, -1) / x.shape[1]
        stat = (((mean_c - target).square() + mean_s.square()) @ w * x.shape[1]).reshape(*batch, -1)
        value = {"mean": stat.mean, "sum": stat.sum, "none": lambda: stat}[case.reduction]()
        return value, (value * weight.to(value.dtype)).sum()
    return Backend("mutant", fn, CPU.budget, ("float32",))


class _Gradient(torch.autograd.Function):
    """Identity forward; the backward applies ``wrong`` to the incoming gradient."""

    @staticmethod
    def forward(ctx, t, wrong):
        ctx.wrong = wrong
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return ctx.wrong(grad), None


def binding_term(result, quantity):
    terms = result.terms[quantity]
    return max(terms, key=terms.get)


# A small-angle case (issue: the fused kernels were less accurate than the float32 reference
# there): the float32 reference's error is the value's tolerance.
SMALL_ANGLES = Case(seed=1154944647, batch=[2], n=489, d=4, k=129, t_max=0.1312, scale=0.00593, dist="shifted",
                    x_layout="expanded", a_layout="transposed", grad="none")
# A long product of shifted data that cancels: the projection's rounding is the gradient's tolerance.
LONG_PRODUCT = Case(seed=5, batch=[], n=8, d=600, k=16, dist="shifted", scale=30.0, grad="x", reduction="none")
# fp16 gradients, most of them subnormal.
SUBNORMAL = Case(seed=3, batch=[], n=64, d=16, k=16, t_max=0.5, scale=0.002, dtype="float16", a_dtype="float16",
                 a_layout="none", grad="x", reduction="sum")
# fp16 gradients of the directions, some beyond the largest finite fp16.
OVERFLOW = Case(seed=9, batch=[], n=15, d=127, k=135, scale=50000.0, dist="heavy", dtype="float16",
                a_dtype="float16", grad="directions", reduction="sum")


def test_reference_term_catches_ten_times_the_float32_references_error():
    correct = run_case(SMALL_ANGLES, CPU)
    assert not correct.problems and binding_term(correct, "value") == "reference"
    error = 10 * correct.terms["value"]["reference"] / 2  # the float32 reference's own error, times 10
    assert any("value: relative error" in p for p in run_case(SMALL_ANGLES, perturbed_value(error)).problems)


def test_small_angles_sums_of_cos_are_caught():
    """Rotating and summing cos near 1 loses the digits C - phi keeps at small angles."""
    assert not run_case(SMALL_ANGLES, recurrence_kernel(carry_cosm1=True)).problems
    result = run_case(SMALL_ANGLES, recurrence_kernel(carry_cosm1=False))
    assert any("value: relative error" in p for p in result.problems), result.problems


def test_a_drifting_recurrence_is_caught():
    case = dataclasses.replace(BASE, grad="none", reduction="sum", n=200)
    assert not run_case(case, recurrence_kernel()).problems
    result = run_case(case, recurrence_kernel(unit_error=64 * torch.finfo(torch.float32).eps))
    assert any("value: relative error" in p for p in result.problems), result.problems


def test_projection_term_catches_a_tf32_projection():
    correct = run_case(LONG_PRODUCT, CPU)
    assert not correct.problems and binding_term(correct, "x") == "model"

    def tf32(t):  # float32 rounded to TF32's 10 mantissa bits (what "highest" must not do); same gradient
        rounded = t.detach().view(torch.int32).add(1 << 12).bitwise_and(~((1 << 13) - 1)).view(torch.float32)
        return t + (rounded - t).detach()

    result = run_case(LONG_PRODUCT, mutant(lambda x, a, c: (tf32(x), tf32(a))))
    assert any("grad_x: relative error" in p for p in result.problems), result.problems


def test_output_rounding_allowance_catches_a_flushed_subnormal_gradient():
    assert not run_case(SUBNORMAL, CPU).problems
    tiny = torch.finfo(torch.float16).smallest_normal
    flush = lambda x, a, c: (_Gradient.apply(x, lambda g: torch.where(g.abs() < tiny, 0.0, g)), a)  # noqa: E731
    result = run_case(SUBNORMAL, mutant(flush))
    assert any("grad_x: relative error" in p for p in result.problems), result.problems


@pytest.mark.parametrize("wrong, report", [
    (lambda g: g.clamp(-65504, 65504), "finite where it is not"),
    (lambda g: torch.where(g.abs() > 32760, g.sign() * math.inf, g), "non-finite entries where the oracle is finite"),
], ids=["clamped-to-finite", "infinite-too-early"])
def test_overflow_allowance_catches_a_wrong_threshold(wrong, report):
    assert not run_case(OVERFLOW, CPU).problems
    result = run_case(OVERFLOW, mutant(lambda x, a, c: (x, _Gradient.apply(a, wrong))))
    assert any(report in p for p in result.problems), result.problems


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
