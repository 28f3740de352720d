// Device building blocks of the SIGReg CUDA kernels: tile sizes, the shared
// memory layout, the 64x64 block matrix product (WMMA tensor cores or plain
// FMA), the projection tile and the per-element gradient tile. No torch here.
//
// Every kernel runs 256 threads (8 warps) on 64x64 output tiles:
//  - a 64x64 product is split over warps as WMMA 16x16 fragments: warp w owns
//    fragment row w % 4 and fragment columns 2 * (w / 4) + {0, 1}; the FMA path
//    gives thread t the elements (t / 16 + 16 i, t % 16 + 16 j), i, j < 4;
//  - element-wise work (sin/cos at the knots) gives thread t column t / 4 and
//    rows t % 4 + 4 i, i < 16, so the 4 threads of a column sit in one warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../sigreg_math.h"
#include "sigreg_cuda_kernels.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sigreg CUDA kernels need sm_80 or newer (bf16/tf32 tensor cores); set TORCH_CUDA_ARCH_LIST accordingly"
#endif

namespace sigreg {
namespace cuda {

// Shared memory of one block, in bytes. The region at offset 0 is reused by
// phases that never overlap (separated by __syncthreads):
//   projection operands x [64 x 32] and directions [32 x 64]  |  the other
//   operand of the output product [64 x 64].
// Then the projection tile P (float [64 x 72]) and the gradient tile G, which
// overwrites P in place for float (same element size) and has its own buffer
// for 16-bit types. Row pads keep WMMA pointers 32-byte aligned, leading
// dimensions multiples of 16 bytes, and the element phase free of bank conflicts.
template <typename T>
struct Smem {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLdX = kDepth + kPad;
  static constexpr int kLdA = kTile + kPad;
  static constexpr int kLdW = kTile + kPad;
  static constexpr int kLdP = kTile + 8;
  static constexpr int kLdG = kTile + 8;
  static constexpr int kXBytes = kTile * kLdX * sizeof(T);
  static constexpr int kABytes = kDepth * kLdA * sizeof(T);
  static constexpr int kWBytes = kTile * kLdW * sizeof(T);
  static constexpr int kRegionBytes = kXBytes + kABytes > kWBytes ? kXBytes + kABytes : kWBytes;
  static constexpr int kPOffset = kRegionBytes;
  static constexpr int kPBytes = kTile * kLdP * 4;
  static constexpr bool kGInP = sizeof(T) == 4;
  static constexpr int kGOffset = kGInP ? kPOffset : kPOffset + kPBytes;
  static constexpr int kBytes = kGInP ? kPOffset + kPBytes : kGOffset + kTile * kLdG * sizeof(T);
  static_assert(kXBytes % 128 == 0 && kRegionBytes % 128 == 0 && kPBytes % 128 == 0, "32-byte aligned buffers");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

struct SmemPtrs {
  template <typename T>
  __device__ static T* x(unsigned char* s) { return reinterpret_cast<T*>(s); }
  template <typename T>
  __device__ static T* a(unsigned char* s) { return reinterpret_cast<T*>(s + Smem<T>::kXBytes); }
  template <typename T>
  __device__ static T* w(unsigned char* s) { return reinterpret_cast<T*>(s); }
  template <typename T>
  __device__ static float* p(unsigned char* s) { return reinterpret_cast<float*>(s + Smem<T>::kPOffset); }
  template <typename T>
  __device__ static T* g(unsigned char* s) { return reinterpret_cast<T*>(s + Smem<T>::kGOffset); }
};

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

// Operand layouts of a product: element (r, c) of a row-major operand is at
// ptr[r * ld + c], of a column-major one at ptr[c * ld + r].
struct RowMajor {
  using Wmma = nvcuda::wmma::row_major;
  __device__ static int at(int r, int c, int ld) { return r * ld + c; }
};
struct ColMajor {
  using Wmma = nvcuda::wmma::col_major;
  __device__ static int at(int r, int c, int ld) { return c * ld + r; }
};

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

// A block's 64x64 float accumulator on tensor cores (see the file comment).
template <typename T>
struct WmmaTile {
  static constexpr int kK = WmmaType<T>::kK;
  using Elem = typename WmmaType<T>::Elem;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float> frag[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(frag[0], 0.0f);
    nvcuda::wmma::fill_fragment(frag[1], 0.0f);
  }

  // this += A [64 x DEPTH] * B [DEPTH x 64], both in shared memory.
  template <int DEPTH, typename LA, typename LB>
  __device__ void mma(const T* a, int lda, const T* b, int ldb) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fm = warp % 4, fn = (warp / 4) * 2;
#pragma unroll
    for (int kk = 0; kk < DEPTH; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Elem, typename LA::Wmma> fa;
      wmma::load_matrix_sync(fa, a + LA::at(fm * 16, kk, lda), lda);
      to_tf32(fa);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        wmma::fragment<wmma::matrix_b, 16, 16, kK, Elem, typename LB::Wmma> fb;
        wmma::load_matrix_sync(fb, b + LB::at(kk, (fn + q) * 16, ldb), ldb);
        to_tf32(fb);
        wmma::mma_sync(frag[q], fa, fb, frag[q]);
      }
    }
  }

