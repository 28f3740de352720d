"""Drop-ins for the SIGReg classes of other libraries, on the fused op.

    from sigreg_kernels.compat.lightly import SIGReg, LeJEPALoss, LeWMLoss
    from sigreg_kernels.compat.stable_pretraining import EppsPulley, SlicedEppsPulley

Each keeps the class names, arguments, defaults, buffers (so state dicts load both
ways) and numbers of the library it replaces; where that library has a known bug
under ``torch.distributed``, ours computes the statistic of the global batch with
the single-process gradient (docs/usage.md lists these differences). Written from
their documented behaviour; neither library is imported or needed.
"""

from . import lightly, stable_pretraining

__all__ = ["lightly", "stable_pretraining"]
