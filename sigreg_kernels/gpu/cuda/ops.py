"""The ``cuda`` backend's kernels, as ``gpu/fused.py`` calls them: the four functions of
``gpu/contract.py`` (same arguments, same results), each one launch of the CUDA
kernels in ``csrc/cuda`` through the registered ops ``torch.ops.sigreg.*``.

Inputs: ``x [B, N, D]`` float32/bfloat16/float16 on a CUDA device (sm_80+),
``directions [D, K]`` of x's dtype or None. Contiguous inputs are used in place;
others are copied once.
"""

import torch

from ... import extension  # noqa: F401  (loads the extension and registers the fake kernels)


def ecf_partials(x, directions, knots: int, t_max: float, arrivals=None, weights=None):
    """``partials [B, S, 2, K, T]`` float32; ``S`` row splits from ``plan.plan_ecf_partials``.
    ``arrivals`` (int32, one element, on x's device, or None): set to 0 by the kernel (one store),
    ready for ``statistic``. ``weights``: None or float32 ``[B, N]`` contiguous sample weights
    (the weighted sums; a row of weight 0 is left out, whatever it holds)."""
    return torch.ops.sigreg.ecf_partials(x, directions, knots, t_max, arrivals, weights)


def statistic(partials, samples: int, knots: int, t_max: float, reduction: str, clip_value, grad_factor: float,
              arrivals=None, moments=None, unbiased: bool = False):
    """``(stat [B, K], coef [B, 2, K, T], loss [])`` float32, one launch: ``loss`` is the mean
    (``"mean"``) or the sum (``"sum"``, ``"none"``) of ``stat``, summed in double in a fixed order.
    ``arrivals``: the counter ``ecf_partials`` zeroed, left at 0 again; None: the op zeroes one of
    its own (one device op more). ``moments``: None, or float32 ``[B, 2]`` (sum w, sum w^2) of the
    sample weights, which then stand in for ``samples``. ``unbiased``: the U-statistic."""
    return torch.ops.sigreg.statistic(partials, samples, knots, t_max, reduction, clip_value, grad_factor, arrivals,
                                      moments, unbiased)


def slice_gradient(coef, scale, x, directions, knots: int, t_max: float, weights=None):
    """``G [B, N, K]`` in x's dtype; ``scale [B, K]`` float32 with any strides; ``weights`` as in
    ``ecf_partials`` (G times each row's weight)."""
    return torch.ops.sigreg.slice_gradient(coef, scale, x, directions, knots, t_max, weights)


def slice_gradient_(projection, coef, scale, knots: int, t_max: float, weights=None):
    """Overwrites the contiguous ``projection [B, N, K]`` with ``G``."""
    torch.ops.sigreg.slice_gradient_(projection, coef, scale, knots, t_max, weights)
