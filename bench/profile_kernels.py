"""What each backend's kernels take on the GPU, beside the wall time of the op.

    python bench/profile_kernels.py [--backends cuda triton] [--dtype bfloat16] [--size 4096,512,1024]
    ncu --profile-from-start off ... python bench/profile_kernels.py --ncu-range

Per backend, one fwd+bwd of ``sigreg`` (as bench_sigreg.py runs it: x in the dtype
under autocast, float32 directions), warmed up first (Triton compiles and tunes outside
what is measured), then:

- the torch profiler over ``--iterations`` fwd+bwd: each device kernel's count and mean
  time, the device time an iteration keeps the GPU busy, and the iteration's wall time.
  A busy fraction well under 1 means the launches, not the kernels, bound the op
  (the host prepares work more slowly than the GPU does it);
- the host's side of the same iterations (a second pass, with the profiler's CPU events):
  the ops and runtime calls that take the most CPU time of their own per iteration, and
  what is left of the wall time (Python, and what the profiler does not see);
- with ``--ncu-range``: one more fwd+bwd per backend between cudaProfilerStart and
  cudaProfilerStop, the range ``ncu --profile-from-start off`` profiles (bench/gpu_check.sh's
  profile stage).
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import make_inputs, make_provider  # noqa: E402


def fwd_bwd(loss_fn, x, directions):
    x.grad = None
    loss_fn(x, directions).backward()


def kernel_table(loss_fn, x, directions, iterations: int):
    """({kernel name: (launches, total us)}, device-busy us per iteration, wall us per iteration)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            fwd_bwd(loss_fn, x, directions)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / iterations * 1e6
    kernels = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:  # kernels, copies, fills
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.time_range.elapsed_us()
    busy = sum(total for _, total in kernels.values()) / iterations
    return dict(kernels), busy, wall


def host_table(loss_fn, x, directions, iterations: int, device: str = "cuda", top: int = 12):
    """([(name, calls, self CPU us)] per iteration, the top ``top`` by self time; wall us per iteration).
    The wall time is the profiled one (CPU events slow the host a little)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            fwd_bwd(loss_fn, x, directions)
        synchronize()
        wall = (time.perf_counter() - start) / iterations * 1e6
    rows = [(event.key, event.count / iterations, event.self_cpu_time_total / iterations)
            for event in prof.key_averages()]
    return sorted(rows, key=lambda row: -row[2])[:top], sum(row[2] for row in rows), wall


def print_host_table(backend, rows, traced, wall):
    print(f"{backend} host: wall {wall:.1f} us per fwd+bwd under the CPU profiler, {traced:.1f} us of it in "
          f"the ops and calls it traces, {wall - traced:.1f} us elsewhere (Python, untraced)")
    print(f"  {'calls':>8} {'self us':>9}  op or call (per fwd+bwd)")
    for name, calls, self_us in rows:
        print(f"  {calls:>8.1f} {self_us:>9.1f}  {name[:110]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--size", default="4096,512,1024", help="N,D,K")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--ncu-range", action="store_true", help="one more fwd+bwd per backend inside a "
                        "cudaProfilerStart/Stop range, for ncu --profile-from-start off")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA device")
    samples, dim, slices = (int(v) for v in args.size.split(","))
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.dtype} fwd+bwd, "
          f"N={samples} D={dim} K={slices}, {args.iterations} iterations")
    for backend in args.backends:
        loss_fn = make_provider(backend, "cuda", dtype)
        x, directions = make_inputs(1, samples, dim, slices, dtype, "cuda")
        for _ in range(3):  # compile, tune, warm the caching allocator
            fwd_bwd(loss_fn, x, directions)
        if args.ncu_range:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            fwd_bwd(loss_fn, x, directions)
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
            continue
        kernels, busy, wall = kernel_table(loss_fn, x, directions, args.iterations)
        print(f"\n{backend}: wall {wall:.1f} us per fwd+bwd, GPU busy {busy:.1f} us ({busy / wall:.2f} of it)")
        print(f"  {'launches':>8} {'mean us':>9}  kernel")
        for name, (count, total) in sorted(kernels.items(), key=lambda item: -item[1][1]):
            print(f"  {count / args.iterations:>8.1f} {total / count:>9.1f}  {name[:110]}")
        print_host_table(backend, *host_table(loss_fn, x, directions, args.iterations))


if __name__ == "__main__":
    main()