  __device__ void store(float* out, int ldo) const {
    const int warp = threadIdx.x / 32;
    const int fm = warp % 4, fn = (warp / 4) * 2;
#pragma unroll
    for (int q = 0; q < 2; ++q)
      nvcuda::wmma::store_matrix_sync(out + fm * 16 * ldo + (fn + q) * 16, frag[q], ldo, nvcuda::wmma::mem_row_major);
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

// The same accumulator computed with exact float FMAs (fp32 "highest", and a
// fallback without tensor cores for every type).
template <typename T>
struct FmaTile {
  float v[4][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) v[i][j] = 0.0f;
  }

  template <int DEPTH, typename LA, typename LB>
  __device__ void mma(const T* a, int lda, const T* b, int ldb) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < DEPTH; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = to_float(a[LA::at(ty + 16 * i, kk, lda)]);
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = to_float(b[LB::at(kk, tx + 16 * j, ldb)]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) v[i][j] = fmaf(av[i], bv[j], v[i][j]);
    }
  }

  __device__ void store(float* out, int ldo) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) out[(ty + 16 * i) * ldo + tx + 16 * j] = v[i][j];
  }
};

template <typename T, bool TENSOR_CORES>
using Tile = typename std::conditional<TENSOR_CORES, WmmaTile<T>, FmaTile<T>>::type;

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

// Copies rows [r0, r0 + ROWS) x columns [c0, c0 + COLS) of a row-major
// [rows x cols] matrix into shared memory (leading dimension ld), zero outside.
template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, int64_t r0, int rows,
                                          int64_t c0, int cols) {
  static_assert((ROWS * COLS) % kThreads == 0, "whole tile per pass");
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * COLS; e += kThreads) {
    const int r = e / COLS, c = e % COLS;
    const bool inside = r0 + r < rows && c0 + c < cols;
    dst[r * ld + c] = inside ? src[(r0 + r) * cols + c0 + c] : from_float<T>(0.0f);
  }
}

// The projection tile P = x_b[n0 : n0 + 64, :] @ directions[:, k0 : k0 + 64]
// (float) into shared memory, looping over the features; on return every thread
// may read P (and earlier readers of P and G are done).
template <typename T, bool TC>
__device__ void project_tile(unsigned char* smem, const T* __restrict__ x_b, const T* __restrict__ directions,
                             int samples, int dim, int slices, int n0, int k0) {
  T* xs = SmemPtrs::x<T>(smem);
  T* as = SmemPtrs::a<T>(smem);
  Tile<T, TC> acc;
  acc.zero();
  for (int d0 = 0; d0 < dim; d0 += kDepth) {
    __syncthreads();  // earlier readers of the shared region are done
    load_tile<kTile, kDepth>(xs, Smem<T>::kLdX, x_b, n0, samples, d0, dim);
    load_tile<kDepth, kTile>(as, Smem<T>::kLdA, directions, d0, dim, k0, slices);
    __syncthreads();
    acc.template mma<kDepth, RowMajor, RowMajor>(xs, Smem<T>::kLdX, as, Smem<T>::kLdA);
  }
  __syncthreads();  // the previous tile's readers of P and G are done (also when dim == 0)
  acc.store(SmemPtrs::p<T>(smem), Smem<T>::kLdP);
  __syncthreads();
}

// G[n, k] = sum_j t_j (gS_kj cos(t_j p_nk) - gC_kj sin(t_j p_nk)) for the
// projection tile P in shared memory (from project_tile).
// G goes to shared memory in the input type (it feeds the next product), zero
// on rows >= valid_rows and slices >= K. coef_b ([knots, K] of float2, see
// knot_coefficients_kernel) is read through L1: the 4 threads of a column
// share each load, and the 8 columns of a warp read 64 contiguous bytes.
template <typename T>
__device__ void gradient_tile(unsigned char* smem, const float2* __restrict__ coef_b, int valid_rows, int slices,
                              int k0, int knots, float delta) {
  const float* ps = SmemPtrs::p<T>(smem);
  T* gs = SmemPtrs::g<T>(smem);  // P itself for float: each thread overwrites only what it has read
  const int col = threadIdx.x / 4, rg = threadIdx.x % 4, k = k0 + col;
  for (int i = 0; i < kTile / 4; ++i) {
    const int row = rg + 4 * i;
    float g = 0.0f;
    if (row < valid_rows && k < slices) {
      const float p = ps[row * Smem<T>::kLdP + col];
      float s1, c1;
      sincos_accurate(delta * p, &s1, &c1);
      float c = c1, s = s1;
      const float2* coef_k = coef_b + k;
#pragma unroll 4
      for (int j = 1; j < knots; ++j) {
        const float2 cf = __ldg(coef_k + static_cast<int64_t>(j) * slices);
        g = fmaf(cf.x, c, fmaf(cf.y, s, g));
        rotate(c, s, c1, s1);
      }
    }
    gs[row * Smem<T>::kLdG + col] = from_float<T>(g);
  }
}

}  // namespace cuda
}  // namespace sigreg
