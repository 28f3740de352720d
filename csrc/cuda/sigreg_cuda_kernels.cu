// Fused SIGReg kernels (SPEC §3): ECF sums over the samples, and their backward
// into grad_x and grad_directions. The projection P = x_b @ directions is
// recomputed tile by tile in shared memory and never reaches global memory;
// neither does anything of size N x K x knots. Reductions over samples write
// per-chunk partials that a second kernel adds in a fixed order: no atomics.
// Building blocks (tiles, shared memory, products) are in sigreg_cuda_tiles.cuh.
#include <algorithm>

#include "sigreg_cuda_tiles.cuh"

namespace sigreg {
namespace cuda {
namespace {

// sum += v with Kahan compensation (sum - err is the better total): a block adds
// one partial per 64 samples, and (C - phi) in the statistic cancels, so
// summation error matters.
__device__ __forceinline__ void kahan_add(float& sum, float& err, float v) {
  const float y = v - err;
  const float t = sum + y;
  err = (t - sum) - y;
  sum = t;
}

// Sum over the 4 adjacent lanes that share a column, same order on every run.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// Partial ECF sums of one chunk of sample tiles, slices [k0, k0 + 64), knots
// j_first .. j_first + 15 (pass 0 also writes knot 0) into
// workspace[chunk, b, 2, K, knots]. Per thread: a column and 16 rows of each
// tile (level 1 of the sum); after each tile the 4 threads of a column combine
// their sums and thread rg keeps knots rg, rg + 4, ... (level 2, compensated).
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_sums_kernel(const T* __restrict__ x, const T* __restrict__ directions, float* __restrict__ workspace,
                    int batch, int samples, int dim, int slices, int knots, float delta, int tiles_per_chunk,
                    int passes, int batch_first) {
  static_assert(kKnotsPerPass % 4 == 0, "each of the 4 threads of a column keeps a quarter of the knots");
  constexpr int kKept = kKnotsPerPass / 4;
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int k0 = blockIdx.x * kTile, chunk = blockIdx.y;
  const int b = batch_first + static_cast<int>(blockIdx.z) / passes, pass = blockIdx.z % passes;
  const int j_first = 1 + pass * kKnotsPerPass;
  const float t_first = static_cast<float>(j_first) * delta;
  const int tile_end = static_cast<int>(
      min(static_cast<int64_t>((samples + kTile - 1) / kTile), static_cast<int64_t>(chunk + 1) * tiles_per_chunk));
  const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
  float* ps = SmemPtrs::p<T>(smem);
  const int col = threadIdx.x / 4, rg = threadIdx.x % 4;

  // Knot j_first + rg + 4 m of this column: sum and Kahan error, cos and sin.
  float sum_cos[kKept], sum_sin[kKept], err_cos[kKept], err_sin[kKept];
#pragma unroll
  for (int m = 0; m < kKept; ++m) sum_cos[m] = sum_sin[m] = err_cos[m] = err_sin[m] = 0.0f;
  // Knot 0: cos(0 p) = 1 + 0 p and sin(0 p) = 0 p, exactly; summing 0 p keeps NaN/Inf as the reference does.
  float zero_terms = 0.0f;

  for (int tile = chunk * tiles_per_chunk; tile < tile_end; ++tile) {
    const int n0 = tile * kTile;
    project_tile<T, TC>(smem, x_b, directions, samples, dim, slices, n0, k0);

    float tile_cos[kKnotsPerPass], tile_sin[kKnotsPerPass];
#pragma unroll
    for (int q = 0; q < kKnotsPerPass; ++q) tile_cos[q] = tile_sin[q] = 0.0f;
    const int valid_rows = min(kTile, samples - n0);
    for (int i = 0; i < kTile / 4; ++i) {
      const int row = rg + 4 * i;
      if (row >= valid_rows) break;
      const float p = ps[row * Smem<T>::kLdP + col];
      zero_terms += 0.0f * p;
      float s1, c1, s, c;
      sincos_accurate(delta * p, &s1, &c1);
      if (j_first == 1) {
        s = s1, c = c1;
      } else {
        sincos_accurate(t_first * p, &s, &c);
      }
#pragma unroll
      for (int q = 0; q < kKnotsPerPass; ++q) {  // knots past the last are summed but never written
        tile_cos[q] += c;
        tile_sin[q] += s;
        rotate(c, s, c1, s1);
      }
    }
#pragma unroll
    for (int q = 0; q < kKnotsPerPass; ++q) {
      const float tc = quad_sum(tile_cos[q]), ts = quad_sum(tile_sin[q]);  // every lane takes part
      if (q % 4 == rg) {
        kahan_add(sum_cos[q / 4], err_cos[q / 4], tc);
        kahan_add(sum_sin[q / 4], err_sin[q / 4], ts);
      }
    }
  }

  zero_terms = quad_sum(zero_terms);
  const int k = k0 + col;
  if (k >= slices) return;
  const int64_t per_chunk = static_cast<int64_t>(batch) * 2 * slices * knots;
  float* out = workspace + chunk * per_chunk + static_cast<int64_t>(b) * 2 * slices * knots;
  float* out_cos = out + static_cast<int64_t>(k) * knots;
  float* out_sin = out + (static_cast<int64_t>(slices) + k) * knots;
#pragma unroll
  for (int m = 0; m < kKept; ++m) {
    const int j = j_first + rg + 4 * m;
    if (j < knots) {
      out_cos[j] = sum_cos[m] - err_cos[m];
      out_sin[j] = sum_sin[m] - err_sin[m];
    }
  }
  if (pass == 0 && rg == 0) {
    out_cos[0] = zero_terms;
    out_sin[0] = zero_terms;
  }
}

// sums[i] = sum over chunks of workspace[chunk, i] (in double, fixed order), plus
// N at the cosine of knot 0. i runs over [B, 2, K, knots].
__global__ void sum_ecf_chunks_kernel(const float* __restrict__ workspace, float* __restrict__ sums, int chunks,
                                      int64_t count, int64_t slices_knots, int knots, double samples) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += workspace[c * count + i];
    if ((i / slices_knots) % 2 == 0 && i % knots == 0) total += samples;
    sums[i] = static_cast<float>(total);
  }
}

// coef[b, j, k] = (t_j gS_bkj, -t_j gC_bkj): the factors of cos(t_j p) and
// sin(t_j p) in dstat/dp, laid out so a warp's columns read contiguous memory.
__global__ void knot_coefficients_kernel(const float* __restrict__ grad_sums, float2* __restrict__ coef,
                                         int64_t count, int slices, int knots, float delta) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = i % slices, j = (i / slices) % knots, b = i / (static_cast<int64_t>(slices) * knots);
    const float grad_cos = grad_sums[((2 * b) * slices + k) * knots + j];
    const float grad_sin = grad_sums[((2 * b + 1) * slices + k) * knots + j];
    float coef_cos, coef_sin;
    knot_gradient_coefficients(static_cast<float>(j) * delta, grad_cos, grad_sin, &coef_cos, &coef_sin);
    coef[i] = make_float2(coef_cos, coef_sin);
  }
}

