"""Fused SIGReg (LeJEPA's Epps-Pulley sliced test) for PyTorch.

    from sigreg_kernels import SIGReg, sigreg
    loss = SIGReg(num_slices=1024)(embeddings)          # embeddings: [*B, N, D]
    loss = sigreg(embeddings, directions)               # directions: [D, K], unit columns
"""

from .backends import BACKENDS, available_backends
from .functional import sigreg, statistic_from_sums
from .nn import SIGReg, sample_directions
from .quadrature import quadrature
from .reference import sigreg_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SIGReg",
    "available_backends",
    "quadrature",
    "sample_directions",
    "sigreg",
    "sigreg_reference",
    "statistic_from_sums",
]
