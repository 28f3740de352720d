"""Fused SIGReg (LeJEPA's Epps-Pulley sliced test) for PyTorch.

    from sigreg_kernels import SIGReg, sigreg
    loss = SIGReg(num_slices=1024)(embeddings)          # embeddings: [*B, N, D]
    loss = sigreg(embeddings, directions)               # directions: [D, K], unit columns
    stats = sigreg(samples, None, reduction="none")     # the univariate test of each column: [*B, D]

The published LeJEPA library's classes, on the same kernels: ``sigreg_kernels.lejepa``.
"""

from .dispatch import BACKENDS, available_backends
from .functional import sigreg, statistic_from_sums
from .nn import SIGReg, sample_directions
from .core.quadrature import quadrature
from .reference import sigreg_reference
from . import lejepa  # after the modules it builds on

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SIGReg",
    "available_backends",
    "lejepa",
    "quadrature",
    "sample_directions",
    "sigreg",
    "sigreg_reference",
    "statistic_from_sums",
]
