"""Parity smoke of the fused backends against a float64 oracle: one line per case.

    python bench/parity_smoke.py                       # cuda and triton x fp32/bf16/fp16, on the GPU
    python bench/parity_smoke.py --jobs 6              # each (backend, dtype) in its own process, at once
    python bench/parity_smoke.py --device cpu --backends cpu --headline 256,32,64   # self-test (CI)

Each case runs ``sigreg(x, directions, backend=..., reduction="none")`` and takes
grad_x and grad_directions by autograd with a random upstream weight; the oracle is
``sigreg_reference`` on the same inputs upcast to float64, on the same device. Then
the case runs again and must give bit-identical results. Bounds are those of
tests/helpers.py ``assert_matches_oracle``: float32 inputs 1e-5, or where larger
twice the float32 reference's own error or one float32 ulp of the largest angle;
16-bit inputs 1e-4 for the statistics (exact products, float32 sums: a dropped row
tile at large N and |x| ~ 10 moves them by ~2e-3) and 2e-2 for the gradients
(returned in the input dtype). Then the scalar losses (``reduction="mean"`` and
``"sum"``): on the fused backends, whose statistic kernel reduces them across its
blocks (the last block to arrive sums the others' partial sums), each must equal
the float64 sum of the case's own statistics, rounded once, bit for bit, in every
one of several reruns (a block that read another's partial sum too early would
show here); elsewhere within the value bound. Public API only. Every case runs;
the exit status is 1 if any failed.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from sigreg_kernels import sigreg, sigreg_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FUSED_BACKENDS = ("cuda", "triton")  # the statistic kernel reduces the loss itself
LOSS_RERUNS = 5
LOW_PRECISION_VALUE_TOL, LOW_PRECISION_GRAD_TOL = 1e-4, 2e-2
T_MAX = 3.0  # the default quadrature, whose largest knot sets the largest angle


def cases(headline):
    """(name, batch dims, N, D, K, |x| scale[, options of sigreg]): the headline size first,
    then the edges, then the options' kernels."""
    n, d, k = headline
    return [
        ("headline", (), n, d, k, 1.0),
        # |x| ~ 10: the statistics are dominated by the target term, so a kernel that
        # drops a 64-row tile is off by ~2e-3 here, which only the 16-bit value bound sees.
        ("headline-x10", (), n, d, k, 10.0),
        ("batch-dims", (2, 3), 300, 24, 70, 1.0),
        ("awkward-x100", (2,), 37, 19, 65, 100.0),  # the shape of bench/sanitizer_case.py
        ("single", (), 1, 1, 1, 1.0),
        ("D=1-x1e-3", (3,), 129, 1, 70, 1e-3),
        ("D>256", (), 130, 257, 67, 1.0),
        ("many-blocks", (8,), 32, 8, 2048, 1.0),  # the statistic's loss over thousands of blocks
        # The statistic kernel's U-statistic; |x| ~ 3, far from Gaussian, so that the value is not
        # a small difference (at |x| ~ 1 it is ~0 and only its absolute error means anything).
        ("unbiased-x3", (2,), 37, 19, 65, 3.0, {"unbiased": True}),
        ("unbiased-head", (), n, d, k, 3.0, {"unbiased": True}),
    ]


def make_case(batch_shape, samples, dim, slices, scale, dtype, device, seed=0):
    """Inputs drawn in float64 on the CPU (the same on every device), unit-column directions, a weight."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, samples, dim, generator=generator, dtype=torch.float64) * scale
    directions = torch.randn(dim, slices, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    weight = torch.randn(*batch_shape, slices, generator=generator, dtype=torch.float64)
    return x.to(device, dtype), directions.to(device, dtype), weight.to(device)


def loss_fn(backend, options=None):
    """The statistics ``[*B, K]`` of one backend, through the public function."""
    return lambda x, directions: sigreg(x, directions, backend=backend, reduction="none", **(options or {}))


def values_and_grads(fn, x, directions, weight):
    """``fn``'s statistics and the gradients of ``2 * sum(weight * stats)`` (an upstream gradient that is not 1)."""
    x = x.detach().clone().requires_grad_()
    directions = directions.detach().clone().requires_grad_()
    stat = fn(x, directions)
    grad_x, grad_directions = torch.autograd.grad(2 * (stat * weight.to(stat.dtype)).sum(), (x, directions))
    return stat.detach(), grad_x, grad_directions


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def tolerances(x, directions, weight, truth, options=None):
    """Bounds for (value, grad_x, grad_directions), as in tests/helpers.py."""
    if x.dtype != torch.float32:
        return [LOW_PRECISION_VALUE_TOL, LOW_PRECISION_GRAD_TOL, LOW_PRECISION_GRAD_TOL]
    ref32 = values_and_grads(lambda a, b: sigreg_reference(a, b, reduction="none", **(options or {})), x,
                             directions, weight)
    largest_angle = T_MAX * (x.double() @ directions.double()).abs().max().item()
    angle_ulp = torch.finfo(torch.float32).eps * largest_angle
    return [max(1e-5, 2 * relative_error(r, t), angle_ulp) for r, t in zip(ref32, truth)]


