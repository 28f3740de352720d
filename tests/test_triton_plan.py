"""The Triton plans (``gpu/triton/plan.py``): the waves criterion over the benchmark grid, the
recorded resources, and every planned kernel compiled for sm_90 (no GPU needed).

Run as a script to measure the resources the plan records:
    python tests/test_triton_plan.py            # prints RESOURCES, WEIGHTED_RESOURCES for gpu/triton/plan.py
"""

import inspect
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from sigreg_kernels.gpu.triton import plan  # noqa: E402
from sigreg_kernels.gpu.plan import KernelPlan  # noqa: E402

H200_SMS = 132
KNOTS = 17
T_MAX = 3.0
# The cost model's benchmark grid (the GPU design note).
GRID_N = (1024, 4096, 16384)
GRID_D = (64, 512, 2048)
GRID_K = (256, 1024, 4096)
GRID_BATCH = (1, 8)
# (name, x dtype, TF32 allowed): fp32 "highest" runs the projected kernels (after an SGEMM).
GRID_DTYPES = (("bf16", torch.bfloat16, True), ("fp32-tf32", torch.float32, True),
               ("fp32", torch.float32, False))


def _planned(name, dtype, tf32, batch, samples, dim, slices, num_sms=H200_SMS, ecf_candidates=None,
             grad_candidates=None, weighted=False):
    """(ecf_partials plan, slice_gradient plan) as gpu/fused.py's routes would launch them."""
    projected = dtype == torch.float32 and not tf32  # fp32 "highest": SGEMM, then the projected kernels
    ecf = plan.plan_ecf_partials(batch, samples, dim, slices, KNOTS, dtype, tf32, projected, num_sms,
                                 candidates=ecf_candidates, weighted=weighted)
    grad = plan.plan_slice_gradient(batch, samples, dim, slices, KNOTS, dtype, tf32, projected, num_sms,
                                    candidates=grad_candidates, weighted=weighted)
    return ecf, grad


def every_config_case(weighted=False):
    """(shape, ecf candidate, grad candidate): each candidate of the plans in each operand
    class and feature block the benchmark grid can give it (D = 64, 512, 2048); ``weighted``:
    the candidates of weighted calls."""
    for name, _, tf32 in GRID_DTYPES:
        projected = name == "fp32"
        ecf = plan.ECF_PROJECTED_CANDIDATES if projected else plan.ECF_CANDIDATES
        grad = plan.GRAD_PROJECTED_CANDIDATES if projected else plan.GRAD_CANDIDATES
        ecf, grad = plan._weighted_candidates(ecf, weighted), plan._weighted_candidates(grad, weighted)
        operands = "16" if name == "bf16" else "tf32"
        for i in range(max(len(ecf), len(grad))):
            pair = ecf[min(i, len(ecf) - 1)], grad[min(i, len(grad) - 1)]
            dims = {64} if projected or pair[0][1] == "streamed" and pair[1][1] == "streamed" else set()
            for dim in GRID_D:
                if not projected and all(mode == "streamed" or plan.feature_block(dim, operands, config.block_k, mode)
                                         for config, mode in pair):
                    dims.add(dim if any(mode == "resident" for _, mode in pair) else 64)
            for dim in sorted(dims):
                yield (name, 1, 4096, dim, 1024), pair[0], pair[1]


def benchmark_plans(weighted=False):
    for (name, dtype, tf32), batch, samples, dim, slices in itertools.product(
            GRID_DTYPES, GRID_BATCH, GRID_N, GRID_D, GRID_K):
        ecf, grad = _planned(name, dtype, tf32, batch, samples, dim, slices, weighted=weighted)
        yield (name, batch, samples, dim, slices), ecf, grad


def test_waves_criterion_over_the_benchmark_grid():
    failures = []
    for shape, ecf, grad in benchmark_plans():
        _, batch, samples, dim, slices = shape
        if samples * slices < 2 ** 20:
            continue
        for kernel_plan in (ecf, grad):
            waves = plan.waves(kernel_plan, H200_SMS)
            if waves < 2:
                failures.append((shape, kernel_plan.kernel, kernel_plan.tile["config"], round(waves, 2)))
    assert not failures, failures


