// Device building blocks of the SIGReg CUDA kernels: tile geometry, shared
// memory layouts, the staged copies (cp.async), the block's projection product
// (WMMA or exact FMAs), the accurate sin/cos. No torch here.
//
// A block of 256 threads (8 warps) owns a tile of block_n rows x block_k slices:
//  - the product: 16x16 WMMA fragments spread over the warps; the small tile has
//    fewer fragments than warps, so two warp groups each take half of every
//    depth step and leave their own partial tile (added when read: P0 + P1);
//  - the element phase: warp w holds cols_per_warp adjacent slices, lane l the
//    column w * cols_per_warp + l / row_groups and the rows l % row_groups +
//    row_groups * i, so the row_groups lanes of a column are adjacent (the
//    forward reduces them by shuffles) and a warp's reads of a row of P hit 32
//    distinct banks (the row pitch is block_k + cols_per_warp words).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../sigreg_math.h"
#include "sigreg_cuda_kernels.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sigreg CUDA kernels need sm_80 or newer (bf16/tf32 tensor cores, cp.async): set TORCH_CUDA_ARCH_LIST"
#endif

namespace sigreg {
namespace cuda {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int round_up_128(int bytes) { return (bytes + 127) / 128 * 128; }
constexpr int max_int(int a, int b) { return a > b ? a : b; }

template <Tile TILE>
struct Geometry {
  static constexpr int kN = tile_shape(TILE).block_n, kK = tile_shape(TILE).block_k;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kSplit = (kN / 16) * (kK / 16) >= kWarps ? 1 : kWarps / ((kN / 16) * (kK / 16));
  static constexpr int kColsPerWarp = kK / kWarps;         // big 8, small 4
  static constexpr int kRowGroups = 32 / kColsPerWarp;     // lanes per column: big 4, small 8
  static constexpr int kRowsPerThread = kN / kRowGroups;   // big 16, small 4
  static constexpr int kLdP = kK + kColsPerWarp;           // float pitch of P: conflict-free element reads
  static constexpr int kPBytes = round_up_128(kN * kLdP * 4);
  static_assert(kColsPerWarp * kWarps == kK && kRowGroups * kColsPerWarp == 32 && kRowsPerThread * kRowGroups == kN,
                "the element phase covers the tile exactly");
  __device__ static int col() { return static_cast<int>(threadIdx.x) / 32 * kColsPerWarp + lane() / kRowGroups; }
  __device__ static int row_group() { return lane() % kRowGroups; }
  __device__ static int lane() { return static_cast<int>(threadIdx.x) % 32; }
};

// Shared memory of one input type and tile. A pipeline stage holds the x
// tile [block_n x kDepth] and the directions tile [kDepth x block_k], 64 bytes
// of features per row; rows padded by 16 bytes (WMMA pointers stay 32-byte
// aligned, leading dimensions whole 16 bytes, fragment loads conflict-free).
// kLdQ: pitch of a tile in T (a given projection, or G), conflict-free reads.
template <typename T, Tile TILE>
struct Smem {
  using G = Geometry<TILE>;
  static constexpr int kSize = static_cast<int>(sizeof(T));
  static constexpr int kVec = 16 / kSize;  // elements per 16-byte vector
  static constexpr int kDepth = 64 / kSize;
  static constexpr int kLdX = kDepth + kVec, kLdA = G::kK + kVec;
  static constexpr int kLdQ = G::kK + max_int(G::kColsPerWarp, kVec);
  static constexpr int kXBytes = round_up_128(G::kN * kLdX * kSize);
  static constexpr int kABytes = round_up_128(kDepth * kLdA * kSize);
  static constexpr int kStageBytes = kXBytes + kABytes;
  static constexpr int kQBytes = round_up_128(G::kN * kLdQ * kSize);
  static_assert((kLdQ * kSize) % 16 == 0 && (G::kLdP * 4) % 16 == 0, "rows of whole 16-byte vectors");
};

// Copies rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of the row-major matrix
// src [rows x cols] into shared memory dst (pitch ld), zero outside the matrix.
// vec: 16-byte asynchronous copies (cp.async, completed by the caller's
// __pipeline_wait_prior); else element by element, synchronously.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void stage_tile(T* dst, int ld, const T* src, int64_t r0, int64_t rows, int64_t c0,
                                           int64_t cols, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T)), kPerRow = COLS / kVec;
    static_assert(COLS % kVec == 0, "whole vectors per row");
    constexpr int kChunks = ROWS * kPerRow;
#pragma unroll
    for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * kThreads;
      if (kChunks % kThreads != 0 && e >= kChunks) break;
      const int r = e / kPerRow, c = e % kPerRow * kVec;
      const bool inside = r0 + r < rows && c0 + c < cols;  // cols is a multiple of kVec: whole vectors in or out
      const T* from = inside ? src + (r0 + r) * cols + c0 + c : src;
      __pipeline_memcpy_async(dst + r * ld + c, from, 16, inside ? 0 : 16);
    }
  } else {
#pragma unroll 1
    for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
      const int r = e / COLS, c = e % COLS;
      const bool inside = r0 + r < rows && c0 + c < cols;
      dst[r * ld + c] = inside ? src[(r0 + r) * cols + c0 + c] : from_float<T>(0.0f);
    }
  }
}

