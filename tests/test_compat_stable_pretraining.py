"""``sigreg_kernels.compat.stable_pretraining``: stable-pretraining's EppsPulley and SlicedEppsPulley on the fused op.

The expected numbers are its documented behaviour written out in float64 with
complex exponentials: the samples along dimension 0, ``N · Σ_j w_j |ψ_N(t_j) − φ(t_j)|²``
per column; the slicing test's directions ``randn(D, K)`` from a generator seeded
with ``global_step``, unit columns, and the mean of the statistics.
"""

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_relative_close
from test_distributed import SAMPLES, SLICES, WORLD, free_port, make_problem, shut_down
from test_lejepa import epps_pulley_oracle, published_directions, value_and_grad

from sigreg_kernels.compat.stable_pretraining import EppsPulley, SlicedEppsPulley
from sigreg_kernels.lejepa import LeJEPAArgumentError


def dim0_oracle(x, t_max=3.0, n_points=17):
    """stable-pretraining's statistic in float64: the test of every column, samples along dimension 0."""
    return epps_pulley_oracle(x.reshape(x.shape[0], -1), t_max, n_points).reshape(x.shape[1:])


def sliced_oracle(x, step, num_slices, t_max=3.0, n_points=17):
    directions = published_directions(step, x.shape[-1], num_slices).double()
    return dim0_oracle(x.double() @ directions, t_max, n_points).mean()


# ----------------------------------------------------------------------------- names and defaults


def test_names_and_defaults_are_stable_pretrainings():
    assert [(n, p.default) for n, p in inspect.signature(EppsPulley).parameters.items()] == [("t_max", 3.0),
                                                                                          ("n_points", 17)]
    assert [(n, p.default) for n, p in inspect.signature(SlicedEppsPulley).parameters.items()] == [
        ("num_slices", 1024), ("t_max", 3.0), ("n_points", 17)]
    loss_fn = SlicedEppsPulley()
    assert loss_fn.num_slices == 1024 and isinstance(loss_fn.ep, EppsPulley) and loss_fn.is_fused()
    assert (loss_fn.ep.t_max, loss_fn.ep.n_points, loss_fn.ep.backend) == (3.0, 17, "auto")


# ----------------------------------------------------------------------------- EppsPulley


