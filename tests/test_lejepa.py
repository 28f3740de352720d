"""``sigreg_kernels.lejepa``: the published LeJEPA classes on the fused op.

The expected numbers come from the published semantics written out here from
the documentation and the math (SPEC §1-2), in float64 and with complex
exponentials (another route than the project's reference): the Epps-Pulley
statistic ``N · Σ_j w_j |ψ_N(t_j) − φ(t_j)|²`` of each column, and the slicing
test's directions ``randn(D, K)`` from a generator seeded with the step, unit
columns, ``stats[stats < clip_value] = 0``, then the reduction.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_relative_close, random_case, run_steps
from test_distributed import SAMPLES, SLICES, WORLD, free_port, make_problem, shut_down
from torch.utils._python_dispatch import TorchDispatchMode

import sigreg_kernels
import sigreg_kernels.lejepa.multivariate as multivariate_module
import sigreg_kernels.lejepa.univariate as univariate_module
from sigreg_kernels import SIGReg, lejepa
from sigreg_kernels.lejepa import EppsPulley, LeJEPAArgumentError, SlicingUnivariateTest


def epps_pulley_oracle(samples, t_max=3.0, n_points=17):
    """``[*, N, K] -> [*, K]`` in float64: ``N · Σ_j w_j |ψ_N(t_j) − φ(t_j)|²``, trapezoid on [0, t_max], doubled."""
    samples = samples.double()
    t = torch.linspace(0.0, t_max, n_points, dtype=torch.float64)
    dt = t_max / (n_points - 1)
    trapezoid = torch.full((n_points,), 2 * dt, dtype=torch.float64)
    trapezoid[0] = trapezoid[-1] = dt
    phi = torch.exp(-t.square() / 2)
    ecf = torch.exp(1j * samples.unsqueeze(-1) * t).mean(dim=-3)  # [*, K, T], complex
    return samples.shape[-2] * ((ecf - phi).abs().square() * trapezoid * phi).sum(dim=-1)


def published_directions(step, dim, num_slices, device="cpu"):
    generator = torch.Generator(device=device)
    generator.manual_seed(step)
    directions = torch.randn(dim, num_slices, generator=generator, device=device)
    return directions / directions.norm(p=2, dim=0)


def slicing_oracle(x, step, num_slices, test=epps_pulley_oracle, clip_value=None, reduction="mean"):
    """On ``x``'s device (the draw depends on it), in float64."""
    stats = test(x.double() @ published_directions(step, x.shape[-1], num_slices, x.device).double())
    if clip_value is not None:
        stats = torch.where(stats < clip_value, 0.0, stats)
    if reduction == "mean":
        return stats.mean()
    if reduction == "sum":
        return stats.sum()
    return stats


def value_and_grad(fn, x, weight=None):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    loss = out if weight is None else (out * weight.to(out.dtype)).sum()
    (grad,) = torch.autograd.grad(loss * 2, x)
    return out.detach(), grad


# ----------------------------------------------------------------------------- the namespace


def test_published_names():
    assert lejepa.univariate.EppsPulley is EppsPulley
    assert lejepa.multivariate.SlicingUnivariateTest is SlicingUnivariateTest
    test = EppsPulley()
    assert (test.t_max, test.n_points, test.integration) == (3, 17, "trapezoid")
    loss_fn = SlicingUnivariateTest(univariate_test=test, num_slices=1024)
    assert (loss_fn.num_slices, loss_fn.reduction, loss_fn.sampler, loss_fn.clip_value) == (1024, "mean",
                                                                                              "gaussian", None)
    assert loss_fn.univariate_test is test and loss_fn.is_fused()
    positional = SlicingUnivariateTest(EppsPulley(2.0, 9, "trapezoid"), 8, "sum", "gaussian", 0.5)
    assert (positional.reduction, positional.clip_value, positional.univariate_test.n_points) == ("sum", 0.5, 9)


# ----------------------------------------------------------------------------- EppsPulley


