"""Installing as a user does: the packaging metadata, a wheel with the compiled extension
(built once) installed into a fresh virtual environment and used from outside the
source tree, and the install without the extension (the C++
compiler hidden, SIGREG_BUILD_EXTENSION=0), whose backends say why cpu and cuda are
missing. Builds run on a copy of the sources, so the checkout is left alone.

The fresh environment gets this environment's torch version from pip (the
extension must run with the torch it was built against), numpy, pytest and triton:
about two minutes in all, most of it that install and the one compile of the CPU
kernels.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import torch

from sigreg_kernels import available_backends, sigreg
from sigreg_kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# What a source distribution holds; builds write only into this copy.
SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "requirements.txt", "csrc", "sigreg_kernels"]
BUILD_OUTPUTS = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "_build_info.py", "*.egg-info", "build")
SWITCHES = ("SIGREG_BUILD_EXTENSION", "FORCE_CUDA", "SIGREG_SKIP_CUDA", "PYTHONPATH", "TRITON_INTERPRET")


def run(command, *, env=None, cwd=None, timeout=900, expect_failure=False):
    result = subprocess.run([str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, check=False)
    output = result.stdout + result.stderr
    if expect_failure:
        assert result.returncode != 0, f"{command} succeeded but should have failed:\n{output[-4000:]}"
    else:
        assert result.returncode == 0, f"{command} exited {result.returncode}:\n{output[-4000:]}"
    return output


def clean_env(**changes):
    """This environment without the build switches (and with ``changes``)."""
    env = {key: value for key, value in os.environ.items() if key not in SWITCHES}
    return {**env, **changes}


def copy_sources(destination: Path) -> Path:
    destination.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, destination / name, ignore=BUILD_OUTPUTS)
        else:
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A new virtual environment with this torch (the same version), for the installs below (each
    replaces the last: --force-reinstall); its python."""
    path = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__}", "numpy", "pytest", "triton",
         "setuptools>=70.1"], env=clean_env())
    return python


def installed_state(python: Path, cwd: Path) -> dict:
    """What the installed package says about itself, from a folder outside the source tree."""
    script = """if True:
        import json, os, torch, sigreg_kernels
        from sigreg_kernels import available_backends, sigreg, sigreg_reference
        try:
            sigreg(torch.randn(8, 4), torch.eye(4), backend="cpu")
            cpu_error = None
        except RuntimeError as error:
            cpu_error = str(error)
        x = torch.randn(3, 64, 8, dtype=torch.float64)
        directions = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=0)
        backends = available_backends("cpu")
        print(json.dumps({
            "package": os.path.dirname(sigreg_kernels.__file__),
            "files": sorted(os.listdir(os.path.dirname(sigreg_kernels.__file__))),
            "backends": list(backends), "unavailable": backends.unavailable, "repr": repr(backends),
            "cpu_error": cpu_error,
            "auto_matches_reference": torch.allclose(sigreg(x, directions), sigreg_reference(x, directions),
                                                     rtol=1e-10, atol=0),
        }))
    """
    return json.loads(run([python, "-c", script], cwd=cwd, env=clean_env()).splitlines()[-1])


