"""The published LeJEPA library's API on the fused op: ``univariate.EppsPulley`` and
``multivariate.SlicingUnivariateTest``, same names, signatures, numbers and state dicts.

    from sigreg_kernels import lejepa
    loss_fn = lejepa.multivariate.SlicingUnivariateTest(
        univariate_test=lejepa.univariate.EppsPulley(n_points=17), num_slices=1024)
    loss = loss_fn(embeddings)                 # embeddings: [*, N, D]

Written from the published documentation and the math (SPEC §1-2), not from its
code (which is licensed CC BY-NC).
"""

from . import multivariate, univariate
from .multivariate import SlicingUnivariateTest
from .univariate import EppsPulley, LeJEPAArgumentError

__all__ = ["EppsPulley", "LeJEPAArgumentError", "SlicingUnivariateTest", "multivariate", "univariate"]