@pytest.mark.parametrize("shape, t_max, n_points", [((100, 5), 3, 17), ((2, 3, 41, 7), 2.5, 9), ((1, 1), 3, 3),
                                                     ((3, 200, 1), 5.0, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_epps_pulley_matches_the_published_statistic(shape, t_max, n_points, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5).to(dtype)
    weight = torch.randn(*shape[:-2], shape[-1], generator=torch.Generator().manual_seed(1))
    test = EppsPulley(t_max=t_max, n_points=n_points)
    ours = value_and_grad(test, x, weight)
    truth = value_and_grad(lambda a: epps_pulley_oracle(a, t_max, n_points), x, weight)
    value_tol, grad_tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}.get(dtype, (1e-4, 2e-2))
    assert ours[0].shape == (*shape[:-2], shape[-1])
    assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours[1].dtype == dtype
    assert_relative_close("statistic", ours[0], truth[0], value_tol)
    assert_relative_close("grad", ours[1], truth[1], grad_tol)


def test_epps_pulley_behaves_as_a_normality_test():
    test = EppsPulley()
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(5000, 3, generator=gen)
    others = torch.stack([torch.rand(5000, generator=gen), torch.randn(5000, generator=gen) + 1,
                          torch.randn(5000, generator=gen) * 3], dim=1)
    assert (test(normal) < 2.0).all() and (test(others) > 50).all()
    assert (test(normal) >= 0).all()


def test_epps_pulley_buffers_are_the_published_ones():
    test = EppsPulley(t_max=2.0, n_points=5)
    assert list(test.state_dict()) == ["t", "phi", "weights"]
    t = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0])
    phi = torch.exp(-t.square() / 2)
    for name, value in (("t", t), ("phi", phi), ("weights", torch.tensor([0.5, 1, 1, 1, 0.5]) * phi)):
        assert getattr(test, name).dtype == torch.float32
        torch.testing.assert_close(getattr(test, name), value)


def test_epps_pulley_runs_no_product():
    x = torch.randn(2, 64, 32, requires_grad=True)
    test = EppsPulley()
    test.backend = "cpu"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        test(x).sum().backward()
    names = {event.name for event in prof.events()}
    assert "sigreg::ecf_sums" in names
    assert not names & {"aten::mm", "aten::bmm", "aten::matmul", "aten::addmm"}


def test_epps_pulley_backend_attribute():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(13))
    test = EppsPulley()
    default = test(x)
    test.backend = "reference"
    assert_relative_close("reference backend", test(x), default, 1e-5)


# ----------------------------------------------------------------------------- SlicingUnivariateTest


@pytest.mark.parametrize("reduction", ["mean", "sum", None])
@pytest.mark.parametrize("clip_value", [None, 1.0])
def test_slicing_matches_the_published_semantics_step_by_step(reduction, clip_value):
    x, _ = random_case((2,), 60, 12, 1, scale=1.4, seed=2)
    loss_fn = SlicingUnivariateTest(EppsPulley(), num_slices=37, reduction=reduction, clip_value=clip_value)
    weight = torch.randn(2, 37, generator=torch.Generator().manual_seed(3)) if reduction is None else None
    for step in range(4):
        assert loss_fn.global_step.item() == step
        ours = value_and_grad(loss_fn, x, weight)
        truth = value_and_grad(lambda a: slicing_oracle(a, step, 37, clip_value=clip_value, reduction=reduction),
                               x, weight)
        assert_relative_close(f"step {step} value", ours[0], truth[0], 1e-5)
        assert_relative_close(f"step {step} grad", ours[1], truth[1], 1e-5)
    assert loss_fn.global_step.item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_slicing_on_the_gpu_draws_there(backend):
    if backend != "auto" and backend not in sigreg_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not built")
    x, _ = random_case((2,), 300, 40, 1, scale=1.3, seed=11, device="cuda")
    test = EppsPulley()
    test.backend = backend
    loss_fn = SlicingUnivariateTest(test, num_slices=64, clip_value=0.5)
    for step in range(3):
        ours = value_and_grad(loss_fn, x)
        truth = value_and_grad(lambda a: slicing_oracle(a, step, 64, clip_value=0.5), x)
        assert_relative_close(f"step {step} value", ours[0].cpu(), truth[0].cpu(), 1e-5)
        assert_relative_close(f"step {step} grad", ours[1].cpu(), truth[1].cpu(), 1e-5)
    stats = test(x)
    assert_relative_close("EppsPulley", stats.cpu(), epps_pulley_oracle(x).cpu(), 1e-5)


