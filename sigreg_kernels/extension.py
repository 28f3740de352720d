"""The C++ ops: their fake (shape) kernels, and the autograd of ``sigreg::ecf_sums``.

The schema and the device kernels live in C++ (``csrc/sigreg.cpp``); this file
teaches torch.compile their shapes. ``sigreg::ecf_sums`` (the CPU backend) wires
its backward, itself an op; its contract is in ``cpu/registration.py``. The GPU
kernel ops ``ecf_partials``, ``statistic``, ``slice_gradient`` and
``slice_gradient_`` (CUDA) compute ``gpu/contract.py``'s functions; ``gpu/fused.py``
strings them together and does their autograd (``gpu/cuda/ops.py`` calls them).
"""

import torch

from . import _C  # loads the library that defines the ops
from .cpu.registration import fake_ecf_sums, fake_ecf_sums_backward, register_ecf_autograd
from .gpu.cuda import plan as cuda_plan


@torch.library.register_fake("sigreg::ecf_sums")
def _fake_ecf_sums(x, directions, knots, t_max, weights=None):
    # The CPU kernel keeps the projection (it saves a third matmul).
    return fake_ecf_sums(x, directions, knots, t_max, keeps_projection=x.device.type == "cpu", weights=weights)


torch.library.register_fake("sigreg::ecf_sums_backward")(fake_ecf_sums_backward)
register_ecf_autograd("sigreg::ecf_sums", torch.ops.sigreg.ecf_sums_backward.default)

CUDA_KERNELS_BUILT = bool(getattr(_C, "WITH_CUDA", False))


def _num_sms(device: torch.device) -> int:
    """The SM count the CUDA launcher plans with (the row splits of ecf_partials depend on it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # (a meta or CPU tensor: no CUDA kernel runs on it; an H100/H200's count)


@torch.library.register_fake("sigreg::ecf_partials")
def _fake_ecf_partials(x, directions, knots, t_max, arrivals=None, weights=None):
    batch, samples, dim = x.shape
    slices = dim if directions is None else directions.shape[1]
    plan = cuda_plan.plan_ecf_partials(batch, samples, dim, slices, knots, x.dtype, True, directions is None,
                                       _num_sms(x.device))
    return x.new_empty((batch, plan.splits, 2, slices, knots), dtype=torch.float32)


@torch.library.register_fake("sigreg::statistic")
def _fake_statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals=None, moments=None,
                    unbiased=False):
    batch, _, _, slices, _ = partials.shape
    return partials.new_empty((batch, slices)), partials.new_empty((batch, 2, slices, knots)), partials.new_empty(())


@torch.library.register_fake("sigreg::slice_gradient")
def _fake_slice_gradient(coef, scale, x, directions, knots, t_max, weights=None):
    slices = x.shape[2] if directions is None else directions.shape[1]
    return x.new_empty((x.shape[0], x.shape[1], slices))


@torch.library.register_fake("sigreg::slice_gradient_")
def _fake_slice_gradient_(projection, coef, scale, knots, t_max, weights=None):
    return None
