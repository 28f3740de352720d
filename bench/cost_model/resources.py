"""Registers, shared memory and matrix instructions of the compiled kernels, without a GPU.

CUDA: every ``csrc/cuda/*.cu`` is compiled for sm_90a with the code-generation flags
of tests/test_cuda_compile.py (its warning flags aside) and ``-Xptxas -v``; ptxas
reports registers, static shared memory and spills per entry function (template
instances mangled: demangled here, and matched to a plan by name and template
arguments). Triton: each launch the backend makes is compiled for sm_90 (see
triton_capture.py), registers read from the cubin. The SASS of either shows which
matrix instruction the tile loop uses (HGMMA = wgmma, HMMA = mma.sync).

Results are cached in a folder (``SIGREG_COST_MODEL_CACHE``, default under the
system's temp folder) keyed by a hash of the sources and the compiler, so reruns
compile nothing.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
NVCC_CODEGEN_FLAGS = [
    "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
SM90A = ["-gencode", "arch=compute_90a,code=sm_90a"]
CTYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}


class ModelError(RuntimeError):
    """Something the model needs is missing: said plainly, no traceback needed."""


@dataclass
class Kernel:
    """One compiled kernel (a CUDA template instance, or a Triton specialization)."""
    name: str              # demangled (CUDA) or the JIT function's name (Triton)
    base: str              # the function's own name, without namespaces and template arguments
    template_args: list    # CUDA: the template arguments as text; Triton: []
    registers: int
    smem: int              # static shared memory (CUDA) or Triton's shared memory, bytes
    spill_bytes: int
    mma: str               # "HGMMA", "HMMA", "none" or "unknown"


def cache_dir() -> Path:
    path = Path(os.environ.get("SIGREG_COST_MODEL_CACHE") or Path(tempfile.gettempdir()) / "sigreg_cost_model")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _cached(key: str, build):
    path = cache_dir() / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def disassembler():
    """A cuobjdump (the toolkit's, or the one Triton ships), or None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "cuobjdump").exists():
        return str(Path(home) / "bin" / "cuobjdump")
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no triton, or a triton without the tool: no SASS
        return None


def sass_mma(cubin: Path, tool) -> dict:
    """{mangled function name: "HGMMA" | "HMMA" | "none"} from the SASS of a cubin."""
    if tool is None:
        return {}
    out = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    kinds, current = {}, None
    for line in out.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = header.group(1)
            kinds[current] = "none"
        elif current and kinds[current] != "HGMMA":
            if "HGMMA" in line:
                kinds[current] = "HGMMA"
            elif "HMMA" in line:
                kinds[current] = "HMMA"
    return kinds


# --- CUDA ---------------------------------------------------------------------------------

def nvcc_path():
    found = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME")
    if not found and home and (Path(home) / "bin" / "nvcc").exists():
        found = str(Path(home) / "bin" / "nvcc")
    return found


def demangle(names: list) -> list:
    for tool in ("c++filt", "cu++filt"):
        path = shutil.which(tool)
        if path:
            out = subprocess.run([path], input="\n".join(names), capture_output=True, text=True, check=True).stdout
            return out.splitlines()
    raise ModelError("no demangler (c++filt or cu++filt) on PATH: cannot read CUDA template instances")


def _split_top_level(text: str) -> list:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_demangled(name: str):
    """(base name, template arguments) of e.g. ``void ns::(anonymous namespace)::k<float, true, 64>(int)``."""
    text = name.replace("(anonymous namespace)", "anon")
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            end = i
            break
    qualified = re.sub(r"^void ", "", text[:end].strip())  # a __global__ function returns void
    args = []
    if "<" in qualified:
        base = qualified[:qualified.find("<")]
        args = [normalize_arg(a) for a in _split_top_level(qualified[qualified.find("<") + 1:qualified.rfind(">")])]
    else:
        base = qualified
    return base.split("::")[-1], args


def normalize_arg(arg: str) -> str:
    """``(int)64`` -> ``64``, ``64u`` -> ``64``, ``(sigreg::cuda::DType)1`` -> ``1``."""
    arg = re.sub(r"^\([^()]*\)", "", arg.strip())
    number = re.fullmatch(r"(-?\d+)[uUlL]*", arg)
    return number.group(1) if number else arg


def _parse_ptxas(text: str) -> dict:
    """{mangled entry: {registers, smem, spill_bytes}} from ``-Xptxas -v`` output."""
    found, current, properties = {}, None, {}
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = entry.group(1)
            continue
        spill = re.search(r"Function properties for (\S+)", line)
        if spill:
            properties["for"] = spill.group(1)
            continue
        stores = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if stores and properties.get("for"):
            properties[properties["for"]] = int(stores.group(1)) + int(stores.group(2))
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used and current:
            smem = re.search(r"(\d+) bytes smem", line)
            found[current] = {"registers": int(used.group(1)), "smem": int(smem.group(1)) if smem else 0,
                              "spill_bytes": properties.get(current, 0)}
            current = None
    return found


def cuda_kernels() -> list:
    """Every ``__global__`` instance of csrc/cuda/*.cu, compiled for sm_90a."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise ModelError("nvcc (the CUDA toolkit) is not installed: the CUDA rows need ptxas's resource report")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        raise ModelError("no CUDA sources in csrc/cuda")
    inputs = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h"))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = "cuda-" + _hash(version, NVCC_CODEGEN_FLAGS, SM90A,
                          *[p.relative_to(CSRC).as_posix().encode() + p.read_bytes() for p in inputs])

    def build():
        kernels = []
        tool = disassembler()
        with tempfile.TemporaryDirectory() as tmp:
            for source in sources:
                cubin = Path(tmp) / (source.stem + ".cubin")
                done = subprocess.run([nvcc, "-cubin", "-o", str(cubin), str(source), *NVCC_CODEGEN_FLAGS,
                                       f"-I{CSRC}", *SM90A, "-Xptxas", "-v"],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise ModelError(f"nvcc failed on {source.name}:\n{done.stderr[-3000:]}")
                usage = _parse_ptxas(done.stdout + done.stderr)
                mma = sass_mma(cubin, tool)
                mangled = sorted(usage)
                for raw, pretty in zip(mangled, demangle(mangled)):
                    base, args = parse_demangled(pretty)
                    kernels.append(asdict(Kernel(pretty, base, args, mma=mma.get(raw, "unknown"), **usage[raw])))
        return kernels

    return [Kernel(**k) for k in _cached(key, build)]


def match_cuda(plan, dtype: str, kernels: list) -> Kernel:
    """The compiled instance a CUDA plan launches: its name, then its template arguments.

    ``plan.tile["template"]`` (the arguments as the demangler writes them, e.g.
    ``"__nv_bfloat16, true, 64, 32"``) picks one exactly; without it the instance
    whose type argument is the dtype's and whose arguments hold most of the tile's
    integer and boolean values, in order, is taken.
    """
    candidates = [k for k in kernels if k.base == plan.kernel]
    if not candidates:
        names = sorted({k.base for k in kernels})
        raise ModelError(f"CUDA plan names kernel {plan.kernel!r}, not among the compiled ones: {names}")
    explicit = plan.tile.get("template")
    if explicit is not None:
        wanted = [normalize_arg(a) for a in _split_top_level(str(explicit))]
        exact = [k for k in candidates if k.template_args == wanted]
        if not exact:
            raise ModelError(f"no instance {plan.kernel}<{explicit}>; compiled: "
                             f"{[', '.join(k.template_args) for k in candidates]}")
        return exact[0]
    ctype = CTYPES[dtype]
    typed = [k for k in candidates if ctype in k.template_args or not set(CTYPES.values()) & set(k.template_args)]
    if not typed:
        raise ModelError(f"no instance of {plan.kernel} for {ctype}; compiled: "
                         f"{[', '.join(k.template_args) for k in candidates]}")
    values = [("true" if v else "false") if isinstance(v, bool) else str(v)
              for v in plan.tile.values() if isinstance(v, (bool, int))]

    def score(kernel):
        position, hits = 0, 0
        for value in values:
            if value in kernel.template_args[position:]:
                position = kernel.template_args.index(value, position) + 1
                hits += 1
        return hits

    best = max(score(k) for k in typed)
    chosen = [k for k in typed if score(k) == best]
    # Several equally good: take the one with the most registers (the pessimistic occupancy).
    return max(chosen, key=lambda k: (k.registers, k.smem))


# --- Triton ---------------------------------------------------------------------------------

def source_versions(backends) -> str:
    """Short hashes of what the rows depend on: each backend's plan module and kernel sources."""
    gpu = ROOT / "sigreg_kernels" / "gpu"
    parts = []
    for backend in backends:
        plan = gpu / backend / "plan.py"
        kernels = sorted(CUDA_DIR.glob("*.cu*")) if backend == "cuda" else [gpu / "triton" / "kernels.py",
                                                                            gpu / "triton" / "ops.py"]
        missing = [str(p.relative_to(ROOT)) for p in [plan, *kernels] if not p.exists()]
        if missing or not kernels:  # a moved file must not go unnoticed (a stale cache key)
            raise ModelError(f"the {backend} backend's sources are not where the cost model reads them: "
                             f"{', '.join(missing) or CUDA_DIR}")
        parts.append(f"{backend}/plan.py {_hash(plan.read_bytes())[:10]}, "
                     f"{backend} kernels {_hash(*[p.read_bytes() for p in kernels])[:10]}")
    return "; ".join(parts)


def triton_sources_key() -> str:
    import triton

    package = ROOT / "sigreg_kernels"
    files = sorted(package.rglob("*.py"))  # every subpackage: the kernels live in gpu/triton/
    return _hash(triton.__version__, *[str(p.relative_to(package)).encode() + p.read_bytes() for p in files],
                 (Path(__file__).parent / "triton_capture.py").read_bytes())


def triton_launches(calls: list, sms: int) -> dict:
    """{call key: [launch]} for each primitive call (see triton_capture.py), compiled for sm_90.

    Runs in a fresh process (it swaps Triton's driver for a CPU-only stand-in) and
    caches per call, keyed by the Python sources and Triton's version.
    """
    key = "triton-" + triton_sources_key()
    path = cache_dir() / f"{key}.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    missing = [c for c in calls if c["key"] not in known]
    if missing:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), str(Path(__file__).parent.parent),
                                                          env.get("PYTHONPATH"))))
        done = subprocess.run([sys.executable, "-m", "cost_model.triton_capture", str(sms)],
                              input=json.dumps(missing), capture_output=True, text=True, env=env, cwd=ROOT,
                              check=False)
        if done.returncode != 0:
            raise ModelError(f"compiling the Triton kernels for sm_90 failed:\n{done.stderr[-4000:]}")
        known.update(json.loads(done.stdout.strip().splitlines()[-1]))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(path)
    return {c["key"]: known[c["key"]] for c in calls}
