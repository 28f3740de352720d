"""Microbenchmark of SIGReg: providers side by side, time and peak extra memory.

    python bench/bench_sigreg.py                      # CPU: the main size, then sweeps over K, D and N
    python bench/bench_sigreg.py --device cuda --dtype bfloat16
    python bench/bench_sigreg.py --quick              # small sizes, a few seconds
    python bench/bench_sigreg.py --device cuda --dtype bfloat16 float32 --sizes 4096,512,1024 \
        --providers triton cuda --no-memory           # chosen dtypes, sizes ([NAME:]N,D,K) and providers

Every row is timed in the same run as the reference, its torch.compile form and
the matrix products the op cannot avoid (the "floor"), and reported as ratios.
A provider named ``<provider>+graph`` (GPU) is that provider replayed from a CUDA
graph, fwd and fwd+bwd: the GPU's time without the host's (Python, dispatch, launches).
Each size's rows are appended to a CSV (default under bench/results/: device,
date, version) as soon as it is measured; bench/plot_results.py draws them. A
provider that fails is reported and left out; the others are still measured, and
the exit status is 1.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from providers import GRAPH, graphed, make_inputs, make_provider, provider_names  # noqa: E402

import sigreg_kernels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("fwd", "bwd", "fwd+bwd")
# Nominal FP32 (non-tensor-core) rate used for the element-wise part of the GPU floor.
H100_FP32_FLOPS = 67e12


def machine_line(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return (f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"sigreg_kernels {sigreg_kernels.__version__}, python {platform.python_version()}")


def quantiles(times_s):
    times = sorted(times_s)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
    return pick(0.5), pick(0.2), pick(0.8)


def time_ms(fn, device: str, min_run_time: float):
    """Median and 20/80 quantiles in milliseconds."""
    if device == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils.benchmark import Timer

    fn()  # warm up (and compile) outside the measurement
    # Timer runs single-threaded unless told otherwise; time with the whole thread pool.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    per_run = [t / measurement.number_per_run for t in measurement.raw_times]
    return quantiles(per_run)


def mode_callable(loss_fn, x, directions, mode):
    if mode == "fwd":
        return lambda: loss_fn(x, directions)
    if mode == "bwd":
        loss = loss_fn(x, directions)

        def backward():
            x.grad = None
            loss.backward(retain_graph=True)

        return backward

    def forward_backward():
        x.grad = None
        loss_fn(x, directions).backward()

    return forward_backward


def floor_ms(x, directions, device, min_run_time):
    """Time of the matrix products the op cannot avoid (and, on GPU, its element-wise work)."""
    samples, slices = x.shape[-2], directions.shape[1]
    grad_proj = torch.randn(*x.shape[:-1], slices, device=device, dtype=x.dtype)
    xd, ad = x.detach(), directions.to(x.dtype)
    if device == "cuda":  # the GPU kernels recompute the projection in the backward
        matmuls = lambda: (xd @ ad, xd @ ad, grad_proj @ ad.t())  # noqa: E731
    else:
        matmuls = lambda: (xd @ ad, grad_proj @ ad.t())  # noqa: E731
    matmul_ms = time_ms(matmuls, device, min_run_time)[0]
    if device != "cuda":
        return matmul_ms, matmul_ms
    # one sincos pair (~40 flops) and knots-1 rotations (~6 flops each), forward and backward
    batch = x[..., 0, 0].numel()
    elementwise_flops = 2 * batch * samples * slices * (40 + 16 * 8)
    return matmul_ms, matmul_ms + elementwise_flops / H100_FP32_FLOPS * 1e3


def peak_extra_memory_mib(provider, samples, dim, slices, batch, dtype, device, loss_fn=None):
    """Peak memory above the inputs during one fwd+bwd (on the GPU, of ``loss_fn`` if given)."""
    if device == "cuda":
        x, directions = make_inputs(batch, samples, dim, slices, dtype, device)
        loss_fn = loss_fn or make_provider(provider, device, dtype)
        mode_callable(loss_fn, x, directions, "fwd+bwd")()  # warm-up, compile
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mode_callable(loss_fn, x, directions, "fwd+bwd")()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: a fresh process whose large allocations are all mmap'd, so its RSS
    # high-water mark is the peak of live tensors (memory_probe.py).
    cmd = [sys.executable, os.path.join(HERE, "memory_probe.py"), provider, str(batch), str(samples), str(dim),
           str(slices), str(dtype).replace("torch.", "")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mib"]


def sizes(args):
    """(sweep name, N, D, K) rows: the main size first, then the sweeps."""
    if args.sizes:
        rows = []
        for spec in args.sizes:  # N,D,K or NAME:N,D,K
            name, _, triple = spec.rpartition(":")
            rows.append((name, *map(int, triple.split(","))))
        first = rows[0][1:]
        for i, (name, *triple) in enumerate(rows):
            if not name:  # named after the one dimension that differs from the first size
                differs = [dim for dim, a, b in zip("NDK", triple, first) if a != b]
                name = "main" if i == 0 else differs[0] if len(differs) == 1 else "custom"
            rows[i] = (name, *triple)
        return rows
    if args.quick:
        return [("main", 256, 64, 128), ("K", 256, 64, 256), ("D", 256, 128, 128)]
    n, d, k = (4096, 512, 1024) if args.device == "cuda" else (2048, 512, 1024)
    rows = [("main", n, d, k)]
    rows += [("K", n, d, kk) for kk in (256, 4096)]
    rows += [("D", n, dd, k) for dd in (64, 2048)]
    rows += [("N", nn, d, k) for nn in (1024, 16384) if nn != n]
    return rows


def append_csv(path, rows):
    """Append one size's rows (the file is closed, so they are on disk if the run is cut short later)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def measure_provider(provider, x, directions, samples, dim, slices, dtype, args):
    """{mode: (median, p20, p80)} and the peak extra memory (or None) of one provider at one size."""
    if provider.endswith(GRAPH):  # fwd and fwd+bwd replayed from a CUDA graph; no memory
        loss_fn = make_provider(provider[:-len(GRAPH)], args.device, dtype)
        return {mode: time_ms(graphed(mode_callable(loss_fn, x, directions, mode)), args.device, args.min_run_time)
                for mode in args.modes if mode != "bwd"}, None
    loss_fn = make_provider(provider, args.device, dtype, replays_backward="bwd" in args.modes)
    results = {mode: time_ms(mode_callable(loss_fn, x, directions, mode), args.device, args.min_run_time)
               for mode in args.modes}
    memory = None
    if not args.no_memory and "fwd+bwd" in args.modes:
        if not args.one_compile:
            memory = peak_extra_memory_mib(provider, samples, dim, slices, args.batch, dtype, args.device)
        elif args.device == "cuda":  # the graph compiled for timing, no second compile
            memory = peak_extra_memory_mib(provider, samples, dim, slices, args.batch, dtype, args.device,
                                           loss_fn=loss_fn)
        elif provider != "reference+compile":  # CPU memory is measured in a fresh process, which compiles
            memory = peak_extra_memory_mib(provider, samples, dim, slices, args.batch, dtype, args.device)
    return results, memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                        help="one or more; each runs every size")
    parser.add_argument("--providers", nargs="+", default=None, help="default: all available on the device")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=1, help="leading batch size (views)")
    parser.add_argument("--sizes", nargs="+", help="explicit [NAME:]N,D,K triples instead of the sweeps "
                        "(unnamed: after the one dimension that differs from the first size)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--one-compile", action="store_true",
                        help="compile the reference once per size and dtype: on the GPU its peak memory is "
                             "measured on the graph compiled for timing (without buffer donation when bwd is "
                             "timed: an upper bound); on the CPU, where memory is measured in a fresh process, "
                             "the compiled reference's memory is skipped")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per CPU timing")
    parser.add_argument("--csv", default=None, help="default: bench/results/<device>-<dtypes>-<date>.csv")
    args = parser.parse_args()

    providers = args.providers or provider_names(args.device)
    date = datetime.date.today().isoformat()
    csv_path = args.csv or os.path.join(HERE, "results", f"{args.device}-{'+'.join(args.dtype)}-{date}.csv")
    machine = machine_line(args.device)
    failures = 0
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        print(f"# {machine}\n# dtype {dtype_name}, batch {args.batch}, {date}")
        header = f"{'sweep':>5} {'N':>6} {'D':>5} {'K':>5} {'provider':>18} {'mode':>8} {'ms':>9} {'p20':>9} {'p80':>9}"
        header += f" {'x ref':>7} {'x comp':>7} {'/floor':>7} {'peak MiB':>9} {'mem/ref':>8}"
        print(header, flush=True)
        for sweep, samples, dim, slices in sizes(args):
            x, directions = make_inputs(args.batch, samples, dim, slices, dtype, args.device)
            matmul_ms, floor = floor_ms(x, directions, args.device, args.min_run_time)
            results = {}
            for provider in providers:
                try:
                    timings, results[provider, "memory"] = measure_provider(
                        provider, x, directions, samples, dim, slices, dtype, args)
                except Exception as error:  # noqa: BLE001 - report it, measure the others
                    failures += 1
                    print(f"# {provider} failed at N={samples} D={dim} K={slices}: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}", flush=True)
                    continue
                results.update({(provider, mode): value for mode, value in timings.items()})
            rows = []
            for provider in providers:
                for mode in args.modes:
                    if (provider, mode) not in results:
                        continue
                    median, p20, p80 = results[provider, mode]
                    ref = results.get(("reference", mode), (None,))[0]
                    comp = results.get(("reference+compile", mode), (None,))[0]
                    memory = results[provider, "memory"] if mode == "fwd+bwd" else None
                    ref_memory = results.get(("reference", "memory"))
                    row = dict(device=args.device, machine=machine, date=date, version=sigreg_kernels.__version__,
                               dtype=dtype_name, batch=args.batch, sweep=sweep, N=samples, D=dim, K=slices,
                               provider=provider, mode=mode, ms=median, p20_ms=p20, p80_ms=p80,
                               speedup_vs_reference=ref / median if ref else None,
                               speedup_vs_compile=comp / median if comp else None,
                               matmul_ms=matmul_ms, floor_ms=floor,
                               ratio_to_floor=median / floor if mode == "fwd+bwd" else None,
                               peak_extra_mib=memory,
                               memory_vs_reference=memory / ref_memory if memory and ref_memory else None)
                    rows.append(row)
                    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
                    print(f"{sweep:>5} {samples:>6} {dim:>5} {slices:>5} {provider:>18} {mode:>8} {median:>9.2f} "
                          f"{p20:>9.2f} {p80:>9.2f} {fmt(row['speedup_vs_reference'], '7.1f')} "
                          f"{fmt(row['speedup_vs_compile'], '7.2f')} {fmt(row['ratio_to_floor'], '7.2f')} "
                          f"{fmt(memory, '9.1f')} {fmt(row['memory_vs_reference'], '8.3f')}", flush=True)
            print(f"{'':>5} {samples:>6} {dim:>5} {slices:>5} {'floor (matmuls)':>18} {'fwd+bwd':>8} {floor:>9.2f}",
                  flush=True)
            if rows:
                append_csv(csv_path, rows)
    print(f"# rows appended to {os.path.relpath(csv_path)}" + (f"; {failures} measurements failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
