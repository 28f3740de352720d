"""The public function and module: argument errors, backends, directions, autocast."""

import copy
import io
import math

import pytest
import torch

from helpers import assert_relative_close, oracle, random_case
from sigreg_kernels import SIGReg, available_backends, sample_directions, sigreg, sigreg_reference


def good_args():
    x, directions = random_case((2,), 10, 6, 4)
    return dict(x=x, directions=directions)


BAD_CALLS = [
    ("x", dict(x=torch.randn(6)), ValueError, "x must be at least 2-D"),
    ("directions 1-D", dict(directions=torch.randn(6)), ValueError, "directions must be 2-D"),
    ("directions 3-D", dict(directions=torch.randn(1, 6, 4)), ValueError, "directions must be 2-D"),
    ("D mismatch", dict(directions=torch.randn(5, 4)), ValueError, r"directions must have shape \(D, K\)"),
    ("K = 0", dict(directions=torch.randn(6, 0)), ValueError, "at least one slice"),
    ("N = 0", dict(x=torch.randn(2, 0, 6)), ValueError, "at least one sample"),
    ("int x", dict(x=torch.ones(2, 10, 6, dtype=torch.int64)), TypeError, "x must be float16"),
    ("complex x", dict(x=torch.randn(2, 10, 6, dtype=torch.complex64)), TypeError, "x must be float16"),
    ("int directions", dict(directions=torch.ones(6, 4, dtype=torch.int32)), TypeError, "directions must be float16"),
    ("list x", dict(x=[[1.0] * 6] * 10), TypeError, "x must be a torch.Tensor"),
    ("devices", dict(directions=torch.randn(6, 4, device="meta")), ValueError, "same device"),
    ("float64 with float32", dict(directions=torch.randn(6, 4, dtype=torch.float64)), TypeError, "cannot be combined"),
    ("knots = 1", dict(knots=1), ValueError, "knots must be >= 2"),
    ("knots float", dict(knots=17.0), TypeError, "knots must be an int"),
    ("t_max = 0", dict(t_max=0.0), ValueError, "t_max must be finite and > 0"),
    ("t_max < 0", dict(t_max=-1.0), ValueError, "t_max must be finite and > 0"),
    ("t_max inf", dict(t_max=math.inf), ValueError, "t_max must be finite and > 0"),
    ("t_max nan", dict(t_max=math.nan), ValueError, "t_max must be finite and > 0"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("backend", dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    ("unavailable backend", dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
    ("distributed", dict(distributed="no"), TypeError, "distributed must be a bool or None"),
]


@pytest.mark.parametrize("case, override, error, message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_gives_a_clear_error(case, override, error, message):
    args = {**good_args(), **override}
    x, directions = args.pop("x"), args.pop("directions")
    with pytest.raises(error, match=message):
        sigreg(x, directions, **args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_slices=0), "num_slices must be a positive int"),
        (dict(knots=1), "knots must be >= 2"),
        (dict(t_max=-2.0), "t_max must be finite"),
        (dict(reduction="max"), "reduction must be one of"),
        (dict(backend="gpu"), "backend must be 'auto' or one of"),
    ],
)
def test_module_checks_its_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SIGReg(**kwargs)


def test_auto_backend_on_cpu_is_the_fused_kernel():
    assert available_backends("cpu")[0] == "cpu"
    x, directions = random_case((), 50, 8, 9)
    torch.testing.assert_close(sigreg(x, directions), sigreg(x, directions, backend="cpu"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_agree_with_the_oracle(backend):
    x, directions = random_case((3,), 45, 11, 17)
    assert_relative_close(backend, sigreg(x, directions, backend=backend), oracle(x, directions), 1e-5)


def published_directions(step, dim, num_slices):
    """SPEC §2, written out: randn(D, K) from a generator seeded with the step, unit columns."""
    g = torch.Generator(device="cpu")
    g.manual_seed(step)
    a = torch.randn((dim, num_slices), generator=g)
    return a / a.norm(p=2, dim=0)


def test_module_draws_the_published_directions_per_step():
    module = SIGReg(num_slices=31, backend="cpu")
    x, _ = random_case((2,), 40, 12, 1)
    losses = [module(x) for _ in range(8)]
    assert module.step.item() == 8 and "step" in module.state_dict()
    for step in (0, 1, 7):
        directions = published_directions(step, 12, 31)
        torch.testing.assert_close(sample_directions(step, 12, 31, "cpu"), directions, rtol=0, atol=0)
        assert_relative_close(f"step {step}", losses[step], sigreg_reference(x.double(), directions.double()), 1e-5)
    assert losses[0] != losses[1]


def test_module_state_dict_resumes_the_step():
    first = SIGReg(num_slices=8)
    x, _ = random_case((), 30, 5, 1)
    for _ in range(3):
        first(x)
    second = SIGReg(num_slices=8)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)


def test_module_gradients_flow_to_x():
    module = SIGReg(num_slices=16)
    x, _ = random_case((2,), 30, 5, 1)
    x.requires_grad_()
    module(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_autocast_follows_matmul():
    """Under autocast the projection runs in the autocast dtype, as `x @ directions` does."""
    x, directions = random_case((2,), 64, 16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sigreg(x, directions, backend="cpu")
        reference = sigreg_reference(x, directions)
    assert ours.dtype == torch.float32
    assert_relative_close("autocast", ours, reference, 2e-2)
    exact = sigreg(x.bfloat16(), directions.bfloat16(), backend="cpu")
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)


def test_mixed_half_and_float_inputs_follow_x():
    x, directions = random_case((), 64, 16, 24, dtype=torch.bfloat16)
    mixed = sigreg(x, directions.float(), backend="cpu")
    torch.testing.assert_close(mixed, sigreg(x, directions, backend="cpu"), rtol=0, atol=0)


def test_module_takes_float64_inputs():
    """The published draw (float32) cast exactly to float64."""
    module = SIGReg(num_slices=6, backend="cpu")
    x, _ = random_case((2,), 12, 4, 1, dtype=torch.float64)
    loss = module(x)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, sigreg_reference(x, published_directions(0, 4, 6).double()))


def test_module_copies_and_pickles_with_its_step():
    x, _ = random_case((), 20, 5, 1)
    for make_twin in (copy.deepcopy, lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False)):
        module = SIGReg(num_slices=8, backend="cpu")
        module(x)
        twin = make_twin(module)
        assert twin.step.item() == 1
        for _ in range(2):
            torch.testing.assert_close(twin(x), module(x), rtol=0, atol=0)


def _saved(module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()
