"""The benchmark script runs end to end and writes sane rows (no timings are asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_writes_csv_and_plot(tmp_path):
    csv_path = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "bench" / "bench_sigreg.py"), "--providers", "reference", "cpu",
               "--sizes", "64,8,16", "64,8,24", "--min-run-time", "0.01", "--csv", str(csv_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "floor (matmuls)" in out
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"reference", "cpu"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for row in rows:
        assert float(row["ms"]) > 0 and float(row["p20_ms"]) <= float(row["p80_ms"])
        if row["mode"] == "fwd+bwd":
            assert float(row["peak_extra_mib"]) >= 0
    png = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_results.py"), str(csv_path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert Path(png).stat().st_size > 1000


def test_bench_dtypes_named_sizes_and_a_failing_provider(tmp_path):
    """Several dtypes in one run, NAME:N,D,K sizes, one CSV header however many sizes are appended, and a
    provider that fails: reported, left out, the others measured, exit status 1."""
    csv_path = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "bench" / "bench_sigreg.py"), "--providers", "reference", "no-such",
               "--dtype", "float32", "bfloat16", "--sizes", "mid:48,8,16", "48,8,20", "--modes", "fwd+bwd",
               "--no-memory", "--min-run-time", "0.01", "--csv", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("# no-such failed at N=48") == 4
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["dtype"], r["sweep"], r["K"]) for r in rows] == [
        ("float32", "mid", "16"), ("float32", "K", "20"), ("bfloat16", "mid", "16"), ("bfloat16", "K", "20")]
    assert all(r["provider"] == "reference" and float(r["ms"]) > 0 and r["peak_extra_mib"] == "" for r in rows)


def test_bench_step_overhead_table_runs(tmp_path):
    """bench_step.py's quick per-call overhead table: every entry point, a time, the ratio column."""
    csv_path = tmp_path / "step.csv"
    command = [sys.executable, str(ROOT / "bench" / "bench_step.py"), "--device", "cpu", "--overhead-only",
               "--csv", str(csv_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    for entry in ("sigreg_reference(x, A)", "sigreg(x, A, backend='cpu')", "SIGReg(", "SlicingUnivariateTest("):
        assert entry in out, out
    ratios = [line.split()[-1] for line in out.splitlines() if line.rstrip().endswith("x")]
    assert ratios and all(float(r[:-1]) > 0 for r in ratios), out


def test_host_overhead_runs_the_gpu_paths_with_null_kernels():
    """bench/host_overhead.py: a time for each entry point, the GPU backends' through their null kernels
    (the script fails if the Triton launchers bypassed them and the interpreter was timed instead)."""
    command = [sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--calls", "5"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line.split("  [")[0].strip(): line.split() for line in out.splitlines() if line.startswith("  ")}
    for entry in ("x.sum()", "sigreg_reference(x, A)", "sigreg(x, A, backend='cuda')",
                  "sigreg(x, A, backend='triton')", "sigreg(x, A, backend='cuda', weights=mask)"):
        assert entry in rows, out
    assert float(rows["sigreg(x, A, backend='triton')"][-2]) > 0 and rows["sigreg_reference(x, A)"][-1] == "1.00x"


def test_a_graph_provider_without_a_gpu_fails_with_the_reason(tmp_path):
    """``<provider>+graph`` replays a CUDA graph: on a CPU it is reported as failed, with why, and left out."""
    csv_path = tmp_path / "bench.csv"
    command = [sys.executable, str(ROOT / "bench" / "bench_sigreg.py"), "--providers", "reference", "reference+graph",
               "--sizes", "48,8,16", "--modes", "fwd", "fwd+bwd", "--no-memory", "--min-run-time", "0.01",
               "--csv", str(csv_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "# reference+graph failed at N=48 D=8 K=16: RuntimeError: a '+graph' provider needs a CUDA device" \
        in result.stdout, result.stdout
    with open(csv_path) as f:
        assert {r["provider"] for r in csv.DictReader(f)} == {"reference"}


def test_profile_host_table_names_the_ops_and_is_skipped_by_the_profile_reader(tmp_path):
    """profile_kernels.host_table (run here on the cpu backend): the ops with their CPU time per fwd+bwd,
    printed so that cost_model's profile reader, which reads the kernel tables, ignores it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import profile_kernels
    from cost_model.measured import read_profile
    from providers import make_inputs, make_provider

    import torch

    x, directions = make_inputs(1, 64, 8, 16, torch.float32, "cpu")
    rows, traced, wall = profile_kernels.host_table(make_provider("cpu", "cpu", torch.float32), x, directions, 3,
                                                    device="cpu")
    names = [name for name, _, _ in rows]
    assert any(name.startswith("sigreg::ecf_sums") for name in names), names
    assert all(calls > 0 and us >= 0 for _, calls, us in rows) and traced > 0 and wall > 0
    path = tmp_path / "profile.txt"
    with open(path, "w") as f:
        f.write("cuda: wall 550.0 us per fwd+bwd, GPU busy 110.0 us (0.20 of it)\n"
                "  launches   mean us  kernel\n       1.0      40.0  ecf_partials_kernel\n")
        sys.stdout, saved = f, sys.stdout
        try:
            profile_kernels.print_host_table("cuda", rows, traced, wall)
        finally:
            sys.stdout = saved
    measured = read_profile(path)
    assert dict(measured.profiler["cuda"]) == {"ecf_partials": 40.0} and measured.other["cuda"] == 0.0
