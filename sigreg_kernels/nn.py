"""``SIGReg``: the drop-in module, drawing fresh directions at every call."""

import torch
import torch.distributed as dist

from ._validation import REDUCTIONS, check_quadrature_args
from .backends import BACKENDS
from .distributed import is_distributed
from .functional import sigreg


def sample_directions(step: int, dim: int, num_slices: int, device) -> torch.Tensor:
    """Unit-norm columns ``[dim, num_slices]`` drawn from a generator seeded with ``step``.

    The same draw as the published LeJEPA library for a given step and device,
    so swapping the module changes no number.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(step)
    directions = torch.randn(dim, num_slices, device=device, generator=generator)
    return directions / directions.norm(p=2, dim=0)


class SIGReg(torch.nn.Module):
    """Sketched isotropic Gaussian regularizer with the Epps-Pulley test.

    ``forward(x: [*B, N, D])`` draws ``num_slices`` directions for this step and
    returns :func:`sigreg_kernels.sigreg` of ``x`` along them. The step counter
    is a buffer (saved in ``state_dict``) that starts at 0 and advances by one
    per call; under ``torch.distributed`` it is synchronized to the maximum over
    ranks on the first call (ranks then advance in lockstep), so every rank draws
    the same directions.
    """

    def __init__(self, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
            raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
        check_quadrature_args(knots, t_max)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.num_slices, self.knots, self.t_max = num_slices, knots, float(t_max)
        self.reduction, self.backend = reduction, backend
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._step_synchronized = False

    def _synchronize_step(self) -> None:
        if is_distributed() and not self._step_synchronized:
            step = self.step.clone()
            if dist.get_backend() == "nccl":
                step = step.cuda()
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
            self.step.copy_(step)
        self._step_synchronized = True

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._step_synchronized = False  # a resumed rank may hold another step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (*B, N, D), got {getattr(x, 'shape', type(x))}")
        with torch.no_grad():
            self._synchronize_step()
            directions = sample_directions(int(self.step.item()), x.shape[-1], self.num_slices, x.device)
            self.step.add_(1)
        return sigreg(x, directions, knots=self.knots, t_max=self.t_max,
                      reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_slices={self.num_slices}, knots={self.knots}, t_max={self.t_max}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
