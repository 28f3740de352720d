// A C interface to the sigreg CUDA kernels running in the host emulation, for
// ctypes. It does what the ATen launcher (csrc/cuda/sigreg_cuda.cpp) does
// around the torch-free launch functions: checks the sizes, plans, allocates
// the workspaces (filled with NaN, so that reading an entry no block wrote
// shows, and guarded, so that writing past either end shows) and launches.
// Host memory stands in for device memory.
#include <algorithm>
#include <limits>
#include <vector>

#include "sigreg_cuda_kernels.host.cpp"  // csrc/cuda/sigreg_cuda_kernels.cu, rewritten by the test

using namespace sigreg::cuda;

namespace {

constexpr int kUnsupported = -1;
int64_t max_grid_yz = kMaxGridYZ;  // lowered by tests to make a small batch take several launches
constexpr int kWroteOutsideWorkspace = -2;

// A workspace filled with NaN between guard regions that must keep their value.
class Workspace {
 public:
  explicit Workspace(int64_t floats)
      : floats_(static_cast<size_t>(floats)), buffer_(floats_ + 2 * kGuard, kGuardValue) {
    std::fill(data(), data() + floats_, std::numeric_limits<float>::quiet_NaN());
  }
  float* data() { return buffer_.data() + kGuard; }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (buffer_[i] != kGuardValue || buffer_[kGuard + floats_ + i] != kGuardValue) return false;
    return true;
  }

 private:
  static constexpr size_t kGuard = 4096;
  static constexpr float kGuardValue = -1234.5f;
  size_t floats_;
  std::vector<float> buffer_;
};

Problem make_problem(int64_t batch, int64_t samples, int64_t dim, int64_t slices, int64_t knots, double t_max) {
  return {batch, samples, dim, slices, knots, static_cast<float>(sigreg::knot_spacing(static_cast<int>(knots), t_max))};
}

}  // namespace

extern "C" {

void sigreg_emu_set_descending(int descending) { emu::state.descending = descending != 0; }

// Returns the cap it replaces.
int64_t sigreg_emu_set_max_grid_yz(int64_t limit) {
  const int64_t previous = max_grid_yz;
  max_grid_yz = limit;
  return previous;
}

// The first failure of the last launch ("" if none): divergence, misaligned WMMA operands.
const char* sigreg_emu_failure() { return emu::state.failure.c_str(); }

int sigreg_emu_ecf_sums(int dtype, int tensor_cores, const void* x, const void* directions, float* sums,
                        int64_t batch, int64_t samples, int64_t dim, int64_t slices, int64_t knots, double t_max) {
  const Problem p = make_problem(batch, samples, dim, slices, knots, t_max);
  if (unsupported_reason(p) != nullptr) return kUnsupported;
  if (p.batch == 0) return cudaSuccess;
  const ForwardPlan plan = plan_forward(p, max_grid_yz);
  Workspace workspace(plan.workspace_floats);
  const int error = launch_ecf_sums(p, plan, static_cast<DType>(dtype), tensor_cores != 0, x, directions,
                                    workspace.data(), sums, nullptr);
  return error != cudaSuccess || workspace.guards_intact() ? error : kWroteOutsideWorkspace;
}

// grad_directions null: not wanted.
int sigreg_emu_ecf_sums_backward(int dtype, int tensor_cores, const float* grad_sums, const void* x,
                                 const void* directions, void* grad_x, void* grad_directions, int64_t batch,
                                 int64_t samples, int64_t dim, int64_t slices, int64_t knots, double t_max) {
  const Problem p = make_problem(batch, samples, dim, slices, knots, t_max);
  if (unsupported_reason(p) != nullptr) return kUnsupported;
  if (p.batch == 0) return cudaSuccess;  // the caller zeroes grad_directions: a sum over no samples
  const bool directions_wanted = grad_directions != nullptr && p.dim > 0;
  const BackwardPlan plan = plan_backward(p, directions_wanted, max_grid_yz);
  Workspace coef(plan.coef_floats), directions_workspace(plan.directions_floats);
  const int error = launch_ecf_sums_backward(
      p, plan, static_cast<DType>(dtype), tensor_cores != 0, grad_sums, x, directions, coef.data(), grad_x,
      directions_wanted ? directions_workspace.data() : nullptr, directions_wanted ? grad_directions : nullptr,
      nullptr);
  const bool intact = coef.guards_intact() && directions_workspace.guards_intact();
  return error != cudaSuccess || intact ? error : kWroteOutsideWorkspace;
}

}  // extern "C"