def test_requirements_txt_holds_the_build_tools_and_every_extra():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = set(project["build-system"]["requires"])
    declared |= {req for group in project["project"]["optional-dependencies"].values() for req in group
                 if not req.startswith("sigreg_kernels[")}
    listed = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert listed == declared, f"only in requirements.txt: {listed - declared}; only in pyproject.toml: " \
                               f"{declared - listed}"
    # The README's commands install torch pinned before these, then build without isolation.
    readme = (ROOT / "README.md").read_text()
    for marker in ("readme:main-command", "readme:test-command"):
        command = readme.split(f"<!-- {marker} -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
        assert "pip install torch==" in command and "-r requirements.txt" in command, command
        assert "pip install --no-build-isolation -e ." in command, command


def test_sdist_carries_what_the_extension_build_reads(tmp_path):
    source = copy_sources(tmp_path / "source")
    for output in ("_build_info.py", "_C.cpython-311-x86_64-linux-gnu.so"):  # as `pip install -e .` leaves them
        (source / "sigreg_kernels" / output).write_text("# a build output\n")
    script = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"  # PEP 517
    run([sys.executable, "-c", script, tmp_path / "dist"], cwd=source, env=clean_env())
    (name,) = (tmp_path / "dist").glob("sigreg_kernels-*.tar.gz")
    with tarfile.open(name) as sdist:
        members = {member.split("/", 1)[1] for member in sdist.getnames() if "/" in member}
    needed = {str(path.relative_to(ROOT)) for path in (ROOT / "csrc").rglob("*") if path.is_file()}
    needed |= {"setup.py", "pyproject.toml", "sigreg_kernels/__init__.py", "sigreg_kernels/lejepa/__init__.py"}
    assert needed <= members, f"missing from the sdist: {sorted(needed - members)}"
    assert not [m for m in members if m.endswith((".so", "_build_info.py"))], "build outputs in the sdist"


def test_wheel_holds_the_extension_and_runs_outside_the_tree(tmp_path, venv_python):
    source = copy_sources(tmp_path / "source")
    # Plain `pip wheel .`: pip's build isolation, and the extension still compiled against this
    # environment's torch. (The CUDA kernels are not what this checks, and take long: CPU only.)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "dist", source],
        env=clean_env(SIGREG_SKIP_CUDA="1"))
    (wheel,) = (tmp_path / "dist").glob("sigreg_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        build_info = archive.read("sigreg_kernels/_build_info.py").decode()
    assert [n for n in names if re.fullmatch(r"sigreg_kernels/_C\..*\.so", n)], f"no extension in {names}"
    assert "sigreg_kernels/__main__.py" in names and "sigreg_kernels/lejepa/__init__.py" in names
    # Every module of the source tree, subpackages included.
    package = ROOT / "sigreg_kernels"
    modules = {f"sigreg_kernels/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
               if p.name != "_build_info.py"}
    assert modules - set(names) == set(), f"missing from the wheel: {sorted(modules - set(names))}"
    assert "EXTENSION = True" in build_info and f"TORCH = {torch.__version__!r}" in build_info

    python = venv_python
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], env=clean_env())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    state = installed_state(python, outside)
    assert Path(state["package"]).is_relative_to(python.parents[1]), state["package"]
    assert state["backends"] == ["cpu", "reference"] and state["cpu_error"] is None, state
    report = run([python, "-m", "sigreg_kernels"], cwd=outside, env=clean_env())
    assert re.search(r"cpu +on cpu +ok", report), report
    assert f"built against torch {torch.__version__}" in report, report
    # A few of the tests, against the installed package.
    for name in ("helpers.py", "test_api.py", "test_op_registration.py"):
        shutil.copy2(TESTS / name, outside / name)
    output = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_api.py", "test_op_registration.py"],
                 cwd=outside, env=clean_env())
    assert re.search(r"\d+ passed", output) and "failed" not in output, output[-2000:]


