"""lightly's SIGReg losses (``lightly.loss``: ``SIGReg``, ``LeJEPALoss``, ``LeWMLoss``) on the fused op.

    from sigreg_kernels.compat.lightly import SIGReg     # instead of: from lightly.loss import SIGReg
    loss = SIGReg(num_vectors=1024)(proj)                # proj: [..., N, D]

Same names, keyword arguments, defaults, buffers and numbers as lightly 1.6,
written from its documented behaviour: the directions are ``randn(D, num_vectors)``
from the global random generator in ``proj``'s dtype and on its device (a fresh
draw per call, so ``torch.manual_seed`` reproduces lightly's draws), broadcast
from rank 0 when ``gather_distributed`` is set, columns normalized; the loss is
the mean over leading dims and slices of the Epps-Pulley statistic (SPEC §1).
"""

import torch
import torch.distributed as dist

from ..core.distributed import is_distributed
from ..core.validation import check_quadrature_args
from ..functional import sigreg
from .quadrature_buffers import QuadratureBuffers


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_gather_distributed(gather_distributed) -> None:
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got {type(gather_distributed).__name__}")
    if gather_distributed and not dist.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available in this torch build")


class SIGReg(QuadratureBuffers):
    """lightly's ``SIGReg(*, knots=17, t_max=3.0, num_vectors=1024, gather_distributed=False)``.

    ``forward(proj: [..., N, D])`` returns the mean over the leading dims and the
    ``num_vectors`` slices of ``N · Σ_j w_j |ψ_N(t_j) − φ(t_j)|²`` (trapezoid on
    ``[0, t_max]`` with ``knots`` points, doubled for the even integrand).

    Directions: ``randn(D, num_vectors)`` drawn per call from the global generator,
    in ``proj``'s dtype, unit columns, as lightly draws them.

    Under an initialized ``torch.distributed`` with ``gather_distributed=True`` the
    directions are rank 0's and the statistic is that of the global batch (one
    all-reduce of the ECF sums); gradients are those of the whole batch in one
    process after DDP's averaging. With ``gather_distributed=False`` each rank
    computes the statistic of its own batch with its own draw, as lightly does.

    Buffers ``t``, ``phi``, ``weights`` (float32) are lightly's, so state dicts load
    both ways. The attribute ``backend`` ("auto") picks the kernel, as in
    :func:`sigreg_kernels.sigreg`.
    """

    def __init__(self, *, knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024,
                 gather_distributed: bool = False):
        super().__init__()
        check_quadrature_args(knots, t_max)
        _check_positive_int("num_vectors", num_vectors)
        _check_gather_distributed(gather_distributed)
        self.knots, self.t_max = knots, float(t_max)
        self.num_vectors = num_vectors
        self.gather_distributed = gather_distributed
        self.backend = "auto"
        self.register_quadrature(knots, t_max, torch.float32)

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        if not isinstance(proj, torch.Tensor) or proj.dim() < 2:
            raise ValueError(f"proj must be a tensor of shape (..., N, D), got {getattr(proj, 'shape', type(proj))}")
        gathered = self.gather_distributed and is_distributed()
        directions = torch.randn(proj.shape[-1], self.num_vectors, device=proj.device, dtype=proj.dtype)
        if gathered:
            dist.broadcast(directions, src=0)
        directions = directions / directions.norm(p=2, dim=0)
        if is_distributed() and not gathered:
            return _local_sigreg(proj, directions, self.knots, self.t_max, self.backend)
        return sigreg(proj, directions, knots=self.knots, t_max=self.t_max, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"knots={self.knots}, t_max={self.t_max}, num_vectors={self.num_vectors}, "
                f"gather_distributed={self.gather_distributed}")


def _local_sigreg(proj, directions, knots, t_max, backend="auto"):
    """The statistic of this rank's batch alone while a process group is up (the fused op, kept local)."""
    return sigreg(proj, directions, knots=knots, t_max=t_max, backend=backend, distributed=False)


