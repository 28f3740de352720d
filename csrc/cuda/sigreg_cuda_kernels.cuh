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

// Forward: block (k tile, chunk of sample tiles, b * passes + pass); each block
// writes partial sums of its chunk to workspace [chunks, B, 2, K, knots], which
// a second kernel adds up in a fixed order (no atomics: bit-identical reruns).
struct ForwardPlan {
  int64_t k_tiles, chunks, tiles_per_chunk, passes, workspace_floats;
};
inline ForwardPlan plan_forward(const Problem& p) {
  const int64_t k_tiles = ceil_div(p.slices, kTile);
  const int64_t passes = ceil_div(p.knots - 1, kKnotsPerPass);
  const Chunking c = split_tiles(ceil_div(p.samples, kTile), ceil_div(kTargetBlocks, k_tiles * p.batch * passes));
  return {k_tiles, c.chunks, c.tiles_per_chunk, passes, c.chunks * p.batch * 2 * p.slices * p.knots};
}

// grad_x: block (sample tile, 256-feature chunk, b), looping over all slices:
// grad_x is written once, no workspace.
struct GradXPlan {
  int64_t n_tiles, d_chunks;
};
inline GradXPlan plan_grad_x(const Problem& p) { return {ceil_div(p.samples, kTile), ceil_div(p.dim, kOutColumns)}; }

// grad_directions: block (k tile, 256-feature chunk, chunk of (b, sample tile)
// pairs); partial products go to workspace [chunks, D, K], added up in a fixed order.
struct GradDirectionsPlan {
  int64_t k_tiles, d_chunks, chunks, tiles_per_chunk, workspace_floats;
};
inline GradDirectionsPlan plan_grad_directions(const Problem& p) {
  const int64_t k_tiles = ceil_div(p.slices, kTile), d_chunks = ceil_div(p.dim, kOutColumns);
  int64_t wanted = ceil_div(kTargetGradDirBlocks, k_tiles * d_chunks);
  wanted = wanted < kMaxGradDirChunks ? wanted : kMaxGradDirChunks;
  const Chunking c = split_tiles(p.batch * ceil_div(p.samples, kTile), wanted);
  return {k_tiles, d_chunks, c.chunks, c.tiles_per_chunk, c.chunks * p.dim * p.slices};
}

// Why the kernels cannot take this problem (they index tiles with int and use
// grid y/z), or nullptr. Expects batch, samples, slices >= 1, dim >= 0, knots >= 2.
inline const char* unsupported_reason(const Problem& p) {
  const int64_t int_limit = (int64_t{1} << 31) - 1 - 2 * kOutColumns;
  if (p.samples > int_limit || p.dim > int_limit || p.slices > int_limit || p.knots > int_limit)
    return "N, D, K and knots must each be below 2^31 - 512 on CUDA";
  if (p.batch * ceil_div(p.samples, kTile) > int_limit) return "B * ceil(N / 64) must be below 2^31 - 512 on CUDA";
  if (p.batch * ceil_div(p.knots - 1, kKnotsPerPass) > kMaxGridYZ)
    return "B * ceil((knots - 1) / 16) must be at most 65535 on CUDA";
  if (ceil_div(p.dim, kOutColumns) > kMaxGridYZ) return "D must be at most 65535 * 256 on CUDA";
  return nullptr;
}

// Each returns the first launch error (cudaGetLastError), or cudaSuccess.
// `tensor_cores`: WMMA with float accumulation (TF32 for float inputs); else exact float FMAs.
cudaError_t launch_ecf_sums(const Problem& p, const ForwardPlan& plan, DType dtype, bool tensor_cores, const void* x,
                            const void* directions, float* workspace, float* sums, cudaStream_t stream);

cudaError_t launch_ecf_grad_x(const Problem& p, DType dtype, bool tensor_cores, const float* grad_sums, const void* x,
                              const void* directions, void* grad_x, cudaStream_t stream);

cudaError_t launch_ecf_grad_directions(const Problem& p, const GradDirectionsPlan& plan, DType dtype,
                                       bool tensor_cores, const float* grad_sums, const void* x,
                                       const void* directions, float* workspace, void* grad_directions,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace sigreg
