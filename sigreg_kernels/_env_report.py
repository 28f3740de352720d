"""``python -m sigreg_kernels``: an environment report to paste into a bug report.

Versions, the GPUs, what the build compiled (and for which GPU architectures), each
backend or the reason it is missing, and a short self-check of every available
kernel backend against ``sigreg_reference``. Exits 1 if a self-check fails.
"""

import argparse
import os
import platform
import time

import torch

from . import __version__, dispatch
from .functional import sigreg
from .reference import sigreg_reference

ENV_VARS = ("CUDA_VISIBLE_DEVICES", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "TRITON_INTERPRET",
            "SIGREG_TRITON_REGISTRATION", "SIGREG_CUDA_DISABLE_TENSOR_CORES")
# Relative errors a correct float32 kernel stays far below at the self-check's size
# (they are ~1e-6); a wrong kernel lands far above.
VALUE_TOL, GRAD_TOL = 1e-4, 1e-3


def module_version(name: str) -> str:
    try:
        module = __import__(name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "installed (version unknown)")


def arch_list_covers(arch_list: str, major: int, minor: int):
    """Whether kernels built for ``arch_list`` (TORCH_CUDA_ARCH_LIST) run on compute capability
    ``major.minor``; None when an entry cannot be read (e.g. a named one such as "Hopper").

    Machine code for X.Y runs on X.Z for Z >= Y (an "a" variant such as 9.0a only on X.Y
    itself); "+PTX" adds code that the driver compiles for any later GPU.
    """
    covered = False
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx, entry = entry.endswith("+PTX"), entry.removesuffix("+PTX")
        exact, entry = entry.endswith("a"), entry.rstrip("af")
        try:
            built = tuple(int(part) for part in entry.split("."))
        except ValueError:
            return None
        if len(built) != 2:
            return None
        covered |= (major, minor) == built if exact else (major == built[0] and minor >= built[1])
        covered |= ptx and (major, minor) >= built
    return covered


def gpus():
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(index) for index in range(torch.cuda.device_count())]


def version_lines():
    cuda = torch.version.cuda or "none (a CPU build)"
    if torch.version.hip:
        cuda = f"none (a ROCm build, HIP {torch.version.hip})"
    return [f"sigreg_kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
            f"python         {platform.python_version()} ({platform.platform()})",
            f"torch          {torch.__version__}, CUDA {cuda}",
            f"triton         {module_version('triton')}",
            f"numpy          {module_version('numpy')}"]


def gpu_lines(devices):
    if not devices:
        return ["GPU            none visible to torch (torch.cuda.is_available() is False)"]
    return [f"GPU {index}          {props.name}, sm_{props.major}{props.minor} (compute capability "
            f"{props.major}.{props.minor}), {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
            for index, props in enumerate(devices)]


def extension_lines(devices):
    info = dispatch._build_info
    if dispatch._extension is None:
        return [f"extension      missing: {dispatch._extension_reason()}"]
    # (No record, or one that says "not built": an extension left from an earlier build.)
    built_with = f"built against torch {info.TORCH}" if info and info.EXTENSION else "no build record of it"
    if not dispatch._extension.CUDA_KERNELS_BUILT:
        why = f" ({info.WHY_NO_CUDA})" if info and info.WHY_NO_CUDA else ""
        return [f"extension      loaded, {built_with}: CPU kernels only{why}"]
    archs = info.CUDA_ARCHS if info else None
    lines = [f"extension      loaded, {built_with}: CPU and CUDA kernels for {archs or 'unknown architectures'}"]
    for index, props in enumerate(devices):
        covered = None if archs is None else arch_list_covers(archs, props.major, props.minor)
        if covered is False:
            lines.append(f"               GPU {index} (sm_{props.major}{props.minor}) is not among them: the cuda backend "
                         f"cannot run there; rebuild with TORCH_CUDA_ARCH_LIST={props.major}.{props.minor}")
    return lines


def backend_table(devices):
    """``[(device, backend, reason or None)]``: every backend that could serve the device."""
    rows = []
    for device in ["cpu"] + (["cuda"] if devices else []):
        for name in dispatch.BACKENDS:
            if name in ("cpu", "cuda") and name != device:
                continue
            rows.append((device, name, dispatch.unavailable_reason(name, torch.device(device))))
    return rows


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def self_check(name: str, device: str):
    """Statistics and both gradients of ``backend=name`` against the float64 reference: (ok, text)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 128, 32, generator=generator)
    directions = torch.randn(32, 64, generator=generator)
    directions /= directions.norm(dim=0)
    weight = torch.randn(2, 64, generator=generator, dtype=torch.float64)
    results = []
    for fn, dtype, on in ((sigreg_reference, torch.float64, "cpu"), (sigreg, torch.float32, device)):
        leaves = [x.to(on, dtype).requires_grad_(), directions.to(on, dtype).requires_grad_()]
        kwargs = {} if fn is sigreg_reference else {"backend": name}
        stat = fn(*leaves, reduction="none", **kwargs)
        (stat.double() * weight.to(on)).sum().backward()
        results.append((stat, leaves[0].grad, leaves[1].grad))
    errors = [relative_error(got, want) for got, want in zip(results[1], results[0])]
    ok = errors[0] <= VALUE_TOL and max(errors[1:]) <= GRAD_TOL
    return ok, f"relative error: value {errors[0]:.1e}, grad x {errors[1]:.1e}, grad directions {errors[2]:.1e}"


def report(check: bool = True) -> bool:
    """Prints the report; returns False if a self-check failed."""
    devices = gpus()
    lines = version_lines() + gpu_lines(devices) + extension_lines(devices)
    lines += [f"env            {var}={os.environ[var]}" for var in ENV_VARS if var in os.environ]
    rows = backend_table(devices)
    lines.append("backends")
    lines += [f"  {name:<9} on {device:<4}  {'available' if reason is None else 'unavailable: ' + reason}"
              for device, name, reason in rows]
    print("\n".join(lines), flush=True)
    if not check:
        return True
    print("self-check     each kernel backend, float32 [2, 128, 32] x [32, 64], statistics and gradients against "
          "sigreg_reference in float64", flush=True)
    all_ok = True
    for device, name, reason in rows:
        if reason is not None or name == "reference":
            continue
        start = time.perf_counter()
        try:
            ok, text = self_check(name, device)
        except Exception as error:  # noqa: BLE001 - the report names it, for the bug report
            ok, text = False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        all_ok &= ok
        print(f"  {name:<9} on {device:<4}  {'ok    ' if ok else 'FAILED'}  {text} "
              f"({time.perf_counter() - start:.2f} s)", flush=True)
    return all_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sigreg_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-check", action="store_true", help="skip the self-check of the backends")
    args = parser.parse_args(argv)
    return 0 if report(check=not args.no_check) else 1
