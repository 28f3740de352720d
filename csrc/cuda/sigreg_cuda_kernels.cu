// SIGReg CUDA kernels: the three kernels of sigreg_kernels/primitives.py, each
// one launch (a 1-D grid; several launches only past 2^31 - 1 blocks).
//
// Why this design (H100/H200, 132 SMs; numbers for bf16 N=4096, D=512, K=1024):
// - The work is a product (P = x A, 4.3 GFLOP) and, per element of P, one
//   sin/cos pair and T-1 = 16 rotations: about 130 FP32 issue slots, so at
//   the FP32 issue rate the element work bounds each kernel (~20 us), not the
//   product (~5 us at the tensor-core peak). The kernels compute a tile of P
//   on tensor cores and keep the element loop lean: per element and knot one
//   rotation (2 FMUL + 2 FFMA) and two FADDs (forward) or two FFMAs (backward),
//   nothing loaded from memory (SASS: 6 FP32 instructions per knot).
// - Backward = slice_gradient (G in x's type, the one transient N x K tensor,
//   recomputing P) then G A^T and x^T G as cuBLAS GEMMs (gpu/fused.py). The old
//   fused backward looped over every slice tile inside 128 blocks and could not
//   fill the machine; here every grid fills it at least kMinWaves = 2 times
//   (waves = blocks / (132 SMs x blocks per SM)) wherever N K >= 2^20: 64x64
//   tiles where that grid is big enough, 32x32 below (N K = 2^20: 1024
//   blocks). slice_gradient: 3 blocks per SM, 1024 blocks = 2.6 waves at the
//   headline and at N K = 2^20. ecf_partials: 2 blocks per SM; its row splits S
//   are free and chosen for whole waves: headline S = 33, 528 blocks = 2.0
//   waves; N=1024, K=1024: 32x32 tiles, S = 32, 3.9 waves. Bigger tiles would
//   reload x and A from L2 less (N K D bytes (1/block_n + 1/block_k) = 134 MB
//   at 64x64, from L2), but 128-row tiles fall below 2 waves at the headline.
// - ecf_partials: each thread keeps 2 x 16 float sums of one column over all the
//   row tiles of its split (R <= 256 rows: plain float sums stay accurate) and
//   the lanes of a column are reduced by shuffles once per block; partials are
//   [B, S, 2, K, T] (4.6 MB at the headline), summed in double, in split order,
//   by the statistic kernel (B K T work; blocks over (b, 7 slices) for T = 17).
// - The statistic kernel also reduces stat to the loss, so the forward needs no
//   reduction op: each block stores its sum, and the block that draws the last
//   arrival ticket adds the blocks' sums in block order (one launch, no memset:
//   ecf_partials zeroes the counter, the last block resets it).
// - slice_gradient keeps its column's 2 x 16 coefficients in registers (loaded
//   once per block) and writes G through shared memory with 16-byte stores.
// - The product: 16-byte cp.async copies in a two-stage pipeline with one
//   barrier per 64-byte-deep stage, WMMA (mma.sync) 16x16 fragments, P stored
//   to shared memory as float. Hopper's wgmma would be faster (and the cost
//   model credits it), but it cannot be tested without a GPU here (the host
//   emulation models WMMA), and the product is not the bound. fp32 at "highest"
//   precision never uses the in-kernel (exact FMA) product on the fused path:
//   gpu/fused.py runs an SGEMM and the kernels read P (Mode::kProjected).
// - Resources (CUDA 13.0, sm_90a, ptxas -v; listed per instance in
//   sigreg_kernels/cuda_plan.py, checked by tests/test_cuda_compile.py; no
//   spills, ptxas warnings fatal): ecf_partials 88-128 registers (capped at 128
//   by __launch_bounds__(256, 2)), 5-38 KB shared memory: 2 blocks per SM;
//   slice_gradient 72-80 registers (cap 80: __launch_bounds__(256, 3)), 7-46 KB:
//   3 blocks per SM; statistic 60 registers, 16.3 KB. The 32-byte stack frame is
//   the library sincosf's (|t p| > 8192 only).
//
// Deterministic: every sum has an order fixed by the shapes, never by the order
// blocks run in. One integer atomic per statistic block (its arrival ticket,
// which only picks the block that sums); no float atomics.
// Building blocks (tiles, shared memory, products) are in sigreg_cuda_tiles.cuh.
#include <limits>

