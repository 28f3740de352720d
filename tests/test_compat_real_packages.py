"""The compat classes against the published lightly 1.6.0 and stable-pretraining 0.1.8 classes themselves.

Optional: runs when those packages are installed (``pip install --no-deps
lightly==1.6.0 stable-pretraining==0.1.8``; see real_packages.py), skipped with
the reason otherwise. The formula-based tests (test_compat_lightly.py,
test_compat_stable_pretraining.py) hold the same behaviour without them.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_relative_close
from real_packages import LIGHTLY_VERSION, STABLE_PRETRAINING_VERSION, load_lightly, load_stable_pretraining
from test_distributed import SAMPLES, SLICES, WORLD, free_port, make_problem, shut_down
from test_lejepa import value_and_grad

from sigreg_kernels.compat import lightly as ours_lightly
from sigreg_kernels.compat import stable_pretraining as ours_sp


@pytest.fixture(scope="module")
def lightly():
    module = load_lightly()
    if module is None:
        pytest.skip(f"lightly=={LIGHTLY_VERSION} is not installed: no comparison with the published class")
    return module


@pytest.fixture(scope="module")
def stable_pretraining():
    module = load_stable_pretraining()
    if module is None:
        pytest.skip(f"stable-pretraining=={STABLE_PRETRAINING_VERSION} is not installed: "
                    "no comparison with the published class")
    return module


def assert_same_state(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------- lightly


@pytest.mark.parametrize("shape, kwargs", [((64, 10), {}), ((2, 40, 7), {"knots": 16, "t_max": 2.0}),
                                           ((3, 25, 6), {"knots": 9, "t_max": 5.0})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lightly_sigreg(lightly, shape, kwargs, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1.3
    theirs = lightly.lejepa_loss.SIGReg(num_vectors=29, **kwargs)
    ours = ours_lightly.SIGReg(num_vectors=29, **kwargs)
    assert_same_state(ours, theirs)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # lightly's float64 runs on its float32 knots and weights
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = value_and_grad(ours, x)
        after_ours = torch.randn(3)
        torch.manual_seed(seed)
        want = value_and_grad(theirs, x)
        assert torch.equal(torch.randn(3), after_ours), "the same draws from the global generator"
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=0)
        assert_relative_close("grad", got[1], want[1], tol)  # norm-wise: both sides carry float32 rounding


def test_lightly_bfloat16(lightly):
    x = torch.randn(80, 12, generator=torch.Generator().manual_seed(1)).bfloat16()
    torch.manual_seed(2)
    got = ours_lightly.SIGReg(num_vectors=16)(x)
    torch.manual_seed(2)
    want = lightly.lejepa_loss.SIGReg(num_vectors=16)(x)
    # lightly rounds the projection to bfloat16, the kernels keep it in float32
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=0)


def test_lightly_lejepa_and_lewm_losses(lightly):
    gen = torch.Generator().manual_seed(3)
    local_proj, global_proj = torch.randn(4, 32, 6, generator=gen), torch.randn(2, 32, 6, generator=gen)
    emb, predicted = torch.randn(16, 5, 6, generator=gen), torch.randn(16, 4, 6, generator=gen)
    pairs = [(ours_lightly.LeJEPALoss(0.3, sigreg_num_vectors=20),
              lightly.lejepa_loss.LeJEPALoss(0.3, sigreg_num_vectors=20),
              {"local_proj": local_proj, "global_proj": global_proj}),
             (ours_lightly.LeWMLoss(0.2, normalize=True, sigreg_num_vectors=12),
              lightly.lewm_loss.LeWMLoss(0.2, normalize=True, sigreg_num_vectors=12),
              {"predicted": predicted, "target": emb[:, 1:], "embeddings": emb})]
    for ours, theirs, inputs in pairs:
        assert_same_state(ours, theirs)
        torch.manual_seed(4)
        got = ours(**inputs)
        torch.manual_seed(4)
        torch.testing.assert_close(got, theirs(**inputs), rtol=1e-5, atol=0)


def lightly_worker(rank, port, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    published = load_lightly()
    results = {}
    for name, make in (("ours", ours_lightly.SIGReg), ("theirs", published.lejepa_loss.SIGReg)):
        for gather in (True, False):
            model, data = make_problem()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            torch.manual_seed(100 + rank)
            loss_fn = make(num_vectors=SLICES, gather_distributed=gather)
            out = []
            for _ in range(2):
                ddp.zero_grad()
                loss = loss_fn(ddp(data[:, rank * SAMPLES // WORLD:(rank + 1) * SAMPLES // WORLD]))
                loss.backward()
                out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            results[name, gather] = out
            del ddp
    torch.save(results, f"{results_path}.{rank}")
    shut_down()


def test_lightly_two_processes(lightly, tmp_path):
    """lightly 1.6.0 carries the DDP gradient fix (its autograd-aware all-reduce): the same numbers as ours."""
    results_path = str(tmp_path / "rank")
    mp.spawn(lightly_worker, args=(free_port(), results_path), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        result = torch.load(f"{results_path}.{rank}")
        for gather in (True, False):
            for (loss, grads), (loss_theirs, grads_theirs) in zip(result["ours", gather], result["theirs", gather]):
                torch.testing.assert_close(loss, loss_theirs, rtol=1e-5, atol=0)
                for g, g_theirs in zip(grads, grads_theirs):
                    torch.testing.assert_close(g, g_theirs, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- stable-pretraining


@pytest.mark.parametrize("shape", [(100, 5), (40, 3, 6), (300,)])
def test_stable_pretraining_epps_pulley(stable_pretraining, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 1.2
    theirs, ours = stable_pretraining.EppsPulley(t_max=2.5, n_points=9), ours_sp.EppsPulley(t_max=2.5, n_points=9)
    assert_same_state(ours, theirs)
    weight = torch.randn(shape[1:], generator=torch.Generator().manual_seed(6))
    got, want = value_and_grad(ours, x, weight), value_and_grad(theirs, x, weight)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    assert_relative_close("grad", got[1], want[1], 1e-5)


@pytest.mark.parametrize("shape", [(60, 12), (20, 3, 12)])
def test_stable_pretraining_sliced(stable_pretraining, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    theirs, ours = stable_pretraining.SlicedEppsPulley(num_slices=37), ours_sp.SlicedEppsPulley(num_slices=37)
    assert_same_state(ours, theirs)
    for _ in range(2):
        got, want = value_and_grad(ours, x), value_and_grad(theirs, x)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
        assert_relative_close("grad", got[1], want[1], 1e-5)
    assert_same_state(ours, theirs)  # both at step 2
    theirs(x)
    ours.load_state_dict(theirs.state_dict())  # their checkpoint, our module: the draws continue
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=0)
    fresh = stable_pretraining.SlicedEppsPulley(num_slices=37)
    fresh.load_state_dict(ours.state_dict())  # and back
    torch.testing.assert_close(fresh(x), ours(x), rtol=1e-5, atol=0)
