"""``EppsPulley``: the univariate Epps-Pulley test of already-projected samples, on the fused op."""

import math

import torch

from ..functional import sigreg
from ..nn import QUADRATURE_BUFFERS, check_loaded_quadrature, published_quadrature

INTEGRATIONS = ("trapezoid",)


class LeJEPAArgumentError(ValueError, AssertionError):
    """A bad argument to a LeJEPA-compatible class.

    Both a ``ValueError`` (what this library raises elsewhere) and an
    ``AssertionError`` (what an ``assert`` on the argument raises), so code
    written against either kind of check catches it.
    """


def check_t_max(t_max) -> None:
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)):
        raise LeJEPAArgumentError(f"t_max must be a number, got {type(t_max).__name__}")
    if not math.isfinite(t_max) or t_max <= 0:
        raise LeJEPAArgumentError(f"t_max must be finite and > 0, got {t_max}")


def check_n_points(n_points) -> None:
    if isinstance(n_points, bool) or not isinstance(n_points, int):
        raise LeJEPAArgumentError(f"n_points must be an int, got {type(n_points).__name__}")
    if n_points < 3 or n_points % 2 == 0:
        raise LeJEPAArgumentError(f"n_points must be odd and >= 3 (knots 0, dt, ..., t_max), got {n_points}")


class EppsPulley(torch.nn.Module):
    """Epps-Pulley statistic of each column of ``x: [*, N, K]`` against N(0, 1): ``[*, K]``.

    ``N · ∫ |ψ_N(t) − φ(t)|² φ(t) dt`` with ``ψ_N`` the empirical characteristic
    function of the column's ``N`` samples and ``φ(t) = exp(-t²/2)``, integrated on
    ``[-t_max, t_max]`` by the trapezoid rule on ``n_points`` knots of ``[0, t_max]``
    (the integrand is even; SPEC §1). Computed by the fused op with
    ``directions=None``: no projection product, nothing of size ``N·K·n_points``
    in memory. Under ``torch.distributed`` the statistic is that of the global batch.

    The attribute ``backend`` ("auto" by default) picks the kernel, as in
    :func:`sigreg_kernels.sigreg`. The buffers ``t``, ``phi``, ``weights`` (float32)
    are those of the published class, so state dicts load both ways; they
    describe the quadrature, which the kernels compute from ``t_max`` and ``n_points``.
    """

    def __init__(self, t_max: float = 3, n_points: int = 17, integration: str = "trapezoid"):
        super().__init__()
        check_t_max(t_max)
        check_n_points(n_points)
        if integration not in INTEGRATIONS:
            raise LeJEPAArgumentError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
        self.t_max, self.n_points, self.integration = t_max, n_points, integration
        self.backend = "auto"
        for name, value in published_quadrature(n_points, float(t_max)).items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sigreg(x, None, knots=self.n_points, t_max=float(self.t_max), reduction="none", backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        loaded = {name: state_dict[prefix + name] for name in QUADRATURE_BUFFERS if prefix + name in state_dict}
        check_loaded_quadrature(loaded, self.n_points, float(self.t_max), type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The quadrature follows from t_max and n_points: a state dict without it (SIGReg's) is complete.
        for name in QUADRATURE_BUFFERS:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def extra_repr(self) -> str:
        return f"t_max={self.t_max}, n_points={self.n_points}, integration={self.integration!r}"
