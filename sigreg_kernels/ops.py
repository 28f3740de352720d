"""The C++ op ``sigreg::ecf_sums``: its fake (shape) kernels and its autograd.

The schema and the device kernels live in C++ (``csrc/sigreg.cpp``); this file
teaches torch.compile its shapes and wires its backward, itself an op. The
contract is in ``op_registration.py``.
"""

import torch

from . import _C  # loads the library that defines the ops
from .op_registration import fake_ecf_sums, fake_ecf_sums_backward, register_ecf_autograd


@torch.library.register_fake("sigreg::ecf_sums")
def _fake_ecf_sums(x, directions, knots, t_max):
    # The CPU kernel keeps the projection (it saves a third matmul); CUDA recomputes.
    return fake_ecf_sums(x, directions, knots, t_max, keeps_projection=x.device.type == "cpu")


torch.library.register_fake("sigreg::ecf_sums_backward")(fake_ecf_sums_backward)
register_ecf_autograd("sigreg::ecf_sums", torch.ops.sigreg.ecf_sums_backward.default)

CUDA_KERNELS_BUILT = bool(getattr(_C, "WITH_CUDA", False))
