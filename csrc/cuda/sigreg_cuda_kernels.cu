// Fused SIGReg kernels (SPEC §3): ECF sums over the samples, and their backward
// into grad_x and grad_directions. The projection P = x_b @ directions is
// recomputed tile by tile in shared memory and never reaches global memory;
// neither does anything of size N x K x knots. Reductions over samples write
// per-chunk partials that a second kernel adds in a fixed order: no atomics.
// Building blocks (tiles, shared memory, products) are in sigreg_cuda_tiles.cuh.
#include "sigreg_cuda_tiles.cuh"

namespace sigreg {
namespace cuda {
namespace {

// sum += v with Kahan compensation: a block adds one tile partial per 64
// samples, and (C - phi) in the statistic cancels, so summation error matters.
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
// workspace[chunk, b, 2, K, knots]. Per thread: a column and 16 rows per tile.
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_sums_kernel(const T* __restrict__ x, const T* __restrict__ directions, float* __restrict__ workspace,
                    int batch, int samples, int dim, int slices, int knots, float delta, int tiles_per_chunk,
                    int passes) {
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int k0 = blockIdx.x * kTile, chunk = blockIdx.y;
  const int b = blockIdx.z / passes, pass = blockIdx.z % passes;
  const int j_first = 1 + pass * kKnotsPerPass;
  const float t_first = static_cast<float>(j_first) * delta;
  const int tile_end = min((samples + kTile - 1) / kTile, (chunk + 1) * tiles_per_chunk);
  const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
  float* ps = SmemPtrs::p<T>(smem);
  const int col = threadIdx.x / 4, rg = threadIdx.x % 4;

  float sum_cos[kKnotsPerPass], sum_sin[kKnotsPerPass], err_cos[kKnotsPerPass], err_sin[kKnotsPerPass];
#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) sum_cos[q] = sum_sin[q] = err_cos[q] = err_sin[q] = 0.0f;
  // Knot 0: cos(0 p) = 1 + 0 p and sin(0 p) = 0 p, exactly; summing 0 p keeps NaN/Inf as the reference does.
  float zero_terms = 0.0f;

  for (int tile = chunk * tiles_per_chunk; tile < tile_end; ++tile) {
    const int n0 = tile * kTile;
    Tile<T, TC> proj;
    project_tile(proj, smem, x_b, directions, samples, dim, slices, n0, k0);
    __syncthreads();  // the previous tile's readers of P are done (also when dim == 0)
    proj.store(ps, Smem<T>::kLdP);
    __syncthreads();

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
      kahan_add(sum_cos[q], err_cos[q], tile_cos[q]);
      kahan_add(sum_sin[q], err_sin[q], tile_sin[q]);
    }
  }

#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) {
    sum_cos[q] = quad_sum(sum_cos[q] - err_cos[q]);
    sum_sin[q] = quad_sum(sum_sin[q] - err_sin[q]);
  }
  zero_terms = quad_sum(zero_terms);
  const int k = k0 + col;
  if (rg != 0 || k >= slices) return;
  const int64_t per_chunk = static_cast<int64_t>(batch) * 2 * slices * knots;
  float* out = workspace + chunk * per_chunk + static_cast<int64_t>(b) * 2 * slices * knots;
  float* out_cos = out + static_cast<int64_t>(k) * knots;
  float* out_sin = out + (static_cast<int64_t>(slices) + k) * knots;
#pragma unroll
  for (int q = 0; q < kKnotsPerPass; ++q) {
    if (j_first + q < knots) {
      out_cos[j_first + q] = sum_cos[q];
      out_sin[j_first + q] = sum_sin[q];
    }
  }
  if (pass == 0) {
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

// grad_x[b, n0:n0+64, d0:d0+256] = G @ directions^T over all slices, with G
// recomputed per 64-slice tile; the 64 x 256 accumulator stays in registers.
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_grad_x_kernel(const float* __restrict__ grad_sums, const T* __restrict__ x, const T* __restrict__ directions,
                      T* __restrict__ grad_x, int samples, int dim, int slices, int knots, float delta) {
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int n0 = blockIdx.x * kTile, d0 = blockIdx.y * static_cast<int>(kOutColumns), b = blockIdx.z;
  const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
  const float* grad_sums_b = grad_sums + static_cast<int64_t>(b) * 2 * slices * knots;
  const int valid_rows = min(kTile, samples - n0);
  float* ps = SmemPtrs::p<T>(smem);
  T* gs = SmemPtrs::g<T>(smem);
  T* ws = SmemPtrs::w<T>(smem);

  Tile<T, TC> out[kOutSubTiles];
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) out[sub].zero();

  for (int k0 = 0; k0 < slices; k0 += kTile) {
    Tile<T, TC> proj;
    project_tile(proj, smem, x_b, directions, samples, dim, slices, n0, k0);
    __syncthreads();  // the previous tile's readers of P and G are done (also when dim == 0)
    proj.store(ps, Smem<T>::kLdP);
    gradient_tile<T>(smem, grad_sums_b, valid_rows, slices, k0, knots, delta);
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

#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) {
    const int dd = d0 + sub * kTile;
    if (dd >= dim) break;
    __syncthreads();
    out[sub].store(ps, Smem<T>::kLdP);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      if (r < valid_rows && dd + c < dim)
        grad_x[(static_cast<int64_t>(b) * samples + n0 + r) * dim + dd + c] = from_float<T>(ps[r * Smem<T>::kLdP + c]);
    }
  }
}

// Partial grad_directions[d0:d0+256, k0:k0+64] = sum over a chunk of (b, sample
// tile) pairs of x_b^T @ G, into workspace[chunk, D, K].
template <typename T, bool TC>
__global__ void __launch_bounds__(kThreads, 2)
    ecf_grad_directions_kernel(const float* __restrict__ grad_sums, const T* __restrict__ x,
                               const T* __restrict__ directions, float* __restrict__ workspace, int samples, int dim,
                               int slices, int knots, float delta, int row_tiles, int tiles_per_chunk) {
  __shared__ __align__(128) unsigned char smem[Smem<T>::kBytes];
  const int k0 = blockIdx.x * kTile, d0 = blockIdx.y * static_cast<int>(kOutColumns), chunk = blockIdx.z;
  const int n_tiles = (samples + kTile - 1) / kTile;
  const int tile_end = min(row_tiles, (chunk + 1) * tiles_per_chunk);
  float* ps = SmemPtrs::p<T>(smem);
  T* gs = SmemPtrs::g<T>(smem);
  T* ws = SmemPtrs::w<T>(smem);

  Tile<T, TC> out[kOutSubTiles];
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) out[sub].zero();