// Hands each element (r, dd + c) of a backward block's 64 x 256 accumulator,
// sub-tile by sub-tile through shared memory, to store(r, dd, c, value).
template <typename T, typename TileT, typename Store>
__device__ void store_accumulator(const TileT (&out)[kOutSubTiles], unsigned char* smem, int d0, int dim,
                                  Store store) {
  float* ps = SmemPtrs::p<T>(smem);
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) {
    const int dd = d0 + sub * kTile;
    if (dd >= dim) break;
    __syncthreads();
    out[sub].store(ps, Smem<T>::kLdP);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      store(r, dd, c, ps[r * Smem<T>::kLdP + c]);
    }
  }
}

// grad_x[b, n0:n0+64, d0:d0+256] = G @ directions^T over all slices, with G
// recomputed per 64-slice tile; the 64 x 256 accumulator stays in registers.
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_grad_x_kernel(const float2* __restrict__ coef, const T* __restrict__ x, const T* __restrict__ directions,
                      T* __restrict__ grad_x, int samples, int dim, int slices, int knots, float delta,
                      int batch_first) {
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int n0 = blockIdx.x * kTile, d0 = blockIdx.y * static_cast<int>(kOutColumns);
  const int b = batch_first + static_cast<int>(blockIdx.z);
  const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
  const float2* coef_b = coef + static_cast<int64_t>(b) * knots * slices;
  const int valid_rows = min(kTile, samples - n0);
  T* gs = SmemPtrs::g<T>(smem);
  T* ws = SmemPtrs::w<T>(smem);

  Tile<T, TC> out[kOutSubTiles];
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) out[sub].zero();

  for (int k0 = 0; k0 < slices; k0 += kTile) {
    project_tile<T, TC>(smem, x_b, directions, samples, dim, slices, n0, k0);
    gradient_tile<T>(smem, coef_b, valid_rows, slices, k0, knots, delta);
#pragma unroll
    for (int sub = 0; sub < kOutSubTiles; ++sub) {
      const int dd = d0 + sub * kTile;
      if (dd >= dim) break;  // uniform over the block
      __syncthreads();       // G is complete; earlier readers of the shared region are done
      // ws[d][k] = directions[dd + d, k0 + k]: the right operand directions^T, column-major.
      load_tile<kTile, kTile>(ws, Smem<T>::kLdW, directions, dd, dim, k0, slices);
      __syncthreads();
      out[sub].template mma<kTile, RowMajor, ColMajor>(gs, Smem<T>::kLdG, ws, Smem<T>::kLdW);
    }
  }

  store_accumulator<T>(out, smem, d0, dim, [&](int r, int dd, int c, float value) {
    if (r < valid_rows && dd + c < dim)
      grad_x[(static_cast<int64_t>(b) * samples + n0 + r) * dim + dd + c] = from_float<T>(value);
  });
}

