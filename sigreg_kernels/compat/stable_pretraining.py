"""stable-pretraining's SIGReg (``methods.lejepa``: ``EppsPulley``, ``SlicedEppsPulley``) on the fused op.

    from sigreg_kernels.compat.stable_pretraining import SlicedEppsPulley
    loss = SlicedEppsPulley(num_slices=1024)(embeddings)     # embeddings: [N, D]

Same names, arguments, defaults, buffers and numbers as stable-pretraining 0.1.8,
written from its documented behaviour: dimension 0 holds the samples; the slicing
test draws ``randn(D, num_slices)`` from a generator on the input's device seeded
with its ``global_step`` buffer (0 at first, +1 per call), rank 0's step under
``torch.distributed``, columns normalized, and returns the mean Epps-Pulley statistic.
"""

import torch
import torch.distributed as dist

from ..core.distributed import is_distributed
from ..functional import sigreg
from ..lejepa.univariate import LeJEPAArgumentError, check_n_points, check_t_max
from ..nn import StepCounter
from .quadrature_buffers import QuadratureBuffers


def _samples_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its sample dimension (0 here) moved to -2, where the op reads it: ``[*R, N, D]``."""
    return x.movedim(0, -2)


class EppsPulley(QuadratureBuffers):
    """stable-pretraining's ``EppsPulley(t_max=3.0, n_points=17)``: the statistic of each column of ``x: [N, S]``.

    Returns ``[S]``: ``N · Σ_j w_j |ψ_N(t_j) − φ(t_j)|²`` over the ``N`` samples of
    dimension 0, trapezoid on ``[0, t_max]`` with ``n_points`` (odd) knots, doubled.
    Computed by the fused op with no product. Other shapes follow the same rule:
    ``[N]`` gives a scalar, ``[N, *R, S]`` gives ``[*R, S]``.

    Under an initialized ``torch.distributed`` (checked at each call) the statistic
    is that of the global batch, and gradients after DDP's averaging are those of
    the whole batch in one process.

    Buffers ``t``, ``phi``, ``weights`` (default dtype) are the published ones, so
    state dicts load both ways. The attribute ``backend`` ("auto") picks the kernel.
    """

    def __init__(self, t_max: float = 3.0, n_points: int = 17):
        super().__init__()
        check_t_max(t_max)
        check_n_points(n_points)
        self.t_max, self.n_points = t_max, n_points
        self.backend = "auto"
        self.register_quadrature(n_points, float(t_max), torch.get_default_dtype())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"x must be a tensor of shape (N, S), got {getattr(x, 'shape', type(x))}")
        columns = x.unsqueeze(-1) if x.dim() == 1 else _samples_last(x)
        stats = sigreg(columns, None, knots=self.n_points, t_max=float(self.t_max), reduction="none",
                       backend=self.backend)
        return stats.squeeze(-1) if x.dim() == 1 else stats

    def extra_repr(self) -> str:
        return f"t_max={self.t_max}, n_points={self.n_points}"


class SlicedEppsPulley(StepCounter):
    """stable-pretraining's ``SlicedEppsPulley(num_slices=1024, t_max=3.0, n_points=17)``.

    ``forward(x: [N, D])``: directions ``randn(D, num_slices)`` from a generator on
    ``x``'s device seeded with the ``global_step`` buffer, unit columns; returns the
    mean over slices of ``ep(x @ A)``. With ``ep`` this module's :class:`EppsPulley`
    (the default) the whole computation is one call of the fused op, the
    projection inside the kernels; another module in ``ep`` gets ``ep(x @ A)``.

    The step: saved in the state dict, mirrored on the host (a call reads nothing
    back from the device). Under ``torch.distributed`` it is set to rank 0's on the
    first call and after ``load_state_dict`` (one broadcast); ranks then advance in
    lockstep, so every rank draws rank 0's directions.
    """

    STEP_BUFFER = "global_step"
    STEP_ALIASES = ("step",)  # a sigreg_kernels.SIGReg state dict

    def __init__(self, num_slices: int = 1024, t_max: float = 3.0, n_points: int = 17):
        super().__init__()
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
            raise LeJEPAArgumentError(f"num_slices must be a positive int, got {num_slices!r}")
        self.num_slices = num_slices
        self.ep = EppsPulley(t_max=t_max, n_points=n_points)

    def _read_step(self, buffer: torch.Tensor) -> int:
        """The buffer's value, first set to rank 0's if not synchronized yet (a broadcast, as published)."""
        if is_distributed() and not self._step_synchronized:
            step = buffer.detach().clone()
            if dist.get_backend() == "nccl":
                step = step.cuda()
            dist.broadcast(step, src=0)
            buffer.copy_(step)
        self._step_synchronized = True
        return int(buffer.item())

    def is_fused(self) -> bool:
        """Whether a call runs the fused op (``ep`` is this package's Epps-Pulley, its forward untouched)."""
        return isinstance(self.ep, EppsPulley) and type(self.ep).forward is EppsPulley.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (N, D), got {getattr(x, 'shape', type(x))}")
        directions = self.next_directions(x, self.num_slices)
        if self.is_fused():
            return sigreg(_samples_last(x), directions, knots=self.ep.n_points, t_max=float(self.ep.t_max),
                          backend=self.ep.backend)
        if x.dtype != directions.dtype and not torch.is_autocast_enabled(x.device.type):
            directions = directions.to(x.dtype)
        return self.ep(x @ directions).mean()

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}"
