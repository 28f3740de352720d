"""``sigreg_kernels.compat.lightly``: lightly's SIGReg, LeJEPALoss and LeWMLoss on the fused op.

The expected numbers are lightly's documented behaviour written out in float64
with complex exponentials: directions ``randn(D, num_vectors)`` from the global
generator in the input's dtype, unit columns, a fresh draw per call; the
Epps-Pulley statistic of each slice; the mean over leading dims and slices.
"""

import inspect

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_relative_close, run_steps
from test_distributed import SAMPLES, SLICES, WORLD, free_port, make_problem, shut_down
from test_lejepa import epps_pulley_oracle, value_and_grad

import sigreg_kernels.compat.lightly as compat_lightly
from sigreg_kernels.compat.lightly import LeJEPALoss, LeWMLoss, SIGReg, lejepa_invariance_loss


def lightly_draw(dim, num_vectors, dtype, device="cpu"):
    """lightly's directions: the global generator, the input's dtype, unit columns."""
    directions = torch.randn(dim, num_vectors, dtype=dtype, device=device)
    return directions / directions.norm(p=2, dim=0)


def lightly_oracle(proj, num_vectors=1024, knots=17, t_max=3.0):
    """lightly's SIGReg in float64 (drawing from the global generator as it does)."""
    directions = lightly_draw(proj.shape[-1], num_vectors, proj.dtype, proj.device)
    return epps_pulley_oracle(proj.double() @ directions.double(), t_max, knots).mean()


def seeded(fn, seed):
    """``fn()`` right after ``torch.manual_seed(seed)``, and a draw of the generator after it."""
    torch.manual_seed(seed)
    out = fn()
    return out, torch.randn(4)


# ----------------------------------------------------------------------------- names and defaults


