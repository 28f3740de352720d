"""A small awkward case through a GPU backend, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitizer_case.py cuda
"""

import sys

import torch

from sigreg_kernels import sigreg

backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 37, 19, device="cuda", dtype=dtype, requires_grad=True)
    directions = torch.randn(19, 65, device="cuda", dtype=dtype)
    directions = (directions / directions.norm(dim=0)).requires_grad_()
    sigreg(x, directions, backend=backend).backward()
torch.cuda.synchronize()
print(f"{backend}: ran fwd+bwd on awkward shapes")
