"""What each backend runs per pass (gpu/fused.py's routes), the benchmark grid, totals and the criteria."""

import itertools
import math
import sys
from dataclasses import dataclass, replace

import torch

from .model import (BYTES, TORCH_DTYPES, WAVES_KERNELS, Case, library_gemm, load_plans, own_kernel,
                    small_op)
from .resources import Kernel, ModelError, cuda_kernels, match_cuda, triton_launches

GRID_N = (1024, 4096, 16384)
GRID_D = (64, 512, 2048)
GRID_K = (256, 1024, 4096)
GRID_BATCH = (1, 8)
GRID_DTYPES = ("bf16", "fp32")
HEADLINE = dict(dtype="bf16", batch=1, N=4096, D=512, K=1024)
HEADLINE_RATIO = 2.0
MIN_WAVES, WAVES_FROM = 2.0, 2 ** 20


def grid_cases(backends, shapes=None, batches=GRID_BATCH, dtypes=GRID_DTYPES, grad_directions=False, weights=False):
    shapes = shapes or list(itertools.product(GRID_N, GRID_D, GRID_K))
    return [Case(backend, dtype, batch, n, d, k, grad_directions=grad_directions, weights=weights)
            for backend in backends for dtype in dtypes for batch in batches for n, d, k in shapes]


def plan_args(case: Case, role: str, sms: int, splits: int = 1):
    """The arguments of the backend's plan function for ``role`` (gpu/plan.py's signatures)."""
    if role == "statistic":
        return (case.batch, splits, case.K, case.knots, sms)
    dtype = getattr(torch, TORCH_DTYPES[case.dtype])
    dim = case.K if case.sgemm_route else case.D  # projected: the kernel's input is P [B, N, K]
    return (case.batch, case.N, dim, case.K, case.knots, dtype, not case.sgemm_route, case.sgemm_route, sms)


class CudaBackend:
    """Plans from sigreg_kernels.gpu.cuda.plan; resources of the instances nvcc compiled for sm_90a."""

    def __init__(self, gpu):
        self.gpu, self.plans, self.kernels = gpu, load_plans("cuda"), cuda_kernels()

    def prepare(self, cases):
        pass

    def resolve(self, case, role, splits=1):
        plan = getattr(self.plans, f"plan_{role}")(*plan_args(case, role, self.gpu.sms, splits))
        return plan, match_cuda(plan, "fp32" if role == "statistic" else case.dtype, self.kernels)


def _triton_call(case, role, splits):
    call = {"primitive": role, "dtype": case.dtype, "projected": case.sgemm_route, "batch": case.batch,
            "N": case.N, "D": case.D, "K": case.K, "knots": case.knots,
            "splits": splits if role == "statistic" else 0}
    call["key"] = "/".join(str(call[k]) for k in sorted(call))
    return call


class TritonBackend:
    """Plans from sigreg_kernels.gpu.triton.plan; the launches the backend makes, compiled for sm_90."""

    def __init__(self, gpu):
        self.gpu, self.plans, self.launches = gpu, load_plans("triton"), {}

    def _splits(self, case):
        return self.plans.plan_ecf_partials(*plan_args(case, "ecf_partials", self.gpu.sms)).splits

    def prepare(self, cases):
        calls = []
        for case in cases:
            splits = self._splits(case)
            calls += [_triton_call(case, role, splits) for role in ("ecf_partials", "statistic", "slice_gradient")]
        unique = list({c["key"]: c for c in calls}.values())
        self.launches.update(triton_launches(unique, self.gpu.sms))

    def resolve(self, case, role, splits=1):
        plan = getattr(self.plans, f"plan_{role}")(*plan_args(case, role, self.gpu.sms, splits))
        key = _triton_call(case, role, splits)["key"]
        if key not in self.launches:
            self.prepare([case])
        launches = [launch for launch in self.launches[key] if launch["kernel"] == plan.kernel]
        if not launches:
            seen = [launch["kernel"] for launch in self.launches[key]]
            raise ModelError(f"triton {role} at {key}: the plan names {plan.kernel!r}, the launcher ran {seen}")
        others = sorted({launch["kernel"] for launch in self.launches[key]} - {plan.kernel})
        if others:
            print(f"cost_model: triton {role} also launched {others}, which no plan names (not modelled)",
                  file=sys.stderr)
        launch = launches[0]
        grid = [sum(l["grid"][0] for l in launches), *launch["grid"][1:]] if len(launches) > 1 else launch["grid"]
        blocks = sum(math.prod(l["grid"]) for l in launches)
        if blocks != plan.blocks or launch["threads"] != plan.threads:
            raise ModelError(f"triton {role} at {key}: the plan says {plan.blocks} blocks of {plan.threads} "
                             f"threads ({plan.grid}), the launcher launched {blocks} of {launch['threads']} ({grid})")
        kernel = Kernel(plan.kernel, plan.kernel, [], launch["registers"], launch["smem"], launch["spill_bytes"],
                        launch["mma"])
        return plan, kernel


BACKENDS = {"cuda": CudaBackend, "triton": TritonBackend}