def test_slicing_of_a_single_matrix_and_reduction_none_spelled_as_a_string():
    x = torch.randn(80, 9, generator=torch.Generator().manual_seed(4))
    stats = SlicingUnivariateTest(EppsPulley(n_points=9, t_max=2.0), 16, reduction="none")(x)
    assert stats.shape == (16,)
    assert_relative_close("stats", stats, slicing_oracle(x, 0, 16, lambda p: epps_pulley_oracle(p, 2.0, 9),
                                                         reduction=None), 1e-5)


def test_fused_path_is_one_call_of_the_op(monkeypatch):
    calls = []

    def spy(name, real):
        def wrapper(x, directions, **kwargs):
            calls.append((name, directions is None))
            return real(x, directions, **kwargs)
        return wrapper

    monkeypatch.setattr(multivariate_module, "sigreg", spy("multivariate", multivariate_module.sigreg))
    monkeypatch.setattr(univariate_module, "sigreg", spy("univariate", univariate_module.sigreg))
    SlicingUnivariateTest(EppsPulley(), 8)(torch.randn(30, 5))
    assert calls == [("multivariate", False)], "the projection goes into the op; EppsPulley.forward is not called"
    EppsPulley()(torch.randn(30, 5))
    assert calls[1:] == [("univariate", True)]


class Moments(torch.nn.Module):
    """A univariate test other than Epps-Pulley: squared deviations of the first moments from N(0, 1)'s."""

    def forward(self, x):
        mean = x.mean(dim=-2)
        var = x.var(dim=-2)
        return mean.square() + (var - 1).square()


class PlainEppsPulley(EppsPulley):
    """A subclass with its own forward: not the fused path, whatever it inherits."""

    def forward(self, x):
        return super().forward(x) * 1.0


@pytest.mark.parametrize("make_test, oracle", [(Moments, Moments()), (PlainEppsPulley, epps_pulley_oracle)],
                         ids=["moments", "epps-pulley-subclass"])
@pytest.mark.parametrize("reduction", ["mean", None])
def test_fallback_computes_the_test_of_the_projection(make_test, oracle, reduction):
    x, _ = random_case((3,), 50, 10, 1, scale=1.2, seed=5)
    test = make_test()
    loss_fn = SlicingUnivariateTest(test, num_slices=20, reduction=reduction, clip_value=0.3)
    assert not loss_fn.is_fused()
    weight = torch.randn(3, 20, generator=torch.Generator().manual_seed(6)) if reduction is None else None
    for step in range(3):
        ours = value_and_grad(loss_fn, x, weight)
        directions = published_directions(step, 10, 20)

        def written_out(a):  # the published forward, spelled out on our module
            stats = test(a @ directions)
            stats = torch.where(stats < 0.3, 0.0, stats)
            return stats.mean() if reduction == "mean" else stats

        exact = value_and_grad(written_out, x, weight)
        assert torch.equal(ours[0], exact[0]) and torch.equal(ours[1], exact[1])
        truth = value_and_grad(lambda a: slicing_oracle(a, step, 20, oracle, 0.3, reduction), x, weight)
        assert_relative_close("value", ours[0], truth[0], 1e-5)
        assert_relative_close("grad", ours[1], truth[1], 1e-4)