def lejepa_invariance_loss(*, all_proj: torch.Tensor, global_proj: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of every view ``all_proj: (V, N, D)`` to the centroid of ``global_proj: (Vg, N, D)``."""
    return (global_proj.mean(dim=0) - all_proj).square().mean()


def _check_views(name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        raise ValueError(f"{name} must have shape (V, N, D), got {getattr(value, 'shape', type(value))}")
    if value.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one view, got shape {tuple(value.shape)}")


class LeJEPALoss(torch.nn.Module):
    """lightly's ``LeJEPALoss``: ``λ · SIGReg(all views) + (1 − λ) · invariance``, SIGReg on the fused op.

    ``forward(*, local_proj: (Vl, N, D), global_proj: (Vg, N, D))``; the views are
    stacked global first, and every view is pulled toward the centroid of the global ones.
    """

    def __init__(self, lambda_param: float = 0.05, gather_distributed: bool = False, sigreg_knots: int = 17,
                 sigreg_t_max: float = 3.0, sigreg_num_vectors: int = 1024):
        super().__init__()
        if isinstance(lambda_param, bool) or not isinstance(lambda_param, (int, float)):
            raise TypeError(f"lambda_param must be a float, got {type(lambda_param).__name__}")
        if not 0.0 <= lambda_param <= 1.0:
            raise ValueError(f"lambda_param must be in the unit interval [0, 1], got {lambda_param}")
        self.lambda_param = lambda_param
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max, num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed)

    def forward(self, *, local_proj: torch.Tensor, global_proj: torch.Tensor) -> torch.Tensor:
        _check_views("local_proj", local_proj)
        _check_views("global_proj", global_proj)
        if local_proj.shape[1:] != global_proj.shape[1:]:
            raise ValueError("local_proj and global_proj must have the same batch size and dimension, got "
                             f"{tuple(local_proj.shape)} and {tuple(global_proj.shape)}")
        all_proj = torch.cat([global_proj, local_proj], dim=0)
        invariance = lejepa_invariance_loss(all_proj=all_proj, global_proj=global_proj)
        return self.lambda_param * self.sigreg(all_proj) + (1.0 - self.lambda_param) * invariance


class LeWMLoss(torch.nn.Module):
    """lightly's ``LeWMLoss``: ``prediction + λ · SIGReg``, one SIGReg test per time step, on the fused op.

    ``forward(*, predicted, target, embeddings: (B, T, D))``: the mean squared error
    of ``predicted`` against the detached ``target`` (both layer-normalized first when
    ``normalize``), plus ``lambda_param`` times SIGReg of ``embeddings`` with the batch
    as the sample dimension (``(T, B, D)``).
    """

    def __init__(self, lambda_param: float = 0.1, normalize: bool = False, gather_distributed: bool = False,
                 sigreg_knots: int = 17, sigreg_t_max: float = 3.0, sigreg_num_vectors: int = 1024):
        super().__init__()
        if isinstance(lambda_param, bool) or not isinstance(lambda_param, (int, float)):
            raise TypeError(f"lambda_param must be a float, got {type(lambda_param).__name__}")
        if lambda_param < 0.0:
            raise ValueError(f"lambda_param must not be negative, got {lambda_param}")
        self.lambda_param = lambda_param
        self.normalize = normalize
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max, num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed)

    def forward(self, *, predicted: torch.Tensor, target: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3:
            raise ValueError(f"embeddings must have shape (B, T, D), got {getattr(embeddings, 'shape', None)}")
        if embeddings.shape[0] != predicted.shape[0] or embeddings.shape[-1] != predicted.shape[-1]:
            raise ValueError("embeddings must share the batch size and dimension of predicted, got "
                             f"{tuple(embeddings.shape)} and {tuple(predicted.shape)}")
        if predicted.shape != target.shape:
            raise ValueError(f"predicted and target must have the same shape, got {tuple(predicted.shape)} "
                             f"and {tuple(target.shape)}")
        target = target.detach()
        if self.normalize:
            predicted = torch.nn.functional.layer_norm(predicted, predicted.shape[-1:])
            target = torch.nn.functional.layer_norm(target, target.shape[-1:])
        prediction = (predicted - target).square().mean()
        # SIGReg tests dimension -2: the batch goes there, one test per time step.
        return prediction + self.lambda_param * self.sigreg(embeddings.transpose(0, 1))
