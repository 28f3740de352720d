// Host emulation of the CUDA features the sigreg kernels use, so that their
// device code runs on a CPU in the tests: the same source, compiled by g++.
//
// Execution model. Blocks run one after another. The threads of a block are
// fibers (own stacks) that a scheduler runs one at a time; a fiber runs until it
// reaches __syncthreads() or a warp shuffle, and the scheduler lets the block
// pass a barrier only when every thread waits at it. Consequences the tests use:
//  - a barrier that some threads skip (divergence), or a full-warp shuffle that
//    some lanes skip, is reported as a launch failure instead of hanging;
//  - a missing barrier shows up as a result that depends on the order in which
//    threads run between barriers: run in ascending and in descending thread
//    (and block) order, a correct kernel gives bit-identical results;
//  - shared memory is filled with 0xFF bytes (NaN in every float type) before
//    each block, so reading what no thread wrote poisons the result.
// WMMA fragments hold the whole 16x16 matrix; lane 0 of each warp loads,
// multiplies (float FMAs, in k order) and stores for the warp, and the other
// lanes do nothing. The alignment rules of the real load/store are checked.
// Asynchronous copies (__pipeline_memcpy_async, cuda_pipeline.h) read their
// source when issued but write shared memory only when the issuing thread
// waits for their group (__pipeline_wait_prior): a read before the wait, or by
// another thread without a barrier after it, sees the old (poisoned) bytes.
// Launches are counted (the tests check one launch per kernel call) and the
// grid's x cap can be lowered (to test the multi-launch path).
// Since one thread runs at a time, global memory is always coherent: atomicAdd
// is a plain read-modify-write (no fiber switch inside it, so no race),
// __threadfence only a fence, __ldcg a plain load. What the device's memory
// model adds (a block that sees another's ticket before its data) is not
// emulated; the order in which blocks arrive is (ascending or descending).
//
// The test rewrites the two constructs g++ cannot parse: `kernel<<<grid,
// block, shared, stream>>>(args)` becomes `::emu::launch(grid, block, shared,
// stream, kernel, args)`, and a `__shared__ __align__(A) unsigned char s[B];`
// array becomes `unsigned char* s = ::emu::block_shared_memory(B, A);`.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

// ---- Language: qualifiers that mean nothing on the host ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---- Runtime API ----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
typedef struct CUstream_st* cudaStream_t;

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }

// ---- 16-bit floats: bit patterns, explicit conversions only (as torch builds CUDA code) ----
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  if (std::isnan(v)) return {0x7FC0};
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits
  return {static_cast<uint16_t>(u >> 16)};
}

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedBytes = 48 * 1024;  // the static shared memory limit of a block

enum class Wait { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

// A switch between fibers is what the emulation does most (a shuffle costs a
// round of them per warp). On x86-64 a switch saves the callee-saved registers
// and the floating-point control words on the old stack and pops them from the
// new one: about 11 ns, against 185 ns for swapcontext, which also makes two
// signal-mask system calls; elsewhere, ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;  // the stack pointer saved by emu_switch_stack
};
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .weak emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");
inline void switch_context(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
// A stack that "returns" into entry(), as if emu_switch_stack had been called from there.
inline void prepare_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  uint64_t* sp = top - 9;  // control words, 6 registers, the return address, padding: entry sees rsp = 8 mod 16
  sp[0] = 0x1F80 | (uint64_t{0x037F} << 32);  // default MXCSR and x87 control word
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(entry);
  c.sp = sp;
}
#else
struct Context {
  ucontext_t context;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
inline void prepare_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.context);
  c.context.uc_stack.ss_sp = stack;
  c.context.uc_stack.ss_size = bytes;
  c.context.uc_link = nullptr;  // entry never returns
  makecontext(&c.context, entry, 0);
}
#endif

// An asynchronous copy in flight: its source bytes, read at issue.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
  size_t size;
};

struct Fiber {
  Context context;
  void* stack = nullptr;
  Wait wait = Wait::kRunnable;
  int shuffles = 0;                               // warp shuffles done: selects the shuffle buffer
  std::vector<AsyncCopy> pending;                 // issued since the last commit
  std::vector<std::vector<AsyncCopy>> committed;  // committed groups not yet waited for, oldest first
};

struct State {
  Context scheduler;
  std::vector<Fiber> fibers;           // the threads of the running block
  int current = -1;                    // the fiber running now
  std::function<void()> body;          // the kernel call of the running launch
  bool descending = false;             // run threads (and blocks) in descending order
  unsigned char* shared = nullptr;     // the running block's shared memory
  uint64_t shuffled[2][kMaxThreads];   // values in flight in warp shuffles, double-buffered
  std::string failure;                 // first error of the running launch
  cudaError_t last_error = cudaSuccess;
  uint64_t launches = 0;               // kernel launches so far (tests reset it)
  uint64_t max_grid_x = 2147483647;    // the hardware's gridDim.x cap (tests lower it)
};
inline State state;

