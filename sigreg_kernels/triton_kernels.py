"""Triton kernels of SIGReg's ECF sums and their gradient (launched from ``triton_op.py``).

Math (SPEC §1), per batch index b, slice k, knot t_j = j * delta:
    forward   sums[b, 0, k, j] = sum_n cos(t_j p_nk),  sums[b, 1, k, j] = sum_n sin(t_j p_nk)
    backward  G_nk = sum_j t_j (gS_kj cos(t_j p_nk) - gC_kj sin(t_j p_nk)),
              dx_b = G_b A^T,   dA = sum_b x_b^T G_b
with p = x_b @ A. Neither the N x K projection nor G ever reaches global memory:
every kernel recomputes its [BLOCK_N, BLOCK_K] tile of p with tl.dot and uses it
in registers, as flash attention does with its scores.

ECF at every knot: one sin/cos pair per element, cos/sin(delta p), then a rotation
per knot (angle addition). The recurrence's angle error after j steps is about
j * |delta p| * eps, the same as rounding t_j * p directly, and the modulus drifts
by at most j * eps (j <= 16 by default), so it is as accurate as direct evaluation.

Offsets into x and dx are int64 on every axis. Each stride fits in int32 (Triton
passes a larger one as int64), but their products need not: a D-major x (stride_xd
= N, as from x.mT.contiguous().mT) puts d * stride_xd past 2^31 once N * D does,
and an int32 product wraps silently on the GPU. Offsets to a batch index are int64
too; within one, offsets into the directions [D, K], the gradient of the sums and
the partials stay int32: each such block is far below 2^31 elements.

Grid axis 2 carries the batch index (CUDA caps it at 65535 programs): a larger batch
is launched in several grids, each told its first index (batch_start / index_start).

Determinism: no float atomics. Each program owns its outputs; sums over N are
per-tile tree sums, accumulated in order over a fixed slab of rows (a "split"),
and the launcher sums the per-split partials in a fixed order.
"""

import triton
import triton.language as tl


@triton.jit
def _sincos(x):
    """(sin x, cos x) in fp32: csrc/sigreg_math.h's sincos_poly.

    Cody-Waite reduction by pi/2 in three parts (the first ones have few mantissa
    bits, so q * part is exact), then minimax polynomials on [-pi/4, pi/4] (Cephes
    sinf/cosf coefficients). Error (measured): < 1.5 * 2^-24 for |x| <= 8192; beyond,
    it grows but stays under half an ulp of x itself, the error x already carries
    (checked to 1e7). Branch-free, with no slow path to hold registers (libdevice's
    sinf/cosf have one), and the interpreter runs these very operations, so the CPU
    tests check the formula the GPU runs.
    """
    q = tl.floor(x * 0.636619772367581343 + 0.5)  # nearest multiple of pi/2
    r = x - q * 1.5703125
    r = r - q * 4.837512969970703125e-4
    r = r - q * 7.54978995489188216e-8
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3
                                                                     + r2 * 2.443315711809948e-5))
    quadrant = q.to(tl.int32) & 3
    # quadrant 0: ( sin,  cos)   1: ( cos, -sin)   2: (-sin, -cos)   3: (-cos,  sin)
    odd = (quadrant & 1) != 0
    s = tl.where(odd, cos_r, sin_r)
    c = tl.where(odd, sin_r, cos_r)
    return tl.where((quadrant & 2) != 0, -s, s), tl.where(((quadrant + 1) & 2) != 0, -c, c)


@triton.jit
def _column_sums(tile):
    # tl.sum's own reduction, spelled out: tl.sum (like tl.zeros) is a @triton.jit
    # function, made compiled or interpreted when triton is first imported, so the
    # interpreter would reject it whenever triton was imported before
    # TRITON_INTERPRET=1 was set (by torch.compile, say). The interpreter sums with
    # numpy when it sees this combine function, element by element for any other.
    return tl.reduce(tile, 0, tl.standard._sum_combine)