def check_losses(backend, x, directions, stat, truth_stat, value_tol, options=None):
    """(passed, summary parts) of the mean and sum losses of one case: see the module's docstring."""
    passed, parts = True, []
    for reduction in ("mean", "sum"):
        divisor = stat.numel() if reduction == "mean" else 1
        runs = [sigreg(x, directions, backend=backend, reduction=reduction, **(options or {}))
                for _ in range(LOSS_RERUNS)]
        if backend in FUSED_BACKENDS:
            exact = (stat.double().sum() / divisor).float()
            ok = all(torch.equal(run, exact) for run in runs)
            parts.append(f"{reduction} {'= ' if ok else 'DIFFERS from '}its stats' sum x{LOSS_RERUNS}")
        else:
            err = relative_error(runs[0], truth_stat.sum() / divisor)
            ok = err <= value_tol and all(torch.equal(run, runs[0]) for run in runs)
            parts.append(f"{reduction} {err:.1e}{'<=' if ok else ' > '}{value_tol:.0e}")
        passed &= ok
    return passed, parts


def check(fn, x, directions, weight, backend, options=None):
    """(passed, summary) of one case: errors against the oracle, dtypes, a bit-identical rerun, the losses."""
    ours = values_and_grads(fn, x, directions, weight)
    # float64 leaves: the oracle's gradients are not rounded to a 16-bit input dtype.
    truth = values_and_grads(lambda a, b: sigreg_reference(a, b, reduction="none", **(options or {})),
                             x.double(), directions.double(), weight)
    passed, parts = True, []
    bounds = tolerances(x, directions, weight, truth, options)
    for name, actual, expected, tol in zip(("value", "grad_x", "grad_dir"), ours, truth, bounds):
        if actual.shape != expected.shape:
            passed = False
            parts.append(f"{name} shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            continue
        err = relative_error(actual, expected)
        ok = err <= tol  # False for NaN
        passed &= ok
        parts.append(f"{name} {err:.1e}{'<=' if ok else ' > '}{tol:.0e}")
    if ours[1].dtype != x.dtype or ours[2].dtype != directions.dtype:
        passed = False
        parts.append(f"gradient dtypes {ours[1].dtype}, {ours[2].dtype} != input {x.dtype}")
    again = values_and_grads(fn, x, directions, weight)
    identical = all(torch.equal(a, b) for a, b in zip(ours, again))
    passed &= identical
    parts.append("rerun bit-identical" if identical else "rerun DIFFERS")
    losses_passed, loss_parts = check_losses(backend, x, directions, ours[0], truth[0], bounds[0], options)
    return passed and losses_passed, "  ".join(parts + loss_parts)


def run_cases(args):
    """Every case of every (backend, dtype), one line each; returns the number that failed."""
    failed = total = 0
    for backend in args.backends:
        for dtype_name in args.dtypes:
            for name, batch_shape, samples, dim, slices, scale, *options in cases(args.headline):
                options = options[0] if options else {}
                shape = "x".join(map(str, (*batch_shape, samples, dim, slices)))
                label = f"{backend:<7} {dtype_name:<8} {name:<13} {shape:<16} |x|~{scale:<5g}"
                began = time.perf_counter()
                try:
                    x, directions, weight = make_case(batch_shape, samples, dim, slices, scale,
                                                      DTYPES[dtype_name], args.device, args.seed)
                    passed, summary = check(loss_fn(backend, options), x, directions, weight, backend, options)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    status = "PASS" if passed else "FAIL"
                except Exception as error:  # noqa: BLE001 - report it and go on to the next case
                    passed, status = False, "ERROR"
                    summary = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                total += 1
                failed += not passed
                print(f"{status:<5} {label} {summary}  {time.perf_counter() - began:.1f}s", flush=True)
    print(f"# parity smoke ({', '.join(args.backends)}; {', '.join(args.dtypes)}): {total} cases, "
          f"{total - failed} passed, {failed} failed", flush=True)
    return failed


def run_in_parallel(args):
    """One process per (backend, dtype), ``args.jobs`` at a time; their lines as they come."""
    lock = threading.Lock()
    tally = {"cases": 0, "failed": 0}
    common = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--seed", str(args.seed),
              "--headline", ",".join(map(str, args.headline)), "--jobs", "1"]

    def one_group(group):
        backend, dtype_name = group
        command = common + ["--backends", backend, "--dtypes", dtype_name]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:
            with lock:
                print(line, end="", flush=True)
                if line.split(" ", 1)[0] in ("PASS", "FAIL", "ERROR"):
                    tally["cases"] += 1
                    tally["failed"] += not line.startswith("PASS")
        return process.wait()

    groups = [(b, d) for b in args.backends for d in args.dtypes]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(one_group, groups))
    crashed = sum(code != 0 and code != 1 for code in codes)  # 1: failed cases, already counted
    print(f"# parity smoke, all groups: {tally['cases']} cases, {tally['cases'] - tally['failed']} passed, "
          f"{tally['failed']} failed" + (f"; {crashed} group processes crashed" if crashed else ""), flush=True)
    return tally["failed"] + crashed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--headline", default="4096,512,1024", help="N,D,K of the two headline cases")
    parser.add_argument("--jobs", type=int, default=1, help="(backend, dtype) groups run in parallel processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.headline = tuple(int(v) for v in args.headline.split(","))
        assert len(args.headline) == 3 and min(args.headline) > 0
    except (ValueError, AssertionError):
        parser.error(f"--headline {args.headline!r}: expected three positive integers N,D,K")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.jobs > 1 and len(args.backends) * len(args.dtypes) > 1:
        return 1 if run_in_parallel(args) else 0
    print(f"# torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" and torch.cuda.is_available() else ""),
          flush=True)
    return 1 if run_cases(args) else 0


if __name__ == "__main__":
    sys.exit(main())
