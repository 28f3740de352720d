"""Which kernel computes the ECF sums: by name, or the fastest one built for the device."""

import os

import torch

from .op_registration import accumulation_dtype
from .quadrature import quadrature

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:
    from . import ops as _ops

    _EXTENSION_ERROR = None
except ImportError as error:  # the compiled extension was not built
    _ops, _EXTENSION_ERROR = None, error

def _triton_unavailable_reason(device: torch.device):
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype | None = None):
    """Why backend ``name`` cannot run on ``device`` (with inputs of ``dtype``), or None if it can."""
    if name == "reference":
        return None
    if name in ("cuda", "triton") and dtype == torch.float64:
        return "the GPU kernels take float32, bfloat16 or float16 inputs (float64 runs on 'cpu' and 'reference')"
    if name in ("cpu", "cuda"):
        if _ops is None:
            return f"the compiled extension sigreg_kernels._C is not built ({_EXTENSION_ERROR})"
        if device.type != name:
            return f"the {name} backend takes {name} tensors, got a {device.type} tensor"
        if name == "cuda" and not _ops.CUDA_KERNELS_BUILT:
            return "the extension was built without CUDA kernels (see the README: FORCE_CUDA=1)"
        return None
    if name == "triton":
        return _triton_unavailable_reason(device)
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


def available_backends(device="cpu", dtype: torch.dtype | None = None):
    """Names of the backends that can run on ``device`` (with inputs of ``dtype``), fastest first."""
    device = torch.device(device)
    order = ("cpu", "reference") if device.type == "cpu" else ("cuda", "triton", "reference")
    return [name for name in order if unavailable_reason(name, device, dtype) is None]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    if name == "auto":
        return available_backends(device, dtype)[0]
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


def reference_ecf_sums(x, directions, knots: int, t_max: float):
    """The ECF sums in plain PyTorch, materializing ``[B, N, K, T]`` (``directions=None``: ``P = x``)."""
    acc = accumulation_dtype(x.dtype)
    t, _, _ = quadrature(knots, t_max, dtype=acc, device=x.device)
    projection = x if directions is None else x @ directions
    angles = projection.to(acc).unsqueeze(-1) * t
    return torch.stack((angles.cos().sum(dim=-3), angles.sin().sum(dim=-3)), dim=1)


def ecf_sums(name: str, x, directions, knots: int, t_max: float):
    """``[B, 2, K, T]`` sums of cos and sin over the samples of ``x: [B, N, D]`` (reference, cpu)."""
    if name == "reference":
        return reference_ecf_sums(x, directions, knots, t_max)
    if name == "cpu":
        return torch.ops.sigreg.ecf_sums(x, directions, knots, t_max)[0]
    raise ValueError(f"backend {name!r} does not compute the ECF sums alone (see fused.py)")