inline void report(const std::string& what) {
  if (state.failure.empty()) state.failure = what;
}

inline std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler until it resumes this thread.
inline void suspend(Wait why) {
  Fiber& f = state.fibers[state.current];
  f.wait = why;
  switch_context(f.context, state.scheduler);
}

[[noreturn]] inline void fiber_main() {
  state.body();
  suspend(Wait::kDone);
  std::abort();  // a finished fiber is never resumed
}

// A stack with an inaccessible page below it: an overflow faults at once.
inline void* allocate_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    std::perror("cuda_host_emulation: mmap");
    std::abort();
  }
  mprotect(base, page, PROT_NONE);
  return static_cast<char*>(base) + page;
}

// Runs every thread of the current block to its end; false (with state.failure) on divergence.
inline bool run_block(int threads) {
  if (static_cast<int>(state.fibers.size()) < threads) state.fibers.resize(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = state.fibers[t];
    if (f.stack == nullptr) f.stack = allocate_stack();
    prepare_context(f.context, f.stack, kStackBytes, fiber_main);
    f.wait = Wait::kRunnable;
    f.shuffles = 0;
    f.pending.clear();
    f.committed.clear();
  }
  std::memset(state.shared, 0xFF, kSharedBytes);
  for (;;) {
    for (int i = 0; i < threads; ++i) {
      const int t = state.descending ? threads - 1 - i : i;
      if (state.fibers[t].wait != Wait::kRunnable) continue;
      state.current = t;
      threadIdx = {static_cast<unsigned int>(t), 0, 0};
      switch_context(state.scheduler, state.fibers[t].context);
    }
    // Every thread now waits or is done. Release warps whose lanes all wait at a shuffle first.
    bool released = false;
    for (int w = 0; w < threads; w += kWarpSize) {
      bool whole_warp = true;
      for (int t = w; t < w + kWarpSize; ++t) whole_warp = whole_warp && state.fibers[t].wait == Wait::kWarpBarrier;
      if (!whole_warp) continue;
      for (int t = w; t < w + kWarpSize; ++t) state.fibers[t].wait = Wait::kRunnable;
      released = true;
    }
    if (released) continue;
    int done = 0, at_barrier = 0;
    for (int t = 0; t < threads; ++t) {
      done += state.fibers[t].wait == Wait::kDone;
      at_barrier += state.fibers[t].wait == Wait::kBlockBarrier;
    }
    if (done == threads) return true;
    if (done + at_barrier < threads) {
      report(block_name() + ": a full-warp shuffle was not reached by every lane of its warp");
      return false;
    }
    if (done > 0) {
      report(block_name() + ": __syncthreads() reached by " + std::to_string(at_barrier) + " threads while " +
             std::to_string(done) + " had exited");
      return false;
    }
    for (int t = 0; t < threads; ++t) state.fibers[t].wait = Wait::kRunnable;
  }
}

// kernel<<<grid, block, dynamic_shared, stream>>>(args...), run to completion.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_shared, cudaStream_t, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel called with the wrong number of arguments");
  ++state.launches;
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > kMaxThreads || block.x % kWarpSize != 0 ||
      dynamic_shared != 0 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > state.max_grid_x ||
      grid.y > 65535 || grid.z > 65535) {
    state.last_error = cudaErrorInvalidValue;  // (the kernels use 1-D blocks of whole warps, static shared memory)
    return;
  }
  if (state.shared == nullptr) state.shared = static_cast<unsigned char*>(std::aligned_alloc(128, kSharedBytes));
  state.body = [&] { kernel(args...); };
  state.failure.clear();
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = state.descending ? blocks - 1 - i : i;
    blockIdx = {static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>(b / grid.x % grid.y),
                static_cast<unsigned int>(b / grid.x / grid.y)};
    if (!run_block(static_cast<int>(block.x)) || !state.failure.empty()) {
      state.last_error = cudaErrorLaunchFailure;
      return;
    }
  }
}

// The block's static shared array: every thread gets the same (poisoned) buffer.
inline unsigned char* block_shared_memory(size_t bytes, size_t alignment) {
  if (bytes > kSharedBytes) report("a __shared__ array of " + std::to_string(bytes) + " bytes exceeds 48 KiB");
  if (alignment > 128) report("__shared__ alignment above 128 is not emulated");
  return state.shared;
}

inline bool warp_leader() { return threadIdx.x % kWarpSize == 0; }

inline bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return state.shared != nullptr && c >= state.shared && c + bytes <= state.shared + kSharedBytes;
}

}  // namespace emu