def test_float64_inputs_are_computed_in_float64():
    x = torch.randn(2, 40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for test in (EppsPulley(), Moments()):
        loss = SlicingUnivariateTest(test, 12)(x)
        assert loss.dtype == torch.float64
        want = slicing_oracle(x, 0, 12, epps_pulley_oracle if isinstance(test, EppsPulley) else test)
        assert_relative_close("float64", loss, want, 1e-6)  # the directions are drawn in float32


# ----------------------------------------------------------------------------- state dicts


def test_state_dict_keys_are_the_published_ones():
    loss_fn = SlicingUnivariateTest(EppsPulley(), 16)
    assert list(loss_fn.state_dict()) == ["global_step", "univariate_test.t", "univariate_test.phi",
                                          "univariate_test.weights"]
    assert loss_fn.global_step.dtype == torch.long and loss_fn.global_step.shape == ()


def continue_both(first, second, x, calls=3):
    for _ in range(calls):
        torch.testing.assert_close(first(x), second(x), rtol=1e-6, atol=0)


def test_state_dicts_load_across_sigreg_and_slicing_test():
    x, _ = random_case((2,), 40, 8, 1, seed=8)
    sigreg_module = SIGReg(num_slices=16)
    for _ in range(3):
        sigreg_module(x)
    slicing = SlicingUnivariateTest(EppsPulley(), 16)
    slicing.load_state_dict(sigreg_module.state_dict())  # strict: "step" is read as "global_step"
    assert slicing.global_step.item() == 3
    continue_both(sigreg_module, slicing, x)

    back = SIGReg(num_slices=16)
    back.load_state_dict(slicing.state_dict())  # strict: global_step and the matching quadrature
    assert back.step.item() == 6
    continue_both(back, slicing, x)

    again = SlicingUnivariateTest(EppsPulley(), 16)
    again.load_state_dict(slicing.state_dict())
    continue_both(again, slicing, x)


def test_state_dict_with_a_one_element_step():
    slicing = SlicingUnivariateTest(EppsPulley(), 4)
    state = slicing.state_dict()
    state["global_step"] = torch.tensor([5])
    slicing.load_state_dict(state)
    assert slicing.global_step.shape == () and slicing.global_step.item() == 5


def test_state_dict_of_another_quadrature_is_refused():
    saved = SlicingUnivariateTest(EppsPulley(t_max=2.0), 4).state_dict()
    with pytest.raises(ValueError, match="quadrature buffer 't'"):
        SlicingUnivariateTest(EppsPulley(), 4).load_state_dict(saved)
    with pytest.raises(ValueError, match="quadrature buffer 't'"):
        SIGReg(num_slices=4).load_state_dict(saved)
    SIGReg(num_slices=4, t_max=2.0).load_state_dict(saved)


def test_resuming_continues_the_draws():
    x, _ = random_case((), 30, 5, 1, seed=9)
    first = SlicingUnivariateTest(EppsPulley(), 8)
    for _ in range(2):
        first(x)
    state = {name: value.clone() for name, value in first.state_dict().items()}  # a checkpoint, not live buffers
    expected = [first(x) for _ in range(2)]
    resumed = SlicingUnivariateTest(EppsPulley(), 8)
    resumed(x)  # it has run before: loading must override its own step
    resumed.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(resumed(x), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the step without a host read


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (.item(), bool(), int())."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [lambda: SlicingUnivariateTest(EppsPulley(), 8),
                                  lambda: SlicingUnivariateTest(Moments(), 8),
                                  lambda: SIGReg(num_slices=8, backend="cpu"),
                                  lambda: SIGReg(num_slices=8, backend="reference", clip_value=0.1)],
                         ids=["slicing-fused", "slicing-fallback", "sigreg-cpu", "sigreg-reference"])
def test_calls_read_nothing_back_from_the_device(make):
    module = make()
    x = torch.randn(2, 30, 6, requires_grad=True)
    module(x).backward()  # the first call reads the step buffer once
    with HostReads() as mode:
        for _ in range(3):
            module(x).backward()
    assert mode.reads == 0
    step = getattr(module, module.STEP_BUFFER)
    assert step.item() == 4


def test_a_step_written_from_outside_is_picked_up():
    x, _ = random_case((), 30, 5, 1, seed=10)
    for module, oracle_test in ((SlicingUnivariateTest(EppsPulley(), 8), epps_pulley_oracle),
                                (SIGReg(num_slices=8), epps_pulley_oracle)):
        module(x)
        getattr(module, module.STEP_BUFFER).fill_(11)
        assert_relative_close("step 11", module(x), slicing_oracle(x, 11, 8, oracle_test), 1e-5)
        assert getattr(module, module.STEP_BUFFER).item() == 12