def case_rows(gpu, backend, case: Case) -> list:
    """Every kernel and library op one fwd and one bwd run, as gpu/fused.py strings them."""
    b, n, d, k = case.batch, case.N, case.D, case.K
    size = BYTES[case.dtype]
    x_bytes, a_bytes = b * n * d * size, d * k * size
    rows = []
    # forward
    if case.cast_directions and case.dtype != "fp32":
        rows.append(small_op(gpu, case, "fwd", "cast_directions", d * k, d * k * (4 + size)))
    if case.sgemm_route:
        rows.append(library_gemm(gpu, case, "fwd", "gemm_projection", b * n, k, d, "fp32", x_bytes + a_bytes))
    plan, kernel = backend.resolve(case, "ecf_partials")
    rows.append(own_kernel(gpu, case, "fwd", "ecf_partials", plan, kernel))
    splits = plan.splits
    if case.weights:  # their sums per batch index (gpu/fused.py), and the weighted mean's divisor
        rows.append(small_op(gpu, case, "fwd", "weight_moments", b * n, b * n * 4 + b * 8))
    plan, kernel = backend.resolve(case, "statistic", splits)
    rows.append(own_kernel(gpu, case, "fwd", "statistic", plan, kernel, splits=splits))  # and the loss
    # backward
    if case.sgemm_route:
        rows.append(library_gemm(gpu, case, "bwd", "gemm_projection", b * n, k, d, "fp32", x_bytes + a_bytes))
    plan, kernel = backend.resolve(case, "slice_gradient")
    rows.append(own_kernel(gpu, case, "bwd", "slice_gradient", plan, kernel))
    rows.append(library_gemm(gpu, case, "bwd", "gemm_grad_x", b * n, d, k, case.dtype, x_bytes))
    if case.weights:  # grad_x exactly 0 on rows of weight 0 (a select over B N D)
        rows.append(small_op(gpu, case, "bwd", "mask_grad_x", b * n * d, 2 * x_bytes + b * n * 4))
    if case.grad_directions:
        rows.append(library_gemm(gpu, case, "bwd", "gemm_grad_directions", d, k, b * n, case.dtype, a_bytes))
    return rows


def model_rows(gpu, cases) -> list:
    rows, backends = [], {}
    for name in sorted({c.backend for c in cases}):
        backends[name] = BACKENDS[name](gpu)
        backends[name].prepare([c for c in cases if c.backend == name])
    for case in cases:
        rows += case_rows(gpu, backends[case.backend], case)
    return rows


@dataclass
class Total:
    backend: str
    dtype: str
    batch: int
    N: int
    D: int
    K: int
    fwd_us: float
    bwd_us: float
    fwd_floor_us: float
    bwd_floor_us: float

    @property
    def predicted_us(self):
        return self.fwd_us + self.bwd_us

    @property
    def floor_us(self):
        return self.fwd_floor_us + self.bwd_floor_us

    @property
    def ratio(self):
        return self.predicted_us / self.floor_us if self.floor_us else math.inf


def totals(rows) -> list:
    groups = {}
    for row in rows:
        key = (row.backend, row.dtype, row.batch, row.N, row.D, row.K)
        sums = groups.setdefault(key, {"fwd": [0.0, 0.0], "bwd": [0.0, 0.0]})
        sums[row.pass_][0] += row.predicted_us
        sums[row.pass_][1] += row.floor_us
    return [Total(*key, s["fwd"][0], s["bwd"][0], s["fwd"][1], s["bwd"][1]) for key, s in groups.items()]


def headline_cases(backends, grad_directions=False, weights=False):
    return [replace(Case(backend, **HEADLINE), grad_directions=grad_directions, weights=weights) for backend in backends]


def check(rows, headline_rows) -> list:
    """The criteria of issue 11, as (passed, text) lines; passed None for a note."""
    results = []
    for backend in sorted({r.backend for r in rows + headline_rows}):
        unfit = sorted({f"{r.function} ({r.registers} registers per thread, {r.smem} B of shared memory)"
                        for r in rows + headline_rows if r.backend == backend and r.blocks_per_sm == 0})
        if unfit:
            results.append((False, f"{backend}: kernels that do not fit on one SM: {'; '.join(unfit)}"))
        checked = [r for r in rows if r.backend == backend and r.kernel in WAVES_KERNELS and r.N * r.K >= WAVES_FROM]
        low = [r for r in checked if r.blocks_per_sm == 0 or r.waves < MIN_WAVES]
        text = (f"{backend}: waves >= {MIN_WAVES:g} for {' and '.join(WAVES_KERNELS)} wherever N*K >= 2^20: "
                f"{len(checked) - len(low)}/{len(checked)} rows")
        if low:
            worst = min(low, key=lambda r: r.waves)
            text += (f"; lowest {worst.waves:.2f} ({worst.kernel} {worst.dtype} B={worst.batch} N={worst.N} "
                     f"D={worst.D} K={worst.K}: {worst.blocks} blocks, {worst.blocks_per_sm} per SM)")
        results.append((not low, text))
    for backend in sorted({r.backend for r in rows + headline_rows}):
        notes = sorted({r.note for r in rows + headline_rows if r.backend == backend and r.note})
        if notes:  # not a criterion: the plan chose its grid from resources the compiler does not give
            results.append((None, f"{backend}: {len(notes)} plans record other resources than compiled, e.g. "
                                  + "; ".join(notes[:3])))
    for total in totals(headline_rows):
        ok = total.predicted_us <= HEADLINE_RATIO * total.floor_us
        results.append((ok, f"{total.backend}: headline bf16 B=1 N=4096 D=512 K=1024 fwd+bwd predicted "
                            f"{total.predicted_us:.1f} us, floor {total.floor_us:.1f} us: "
                            f"{total.ratio:.2f}x (must be <= {HEADLINE_RATIO:g}x)"))
    return results
