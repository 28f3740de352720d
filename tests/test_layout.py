"""The package's layout: each module imports only modules of the layers below its own.

Layers, bottom up (``LAYERS``): the shared pieces (``core/``) and the plans' base, then
the backends' plans and contracts, the compiled extension, the backends' ops, the GPU
path's orchestration and the backend choice, then the public API (``functional``,
``nn``, ``lejepa``, ``compat``). Imports inside functions count too (a lazy import may
only reach down). A module missing from ``LAYERS`` fails the test: a new file takes a
place in the stack when it is added.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sigreg_kernels"

LAYERS = [
    # 0-1: shared pieces (torch only), the plans' base
    ["core", "core.numerics", "core.quadrature", "gpu", "gpu.cuda", "gpu.triton", "cpu", "_build_info", "gpu.plan"],
    ["core.validation", "core.distributed"],
    # 2: what the backends are held to and planned by; the oracle
    ["reference", "gpu.contract", "cpu.registration", "gpu.cuda.plan", "gpu.triton.plan", "gpu.triton.kernels"],
    # 3: the compiled library, its fake kernels and the CPU op's autograd
    ["extension"],
    # 4: the GPU backends' ops
    ["gpu.cuda.ops", "gpu.triton.ops"],
    # 5: the GPU path's autograd over any of them, and the choice of a backend
    ["gpu.fused", "dispatch"],
    # 6 and up: the public API
    ["functional"],
    ["nn"],
    ["lejepa.univariate", "compat.quadrature_buffers"],
    ["lejepa.multivariate", "compat.lightly", "compat.stable_pretraining"],
    ["lejepa", "compat"],
    [""],  # sigreg_kernels/__init__.py
    ["_env_report"],  # python -m sigreg_kernels
    ["__main__"],
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, name: str):
    """The package's modules that ``path`` imports (anywhere in the file), by name."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    base_parts = here if is_package else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sigreg_kernels."):
                    yield alias.name[len("sigreg_kernels."):]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module is None or not node.module.startswith("sigreg_kernels"):
                    continue
                target = node.module[len("sigreg_kernels"):].lstrip(".")
            else:
                up = base_parts[:len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                target = ".".join(up + ([node.module] if node.module else []))
            # "from X import y": y may be a module of X
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                yield candidate if candidate in LAYER or candidate == "_C" else target  # _C: the compiled library


def test_every_module_has_a_layer():
    names = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert names - set(LAYER) == set(), "modules without a layer in LAYERS"
    assert set(LAYER) - names == set(), "LAYERS names modules that do not exist"


def test_imports_only_reach_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for target in set(imported_modules(path, name)):
            if target == "_C" or target == name:
                continue
            if target not in LAYER:
                upward.append(f"{name} imports {target}, which has no layer")
            elif LAYER[target] >= LAYER[name]:
                upward.append(f"{name} (layer {LAYER[name]}) imports {target or 'sigreg_kernels'} "
                              f"(layer {LAYER[target]})")
    assert not upward, "\n".join(upward)