def test_plans_use_recorded_resources():
    # Every config the grid uses was compiled and measured (no fallback guess), and
    # fits an SM: registers and shared memory as recorded give at least one block.
    missing = set()
    for weighted, table in ((False, plan.RESOURCES), (True, plan.WEIGHTED_RESOURCES)):
        for shape, ecf, grad in benchmark_plans(weighted):
            name = shape[0]
            for kernel_plan in (ecf, grad):
                key = _resource_key(kernel_plan, name)
                if key not in table:
                    missing.add((weighted, key))
        for (config, _, _), (registers, shared) in table.items():
            assert registers <= 255 and shared + plan.SHARED_RESERVED_PER_BLOCK <= plan.SM_SHARED_BYTES, config
    assert not missing, sorted(missing)


def test_weighted_plans():
    # Weighted calls plan with their own resources and skip the configs that spill with
    # weights; the waves criterion holds for them too.
    failures = []
    for shape, ecf, grad in benchmark_plans(weighted=True):
        assert ecf.tile["config"] != plan.ECF_128x32.name, shape
        if shape[2] * shape[4] >= 2 ** 20:
            failures += [(shape, p.tile["config"]) for p in (ecf, grad) if plan.waves(p, H200_SMS) < 2]
    assert not failures, failures


def _resource_key(kernel_plan: KernelPlan, dtype_name: str):
    tile = kernel_plan.tile
    operands = {"bf16": "16", "fp16": "16", "fp32-tf32": "tf32", "fp32": "ieee"}[dtype_name]
    config = next(c for c, _ in plan.ECF_CANDIDATES + plan.GRAD_CANDIDATES + plan.ECF_PROJECTED_CANDIDATES
                  + plan.GRAD_PROJECTED_CANDIDATES if c.name == tile["config"])
    return plan.resource_key(config, operands, tile["mode"], tile.get("BLOCK_D", 0))