// Partial grad_directions[d0:d0+256, k0:k0+64] = sum over a chunk of (b, sample
// tile) pairs of x_b^T @ G, into workspace[chunk, D, K].
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_grad_directions_kernel(const float2* __restrict__ coef, const T* __restrict__ x,
                               const T* __restrict__ directions, float* __restrict__ workspace, int samples, int dim,
                               int slices, int knots, float delta, int row_tiles, int tiles_per_chunk) {
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int k0 = blockIdx.x * kTile, d0 = blockIdx.y * static_cast<int>(kOutColumns), chunk = blockIdx.z;
  const int n_tiles = (samples + kTile - 1) / kTile;
  const int tile_end =
      static_cast<int>(min(static_cast<int64_t>(row_tiles), static_cast<int64_t>(chunk + 1) * tiles_per_chunk));
  T* gs = SmemPtrs::g<T>(smem);
  T* ws = SmemPtrs::w<T>(smem);

  Tile<T, TC> out[kOutSubTiles];
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) out[sub].zero();

  for (int tile = chunk * tiles_per_chunk; tile < tile_end; ++tile) {
    const int b = tile / n_tiles, n0 = (tile % n_tiles) * kTile;
    const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
    project_tile<T, TC>(smem, x_b, directions, samples, dim, slices, n0, k0);
    gradient_tile<T>(smem, coef + static_cast<int64_t>(b) * knots * slices, min(kTile, samples - n0), slices, k0,
                     knots, delta);
#pragma unroll
    for (int sub = 0; sub < kOutSubTiles; ++sub) {
      const int dd = d0 + sub * kTile;
      if (dd >= dim) break;  // uniform over the block
      __syncthreads();       // G is complete; earlier readers of the shared region are done
      // ws[n][d] = x_b[n0 + n, dd + d]: the left operand x_b^T, column-major.
      load_tile<kTile, kTile>(ws, Smem<T>::kLdW, x_b, n0, samples, dd, dim);
      __syncthreads();
      out[sub].template mma<kTile, ColMajor, RowMajor>(ws, Smem<T>::kLdW, gs, Smem<T>::kLdG);
    }
  }

  float* out_chunk = workspace + static_cast<int64_t>(chunk) * dim * slices;
  store_accumulator<T>(out, smem, d0, dim, [&](int r, int dd, int c, float value) {
    if (dd + r < dim && k0 + c < slices) out_chunk[static_cast<int64_t>(dd + r) * slices + k0 + c] = value;
  });
}

// out[i] = sum over chunks of workspace[chunk, i], in double and in a fixed order.
template <typename T>
__global__ void sum_chunks_kernel(const float* __restrict__ workspace, T* __restrict__ out, int chunks,
                                  int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += workspace[c * count + i];
    out[i] = from_float<T>(static_cast<float>(total));
  }
}

// Sizes were checked against unsupported_reason(): they fit the kernels' int and grid types.
int i32(int64_t v) { return static_cast<int>(v); }
unsigned int u32(int64_t v) { return static_cast<unsigned int>(v); }

unsigned int elementwise_blocks(int64_t count) {
  const int64_t blocks = ceil_div(count, kThreads);
  return static_cast<unsigned int>(blocks < 4096 ? blocks : 4096);
}