#include "sigreg_cuda_tiles.cuh"

namespace sigreg {
namespace cuda {
namespace {

// Shared memory of ecf_partials: two pipeline stages and the float tile(s) of
// P, or (projected) two tiles of the given projection in T, double-buffered.
template <typename T, Tile TILE, Mode MODE>
struct PartialsSmem {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  static constexpr int kPOffset = 2 * S::kStageBytes;
  static constexpr int kBytes = MODE == Mode::kProjected ? 2 * S::kQBytes : kPOffset + G::kSplit * G::kPBytes;
};

// Shared memory of slice_gradient. Product: [stages, later the float G
// accumulator (and G itself for float)] [P] [G in T for 16-bit types].
// Projected: [the projection tile in T, overwritten by G] [the float G accumulator].
// WEIGHTED: then the tile's block_n row weights (read from shared memory, they hold
// no 64-bit pointer in registers through the element loop).
template <typename T, Tile TILE, Mode MODE, bool WEIGHTED>
struct GradientSmem {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  static constexpr bool kProjected = MODE == Mode::kProjected;
  static constexpr int kRegion = max_int(2 * S::kStageBytes, G::kPBytes);
  static constexpr int kPOffset = kRegion;
  static constexpr int kGOffset = kProjected ? 0 : (sizeof(T) == 4 ? 0 : kPOffset + G::kSplit * G::kPBytes);
  static constexpr int kAccOffset = kProjected ? S::kQBytes : 0;
  static constexpr int kLdG = !kProjected && sizeof(T) == 4 ? G::kLdP : S::kLdQ;
  static constexpr int kWeightsOffset = kProjected ? S::kQBytes + G::kPBytes
                                                   : (sizeof(T) == 4 ? kPOffset + G::kSplit * G::kPBytes
                                                                     : kPOffset + G::kSplit * G::kPBytes + S::kQBytes);
  static constexpr int kBytes = kWeightsOffset + (WEIGHTED ? round_up_128(G::kN * 4) : 0);
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

// Adds the elements of one tile (rows < valid) to this thread's column sums of
// cos - 1 and sin at knots j_first .. j_first + 15 (the rotation carries cos - 1:
// rotate_cosm1); zero_terms += 0 * p keeps NaN/Inf for knot 0.
// WEIGHTED: weights[row] is the tile's row weight w; a row of weight 0 counts as
// p = 0 (so NaN/Inf in it never reach the sums), and each row adds w u and w s:
// an FFMA in place of the FADD, so the weights cost one load and one select per row.
template <Tile TILE, bool WEIGHTED, typename Read>
__device__ __forceinline__ void accumulate_tile(const Read& read, const float* weights, int valid, float delta,
                                                int j_first, float (&sum_cos)[kKnotsPerPass],
                                                float (&sum_sin)[kKnotsPerPass], float& zero_terms) {
  using G = Geometry<TILE>;
  const float t_first = static_cast<float>(j_first) * delta;
  const int rg = G::row_group();
#pragma unroll 1
  for (int i = 0; i < G::kRowsPerThread; ++i) {
    const int row = rg + G::kRowGroups * i;
    if (row >= valid) break;
    const float w = WEIGHTED ? weights[row] : 1.0f;
    const float p = !WEIGHTED || w > 0.0f ? read(row) : 0.0f;
    if constexpr (WEIGHTED) {
      zero_terms = fmaf(w, 0.0f * p, zero_terms);
    } else {
      zero_terms += 0.0f * p;
    }
    float s1, c1, u1, s, c, u;
    sincos_cosm1_accurate(delta * p, &s1, &c1, &u1);
    if (j_first == 1) {
      s = s1;
      u = u1;
    } else {
      sincos_cosm1_accurate(t_first * p, &s, &c, &u);
    }
#pragma unroll
    for (int q = 0; q < kKnotsPerPass; ++q) {  // knots past the last are summed but never written
      if constexpr (WEIGHTED) {
        sum_cos[q] = fmaf(w, u, sum_cos[q]);
        sum_sin[q] = fmaf(w, s, sum_sin[q]);
      } else {
        sum_cos[q] += u;
        sum_sin[q] += s;
      }
      if (q + 1 < kKnotsPerPass) rotate_cosm1(u, s, c1, u1, s1);
    }
  }
}

// partials[b, s, :, k0 : k0 + block_k, j_first : j_first + 16] (and knot 0 in
// pass 0) for block (b, pass, split s, slice tile); WEIGHTED: a.weights are the rows' weights.
template <typename T, Tile TILE, Mode MODE, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads, kPartialsMinBlocks) ecf_partials_kernel(PartialsArgs a) {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  using L = PartialsSmem<T, TILE, MODE>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const int64_t linear = a.block_offset + blockIdx.x;
  const int64_t kt = linear % a.k_tiles, split = linear / a.k_tiles % a.splits;
  const int64_t pass = linear / a.k_tiles / a.splits % a.passes, b = linear / a.k_tiles / a.splits / a.passes;
  const int64_t k0 = kt * G::kK, row_begin = split * a.rows_per_split;
  const int64_t row_end = min(row_begin + a.rows_per_split, a.samples);
  const int j_first = 1 + static_cast<int>(pass) * kKnotsPerPass;
  const int col = G::col();
  constexpr bool kProjected = MODE == Mode::kProjected;
  const int64_t row_length = kProjected ? a.slices : a.dim;
  const T* x_b = static_cast<const T*>(a.x) + b * a.samples * row_length;

  float sum_cos[kKnotsPerPass], sum_sin[kKnotsPerPass];
#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) sum_cos[q] = sum_sin[q] = 0.0f;
  float zero_terms = 0.0f;

  if constexpr (kProjected) {
    // Tile t + 1 is copied while tile t is summed; one barrier per tile.
    T* tiles = reinterpret_cast<T*>(smem);
    constexpr int kTileElems = S::kQBytes / static_cast<int>(sizeof(T));
    stage_tile<G::kN, G::kK>(tiles, S::kLdQ, x_b, row_begin, a.samples, k0, a.slices, a.x_vec);
    __pipeline_commit();
    int buffer = 0;
    for (int64_t n0 = row_begin; n0 < row_end; n0 += G::kN) {
      __pipeline_wait_prior(0);
      __syncthreads();  // tile n0 landed for every thread; the previous tile's readers are done
      if (n0 + G::kN < row_end)
        stage_tile<G::kN, G::kK>(tiles + (buffer ^ 1) * kTileElems, S::kLdQ, x_b, n0 + G::kN, a.samples, k0,
                                 a.slices, a.x_vec);
      __pipeline_commit();
      const T* q = tiles + buffer * kTileElems;
      accumulate_tile<TILE, WEIGHTED>([&](int row) { return to_float(q[row * S::kLdQ + col]); },
                                      WEIGHTED ? a.weights + b * a.samples + n0 : nullptr,
                                      static_cast<int>(min(static_cast<int64_t>(G::kN), row_end - n0)), a.delta,
                                      j_first, sum_cos, sum_sin, zero_terms);
      buffer ^= 1;
    }
  } else {
    float* p = reinterpret_cast<float*>(smem + L::kPOffset);
    Projection<T, TILE, MODE> projection{smem, p, x_b, static_cast<const T*>(a.directions), a.samples, a.dim,
                                         a.slices, k0, a.x_vec, a.directions_vec};
    projection.first_stage(row_begin);
    for (int64_t n0 = row_begin; n0 < row_end; n0 += G::kN) {
      projection.run(n0, n0 + G::kN < row_end ? n0 + G::kN : -1);
      accumulate_tile<TILE, WEIGHTED>([&](int row) { return product_value<TILE>(p, row, col); },
                                      WEIGHTED ? a.weights + b * a.samples + n0 : nullptr,
                                      static_cast<int>(min(static_cast<int64_t>(G::kN), row_end - n0)), a.delta,
                                      j_first, sum_cos, sum_sin, zero_terms);
    }
  }

  // The lanes of a column add their sums (every lane takes part in the shuffles).
  zero_terms = column_sum<G::kRowGroups>(zero_terms);
#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) {
    sum_cos[q] = column_sum<G::kRowGroups>(sum_cos[q]);
    sum_sin[q] = column_sum<G::kRowGroups>(sum_sin[q]);
  }
  // The statistic kernel's arrival counter, zeroed here because this kernel always
  // runs first: one store instead of a memset launch.
  if (a.arrivals != nullptr && linear == 0 && threadIdx.x == 0) *a.arrivals = 0u;
  const int64_t k = k0 + col;
  if (k >= a.slices) return;
  const int rg = G::row_group();
  float* out_cos = a.partials + ((b * a.splits + split) * 2 * a.slices + k) * a.knots;
  float* out_sin = out_cos + a.slices * a.knots;
#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) {
    const int j = j_first + q;
    if (q % G::kRowGroups == rg && j < a.knots) {
      out_cos[j] = sum_cos[q];
      out_sin[j] = sum_sin[q];
    }
  }
  if (pass == 0 && rg == 0) {  // knot 0: cos(0 p) - 1 = 0 p, sin(0 p) = 0 p (weighted: sum w (0 p))
    out_cos[0] = zero_terms;
    out_sin[0] = zero_terms;
  }
}

// stat[b, k] and coef[b, :, k, :] for block (b, group of slices_per_block slices):
// sums over the splits in double, in split order; then, per slice, the statistic
// (clipped) and d loss / d sums, all in double, rounded once. Then the loss: the
// block's statistics summed in slice order (double) to block_sums, and the block
// that arrives last sums block_sums in block order (a fixed order, whichever block
// that is) and resets the counter for the next call. With moments (W1 = sum w,
// W2 = sum w^2 of b's weights): the means divide by W1, the statistic's N is the
// effective sample size W1^2 / W2, and a batch index with W1 = 0 (no weight at
// all) has stat 0 and coef 0, not the NaN of 0 / 0.
__global__ void __launch_bounds__(kStatisticThreads) statistic_kernel(StatisticArgs a) {
  constexpr int kKeptOffset = kStatisticCache * sizeof(double);
  constexpr int kValuesOffset = kKeptOffset + kStatisticSlices * sizeof(float);
  constexpr int kLastOffset = kValuesOffset + kStatisticSlices * sizeof(float);
  static_assert(kStatisticThreads <= kStatisticCache, "the loss's tree reduction reuses the cache");
  __shared__ __align__(16) unsigned char smem[kLastOffset + sizeof(int)];
  double* cache = reinterpret_cast<double*>(smem);
  float* kept = reinterpret_cast<float*>(smem + kKeptOffset);      // 1: the slice's statistic is kept
  float* values = reinterpret_cast<float*>(smem + kValuesOffset);  // the statistics as written to stat
  int* last = reinterpret_cast<int*>(smem + kLastOffset);          // this block arrived last
  const int64_t groups = (a.slices + a.slices_per_block - 1) / a.slices_per_block;
  const int64_t linear = a.block_offset + blockIdx.x;
  const int64_t b = linear / groups, k0 = linear % groups * a.slices_per_block;
  const int64_t count = min(a.slices_per_block, a.slices - k0), per_part = count * a.knots;
  const int64_t split_stride = 2 * a.slices * a.knots;
  // Unweighted: `samples` rows of weight 1 (total = size, so gain = 1 exactly and
  // the products below are the unweighted ones bit for bit).
  double total = static_cast<double>(a.samples), size = total;
  bool empty = false;
  if (a.moments != nullptr) {
    const float w1 = a.moments[2 * b], w2 = a.moments[2 * b + 1];
    total = w1;
    // In float, as the contract and the Triton kernel form it: one weighted row gives exactly
    // w1 * w1 == w2, so N = 1 (no pair: NaN below) whatever the weight's rounding.
    size = static_cast<double>(w1 * w1 / w2);
    empty = w1 == 0.0f;
  }
  const double gain = size / total;  // d stat / d sums = gain * 2 w_j (mean - phi_m1), resp. gain * 2 w_j mean
  // The U-statistic: each knot's term less q (1 - C_j^2 - S_j^2), q = 1 / (N - 1), NaN where N <= 1
  // (no pair of samples); 1 - C^2 - S^2 = -u (2 + u) - S^2 with u = C - 1, no cancellation. (One
  // double more: a second accumulator would spill.)
  const double q = !a.unbiased ? 0.0 : size > 1.0 ? 1.0 / (size - 1.0) : std::numeric_limits<double>::quiet_NaN();
  // Element e of the group: part (cos 0, sin 1) e / per_part, slice k0 + r / knots, knot r % knots.
  auto sum_of = [&](int64_t e) {
    const int64_t part = e / per_part, r = e % per_part;
    const float* from = a.partials + b * a.splits * split_stride + part * a.slices * a.knots + k0 * a.knots + r;
    double sum = 0.0;
#pragma unroll 8
    for (int64_t s = 0; s < a.splits; ++s) sum += static_cast<double>(from[s * split_stride]);
    return sum;
  };
  // The trapezoid weight times the window (SPEC §1), and phi - 1 = expm1(-t^2 / 2): the
  // partials are sums of cos - 1, so C - phi = mean(cos - 1) - (phi - 1), both terms
  // with their digits where C and phi are both near 1.
  auto weight = [&](int64_t j, double* phi_m1) {
    const double t = static_cast<double>(j) * a.delta;
    const double x = -0.5 * t * t, phi = exp(x);
    // expm1 by its series where exp - 1 would cancel (error < x^5 / 120), exp - 1 elsewhere: one
    // transcendental call (exp and expm1 both: the kernel spills). phi itself from exp, not as
    // 1 + (phi - 1), which keeps no digits where phi is tiny (large t).
    *phi_m1 = x > -1e-3 ? x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0)))) : phi - 1.0;
    return (j == 0 || j == a.knots - 1 ? a.delta : 2.0 * a.delta) * phi;
  };
  if (a.cached) {
    for (int64_t e = threadIdx.x; e < 2 * per_part; e += kStatisticThreads) cache[e] = sum_of(e);
    __syncthreads();
  }
  if (threadIdx.x < count) {
    const int64_t kk = threadIdx.x;
    double sum = 0.0;
    for (int64_t j = 0; j < a.knots; ++j) {
      const int64_t e = kk * a.knots + j;
      const double u = (a.cached ? cache[e] : sum_of(e)) / total;  // mean of cos - 1
      const double s = (a.cached ? cache[per_part + e] : sum_of(per_part + e)) / total;
      double phi_m1;
      const double w = weight(j, &phi_m1);
      double term = (u - phi_m1) * (u - phi_m1) + s * s;
      if (a.unbiased) term -= q * (-u * (2.0 + u) - s * s);
      sum += w * term;
    }
    const float stat = empty ? 0.0f : static_cast<float>(size * sum);
    const bool keep = !(a.clip && stat < a.clip_value);  // a NaN statistic stays NaN, as in the reference
    a.stat[b * a.slices + k0 + kk] = keep ? stat : 0.0f;
    values[kk] = keep ? stat : 0.0f;
    kept[kk] = keep ? 1.0f : 0.0f;
  }
  __syncthreads();
  unsigned int ticket = 0;
  if (threadIdx.x == 0) {  // the ticket is drawn early: its round trip overlaps the coef loop
    double block_sum = 0.0;
    for (int64_t kk = 0; kk < count; ++kk) block_sum += static_cast<double>(values[kk]);
    a.block_sums[linear] = block_sum;
    __threadfence();  // block_sum is visible device-wide before the ticket counts this block
    ticket = atomicAdd(a.arrivals, 1u);
  }
  for (int64_t e = threadIdx.x; e < 2 * per_part; e += kStatisticThreads) {
    const int64_t part = e / per_part, r = e % per_part, kk = r / a.knots, j = r % a.knots;
    const double mean = (a.cached ? cache[e] : sum_of(e)) / total;
    double phi_m1;
    const double w = weight(j, &phi_m1);
    double d = part == 0 ? mean - phi_m1 : mean;
    if (a.unbiased) d += q * (part == 0 ? 1.0 + mean : mean);  // the U-statistic's q (C_j, S_j)
    const double d_sum = 2.0 * w * d;  // d stat / d sum, over gain
    const double coef = a.factor * d_sum * gain * static_cast<double>(kept[kk]);  // NaN stays NaN when clipped
    a.coef[(b * 2 + part) * a.slices * a.knots + k0 * a.knots + r] = empty ? 0.0f : static_cast<float>(coef);
  }
  if (threadIdx.x == 0) *last = ticket == static_cast<unsigned int>(a.blocks - 1) ? 1 : 0;
  __syncthreads();  // *last is set, and the cache is free: the coef loop is done with it
  if (*last == 0) return;
  // The last block: every block's sum is in block_sums (each fenced it before its
  // ticket; this fence orders the reads after the ticket). __ldcg reads L2, not a
  // stale L1 line. Thread t sums blocks t, t + 256, ... in order, then a tree.
  __threadfence();
  double* partial = cache;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < a.blocks; i += kStatisticThreads) sum += __ldcg(a.block_sums + i);
  partial[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (unsigned int width = kStatisticThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    a.loss[0] = static_cast<float>(partial[0] / a.loss_divisor);
    *a.arrivals = 0u;  // left as found: the op does not mutate its counter
  }
}

