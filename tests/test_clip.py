"""``clip_value``: per-slice statistics below it count as 0 and pass no gradient (SPEC §2).

The expected numbers are written out here from that sentence: the float64
statistics, zeroed where below the threshold, and the gradient of the unclipped
slices alone.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_relative_close, random_case

from sigreg_kernels import SIGReg, available_backends, sample_directions, sigreg, sigreg_reference
from sigreg_kernels.dispatch import unavailable_reason


def backends():
    """(backend, device) for every backend that runs in this process: reference and cpu; triton on CPU
    tensors under TRITON_INTERPRET=1 (test_triton_interpreter runs this file so); cuda and triton on a GPU."""
    names = [("reference", "cpu"), ("cpu", "cpu")]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and unavailable_reason("triton", torch.device("cpu")) is None:
        names.append(("triton", "cpu"))
    if torch.cuda.is_available() and not interpret:
        names += [(name, "cuda") for name in available_backends("cuda") if name != "reference"]
    return names


def cases():
    """(name, x, directions, weight): with directions, and without (the columns of x)."""
    x, directions = random_case((2, 3), 40, 12, 33, scale=1.3, seed=0)
    weight = torch.randn(2, 3, 33, generator=torch.Generator().manual_seed(1))
    x_none = random_case((2,), 50, 17, 1, scale=1.5, seed=2)[0]
    weight_none = torch.randn(2, 17, generator=torch.Generator().manual_seed(3))
    return [("directions", x, directions, weight), ("none", x_none, None, weight_none)]


def expected(x, directions, weight, clip_value):
    """Clipped statistics and grad_x of ``sum(weight * clipped)``, in float64, from the unclipped ones."""
    xd = x.double().requires_grad_()
    stat = sigreg_reference(xd, None if directions is None else directions.double(), reduction="none")
    kept = stat >= clip_value  # a statistic equal to clip_value is not below it: kept
    (grad,) = torch.autograd.grad((stat * weight.double() * kept).sum(), xd)
    return torch.where(kept, stat, 0.0).detach(), grad, kept


def thresholds(x, directions):
    """No slice clipped, about half (midway between two statistics: float32 rounding cannot move
    one across it), all of them."""
    stat = sigreg_reference(x.double(), None if directions is None else directions.double(), reduction="none")
    ordered = stat.flatten().sort().values
    middle = len(ordered) // 2
    return [-1.0, 0.0, (ordered[middle - 1] + ordered[middle]).item() / 2, stat.max().item() * 2]


@pytest.mark.parametrize("backend, device", backends())
@pytest.mark.parametrize("name, x, directions, weight", cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_values_and_gradients(backend, device, name, x, directions, weight):
    for clip_value in thresholds(x, directions):
        want, want_grad, kept = expected(x, directions, weight, clip_value)
        xg = x.detach().clone().to(device).requires_grad_()
        on_device = None if directions is None else directions.to(device)
        stat = sigreg(xg, on_device, reduction="none", clip_value=clip_value, backend=backend)
        (grad,) = torch.autograd.grad((stat * weight.to(device)).sum(), xg)
        stat, grad = stat.cpu(), grad.cpu()
        assert torch.equal(stat == 0, ~kept) or kept.all(), "exactly the slices below clip_value are zero"
        assert_relative_close(f"{backend} clip={clip_value:.3g} stat", stat, want, 1e-5)
        if kept.any():
            assert_relative_close(f"{backend} clip={clip_value:.3g} grad", grad, want_grad, 1e-5)
        else:
            assert torch.equal(grad, torch.zeros_like(grad)), "every slice clipped: no gradient at all"


@pytest.mark.parametrize("backend, device", backends())
def test_reductions_and_directions_gradient(backend, device):
    x, directions = random_case((3,), 30, 9, 21, scale=1.2, seed=4)
    ordered = sigreg_reference(x.double(), directions.double(), reduction="none").flatten().sort().values
    clip_value = (ordered[31] + ordered[32]).item() / 2
    for reduction in ("mean", "sum"):
        xg = x.detach().clone().to(device).requires_grad_()
        ag = directions.detach().clone().to(device).requires_grad_()
        loss = sigreg(xg, ag, reduction=reduction, clip_value=clip_value, backend=backend)
        loss.backward()
        xd, ad = x.double().requires_grad_(), directions.double().requires_grad_()
        stat = sigreg_reference(xd, ad, reduction="none")
        clipped = torch.where(stat < clip_value, 0.0, stat)
        want = clipped.mean() if reduction == "mean" else clipped.sum()  # mean over all B·K slices, clipped ones too
        want.backward()
        assert_relative_close(f"{reduction} loss", loss.cpu(), want, 1e-5)
        assert_relative_close(f"{reduction} grad_x", xg.grad.cpu(), xd.grad, 1e-5)
        assert_relative_close(f"{reduction} grad_directions", ag.grad.cpu(), ad.grad, 1e-5)


def test_reference_function_clips():
    x, directions = random_case((2,), 30, 6, 10, seed=5)
    stat = sigreg_reference(x, directions, reduction="none")
    clipped = sigreg_reference(x, directions, reduction="none", clip_value=stat.median().item())
    assert torch.equal(clipped, torch.where(stat < stat.median(), 0.0, stat))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_clips_like_the_function(backend):
    x, _ = random_case((2,), 40, 10, 1, seed=6)
    module = SIGReg(num_slices=24, clip_value=0.5, backend=backend)
    assert "clip_value=0.5" in repr(module)
    for step in range(3):
        xg = x.clone().requires_grad_()
        loss = module(xg)
        loss.backward()
        directions = sample_directions(step, 10, 24, "cpu")
        xd = x.double().requires_grad_()
        want = sigreg_reference(xd, directions.double(), clip_value=0.5)
        want.backward()
        assert_relative_close(f"step {step}", loss, want, 1e-5)
        assert_relative_close(f"step {step} grad", xg.grad, xd.grad, 1e-5)


def test_module_all_clipped_passes_no_gradient():
    x, _ = random_case((), 40, 10, 1, seed=7)
    x.requires_grad_()
    loss = SIGReg(num_slices=16, clip_value=math.inf, backend="cpu")(x)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("clip_value, error, message", [
    ("1", TypeError, "clip_value must be a float or None"),
    (True, TypeError, "clip_value must be a float or None"),
    (torch.tensor(1.0), TypeError, "clip_value must be a float or None"),
    (math.nan, ValueError, "clip_value must not be NaN"),
])
def test_bad_clip_value(clip_value, error, message):
    x, directions = random_case((), 10, 4, 3)
    with pytest.raises(error, match=message):
        sigreg(x, directions, clip_value=clip_value)
    with pytest.raises(error, match=message):
        SIGReg(num_slices=4, clip_value=clip_value)


def test_triton_interpreter():
    """The parametrized tests above for the triton backend, in a process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the triton cases itself")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(__file__)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here), "-k",
                             "triton and not test_triton_interpreter"], env=env, cwd=here.parent.parent,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
