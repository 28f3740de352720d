"""Two CPU processes (gloo) against one process on the whole batch (SPEC §2)."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sigreg_kernels import SIGReg, sigreg

WORLD = 2
VIEWS, SAMPLES, FEATURES, EMBED, SLICES = 3, 24, 10, 7, 33


def make_problem():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(FEATURES, EMBED)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    data = torch.randn(VIEWS, SAMPLES, FEATURES, generator=generator)
    return model, data


def single_process(backend):
    """Loss and parameter gradients of two steps on the whole batch."""
    model, data = make_problem()
    module = SIGReg(num_slices=SLICES, backend=backend)
    out = []
    for _ in range(2):
        model.zero_grad()
        loss = module(model(data))
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return out


def worker(rank, port, backend, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, data = make_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    module = SIGReg(num_slices=SLICES, backend=backend)
    if rank == 1:
        module.step.fill_(-1)  # a lagging rank: the first call must take the maximum step
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        # DDP's gradient buckets use their own path; this counts SIGReg's collectives.
        calls[phase[0]] += 1
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    shard = data[:, rank * SAMPLES // WORLD:(rank + 1) * SAMPLES // WORLD]
    out = []
    for _ in range(2):
        ddp.zero_grad()
        phase[0] = "forward"
        loss = module(ddp(shard))
        phase[0] = "backward"
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # distributed=False: this rank's own statistic, and no collective.
    phase[0] = "backward"  # (any call now would show up as a backward collective)
    local_x, local_directions = local_problem()
    local = sigreg(local_x[rank], local_directions, backend=backend, distributed=False)
    dist.all_reduce = real_all_reduce
    torch.save({"out": out, "calls": calls, "step": module.step.item(), "local": local},
               f"{results_path}.{rank}")
    del ddp
    shut_down()


def shut_down():
    """Destroys the process group once every rank is done (call it after the DDP modules are gone).

    Without the barrier, and with DDP still alive (torn down at the worker's return), one rank
    sometimes hung forever once the other had exited: about 1 run in 4 of this test.
    """
    dist.barrier()
    dist.destroy_process_group()


def local_problem():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD, 16, 5, generator=generator), torch.randn(5, 9, generator=generator)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_two_processes_match_one_process_on_the_global_batch(backend, tmp_path):
    results_path = str(tmp_path / "rank")
    mp.spawn(worker, args=(free_port(), backend, results_path), nprocs=WORLD, join=True)
    check_against_one_process(results_path, single_process(backend))
    local_x, local_directions = local_problem()
    for rank in range(WORLD):
        local = torch.load(f"{results_path}.{rank}")["local"]
        torch.testing.assert_close(local, sigreg(local_x[rank], local_directions, backend=backend), rtol=1e-6, atol=0)


def check_against_one_process(results_path, expected):
    for rank in range(WORLD):
        result = torch.load(f"{results_path}.{rank}")
        # one step sync on the first call, then one all-reduce of the ECF sums per call; none in backward
        assert result["calls"] == {"forward": 3, "backward": 0}, result["calls"]
        assert result["step"] == 2
        for (loss, grads), (loss_1p, grads_1p) in zip(result["out"], expected):
            torch.testing.assert_close(loss, loss_1p, rtol=1e-5, atol=0)
            for g, g_1p in zip(grads, grads_1p):
                torch.testing.assert_close(g, g_1p, rtol=1e-4, atol=1e-6)


# ---- Sample weights: each rank its own valid count, one all-reduce (sums, count, sum w, sum w^2)

def weighted_problem():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, WORLD * 12, 5, generator=generator, dtype=torch.float64)
    directions = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, WORLD * 12, dtype=torch.bool)
    mask[:, :9] = False  # rank 0 keeps 3 rows per batch index, rank 1 all 12
    mask[1, 12:20] = False
    x[~mask] = float("nan")  # garbage in the masked rows
    return x, directions, mask


def weighted_worker(rank, port, backend, results_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, directions, mask = weighted_problem()
    rows = slice(rank * 12, (rank + 1) * 12)
    shard = x[:, rows].clone().requires_grad_()
    real_all_reduce, calls = dist.all_reduce, []
    dist.all_reduce = lambda tensor, *a, **k: calls.append(tensor.numel()) or real_all_reduce(tensor, *a, **k)
    loss = sigreg(shard, directions, weights=mask[:, rows], backend=backend)
    (grad,) = torch.autograd.grad(loss, shard)
    dist.all_reduce = real_all_reduce
    torch.save({"loss": loss.detach(), "grad": grad, "calls": calls}, f"{results_path}.{rank}")
    shut_down()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_weighted_two_processes_match_one_process(backend, tmp_path):
    results_path = str(tmp_path / "rank")
    mp.spawn(weighted_worker, args=(free_port(), backend, results_path), nprocs=WORLD, join=True)
    x, directions, mask = weighted_problem()
    whole = x.clone().requires_grad_()
    loss = sigreg(whole, directions, weights=mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, whole)
    for rank in range(WORLD):
        result = torch.load(f"{results_path}.{rank}")
        assert len(result["calls"]) == 1, "one all-reduce: the sums, the count and the weights' moments"
        torch.testing.assert_close(result["loss"], loss, rtol=1e-12, atol=0)
        # DDP averages over ranks: each rank's gradient is the world size times its rows' share.
        torch.testing.assert_close(result["grad"], WORLD * grad[:, rank * 12:(rank + 1) * 12], rtol=1e-10, atol=1e-14)
        assert torch.isfinite(result["grad"]).all()