// G[b, n0 : n0 + block_n, k0 : k0 + block_k] for block (b, row tile, slice tile).
// WEIGHTED: G at p = 0 on rows of weight 0 (whatever x holds), times the row's
// weight w: the rotation is linear, so starting it from w (cos, sin) gives every
// knot's term times w (two multiplies per row, and w is dead before the knot loop).
template <typename T, Tile TILE, Mode MODE, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads, kGradientMinBlocks) slice_gradient_kernel(GradientArgs a) {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  using L = GradientSmem<T, TILE, MODE, WEIGHTED>;
  using Out = typename std::conditional<L::kProjected || sizeof(T) != 4, T, float>::type;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const int64_t linear = a.block_offset + blockIdx.x;
  const int64_t kt = linear % a.k_tiles, nt = linear / a.k_tiles % a.n_tiles, b = linear / a.k_tiles / a.n_tiles;
  const int64_t n0 = nt * G::kN, k0 = kt * G::kK;
  const int valid = static_cast<int>(min(static_cast<int64_t>(G::kN), a.samples - n0));
  const int64_t row_length = L::kProjected ? a.slices : a.dim;
  const T* x_b = static_cast<const T*>(a.x) + b * a.samples * row_length;
  const int col = G::col(), rg = G::row_group();
  float* w_tile = reinterpret_cast<float*>(smem + L::kWeightsOffset);  // (WEIGHTED only)
  if constexpr (WEIGHTED) {  // visible after the barrier that ends the tile's copy or product below
    const int row = static_cast<int>(threadIdx.x);  // block_n <= kThreads rows
    if (row < valid) w_tile[row] = a.weights[b * a.samples + n0 + row];
  }
  float* acc = reinterpret_cast<float*>(smem + L::kAccOffset);
  Out* g_tile = reinterpret_cast<Out*>(smem + L::kGOffset);

  if constexpr (L::kProjected) {
    stage_tile<G::kN, G::kK>(reinterpret_cast<T*>(smem), S::kLdQ, x_b, n0, a.samples, k0, a.slices, a.x_vec);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
  } else {
    Projection<T, TILE, MODE> projection{smem, reinterpret_cast<float*>(smem + L::kPOffset), x_b,
                                         static_cast<const T*>(a.directions), a.samples, a.dim, a.slices, k0,
                                         a.x_vec, a.directions_vec};
    projection.first_stage(n0);
    projection.run(n0, -1);
  }
  auto read = [&](int row) {
    if constexpr (L::kProjected) {
      return to_float(reinterpret_cast<const T*>(smem)[row * S::kLdQ + col]);
    } else {
      return product_value<TILE>(reinterpret_cast<const float*>(smem + L::kPOffset), row, col);
    }
  };

  const int64_t k = k0 + col;
  if (k < a.slices) {
    const float scale = a.scale[b * a.scale_stride_b + k * a.scale_stride_k];
    const float* coef_cos = a.coef + ((b * 2 + 1) * a.slices + k) * a.knots;  // d loss / d sum of sin: times cos
    const float* coef_sin = a.coef + ((b * 2) * a.slices + k) * a.knots;      // d loss / d sum of cos: times -sin
    for (int64_t pass = 0; pass < a.passes; ++pass) {
      const int j_first = 1 + static_cast<int>(pass) * kKnotsPerPass;
      const float t_first = static_cast<float>(j_first) * a.delta;
      const bool last = pass + 1 == a.passes;
      float w_cos[kKnotsPerPass], w_sin[kKnotsPerPass];  // this column's coefficients, once per block and pass
#pragma unroll
      for (int q = 0; q < kKnotsPerPass; ++q) {
        const int j = j_first + q;
        const float t = static_cast<float>(j) * a.delta;
        w_cos[q] = j < a.knots ? scale * (t * coef_cos[j]) : 0.0f;
        w_sin[q] = j < a.knots ? -(scale * (t * coef_sin[j])) : 0.0f;
      }
#pragma unroll 2
      for (int i = 0; i < G::kRowsPerThread; ++i) {
        const int row = rg + G::kRowGroups * i;
        if (row >= valid) break;
        float p = read(row), w = 1.0f;
        if constexpr (WEIGHTED) {
          w = w_tile[row];
          p = w > 0.0f ? p : 0.0f;
        }
        float s1, c1, s, c;
        sincos_accurate(a.delta * p, &s1, &c1);
        if (j_first == 1) {
          s = s1;
          c = c1;
        } else {
          sincos_accurate(t_first * p, &s, &c);
        }
        if constexpr (WEIGHTED) {
          s *= w;
          c *= w;
        }
        float g_cos = 0.0f, g_sin = 0.0f;
#pragma unroll
        for (int q = 0; q < kKnotsPerPass; ++q) {
          g_cos = fmaf(w_cos[q], c, g_cos);
          g_sin = fmaf(w_sin[q], s, g_sin);
          if (q + 1 < kKnotsPerPass) rotate(c, s, c1, s1);
        }
        float g = g_cos + g_sin;
        if (pass > 0) g += acc[row * G::kLdP + col];
        if (last) {
          g_tile[row * L::kLdG + col] = from_float<Out>(g);
        } else {
          acc[row * G::kLdP + col] = g;
        }
      }
    }
  }
  __syncthreads();

  // The tile to G, 16 bytes per store where the rows allow it.
  T* g_out = static_cast<T*>(a.g) + (b * a.samples + n0) * a.slices + k0;
  if (a.g_vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T)), kPerRow = G::kK / kVec;
    for (int e = threadIdx.x; e < G::kN * kPerRow; e += kThreads) {
      const int r = e / kPerRow, c = e % kPerRow * kVec;
      if (r < valid && k0 + c < a.slices)
        __stcg(reinterpret_cast<uint4*>(g_out + r * a.slices + c),
               *reinterpret_cast<const uint4*>(g_tile + r * L::kLdG + c));
    }
  } else {
    for (int e = threadIdx.x; e < G::kN * G::kK; e += kThreads) {
      const int r = e / G::kK, c = e % G::kK;
      if (r < valid && k0 + c < a.slices) g_out[r * a.slices + c] = g_tile[r * L::kLdG + c];
    }
  }
}