@triton.jit
def _rotate(c, s, c1, s1):
    """(c, s) rotated by the angle whose cosine and sine are (c1, s1)."""
    return c * c1 - s * s1, s * c1 + c * s1


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        # Interpreter only: its tl.dot mishandles bf16. Products of fp16/bf16 values
        # are exact in fp32, so upcasting computes what the tensor cores do.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _projection_tile(x_rows_ptr, a_ptr, rn, n_valid, rk, k_valid, D,
                     stride_xn, stride_xd, stride_ad, stride_ak,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """p[rn, rk] = x[rn, :] @ A[:, rk] in fp32; rows/columns out of range are 0."""
    acc = tl.full([BLOCK_N, BLOCK_K], 0.0, tl.float32)
    row_offsets = rn.to(tl.int64)[:, None] * stride_xn
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_valid = rd < D
        x_tile = tl.load(x_rows_ptr + row_offsets + rd.to(tl.int64)[None, :] * stride_xd,
                         mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        a_tile = tl.load(a_ptr + rd[:, None] * stride_ad + rk[None, :] * stride_ak,
                         mask=d_valid[:, None] & k_valid[None, :], other=0.0)
        acc = _dot(x_tile, a_tile, acc, PRECISION, DOT_UPCAST)
    return acc


@triton.jit
def _slice_gradient_tile(p, g_ptr, rk, k_valid, stride_gc, stride_gk, stride_gt, delta,
                         KNOTS: tl.constexpr):
    """G = dL/dp on a tile of p, from the gradient of the sums g_ptr[c, k, j] (fp32)."""
    s1, c1 = _sincos(p * delta)
    c = c1
    s = s1
    grad = tl.full(p.shape, 0.0, tl.float32)
    # Knot 0 (t = 0) has no gradient. A loop, not unrolled: see the forward kernel.
    for j in range(1, KNOTS):
        t_j = delta * j
        # d sum_cos / dp = -t sin(t p),  d sum_sin / dp = t cos(t p)
        g_cos = tl.load(g_ptr + rk * stride_gk + j * stride_gt, mask=k_valid, other=0.0)
        g_sin = tl.load(g_ptr + stride_gc + rk * stride_gk + j * stride_gt, mask=k_valid, other=0.0)
        grad += c * (t_j * g_sin)[None, :] - s * (t_j * g_cos)[None, :]
        c, s = _rotate(c, s, c1, s1)
    return grad


@triton.jit
def _sigreg_fwd_kernel(
    x_ptr, a_ptr, partial_ptr,
    N, D, K, rows_per_split, batch_start,
    stride_xb, stride_xn, stride_xd,
    stride_ad, stride_ak,
    stride_pb, stride_ps, stride_pc, stride_pk, stride_pt,
    delta,
    KNOTS: tl.constexpr, KNOTS_PAD: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[b, split, 0|1, k, j] = sum of cos|sin(t_j p_nk) over the rows of one split.

    Grid: (K blocks, splits, batch indices from batch_start). A program owns slices rk
    for rows [split * rows_per_split, +rows_per_split) of batch b.
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64) + batch_start
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = rk < K
    knot = tl.arange(0, KNOTS_PAD)[:, None]
    x_rows_ptr = x_ptr + b * stride_xb
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)

    # Two-level sum: each tile's rows are tree-summed (tl.reduce), the tile sums are
    # then accumulated here; summing tiny per-element terms into one running fp32
    # total would lose the digits that (C - phi) needs when C ~ phi.
    acc_cos = tl.full([KNOTS_PAD, BLOCK_K], 0.0, tl.float32)
    acc_sin = tl.full([KNOTS_PAD, BLOCK_K], 0.0, tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_valid = rn < row_end
        p = _projection_tile(x_rows_ptr, a_ptr, rn, n_valid, rk, k_valid, D,
                             stride_xn, stride_xd, stride_ad, stride_ak,
                             BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, DOT_UPCAST)
        s1, c1 = _sincos(p * delta)
        # Rows past the end start at 0 and stay 0 under rotation: they add nothing.
        c1 = tl.where(n_valid[:, None], c1, 0.0)
        s1 = tl.where(n_valid[:, None], s1, 0.0)
        c = c1
        s = s1
        # A loop, not tl.static_range: unrolled, the compiler hoists the rotations of
        # all knots above their reductions and spills (ptxas: ~5 KB at 17 knots).
        for j in range(1, KNOTS):
            acc_cos += tl.where(knot == j, _column_sums(c)[None, :], 0.0)
            acc_sin += tl.where(knot == j, _column_sums(s)[None, :], 0.0)
            c, s = _rotate(c, s, c1, s1)
    # Knot 0: cos(0) = 1 for each row of the split, sin(0) = 0.
    acc_cos = tl.where(knot == 0, (row_end - row_start).to(tl.float32), acc_cos)

    out = (partial_ptr + b * stride_pb + split.to(tl.int64) * stride_ps
           + rk[None, :] * stride_pk + knot * stride_pt)
    mask = (knot < KNOTS) & k_valid[None, :]
    tl.store(out, acc_cos, mask=mask)
    tl.store(out + stride_pc, acc_sin, mask=mask)


@triton.jit
def _sigreg_bwd_dx_kernel(
    x_ptr, a_ptr, g_ptr, dx_ptr,
    N, D, K, batch_start,
    stride_xb, stride_xn, stride_xd,
    stride_ad, stride_ak,
    stride_gb, stride_gc, stride_gk, stride_gt,
    stride_dxb, stride_dxn, stride_dxd,
    delta,
    KNOTS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_DX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[b, rn, rdx] = sum_k G[rn, k] A[rdx, k], written once.

    Grid: (N blocks, D chunks of BLOCK_DX, batch indices from batch_start). The dx
    accumulator spans a whole D chunk; with D <= BLOCK_DX there is one chunk and G is
    computed once per element.
    """
    pid_n = tl.program_id(0)
    pid_dx = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64) + batch_start
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = rn < N
    rdx = pid_dx * BLOCK_DX + tl.arange(0, BLOCK_DX)
    dx_valid = rdx < D
    x_rows_ptr = x_ptr + b * stride_xb
    g_b_ptr = g_ptr + b * stride_gb

    acc = tl.full([BLOCK_N, BLOCK_DX], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_valid = rk < K
        p = _projection_tile(x_rows_ptr, a_ptr, rn, n_valid, rk, k_valid, D,
                             stride_xn, stride_xd, stride_ad, stride_ak,
                             BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, DOT_UPCAST)
        grad = _slice_gradient_tile(p, g_b_ptr, rk, k_valid, stride_gc, stride_gk, stride_gt,
                                    delta, KNOTS)
        # A tile [BLOCK_DX, BLOCK_K], loaded along its contiguous K axis, then transposed.
        # G goes to the input dtype: tensor cores for fp16/bf16.
        a_tile = tl.load(a_ptr + rdx[:, None] * stride_ad + rk[None, :] * stride_ak,
                         mask=dx_valid[:, None] & k_valid[None, :], other=0.0)
        acc = _dot(grad.to(a_tile.dtype), tl.trans(a_tile), acc, PRECISION, DOT_UPCAST)

    out = (dx_ptr + b * stride_dxb + rn.to(tl.int64)[:, None] * stride_dxn
           + rdx.to(tl.int64)[None, :] * stride_dxd)
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=n_valid[:, None] & dx_valid[None, :])


@triton.jit
def _sigreg_bwd_da_kernel(
    x_ptr, a_ptr, g_ptr, partial_ptr,
    N, D, K, rows_per_split, splits, index_start,
    stride_xb, stride_xn, stride_xd,
    stride_ad, stride_ak,
    stride_gb, stride_gc, stride_gk, stride_gt,
    stride_ps, stride_pd, stride_pk,
    delta,
    KNOTS: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """partial[b * splits + split, rda, rk] = x[b, rows, rda]^T @ G[rows, rk] over one split's rows.

    Grid: (K blocks, D chunks of BLOCK_DA, B * splits indices from index_start); the
    launcher sums the partials over their first axis in a fixed order.
    """
    pid_k = tl.program_id(0)
    pid_da = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64) + index_start
    b = pid_s // splits
    split = (pid_s % splits).to(tl.int32)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_valid = rk < K
    rda = pid_da * BLOCK_DA + tl.arange(0, BLOCK_DA)
    da_valid = rda < D
    x_rows_ptr = x_ptr + b * stride_xb
    g_b_ptr = g_ptr + b * stride_gb
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)

    acc = tl.full([BLOCK_DA, BLOCK_K], 0.0, tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_valid = rn < row_end
        p = _projection_tile(x_rows_ptr, a_ptr, rn, n_valid, rk, k_valid, D,
                             stride_xn, stride_xd, stride_ad, stride_ak,
                             BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, DOT_UPCAST)
        grad = _slice_gradient_tile(p, g_b_ptr, rk, k_valid, stride_gc, stride_gk, stride_gt,
                                    delta, KNOTS)
        # x tile [BLOCK_N, BLOCK_DA], loaded along its contiguous D axis, then transposed;
        # rows past the end load as 0 and add nothing.
        x_tile = tl.load(x_rows_ptr + rn.to(tl.int64)[:, None] * stride_xn + rda.to(tl.int64)[None, :] * stride_xd,
                         mask=n_valid[:, None] & da_valid[None, :], other=0.0)
        acc = _dot(tl.trans(x_tile), grad.to(x_tile.dtype), acc, PRECISION, DOT_UPCAST)

    out = partial_ptr + pid_s * stride_ps + rda[:, None] * stride_pd + rk[None, :] * stride_pk
    tl.store(out, acc, mask=da_valid[:, None] & k_valid[None, :])