@pytest.mark.parametrize("shape, t_max, n_points", [((100, 5), 3.0, 17), ((300,), 2.0, 9), ((40, 3, 6), 3.0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_epps_pulley_matches_the_published_statistic(shape, t_max, n_points, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.3).to(dtype)
    weight = torch.randn(shape[1:-1] + shape[-1:] if len(shape) > 1 else (),
                         generator=torch.Generator().manual_seed(1))
    test = EppsPulley(t_max=t_max, n_points=n_points)
    ours = value_and_grad(test, x, weight)
    truth = value_and_grad(lambda a: dim0_oracle(a, t_max, n_points), x, weight)
    value_tol, grad_tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}.get(dtype, (1e-4, 2e-2))
    assert ours[0].shape == truth[0].shape == shape[1:]
    assert_relative_close("value", ours[0], truth[0], value_tol)
    assert_relative_close("grad", ours[1], truth[1], grad_tol)
    assert ours[1].dtype == dtype


# ----------------------------------------------------------------------------- SlicedEppsPulley


@pytest.mark.parametrize("shape", [(60, 12), (20, 3, 12)])
def test_sliced_matches_the_published_semantics_step_by_step(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 1.2
    loss_fn = SlicedEppsPulley(num_slices=37, t_max=2.5, n_points=9)
    for step in range(3):
        assert loss_fn.global_step.item() == step
        ours = value_and_grad(loss_fn, x)
        truth = value_and_grad(lambda a: sliced_oracle(a, step, 37, 2.5, 9), x)
        torch.testing.assert_close(ours[0].double(), truth[0], rtol=1e-5, atol=0)
        assert_relative_close("grad", ours[1], truth[1], 1e-5)
    assert loss_fn.global_step.item() == 3


def test_float64_input_is_computed():
    x = torch.randn(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss = SlicedEppsPulley(num_slices=11)(x)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, sliced_oracle(x, 0, 11), rtol=1e-10, atol=0)


class PlainEppsPulley(EppsPulley):
    """A subclass with its own forward: the slicing test must call it on the projection."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_another_univariate_test_gets_the_projection():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(4))
    loss_fn = SlicedEppsPulley(num_slices=10)
    loss_fn.ep = PlainEppsPulley()
    assert not loss_fn.is_fused()
    torch.testing.assert_close(loss_fn(x).double(), 2 * sliced_oracle(x, 0, 10), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- buffers and state dicts


def documented_state(step=0, t_max=3.0, n_points=17):
    """A stable-pretraining SlicedEppsPulley state dict, from its documented buffers."""
    t = torch.linspace(0, t_max, n_points)
    dt = t_max / (n_points - 1)
    trapezoid = torch.tensor([dt] + [2 * dt] * (n_points - 2) + [dt])
    phi = (-0.5 * t ** 2).exp()
    return {"global_step": torch.tensor(step), "ep.t": t, "ep.phi": phi, "ep.weights": trapezoid * phi}


def test_state_dict_is_the_published_one_bit_for_bit():
    state = SlicedEppsPulley(t_max=2.0, n_points=5).state_dict()
    theirs = documented_state(0, 2.0, 5)
    assert list(state) == list(theirs)
    for name, value in theirs.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name
    assert state["global_step"].shape == ()


def test_state_dicts_load_both_ways_and_continue_the_draws():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(5))
    ours = SlicedEppsPulley(num_slices=8)
    ours.load_state_dict(documented_state(step=7))  # strict
    torch.testing.assert_close(ours(x).double(), sliced_oracle(x, 7, 8), rtol=1e-5, atol=0)
    saved = {name: value.clone() for name, value in ours.state_dict().items()}
    assert saved["global_step"].item() == 8
    resumed = SlicedEppsPulley(num_slices=8)
    resumed(x)  # it has run before: loading must override its own step
    resumed.load_state_dict(saved)
    torch.testing.assert_close(resumed(x), ours(x), rtol=0, atol=0)
    EppsPulley().load_state_dict({name[3:]: v for name, v in documented_state().items() if name.startswith("ep.")})
    with pytest.raises(ValueError, match="quadrature buffer 't'"):
        SlicedEppsPulley(t_max=2.0).load_state_dict(documented_state())


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("make, message", [
    (lambda: EppsPulley(n_points=16), "n_points must be odd"),
    (lambda: EppsPulley(n_points=17.0), "n_points must be an int"),
    (lambda: EppsPulley(t_max=0.0), "t_max must be finite and > 0"),
    (lambda: SlicedEppsPulley(num_slices=0), "num_slices must be a positive int"),
    (lambda: SlicedEppsPulley(n_points=4), "n_points must be odd"),
])
def test_bad_arguments(make, message):
    with pytest.raises(LeJEPAArgumentError, match=message) as info:
        make()
    assert isinstance(info.value, AssertionError), "stable-pretraining asserts an odd n_points"


def test_bad_inputs():
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        SlicedEppsPulley(8)(torch.randn(5))
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        EppsPulley()(torch.tensor(1.0))


# ----------------------------------------------------------------------------- torch.distributed


def run_steps(model, loss_fn, data, steps=2):
    out = []
    for _ in range(steps):
        model.zero_grad()
        loss = loss_fn(model(data).flatten(0, 1))  # (V·N, D): the views pooled, as stable-pretraining's LeJEPA
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return out


def make_loss(variant):
    if variant == "sliced":
        return SlicedEppsPulley(num_slices=SLICES)
    test = EppsPulley()
    return lambda proj: test(proj).mean()


def worker(rank, port, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for variant in ("sliced", "univariate"):
        model, data = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = make_loss(variant)
        if variant == "sliced" and rank == 1:
            loss_fn.global_step.fill_(5)  # a rank ahead: rank 0's step is the one every rank takes
        shard = data[:, rank * SAMPLES // WORLD:(rank + 1) * SAMPLES // WORLD]
        results[variant] = run_steps(ddp, loss_fn, shard)
        if variant == "sliced":
            results["step"] = loss_fn.global_step.item()
        del ddp
    torch.save(results, f"{results_path}.{rank}")
    shut_down()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    """The statistic of the global batch and its single-process gradients (the published all-reduce intended it)."""
    results_path = str(tmp_path / "rank")
    mp.spawn(worker, args=(free_port(), results_path), nprocs=WORLD, join=True)
    for variant in ("sliced", "univariate"):
        model, data = make_problem()
        expected = run_steps(model, make_loss(variant), data)
        for rank in range(WORLD):
            result = torch.load(f"{results_path}.{rank}")
            assert result["step"] == 2
            for (loss, grads), (loss_1p, grads_1p) in zip(result[variant], expected):
                torch.testing.assert_close(loss, loss_1p, rtol=1e-5, atol=0)
                for g, g_1p in zip(grads, grads_1p):
                    torch.testing.assert_close(g, g_1p, rtol=1e-4, atol=1e-6)