struct LaunchSums {
  template <typename T, bool TC>
  static cudaError_t run(const Problem& p, const ForwardPlan& plan, const void* x, const void* directions,
                         float* workspace, float* sums, cudaStream_t stream) {
    for (int64_t first = 0; first < p.batch; first += plan.batch_per_launch) {
      const int64_t count = std::min(plan.batch_per_launch, p.batch - first);
      const dim3 grid(u32(plan.k_tiles), u32(plan.chunks), u32(count * plan.passes));
      ecf_sums_kernel<T, TC><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<const T*>(directions), workspace, i32(p.batch), i32(p.samples),
          i32(p.dim), i32(p.slices), i32(p.knots), p.delta, i32(plan.tiles_per_chunk), i32(plan.passes), i32(first));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    const int64_t count = p.batch * 2 * p.slices * p.knots;
    sum_ecf_chunks_kernel<<<elementwise_blocks(count), kThreads, 0, stream>>>(
        workspace, sums, i32(plan.chunks), count, p.slices * p.knots, i32(p.knots), static_cast<double>(p.samples));
    return cudaGetLastError();
  }
};

struct LaunchBackward {
  template <typename T, bool TC>
  static cudaError_t run(const Problem& p, const BackwardPlan& plan, const float* grad_sums, const void* x,
                         const void* directions, float* coef_workspace, void* grad_x, float* directions_workspace,
                         void* grad_directions, cudaStream_t stream) {
    const int64_t coef_count = p.batch * p.knots * p.slices;
    float2* coef = reinterpret_cast<float2*>(coef_workspace);
    knot_coefficients_kernel<<<elementwise_blocks(coef_count), kThreads, 0, stream>>>(
        grad_sums, coef, coef_count, i32(p.slices), i32(p.knots), p.delta);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.dim == 0) return err;  // no features: empty gradients

    for (int64_t first = 0; first < p.batch; first += plan.batch_per_launch) {
      const dim3 grid_x(u32(plan.n_tiles), u32(plan.d_chunks), u32(std::min(plan.batch_per_launch, p.batch - first)));
      ecf_grad_x_kernel<T, TC><<<grid_x, kThreads, 0, stream>>>(
          coef, static_cast<const T*>(x), static_cast<const T*>(directions), static_cast<T*>(grad_x), i32(p.samples),
          i32(p.dim), i32(p.slices), i32(p.knots), p.delta, i32(first));
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (grad_directions == nullptr) return cudaSuccess;

    const dim3 grid_a(u32(plan.k_tiles), u32(plan.d_chunks), u32(plan.chunks));
    ecf_grad_directions_kernel<T, TC><<<grid_a, kThreads, 0, stream>>>(
        coef, static_cast<const T*>(x), static_cast<const T*>(directions), directions_workspace, i32(p.samples),
        i32(p.dim), i32(p.slices), i32(p.knots), p.delta, i32(p.batch * plan.n_tiles), i32(plan.tiles_per_chunk));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t count = p.dim * p.slices;
    sum_chunks_kernel<T><<<elementwise_blocks(count), kThreads, 0, stream>>>(
        directions_workspace, static_cast<T*>(grad_directions), i32(plan.chunks), count);
    return cudaGetLastError();
  }
};

template <typename Launch, bool TC, typename... Args>
cudaError_t dispatch_type(DType dtype, Args... args) {
  switch (dtype) {
    case DType::kFloat32:
      return Launch::template run<float, TC>(args...);
    case DType::kFloat16:
      return Launch::template run<__half, TC>(args...);
    case DType::kBFloat16:
      return Launch::template run<__nv_bfloat16, TC>(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename Launch, typename... Args>
cudaError_t dispatch(DType dtype, bool tensor_cores, Args... args) {
  return tensor_cores ? dispatch_type<Launch, true>(dtype, args...) : dispatch_type<Launch, false>(dtype, args...);
}

}  // namespace

cudaError_t launch_ecf_sums(const Problem& p, const ForwardPlan& plan, DType dtype, bool tensor_cores, const void* x,
                            const void* directions, float* workspace, float* sums, cudaStream_t stream) {
  return dispatch<LaunchSums>(dtype, tensor_cores, p, plan, x, directions, workspace, sums, stream);
}

cudaError_t launch_ecf_sums_backward(const Problem& p, const BackwardPlan& plan, DType dtype, bool tensor_cores,
                                     const float* grad_sums, const void* x, const void* directions,
                                     float* coef_workspace, void* grad_x, float* directions_workspace,
                                     void* grad_directions, cudaStream_t stream) {
  return dispatch<LaunchBackward>(dtype, tensor_cores, p, plan, grad_sums, x, directions, coef_workspace, grad_x,
                                  directions_workspace, grad_directions, stream);
}

}  // namespace cuda
}  // namespace sigreg
