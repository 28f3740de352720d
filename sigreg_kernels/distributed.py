"""The one collective of SIGReg under torch.distributed (SPEC §2).

The statistic is a smooth function of the ECF sums over the global batch, so
only the ``2·K·T`` sums (and the sample count) cross the network: one
all-reduce in forward, none in backward.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceEcfSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, samples: int):
        global_sums, global_samples, ctx.world_size = all_reduce_sums_and_count(sums, samples)
        return global_sums, global_samples

    @staticmethod
    def backward(ctx, grad_sums, _grad_samples):
        # Each rank's samples enter the global statistic through its local sums,
        # so the local gradient is exact; DDP then *averages* parameter gradients
        # over ranks, which the world-size factor turns back into the sum that the
        # single-process gradient on the whole batch is.
        return grad_sums * ctx.world_size, None


def all_reduce_ecf_sums(sums: torch.Tensor, samples: int):
    """Global ECF sums and global sample count, summed over all ranks."""
    return _AllReduceEcfSums.apply(sums, samples)


def all_reduce_sums_and_count(sums: torch.Tensor, samples: int):
    """``(global sums, global sample count, world size)``: sums and count share one buffer,
    a single all-reduce per call.

    The caller's backward must scale each rank's gradient by the world size (see
    ``_AllReduceEcfSums.backward``): the fused path folds that factor into ``coef``.
    """
    buffer = torch.cat([sums.reshape(-1), sums.new_full((1,), float(samples))])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer[:-1].view_as(sums), int(buffer[-1].item()), dist.get_world_size()
