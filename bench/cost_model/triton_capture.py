"""Compile the Triton backend's launches for sm_90 on a machine without a GPU.

    python -m cost_model.triton_capture SMS < calls.json    # prints {call key: [launch, ...]} as JSON

Each call names a kernel of gpu/contract.py and its shapes. The backend's own
function (``fused.backend_kernels("triton")``) runs on CPU tensors that are never
read, with three substitutions, so that what is compiled is exactly what the
launcher would launch on the GPU:
- Triton's driver is a stand-in that reports an sm_90 target (the compiler and its
  ptxas need no GPU);
- every kernel launch becomes a compile-only warm-up, recorded with its grid, its
  compile-time constants, warps and stages, and the compiled kernel's resources
  (registers from the cubin, shared memory from Triton's metadata, matrix
  instructions from the SASS);
- the plan functions of ``sigreg_kernels.gpu.triton.plan`` are called as on the GPU:
  with ``num_sms=SMS`` (the count the launchers read off the device) and any
  argument beyond gpu/plan.py's signature at its default.
Run in a fresh process only: it changes Triton's global state.
"""

import inspect
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as driver_config
from triton.runtime.jit import JITFunction

from cost_model.resources import disassembler, sass_mma

PLAN_FUNCTIONS = ("plan_ecf_partials", "plan_statistic", "plan_slice_gradient")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Sm90Driver:
    """The part of Triton's driver that compiling needs: an sm_90 target, device 0, stream 0."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    def __init__(self):
        self.launches, self.compiled = [], {}
        self.tool = disassembler()

    def resources(self, kernel) -> dict:
        if id(kernel) not in self.compiled:
            with tempfile.TemporaryDirectory() as tmp:
                cubin = Path(tmp) / "kernel.cubin"
                cubin.write_bytes(kernel.asm["cubin"])
                usage = subprocess.run([self.tool, "--dump-resource-usage", str(cubin)], capture_output=True,
                                       text=True, check=True).stdout
                mma = sass_mma(cubin, self.tool)
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
            self.compiled[id(kernel)] = {
                "registers": int(found.group(1)), "spill_bytes": int(found.group(2)) + int(found.group(3)),
                "smem": int(kernel.metadata.shared), "mma": next(iter(mma.values()), "unknown"),
                "num_warps": int(kernel.metadata.num_warps), "num_stages": int(kernel.metadata.num_stages)}
        return self.compiled[id(kernel)]

    def install(self):
        original = JITFunction.run
        recorder = self

        def run(self, *args, grid, warmup, **kwargs):
            kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
            names = [p.name for p in self.params]
            bound = inspect.signature(self.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
            bound.apply_defaults()
            values = dict(bound.arguments)
            if callable(grid):
                grid = grid(values)
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            constexprs = {p.name: _jsonable(values.get(p.name)) for p in self.params if p.is_constexpr}
            recorder.launches.append({"kernel": self.fn.__name__, "grid": list(grid), "constexprs": constexprs,
                                      "threads": 32 * int(kernel.metadata.num_warps), **recorder.resources(kernel)})
            return kernel

        JITFunction.run = run


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def force_num_sms(sms: int):
    """Every module of the package that holds a plan function gets one called as on the GPU:
    gpu/plan.py's arguments with ``num_sms=sms`` (the last of them), any further
    argument (a launcher's off-GPU setting) left at its default, as the model calls it."""
    try:
        import sigreg_kernels.gpu.triton.plan as plan
    except ImportError as error:
        raise SystemExit(f"sigreg_kernels.gpu.triton.plan is not there yet: {error}") from None
    originals = {name: getattr(plan, name) for name in PLAN_FUNCTIONS}

    def forced(function, count):
        signature = inspect.signature(function)
        names = list(signature.parameters)[:count]

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            values = [bound.arguments[name] for name in names[:-1]]
            return function(*values, sms)
        return call

    wrapped = {name: forced(function, 5 if name == "plan_statistic" else 9) for name, function in originals.items()}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("sigreg_kernels"):
            for name, function in originals.items():
                if getattr(module, name, None) is function:
                    setattr(module, name, wrapped[name])


def call_primitive(kernels, call: dict):
    b, n, d, k, knots = call["batch"], call["N"], call["D"], call["K"], call["knots"]
    dtype, t_max = DTYPES[call["dtype"]], 3.0
    coef = torch.empty(b, 2, k, knots)
    scale = torch.empty(()).expand(b, k)
    x = torch.empty(b, n, d, dtype=dtype)
    directions = torch.empty(d, k, dtype=dtype)
    arrivals = torch.empty(1, dtype=torch.int32)  # as gpu/fused.py passes it
    primitive = call["primitive"]
    if primitive == "ecf_partials":
        if call["projected"]:
            return kernels.ecf_partials(torch.empty(b, n, k, dtype=dtype), None, knots, t_max, arrivals)
        return kernels.ecf_partials(x, directions, knots, t_max, arrivals)
    if primitive == "statistic":
        partials = torch.empty(b, call["splits"], 2, k, knots)
        return kernels.statistic(partials, n, knots, t_max, "mean", None, 1.0, arrivals)
    if primitive == "slice_gradient":
        if call["projected"]:
            return kernels.slice_gradient_(torch.empty(b, n, k, dtype=dtype), coef, scale, knots, t_max)
        return kernels.slice_gradient(coef, scale, x, directions, knots, t_max)
    raise ValueError(f"unknown primitive {primitive!r}")


def main():
    sms = int(sys.argv[1])
    calls = json.loads(sys.stdin.read())
    driver_config.set_active(Sm90Driver())
    recorder = Recorder()
    if recorder.tool is None:
        raise SystemExit("no cuobjdump (neither the CUDA toolkit's nor Triton's): cannot read registers")
    recorder.install()
    from sigreg_kernels.gpu import fused

    kernels = fused.backend_kernels("triton")
    # The launchers refuse CPU tensors outside the interpreter, since they would launch; here nothing launches.
    if not hasattr(kernels, "_check_device"):  # a rename must fail here, not capture nothing
        raise SystemExit(f"{kernels.__name__} has no _check_device to bypass: the capture needs updating")
    kernels._check_device = lambda tensor: None
    force_num_sms(sms)
    out = {}
    for call in calls:
        recorder.launches = []
        call_primitive(kernels, call)
        out[call["key"]] = recorder.launches
    print(json.dumps(out))


if __name__ == "__main__":
    with torch.no_grad():
        main()
