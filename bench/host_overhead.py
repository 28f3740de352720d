"""The host cost of one SIGReg forward + backward on the GPU backends, measured without a GPU.

    python bench/host_overhead.py            # ~30 s on one CPU thread

At the sizes where the fused ops are fastest their time is the host's: Python, the
dispatcher, the autograd engine, the launchers. This measures that part on the CPU,
where it is the same code: the ``cuda`` and ``triton`` backends' real orchestration
(``functional.sigreg`` -> ``gpu/fused.py`` -> each backend's registered ops, their
checks and plans), with **null kernels** standing in for the device code:

- ``cuda``: the ops ``torch.ops.sigreg.*`` get CPU kernels that only allocate their
  outputs (the ATen launcher in ``csrc/cuda`` is C++ and does the same plus one launch);
- ``triton``: under ``TRITON_INTERPRET=1`` (set here), the launchers run as on the GPU,
  plan and pack their arguments, and call a null kernel instead of the interpreter.
  (Under the interpreter the ops are registered with ``custom_op``, on the GPU with
  ``triton_op``: the same dispatch plus a decomposition that eager calls do not use.)

Against, in the same run: the eager reference (``sigreg_reference``, every op real
but tiny) and one autograd op (``x.sum()``), the floor of any autograd entry point;
and the ``cuda`` path with a padding mask (its sums, the mean's divisor, the masked gradient).
The shape is tiny, ``x (4, 16, 8)``, ``K = 16``, float32 at "high" matmul precision
(the route of 16-bit inputs, without CPU 16-bit GEMMs in the time). One CPU thread;
the median of 7 batches. Not counted: the launches themselves (a few us each on a
GPU, Triton's JIT launcher more: see docs/benchmarks.md), and the GPU's own time.
"""

import argparse
import contextlib
import os
import platform
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the launchers accept CPU tensors

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sigreg_kernels  # noqa: E402
from sigreg_kernels import dispatch, sigreg, sigreg_reference  # noqa: E402

TRITON_KERNELS = ("ecf_partials_kernel", "ecf_partials_projected_kernel", "statistic_kernel",
                  "slice_gradient_kernel", "slice_gradient_projected_kernel")


class NullKernel:
    """``kernel[grid](*args, **meta)`` that launches nothing (and counts the calls)."""

    calls = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **meta):
        NullKernel.calls += 1


@contextlib.contextmanager
def null_cuda_kernels():
    """CPU kernels for the cuda backend's ops that allocate their outputs and compute nothing."""
    from sigreg_kernels import extension  # noqa: F401  (defines the ops)

    def ecf_partials(x, directions, knots, t_max, arrivals=None, weights=None):
        slices = x.shape[2] if directions is None else directions.shape[1]
        return x.new_empty((x.shape[0], 1, 2, slices, knots), dtype=torch.float32)

    def statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None, moments=None,
                  unbiased=False):
        batch, slices = partials.shape[0], partials.shape[3]
        return (partials.new_empty((batch, slices)), partials.new_empty((batch, 2, slices, knots)),
                partials.new_empty(()))

    def slice_gradient(coef, scale, x, directions, knots, t_max, weights=None):
        slices = x.shape[2] if directions is None else directions.shape[1]
        return x.new_empty((x.shape[0], x.shape[1], slices))

    def slice_gradient_(projection, coef, scale, knots, t_max, weights=None):
        return None

    library = torch.library.Library("sigreg", "IMPL")
    for name, kernel in [("ecf_partials", ecf_partials), ("statistic", statistic),
                         ("slice_gradient", slice_gradient), ("slice_gradient_", slice_gradient_)]:
        library.impl(name, kernel, "CPU")
    try:
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def null_triton_kernels():
    from sigreg_kernels.gpu.triton import ops

    saved = {name: getattr(ops, name) for name in TRITON_KERNELS}
    for name in TRITON_KERNELS:
        setattr(ops, name, NullKernel())
    before = NullKernel.calls
    try:
        yield
    finally:
        for name, kernel in saved.items():
            setattr(ops, name, kernel)
    if NullKernel.calls == before:  # else the interpreter ran the real kernels, and was timed
        raise RuntimeError("the Triton launchers did not call the null kernels set on gpu.triton.ops")


@contextlib.contextmanager
def gpu_backends_on_cpu():
    """Let ``sigreg(..., backend="cuda"|"triton")`` take CPU tensors (their kernels are the null ones)."""
    original = dispatch.unavailable_reason

    def reason(name, device, dtype=None):
        return None if name in ("cuda", "triton") else original(name, device, dtype)

    dispatch.unavailable_reason = reason
    try:
        yield
    finally:
        dispatch.unavailable_reason = original


def per_call_us(fn, x, calls: int, batches: int = 7) -> float:
    def run():
        x.grad = None
        fn().backward()

    for _ in range(max(20, calls // 10)):
        run()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[batches // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    x = torch.randn(4, 16, 8, requires_grad=True)
    directions = torch.randn(8, 16)
    directions = directions / directions.norm(dim=0)
    mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) > 0.2  # a padding mask
    entries = [
        ("x.sum()  [one autograd op: the floor]", contextlib.nullcontext, lambda: x.sum()),
        ("sigreg_reference(x, A)  [eager reference]", contextlib.nullcontext,
         lambda: sigreg_reference(x, directions)),
        ("sigreg(x, A, backend='cuda')  [null kernels]", null_cuda_kernels,
         lambda: sigreg(x, directions, backend="cuda")),
        ("sigreg(x, A, backend='triton')  [null kernels]", null_triton_kernels,
         lambda: sigreg(x, directions, backend="triton")),
        ("sigreg(x, A, backend='cuda', weights=mask)  [null kernels]", null_cuda_kernels,
         lambda: sigreg(x, directions, backend="cuda", weights=mask)),
    ]
    print(f"# {platform.processor() or platform.machine()}, 1 thread, torch {torch.__version__}, "
          f"sigreg_kernels {sigreg_kernels.__version__}, python {platform.python_version()}")
    print(f"# host cost of forward + backward at x (4, 16, 8), K = 16, float32 (\"high\"); median of 7 batches "
          f"of {args.calls} calls")
    print(f"  {'entry point':<62} {'us/call':>8}  vs eager reference")
    reference_us = None
    with gpu_backends_on_cpu():
        for label, context, fn in entries:
            with context():
                us = per_call_us(fn, x, args.calls)
            if "eager reference" in label:
                reference_us = us
            ratio = f"{us / reference_us:.2f}x" if reference_us else "-"
            print(f"  {label:<62} {us:>8.1f}  {ratio}", flush=True)


if __name__ == "__main__":
    main()
