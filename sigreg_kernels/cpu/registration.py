"""Fake (shape) kernels and autograd shared by every ``ecf_sums``-style op.

Contract of every ``ecf_sums``-style op (the C++ one and the Triton one):
    ecf_sums(x: [B, N, D], directions: [D, K] or None, knots, t_max, weights=None) -> (sums, projection)
        directions=None: the columns of x are the projections (P = x, K = D), no
              product; where the op supports it (the C++ CPU op).
        sums: [B, 2, K, knots] in the accumulation dtype (float64 for float64
              inputs, else float32): sums[:, 0] = sum_n (cos(t_j p_nk) - 1),
              sums[:, 1] = sum_n sin(t_j p_nk), t_j = j * t_max / (knots - 1).
              (cos - 1, not cos: at small angles C - phi is a small difference
              of two numbers near 1, and only cos - 1 keeps its digits.)
        projection: [B, N, K] (accumulation dtype) where the backend keeps the
              projection for its backward (CPU, with directions), else an empty
              [0] tensor (the GPU kernels recompute it; without directions it is x).
        weights: None, or [B, N] sample weights (bool or float, non-negative): the sums
              weight each row's terms, and a row of weight 0 adds exactly nothing
              whatever x holds (gpu/contract.py, "Sample weights"). No gradient.
    ecf_sums_backward(grad_sums, x, directions, projection, knots, t_max,
                      need_grad_directions, weights=None) -> (grad_x [B, N, D] in x.dtype,
                      grad_directions [D, K] in directions.dtype, or empty [0]
                      when not needed or directions is None)
"""

import torch

from ..core.numerics import accumulation_dtype


def fake_ecf_sums(x, directions, knots, t_max, keeps_projection, weights=None):
    batch, samples, dim = x.shape
    slices = dim if directions is None else directions.shape[1]
    keeps_projection = keeps_projection and directions is not None  # without directions P = x
    acc = accumulation_dtype(x.dtype)
    sums = x.new_empty((batch, 2, slices, knots), dtype=acc)
    projection = x.new_empty((batch, samples, slices) if keeps_projection else (0,), dtype=acc)
    return sums, projection


def fake_ecf_sums_backward(grad_sums, x, directions, projection, knots, t_max, need_grad_directions, weights=None):
    if directions is None:
        return torch.empty_like(x), x.new_empty((0,))
    grad_directions = torch.empty_like(directions) if need_grad_directions else directions.new_empty((0,))
    return torch.empty_like(x), grad_directions


def register_ecf_autograd(forward_op, backward_op):
    """Make ``forward_op`` differentiable in ``x`` and ``directions`` (which may be None) through ``backward_op``."""

    def setup_context(ctx, inputs, output):
        x, directions, knots, t_max, weights = inputs
        _, projection = output
        ctx.save_for_backward(x, directions, projection, weights)
        ctx.knots, ctx.t_max = knots, t_max

    def backward(ctx, grad_sums, _grad_projection):
        # The projection is internal state for the backward, never differentiated.
        x, directions, projection, weights = ctx.saved_tensors
        need_grad_directions = directions is not None and ctx.needs_input_grad[1]
        grad_x, grad_directions = backward_op(
            grad_sums.contiguous(), x, directions, projection, ctx.knots, ctx.t_max, need_grad_directions, weights
        )
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_directions if need_grad_directions else None,
            None,
            None,
            None,  # the weights get no gradient
        )

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

