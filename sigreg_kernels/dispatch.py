"""Which kernel computes the ECF sums: by name, or the fastest one built for the device."""

import os

import torch

from .core.numerics import accumulation_dtype
from .core.quadrature import quadrature

BACKENDS = ("reference", "cpu", "cuda", "triton")

try:
    from . import extension as _extension

    _EXTENSION_ERROR = None
except ImportError as error:  # the compiled extension was not built, or does not load
    _extension, _EXTENSION_ERROR = None, error

try:
    from . import _build_info  # what setup.py compiled, and why not
except ImportError:  # a source tree that was never built
    _build_info = None

_SOURCE_INSTALL = "pip install --no-build-isolation <sigreg_kernels' source folder or sdist>"


def _extension_reason() -> str:
    """Why the compiled extension sigreg_kernels._C is missing, and how to get it."""
    how = f"to get the cpu and cuda backends, reinstall with torch and a C++ compiler present: {_SOURCE_INSTALL}"
    if getattr(_build_info, "EXTENSION", None) is False:
        return f"this install has no compiled extension: {_build_info.WHY_NO_EXTENSION}; {how}"
    built_with = getattr(_build_info, "TORCH", None)
    if built_with is not None and built_with != torch.__version__:
        return (f"the compiled extension sigreg_kernels._C does not load ({_EXTENSION_ERROR}): it was built against "
                f"torch {built_with}, not this torch {torch.__version__}; reinstall it against this torch: "
                f"{_SOURCE_INSTALL} --force-reinstall")
    return f"the compiled extension sigreg_kernels._C does not load ({_EXTENSION_ERROR}); {how}"


def _no_cuda_kernels_reason() -> str:
    why = getattr(_build_info, "WHY_NO_CUDA", None)
    return (f"the extension was built without the CUDA kernels{f' ({why})' if why else ''}; to get them, "
            f"reinstall with a CUDA build of torch and the CUDA toolkit (nvcc) present: FORCE_CUDA=1 {_SOURCE_INSTALL}")


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
        if _extension is None:
            return _extension_reason()
        if device.type != name:
            return f"the {name} backend takes {name} tensors, got a {device.type} tensor"
        if name == "cuda" and not _extension.CUDA_KERNELS_BUILT:
            return _no_cuda_kernels_reason()
        return None
    if name == "triton":
        return _triton_unavailable_reason(device)
    raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")


class AvailableBackends(list):
    """A list of backend names that also says why the others of the device are missing (``unavailable``)."""

    def __init__(self, names, unavailable: dict):
        super().__init__(names)
        self.unavailable = unavailable

    def __repr__(self):
        why = "".join(f"; {name} unavailable: {reason}" for name, reason in self.unavailable.items())
        return super().__repr__() + (f"  ({why[2:]})" if why else "")


def _device_backends(device: torch.device):
    return ("cpu", "reference") if device.type == "cpu" else ("cuda", "triton", "reference")


def available_backends(device="cpu", dtype: torch.dtype | None = None) -> AvailableBackends:
    """Names of the backends that can run on ``device`` (with inputs of ``dtype``), fastest first.

    The list's ``unavailable`` maps each other backend of the device to the reason it
    cannot run (its repr shows them): e.g. an install without the compiled extension.
    """
    device = torch.device(device)
    reasons = {name: unavailable_reason(name, device, dtype) for name in _device_backends(device)}
    return AvailableBackends([name for name, reason in reasons.items() if reason is None],
                             {name: reason for name, reason in reasons.items() if reason is not None})


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    if name == "auto":  # a plain loop (no list subclass): this also runs inside torch.compile's traces
        for candidate in _device_backends(device):
            if unavailable_reason(candidate, device, dtype) is None:
                return candidate  # ("reference" always can)
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


def reference_ecf_sums(x, directions, knots: int, t_max: float, weights=None):
    """The ECF sums (of cos - 1 and sin) in plain PyTorch, materializing ``[B, N, K, T]``
    (``directions=None``: ``P = x``); ``weights [B, N]`` weight the rows (0: left out)."""
    acc = accumulation_dtype(x.dtype)
    t, _, _ = quadrature(knots, t_max, dtype=acc, device=x.device)
    if weights is not None:  # a row of weight 0 adds nothing, whatever it holds (no NaN into any gradient)
        weights = weights.to(acc).unsqueeze(-1)
        x = torch.where(weights > 0, x, 0.0)
    projection = (x if directions is None else x @ directions).to(acc)
    if weights is not None:  # and masked projections 0 even where non-finite directions make 0 * inf
        projection = torch.where(weights > 0, projection, 0.0)
    angles = projection.unsqueeze(-1) * t
    cos_minus_one = -2 * (angles / 2).sin().square()  # cos - 1, full relative precision near 0
    sin = angles.sin()
    if weights is not None:
        cos_minus_one, sin = cos_minus_one * weights.unsqueeze(-1), sin * weights.unsqueeze(-1)
    return torch.stack((cos_minus_one.sum(dim=-3), sin.sum(dim=-3)), dim=1)


def ecf_sums(name: str, x, directions, knots: int, t_max: float, weights=None):
    """``[B, 2, K, T]`` sums of cos - 1 and sin over the samples of ``x: [B, N, D]`` (reference, cpu),
    weighted by ``weights [B, N]`` where given."""
    if name == "reference":
        return reference_ecf_sums(x, directions, knots, t_max, weights)
    if name == "cpu":
        return torch.ops.sigreg.ecf_sums(x, directions, knots, t_max, weights)[0]
    raise ValueError(f"backend {name!r} does not compute the ECF sums alone (see gpu/fused.py)")
