// Torch-free interface of the SIGReg CUDA kernels: raw pointers, sizes and a
// stream. The launch plans (grids, chunking, workspace sizes) are plain host
// C++ here so they can be unit-tested without a GPU (tests/test_cuda_compile.py).
//
// Layouts (all contiguous): x [B, N, D] and directions [D, K] in the input type;
// sums and grad_sums [B, 2, K, knots] float; grad_x [B, N, D] and
// grad_directions [D, K] in the input type.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sigreg {
namespace cuda {

constexpr int kThreads = 256;      // threads of every block
constexpr int kTile = 64;          // rows (samples), slices, and features of an output tile
constexpr int kDepth = 32;         // features per step of the projection product
constexpr int kKnotsPerPass = 16;  // knots a forward block keeps in registers (knots 1..16 for the default 17)
constexpr int kOutSubTiles = 4;    // 64-feature output tiles per backward block: 256 features
constexpr int64_t kOutColumns = static_cast<int64_t>(kOutSubTiles) * kTile;
constexpr int64_t kTargetBlocks = 1024;        // forward: enough blocks to fill any current GPU a few times
constexpr int64_t kTargetGradDirBlocks = 512;  // grad_directions: fewer, each chunk costs a D x K workspace
constexpr int64_t kMaxGradDirChunks = 16;
constexpr int64_t kMaxGridYZ = 65535;

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct Problem {
  int64_t batch, samples, dim, slices, knots;
  float delta;  // knot spacing t_max / (knots - 1)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `tiles` in contiguous, non-empty chunks of equal length (the last may be shorter),
// about `wanted` of them. A function of the shapes only, so reruns sum in the same order.
struct Chunking {
  int64_t chunks, tiles_per_chunk;
};
inline Chunking split_tiles(int64_t tiles, int64_t wanted) {
  wanted = wanted < 1 ? 1 : (wanted > tiles ? tiles : wanted);
  const int64_t per_chunk = ceil_div(tiles, wanted);
  return {ceil_div(tiles, per_chunk), per_chunk};
}

// Batch indices per launch where grid z carries the batch (times `per_index`
// blocks): a larger batch takes several launches, each told its first index.
// `max_grid_yz` is the hardware's cap; the tests lower it.
inline int64_t batch_per_launch(int64_t per_index, int64_t max_grid_yz) {
  const int64_t n = max_grid_yz / per_index;
  return n > 1 ? n : 1;
}

// Forward: block (k tile, chunk of sample tiles, b * passes + pass) for the batch
// indices of one launch; each block writes partial sums of its chunk to workspace
// [chunks, B, 2, K, knots], which a second kernel adds up in a fixed order (no
// atomics: bit-identical reruns).
struct ForwardPlan {
  int64_t k_tiles, chunks, tiles_per_chunk, passes, workspace_floats, batch_per_launch;
};
inline ForwardPlan plan_forward(const Problem& p, int64_t max_grid_yz = kMaxGridYZ) {
  const int64_t k_tiles = ceil_div(p.slices, kTile);
  const int64_t passes = ceil_div(p.knots - 1, kKnotsPerPass);
  const int64_t other_blocks = k_tiles * p.batch * passes;  // 0 only for an empty batch, which launches nothing
  const int64_t wanted = ceil_div(kTargetBlocks, other_blocks > 0 ? other_blocks : 1);
  const Chunking c = split_tiles(ceil_div(p.samples, kTile), wanted);
  return {k_tiles,     c.chunks, c.tiles_per_chunk, passes, c.chunks * p.batch * 2 * p.slices * p.knots,
          batch_per_launch(passes, max_grid_yz)};
}

// Backward: a small kernel turns grad_sums into the knot coefficient table
// [B, knots, K] of float2 (coef_floats); then grad_x blocks (sample tile,
// 256-feature chunk, b) loop over all slices, so grad_x is written once, with
// no workspace (batch_per_launch indices per launch). With grad_directions,
// blocks (k tile, 256-feature chunk, chunk of (b, sample tile) pairs) write
// partial products to a workspace [chunks, D, K] (directions_floats), added up
// in a fixed order.
struct BackwardPlan {
  int64_t coef_floats, n_tiles, d_chunks, batch_per_launch;     // grad_x
  int64_t k_tiles, chunks, tiles_per_chunk, directions_floats;  // grad_directions (0 if not needed)
};
inline BackwardPlan plan_backward(const Problem& p, bool need_grad_directions, int64_t max_grid_yz = kMaxGridYZ) {
  BackwardPlan plan{2 * p.batch * p.knots * p.slices, ceil_div(p.samples, kTile), ceil_div(p.dim, kOutColumns),
                    batch_per_launch(1, max_grid_yz), ceil_div(p.slices, kTile), 0, 0, 0};
  if (need_grad_directions) {
    int64_t wanted = ceil_div(kTargetGradDirBlocks, plan.k_tiles * (plan.d_chunks > 0 ? plan.d_chunks : 1));
    wanted = wanted < kMaxGradDirChunks ? wanted : kMaxGradDirChunks;
    const Chunking c = split_tiles(p.batch * plan.n_tiles, wanted);
    plan.chunks = c.chunks;
    plan.tiles_per_chunk = c.tiles_per_chunk;
    plan.directions_floats = c.chunks * p.dim * p.slices;
  }
  return plan;
}

// Why the kernels cannot take this problem (they index tiles with int and use
// grid y/z), or nullptr. Expects batch, samples, slices >= 1, dim >= 0, knots >= 2.
inline const char* unsupported_reason(const Problem& p) {
  const int64_t int_limit = (int64_t{1} << 31) - 1 - 2 * kOutColumns;
  if (p.samples > int_limit || p.dim > int_limit || p.slices > int_limit || p.knots > int_limit)
    return "N, D, K and knots must each be below 2^31 - 512 on CUDA";
  if (p.batch * ceil_div(p.samples, kTile) > int_limit) return "B * ceil(N / 64) must be below 2^31 - 512 on CUDA";
  if (ceil_div(p.dim, kOutColumns) > kMaxGridYZ) return "D must be at most 65535 * 256 on CUDA";
  return nullptr;
}

// Each returns the first launch error (cudaGetLastError), or cudaSuccess.
// `tensor_cores`: WMMA with float accumulation (TF32 for float inputs); else exact float FMAs.
cudaError_t launch_ecf_sums(const Problem& p, const ForwardPlan& plan, DType dtype, bool tensor_cores, const void* x,
                            const void* directions, float* workspace, float* sums, cudaStream_t stream);

// grad_directions and directions_workspace may be null (need_grad_directions false).
cudaError_t launch_ecf_sums_backward(const Problem& p, const BackwardPlan& plan, DType dtype, bool tensor_cores,
                                     const float* grad_sums, const void* x, const void* directions,
                                     float* coef_workspace, void* grad_x, float* directions_workspace,
                                     void* grad_directions, cudaStream_t stream);

}  // namespace cuda
}  // namespace sigreg
