"""``python -m sigreg_kernels``: the environment report, its self-check (which must fail on
a wrong backend) and its reading of TORCH_CUDA_ARCH_LIST."""

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import types

import pytest
import torch

from sigreg_kernels import _env_report, available_backends, sigreg_reference
from sigreg_kernels import dispatch


def report(tmp_path, **env):
    """``python -m sigreg_kernels`` run from outside the source tree: (exit status, output)."""
    env = {**{key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}, **env}
    result = subprocess.run([sys.executable, "-m", "sigreg_kernels"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env, check=False)
    return result.returncode, result.stdout + result.stderr


def test_report_names_versions_build_backends_and_checks_them(tmp_path):
    code, out = report(tmp_path)
    assert code == 0, out
    assert f"python         {platform.python_version()}" in out
    assert f"torch          {torch.__version__}, CUDA " in out
    for package in ("triton", "numpy"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        assert re.search(rf"^{package} +{re.escape(version)}$", out, re.M), out
    if not torch.cuda.is_available():
        assert "GPU            none visible to torch" in out
    if dispatch._extension is None:
        assert "extension      missing: " + dispatch._extension_reason() in out
    else:
        assert re.search(r"^extension      loaded, (built against torch|no build record of it)", out, re.M), out
    for name in available_backends("cpu"):
        assert re.search(rf"^  {name} +on cpu +available$", out, re.M), out
    assert re.search(r"^  triton +on cpu +unavailable: ", out, re.M), out  # (CPU tensors need the interpreter)
    if "cpu" in available_backends("cpu"):
        assert re.search(r"^  cpu +on cpu +ok +relative error: value", out, re.M), out
    assert "FAILED" not in out


def test_report_checks_triton_on_cpu_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    code, out = report(tmp_path, TRITON_INTERPRET="1")
    assert code == 0, out
    assert "env            TRITON_INTERPRET=1" in out
    assert re.search(r"^  triton +on cpu +ok +relative error", out, re.M), out


def off_by_a_thousandth(x, directions, backend, **kwargs):
    return sigreg_reference(x, directions, **kwargs) * 1.001


def crashes(*args, **kwargs):
    raise RuntimeError("the kernel crashed\nsecond line")


@pytest.mark.parametrize("wrong, message", [(off_by_a_thousandth, "FAILED  relative error: value 1.0e-03"),
                                            (crashes, "FAILED  RuntimeError: the kernel crashed (")])
def test_a_wrong_backend_fails_the_self_check(monkeypatch, capsys, wrong, message):
    monkeypatch.setattr(_env_report, "sigreg", wrong)
    monkeypatch.setattr(dispatch, "unavailable_reason", lambda name, device, dtype=None: None)  # all of them run
    assert _env_report.main([]) == 1
    out = capsys.readouterr().out
    for name in ("cpu", "triton"):
        assert re.search(rf"^  {name} +on cpu +{re.escape(message)}", out, re.M), out


def test_no_check_skips_the_self_check(capsys):
    assert _env_report.main(["--no-check"]) == 0
    out = capsys.readouterr().out
    assert "backends" in out and "self-check" not in out


def test_an_unknown_argument_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _env_report.main(["--fast"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --fast" in capsys.readouterr().err


@pytest.mark.parametrize("arch_list, capability, covered", [
    ("8.0;9.0a", (9, 0), True),      # the default list on an H100/H200
    ("8.0;9.0a", (8, 6), True),      # sm_80 code runs on later minor versions
    ("8.0;9.0a", (8, 9), True),
    ("8.0;9.0a", (7, 5), False),
    ("8.0;9.0a", (10, 0), False),    # neither sm_80 code nor the 9.0a-only code runs on Blackwell
    ("9.0a", (9, 1), False),         # "a" variants run only on their exact GPU
    ("8.0+PTX", (12, 0), True),      # PTX is compiled by the driver for later GPUs
    ("8.0 9.0", (9, 0), True),       # spaces separate too
    ("Hopper", (9, 0), None),        # named architectures: cannot tell
])
def test_arch_list_covers(arch_list, capability, covered):
    assert _env_report.arch_list_covers(arch_list, *capability) is covered


def gpu(name, major, minor):
    return types.SimpleNamespace(name=name, major=major, minor=minor, total_memory=141 * 2**30,
                                 multi_processor_count=132)


def test_the_report_names_a_gpu_the_cuda_kernels_were_not_built_for(monkeypatch):
    monkeypatch.setattr(dispatch, "_extension", types.SimpleNamespace(CUDA_KERNELS_BUILT=True))
    monkeypatch.setattr(dispatch, "_build_info", types.SimpleNamespace(
        EXTENSION=True, WHY_NO_EXTENSION=None, CUDA_ARCHS="8.0;9.0a", WHY_NO_CUDA=None, TORCH="2.11.0+cu130"))
    devices = [gpu("NVIDIA H200", 9, 0), gpu("NVIDIA B200", 10, 0)]
    lines = _env_report.gpu_lines(devices) + _env_report.extension_lines(devices)
    assert "GPU 0          NVIDIA H200, sm_90 (compute capability 9.0), 141.0 GiB, 132 SMs" in lines
    assert "extension      loaded, built against torch 2.11.0+cu130: CPU and CUDA kernels for 8.0;9.0a" in lines
    not_covered = [line for line in lines if "is not among them" in line]
    assert len(not_covered) == 1 and "GPU 1 (sm_100)" in not_covered[0], lines
    assert "TORCH_CUDA_ARCH_LIST=10.0" in not_covered[0]
