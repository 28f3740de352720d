"""A small awkward case through a GPU backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitizer_case.py cuda

Without PyTorch's caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1, the default
here) every tensor is its own allocation, so memcheck sees an access past a
tensor's end instead of a read of the allocator's spare bytes.
Deterministic algorithms: the Triton backend then launches its single fixed block
configuration instead of autotuning (timing every configuration many times, which
would be slow under the sanitizer and check nothing more).
"""

import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets cuBLAS run under deterministic algorithms
os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

from sigreg_kernels import sigreg  # noqa: E402

backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
torch.use_deterministic_algorithms(True)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(2, 37, 19, device="cuda", dtype=dtype, requires_grad=True)
    directions = torch.randn(19, 65, device="cuda", dtype=dtype)
    directions = (directions / directions.norm(dim=0)).requires_grad_()
    sigreg(x, directions, backend=backend).backward()
torch.cuda.synchronize()
print(f"{backend}: ran fwd+bwd on awkward shapes")