@pytest.mark.parametrize("make", [lambda: SlicingUnivariateTest(EppsPulley(), 8),
                                  lambda: SIGReg(num_slices=8, backend="cpu")], ids=["slicing", "sigreg"])
def test_compiled_module_draws_every_step_without_recompiling(make):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x, _ = random_case((2,), 30, 6, 1, seed=12)
    module, counter = make(), CompileCounter()
    compiled = torch.compile(module, backend=counter)
    for step in range(10):
        assert_relative_close(f"step {step}", compiled(x), slicing_oracle(x, step, 8), 1e-5)
    assert counter.frame_count <= 2, "the step is host state outside the graph: no recompilation per step"


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("make, message", [
    (lambda: EppsPulley(n_points=16), "n_points must be odd"),
    (lambda: EppsPulley(n_points=1), "n_points must be odd and >= 3"),
    (lambda: EppsPulley(n_points=17.0), "n_points must be an int"),
    (lambda: EppsPulley(integration="simpson"), "integration must be one of"),
    (lambda: EppsPulley(t_max=0), "t_max must be finite and > 0"),
    (lambda: EppsPulley(t_max="3"), "t_max must be a number"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 8, sampler="sobol"), "sampler must be one of"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 8, reduction="avg"), "reduction must be 'mean', 'sum' or None"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 0), "num_slices must be a positive int"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 8.0), "num_slices must be a positive int"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 8, clip_value="1"), "clip_value must be a float or None"),
    (lambda: SlicingUnivariateTest(EppsPulley(), 8, clip_value=float("nan")), "clip_value must not be NaN"),
    (lambda: SlicingUnivariateTest("epps", 8), "univariate_test must be a module"),
])
def test_bad_arguments(make, message):
    with pytest.raises(LeJEPAArgumentError, match=message) as info:
        make()
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x must be a tensor of shape"):
        SlicingUnivariateTest(EppsPulley(), 8)(torch.randn(5))
    with pytest.raises(ValueError, match="x must be at least 2-D"):
        EppsPulley()(torch.randn(5))
    with pytest.raises(ValueError, match="at least one sample"):
        EppsPulley()(torch.randn(0, 3))


# ----------------------------------------------------------------------------- torch.distributed

VARIANTS = ("fused", "fallback", "univariate")


def make_loss(variant):
    if variant == "fused":
        return SlicingUnivariateTest(EppsPulley(), SLICES)
    if variant == "fallback":
        return SlicingUnivariateTest(PlainEppsPulley(), SLICES)
    test = EppsPulley()
    return lambda proj: test(proj).mean()


def worker(rank, port, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for variant in VARIANTS:
        model, data = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss_fn = make_loss(variant)
        if rank == 1 and variant != "univariate":
            loss_fn.global_step.fill_(-1)  # a lagging rank: the steps are synchronized by max
        shard = data[:, rank * SAMPLES // WORLD:(rank + 1) * SAMPLES // WORLD]
        results[variant] = run_steps(ddp, loss_fn, shard)
        if variant != "univariate":
            results[variant + "_step"] = loss_fn.global_step.item()
    torch.save(results, f"{results_path}.{rank}")
    del ddp
    shut_down()


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    results_path = str(tmp_path / "rank")
    mp.spawn(worker, args=(free_port(), results_path), nprocs=WORLD, join=True)
    for variant in VARIANTS:
        model, data = make_problem()
        expected = run_steps(model, make_loss(variant), data)
        for rank in range(WORLD):
            result = torch.load(f"{results_path}.{rank}")
            if variant != "univariate":
                assert result[variant + "_step"] == 2
            for (loss, grads), (loss_1p, grads_1p) in zip(result[variant], expected):
                torch.testing.assert_close(loss, loss_1p, rtol=1e-5, atol=0)
                for g, g_1p in zip(grads, grads_1p):
                    torch.testing.assert_close(g, g_1p, rtol=1e-4, atol=1e-6)
