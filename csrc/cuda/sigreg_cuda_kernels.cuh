// Torch-free interface of the SIGReg CUDA kernels: raw pointers, sizes and a
// stream, and the launch plans (tiles, grids, row splits) as plain host C++,
// so the tests run them without a GPU and sigreg_kernels/cuda_plan.py mirrors
// them for the fake kernels and the cost model (a test checks they agree).
//
// The kernels are those of sigreg_kernels/primitives.py, each one launch:
//   ecf_partials    x [B, N, D] (+ directions [D, K], or none: P = x, K = D)
//                   -> partials [B, S, 2, K, T] float
//   statistic       partials -> stat [B, K], coef [B, 2, K, T] float, and the
//                   reduced loss (a float scalar), with the arrival counter that
//                   ecf_partials zeroes (unsigned int, one element)
//   slice_gradient  coef, scale [B, K] (any strides), x (+ directions) -> G [B, N, K]
//                   in x's type; with no directions G may overwrite x (slice_gradient_).
// Sample weights (optional): ecf_partials and slice_gradient take float weights
// [B, N] (a row of weight 0 counts as P = 0, whatever x holds), statistic their
// moments [B, 2] (sum w, sum w^2); a null pointer means no weights. The weighted
// kernels are instances of their own (a template flag), so the unweighted ones
// compile exactly as without weights.
// x, directions, weights, partials and coef are contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sigreg {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// How a kernel gets its projection tile: a WMMA product over the features
// (16-bit inputs, TF32 for float), exact float FMAs, or read from x (no directions).
enum class Mode { kTensorCores, kFma, kProjected };

// Output tiles (rows x slices) of the ecf_partials and slice_gradient kernels.
enum class Tile { kSmall, kBig };

enum class Reduction { kMean, kSum, kNone };

constexpr int kThreads = 256;               // ecf_partials and slice_gradient blocks
constexpr int kKnotsPerPass = 16;           // knots a thread keeps in registers (1..16 for the default 17)
constexpr int64_t kMaxRowsPerSplit = 256;   // ecf_partials: bounds the float sums each thread keeps
constexpr int64_t kMinWaves = 2;            // the grids fill every SM at least twice (see the .cu file)
constexpr int64_t kSplitSearch = 256;       // ecf_partials: row splits the plan tries beyond the fewest
constexpr int64_t kMaxGridX = 2147483647;   // the hardware's cap on gridDim.x
constexpr int kStatisticThreads = 256;
constexpr int kStatisticSlices = 32;        // slices per statistic block, at most
constexpr int kStatisticCache = 2048;       // doubles of shared memory caching a block's sums

struct TileShape {
  int block_n, block_k;
};
constexpr TileShape tile_shape(Tile tile) { return tile == Tile::kBig ? TileShape{64, 64} : TileShape{32, 32}; }

// Blocks per SM of the kernel instances on sm_90a, [projected][tile]: the
// largest over the instances of a kernel (so the waves the plans count are
// never more than the real ones). __launch_bounds__ caps the registers:
// ecf_partials 2 blocks of 256 threads (128 registers), slice_gradient 3 (80);
// every instance has more than 80 (ecf_partials), resp. 65 (slice_gradient)
// registers, and little enough shared memory, to make these exact. Each
// instance's registers and shared memory are listed in sigreg_kernels/cuda_plan.py
// (RESOURCES); tests/test_cuda_compile.py checks both against ptxas.
constexpr int kPartialsBlocksPerSm[2][2] = {{2, 2}, {2, 2}};
constexpr int kGradientBlocksPerSm[2][2] = {{3, 3}, {3, 3}};
constexpr int kPartialsMinBlocks = 2, kGradientMinBlocks = 3;  // the __launch_bounds__

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The problem as the kernels see it; slices = dim when projected.
struct Problem {
  int64_t batch, samples, dim, slices, knots;
  float delta;  // knot spacing t_max / (knots - 1)
};

inline int64_t knot_passes(int64_t knots) { return ceil_div(knots - 1, kKnotsPerPass); }

