"""The ``t``, ``phi``, ``weights`` buffers that other libraries' Epps-Pulley modules carry.

They describe the quadrature (SPEC §1); the kernels compute it from ``knots`` and
``t_max``, so the buffers are kept only for state dicts, and a loaded set that
describes another quadrature is refused rather than silently ignored.
"""

import torch

from ..nn import QUADRATURE_BUFFERS, check_loaded_quadrature


def documented_buffers(knots: int, t_max: float, dtype: torch.dtype) -> dict:
    """The buffers as those libraries document them, computed in ``dtype`` (bit for bit, not rounded from float64).

    ``t = linspace(0, t_max, knots)``, ``phi = exp(-t²/2)``, and ``weights`` the
    trapezoid weights ``[dt, 2dt, ..., 2dt, dt]`` (doubled: the integrand is even)
    times ``phi``.
    """
    t = torch.linspace(0.0, t_max, knots, dtype=dtype)
    dt = t_max / (knots - 1)
    phi = torch.exp(-t.square() / 2)
    trapezoid = torch.full((knots,), 2 * dt, dtype=dtype)
    trapezoid[0] = trapezoid[-1] = dt
    return {"t": t, "phi": phi, "weights": trapezoid * phi}


class QuadratureBuffers(torch.nn.Module):
    """A module with the quadrature buffers; ``load_state_dict`` checks them against its own quadrature."""

    def register_quadrature(self, knots: int, t_max: float, dtype: torch.dtype = torch.float32) -> None:
        self._quadrature = (knots, float(t_max))
        for name, value in documented_buffers(knots, float(t_max), dtype).items():
            self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        loaded = {name: state_dict[prefix + name] for name in QUADRATURE_BUFFERS if prefix + name in state_dict}
        check_loaded_quadrature(loaded, *self._quadrature, type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
