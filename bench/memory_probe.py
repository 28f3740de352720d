"""Peak extra CPU memory of one fwd+bwd, in a fresh process (used by bench_sigreg.py).

    MALLOC_MMAP_THRESHOLD_=65536 python bench/memory_probe.py PROVIDER BATCH N D K DTYPE

With that threshold glibc maps every large allocation on its own and unmaps it
when freed, so the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) is the peak of the live tensors. Prints one JSON line.
"""

import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from providers import make_inputs, make_provider  # noqa: E402


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def main():
    provider, batch, samples, dim, slices, dtype = sys.argv[1:7]
    dtype = getattr(torch, dtype)
    x, directions = make_inputs(int(batch), int(samples), int(dim), int(slices), dtype, "cpu")
    loss_fn = make_provider(provider, "cpu", dtype)
    for _ in range(2):  # warm up: compile, library buffers
        x.grad = None
        loss_fn(x, directions).backward()
    x.grad = None
    gc.collect()
    base = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    loss_fn(x, directions).backward()
    peak = status_bytes("VmHWM")
    print(json.dumps({"provider": provider, "peak_extra_mib": (peak - base) / 2**20}))


if __name__ == "__main__":
    main()