unsigned int u32(int64_t v) { return static_cast<unsigned int>(v); }

// Launches `blocks` blocks of a 1-D grid, at most max_grid_x per launch.
template <typename Args, typename Launch>
cudaError_t launch_blocks(int64_t blocks, Args& args, int64_t max_grid_x, Launch launch) {
  for (int64_t first = 0; first < blocks; first += max_grid_x) {
    args.block_offset = first;
    launch(u32(blocks - first < max_grid_x ? blocks - first : max_grid_x));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The weighted instance where the caller passes weights, the unweighted one otherwise.
template <typename T, Tile TILE, Mode MODE>
cudaError_t partials_instance(const PartialsPlan& plan, PartialsArgs& a, cudaStream_t stream, int64_t max_grid) {
  return launch_blocks(plan.blocks, a, max_grid, [&](unsigned int blocks) {
    if (a.weights != nullptr) {
      ecf_partials_kernel<T, TILE, MODE, true><<<dim3(blocks), dim3(kThreads), 0, stream>>>(a);
    } else {
      ecf_partials_kernel<T, TILE, MODE, false><<<dim3(blocks), dim3(kThreads), 0, stream>>>(a);
    }
  });
}

template <typename T, Tile TILE, Mode MODE>
cudaError_t gradient_instance(const GradientPlan& plan, GradientArgs& a, cudaStream_t stream, int64_t max_grid) {
  return launch_blocks(plan.blocks, a, max_grid, [&](unsigned int blocks) {
    if (a.weights != nullptr) {
      slice_gradient_kernel<T, TILE, MODE, true><<<dim3(blocks), dim3(kThreads), 0, stream>>>(a);
    } else {
      slice_gradient_kernel<T, TILE, MODE, false><<<dim3(blocks), dim3(kThreads), 0, stream>>>(a);
    }
  });
}

// Calls Instance::run<T, TILE, MODE>(args...) for the run-time dtype, tile and mode.
template <typename Instance, typename T, Tile TILE, typename... Args>
cudaError_t dispatch_mode(Mode mode, Args&... args) {
  switch (mode) {
    case Mode::kTensorCores:
      return Instance::template run<T, TILE, Mode::kTensorCores>(args...);
    case Mode::kFma:
      return Instance::template run<T, TILE, Mode::kFma>(args...);
    case Mode::kProjected:
      return Instance::template run<T, TILE, Mode::kProjected>(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename Instance, typename T, typename... Args>
cudaError_t dispatch_tile(Tile tile, Mode mode, Args&... args) {
  return tile == Tile::kBig ? dispatch_mode<Instance, T, Tile::kBig>(mode, args...)
                            : dispatch_mode<Instance, T, Tile::kSmall>(mode, args...);
}

template <typename Instance, typename... Args>
cudaError_t dispatch(DType dtype, Tile tile, Mode mode, Args&... args) {
  switch (dtype) {
    case DType::kFloat32:
      return dispatch_tile<Instance, float>(tile, mode, args...);
    case DType::kFloat16:
      return dispatch_tile<Instance, __half>(tile, mode, args...);
    case DType::kBFloat16:
      return dispatch_tile<Instance, __nv_bfloat16>(tile, mode, args...);
  }
  return cudaErrorInvalidValue;
}

struct PartialsInstance {
  template <typename T, Tile TILE, Mode MODE>
  static cudaError_t run(const PartialsPlan& plan, PartialsArgs& a, cudaStream_t& stream, int64_t& max_grid) {
    return partials_instance<T, TILE, MODE>(plan, a, stream, max_grid);
  }
};

struct GradientInstance {
  template <typename T, Tile TILE, Mode MODE>
  static cudaError_t run(const GradientPlan& plan, GradientArgs& a, cudaStream_t& stream, int64_t& max_grid) {
    return gradient_instance<T, TILE, MODE>(plan, a, stream, max_grid);
  }
};

}  // namespace

cudaError_t launch_ecf_partials(const PartialsPlan& plan, PartialsArgs args, DType dtype, Mode mode,
                                cudaStream_t stream, int64_t max_grid_x) {
  return dispatch<PartialsInstance>(dtype, plan.tile, mode, plan, args, stream, max_grid_x);
}

cudaError_t launch_statistic(const StatisticPlan& plan, StatisticArgs args, cudaStream_t stream,
                             int64_t max_grid_x) {
  if (plan.blocks > int64_t{0xFFFFFFFF} || args.blocks != plan.blocks) return cudaErrorInvalidValue;  // 32-bit tickets
  return launch_blocks(plan.blocks, args, max_grid_x, [&](unsigned int blocks) {
    statistic_kernel<<<dim3(blocks), dim3(kStatisticThreads), 0, stream>>>(args);
  });
}

cudaError_t launch_slice_gradient(const GradientPlan& plan, GradientArgs args, DType dtype, Mode mode,
                                  cudaStream_t stream, int64_t max_grid_x) {
  return dispatch<GradientInstance>(dtype, plan.tile, mode, plan, args, stream, max_grid_x);
}

}  // namespace cuda
}  // namespace sigreg