  for (int tile = chunk * tiles_per_chunk; tile < tile_end; ++tile) {
    const int b = tile / n_tiles, n0 = (tile % n_tiles) * kTile;
    const T* x_b = x + static_cast<int64_t>(b) * samples * dim;
    Tile<T, TC> proj;
    project_tile(proj, smem, x_b, directions, samples, dim, slices, n0, k0);
    __syncthreads();  // the previous tile's readers of P and G are done (also when dim == 0)
    proj.store(ps, Smem<T>::kLdP);
    gradient_tile<T>(smem, grad_sums + static_cast<int64_t>(b) * 2 * slices * knots, min(kTile, samples - n0),
                     slices, k0, knots, delta);
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
#pragma unroll
  for (int sub = 0; sub < kOutSubTiles; ++sub) {
    const int dd = d0 + sub * kTile;
    if (dd >= dim) break;
    __syncthreads();
    out[sub].store(ps, Smem<T>::kLdP);
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      if (dd + r < dim && k0 + c < slices)
        out_chunk[static_cast<int64_t>(dd + r) * slices + k0 + c] = ps[r * Smem<T>::kLdP + c];
    }
  }
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
    const dim3 grid(u32(plan.k_tiles), u32(plan.chunks), u32(p.batch * plan.passes));
    ecf_sums_kernel<T, TC><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(directions), workspace, i32(p.batch), i32(p.samples),
        i32(p.dim), i32(p.slices), i32(p.knots), p.delta, i32(plan.tiles_per_chunk), i32(plan.passes));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t count = p.batch * 2 * p.slices * p.knots;
    sum_ecf_chunks_kernel<<<elementwise_blocks(count), kThreads, 0, stream>>>(
        workspace, sums, i32(plan.chunks), count, p.slices * p.knots, i32(p.knots), static_cast<double>(p.samples));
    return cudaGetLastError();
  }
};

struct LaunchGradX {
  template <typename T, bool TC>
  static cudaError_t run(const Problem& p, const float* grad_sums, const void* x, const void* directions,
                         void* grad_x, cudaStream_t stream) {
    const GradXPlan plan = plan_grad_x(p);
    const dim3 grid(u32(plan.n_tiles), u32(plan.d_chunks), u32(p.batch));
    ecf_grad_x_kernel<T, TC><<<grid, kThreads, 0, stream>>>(
        grad_sums, static_cast<const T*>(x), static_cast<const T*>(directions), static_cast<T*>(grad_x),
        i32(p.samples), i32(p.dim), i32(p.slices), i32(p.knots), p.delta);
    return cudaGetLastError();
  }
};

struct LaunchGradDirections {
  template <typename T, bool TC>
  static cudaError_t run(const Problem& p, const GradDirectionsPlan& plan, const float* grad_sums, const void* x,
                         const void* directions, float* workspace, void* grad_directions, cudaStream_t stream) {
    const dim3 grid(u32(plan.k_tiles), u32(plan.d_chunks), u32(plan.chunks));
    ecf_grad_directions_kernel<T, TC><<<grid, kThreads, 0, stream>>>(
        grad_sums, static_cast<const T*>(x), static_cast<const T*>(directions), workspace, i32(p.samples),
        i32(p.dim), i32(p.slices), i32(p.knots), p.delta, i32(p.batch * ceil_div(p.samples, kTile)),
        i32(plan.tiles_per_chunk));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const int64_t count = p.dim * p.slices;
    sum_chunks_kernel<T><<<elementwise_blocks(count), kThreads, 0, stream>>>(
        workspace, static_cast<T*>(grad_directions), i32(plan.chunks), count);
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

cudaError_t launch_ecf_grad_x(const Problem& p, DType dtype, bool tensor_cores, const float* grad_sums, const void* x,
                              const void* directions, void* grad_x, cudaStream_t stream) {
  return dispatch<LaunchGradX>(dtype, tensor_cores, p, grad_sums, x, directions, grad_x, stream);
}

cudaError_t launch_ecf_grad_directions(const Problem& p, const GradDirectionsPlan& plan, DType dtype,
                                       bool tensor_cores, const float* grad_sums, const void* x,
                                       const void* directions, float* workspace, void* grad_directions,
                                       cudaStream_t stream) {
  return dispatch<LaunchGradDirections>(dtype, tensor_cores, p, plan, grad_sums, x, directions, workspace,
                                        grad_directions, stream);
}

}  // namespace cuda
}  // namespace sigreg