def test_names_and_defaults_are_lightlys():
    params = inspect.signature(SIGReg).parameters
    assert {name: (p.kind, p.default) for name, p in params.items()} == {
        "knots": (inspect.Parameter.KEYWORD_ONLY, 17), "t_max": (inspect.Parameter.KEYWORD_ONLY, 3.0),
        "num_vectors": (inspect.Parameter.KEYWORD_ONLY, 1024),
        "gather_distributed": (inspect.Parameter.KEYWORD_ONLY, False)}
    module = SIGReg()
    assert (module.num_vectors, module.gather_distributed, module.backend) == (1024, False, "auto")
    loss = LeJEPALoss()
    assert loss.lambda_param == 0.05 and isinstance(loss.sigreg, SIGReg)
    assert (loss.sigreg.knots, loss.sigreg.t_max, loss.sigreg.num_vectors) == (17, 3.0, 1024)
    positional = LeJEPALoss(0.1, False, 9, 2.0, 64)
    assert (positional.sigreg.knots, positional.sigreg.t_max, positional.sigreg.num_vectors) == (9, 2.0, 64)
    wm = LeWMLoss()
    assert (wm.lambda_param, wm.normalize, wm.sigreg.num_vectors) == (0.1, False, 1024)
    with pytest.raises(TypeError):
        SIGReg(17)  # keyword-only, as lightly's


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("shape, knots, t_max", [((50, 6), 17, 3.0), ((2, 40, 7), 16, 2.0), ((2, 3, 30, 5), 2, 1.0),
                                                 ((3, 25, 4), 9, 5.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_sigreg_matches_lightlys_statistic_and_draws(shape, knots, t_max, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.4).to(dtype)
    module = SIGReg(knots=knots, t_max=t_max, num_vectors=23)
    for seed in (0, 1):
        ours, after_ours = seeded(lambda: value_and_grad(module, x), seed)
        truth, after_truth = seeded(lambda: value_and_grad(lambda a: lightly_oracle(a, 23, knots, t_max), x), seed)
        assert torch.equal(after_ours, after_truth), "one draw of the global generator per call, as lightly's"
        value_tol, grad_tol = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}.get(dtype, (1e-4, 2e-2))
        assert_relative_close("value", ours[0], truth[0], value_tol)
        assert_relative_close("grad", ours[1], truth[1], grad_tol)
        assert ours[1].dtype == dtype


def test_every_call_draws_afresh():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    module = SIGReg(num_vectors=16)
    torch.manual_seed(3)
    ours = [module(x) for _ in range(3)]
    torch.manual_seed(3)
    truth = [lightly_oracle(x, 16) for _ in range(3)]
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=0)
    assert len({round(v.item(), 6) for v in ours}) == 3


def test_single_process_runs_the_fused_op_once(monkeypatch):
    calls = []
    real = compat_lightly.sigreg
    monkeypatch.setattr(compat_lightly, "sigreg", lambda *a, **k: calls.append(k.get("distributed")) or real(*a, **k))
    SIGReg(num_vectors=8)(torch.randn(2, 30, 5))
    assert calls == [None]  # one call of the fused op (global batch whenever a process group is up)


def test_lejepa_loss_is_lightlys_combination():
    gen = torch.Generator().manual_seed(4)
    local_proj, global_proj = torch.randn(4, 32, 6, generator=gen), torch.randn(2, 32, 6, generator=gen)
    loss_fn = LeJEPALoss(lambda_param=0.3, sigreg_num_vectors=20, sigreg_knots=9)
    torch.manual_seed(5)
    ours = loss_fn(local_proj=local_proj, global_proj=global_proj)
    torch.manual_seed(5)
    all_proj = torch.cat([global_proj, local_proj])
    invariance = (global_proj.double().mean(0) - all_proj.double()).square().mean()
    truth = 0.3 * lightly_oracle(all_proj, 20, 9) + 0.7 * invariance
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=0)
    torch.testing.assert_close(lejepa_invariance_loss(all_proj=all_proj, global_proj=global_proj).double(),
                               invariance, rtol=1e-6, atol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_lewm_loss_is_lightlys_combination(normalize):
    gen = torch.Generator().manual_seed(6)
    emb = torch.randn(24, 5, 6, generator=gen)  # (B, T, D)
    predicted = torch.randn(24, 4, 6, generator=gen, requires_grad=True)
    target = emb[:, 1:].clone().requires_grad_()
    loss_fn = LeWMLoss(lambda_param=0.2, normalize=normalize, sigreg_num_vectors=12)
    torch.manual_seed(7)
    ours = loss_fn(predicted=predicted, target=target, embeddings=emb)
    torch.manual_seed(7)
    p, q = predicted.detach().double(), target.detach().double()
    if normalize:
        p, q = torch.nn.functional.layer_norm(p, (6,)), torch.nn.functional.layer_norm(q, (6,))
    truth = (p - q).square().mean() + 0.2 * lightly_oracle(emb.transpose(0, 1), 12)  # one test per time step
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=0)
    ours.backward()
    assert target.grad is None, "the target is detached"


# ----------------------------------------------------------------------------- buffers and state dicts