def test_install_without_the_extension(tmp_path, venv_python):
    """No compiler, or SIGREG_BUILD_EXTENSION=0: the pure-Python package, whose backends say why
    cpu is missing and how to get it."""
    source = copy_sources(tmp_path / "source")
    python = venv_python
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall"]
    # No C++ compiler: CXX names a missing one, and PATH holds only the environment's tools.
    no_compiler = clean_env(CXX=str(tmp_path / "missing" / "c++"), CC=str(tmp_path / "missing" / "cc"),
                            PATH=str(python.parent))
    cases = [
        ("the compiler hidden", [*pip, "--no-build-isolation", source], no_compiler, "no C++ compiler"),
        ("SIGREG_BUILD_EXTENSION=0", [*pip, "--no-build-isolation", source], clean_env(SIGREG_BUILD_EXTENSION="0"),
         "SIGREG_BUILD_EXTENSION=0"),
    ]
    for case, command, env, reason in cases:
        run(command, env=env)
        state = installed_state(python, outside)
        assert not [f for f in state["files"] if f.startswith("_C")], f"{case}: an extension was installed"
        assert state["backends"] == ["reference"] and state["auto_matches_reference"], (case, state)
        for message in (state["unavailable"]["cpu"], state["cpu_error"], state["repr"]):
            assert reason in message and "pip install --no-build-isolation" in message, (case, message)

    # SIGREG_BUILD_EXTENSION=1 requires the extension: no compiler stops the install, saying why.
    output = run([*pip, "--no-build-isolation", source], env={**no_compiler, "SIGREG_BUILD_EXTENSION": "1"},
                 expect_failure=True)
    assert "SIGREG_BUILD_EXTENSION=1 but the extension cannot be built: no C++ compiler" in output, output[-3000:]

    # The backends it has: reference, and triton (here through its interpreter).
    report = run([python, "-m", "sigreg_kernels"], cwd=outside, env=clean_env(TRITON_INTERPRET="1"))
    assert "extension      missing: this install has no compiled extension" in report, report
    assert re.search(r"triton +on cpu +ok", report), report


@pytest.fixture
def no_extension(monkeypatch):
    """This process as an install without the extension would see it (``backends``' view of it)."""
    info = types.SimpleNamespace(EXTENSION=False, WHY_NO_EXTENSION="SIGREG_BUILD_EXTENSION=0 was set at build time",
                                 CUDA_ARCHS=None, WHY_NO_CUDA=None, TORCH=torch.__version__)
    monkeypatch.setattr(dispatch, "_extension", None)
    monkeypatch.setattr(dispatch, "_EXTENSION_ERROR", ImportError("cannot import name '_C'"))
    monkeypatch.setattr(dispatch, "_build_info", info)
    return info


def test_a_missing_extension_is_explained_by_every_door(no_extension):
    listed = available_backends("cpu")
    assert listed == ["reference"] and list(listed.unavailable) == ["cpu"]
    for message in (listed.unavailable["cpu"], repr(listed)):
        assert "SIGREG_BUILD_EXTENSION=0 was set at build time" in message
        assert "pip install --no-build-isolation" in message
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available: this install has no compiled extension"):
        sigreg(torch.randn(8, 4), torch.eye(4), backend="cpu")
    assert "this install has no compiled extension" in dispatch.unavailable_reason("cuda", torch.device("cuda"))


def test_an_extension_built_for_another_torch_says_so(no_extension):
    no_extension.EXTENSION, no_extension.TORCH = True, "2.0.0"
    reason = dispatch.unavailable_reason("cpu", torch.device("cpu"))
    assert "built against torch 2.0.0" in reason and f"not this torch {torch.__version__}" in reason
    assert "--force-reinstall" in reason


def test_an_extension_without_cuda_kernels_says_why(monkeypatch):
    info = types.SimpleNamespace(EXTENSION=True, WHY_NO_EXTENSION=None, CUDA_ARCHS=None,
                                 WHY_NO_CUDA="torch 2.13.0+cpu is CPU-only", TORCH=torch.__version__)
    monkeypatch.setattr(dispatch, "_extension", types.SimpleNamespace(CUDA_KERNELS_BUILT=False))
    monkeypatch.setattr(dispatch, "_build_info", info)
    reason = dispatch.unavailable_reason("cuda", torch.device("cuda"))
    assert "without the CUDA kernels (torch 2.13.0+cpu is CPU-only)" in reason
    assert "FORCE_CUDA=1 pip install --no-build-isolation" in reason
    assert available_backends("cuda").unavailable["cuda"] == reason
