"""Cost model of the GPU backends (cuda, triton) on an H200 or H100, without a GPU.

    python bench/cost_model.py --gpu H200 --csv FILE [--check] [--measured BENCH_CSV] [--profile PROFILE_TXT]

For every kernel each pass runs (gpu/fused.py's routes: bf16 -> ecf_partials, statistic
(which also reduces the loss) | slice_gradient, G@A^T; fp32 at "highest" precision -> the SGEMM
projection first and the kernels on it, projected=True) at every benchmark shape
(N in 1024/4096/16384, D in 64/512/2048, K in 256/1024/4096, batch 1 and 8, bf16 and
fp32), one CSV row. The bench's directions need no gradient, so x^T@G is left out
unless --grad-directions; under autocast the bench's float32 directions are cast to
bf16 (one small op, row cast_directions).

Blocks per SM, from the compiled kernels (ptxas for CUDA sm_90a, Triton's compile
for sm_90, both without a GPU; cached): min(65536 // (regs rounded up to 8 x
threads), 228 KiB // (smem + 1 KiB), 32, 2048 // threads); waves = blocks /
(SMs x blocks per SM).

Time of one of the backend's kernels:
    max((t_mma + t_fp32) x ceil(w) / w, t_dram, t_l2) + launch
    w      = blocks / (SMs x g), g = the co-resident blocks that saturate an SM:
             min(blocks per SM, ceil(8 warps / warps per block)); g = blocks per SM gives w = waves
    t_mma  = 2 B N D K / (tensor-core peak x e_mma)    e_mma by the SASS: HGMMA 0.60, HMMA 0.40
    t_fp32 = slots / (issue rate x 0.80 x hide)         issue rate = SMs x 128 x clock
             slots per element p (B N K of them) = sincos 32 + (T-1) x (rotation 4 + accumulation 2)
             + 7 (forward) or 6 (backward); hide = min(1, resident warps per scheduler / 2)
    t_dram = bytes / (HBM peak x achievable fraction)   x and A once, G (backward), partials, coef
    t_l2   = tiles re-read / L2 bandwidth: x once per slice tile (B N D K / BLOCK_K x size), A once
             per row tile (B N K D / BLOCK_N x size; once per block where the plan keeps it resident)
Library ops (cuBLAS, torch): max(flops / (peak x 0.70; SGEMM 0.75 of the FP32 peak),
bytes / achievable bandwidth) + launch; no wave quantization (split-K / stream-K).
Launch: 2 us per kernel; the statistic kernel's loss adds a 1 us tail (the last block).

Floor of a pass, the sum over its kernels of max(arithmetic, compulsory bytes): the
arithmetic is the matrix products at the datasheet peak (bf16: tensor cores; fp32
"highest": the FP32 FMA peak) + the element loop without extras (sincos + 6 slots
per knot, per element) at the full issue rate; the compulsory bytes (x and A read
once per pass, grad_x written) at the datasheet bandwidth. Every constant, with its
source, is in bench/cost_model/hardware.py; --check exits 1 unless waves >= 2 for
ecf_partials and slice_gradient wherever N*K >= 2^20 and the headline (bf16, B=1,
N=4096, D=512, K=1024, fwd+bwd) is within 2x of its floor, for each backend.
"""

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost_model import hardware as hw  # noqa: E402  (the package bench/cost_model/)
from cost_model.model import COLUMNS  # noqa: E402
from cost_model.passes import (GRID_BATCH, GRID_DTYPES, HEADLINE, check, grid_cases, headline_cases,  # noqa: E402
                               model_rows, totals)
from cost_model.measured import read_profile  # noqa: E402
from cost_model.resources import ModelError, source_versions  # noqa: E402


