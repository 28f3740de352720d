"""The cost model of the GPU backends (bench/cost_model.py): its CSV, its arithmetic, and issue 11's criteria.

The model compiles the kernels for sm_90(a) without a GPU (nvcc; Triton), once per
source version: later runs read the compile cache. One run over the whole
benchmark grid serves the CSV and criteria tests; the criteria test fails until the
kernels meet them (every ecf_partials and slice_gradient launch with >= 2 waves
where N*K >= 2^20; the bf16 headline within 2x of its floor).
"""

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from cost_model import hardware as hw  # noqa: E402
from cost_model import model, passes, resources  # noqa: E402

pytest.importorskip("triton")
BACKENDS = ["triton"] + (["cuda"] if resources.nvcc_path() else [])
ROWS_PER_CASE = {"bf16": 5, "fp32": 6}  # bf16: cast, ecf_partials, statistic (with the loss) | slice_gradient, G@Aᵀ


def run_model(*args):
    command = [sys.executable, str(ROOT / "bench" / "cost_model.py"), "--backends", *BACKENDS, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """The whole benchmark grid on the H200, with --check: (completed process, CSV rows)."""
    path = tmp_path_factory.mktemp("cost_model") / "h200.csv"
    done = run_model("--gpu", "H200", "--csv", str(path), "--check", "--quiet")
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    with open(path) as f:
        reader = csv.DictReader(f)
        return done, reader.fieldnames, list(reader)


def test_csv_has_the_columns_and_one_row_per_kernel(grid_run):
    _, header, rows = grid_run
    assert tuple(header) == model.COLUMNS
    shapes = len(passes.GRID_N) * len(passes.GRID_D) * len(passes.GRID_K) * len(passes.GRID_BATCH)
    assert len(rows) == len(BACKENDS) * shapes * sum(ROWS_PER_CASE.values())
    for backend in BACKENDS:
        for kernel in ("ecf_partials", "statistic", "slice_gradient"):
            mine = [r for r in rows if r["backend"] == backend and r["kernel"] == kernel]
            assert len(mine) == 2 * shapes, (backend, kernel)  # one per dtype and shape
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp32"}


def test_waves_come_from_blocks_and_blocks_per_sm(grid_run):
    _, _, rows = grid_run
    for r in rows:
        blocks, per_sm = int(r["blocks"]), int(r["blocks_per_sm"])
        assert blocks >= 1 and 0 <= per_sm <= hw.MAX_BLOCKS_PER_SM, r
        if per_sm == 0:  # does not fit on an SM: no waves, no time (test_criteria_of_issue_11 fails on it)
            assert r["waves"] == r["predicted_us"] == "inf", r
            continue
        assert math.isclose(float(r["waves"]), blocks / (hw.GPUS["H200"].sms * per_sm), rel_tol=1e-3, abs_tol=1e-4), r
        assert float(r["predicted_us"]) >= hw.LAUNCH_US and float(r["floor_us"]) >= 0, r
        if r["kernel"] in ("ecf_partials", "slice_gradient", "gemm_grad_x"):
            assert float(r["floor_us"]) < float(r["predicted_us"]), r  # no kernel beats its own floor


def test_criteria_of_issue_11(grid_run):
    done, _, _ = grid_run
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert done.returncode == 0 and not failed, "\n".join(failed)


def test_h100_and_the_measured_join(tmp_path):
    bench_csv = tmp_path / "bench.csv"
    bench_csv.write_text("provider,dtype,batch,N,D,K,mode,ms\ntriton,bfloat16,1,4096,512,1024,fwd+bwd,0.1\n")
    done = run_model("--gpu", "H100", "--shapes", "4096,512,1024", "--batch", "1", "--dtypes", "bf16",
                     "--measured", str(bench_csv))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "H100: 132 SMs" in done.stdout and "3.35 TB/s" in done.stdout
    section = done.stdout.split("# measured", 1)[-1].split("\n\n")[0]
    measured = [line.split() for line in section.splitlines() if line.split()[:2] == ["triton", "bf16"]]
    assert len(measured) == 1 and measured[0][6] == "fwd+bwd" and float(measured[0][8]) == 100.0, done.stdout


def test_blocks_per_sm_takes_the_tightest_limit():
    assert model.blocks_per_sm(128, 0, 256) == 2            # registers: 65536 / (128 * 256)
    assert model.blocks_per_sm(125, 0, 256) == 2            # 125 rounds up to 128
    assert model.blocks_per_sm(32, 100 * 1024, 128) == 2    # shared memory: 228 KiB / (100 + 1 KiB)
    assert model.blocks_per_sm(16, 0, 32) == 32             # the 32-block cap
    assert model.blocks_per_sm(16, 0, 1024) == 2            # 2048 threads per SM


def test_a_missing_plan_module_is_named(monkeypatch):
    monkeypatch.setitem(model.PLAN_MODULES, "triton", "sigreg_kernels.no_such_plan")
    with pytest.raises(resources.ModelError, match="no_such_plan is not there yet"):
        model.load_plans("triton")


def test_ptxas_report_and_template_instances_are_read():
    report = """ptxas info    : Compiling entry function '_Z1kILi64EEvv' for 'sm_90a'
ptxas info    : Function properties for _Z1kILi64EEvv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size, 16384 bytes smem
"""
    assert resources._parse_ptxas(report) == {"_Z1kILi64EEvv": {"registers": 96, "smem": 16384, "spill_bytes": 8}}
    name = ("void sigreg::cuda::(anonymous namespace)::ecf_partials_kernel<__nv_bfloat16, true, (int)64, 32u>"
            "(__nv_bfloat16 const*, float*, int)")
    assert resources.parse_demangled(name) == ("ecf_partials_kernel", ["__nv_bfloat16", "true", "64", "32"])
    if shutil.which("c++filt") or shutil.which("cu++filt"):
        assert resources.demangle(["_Z1kILi64EEvv"]) == ["void k<64>()"]


def test_weighted_passes_add_their_ops_and_cost_more(tmp_path):
    """--weights: the weights' sums and the mask on grad_x as ops of their own, and kernels that cost
    at least the unweighted ones (a load and a multiply per row)."""
    def rows(*extra):
        path = tmp_path / f"rows{len(extra)}.csv"
        done = run_model("--gpu", "H200", "--shapes", "4096,512,1024", "--batch", "1", "--dtypes", "bf16",
                         "--csv", str(path), "--quiet", *extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(path) as f:
            return {(r["backend"], r["kernel"]): float(r["predicted_us"]) for r in csv.DictReader(f)}

    plain, weighted = rows(), rows("--weights")
    for backend in BACKENDS:
        assert (backend, "weight_moments") in weighted and (backend, "mask_grad_x") in weighted
        assert (backend, "weight_moments") not in plain
        for kernel in ("ecf_partials", "slice_gradient"):
            assert weighted[backend, kernel] > plain[backend, kernel]


PROFILE_TXT = """\
# NVIDIA H200, torch 2.11.0+cu130; bfloat16 fwd+bwd, N=4096 D=512 K=1024, 20 iterations

cuda: wall 550.0 us per fwd+bwd, GPU busy 110.0 us (0.20 of it)
  launches   mean us  kernel
       1.0      40.0  void ecf_partials_kernel<c10::BFloat16, (TileKind)1, (ProductMode)0, false>(PartialsArgs)
       1.0      45.0  void slice_gradient_kernel<c10::BFloat16, (TileKind)1, (ProductMode)0, false>(GradientArgs)
       1.0      10.0  nvjet_tst_128x64_64x8_1x1_v_bz_TNT
       1.0       5.0  statistic_kernel(StatisticArgs)
       2.0       5.0  void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>()

triton: wall 1700.0 us per fwd+bwd, GPU busy 200.0 us (0.12 of it)
  launches   mean us  kernel
       1.0     120.0  ecf_partials_kernel
       1.0      70.0  slice_gradient_kernel
       1.0      10.0  nvjet_tst_128x64_64x8_1x1_v_bz_TNT
==PROF== Connected to process 1234
  _Z19ecf_partials_kernelIN3c108BFloat16ELi1ELi0ELb0EEv12PartialsArgs (128, 1, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         3.20
    Duration                         us        38.50
  nvjet_tst_128x64_64x8_1x1_v_bz_TNT (32, 8, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Duration                         us         9.00
  ecf_partials_kernel (256, 1, 1)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    Duration                    msecond         0.11
"""


def test_profile_is_read_and_joined_with_the_headline(tmp_path):
    from cost_model.measured import read_profile

    path = tmp_path / "profile.txt"
    path.write_text(PROFILE_TXT)
    measured = read_profile(path)
    assert measured.wall == {"cuda": 550.0, "triton": 1700.0} and measured.busy["cuda"] == 110.0
    assert dict(measured.profiler["cuda"]) == {"ecf_partials": 40.0, "slice_gradient": 45.0, "gemm_grad_x": 10.0,
                                               "statistic": 5.0}
    assert measured.other["cuda"] == 10.0 and measured.profiler["triton"]["ecf_partials"] == 120.0
    # ncu: the mangled CUDA kernel, the GEMM after it counted to cuda, Triton's by its plain name, units converted
    assert dict(measured.ncu["cuda"]) == {"ecf_partials": 38.5, "gemm_grad_x": 9.0}
    assert measured.ncu["triton"]["ecf_partials"] == pytest.approx(110.0)
    done = run_model("--gpu", "H200", "--shapes", "4096,512,1024", "--batch", "1", "--dtypes", "bf16",
                     "--quiet", "--profile", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    section = done.stdout.split("# headline kernels", 1)[-1].split("\n\n")[0]
    rows = {tuple(line.split()[:2]): line.split() for line in section.splitlines()[2:]}
    assert rows[("cuda", "ecf_partials")][3:5] == ["40.0", "38.5"], section
    assert rows[("triton", "ecf_partials")][3:5] == ["120.0", "110.0"], section
    assert "wall 550.0 us: the GPU busy 0.20 of it" in section, section
