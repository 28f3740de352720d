"""Accuracy envelope: each backend's relative error against float64 as the projections grow.

    python bench/accuracy_envelope.py                       # fp32, every backend that runs here
    python bench/accuracy_envelope.py --dtype bfloat16 --backends cpu,cuda-emulated
    python bench/accuracy_envelope.py --t-max 3,0.1 --rms 1e-5,1e-3,0.1   # small angles: one table per t_max

Embeddings are far from unit scale early in training, and the kernels' fast
paths are exact only up to a point: the angles ``t_j p`` come from one
``sin/cos(Δ p)`` pair rotated ``j`` times (angle addition), and the CPU's
vectorized sin/cos hands arguments beyond 8192 to the accurate library
functions. This prints, for projections ``p = x·a`` of growing RMS (``x``
Gaussian, unit directions), the norm-wise relative error of the loss
(``reduction="mean"``) and of ``grad_x`` against the float64 reference on the
same rounded inputs, as a markdown table (16-bit inputs: the gradients come
back in that dtype, so their rounding, ~1e-3 for bf16, is part of the error). For scale, ``eps·max|t p|``: the
error of merely rounding the largest angle to float32, which no float32
evaluation can beat, and the float32 reference's own error.

Downwards (small scales, small ``t_max``) the angles are small: ``cos(t p)`` lies
within a few ulps of 1, and ``C - phi`` is what is left after a near-total
cancellation. The kernels sum ``cos - 1`` (rotated as such) and subtract
``phi - 1 = expm1(-t^2/2)``, so there they stay at float32's relative precision
where the plain float32 reference does not.

The Triton kernels run under the interpreter and the CUDA kernels in the host
emulation (``tests/emulated_cuda.py``) where there is no GPU: they compute
what the GPU computes, except the GPU's own sin/cos and tensor-core rounding.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
# Up to 1e4, and one step beyond: there the CPU's max |Δ p| passes 8192 and the fallback takes over.
# Down to 1e-5: small angles, where C - phi is a small difference of two numbers near 1.
RMS = "1e-5,1e-4,1e-3,1e-2,0.1,1,10,100,1e3,1e4,3e4"


def case_inputs(rms, samples, dim, slices, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim, generator=generator, dtype=torch.float64) * rms
    directions = torch.randn(dim, slices, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    return x.to(dtype), directions.to(dtype)


def loss_and_grad(fn, x, directions):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, directions)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().double(), grad.double()


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def backends_here(names, knots, t_max):
    """{name: fn(x, directions) -> loss}; the fuzzer's table says what can run here and how."""
    import fuzz_backends
    from sigreg_kernels import sigreg_reference

    table = fuzz_backends.backend_table()
    chosen = {"reference fp32": lambda x, a: sigreg_reference(x.float(), a.float(), knots=knots, t_max=t_max)}
    for name in names:
        backend = table.get(name)
        if backend is None:
            print(f"(skipping {name}: it cannot run here)", file=sys.stderr)
            continue
        backend.prepare()
        case = fuzz_backends.Case(seed=0, batch=[], n=1, d=1, k=1, knots=knots, t_max=t_max, reduction="mean",
                                  tensor_cores=True)

        def fn(x, a, backend=backend, case=case):
            return backend.fn(case, x.to(backend.device), a.to(backend.device), torch.ones(()), None)[0].cpu()
        chosen[name] = fn
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cpu,triton,cuda,cuda-emulated")
    p.add_argument("--rms", default=RMS, help="comma-separated RMS values of the projections")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--knots", type=int, default=17)
    p.add_argument("--t-max", default="3.0,0.1", help="comma-separated: one table per value")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before sigreg_kernels.gpu.triton.ops is imported
    sys.path.insert(0, str(TESTS))
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    from sigreg_kernels import sigreg_reference

    dtype = getattr(torch, args.dtype)
    for t_max in (float(v) for v in args.t_max.split(",")):
        print_table(args, dtype, t_max, sigreg_reference)
        print()


def print_table(args, dtype, t_max, sigreg_reference):
    fns = backends_here([n for n in args.backends.split(",") if n], args.knots, t_max)
    eps = torch.finfo(torch.float32).eps
    delta = t_max / (args.knots - 1)
    header = ["rms \\|x·a\\|", "max \\|Δ p\\|", "max \\|t p\\|", "eps·max\\|t p\\|"]
    header += [f"{name} (loss / grad_x)" for name in fns]
    rows = []
    start = time.perf_counter()
    for rms in (float(v) for v in args.rms.split(",")):
        x, a = case_inputs(rms, args.samples, args.dim, args.slices, dtype)
        # The exact gradient (not rounded to x's dtype: a backend's gradient in bf16 shows that rounding).
        truth = loss_and_grad(lambda u, v: sigreg_reference(u, v.double(), knots=args.knots, t_max=t_max),
                              x.double(), a)
        largest = t_max * (x.double() @ a.double()).abs().max().item()
        row = [f"{rms:g}", f"{largest * delta / t_max:.3g}", f"{largest:.3g}", f"{eps * largest:.1e}"]
        for fn in fns.values():
            ours = loss_and_grad(fn, x, a)
            row.append(" / ".join(f"{relative_error(o, t):.1e}" for o, t in zip(ours, truth)))
        rows.append(row)
        print(f"t_max {t_max:g}, rms {rms:g} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print(f"{args.dtype} inputs, N={args.samples}, D={args.dim}, K={args.slices}, knots={args.knots}, "
          f"t_max={t_max:g}: relative error against float64 (loss / grad_x)\n")
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---:" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
