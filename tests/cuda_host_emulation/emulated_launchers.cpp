// A C interface to the sigreg CUDA kernels running in the host emulation, for
// ctypes. It does what the ATen launcher (csrc/cuda/sigreg_cuda.cpp) does
// around the torch-free launch functions: plans (the same C++ plan functions,
// also exposed here so the tests compare them with sigreg_kernels/cuda_plan.py),
// fills the argument structs and launches. The caller allocates the outputs
// (guarded, NaN-filled) from the plan. Host memory stands in for device memory.
#include <cstdint>

#include "sigreg_cuda_kernels.host.cpp"  // csrc/cuda/sigreg_cuda_kernels.cu, rewritten by the test

using namespace sigreg::cuda;

namespace {

constexpr int kUnsupported = -1;

float knot_spacing_f(int64_t knots, double t_max) {
  return static_cast<float>(sigreg::knot_spacing(static_cast<int>(knots), t_max));
}

bool rows_of_vectors(const void* ptr, int64_t row_elements, int64_t element_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_elements * element_size) % 16 == 0;
}

int64_t element_size(int dtype) { return static_cast<DType>(dtype) == DType::kFloat32 ? 4 : 2; }

}  // namespace

extern "C" {

void sigreg_emu_set_descending(int descending) { emu::state.descending = descending != 0; }

// Returns the cap it replaces.
int64_t sigreg_emu_set_max_grid_x(int64_t limit) {
  const int64_t previous = static_cast<int64_t>(emu::state.max_grid_x);
  emu::state.max_grid_x = static_cast<uint64_t>(limit);
  return previous;
}

// Kernel launches since the last call.
int64_t sigreg_emu_take_launches() {
  const int64_t launches = static_cast<int64_t>(emu::state.launches);
  emu::state.launches = 0;
  return launches;
}

// The first failure of the last launch ("" if none): divergence, misaligned WMMA operands or copies.
const char* sigreg_emu_failure() { return emu::state.failure.c_str(); }

// The plans: out = [tile, k_tiles, passes, splits, rows_per_split, blocks, launches].
void sigreg_emu_plan_ecf_partials(int64_t batch, int64_t samples, int64_t slices, int64_t knots, int projected,
                                  int64_t num_sms, int64_t* out) {
  const PartialsPlan p = plan_ecf_partials(batch, samples, slices, knots, projected != 0, num_sms,
                                           static_cast<int64_t>(emu::state.max_grid_x));
  const int64_t values[] = {static_cast<int64_t>(p.tile), p.k_tiles, p.passes, p.splits, p.rows_per_split,
                            p.blocks, p.launches};
  for (int i = 0; i < 7; ++i) out[i] = values[i];
}

// out = [tile, n_tiles, k_tiles, passes, blocks, launches].
void sigreg_emu_plan_slice_gradient(int64_t batch, int64_t samples, int64_t slices, int64_t knots, int projected,
                                    int64_t num_sms, int64_t* out) {
  const GradientPlan p = plan_slice_gradient(batch, samples, slices, knots, projected != 0, num_sms,
                                             static_cast<int64_t>(emu::state.max_grid_x));
  const int64_t values[] = {static_cast<int64_t>(p.tile), p.n_tiles, p.k_tiles, p.passes, p.blocks, p.launches};
  for (int i = 0; i < 6; ++i) out[i] = values[i];
}

// out = [slices_per_block, blocks, launches, cached].
void sigreg_emu_plan_statistic(int64_t batch, int64_t slices, int64_t knots, int64_t* out) {
  const StatisticPlan p = plan_statistic(batch, slices, knots, static_cast<int64_t>(emu::state.max_grid_x));
  out[0] = p.slices_per_block;
  out[1] = p.blocks;
  out[2] = p.launches;
  out[3] = p.cached ? 1 : 0;
}

// mode: sigreg::cuda::Mode (kProjected: directions is null, x holds the projection).
// arrivals: statistic's counter (one int32), set to 0 by the kernel, or null.
// weights: float [batch, samples] sample weights, or null.
int sigreg_emu_ecf_partials(int dtype, int mode, const void* x, const void* directions, float* partials,
                            int64_t batch, int64_t samples, int64_t dim, int64_t slices, int64_t knots, double t_max,
                            int64_t num_sms, int32_t* arrivals, const float* weights) {
  const Problem problem{batch, samples, dim, slices, knots, knot_spacing_f(knots, t_max)};
  if (unsupported_reason(problem) != nullptr) return kUnsupported;
  const bool projected = static_cast<Mode>(mode) == Mode::kProjected;
  const PartialsPlan plan = plan_ecf_partials(batch, samples, slices, knots, projected, num_sms,
                                              static_cast<int64_t>(emu::state.max_grid_x));
  if (batch == 0) return cudaSuccess;
  const PartialsArgs args{x, directions, weights, partials, batch, samples, dim, slices, knots, problem.delta,
                          plan.k_tiles, plan.passes, plan.splits, plan.rows_per_split,
                          rows_of_vectors(x, dim, element_size(dtype)),
                          !projected && rows_of_vectors(directions, slices, element_size(dtype)),
                          reinterpret_cast<unsigned int*>(arrivals), 0};
  return launch_ecf_partials(plan, args, static_cast<DType>(dtype), static_cast<Mode>(mode), nullptr,
                             static_cast<int64_t>(emu::state.max_grid_x));
}

// reduction: sigreg::cuda::Reduction; clip: whether clip_value applies. arrivals: the
// counter (holding 0), block_sums: the plan's blocks doubles, loss: one float (the
// caller fills loss for an empty problem: no launch). moments: float [batch, 2] (sum w,
// sum w^2) of sample weights, or null. unbiased: the U-statistic.
int sigreg_emu_statistic(const float* partials, float* stat, float* coef, int64_t batch, int64_t splits,
                         int64_t slices, int64_t knots, int64_t samples, double t_max, int reduction, int clip,
                         double clip_value, double grad_factor, int32_t* arrivals, double* block_sums, float* loss,
                         const float* moments, int unbiased) {
  const StatisticPlan plan = plan_statistic(batch, slices, knots, static_cast<int64_t>(emu::state.max_grid_x));
  if (plan.blocks == 0) return cudaSuccess;
  const bool mean = static_cast<Reduction>(reduction) == Reduction::kMean;
  const double elements = static_cast<double>(batch * slices);
  const double factor = mean ? grad_factor / elements : grad_factor;
  const StatisticArgs args{partials, stat, coef, moments, batch, splits, slices, knots, samples,
                           sigreg::knot_spacing(static_cast<int>(knots), t_max), factor, clip != 0,
                           static_cast<float>(clip_value), plan.slices_per_block, plan.cached, block_sums,
                           reinterpret_cast<unsigned int*>(arrivals), loss, mean ? elements : 1.0,
                           plan.blocks, 0, unbiased != 0};
  return launch_statistic(plan, args, nullptr, static_cast<int64_t>(emu::state.max_grid_x));
}

// g may be x itself (projected: slice_gradient_). weights: float [batch, samples], or null.
int sigreg_emu_slice_gradient(int dtype, int mode, const float* coef, const float* scale, int64_t scale_stride_b,
                              int64_t scale_stride_k, const void* x, const void* directions, void* g, int64_t batch,
                              int64_t samples, int64_t dim, int64_t slices, int64_t knots, double t_max,
                              int64_t num_sms, const float* weights) {
  const Problem problem{batch, samples, dim, slices, knots, knot_spacing_f(knots, t_max)};
  if (unsupported_reason(problem) != nullptr) return kUnsupported;
  const bool projected = static_cast<Mode>(mode) == Mode::kProjected;
  const GradientPlan plan = plan_slice_gradient(batch, samples, slices, knots, projected, num_sms,
                                                static_cast<int64_t>(emu::state.max_grid_x));
  if (plan.blocks == 0) return cudaSuccess;
  const GradientArgs args{coef, scale, scale_stride_b, scale_stride_k, x, directions, weights, g,
                          batch, samples, dim, slices, knots, problem.delta,
                          plan.n_tiles, plan.k_tiles, plan.passes,
                          rows_of_vectors(x, dim, element_size(dtype)),
                          !projected && rows_of_vectors(directions, slices, element_size(dtype)),
                          rows_of_vectors(g, slices, element_size(dtype)), 0};
  return launch_slice_gradient(plan, args, static_cast<DType>(dtype), static_cast<Mode>(mode), nullptr,
                               static_cast<int64_t>(emu::state.max_grid_x));
}

}  // extern "C"
