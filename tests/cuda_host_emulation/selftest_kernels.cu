// Kernels with the bugs the host emulation exists to catch, one each, so the
// tests can check that it does (tests/test_cuda_emulated.py). Host-only: built
// by the emulation, never by nvcc.
#include <cuda_pipeline.h>
#include <cuda_runtime_api.h>
#include <mma.h>

namespace {

constexpr int kThreads = 256;

// Reads its neighbour's shared-memory write with no __syncthreads() between.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(float)];
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

// The same with the barrier: the reference point.
__global__ void with_barrier_kernel(float* out) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(float)];
  float* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

// Half of the block skips the barrier.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Half of each warp skips a full-mask shuffle.
__global__ void partial_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Stores a WMMA accumulator to a pointer that is not 32-byte aligned.
__global__ void misaligned_wmma_kernel(float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fill_fragment(acc, 1.0f);
  nvcuda::wmma::store_matrix_sync(out + 2, acc, 16, nvcuda::wmma::mem_row_major);
}

// Reads an asynchronous copy's destination before and after waiting for it.
__global__ void async_copy_kernel(const float* src, float* out) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(float)];
  float* s = reinterpret_cast<float*>(smem);
  __pipeline_memcpy_async(s + threadIdx.x, src + threadIdx.x, sizeof(float));
  __pipeline_commit();
  out[threadIdx.x] = s[threadIdx.x];
  __pipeline_wait_prior(0);
  __syncthreads();
  out[kThreads + threadIdx.x] = s[threadIdx.x];
}

// A 16-byte asynchronous copy to an address that is not 16-byte aligned.
__global__ void misaligned_async_copy_kernel(float* out) {
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(float)];
  float* s = reinterpret_cast<float*>(smem);
  __pipeline_memcpy_async(s + 1, out, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

}  // namespace

extern "C" {
int selftest_missing_barrier(float* out) {
  missing_barrier_kernel<<<1, kThreads, 0, nullptr>>>(out);
  return cudaGetLastError();
}
int selftest_with_barrier(float* out) {
  with_barrier_kernel<<<1, kThreads, 0, nullptr>>>(out);
  return cudaGetLastError();
}
int selftest_divergent_barrier(float* out) {
  divergent_barrier_kernel<<<1, kThreads, 0, nullptr>>>(out);
  return cudaGetLastError();
}
int selftest_partial_shuffle(float* out) {
  partial_shuffle_kernel<<<1, kThreads, 0, nullptr>>>(out);
  return cudaGetLastError();
}
int selftest_misaligned_wmma(float* out) {
  misaligned_wmma_kernel<<<1, 32, 0, nullptr>>>(out);
  return cudaGetLastError();
}
int selftest_async_copy(const float* src, float* out) {
  async_copy_kernel<<<1, kThreads, 0, nullptr>>>(src, out);
  return cudaGetLastError();
}
int selftest_misaligned_async_copy(float* out) {
  misaligned_async_copy_kernel<<<1, kThreads, 0, nullptr>>>(out);
  return cudaGetLastError();
}
}  // extern "C"
