"""Triton kernels of the three GPU primitives (contract: ``gpu/contract.py``; launched from ``gpu/triton/ops.py``).

Why this design (H200: 132 SMs; headline bf16 B=1, N=4096, D=512, K=1024, T=17; the
numbers are bench/cost_model.py's, from these kernels compiled for sm_90):
- Three kernels instead of two fused ones. The old backward fused dx = G A^T and
  dA = x^T G into kernels with one 64-row tile per block (128 blocks, under one wave)
  looping over every slice. Now the backward writes G [B, N, K] once (bf16: 8 MB) and
  leaves both products to cuBLAS; the kernels do only what no library does: projection
  tile by tensor-core dot -> one sin/cos pair per element -> every knot.
- Tiles are [BLOCK_K slices, BLOCK_N samples], the slices on the MMA's M axis (wgmma,
  warps [8, 1]): each thread holds 2 slices and BLOCK_N / 4 samples, so sums over
  samples stay mostly in the thread and per-slice constants cost 2 x knots registers.
- Forward, per element and knot: one rotation (4 FMA-class ops) and one add each to a
  cos and a sin sum; no shuffle, no shared memory, no barrier, no select. Each thread
  accumulates its samples per knot across all row tiles of its split in a [BLOCK_K,
  lanes, knots] register tensor (64 registers at T=17); the 4 lanes sharing a slice are
  summed once per split. (The old kernel: a cross-warp tl.sum per knot and tile, two
  barriers, plus a where() over a [32, BLOCK_K] tensor: ~7 extra ops per element-knot.)
- The knot loop is unrolled as a binary tree of tl.split / tl.join over a power-of-two
  knot axis held in the thread: each knot updates its own registers. Knots past 16
  (T > 17) go to chunks of 16 on the grid (forward) or a loop (backward).
- Backward: G = Re(sum_j gamma_j z^j), z = e^{i delta p}, by Horner: 4 FMA per element
  and knot (rotation + accumulation would be 6); gamma_j = t_j scale coef in registers,
  loaded once per program.
- Directions A^T [BLOCK_K, D] stay resident in shared memory for the whole program when
  they fit (bf16: D <= 512); each program then streams only x^T tiles [D, BLOCK_N],
  pipelined (cp.async, 3 stages) under the element work of the previous tile. L2
  traffic: x once per slice block (2 D / BLOCK_K bytes per element), A once per program
  instead of once per row tile (2 D / BLOCK_N). Larger D: A streamed in 64-feature chunks.
- Grids (gpu/triton/plan.py): ecf_partials (K blocks x knot chunks, row splits S, B),
  slice_gradient (K blocks, row groups, B), S and the groups chosen for 2-4 nearly
  whole waves of the blocks per SM the compiled resources allow. Headline: forward
  128 x 16 tiles, 126 registers, 176 KB shared (1 block of 8 warps per SM), 8 x 64 =
  512 blocks = 3.9 waves; backward 128 x 32, 128 registers, 196 KB, 512 blocks, 3.9
  waves. Model: 31 us each (element work + in-kernel MMA, 20 us floor each), fwd+bwd
  79 us against a 45 us floor (1.75x).
- ``projected`` kernels read a given P (directions=None; the fp32 "highest" route after
  an SGEMM) in [BLOCK_N, BLOCK_K] tiles built on one flat axis (_rows_tile): lanes and
  warps along K, each thread owns one slice, every sum over samples is in the thread.
- Sample weights (HAS_WEIGHTS, a constexpr: the unweighted kernels compile exactly as
  without it): one load of w per row of a tile, p set to 0 where w is 0 (whatever x
  holds), and one multiply per element, none per knot: the forward carries w (cos - 1,
  sin) through the same rotation with w-scaled additive constants (_rotate_cosm1), the
  backward multiplies G by w. The forward then holds ~40 registers more
  (plan.py: WEIGHTED_RESOURCES). The statistic (HAS_MOMENTS) divides by sum w and
  scales by the effective sample size (sum w)^2 / sum w^2 instead of N.

Math per batch index b, slice k, knot t_j = j * delta:
    partials[b, s, 0|1, k, j] = sum_{n in split s} cos(t_j p_nk) - 1 | sin(t_j p_nk),  p = x_b @ A
    G[b, n, k] = scale[b, k] * sum_{j>=1} t_j (coef[b, 1, k, j] cos(t_j p) - coef[b, 0, k, j] sin(t_j p))
Knot 0 is sum (cos(0 * p) - 1) = sum(0 * p): 0, NaN where p is. With weights w[b, n]
each term of the sums (knot 0's included) and G[b, n, :] are times w[b, n], at p = 0 where
w[b, n] = 0.

Offsets into x, P and G are int64 (a D-major x puts d * stride past 2^31 once N * D
does); batch indices are int64; offsets inside [D, K] directions, partials and
coefficient blocks stay int32. Grid axis 2 carries the batch (65535 cap: the launcher
splits larger batches into several launches, each told its first index).
Determinism: no float atomics; every sum has a fixed order set by the plan's tiles.
The one atomic is the statistic kernel's integer arrival ticket: it picks which
program sums the others' partial losses, not the order of that sum.
The layouts the fast paths rely on (which bits of a tile live in a thread) only decide
speed: every reshape/split/reduce here is correct for any layout the compiler picks,
and the interpreter runs the same operations on numpy.
"""

import triton
import triton.language as tl

# Tile kinds: how a program's tile is laid out, which decides how sums over samples go.
MMA_TILE: tl.constexpr = tl.constexpr(0)   # [BLOCK_K, BLOCK_N] tl.dot accumulator (slices x samples)
ROWS_TILE: tl.constexpr = tl.constexpr(1)  # [BLOCK_N, BLOCK_K] loaded projection (samples x slices)


