"""The compiled extension shares torch's C++ runtime.

A compiler that links libstdc++ statically (some toolchain images default to it, for
portable binaries) puts a second libstdc++ into ``_C``, beside the shared one torch
loaded. Its iostreams then index torch's locale with their own facet ids: the first
error message that formats a number inside the extension crashes the process. Seen on
a GPU machine: a segfault instead of "arrivals must be an int32 tensor ...". The fix is
to build with the system compiler (``CXX=/usr/bin/g++ pip install ...``).
"""

import shutil
import subprocess
import sys

import pytest

extension = pytest.importorskip("sigreg_kernels.extension", reason="the compiled extension is not built")


def test_libstdcxx_is_linked_shared():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to read the extension's symbols")
    from sigreg_kernels import _C

    symbols = subprocess.run([nm, "-D", "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    # std::locale's members live in libstdc++ itself: defined here only if it was linked in.
    carried = [line.split()[-1] for line in symbols.splitlines() if line.split()[-1].startswith("_ZNSt6locale")]
    assert not carried, (f"{_C.__file__} carries its own libstdc++ ({len(carried)} std::locale symbols, e.g. "
                         f"{carried[0]}): rebuild with a compiler that links it shared, e.g. CXX=/usr/bin/g++")


def test_an_error_message_with_sizes_is_raised_not_crashed():
    # In a child process: a crash must fail this test, not the run.
    code = ("import torch, sigreg_kernels.extension\n"
            "try:\n"
            "    torch.ops.sigreg.ecf_sums(torch.zeros(2, 3), None, 17, 3.0)\n"
            "except RuntimeError as error:\n"
            "    print(error)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the child died (exit status {child.returncode}): {child.stderr[-2000:]}"
    assert "x must be 3-D (B, N, D), got [2, 3]" in child.stdout, child.stdout