// WMMA shape per input type: 16x16x16 for 16-bit types, 16x16x8 TF32 for float.
template <typename T>
struct WmmaType {
  static constexpr int kK = 16;
  using Elem = T;
};
template <>
struct WmmaType<float> {
  static constexpr int kK = 8;
  using Elem = nvcuda::wmma::precision::tf32;
};

// The block's projection tile on tensor cores: warp group h (of Geometry::kSplit)
// accumulates its share of each stage's depth into its fragments, then stores
// them to its own float tile p + h * (block_n x kLdP).
template <typename T, Tile TILE>
struct WmmaProduct {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  static constexpr int kFragK = WmmaType<T>::kK;
  using Elem = typename WmmaType<T>::Elem;
  static constexpr int kWarpsPerGroup = G::kWarps / G::kSplit;
  static constexpr int kFragRows = G::kN / 16;
  static constexpr int kFrags = kFragRows * (G::kK / 16) / kWarpsPerGroup;  // per warp: big 2, small 1
  static constexpr int kSteps = S::kDepth / kFragK / G::kSplit;             // fragment steps per stage and group
  static_assert(kFrags >= 1 && kSteps >= 1, "fragments and depth split evenly over the warps");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kFragK, float> acc[kFrags];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int q = 0; q < kFrags; ++q) nvcuda::wmma::fill_fragment(acc[q], 0.0f);
  }

  __device__ static int group() { return static_cast<int>(threadIdx.x) / 32 / kWarpsPerGroup; }
  __device__ static int frag_row() { return static_cast<int>(threadIdx.x) / 32 % kWarpsPerGroup % kFragRows; }
  __device__ static int frag_col() { return static_cast<int>(threadIdx.x) / 32 % kWarpsPerGroup / kFragRows * kFrags; }

  // acc += xs [block_n x kDepth] @ as [kDepth x block_k] (this group's depth share).
  __device__ __forceinline__ void mma(const T* xs, const T* as) {
    using namespace nvcuda;
    const int fm = frag_row(), fn = frag_col();
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int kk = (group() * kSteps + s) * kFragK;
      wmma::fragment<wmma::matrix_a, 16, 16, kFragK, Elem, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, xs + fm * 16 * S::kLdX + kk, S::kLdX);
      to_tf32(fa);
#pragma unroll
      for (int q = 0; q < kFrags; ++q) {
        wmma::fragment<wmma::matrix_b, 16, 16, kFragK, Elem, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, as + kk * S::kLdA + (fn + q) * 16, S::kLdA);
        to_tf32(fb);
        wmma::mma_sync(acc[q], fa, fb, acc[q]);
      }
    }
  }

  __device__ __forceinline__ void store(float* p) const {
    float* out = p + group() * (G::kPBytes / 4) + frag_row() * 16 * G::kLdP + frag_col() * 16;
#pragma unroll
    for (int q = 0; q < kFrags; ++q)
      nvcuda::wmma::store_matrix_sync(out + q * 16, acc[q], G::kLdP, nvcuda::wmma::mem_row_major);
  }

 private:
  // TF32 fragments are loaded from float and must be rounded to TF32 explicitly.
  template <typename Frag>
  __device__ static void to_tf32(Frag& f) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
    }
  }
};

