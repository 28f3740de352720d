"""The fused GPU path under torch.distributed (two CPU processes, gloo), with the contract's kernels.

The GPU kernels need a GPU; their orchestration (gpu/fused.py: one all-reduce of the
sums, the global sample count, the world-size factor folded into ``coef``) is the
same for every backend, so it is checked here with the contract's kernels
standing in for them, against one process on the whole batch.
"""

import torch.multiprocessing as mp
import test_distributed as base

import contract_kernels
from sigreg_kernels import functional
from sigreg_kernels.gpu import fused


def fused_worker(rank, port, results_path):
    # Route the cpu backend through gpu/fused.py with the contract's kernels.
    fused.register_kernels("cpu", contract_kernels)
    functional.FUSED_BACKENDS = (*functional.FUSED_BACKENDS, "cpu")
    base.worker(rank, port, "cpu", results_path)


def test_fused_path_two_processes_match_one_process(tmp_path):
    results_path = str(tmp_path / "rank")
    mp.spawn(fused_worker, args=(base.free_port(), results_path), nprocs=base.WORLD, join=True)
    base.check_against_one_process(results_path, base.single_process("reference"))