def documented_buffers(knots, t_max):
    """lightly's buffers as its docstring states them, float32."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    trapezoid = torch.tensor([dt] + [2 * dt] * (knots - 2) + [dt], dtype=torch.float32)
    phi = torch.exp(-t.square() / 2.0)
    return {"t": t, "phi": phi, "weights": trapezoid * phi}


@pytest.mark.parametrize("knots, t_max", [(17, 3.0), (4, 2.5)])
def test_buffers_are_lightlys_bit_for_bit(knots, t_max):
    state = SIGReg(knots=knots, t_max=t_max).state_dict()
    expected = documented_buffers(knots, t_max)
    assert list(state) == ["t", "phi", "weights"]
    for name, value in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], value), name


def test_state_dicts_load_both_ways():
    theirs = {"sigreg." + name: value for name, value in documented_buffers(9, 2.0).items()}
    ours = LeJEPALoss(sigreg_knots=9, sigreg_t_max=2.0)
    ours.load_state_dict(theirs)  # strict
    assert list(ours.state_dict()) == list(theirs)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name])  # what lightly's module loads is what it saved itself
    LeWMLoss(sigreg_knots=9, sigreg_t_max=2.0).load_state_dict(theirs)
    with pytest.raises(ValueError, match="quadrature buffer 't'"):
        LeJEPALoss().load_state_dict(theirs)  # another quadrature: refused, not silently ignored
    with pytest.raises(ValueError, match="quadrature buffer"):
        SIGReg(knots=9, t_max=2.5).load_state_dict(documented_buffers(9, 2.0))


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("make, error, message", [
    (lambda: SIGReg(knots=1), ValueError, "knots must be >= 2"),
    (lambda: SIGReg(knots=17.0), TypeError, "knots must be an int"),
    (lambda: SIGReg(t_max=0.0), ValueError, "t_max must be finite and > 0"),
    (lambda: SIGReg(num_vectors=0), ValueError, "num_vectors must be a positive integer"),
    (lambda: SIGReg(num_vectors=8.0), TypeError, "num_vectors must be an int"),
    (lambda: SIGReg(gather_distributed="yes"), TypeError, "gather_distributed must be a bool"),
    (lambda: SIGReg()(torch.randn(5)), ValueError, "proj must be a tensor of shape"),
    (lambda: LeJEPALoss(lambda_param=1.5), ValueError, "lambda_param must be in the unit interval"),
    (lambda: LeJEPALoss()(local_proj=torch.randn(2, 8, 4), global_proj=torch.randn(2, 9, 4)), ValueError,
     "local_proj and global_proj must have the same"),
    (lambda: LeJEPALoss()(local_proj=torch.randn(8, 4), global_proj=torch.randn(2, 8, 4)), ValueError,
     "local_proj must have shape"),
    (lambda: LeWMLoss(lambda_param=-0.1), ValueError, "lambda_param must not be negative"),
    (lambda: LeWMLoss()(predicted=torch.randn(3, 2, 4), target=torch.randn(3, 2, 4), embeddings=torch.randn(3, 4)),
     ValueError, "embeddings must have shape"),
    (lambda: LeWMLoss()(predicted=torch.randn(3, 2, 4), target=torch.randn(3, 1, 4), embeddings=torch.randn(3, 3, 4)),
     ValueError, "predicted and target must have the same shape"),
])
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ----------------------------------------------------------------------------- torch.distributed

SEED = 100  # rank r seeds its global generator with SEED + r: different draws per rank


def shard(data, rank):
    return data[:, rank * SAMPLES // WORLD:(rank + 1) * SAMPLES // WORLD]


def worker(rank, port, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for gather in (True, False):
        model, data = make_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(SEED + rank)
        results[gather] = run_steps(ddp, SIGReg(num_vectors=SLICES, gather_distributed=gather), shard(data, rank))
        del ddp
    torch.save(results, f"{results_path}.{rank}")
    shut_down()


def test_two_processes(tmp_path):
    """gather_distributed: rank 0's draws and the whole batch's statistic and gradients.

    Without it: each rank's own statistic of its own batch with its own draws, and
    parameter gradients averaged over ranks by DDP, as lightly computes them.
    """
    results_path = str(tmp_path / "rank")
    mp.spawn(worker, args=(free_port(), results_path), nprocs=WORLD, join=True)
    model, data = make_problem()
    torch.manual_seed(SEED)
    gathered = run_steps(model, SIGReg(num_vectors=SLICES), data)
    per_rank = []
    for rank in range(WORLD):
        model, data = make_problem()
        torch.manual_seed(SEED + rank)
        per_rank.append(run_steps(model, SIGReg(num_vectors=SLICES), shard(data, rank)))
    for rank in range(WORLD):
        result = torch.load(f"{results_path}.{rank}")
        for (loss, grads), (loss_1p, grads_1p) in zip(result[True], gathered):
            torch.testing.assert_close(loss, loss_1p, rtol=1e-5, atol=0)
            for g, g_1p in zip(grads, grads_1p):
                torch.testing.assert_close(g, g_1p, rtol=1e-4, atol=1e-6)
        for step, (loss, grads) in enumerate(result[False]):
            torch.testing.assert_close(loss, per_rank[rank][step][0], rtol=1e-5, atol=0)
            for i, g in enumerate(grads):
                averaged = sum(per_rank[r][step][1][i] for r in range(WORLD)) / WORLD
                torch.testing.assert_close(g, averaged, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_rank[0][0][0], per_rank[1][0][0]), "the ranks' own statistics differ"