def test_plan_shapes():
    # Splits of whole tiles covering N, grids within CUDA's caps, the batch on axis 2.
    for batch, samples, dim, slices, knots in [(1, 1, 1, 1, 2), (3, 1000, 70, 33, 5), (2, 70000, 8, 300, 17),
                                                (70000, 16, 4, 8, 17), (1, 4096, 512, 1024, 40)]:
        for dtype, tf32, projected in [(torch.bfloat16, True, False), (torch.float32, False, True),
                                       (torch.float32, True, False)]:
            ecf = plan.plan_ecf_partials(batch, samples, dim, slices, knots, dtype, tf32, projected, 132)
            assert ecf.rows_per_split % ecf.tile["BLOCK_N"] == 0
            assert ecf.splits == -(-samples // ecf.rows_per_split) and ecf.splits <= plan.MAX_GRID_YZ
            assert ecf.grid == (-(-slices // ecf.tile["BLOCK_K"]) * plan.knot_chunks(knots), ecf.splits, batch)
            assert ecf.launches == -(-batch // plan.MAX_GRID_YZ)
            grad = plan.plan_slice_gradient(batch, samples, dim, slices, knots, dtype, tf32, projected, 132)
            assert grad.grid[2] == batch and grad.grid[1] * grad.rows_per_split >= samples
            assert grad.launches == ecf.launches
            stat = plan.plan_statistic(batch, ecf.splits, slices, knots, 132)
            assert stat.grid == (batch * -(-slices // plan.STAT_BLOCK_K), 1, 1)


def test_knot_chunks():
    assert [plan.knot_chunk(t) for t in (2, 3, 5, 9, 17, 18, 33, 100)] == [1, 2, 4, 8, 16, 16, 16, 16]
    assert [plan.knot_chunks(t) for t in (2, 17, 18, 33, 34)] == [1, 1, 2, 2, 3]


def test_headline_plan():
    # The design's headline numbers (bf16, N=4096, D=512, K=1024): resident directions,
    # waves in [2, 4] for both kernels.
    ecf, grad = _planned("bf16", torch.bfloat16, True, 1, 4096, 512, 1024)
    assert ecf.tile["RESIDENT"] and grad.tile["RESIDENT"]
    for kernel_plan in (ecf, grad):
        assert 2 <= plan.waves(kernel_plan, H200_SMS) <= 4, kernel_plan


# ---- compiling the planned kernels for sm_90, as the launcher would call them.

def launch_specs(cases=None, weighted=False):
    """{(kernel name, constexprs, options): spec} for the plans of the benchmark grid (or
    ``cases``: (shape, ecf config, grad config) with forced configs), built from the
    launchers' own argument functions on meta tensors and Triton's own specialization rules.
    ``weighted``: the kernels with sample weights (and the statistic with their moments)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    if "sigreg_kernels.gpu.triton.ops" not in sys.modules and not torch.cuda.is_available():
        # As the other Triton tests: without a GPU the process's kernels are the
        # interpreter's (only the launchers' argument functions are used here).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from sigreg_kernels.gpu.triton import kernels
    from sigreg_kernels.gpu.triton import ops as op

    specs = {}

    def add(kernel_name, args, meta, key_extra, resource_key):
        fn = getattr(kernels, kernel_name)
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        meta["DOT_UPCAST"] = False if "DOT_UPCAST" in meta else None
        meta = {k: v for k, v in meta.items() if v is not None}
        signature, constexprs, attrs = {}, dict(meta), {}
        for (name, no_specialization), value in zip(_runtime_params(fn), args):
            kind, spec = native_specialize_impl(BaseBackend, value, False, not no_specialization, True)
            if kind == "constexpr":
                constexprs[name] = spec
                signature[name] = "constexpr"
                continue
            signature[name] = kind
            if spec == "D":
                attrs[name] = True
        for name in fn.arg_names:
            if name in meta:
                signature[name] = "constexpr"
        key = (kernel_name, json.dumps(constexprs, sort_keys=True), json.dumps(options, sort_keys=True),
               json.dumps(signature, sort_keys=True))
        entry = specs.setdefault(key, {"kernel": kernel_name, "signature": signature, "constexprs": constexprs,
                                       "attrs": sorted(attrs), "options": options, "shapes": [],
                                       "resources": resource_key, "weighted": weighted})
        entry["shapes"].append(key_extra)

    meta_device = torch.device("meta")
    cases = cases or [(s, None, None) for s, _, _ in benchmark_plans()]
    for (name, batch, samples, dim, slices), ecf_candidate, grad_candidate in cases:
        dtype, tf32 = {"bf16": (torch.bfloat16, True), "fp32-tf32": (torch.float32, True),
                       "fp32": (torch.float32, False)}[name]
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        try:
            projected = dtype == torch.float32 and not tf32
            x = torch.empty(batch, samples, dim if not projected else slices, dtype=dtype, device=meta_device)
            directions = None if projected else torch.empty(dim, slices, dtype=dtype, device=meta_device)
            ecf, grad = _planned(name, dtype, tf32, batch, samples, dim, slices,
                                 ecf_candidates=ecf_candidate and (ecf_candidate,),
                                 grad_candidates=grad_candidate and (grad_candidate,), weighted=weighted)
            partials = torch.empty(batch, ecf.splits, 2, slices, KNOTS, device=meta_device)
            arrivals = torch.empty(1, dtype=torch.int32, device=meta_device)  # as gpu/fused.py passes it
            weights = torch.empty(batch, samples, device=meta_device) if weighted else None
            moments = torch.empty(batch, 2, device=meta_device) if weighted else None
            _, args, meta = op.ecf_partials_args(x, directions, partials, ecf, KNOTS, T_MAX, 0, batch, arrivals,
                                                 weights)
            add(ecf.kernel, args, dict(meta), (name, batch, samples, dim, slices), _resource_key(ecf, name))
            coef = torch.empty(batch, 2, slices, KNOTS, device=meta_device)
            scale = torch.empty(1, device=meta_device).expand(batch, slices)
            out = x if projected else torch.empty(batch, samples, slices, dtype=dtype, device=meta_device)
            _, args, meta = op.slice_gradient_args(coef, scale, x, directions, out, grad, KNOTS, T_MAX, 0, batch,
                                                   weights)
            add(grad.kernel, args, dict(meta), (name, batch, samples, dim, slices), _resource_key(grad, name))
            stat_plan = plan.plan_statistic(batch, ecf.splits, slices, KNOTS, H200_SMS)
            stat = torch.empty(batch, slices, device=meta_device)
            block_sums = torch.empty(stat_plan.grid[0], dtype=torch.float64, device=meta_device)
            loss = torch.empty((), device=meta_device)
            _, args, meta = op.statistic_args(partials, stat, coef, block_sums, loss, arrivals, stat_plan, samples,
                                              KNOTS, T_MAX, 1.0, None, batch * slices, moments)
            add("statistic_kernel", args, dict(meta), (name, batch, samples, dim, slices),
                (plan.STAT_CONFIG.name, "fp32", "-"))
        finally:
            torch.set_float32_matmul_precision(previous)
    return specs


def _runtime_params(fn):
    """(name, do_not_specialize) of a kernel's non-constexpr parameters, compiled or interpreted."""
    if hasattr(fn, "params"):
        return [(p.name, p.do_not_specialize) for p in fn.params if not p.is_constexpr]
    unspecialized = set(fn.kwargs.get("do_not_specialize") or ())
    return [(name, name in unspecialized) for name, param in inspect.signature(fn.fn).parameters.items()
            if "constexpr" not in str(param.annotation)]


# Compiles specs (JSON on stdin) in a clean process (no TRITON_INTERPRET) and prints one JSON
# line per kernel: registers, spills and shared memory from ptxas -v on Triton's PTX.
_COMPILE_SCRIPT = r'''
import importlib.util, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

path, specs = sys.argv[1], json.load(sys.stdin)
spec = importlib.util.spec_from_file_location("sigreg_triton_kernels", path)
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)


def ptxas_candidates():
    from triton.backends.nvidia import compiler
    seen = []
    for getter in (lambda: compiler.get_ptxas(90).path, lambda: compiler.get_ptxas().path,
                   lambda: triton.knobs.nvidia.ptxas.path):
        try:
            seen.append(getter())
        except Exception:
            pass
    bin_dir = os.path.join(os.path.dirname(compiler.__file__), "bin")
    seen += [os.path.join(bin_dir, name) for name in sorted(os.listdir(bin_dir)) if name.startswith("ptxas")]
    return list(dict.fromkeys(seen))


def ptxas_report(ptx):
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        for ptxas in ptxas_candidates():
            result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(tmp, "k.o")],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                out = result.stdout + result.stderr
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
                return {"registers": int(re.search(r"Used (\d+) registers", out).group(1)),
                        "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
                        "ptxas": os.path.basename(ptxas)}
    return None


for item in specs:
    fn = getattr(kernels, item["kernel"])
    index = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in item["attrs"]}
    constexprs = {(index[name],): value for name, value in item["constexprs"].items()}
    source = ASTSource(fn, item["signature"], constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=item["options"])
    ttgir = compiled.asm["ttgir"]
    report = ptxas_report(compiled.asm["ptx"]) or {}
    mma = re.search(r"nvidia_mma<\{versionMajor = (\d), versionMinor = \d+, warpsPerCTA = \[(\d+), (\d+)\]", ttgir)
    report.update(shared=compiled.metadata.shared, wgmma="wgmma" in compiled.asm["ptx"],
                  mma=None if mma is None else [int(g) for g in mma.groups()], triton=triton.__version__)
    print(json.dumps({"key": item["key"], **report}), flush=True)
'''


def compile_specs(specs, python=sys.executable, workers=2):
    """Compile each spec for sm_90 in ``workers`` fresh processes (no TRITON_INTERPRET); {key: report}.
    ``python``: another interpreter with its own triton (e.g. the GPU machines' 3.6)."""
    items = [{"key": list(key), **{k: v for k, v in value.items() if k in ("kernel", "signature", "constexprs",
                                                                         "attrs", "options")}}
             for key, value in specs.items()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernels_path = str(Path(__file__).resolve().parents[1] / "sigreg_kernels" / "gpu/triton/kernels.py")
    processes = [subprocess.Popen([python, "-c", _COMPILE_SCRIPT, kernels_path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
                 for _ in range(max(1, min(workers, len(items))))]
    outputs = [process.communicate(json.dumps(items[i::len(processes)]))
               for i, process in enumerate(processes)]
    reports = {}
    for process, (stdout, stderr) in zip(processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(stderr[-4000:])
        for line in stdout.splitlines():
            report = json.loads(line)
            reports[tuple(report.pop("key"))] = report
    return reports


COMPILE_SHAPES = [  # the smallest, the headline and the largest shapes, each route
    (name, batch, samples, dim, slices) for name in ("bf16", "fp32") for batch, samples, dim, slices in
    [(1, 1024, 64, 1024), (1, 4096, 512, 1024), (8, 16384, 2048, 4096)]]


def test_planned_kernels_compile_for_sm90():
    """The kernels the plans launch at the smallest, headline and largest shapes (bf16 and
    fp32 "highest"; SIGREG_TRITON_COMPILE_ALL=1: every candidate in every operand class),
    without and with sample weights, compile for sm_90 without a GPU: no spills, shared memory within a block's 227 KiB,
    wgmma with warps along the slices only (the layout the forward's in-thread sums assume),
    and, with the triton the resources were measured with, the recorded occupancy."""
    import triton

    specs = {}
    for weighted in (False, True):
        if os.environ.get("SIGREG_TRITON_COMPILE_ALL") == "1":
            specs.update(launch_specs(list(every_config_case(weighted)), weighted))
        else:
            specs.update(launch_specs([(shape, None, None) for shape in COMPILE_SHAPES], weighted))
    try:
        reports = compile_specs(specs)
    except RuntimeError as error:
        if "ptxas" in str(error) and "No such file" in str(error):
            pytest.skip("no ptxas to compile with")
        raise
    problems = []
    for key, report in reports.items():
        spec = specs[key]
        config_name, operands, block = spec["resources"]
        config = next(c for c, _ in plan.ECF_CANDIDATES + plan.GRAD_CANDIDATES + plan.ECF_PROJECTED_CANDIDATES
                      + plan.GRAD_PROJECTED_CANDIDATES + ((plan.STAT_CONFIG, None),) if c.name == config_name)
        if report.get("spill_stores", 0) or report.get("spill_loads", 0):
            problems.append((spec["resources"], "spills", report))
        if report["shared"] > 227 * 1024:
            problems.append((spec["resources"], "shared memory", report))
        if "slice_gradient_kernel" == key[0] or "ecf_partials_kernel" == key[0]:
            if not report["wgmma"] or report["mma"] != [3, config.num_warps, 1]:
                problems.append((spec["resources"], "not wgmma with warps along the slices", report))
        if triton.__version__.startswith(plan.RESOURCES_TRITON) and "registers" in report:
            recorded = plan.resources(config, operands, block, spec["weighted"])
            compiled = plan.blocks_per_sm(report["registers"], report["shared"], config.threads)
            if compiled != plan.blocks_per_sm(*recorded, config.threads):
                problems.append((spec["resources"], "occupancy differs from RESOURCES", recorded, report))
    assert not problems, problems


def measure(python=sys.executable):
    """Compile every kernel the benchmark grid plans, without and with sample weights; print the
    RESOURCES and WEIGHTED_RESOURCES tables for gpu/triton/plan.py."""
    tables = {}
    for weighted, name in ((False, "RESOURCES"), (True, "WEIGHTED_RESOURCES")):
        specs = launch_specs(list(every_config_case(weighted)), weighted=weighted)
        print(f"# {name}: {len(specs)} distinct kernels", file=sys.stderr)
        reports = compile_specs(specs, python)
        table = tables[name] = {}
        for key, report in reports.items():
            spec = specs[key]
            print(json.dumps({"kernel": key[0], "resources": spec["resources"], "weighted": weighted, **report}),
                  file=sys.stderr)
            registers, shared = table.get(tuple(spec["resources"]), (0, 0))
            table[tuple(spec["resources"])] = (max(registers, report["registers"]), max(shared, report["shared"]))
        print(f"{name} = {{")
        for key in sorted(table):
            print(f"    {key!r}: {table[key]!r},")
        print("}")
    return tables


if __name__ == "__main__":
    measure(*sys.argv[1:])