@triton.jit
def _sincos_cosm1(x):
    """(sin x, cos x, cos x - 1) in fp32: csrc/sigreg_math.h's sincos_cosm1_poly.

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
    cosm1_r = -0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3
                                                                 + r2 * 2.443315711809948e-5))
    cos_r = 1.0 + cosm1_r
    quadrant = q.to(tl.int32) & 3
    # quadrant 0: ( sin,  cos)   1: ( cos, -sin)   2: (-sin, -cos)   3: (-cos,  sin)
    odd = (quadrant & 1) != 0
    s = tl.where(odd, cos_r, sin_r)
    c = tl.where(odd, sin_r, cos_r)
    c = tl.where(((quadrant + 1) & 2) != 0, -c, c)
    # cos - 1 to full relative precision: the polynomial without its 1 in quadrant 0;
    # elsewhere |cos - 1| >= 1 - cos(pi/4) and the subtraction loses nothing.
    return tl.where((quadrant & 2) != 0, -s, s), c, tl.where(quadrant == 0, cosm1_r, c - 1.0)


@triton.jit
def _sincos(x):
    """(sin x, cos x) in fp32 (the compiler drops the unused cos - 1)."""
    s, c, _ = _sincos_cosm1(x)
    return s, c


@triton.jit
def _sum(t, axis: tl.constexpr):
    # tl.sum's own reduction, spelled out: tl.sum (like tl.zeros: tl.full here) is a
    # @triton.jit function made compiled or interpreted when triton is first imported,
    # so the interpreter would reject it whenever triton was imported before
    # TRITON_INTERPRET=1 was set. (The interpreter sums with numpy when it sees this
    # combine function. The knot trees write tl.reduce out: the interpreter pays per
    # jit-function call.)
    return tl.reduce(t, axis, tl.standard._sum_combine)


@triton.jit
def _cs_sums(c, s, TILE: tl.constexpr, WARPS_N: tl.constexpr):
    """The sums of a tile's c and s over the samples each thread holds: [BK, WARPS_N, 4] each
    for an MMA tile (its lane quads and warp columns still to be summed), [BK, 1, 1] for
    a rows tile (each thread owns whole columns)."""
    cs = tl.join(c, s)
    if TILE == MMA_TILE:
        # Column n = w * (BN / WARPS_N) + 8 i + 2 l + r (warp column w, register group i,
        # lane quad l, register r): the sums over i and r stay in the thread.
        BK: tl.constexpr = c.shape[0]
        BN: tl.constexpr = c.shape[1]
        cs = tl.reshape(cs, (BK, WARPS_N, BN // (8 * WARPS_N), 4, 2, 2))
        cs = tl.reduce(tl.reduce(cs, 4, tl.standard._sum_combine), 2, tl.standard._sum_combine)
        return tl.split(cs)
    else:
        sum_c, sum_s = tl.split(tl.reduce(cs, 0, tl.standard._sum_combine))
        return sum_c[:, None, None], sum_s[:, None, None]


# Forward knot trees. A chunk's accumulators are [BK, L1, L2, 2, ..., 2], one axis per
# bit of the knot index, lowest bit first: splitting the last axis halves the chunk
# (knots [0, KC/2) and [KC/2, KC)), the leaves are single knots [BK, L1, L2], and every
# split and join stays inside the thread. (u, s) = (cos - 1, sin) enters at the chunk's
# first knot and is rotated after each by the angle whose cos, cos - 1 and sin are
# (c1, u1, s1): u' = u c1 + u1 - s s1, s' = s c1 + (u s1 + s1), two FMAs each as the
# rotation of cos itself, but rounded relative to cos - 1 (csrc/sigreg_math.h's
# rotate_cosm1): the sums of cos - 1 keep the digits C - phi needs at small angles.
# LEAN: the same from (u1, s1) alone, c1 = 1 + u1 folded in (6 ops instead of 4, one
# register less per element held): for tiles that hold many samples per thread, where
# the projection's MMA, not the element loop, sets the time.
# Sample weights: (u, s) carries w (cos - 1, sin), which the same rotation advances when
# its additive constants (a_u, a_s) are w (u1, s1) instead of (u1, s1): the weight costs a
# multiply per element, none per knot.
@triton.jit
def _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN: tl.constexpr):
    """(u, s) = w (cos - 1, sin) rotated by the angle whose cos, cos - 1 and sin are (c1, u1, s1);
    (a_u, a_s) = w (u1, s1) (unweighted: w = 1, the very same values)."""
    if LEAN:
        return u + (u * u1 + a_u - s * s1), s + (s * u1 + (u * s1 + a_s))
    return u * c1 + a_u - s * s1, s * c1 + (u * s1 + a_s)


@triton.jit
def _knots4(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE: tl.constexpr, WARPS_N: tl.constexpr,
             LEAN: tl.constexpr):
    c01, c23 = tl.split(acc_c)
    s01, s23 = tl.split(acc_s)
    c0, c1_ = tl.split(c01)
    s0, s1_ = tl.split(s01)
    c2, c3 = tl.split(c23)
    s2, s3 = tl.split(s23)
    sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
    c0, s0 = c0 + sum_c, s0 + sum_s
    u, s = _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN)
    sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
    c1_, s1_ = c1_ + sum_c, s1_ + sum_s
    u, s = _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN)
    sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
    c2, s2 = c2 + sum_c, s2 + sum_s
    u, s = _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN)
    sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
    c3, s3 = c3 + sum_c, s3 + sum_s
    u, s = _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN)
    acc_c = tl.join(tl.join(c0, c1_), tl.join(c2, c3))
    acc_s = tl.join(tl.join(s0, s1_), tl.join(s2, s3))
    return acc_c, acc_s, u, s


@triton.jit
def _knots8(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE: tl.constexpr, WARPS_N: tl.constexpr,
             LEAN: tl.constexpr):
    lo_c, hi_c = tl.split(acc_c)
    lo_s, hi_s = tl.split(acc_s)
    lo_c, lo_s, u, s = _knots4(lo_c, lo_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
    hi_c, hi_s, u, s = _knots4(hi_c, hi_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
    return tl.join(lo_c, hi_c), tl.join(lo_s, hi_s), u, s


@triton.jit
def _knots16(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE: tl.constexpr, WARPS_N: tl.constexpr,
             LEAN: tl.constexpr):
    lo_c, hi_c = tl.split(acc_c)
    lo_s, hi_s = tl.split(acc_s)
    lo_c, lo_s, u, s = _knots8(lo_c, lo_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
    hi_c, hi_s, u, s = _knots8(hi_c, hi_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
    return tl.join(lo_c, hi_c), tl.join(lo_s, hi_s), u, s


@triton.jit
def _knot_sums(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, KC: tl.constexpr, TILE: tl.constexpr, WARPS_N: tl.constexpr,
               LEAN: tl.constexpr):
    """acc [BK, L1, L2, KC] += the chunk's knot sums of one tile, (u, s) = (cos - 1, sin) at its first knot.

    The knot axis is viewed as one axis per bit (lowest first) for the tree, then back.
    """
    shape: tl.constexpr = acc_c.shape
    if KC == 1:
        sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
        acc_c += sum_c[:, :, :, None]
        acc_s += sum_s[:, :, :, None]
    elif KC == 2:
        c0, c1_ = tl.split(acc_c)
        s0, s1_ = tl.split(acc_s)
        sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
        c0, s0 = c0 + sum_c, s0 + sum_s
        u, s = _rotate_cosm1(u, s, c1, u1, s1, a_u, a_s, LEAN)
        sum_c, sum_s = _cs_sums(u, s, TILE, WARPS_N)
        acc_c, acc_s = tl.join(c0, c1_ + sum_c), tl.join(s0, s1_ + sum_s)
    elif KC == 4:
        acc_c = tl.permute(tl.reshape(acc_c, (shape[0], shape[1], shape[2], 2, 2)), (0, 1, 2, 4, 3))
        acc_s = tl.permute(tl.reshape(acc_s, (shape[0], shape[1], shape[2], 2, 2)), (0, 1, 2, 4, 3))
        acc_c, acc_s, u, s = _knots4(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
        acc_c = tl.reshape(tl.permute(acc_c, (0, 1, 2, 4, 3)), (shape[0], shape[1], shape[2], KC))
        acc_s = tl.reshape(tl.permute(acc_s, (0, 1, 2, 4, 3)), (shape[0], shape[1], shape[2], KC))
    elif KC == 8:
        acc_c = tl.permute(tl.reshape(acc_c, (shape[0], shape[1], shape[2], 2, 2, 2)), (0, 1, 2, 5, 4, 3))
        acc_s = tl.permute(tl.reshape(acc_s, (shape[0], shape[1], shape[2], 2, 2, 2)), (0, 1, 2, 5, 4, 3))
        acc_c, acc_s, u, s = _knots8(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
        acc_c = tl.reshape(tl.permute(acc_c, (0, 1, 2, 5, 4, 3)), (shape[0], shape[1], shape[2], KC))
        acc_s = tl.reshape(tl.permute(acc_s, (0, 1, 2, 5, 4, 3)), (shape[0], shape[1], shape[2], KC))
    else:
        tl.static_assert(KC == 16, "knot chunks hold 1, 2, 4, 8 or 16 knots")
        acc_c = tl.permute(tl.reshape(acc_c, (shape[0], shape[1], shape[2], 2, 2, 2, 2)), (0, 1, 2, 6, 5, 4, 3))
        acc_s = tl.permute(tl.reshape(acc_s, (shape[0], shape[1], shape[2], 2, 2, 2, 2)), (0, 1, 2, 6, 5, 4, 3))
        acc_c, acc_s, u, s = _knots16(acc_c, acc_s, u, s, c1, u1, s1, a_u, a_s, TILE, WARPS_N, LEAN)
        acc_c = tl.reshape(tl.permute(acc_c, (0, 1, 2, 6, 5, 4, 3)), (shape[0], shape[1], shape[2], KC))
        acc_s = tl.reshape(tl.permute(acc_s, (0, 1, 2, 6, 5, 4, 3)), (shape[0], shape[1], shape[2], KC))
    return acc_c, acc_s


# Backward Horner trees: h <- h * z + gamma_j from the chunk's highest knot down,
# z = (c1, s1). gamma is [BK, 1, 2, ..., 2] (MMA tile) or [1, BK, 2, ..., 2] (rows tile),
# bit axes as in the forward, so that each knot's [BK, 1] / [1, BK] broadcasts against
# the tile as it is.
@triton.jit
def _horner4(h_re, h_im, g_re, g_im, c1, s1):
    re01, re23 = tl.split(g_re)
    im01, im23 = tl.split(g_im)
    re0, re1 = tl.split(re01)
    im0, im1 = tl.split(im01)
    re2, re3 = tl.split(re23)
    im2, im3 = tl.split(im23)
    h_re, h_im = h_re * c1 - h_im * s1 + re3, h_re * s1 + h_im * c1 + im3
    h_re, h_im = h_re * c1 - h_im * s1 + re2, h_re * s1 + h_im * c1 + im2
    h_re, h_im = h_re * c1 - h_im * s1 + re1, h_re * s1 + h_im * c1 + im1
    h_re, h_im = h_re * c1 - h_im * s1 + re0, h_re * s1 + h_im * c1 + im0
    return h_re, h_im


@triton.jit
def _horner8(h_re, h_im, g_re, g_im, c1, s1):
    lo_re, hi_re = tl.split(g_re)
    lo_im, hi_im = tl.split(g_im)
    h_re, h_im = _horner4(h_re, h_im, hi_re, hi_im, c1, s1)
    return _horner4(h_re, h_im, lo_re, lo_im, c1, s1)


@triton.jit
def _horner16(h_re, h_im, g_re, g_im, c1, s1):
    lo_re, hi_re = tl.split(g_re)
    lo_im, hi_im = tl.split(g_im)
    h_re, h_im = _horner8(h_re, h_im, hi_re, hi_im, c1, s1)
    return _horner8(h_re, h_im, lo_re, lo_im, c1, s1)


@triton.jit
def _horner(h_re, h_im, g_re, g_im, c1, s1, KC: tl.constexpr):
    """Horner over a chunk's gamma [X, Y, KC] (knot axis plain; bit axes built here)."""
    shape: tl.constexpr = g_re.shape
    if KC == 1:
        re = tl.reshape(g_re, (shape[0], shape[1]))
        im = tl.reshape(g_im, (shape[0], shape[1]))
        h_re, h_im = h_re * c1 - h_im * s1 + re, h_re * s1 + h_im * c1 + im
    elif KC == 2:
        re0, re1 = tl.split(g_re)
        im0, im1 = tl.split(g_im)
        h_re, h_im = h_re * c1 - h_im * s1 + re1, h_re * s1 + h_im * c1 + im1
        h_re, h_im = h_re * c1 - h_im * s1 + re0, h_re * s1 + h_im * c1 + im0
    elif KC == 4:
        g_re = tl.permute(tl.reshape(g_re, (shape[0], shape[1], 2, 2)), (0, 1, 3, 2))
        g_im = tl.permute(tl.reshape(g_im, (shape[0], shape[1], 2, 2)), (0, 1, 3, 2))
        h_re, h_im = _horner4(h_re, h_im, g_re, g_im, c1, s1)
    elif KC == 8:
        g_re = tl.permute(tl.reshape(g_re, (shape[0], shape[1], 2, 2, 2)), (0, 1, 4, 3, 2))
        g_im = tl.permute(tl.reshape(g_im, (shape[0], shape[1], 2, 2, 2)), (0, 1, 4, 3, 2))
        h_re, h_im = _horner8(h_re, h_im, g_re, g_im, c1, s1)
    else:
        tl.static_assert(KC == 16, "knot chunks hold 1, 2, 4, 8 or 16 knots")
        g_re = tl.permute(tl.reshape(g_re, (shape[0], shape[1], 2, 2, 2, 2)), (0, 1, 5, 4, 3, 2))
        g_im = tl.permute(tl.reshape(g_im, (shape[0], shape[1], 2, 2, 2, 2)), (0, 1, 5, 4, 3, 2))
        h_re, h_im = _horner16(h_re, h_im, g_re, g_im, c1, s1)
    return h_re, h_im


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:
        # Interpreter only: its tl.dot mishandles bf16. Products of fp16/bf16 values
        # are exact in fp32, so upcasting computes what the tensor cores do.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_directions_t(a_ptr, rk, k_valid, d0, D, stride_ad, stride_ak, BLOCK_D: tl.constexpr):
    """A^T [BLOCK_K, BLOCK_D] from directions [D, K]: rows rk, features d0 + [0, BLOCK_D)."""
    rd = d0 + tl.arange(0, BLOCK_D)
    return tl.load(a_ptr + rk[:, None] * stride_ak + rd[None, :] * stride_ad,
                   mask=k_valid[:, None] & (rd < D)[None, :], other=0.0)


