"""The one collective of SIGReg under torch.distributed (SPEC §2).

The statistic is a smooth function of the ECF sums over the global batch, so
only the ``2·K·T`` sums (and the sample count, and with sample weights their sum
and sum of squares per batch index) cross the network: one all-reduce in forward,
none in backward.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceEcfSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums, samples: int, moments):
        global_sums, global_samples, ctx.world_size, global_moments = all_reduce_sums_and_count(sums, samples, moments)
        return global_sums, global_samples, global_moments

    @staticmethod
    def backward(ctx, grad_sums, _grad_samples, _grad_moments):
        # Each rank's samples enter the global statistic through its local sums,
        # so the local gradient is exact; DDP then *averages* parameter gradients
        # over ranks, which the world-size factor turns back into the sum that the
        # single-process gradient on the whole batch is. (The weights get no gradient.)
        return grad_sums * ctx.world_size, None, None


def all_reduce_ecf_sums(sums: torch.Tensor, samples: int, moments=None):
    """Global ECF sums, global sample count and global weight moments ``[B, 2]`` (None without
    weights), summed over all ranks."""
    return _AllReduceEcfSums.apply(sums, samples, moments)


def all_reduce_sums_and_count(sums: torch.Tensor, samples: int, moments=None):
    """``(global sums, global sample count, world size, global moments)``: sums, count and the
    weights' moments (``sum w``, ``sum w^2`` per batch index, or None) share one buffer, a
    single all-reduce per call.

    The caller's backward must scale each rank's gradient by the world size (see
    ``_AllReduceEcfSums.backward``): the fused path folds that factor into ``coef``.
    """
    parts = [sums.reshape(-1), sums.new_full((1,), float(samples))]
    if moments is not None:
        parts.append(moments.to(sums.dtype).reshape(-1))
    buffer = torch.cat(parts)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    global_sums, count = buffer[:sums.numel()].view_as(sums), buffer[sums.numel()]
    global_moments = None if moments is None else buffer[sums.numel() + 1:].view(moments.shape).to(moments.dtype)
    return global_sums, int(count.item()), dist.get_world_size(), global_moments
