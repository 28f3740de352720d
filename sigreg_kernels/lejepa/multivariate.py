"""``SlicingUnivariateTest``: a univariate test of random 1-D projections, fused when it is Epps-Pulley."""

import torch

from ..core.validation import check_clip_value
from ..functional import sigreg
from ..nn import StepCounter
from .univariate import EppsPulley, LeJEPAArgumentError

SAMPLERS = ("gaussian",)
REDUCTIONS = ("mean", "sum", None)


class SlicingUnivariateTest(StepCounter):
    """``univariate_test`` of ``x: [*, N, D]`` projected on ``num_slices`` random unit directions.

    Per call: the directions ``A = randn(D, num_slices)`` from a generator on
    ``x``'s device seeded with the ``global_step`` buffer (0 at first, +1 per
    call), columns normalized; the statistics ``stats = univariate_test(x @ A)``
    (``[*, num_slices]``); ``stats[stats < clip_value] = 0`` (those slices pass no
    gradient); then ``reduction``: ``"mean"``, ``"sum"`` or ``None`` (``"none"``
    too) for the statistics themselves.

    When ``univariate_test`` is this package's :class:`EppsPulley` the whole
    computation is one call of the fused op, the projection inside the kernel;
    any other module gets ``univariate_test(x @ A)``, computed as written.

    The step: ``global_step`` is saved in the state dict and mirrored on the host,
    so a call reads nothing back from the device. Under ``torch.distributed`` it
    is set to the maximum over ranks on the first call and after
    ``load_state_dict`` (one all-reduce), then ranks advance in lockstep — the
    same steps as a maximum taken at every call, as long as every rank calls the
    module the same number of times. It loads a ``SIGReg`` state dict (``step``)
    and ``SIGReg`` loads its.
    """

    STEP_BUFFER = "global_step"
    STEP_ALIASES = ("step",)

    def __init__(self, univariate_test: torch.nn.Module, num_slices: int, reduction: str | None = "mean",
                 sampler: str = "gaussian", clip_value: float | None = None):
        super().__init__()
        if not callable(univariate_test):
            raise LeJEPAArgumentError(
                f"univariate_test must be a module mapping (*, N, K) to (*, K), got {type(univariate_test).__name__}")
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
            raise LeJEPAArgumentError(f"num_slices must be a positive int, got {num_slices!r}")
        if reduction == "none":
            reduction = None
        if reduction not in REDUCTIONS:
            raise LeJEPAArgumentError(f"reduction must be 'mean', 'sum' or None, got {reduction!r}")
        if sampler not in SAMPLERS:
            raise LeJEPAArgumentError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        try:
            check_clip_value(clip_value)
        except (TypeError, ValueError) as error:
            raise LeJEPAArgumentError(str(error)) from None
        self.univariate_test = univariate_test
        self.num_slices, self.reduction, self.sampler, self.clip_value = num_slices, reduction, sampler, clip_value

    def is_fused(self) -> bool:
        """Whether a call runs the fused op (the univariate test is this package's Epps-Pulley)."""
        test = self.univariate_test
        return isinstance(test, EppsPulley) and type(test).forward is EppsPulley.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (*, N, D), got {getattr(x, 'shape', type(x))}")
        directions = self.next_directions(x, self.num_slices)
        if self.is_fused():
            test = self.univariate_test
            return sigreg(x, directions, knots=test.n_points, t_max=float(test.t_max),
                          reduction=self.reduction or "none", clip_value=self.clip_value, backend=test.backend)
        if x.dtype != directions.dtype and not torch.is_autocast_enabled(x.device.type):
            directions = directions.to(x.dtype)  # half x: the product in x's dtype, as for float64 x
        stats = self.univariate_test(x @ directions)
        if self.clip_value is not None:
            stats = torch.where(stats < self.clip_value, torch.zeros_like(stats), stats)
        if self.reduction == "mean":
            return stats.mean()
        if self.reduction == "sum":
            return stats.sum()
        return stats

    def extra_repr(self) -> str:
        return (f"num_slices={self.num_slices}, reduction={self.reduction!r}, sampler={self.sampler!r}, "
                f"clip_value={self.clip_value}")