@triton.jit
def _load_x_t(x_b, rn, n_valid, d0, D, stride_xn, stride_xd, BLOCK_D: tl.constexpr):
    """x^T [BLOCK_D, BLOCK_N]: features d0 + [0, BLOCK_D) of rows rn, int64 offsets."""
    rd = d0 + tl.arange(0, BLOCK_D)
    return tl.load(x_b + rn.to(tl.int64)[None, :] * stride_xn + rd.to(tl.int64)[:, None] * stride_xd,
                   mask=(rd < D)[:, None] & n_valid[None, :], other=0.0)


@triton.jit
def _projection_t(a_res, a_ptr, x_b, rk, k_valid, rn, n_valid, D,
                  stride_xn, stride_xd, stride_ad, stride_ak,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  RESIDENT: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """p^T [BLOCK_K, BLOCK_N] = A[:, rk]^T x[rn, :]^T in fp32; rows/columns out of range are 0.

    RESIDENT: D <= BLOCK_D and a_res holds A^T for the whole program (loaded once).
    """
    acc = tl.full([BLOCK_K, BLOCK_N], 0.0, tl.float32)
    if RESIDENT:
        x_t = _load_x_t(x_b, rn, n_valid, 0, D, stride_xn, stride_xd, BLOCK_D)
        acc = _dot(a_res, x_t, acc, PRECISION, DOT_UPCAST)
    else:
        for d0 in range(0, D, BLOCK_D):
            a_t = _load_directions_t(a_ptr, rk, k_valid, d0, D, stride_ad, stride_ak, BLOCK_D)
            x_t = _load_x_t(x_b, rn, n_valid, d0, D, stride_xn, stride_xd, BLOCK_D)
            acc = _dot(a_t, x_t, acc, PRECISION, DOT_UPCAST)
    return acc


@triton.jit
def _accumulate_tile(acc_c, acc_s, acc_0, p, rows_valid, w, delta, t_first, KNOTS: tl.constexpr,
                     KC: tl.constexpr, TILE: tl.constexpr, WARPS_N: tl.constexpr, LEAN: tl.constexpr,
                     HAS_WEIGHTS: tl.constexpr):
    """Adds a tile of P to the sums: cos(t_j p) - 1 | sin(t_j p) at the chunk's knots, and 0 * p
    (NaN where p is not finite). HAS_WEIGHTS: each row's terms times its weight w (broadcast
    against the tile), p taken as 0 where w is 0, whatever that row holds."""
    if HAS_WEIGHTS:
        p = tl.where(w > 0, p, 0.0)
        nan_p, _ = _cs_sums(w * (p * 0.0), p, TILE, WARPS_N)
    else:
        nan_p, _ = _cs_sums(p * 0.0, p, TILE, WARPS_N)
    s1, c1, u1 = _sincos_cosm1(p * delta)
    if KNOTS - 1 <= KC:  # one chunk: its first knot is t_1 = delta
        s, u = s1, u1
    else:
        s, _, u = _sincos_cosm1(p * t_first)
    # Rows past the end: their p is 0 (masked loads), so (cos - 1, sin) starts at (0, 0) and the
    # rotation by angle 0 keeps it there. The selects on MMA tiles are for the compiler: without
    # them ptxas allocates ~40 more registers there (with them, the rows tiles' ~30 more).
    if TILE == MMA_TILE:
        u = tl.where(rows_valid, u, 0.0)
        s = tl.where(rows_valid, s, 0.0)
    if HAS_WEIGHTS:  # the state and the rotation's additive constants times w (_rotate_cosm1)
        acc_c, acc_s = _knot_sums(acc_c, acc_s, u * w, s * w, c1, u1, s1, u1 * w, s1 * w, KC, TILE, WARPS_N, LEAN)
    else:
        acc_c, acc_s = _knot_sums(acc_c, acc_s, u, s, c1, u1, s1, u1, s1, KC, TILE, WARPS_N, LEAN)
    return acc_c, acc_s, acc_0 + nan_p


@triton.jit
def _store_partials(out_ptr, b, split, rk, k_valid, first_knot, acc_c, acc_s, acc_0,
                    stride_ob, stride_os, stride_oc, stride_ok, KNOTS: tl.constexpr, KC: tl.constexpr):
    """Sum the lane partials [BK, L1, L2, KC] once, store the split's knots [first_knot, +KC)
    (and knot 0 for the first chunk)."""
    out = out_ptr + b * stride_ob + split.to(tl.int64) * stride_os + rk[:, None] * stride_ok
    knot = first_knot + tl.arange(0, KC)[None, :]
    sums_c = _sum(_sum(acc_c, 2), 1)  # [BK, KC]
    sums_s = _sum(_sum(acc_s, 2), 1)
    mask = k_valid[:, None] & (knot < KNOTS)
    tl.store(out + knot, sums_c, mask=mask)
    tl.store(out + stride_oc + knot, sums_s, mask=mask)
    if first_knot == 1:
        # Knot 0: cos(0 p) - 1 = 0 and sin(0 p) = 0 per row, NaN where p is NaN or infinite.
        nan0 = _sum(_sum(acc_0, 2), 1)[:, None]
        tl.store(out, nan0, mask=k_valid[:, None])
        tl.store(out + stride_oc, nan0, mask=k_valid[:, None])


@triton.jit
def _zero_arrivals(arrivals_ptr, ZERO_ARRIVALS: tl.constexpr):
    """The statistic kernel's arrival counter, zeroed by the kernel that always runs
    before it (one store) instead of by a memset launch of its own."""
    if ZERO_ARRIVALS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.store(arrivals_ptr, 0)


@triton.jit
def _program(rows_per_program, N, K, batch_start, knot_chunks, BLOCK_K: tl.constexpr):
    """What a program of any kernel here owns, from its ids on the grid (slice blocks x knot
    chunks, row splits, batch indices from batch_start): its slice block (pid_k; slices rk,
    k_valid), its knot chunk, its batch index b (int64: b * stride may pass 2^31) and its
    rows [row_start, row_end)."""
    pid_k = tl.program_id(0) // knot_chunks
    chunk = tl.program_id(0) % knot_chunks
    b = tl.program_id(2).to(tl.int64) + batch_start
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_start = tl.program_id(1) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    return pid_k, chunk, b, rk, rk < K, row_start, row_end


@triton.jit
def ecf_partials_kernel(
    x_ptr, a_ptr, out_ptr, arrivals_ptr, w_ptr,
    N, D, K, rows_per_split, knot_chunks, batch_start,
    stride_xb, stride_xn, stride_xd,
    stride_ad, stride_ak,
    stride_ob, stride_os, stride_oc, stride_ok,
    delta,
    KNOTS: tl.constexpr, KC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WARPS_N: tl.constexpr, RESIDENT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, ZERO_ARRIVALS: tl.constexpr, LEAN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """partials[b, split, 0|1, k, j] = sum of cos(t_j p_nk) - 1 | sin(t_j p_nk) over the rows of one split.

    Grid: (K blocks x knot chunks, splits, batch indices from batch_start). A program
    owns slices rk and knots [1 + q KC, 1 + (q + 1) KC) (and knot 0 for q = 0) for the
    rows [split * rows_per_split, +rows_per_split) of batch b. The partials' knot axis
    is contiguous (stride 1). ZERO_ARRIVALS: program (0, 0, 0) also sets the statistic
    kernel's arrival counter to 0. HAS_WEIGHTS: the sums weighted by w [B, N] (contiguous).
    """
    _zero_arrivals(arrivals_ptr, ZERO_ARRIVALS)
    pid_k, chunk, b, rk, k_valid, row_start, row_end = _program(rows_per_split, N, K, batch_start, knot_chunks,
                                                                BLOCK_K)
    split = tl.program_id(1)
    x_b = x_ptr + b * stride_xb
    w_b = w_ptr + b * N
    first_knot = 1 + chunk * KC
    t_first = first_knot.to(tl.float32) * delta

    if RESIDENT:
        a_res = _load_directions_t(a_ptr, rk, k_valid, 0, D, stride_ad, stride_ak, BLOCK_D)
    else:
        a_res = tl.full([BLOCK_K, BLOCK_D], 0.0, a_ptr.dtype.element_ty)
    # Two-level sums: each thread sums its own samples of a tile (a short tree), the
    # tile sums accumulate across tiles in acc, and the lanes' partials are summed at
    # the end: no long running sum of tiny terms (C - phi needs those digits).
    acc_c = tl.full([BLOCK_K, WARPS_N, 4, KC], 0.0, tl.float32)
    acc_s = tl.full([BLOCK_K, WARPS_N, 4, KC], 0.0, tl.float32)
    acc_0 = tl.full([BLOCK_K, WARPS_N, 4], 0.0, tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_valid = rn < row_end
        p = _projection_t(a_res, a_ptr, x_b, rk, k_valid, rn, n_valid, D,
                          stride_xn, stride_xd, stride_ad, stride_ak,
                          BLOCK_K, BLOCK_N, BLOCK_D, RESIDENT, PRECISION, DOT_UPCAST)
        w = tl.load(w_b + rn, mask=n_valid, other=0.0)[None, :] if HAS_WEIGHTS else None
        acc_c, acc_s, acc_0 = _accumulate_tile(acc_c, acc_s, acc_0, p, n_valid[None, :], w, delta, t_first,
                                               KNOTS, KC, MMA_TILE, WARPS_N, LEAN, HAS_WEIGHTS)
    _store_partials(out_ptr, b, split, rk, k_valid, first_knot, acc_c, acc_s, acc_0,
                    stride_ob, stride_os, stride_oc, stride_ok, KNOTS, KC)


@triton.jit
def _rows_tile(n0, row_end, rk0, K, stride_n, stride_k, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Flat offsets, mask and row mask of a [BLOCK_N samples, BLOCK_K slices] tile of P.

    Built on one flat axis (sample-major) and reshaped by the caller: a 1-D layout has no
    dimension order for the compiler to choose, so lanes and warps take consecutive
    slices and each thread holds whole columns (stride_k is not specialized, so nothing
    is vectorized along K), with triton 3.6 as with 3.9.
    """
    i = tl.arange(0, BLOCK_N * BLOCK_K)
    rn = n0 + i // BLOCK_K
    rk = rk0 + i % BLOCK_K
    offsets = rn.to(tl.int64) * stride_n + rk.to(tl.int64) * stride_k
    rows = rn < row_end
    return offsets, rows & (rk < K), tl.reshape(rows, (BLOCK_N, BLOCK_K))


@triton.jit
def _rows_weights(w_b, n0, row_end, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weights of a _rows_tile tile's rows, [BLOCK_N, BLOCK_K] (0 past row_end): loaded on
    the tile's own flat axis, so that each thread loads the weights of the rows it holds and
    no layout conversion is needed (the lanes of a warp read the same address)."""
    rn = n0 + tl.arange(0, BLOCK_N * BLOCK_K) // BLOCK_K
    return tl.reshape(tl.load(w_b + rn, mask=rn < row_end, other=0.0), (BLOCK_N, BLOCK_K))


@triton.jit(do_not_specialize=["stride_pk"])
def ecf_partials_projected_kernel(
    p_ptr, out_ptr, arrivals_ptr, w_ptr,
    N, K, rows_per_split, knot_chunks, batch_start,
    stride_pb, stride_pn, stride_pk,
    stride_ob, stride_os, stride_oc, stride_ok,
    delta,
    KNOTS: tl.constexpr, KC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ZERO_ARRIVALS: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    """ecf_partials_kernel on a given projection P [B, N, K] (directions=None).

    Tiles are [BLOCK_N, BLOCK_K] with lanes and warps along K (_rows_tile): every thread
    owns whole columns, and all sums over samples stay in the thread.
    """
    _zero_arrivals(arrivals_ptr, ZERO_ARRIVALS)
    pid_k, chunk, b, rk, k_valid, row_start, row_end = _program(rows_per_split, N, K, batch_start, knot_chunks,
                                                                BLOCK_K)
    split = tl.program_id(1)
    p_b = p_ptr + b * stride_pb
    w_b = w_ptr + b * N
    first_knot = 1 + chunk * KC
    t_first = first_knot.to(tl.float32) * delta

    acc_c = tl.full([BLOCK_K, 1, 1, KC], 0.0, tl.float32)
    acc_s = tl.full([BLOCK_K, 1, 1, KC], 0.0, tl.float32)
    acc_0 = tl.full([BLOCK_K, 1, 1], 0.0, tl.float32)
    for n0 in range(row_start, row_end, BLOCK_N):
        offsets, mask, rows = _rows_tile(n0, row_end, pid_k * BLOCK_K, K, stride_pn, stride_pk, BLOCK_N, BLOCK_K)
        p = tl.reshape(tl.load(p_b + offsets, mask=mask, other=0.0), (BLOCK_N, BLOCK_K)).to(tl.float32)
        w = _rows_weights(w_b, n0, row_end, BLOCK_N, BLOCK_K) if HAS_WEIGHTS else None
        acc_c, acc_s, acc_0 = _accumulate_tile(acc_c, acc_s, acc_0, p, rows, w, delta, t_first, KNOTS, KC,
                                               ROWS_TILE, 1, False, HAS_WEIGHTS)
    _store_partials(out_ptr, b, split, rk, k_valid, first_knot, acc_c, acc_s, acc_0,
                    stride_ob, stride_os, stride_oc, stride_ok, KNOTS, KC)


@triton.jit
def statistic_kernel(
    partials_ptr, stat_ptr, coef_ptr, block_sums_ptr, loss_ptr, arrivals_ptr, moments_ptr,
    S, K, k_blocks, programs, loss_divisor,
    stride_pb, stride_ps, stride_pc, stride_pk,
    stride_sb, stride_sk,
    stride_cb, stride_cc, stride_ck,
    stride_mb, stride_mc,
    samples, delta, factor, clip_value,
    KNOTS: tl.constexpr, KNOTS_PAD: tl.constexpr, HAS_CLIP: tl.constexpr, BLOCK_K: tl.constexpr,
    SUM_BLOCK: tl.constexpr, HAS_MOMENTS: tl.constexpr, UNBIASED: tl.constexpr = False,
):
    """stat [B, K], coef [B, 2, K, T] (knot axes contiguous) and the loss from partials [B, S, 2, K, T].

    Grid: (B * k_blocks,) = ``programs``, one program per (batch index, slice block): the
    sum over splits runs in split order; the quadrature is built in float64, then
    rounded, as core/quadrature.py builds it. The loss (sum of all stat / loss_divisor) in
    the same launch, deterministically: each program stores the float64 sum of its
    statistics in block_sums[pid] and takes a ticket from the arrival counter (which
    ecf_partials zeroed); the program that arrives last sums block_sums in program
    order, whatever the arrival order, writes the loss and resets the counter to 0.
    HAS_MOMENTS: weighted sums, normalized by the batch index's moments (sum w, sum w^2)
    instead of ``samples``. UNBIASED: the U-statistic (gpu/contract.py).
    """
    pid = tl.program_id(0)
    b = (pid // k_blocks).to(tl.int64)
    rk = (pid % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    j = tl.arange(0, KNOTS_PAD)
    mask = (rk < K)[:, None] & (j < KNOTS)[None, :]
    offsets = rk[:, None] * stride_pk + j[None, :]
    base = partials_ptr + b * stride_pb
    sums_c = tl.full([BLOCK_K, KNOTS_PAD], 0.0, tl.float32)
    sums_s = tl.full([BLOCK_K, KNOTS_PAD], 0.0, tl.float32)
    for _ in range(0, S):  # the pointer steps in 64 bits: S * stride_ps may pass 2^31
        sums_c += tl.load(base + offsets, mask=mask, other=0.0)
        sums_s += tl.load(base + stride_pc + offsets, mask=mask, other=0.0)
        base += stride_ps

    t = j.to(tl.float64) * delta  # float64: the knots as core/quadrature.py rounds them
    half_t2 = -0.5 * t * t
    phi64 = tl.exp(half_t2)
    # phi - 1 = expm1(-t^2 / 2) (quadrature.phi_minus_one): its series where exp - 1 would
    # cancel (error < x^5 / 120), exp - 1 in float64 elsewhere; rounded once to float32.
    series = half_t2 * (1.0 + half_t2 * (0.5 + half_t2 * (1.0 / 6.0 + half_t2 * (1.0 / 24.0))))
    phi_m1 = tl.where(half_t2 > -1e-3, series, phi64 - 1.0).to(tl.float32)[None, :]
    trapezoid = tl.where((j == 0) | (j == KNOTS - 1), 1.0, 2.0).to(tl.float64) * delta
    w = tl.where(j < KNOTS, trapezoid * phi64, 0.0).to(tl.float32)[None, :]
    if HAS_MOMENTS:
        # Weighted: the mean is over sum w, the statistic's N is the effective sample size
        # (sum w)^2 / sum w^2, and d stat / d sums = that N / sum w = sum w / sum w^2.
        count = tl.load(moments_ptr + b * stride_mb)
        squares = tl.load(moments_ptr + b * stride_mb + stride_mc)
        ratio = count / squares
        # (sum w)^2 / sum w^2 as the contract forms it: one weighted row gives exactly N = 1 (no pair),
        # which count * ratio can miss by an ulp.
        size = count * count / squares
    else:
        count = samples
        size = samples
    ecf_cos_minus_phi = sums_c / count - phi_m1  # sums of cos - 1: both terms keep their digits
    ecf_sin = sums_s / count
    stat = _sum((ecf_cos_minus_phi * ecf_cos_minus_phi + ecf_sin * ecf_sin) * w, 1) * size
    coef_c = (2.0 * w) * ecf_cos_minus_phi * factor
    coef_s = (2.0 * w) * ecf_sin * factor
    if HAS_MOMENTS:
        coef_c = coef_c * ratio
        coef_s = coef_s * ratio
    if UNBIASED:
        # Minus r sum_j w_j (1 - C^2 - S^2), r = N / (N - 1), NaN where N <= 1 (no pair of samples);
        # 1 - C^2 - S^2 = -u (2 + u) - S^2 with u = C - 1, the mean of cos - 1: no cancellation at 1.
        mean_cos_m1 = sums_c / count
        pairs = tl.where(size > 1.0, size / (size - 1.0), float("nan"))
        spread = -mean_cos_m1 * (2.0 + mean_cos_m1) - ecf_sin * ecf_sin
        stat = stat - pairs * _sum(spread * w, 1)
        extra = (2.0 * w) * factor * (pairs / count)  # d / d sums: r 2 w_j (C_j, S_j) / sum w
        coef_c = coef_c + extra * (1.0 + mean_cos_m1)
        coef_s = coef_s + extra * ecf_sin
    if HAS_MOMENTS:
        # A batch index with no weight: statistic 0 and no gradient, not 0 / 0.
        empty = count == 0
        stat = tl.where(empty, 0.0, stat)
        coef_c = tl.where(empty, 0.0, coef_c)
        coef_s = tl.where(empty, 0.0, coef_s)
    if HAS_CLIP:
        # Statistics below clip_value are 0 and pass no gradient; NaN is below nothing, so a
        # NaN statistic (and its coefficients) stays NaN, as contract.statistic.
        clipped = stat < clip_value
        stat = tl.where(clipped, 0.0, stat)
        kept = tl.where(clipped, 0.0, 1.0)[:, None]
        coef_c = coef_c * kept  # a product, as the reference: NaN coefficients stay NaN
        coef_s = coef_s * kept
    tl.store(stat_ptr + b * stride_sb + rk * stride_sk, stat, mask=rk < K)
    out = coef_ptr + b * stride_cb + rk[:, None] * stride_ck + j[None, :]
    tl.store(out, coef_c, mask=mask)
    tl.store(out + stride_cc, coef_s, mask=mask)

    tl.store(block_sums_ptr + pid, _sum(tl.where(rk < K, stat, 0.0).to(tl.float64), 0))
    # The barrier orders every thread's store before the release of the ticket (which one
    # thread takes); acq_rel makes the other programs' sums visible to the last one.
    tl.debug_barrier()
    ticket = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == programs - 1:
        total = tl.full([SUM_BLOCK], 0.0, tl.float64)
        for start in range(0, programs, SUM_BLOCK):  # from L2 (.cg): L1 may hold stale lines
            i = start + tl.arange(0, SUM_BLOCK)
            total += tl.load(block_sums_ptr + i, mask=i < programs, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, (_sum(total, 0) / loss_divisor).to(tl.float32))
        tl.store(arrivals_ptr, 0)  # as it was found: the next statistic may reuse it


@triton.jit
def _load_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, knot, delta, KNOTS: tl.constexpr,
                TILE: tl.constexpr):
    """gamma_j = t_j * scale_k * (coef_sin + i coef_cos) for knots [1, 1, KC]: [BK, 1, KC] for
    an MMA tile, [1, BK, KC] for a rows tile; 0 past the last knot."""
    if TILE == MMA_TILE:
        rk, k_valid, scale_k = rk[:, None, None], k_valid[:, None, None], scale_k[:, None, None]
    else:
        rk, k_valid, scale_k = rk[None, :, None], k_valid[None, :, None], scale_k[None, :, None]
    mask = k_valid & (knot < KNOTS)
    offsets = rk * stride_ck + knot
    weight = (knot.to(tl.float32) * delta) * scale_k
    g_re = tl.load(coef_b + stride_cc + offsets, mask=mask, other=0.0) * weight
    g_im = tl.load(coef_b + offsets, mask=mask, other=0.0) * weight
    return g_re, g_im


@triton.jit
def _program_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, KNOTS: tl.constexpr,
                   KC: tl.constexpr, BLOCK_K: tl.constexpr, TILE: tl.constexpr):
    """A program's gamma, loaded once where all knots fit one chunk; else zeros (not read:
    _gradient reloads gamma per chunk)."""
    if KNOTS - 1 <= KC:
        knot = 1 + tl.arange(0, KC)[None, None, :]
        g_re, g_im = _load_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, knot, delta, KNOTS, TILE)
    elif TILE == MMA_TILE:
        g_re = tl.full([BLOCK_K, 1, KC], 0.0, tl.float32)
        g_im = tl.full([BLOCK_K, 1, KC], 0.0, tl.float32)
    else:
        g_re = tl.full([1, BLOCK_K, KC], 0.0, tl.float32)
        g_im = tl.full([1, BLOCK_K, KC], 0.0, tl.float32)
    return g_re, g_im


@triton.jit
def _gradient(p, coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, g_re, g_im,
              KNOTS: tl.constexpr, KC: tl.constexpr, TILE: tl.constexpr):
    """G on a tile of p: Re(sum_j gamma_j z^j), z = e^{i delta p}, Horner from the top knot."""
    s1, c1 = _sincos(p * delta)
    h_re = tl.full(p.shape, 0.0, tl.float32)
    h_im = tl.full(p.shape, 0.0, tl.float32)
    if KNOTS - 1 <= KC:  # gamma as _program_gamma loaded it
        h_re, h_im = _horner(h_re, h_im, g_re, g_im, c1, s1, KC)
    else:
        # More than 16 knots: chunks of 16 from the top, gamma reloaded per chunk (L1).
        CHUNKS: tl.constexpr = (KNOTS - 1 + KC - 1) // KC
        for i in range(0, CHUNKS):
            knot = 1 + (CHUNKS - 1 - i) * KC + tl.arange(0, KC)[None, None, :]
            c_re, c_im = _load_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, knot, delta, KNOTS, TILE)
            h_re, h_im = _horner(h_re, h_im, c_re, c_im, c1, s1, KC)
    return h_re * c1 - h_im * s1  # the last multiplication by z: knot 1 carries z^1


@triton.jit
def slice_gradient_kernel(
    coef_ptr, scale_ptr, x_ptr, a_ptr, g_ptr, w_ptr,
    N, D, K, rows_per_program, batch_start,
    stride_cb, stride_cc, stride_ck,
    stride_sb, stride_sk,
    stride_xb, stride_xn, stride_xd,
    stride_ad, stride_ak,
    stride_gb, stride_gn, stride_gk,
    delta,
    KNOTS: tl.constexpr, KC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RESIDENT: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    """G[b, n, k] = scale[b, k] * sum_j t_j (coef[b, 1, k, j] cos(t_j p) - coef[b, 0, k, j] sin(t_j p)).
    HAS_WEIGHTS: times w[b, n], at p = 0 where w is 0 (G = 0 there whatever x holds).

    Grid: (K blocks, row groups, batch indices from batch_start); a program owns slices
    rk and rows [group * rows_per_program, +rows_per_program), tile by tile, with the
    directions (RESIDENT) and gamma in registers / shared memory for all its tiles.
    """
    pid_k, _chunk, b, rk, k_valid, row_start, row_end = _program(rows_per_program, N, K, batch_start, 1, BLOCK_K)
    x_b = x_ptr + b * stride_xb
    w_b = w_ptr + b * N
    g_b = g_ptr + b * stride_gb
    coef_b = coef_ptr + b * stride_cb
    scale_k = tl.load(scale_ptr + b * stride_sb + rk * stride_sk, mask=k_valid, other=0.0)
    g_re, g_im = _program_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, KNOTS, KC, BLOCK_K,
                                MMA_TILE)
    if RESIDENT:
        a_res = _load_directions_t(a_ptr, rk, k_valid, 0, D, stride_ad, stride_ak, BLOCK_D)
    else:
        a_res = tl.full([BLOCK_K, BLOCK_D], 0.0, a_ptr.dtype.element_ty)
    for n0 in range(row_start, row_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_valid = rn < row_end
        p = _projection_t(a_res, a_ptr, x_b, rk, k_valid, rn, n_valid, D,
                          stride_xn, stride_xd, stride_ad, stride_ak,
                          BLOCK_K, BLOCK_N, BLOCK_D, RESIDENT, PRECISION, DOT_UPCAST)
        if HAS_WEIGHTS:
            w = tl.load(w_b + rn, mask=n_valid, other=0.0)[None, :]
            p = tl.where(w > 0, p, 0.0)
        grad = _gradient(p, coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, g_re, g_im,
                         KNOTS, KC, MMA_TILE)
        if HAS_WEIGHTS:
            grad = grad * w
        out = g_b + rn.to(tl.int64)[None, :] * stride_gn + rk.to(tl.int64)[:, None] * stride_gk
        tl.store(out, grad.to(g_ptr.dtype.element_ty), mask=k_valid[:, None] & n_valid[None, :])


@triton.jit(do_not_specialize=["stride_pk", "stride_gk"])
def slice_gradient_projected_kernel(
    coef_ptr, scale_ptr, p_ptr, g_ptr, w_ptr,
    N, K, rows_per_program, batch_start,
    stride_cb, stride_cc, stride_ck,
    stride_sb, stride_sk,
    stride_pb, stride_pn, stride_pk,
    stride_gb, stride_gn, stride_gk,
    delta,
    KNOTS: tl.constexpr, KC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SAME_STRIDES: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
):
    """slice_gradient_kernel on a given projection P (directions=None), tiles as in
    ecf_partials_projected_kernel; g_ptr may be p_ptr (slice_gradient_: each element is
    read, then overwritten, by the same thread)."""
    pid_k, _chunk, b, rk, k_valid, row_start, row_end = _program(rows_per_program, N, K, batch_start, 1, BLOCK_K)
    p_b = p_ptr + b * stride_pb
    w_b = w_ptr + b * N
    g_b = g_ptr + b * stride_gb
    coef_b = coef_ptr + b * stride_cb
    scale_k = tl.load(scale_ptr + b * stride_sb + rk * stride_sk, mask=k_valid, other=0.0)
    g_re, g_im = _program_gamma(coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, KNOTS, KC, BLOCK_K,
                                ROWS_TILE)
    for n0 in range(row_start, row_end, BLOCK_N):
        offsets, mask, _ = _rows_tile(n0, row_end, pid_k * BLOCK_K, K, stride_pn, stride_pk, BLOCK_N, BLOCK_K)
        p = tl.reshape(tl.load(p_b + offsets, mask=mask, other=0.0), (BLOCK_N, BLOCK_K)).to(tl.float32)
        if HAS_WEIGHTS:
            w = _rows_weights(w_b, n0, row_end, BLOCK_N, BLOCK_K)
            p = tl.where(w > 0, p, 0.0)
        grad = _gradient(p, coef_b, stride_cc, stride_ck, rk, k_valid, scale_k, delta, g_re, g_im,
                         KNOTS, KC, ROWS_TILE)
        if HAS_WEIGHTS:
            grad = grad * w
        if SAME_STRIDES:  # in place, or G laid out as P: the same offsets
            out = g_b + offsets
        else:
            out_offsets, _, _ = _rows_tile(n0, row_end, pid_k * BLOCK_K, K, stride_gn, stride_gk, BLOCK_N, BLOCK_K)
            out = g_b + out_offsets
        tl.store(out, tl.reshape(grad, (BLOCK_N * BLOCK_K,)).to(g_ptr.dtype.element_ty), mask=mask)