// The big tile where its grid alone fills the machine kMinWaves times, else the small one.
inline Tile choose_tile(int64_t tile_blocks_big, int blocks_per_sm_big, int64_t num_sms) {
  return tile_blocks_big >= kMinWaves * num_sms * blocks_per_sm_big ? Tile::kBig : Tile::kSmall;
}

// ecf_partials: block (b, knot pass, row split s, slice tile), one 1-D grid in that
// order (slice tile fastest); each block sums rows [s R, min((s + 1) R, N)) of its
// slice tile in tiles of block_n rows. S is free: at least kMinWaves waves (and
// R <= kMaxRowsPerSplit), and among up to twice that many splits (kSplitSearch
// more at most) the one with the fewest rows x rounds of blocks (ceil(waves)),
// so the last wave is a full one.
struct PartialsPlan {
  Tile tile;
  int64_t k_tiles, passes, splits, rows_per_split, blocks, launches;
};
inline PartialsPlan plan_ecf_partials(int64_t batch, int64_t samples, int64_t slices, int64_t knots,
                                      bool projected, int64_t num_sms, int64_t max_grid_x = kMaxGridX) {
  const int64_t batch1 = batch > 0 ? batch : 1, passes = knot_passes(knots);
  const int64_t big_blocks = batch1 * passes * ceil_div(samples, 64) * ceil_div(slices, 64);
  const Tile tile = choose_tile(big_blocks, kPartialsBlocksPerSm[projected][int(Tile::kBig)], num_sms);
  const int64_t k_tiles = ceil_div(slices, tile_shape(tile).block_k), other = batch1 * passes * k_tiles;
  const int64_t wave = num_sms * kPartialsBlocksPerSm[projected][int(tile)];
  int64_t lowest = ceil_div(kMinWaves * wave, other), fewest = ceil_div(samples, kMaxRowsPerSplit);
  lowest = lowest > fewest ? lowest : fewest;
  lowest = lowest < samples ? lowest : samples;
  int64_t best_rows = ceil_div(samples, lowest), best_cost = -1;
  const int64_t last = lowest + (lowest < kSplitSearch ? lowest : kSplitSearch);  // (many waves: rounding is moot)
  for (int64_t splits = lowest; splits <= last && splits <= samples; ++splits) {
    const int64_t rows = ceil_div(samples, splits);
    if (ceil_div(samples, rows) != splits) continue;  // the same rows as fewer splits
    const int64_t cost = ceil_div(other * splits, wave) * rows;
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best_rows = rows;
  }
  const int64_t splits = ceil_div(samples, best_rows), blocks = other * splits;
  return {tile, k_tiles, passes, splits, best_rows, blocks, ceil_div(blocks, max_grid_x)};
}

// slice_gradient: block (b, row tile, slice tile), one 1-D grid in that order.
struct GradientPlan {
  Tile tile;
  int64_t n_tiles, k_tiles, passes, blocks, launches;
};
inline GradientPlan plan_slice_gradient(int64_t batch, int64_t samples, int64_t slices, int64_t knots,
                                        bool projected, int64_t num_sms, int64_t max_grid_x = kMaxGridX) {
  const int64_t big_blocks = batch * ceil_div(samples, 64) * ceil_div(slices, 64);
  const Tile tile = choose_tile(big_blocks, kGradientBlocksPerSm[projected][int(Tile::kBig)], num_sms);
  const TileShape shape = tile_shape(tile);
  const int64_t n_tiles = ceil_div(samples, shape.block_n), k_tiles = ceil_div(slices, shape.block_k);
  const int64_t blocks = batch * n_tiles * k_tiles;
  return {tile, n_tiles, k_tiles, knot_passes(knots), blocks, ceil_div(blocks, max_grid_x)};
}

// statistic: block (b, group of slices_per_block slices), about one (slice, knot,
// cos or sin) per thread, so even small K gives many blocks; the block's sums over
// the splits stay in shared memory (cached) when 2 * slices_per_block * T doubles fit.
struct StatisticPlan {
  int64_t slices_per_block, blocks, launches;
  bool cached;
};
inline StatisticPlan plan_statistic(int64_t batch, int64_t slices, int64_t knots, int64_t max_grid_x = kMaxGridX) {
  int64_t per_block = kStatisticThreads / (2 * knots);
  per_block = per_block < 1 ? 1 : (per_block > kStatisticSlices ? kStatisticSlices : per_block);
  const int64_t blocks = batch * ceil_div(slices, per_block);
  return {per_block, blocks, ceil_div(blocks, max_grid_x), 2 * per_block * knots <= kStatisticCache};
}

