// CUDA implementations of the sigreg ops (schema in csrc/sigreg.cpp): argument
// checks, output and workspace allocation, dtype dispatch, launch on the
// current stream under a device guard. The kernels themselves are torch-free
// (sigreg_cuda_kernels.cu); nothing here runs on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../sigreg_checks.h"
#include "../sigreg_math.h"
#include "sigreg_cuda_kernels.cuh"

namespace sigreg {
namespace {

cuda::DType kernel_dtype(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "sigreg: the CUDA kernels take float32, float16 or bfloat16 inputs, got ", type,
              " (float64 runs on the 'reference' backend)");
  return type == at::kFloat  ? cuda::DType::kFloat32
         : type == at::kHalf ? cuda::DType::kFloat16
                             : cuda::DType::kBFloat16;
}

// Tensor cores as torch.matmul uses them: always for 16-bit inputs (float
// accumulation); for float32 only where TF32 is allowed
// (torch.set_float32_matmul_precision("high")), exact float FMAs otherwise.
// SIGREG_CUDA_DISABLE_TENSOR_CORES=1 forces the FMA path for every dtype.
bool use_tensor_cores(at::ScalarType type) {
  const char* disable = std::getenv("SIGREG_CUDA_DISABLE_TENSOR_CORES");
  if (disable != nullptr && std::strcmp(disable, "1") == 0) return false;
  return type != at::kFloat || at::globalContext().allowTF32CuBLAS();
}

void check_compute_capability(const at::Tensor& x) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  TORCH_CHECK(major >= 8, "sigreg: the CUDA kernels need compute capability 8.0 or newer, got ", major,
              ".x on ", x.device(), " (the 'triton' or 'reference' backend runs there)");
}

// The kernels' view of the problem; x and directions are contiguous [B, N, D] and [D, K].
cuda::Problem make_problem(const at::Tensor& x, const at::Tensor& directions, int64_t knots, double t_max) {
  TORCH_INTERNAL_ASSERT(x.is_contiguous() && directions.is_contiguous());
  cuda::Problem p{x.size(0), x.size(1), x.size(2), directions.size(1), knots, 0.0f};
  const char* reason = cuda::unsupported_reason(p);
  TORCH_CHECK(reason == nullptr, "sigreg: ", reason, "; got x ", x.sizes(), ", directions ", directions.sizes(),
              ", knots ", knots);
  p.delta = static_cast<float>(knot_spacing(static_cast<int>(knots), t_max));
  return p;
}

// An output laid out like the fake kernels' (empty_like keeps the input's
// strides), and the contiguous buffer the kernels write.
std::tuple<at::Tensor, at::Tensor> output_like(const at::Tensor& input) {
  at::Tensor out = at::empty_like(input);
  return {out, out.is_contiguous() ? out : at::empty(input.sizes(), input.options())};
}

std::tuple<at::Tensor, at::Tensor> ecf_sums_cuda(const at::Tensor& x_in, const at::Tensor& directions_in,
                                                 int64_t knots, double t_max) {
  check_ecf_inputs(x_in, directions_in, knots, t_max, at::kCUDA);
  const cuda::DType dtype = kernel_dtype(x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_compute_capability(x_in);
  const at::Tensor x = x_in.contiguous(), directions = directions_in.contiguous();
  const cuda::Problem p = make_problem(x, directions, knots, t_max);

  const at::TensorOptions float_options = x.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({p.batch, 2, p.slices, knots}, float_options);
  at::Tensor projection = at::empty({0}, float_options);  // recomputed by the backward, never stored
  if (p.batch == 0) return {sums, projection};

  const cuda::ForwardPlan plan = cuda::plan_forward(p);
  at::Tensor workspace = at::empty({plan.workspace_floats}, float_options);
  C10_CUDA_CHECK(cuda::launch_ecf_sums(p, plan, dtype, use_tensor_cores(x.scalar_type()), x.const_data_ptr(),
                                       directions.const_data_ptr(), workspace.data_ptr<float>(),
                                       sums.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {sums, projection};
}

std::tuple<at::Tensor, at::Tensor> ecf_sums_backward_cuda(const at::Tensor& grad_sums_in, const at::Tensor& x_in,
                                                          const at::Tensor& directions_in,
                                                          const at::Tensor& projection, int64_t knots, double t_max,
                                                          bool need_grad_directions) {
  check_ecf_inputs(x_in, directions_in, knots, t_max, at::kCUDA);
  check_grad_sums(grad_sums_in, x_in, directions_in, knots);
  TORCH_CHECK(grad_sums_in.scalar_type() == at::kFloat, "sigreg: grad_sums must be float32, got ",
              grad_sums_in.scalar_type());
  TORCH_CHECK(projection.numel() == 0, "sigreg: the CUDA backward recomputes the projection; expected the empty "
              "projection of the CUDA forward, got ", projection.sizes());
  const cuda::DType dtype = kernel_dtype(x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_compute_capability(x_in);
  const at::Tensor x = x_in.contiguous(), directions = directions_in.contiguous();
  const at::Tensor grad_sums = grad_sums_in.contiguous();
  const cuda::Problem p = make_problem(x, directions, knots, t_max);

  auto [grad_x, grad_x_buffer] = output_like(x_in);
  at::Tensor grad_directions, grad_directions_buffer;
  if (need_grad_directions) {
    std::tie(grad_directions, grad_directions_buffer) = output_like(directions_in);
    if (p.batch == 0) grad_directions_buffer.zero_();  // a sum over no samples
  } else {
    grad_directions = at::empty({0}, directions.options());
  }
  if (p.batch > 0) {
    const bool directions_wanted = need_grad_directions && p.dim > 0;
    const cuda::BackwardPlan plan = cuda::plan_backward(p, directions_wanted);
    const at::TensorOptions float_options = x.options().dtype(at::kFloat);
    at::Tensor coef = at::empty({plan.coef_floats}, float_options);
    at::Tensor directions_workspace = at::empty({plan.directions_floats}, float_options);
    C10_CUDA_CHECK(cuda::launch_ecf_sums_backward(
        p, plan, dtype, use_tensor_cores(x.scalar_type()), grad_sums.const_data_ptr<float>(), x.const_data_ptr(),
        directions.const_data_ptr(), coef.data_ptr<float>(), grad_x_buffer.data_ptr(),
        directions_wanted ? directions_workspace.data_ptr<float>() : nullptr,
        directions_wanted ? grad_directions_buffer.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream()));
  }
  if (!grad_x.is_same(grad_x_buffer)) grad_x.copy_(grad_x_buffer);
  if (need_grad_directions && !grad_directions.is_same(grad_directions_buffer))
    grad_directions.copy_(grad_directions_buffer);
  return {grad_x, grad_directions};
}

}  // namespace
}  // namespace sigreg

TORCH_LIBRARY_IMPL(sigreg, CUDA, m) {
  m.impl("ecf_sums", &sigreg::ecf_sums_cuda);
  m.impl("ecf_sums_backward", &sigreg::ecf_sums_backward_cuda);
}