// The same tile by exact float FMAs (float32 at "highest" precision when the
// kernel is asked for the product; 16-bit inputs with tensor cores disabled).
// Thread l of group h: rows ty + kTy * i, columns tx + 16 * j.
template <typename T, Tile TILE>
struct FmaProduct {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  static constexpr int kGroupThreads = kThreads / G::kSplit;
  static constexpr int kTy = kGroupThreads / 16, kRows = G::kN / kTy, kCols = G::kK / 16;
  static constexpr int kDepthShare = S::kDepth / G::kSplit;
  float v[kRows][kCols];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) v[i][j] = 0.0f;
  }

  __device__ __forceinline__ void mma(const T* xs, const T* as) {
    const int h = threadIdx.x / kGroupThreads, l = threadIdx.x % kGroupThreads, ty = l / 16, tx = l % 16;
#pragma unroll 4
    for (int kk = h * kDepthShare; kk < (h + 1) * kDepthShare; ++kk) {
      float av[kRows], bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = to_float(xs[(ty + kTy * i) * S::kLdX + kk]);
#pragma unroll
      for (int j = 0; j < kCols; ++j) bv[j] = to_float(as[kk * S::kLdA + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) v[i][j] = fmaf(av[i], bv[j], v[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* p) const {
    const int h = threadIdx.x / kGroupThreads, l = threadIdx.x % kGroupThreads, ty = l / 16, tx = l % 16;
    float* out = p + h * (G::kPBytes / 4);
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) out[(ty + kTy * i) * G::kLdP + tx + 16 * j] = v[i][j];
  }
};

template <typename T, Tile TILE, Mode MODE>
using Product = typename std::conditional<MODE == Mode::kTensorCores, WmmaProduct<T, TILE>, FmaProduct<T, TILE>>::type;

// The projection tile P = x_b[n0 : n0 + block_n, :] @ directions[:, k0 : k0 + block_k]
// through a two-stage cp.async pipeline with one barrier per stage: at stage i
// the copies of stage i + 1 are issued after the barrier (so the buffer they
// overwrite, read at stage i - 1, is free) and run during the product of stage
// i. The last stage issues the first stage of the next tile (next_n0 >= 0).
// The caller issued this tile's first stage (issue_stage(0, n0, 0)); on return
// P is in shared memory and every thread may read it.
template <typename T, Tile TILE, Mode MODE>
struct Projection {
  using G = Geometry<TILE>;
  using S = Smem<T, TILE>;
  unsigned char* stages;  // two stages
  float* p;               // G::kSplit float tiles
  const T* x_b;
  const T* directions;
  int64_t samples, dim, slices, k0;
  bool x_vec, directions_vec;
  int stage = 0;

  __device__ __forceinline__ int64_t steps() const { return (dim + S::kDepth - 1) / S::kDepth; }

  __device__ __forceinline__ void issue_stage(int buffer, int64_t n0, int64_t d0) {
    T* xs = reinterpret_cast<T*>(stages + buffer * S::kStageBytes);
    T* as = reinterpret_cast<T*>(stages + buffer * S::kStageBytes + S::kXBytes);
    stage_tile<G::kN, S::kDepth>(xs, S::kLdX, x_b, n0, samples, d0, dim, x_vec);
    stage_tile<S::kDepth, G::kK>(as, S::kLdA, directions, d0, dim, k0, slices, directions_vec);
    __pipeline_commit();
  }

  __device__ __forceinline__ void first_stage(int64_t n0) {
    if (steps() > 0) issue_stage(stage, n0, 0);
  }

  __device__ __forceinline__ void run(int64_t n0, int64_t next_n0) {
    Product<T, TILE, MODE> acc;
    acc.zero();
    const int64_t n_steps = steps();
    for (int64_t i = 0; i < n_steps; ++i) {
      __pipeline_wait_prior(0);
      __syncthreads();  // stage i landed for every thread; stage i - 1's readers are done
      if (i + 1 < n_steps) {
        issue_stage(stage ^ 1, n0, (i + 1) * S::kDepth);
      } else if (next_n0 >= 0) {
        issue_stage(stage ^ 1, next_n0, 0);
      }
      const unsigned char* current = stages + stage * S::kStageBytes;
      acc.mma(reinterpret_cast<const T*>(current), reinterpret_cast<const T*>(current + S::kXBytes));
      stage ^= 1;
    }
    if (n_steps == 0) __syncthreads();  // (with stages, their first barrier) earlier readers of P are done
    acc.store(p);
    __syncthreads();
  }
};

// The projection value of element (row, col) of the tile in shared memory.
template <Tile TILE>
__device__ __forceinline__ float product_value(const float* p, int row, int col) {
  using G = Geometry<TILE>;
  float v = p[row * G::kLdP + col];
  if constexpr (G::kSplit == 2) v += p[G::kPBytes / 4 + row * G::kLdP + col];
  static_assert(G::kSplit <= 2, "one or two warp groups");
  return v;
}

// Accurate sin and cos for any float: the shared branch-free polynomial where
// its range reduction is exact enough, the CUDA library (with its Payne-Hanek
// slow path) beyond it and for NaN/Inf. __sincosf would be wrong at |a| ~ 1e3.
// The rare path is out of line (returning by value, so nothing goes through
// the stack) to keep the unrolled element loops small.
static __device__ __noinline__ float2 sincos_library(float a) {
  float2 sc;
  sincosf(a, &sc.x, &sc.y);
  return sc;
}

__device__ __forceinline__ void sincos_accurate(float a, float* s, float* c) {
  if (fabsf(a) <= kPolySinCosMaxArg) {
    sincos_poly(a, s, c);
  } else {
    const float2 sc = sincos_library(a);
    *s = sc.x;
    *c = sc.y;
  }
}

// The same, with cos - 1 to full relative precision (sincos_cosm1_poly) for the forward's sums.
__device__ __forceinline__ void sincos_cosm1_accurate(float a, float* s, float* c, float* cosm1) {
  if (fabsf(a) <= kPolySinCosMaxArg) {
    sincos_cosm1_poly(a, s, c, cosm1);
  } else {
    const float2 sc = sincos_library(a);
    *s = sc.x;
    *c = sc.y;
    *cosm1 = sc.y - 1.0f;  // (the angle's own error is larger than what this loses)
  }
}

// Sum over the lanes of a column (adjacent lanes), the same order on every run;
// every lane gets the total.
template <int ROW_GROUPS>
__device__ __forceinline__ float column_sum(float v) {
#pragma unroll
  for (int m = 1; m < ROW_GROUPS; m *= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

}  // namespace cuda
}  // namespace sigreg