// Why the kernels cannot take this problem (they index rows, slices and
// features with int), or nullptr. Expects samples, slices >= 1, dim >= 0, knots >= 2.
inline const char* unsupported_reason(const Problem& p) {
  const int64_t limit = (int64_t{1} << 31) - 1 - 1024;
  if (p.samples > limit || p.dim > limit || p.slices > limit || p.knots > limit)
    return "N, D, K and knots must each be below 2^31 - 1024 on CUDA";
  return nullptr;
}

// Each returns the first launch error (cudaGetLastError), or cudaSuccess.
// x_vec / directions_vec / out_vec: the pointer is 16-byte aligned and its rows
// are whole 16-byte vectors (the kernels then load and store 16 bytes at a time).
struct PartialsArgs {
  const void* x;           // [B, N, D], or the projection [B, N, K] (Mode::kProjected)
  const void* directions;  // [D, K] (unused when projected)
  const float* weights;    // [B, N] sample weights, or nullptr
  float* partials;         // [B, S, 2, K, T]
  int64_t batch, samples, dim, slices, knots;
  float delta;
  int64_t k_tiles, passes, splits, rows_per_split;
  bool x_vec, directions_vec;
  unsigned int* arrivals;  // set to 0 by block 0 (one store), or nullptr: statistic's arrival counter
  int64_t block_offset;    // first block of this launch
};
cudaError_t launch_ecf_partials(const PartialsPlan& plan, PartialsArgs args, DType dtype, Mode mode,
                                cudaStream_t stream, int64_t max_grid_x = kMaxGridX);

struct StatisticArgs {
  const float* partials;  // [B, S, 2, K, T]
  float* stat;            // [B, K]
  float* coef;            // [B, 2, K, T]
  // moments [B, 2] (sum w, sum w^2) of sample weights, or nullptr (samples rows of weight 1).
  const float* moments;
  int64_t batch, splits, slices, knots, samples;
  double delta, factor;   // factor: d loss / d stat of each slice (grad_factor / (B K) for a mean)
  bool clip;
  float clip_value;
  int64_t slices_per_block;
  bool cached;
  // The loss: each block's sum of its statistics to block_sums[block] (plan.blocks
  // doubles, uninitialized); the block that draws the last ticket from arrivals
  // (holding 0; left at 0) writes loss[0] = their sum / loss_divisor, in block order.
  double* block_sums;
  unsigned int* arrivals;
  float* loss;
  double loss_divisor;  // B K for a mean, 1 for a sum
  int64_t blocks;     // plan.blocks: over all launches
  int64_t block_offset;
  bool unbiased;      // the U-statistic (sigreg_kernels/primitives.py)
};
// cudaErrorInvalidValue past 2^32 - 1 blocks (the arrival counter's range) or if args.blocks != plan.blocks.
cudaError_t launch_statistic(const StatisticPlan& plan, StatisticArgs args, cudaStream_t stream,
                             int64_t max_grid_x = kMaxGridX);

struct GradientArgs {
  const float* coef;   // [B, 2, K, T]
  const float* scale;  // [B, K] with strides scale_stride_b, scale_stride_k (elements)
  int64_t scale_stride_b, scale_stride_k;
  const void* x;           // [B, N, D], or the projection [B, N, K] (Mode::kProjected)
  const void* directions;  // [D, K] (unused when projected)
  const float* weights;    // [B, N] sample weights (G times w), or nullptr
  void* g;                 // [B, N, K] in x's type; may be x itself when projected
  int64_t batch, samples, dim, slices, knots;
  float delta;
  int64_t n_tiles, k_tiles, passes;
  bool x_vec, directions_vec, g_vec;
  int64_t block_offset;
};
cudaError_t launch_slice_gradient(const GradientPlan& plan, GradientArgs args, DType dtype, Mode mode,
                                  cudaStream_t stream, int64_t max_grid_x = kMaxGridX);

}  // namespace cuda
}  // namespace sigreg