def print_assumptions(gpu, backends):
    print(f"# {gpu.name}: {gpu.sms} SMs at {gpu.clock_ghz} GHz; bf16 {gpu.bf16_tflops:g} TFLOP/s, "
          f"FP32 {gpu.fp32_tflops:.1f} TFLOP/s ({gpu.issue_rate / 1e12:.1f} T issue slots/s); "
          f"HBM {gpu.dram_tbs} TB/s x {gpu.dram_efficiency:.2f}; L2 {gpu.l2_tbs} TB/s (assumed). {gpu.source}")
    print(f"# efficiencies: issue {hw.ISSUE_EFFICIENCY}, in-kernel MMA {hw.MMA_EFFICIENCY}, library GEMM "
          f"{hw.LIBRARY_GEMM_EFFICIENCY}; launch {hw.LAUNCH_US} us")
    print(f"# sources (sha256 prefixes): {source_versions(backends)}")


def print_rows(rows):
    print(f"{'backend':>7} {'kernel':>20} {'pass':>4} {'B':>2} {'N':>6} {'D':>5} {'K':>5} {'dtype':>5} "
          f"{'blocks':>7} {'/SM':>3} {'waves':>6} {'regs':>4} {'smem':>6} {'mma':>5} {'bound':>7} "
          f"{'pred us':>9} {'floor us':>9}  function")
    for r in rows:
        print(f"{r.backend:>7} {r.kernel:>20} {r.pass_:>4} {r.batch:>2} {r.N:>6} {r.D:>5} {r.K:>5} {r.dtype:>5} "
              f"{r.blocks:>7} {r.blocks_per_sm:>3} {r.waves:>6.2f} {r.registers or '':>4} {r.smem or '':>6} "
              f"{r.mma:>5} {r.bound:>7} {r.predicted_us:>9.2f} {r.floor_us:>9.2f}  {r.function}")


def print_totals(all_totals):
    print(f"\n{'backend':>7} {'dtype':>5} {'B':>2} {'N':>6} {'D':>5} {'K':>5} {'fwd us':>9} {'bwd us':>9} "
          f"{'fwd+bwd':>9} {'floor':>9} {'ratio':>6}")
    for t in all_totals:
        print(f"{t.backend:>7} {t.dtype:>5} {t.batch:>2} {t.N:>6} {t.D:>5} {t.K:>5} {t.fwd_us:>9.1f} "
              f"{t.bwd_us:>9.1f} {t.predicted_us:>9.1f} {t.floor_us:>9.1f} {t.ratio:>6.2f}")


def print_measured(path, all_totals):
    """bench_sigreg.py's rows (provider, dtype, batch, N, D, K, mode, ms) beside the prediction."""
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    predicted = {}
    for t in all_totals:
        key = (t.backend, t.dtype, t.batch, t.N, t.D, t.K)
        predicted.update({key + ("fwd",): t.fwd_us, key + ("bwd",): t.bwd_us, key + ("fwd+bwd",): t.predicted_us})
    print(f"\n# measured ({path}) beside predicted")
    print("# (<backend>+graph: replayed from a CUDA graph, the GPU's time alone, the kernels' to compare)")
    print(f"{'provider':>12} {'dtype':>5} {'B':>2} {'N':>6} {'D':>5} {'K':>5} {'mode':>8} {'pred us':>9} "
          f"{'meas us':>9} {'meas/pred':>9}")
    with open(path) as f:
        for row in csv.DictReader(f):
            provider = row["provider"]
            backend = provider[:-len("+graph")] if provider.endswith("+graph") else provider
            key = (backend, names.get(row["dtype"], row["dtype"]), int(row["batch"]), int(row["N"]),
                   int(row["D"]), int(row["K"]), row["mode"])
            if key in predicted:
                measured = float(row["ms"]) * 1e3
                print(f"{provider:>12} {key[1]:>5} {key[2]:>2} {key[3]:>6} {key[4]:>5} {key[5]:>5} {key[6]:>8} "
                      f"{predicted[key]:>9.1f} {measured:>9.1f} {measured / predicted[key]:>9.2f}")