// ---- Asynchronous copies (cuda_pipeline.h) ----
inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16) {
    emu::report("__pipeline_memcpy_async of " + std::to_string(size_and_align) + " bytes (4, 8 or 16 only)");
    return;
  }
  if (zfill > size_and_align || !emu::in_shared(dst_shared, size_and_align) ||
      reinterpret_cast<uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src_global) % size_and_align != 0) {
    emu::report(emu::block_name() + ": __pipeline_memcpy_async with a misaligned or non-shared address");
    return;
  }
  emu::AsyncCopy copy{dst_shared, {}, size_and_align};
  std::memcpy(copy.bytes, src_global, size_and_align - zfill);  // the rest is zero
  emu::state.fibers[emu::state.current].pending.push_back(copy);
}

inline void __pipeline_commit() {
  emu::Fiber& f = emu::state.fibers[emu::state.current];
  f.committed.push_back(std::move(f.pending));
  f.pending.clear();
}

// Completes (writes) every committed group but the newest `prior`.
inline void __pipeline_wait_prior(size_t prior) {
  emu::Fiber& f = emu::state.fibers[emu::state.current];
  while (f.committed.size() > prior) {
    for (const emu::AsyncCopy& c : f.committed.front()) std::memcpy(c.dst, c.bytes, c.size);
    f.committed.erase(f.committed.begin());
  }
}

// ---- Cache-hinted 16-byte global stores: the real one needs 16-byte alignment ----
inline void __stcg(uint4* address, uint4 value) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0)
    emu::report(emu::block_name() + ": a 16-byte store to an address that is not 16-byte aligned");
  std::memcpy(address, &value, sizeof(value));
}

// ---- Atomics, fences and cache-hinted loads: one thread runs at a time ----
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  const unsigned int old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline double __ldcg(const double* address) { return *address; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = emu::state.last_error;
  emu::state.last_error = cudaSuccess;
  return error;
}

inline void __syncthreads() { emu::suspend(emu::Wait::kBlockBarrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  if (mask != 0xffffffffu || width != emu::kWarpSize) emu::report("only full-warp shuffles are emulated");
  const int t = static_cast<int>(threadIdx.x), lane = t % emu::kWarpSize;
  // Consecutive shuffles use alternate buffers: a lane can be at most one shuffle
  // ahead of another (it cannot pass the next barrier alone), so what a slower
  // lane still has to read is never overwritten.
  uint64_t* buffer = emu::state.shuffled[emu::state.fibers[t].shuffles++ % 2];
  std::memcpy(&buffer[t], &value, sizeof(T));
  emu::suspend(emu::Wait::kWarpBarrier);  // every lane has written
  T out;
  std::memcpy(&out, &buffer[t - lane + (lane ^ lane_mask)], sizeof(T));
  return out;
}

// ---- WMMA (mma.h) ----
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <typename E>
struct Storage {
  using type = E;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};
template <typename Use, int M, int N, int K>
struct Shape;  // rows x cols of the fragment's matrix
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

// The real load/store need a 256-bit aligned pointer and a leading dimension of whole 16 bytes.
template <typename P>
void check_operand(const P* ptr, unsigned int ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    emu::report(emu::block_name() + ": " + what + " pointer is not 32-byte aligned");
  if ((ldm * sizeof(P)) % 16 != 0)
    emu::report(emu::block_name() + ": " + what + " leading dimension is not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename E, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<E>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows, cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements] = {};  // the whole matrix, row-major (meaningful in lane 0)
};

inline float __float_to_tf32(float v) {  // round to nearest, ties away, to 10 mantissa bits
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

template <typename Frag, typename V>
void fill_fragment(Frag& f, const V& v) {
  for (auto& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename E, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, E, Layout>& f, const P* ptr, unsigned int ldm) {
  using Frag = fragment<Use, M, N, K, E, Layout>;
  static_assert(std::is_same_v<P, typename Frag::element_type>, "operand type differs from the fragment's");
  if (!emu::warp_leader()) return;
  detail::check_operand(ptr, ldm, "load_matrix_sync");
  constexpr bool kRowMajor = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) f.x[r * Frag::cols + c] = kRowMajor ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <int M, int N, int K, typename EA, typename LA, typename EB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, EA, LA>& a,
              const fragment<matrix_b, M, N, K, EB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!emu::warp_leader()) return;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc = std::fmaf(detail::value(a.x[i * K + k]), detail::value(b.x[k * N + j]), acc);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned int ldm, layout_t layout) {
  if (!emu::warp_leader()) return;
  detail::check_operand(ptr, ldm, "store_matrix_sync");
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) ptr[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[r * N + c];
}

}  // namespace wmma
}  // namespace nvcuda