def print_profile(path, headline_rows):
    """Each kernel of the headline (bf16 fwd+bwd) predicted beside its measured GPU time, from
    bench/profile_kernels.py's output: the torch profiler's and, where it ran, ncu's."""
    measured = read_profile(path)
    print(f"\n# headline kernels: predicted beside measured ({path}; us per fwd+bwd)")
    print(f"{'backend':>7} {'kernel':>16} {'pred us':>9} {'profiler':>9} {'ncu':>9} {'prof/pred':>9}")
    for backend in sorted({r.backend for r in headline_rows}):
        predicted = {}
        for r in headline_rows:
            if r.backend == backend:
                predicted[r.kernel] = predicted.get(r.kernel, 0.0) + r.predicted_us
        for kernel, pred in predicted.items():
            prof = measured.profiler.get(backend, {}).get(kernel)
            ncu = measured.ncu.get(backend, {}).get(kernel)
            shown = [f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in (prof, ncu)]
            ratio = f"{prof / pred:>9.2f}" if prof is not None and pred > 0 else f"{'-':>9}"
            print(f"{backend:>7} {kernel:>16} {pred:>9.1f} {shown[0]} {shown[1]} {ratio}")
        if backend in measured.wall:
            total = sum(predicted.values())
            print(f"{backend:>7} {'(all kernels)':>16} {total:>9.1f} {measured.busy[backend]:>9.1f} {'':>9} "
                  f"{measured.busy[backend] / total:>9.2f}   wall {measured.wall[backend]:.1f} us: the GPU busy "
                  f"{measured.busy[backend] / measured.wall[backend]:.2f} of it; unmodelled kernels "
                  f"{measured.other.get(backend, 0.0):.1f} us")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="H200", choices=sorted(hw.GPUS))
    parser.add_argument("--csv", help="write the per-kernel rows here")
    parser.add_argument("--backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"])
    parser.add_argument("--shapes", nargs="+", help="N,D,K triples instead of the benchmark grid")
    parser.add_argument("--batch", nargs="+", type=int, default=list(GRID_BATCH))
    parser.add_argument("--dtypes", nargs="+", default=list(GRID_DTYPES), choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--grad-directions", action="store_true", help="directions need a gradient: x^T@G too")
    parser.add_argument("--weights", action="store_true",
                        help="with sample weights (a padding mask): the kernels' extra work, the weights' sums, "
                             "the mask on grad_x (the weighted kernels modelled with the unweighted ones' resources)")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the criteria of issue 11 hold")
    parser.add_argument("--quiet", action="store_true", help="totals, headline and checks only")
    parser.add_argument("--measured", help="a CSV of bench/bench_sigreg.py to print beside the prediction")
    parser.add_argument("--profile", help="bench/profile_kernels.py's output (gpu_check's profile.txt): the "
                        "headline's kernels, measured beside predicted")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    gpu = hw.GPUS[args.gpu]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else None
    cases = grid_cases(args.backends, shapes, args.batch, args.dtypes, args.grad_directions, args.weights)
    headline = headline_cases(args.backends, args.grad_directions, args.weights)
    try:
        rows = model_rows(gpu, cases)
        missing = [c for c in headline if c not in cases]
        headline_rows = [r for r in rows + model_rows(gpu, missing)
                         if (r.dtype, r.batch, r.N, r.D, r.K) == tuple(HEADLINE.values())]
    except ModelError as error:
        print(f"cost_model: {error}", file=sys.stderr)
        return 2
    print_assumptions(gpu, args.backends)
    if not args.quiet:
        print_rows(rows)
    all_totals = totals(rows)
    print_totals(all_totals)
    if args.measured:
        print_measured(args.measured, all_totals)
    if args.profile:
        print_profile(args.profile, headline_rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(r.csv() for r in rows)
        print(f"\n# {len(rows)} rows written to {args.csv}")
    print("\n# headline: bf16, B=1, N=4096, D=512, K=1024", end="")
    print_totals(totals(headline_rows))
    print("\n# criteria (issue 11)")
    results = check(rows, headline_rows)
    for ok, text in results:
        print(f"{'NOTE' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")
    return 1 if args.check and any(ok is False for ok, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
