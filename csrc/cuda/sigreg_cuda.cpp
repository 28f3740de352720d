// CUDA implementations of the sigreg kernel ops (schema in csrc/sigreg.cpp;
// semantics: sigreg_kernels/primitives.py): argument checks, output
// allocation, the plan, dtype dispatch, one launch on the current stream
// under a device guard. No other device work: no zero-fill, no copy of a
// contiguous input (but statistic zeroes an arrival counter of its own when
// the caller passes none). The kernels themselves are torch-free (sigreg_cuda_kernels.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../sigreg_math.h"
#include "sigreg_cuda_kernels.cuh"

namespace sigreg {
namespace {

cuda::DType kernel_dtype(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "sigreg: the CUDA kernels take float32, float16 or bfloat16 inputs, got ", type,
              " (float64 runs on the 'cpu' and 'reference' backends)");
  return type == at::kFloat  ? cuda::DType::kFloat32
         : type == at::kHalf ? cuda::DType::kFloat16
                             : cuda::DType::kBFloat16;
}

// The projection as torch.matmul computes it: tensor cores always for 16-bit
// inputs (float accumulation), for float32 only where TF32 is allowed
// (torch.set_float32_matmul_precision("high")), exact float FMAs otherwise.
// SIGREG_CUDA_DISABLE_TENSOR_CORES=1 forces the FMA path for every dtype.
cuda::Mode product_mode(at::ScalarType type, bool projected) {
  if (projected) return cuda::Mode::kProjected;
  const char* disable = std::getenv("SIGREG_CUDA_DISABLE_TENSOR_CORES");
  if (disable != nullptr && std::strcmp(disable, "1") == 0) return cuda::Mode::kFma;
  return type != at::kFloat || at::globalContext().allowTF32CuBLAS() ? cuda::Mode::kTensorCores : cuda::Mode::kFma;
}

struct DeviceInfo {
  int major = 0, multiprocessors = 0;
};

// Compute capability (checked: sm_80+) and SM count of x's device, queried once per device.
DeviceInfo device_info(const at::Tensor& x) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  const int index = x.get_device();
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "sigreg: CUDA device index ", index, " out of range");
  DeviceInfo& info = cache[index];
  if (info.multiprocessors == 0) {  // benign race: every thread writes the same values
    DeviceInfo queried;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&queried.major, cudaDevAttrComputeCapabilityMajor, index));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&queried.multiprocessors, cudaDevAttrMultiProcessorCount, index));
    info = queried;
  }
  TORCH_CHECK(info.major >= 8, "sigreg: the CUDA kernels need compute capability 8.0 or newer, got ", info.major,
              ".x on ", x.device(), " (the 'triton' or 'reference' backend runs there)");
  return info;
}

bool rows_of_vectors(const void* ptr, int64_t row_elements, const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_elements * t.element_size()) % 16 == 0;
}

void check_knots(int64_t knots, double t_max) {
  TORCH_CHECK(knots >= 2, "sigreg: knots must be >= 2, got ", knots);
  TORCH_CHECK(std::isfinite(t_max) && t_max > 0, "sigreg: t_max must be finite and > 0, got ", t_max);
}

// x [B, N, D] and directions [D, K] (or none: K = D), on one CUDA device, one dtype.
cuda::Problem check_x(const at::Tensor& x, const std::optional<at::Tensor>& directions, int64_t knots, double t_max) {
  TORCH_CHECK(x.dim() == 3, "sigreg: x must be 3-D (B, N, D), got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "sigreg: x must be a CUDA tensor, got ", x.device());
  kernel_dtype(x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, "sigreg: x must hold at least one sample (N > 0), got ", x.sizes());
  int64_t slices = x.size(2);
  if (directions.has_value()) {
    const at::Tensor& a = *directions;
    TORCH_CHECK(a.dim() == 2 && a.size(0) == x.size(2), "sigreg: directions must be (D, K) with D = x.size(2) = ",
                x.size(2), ", got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == x.scalar_type(), "sigreg: directions must have the dtype of x (",
                x.scalar_type(), "), got ", a.scalar_type());
    TORCH_CHECK(a.device() == x.device(), "sigreg: x and directions must be on one device, got ", x.device(),
                " and ", a.device());
    slices = a.size(1);
  }
  TORCH_CHECK(slices > 0, "sigreg: at least one slice is needed (K > 0), got x ", x.sizes());
  check_knots(knots, t_max);
  cuda::Problem p{x.size(0), x.size(1), x.size(2), slices, knots,
                  static_cast<float>(knot_spacing(static_cast<int>(knots), t_max))};
  const char* reason = cuda::unsupported_reason(p);
  TORCH_CHECK(reason == nullptr, "sigreg: ", reason, "; got x ", x.sizes(), ", knots ", knots);
  return p;
}

void check_coef(const at::Tensor& coef, const at::Tensor& scale, const cuda::Problem& p, const at::Tensor& x) {
  TORCH_CHECK(coef.dim() == 4 && coef.size(0) == p.batch && coef.size(1) == 2 && coef.size(2) == p.slices &&
                  coef.size(3) == p.knots,
              "sigreg: coef must be (B, 2, K, knots) = (", p.batch, ", 2, ", p.slices, ", ", p.knots, "), got ",
              coef.sizes());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == p.batch && scale.size(1) == p.slices,
              "sigreg: scale must be (B, K) = (", p.batch, ", ", p.slices, "), got ", scale.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat,
              "sigreg: coef and scale must be float32, got ", coef.scalar_type(), " and ", scale.scalar_type());
  TORCH_CHECK(coef.device() == x.device() && scale.device() == x.device(), "sigreg: coef and scale must be on ",
              x.device());
}

// Sample weights: float32 [batch, samples], contiguous (the kernels index rows
// directly), on x's device; as the kernels see them (nullptr: no weights).
const float* weights_ptr(const std::optional<at::Tensor>& weights, const at::Tensor& x) {
  if (!weights.has_value()) return nullptr;
  const at::Tensor& w = *weights;
  TORCH_CHECK(w.scalar_type() == at::kFloat, "sigreg: weights must be float32, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(1), "sigreg: weights must be (B, N) = (",
              x.size(0), ", ", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), "sigreg: weights must be on x's device (", x.device(), "), got ",
              w.device());
  TORCH_CHECK(w.is_contiguous(), "sigreg: weights must be contiguous, got strides ", w.strides());
  return w.const_data_ptr<float>();
}

// statistic's arrival counter: int32, one element, on `device`; as the kernels see it.
unsigned int* arrivals_ptr(const at::Tensor& arrivals, const at::Device& device) {
  TORCH_CHECK(arrivals.scalar_type() == at::kInt && arrivals.numel() == 1 && arrivals.device() == device,
              "sigreg: arrivals must be an int32 tensor of one element on ", device, ", got ",
              arrivals.scalar_type(), " ", arrivals.sizes(), " on ", arrivals.device());
  return reinterpret_cast<unsigned int*>(arrivals.data_ptr<int32_t>());
}

at::Tensor ecf_partials_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& directions_in, int64_t knots,
                             double t_max, const std::optional<at::Tensor>& arrivals,
                             const std::optional<at::Tensor>& weights) {
  const cuda::Problem p = check_x(x_in, directions_in, knots, t_max);
  unsigned int* arrivals_out = arrivals.has_value() ? arrivals_ptr(*arrivals, x_in.device()) : nullptr;
  const float* weights_in = weights_ptr(weights, x_in);
  const bool projected = !directions_in.has_value();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const DeviceInfo device = device_info(x_in);
  const cuda::PartialsPlan plan =
      cuda::plan_ecf_partials(p.batch, p.samples, p.slices, knots, projected, device.multiprocessors);
  at::Tensor partials = at::empty({p.batch, plan.splits, 2, p.slices, knots}, x_in.options().dtype(at::kFloat));
  if (p.batch == 0) return partials;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor directions = projected ? at::Tensor() : directions_in->contiguous();
  const void* directions_ptr = projected ? nullptr : directions.const_data_ptr();
  const cuda::PartialsArgs args{x.const_data_ptr(), directions_ptr, weights_in, partials.data_ptr<float>(),
                                p.batch, p.samples, p.dim, p.slices, p.knots, p.delta,
                                plan.k_tiles, plan.passes, plan.splits, plan.rows_per_split,
                                rows_of_vectors(x.const_data_ptr(), x.size(2), x),
                                !projected && rows_of_vectors(directions_ptr, p.slices, directions),
                                arrivals_out, 0};
  C10_CUDA_CHECK(cuda::launch_ecf_partials(plan, args, kernel_dtype(x.scalar_type()),
                                           product_mode(x.scalar_type(), projected),
                                           c10::cuda::getCurrentCUDAStream()));
  return partials;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> statistic_cuda(const at::Tensor& partials_in, int64_t samples,
                                                              int64_t knots, double t_max, c10::string_view reduction,
                                                              std::optional<double> clip_value, double grad_factor,
                                                              const std::optional<at::Tensor>& arrivals_in,
                                                              const std::optional<at::Tensor>& moments_in,
                                                              bool unbiased) {
  TORCH_CHECK(partials_in.dim() == 5 && partials_in.size(2) == 2 && partials_in.size(4) == knots &&
                  partials_in.size(1) > 0,
              "sigreg: partials must be (B, S, 2, K, knots) with S >= 1 and knots = ", knots, ", got ",
              partials_in.sizes());
  TORCH_CHECK(partials_in.is_cuda() && partials_in.scalar_type() == at::kFloat,
              "sigreg: partials must be a float32 CUDA tensor, got ", partials_in.scalar_type(), " on ",
              partials_in.device());
  // With moments the weights' sums stand in for the sample count, which is not used.
  TORCH_CHECK(moments_in.has_value() || samples > 0, "sigreg: samples must be > 0, got ", samples);
  if (moments_in.has_value()) {
    const at::Tensor& m = *moments_in;
    TORCH_CHECK(m.scalar_type() == at::kFloat, "sigreg: moments must be float32, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == partials_in.size(0) && m.size(1) == 2,
                "sigreg: moments must be (B, 2) = (", partials_in.size(0), ", 2) (sum w, sum w^2), got ", m.sizes());
    TORCH_CHECK(m.device() == partials_in.device(), "sigreg: moments must be on the partials' device (",
                partials_in.device(), "), got ", m.device());
    TORCH_CHECK(m.is_contiguous(), "sigreg: moments must be contiguous, got strides ", m.strides());
  }
  check_knots(knots, t_max);
  cuda::Reduction kind;
  if (reduction == "mean") {
    kind = cuda::Reduction::kMean;
  } else if (reduction == "sum") {
    kind = cuda::Reduction::kSum;
  } else {
    TORCH_CHECK(reduction == "none", "sigreg: reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
    kind = cuda::Reduction::kNone;
  }
  if (arrivals_in.has_value()) arrivals_ptr(*arrivals_in, partials_in.device());
  const int64_t batch = partials_in.size(0), slices = partials_in.size(3);
  const c10::cuda::CUDAGuard guard(partials_in.device());
  const at::TensorOptions options = partials_in.options();
  at::Tensor stat = at::empty({batch, slices}, options);
  at::Tensor coef = at::empty({batch, 2, slices, knots}, options);
  const bool mean = kind == cuda::Reduction::kMean;
  if (batch == 0 || slices == 0) {  // no launch; the mean of nothing is NaN
    return {stat, coef, at::full({}, mean ? std::numeric_limits<double>::quiet_NaN() : 0.0, options)};
  }
  at::Tensor loss = at::empty({}, options);
  const at::Tensor partials = partials_in.contiguous();
  const cuda::StatisticPlan plan = cuda::plan_statistic(batch, slices, knots);
  // A counter of its own (a fill: one device op more) for callers without ecf_partials' zeroed one.
  const at::Tensor arrivals = arrivals_in.has_value() ? *arrivals_in : at::zeros({1}, options.dtype(at::kInt));
  const at::Tensor block_sums = at::empty({plan.blocks}, options.dtype(at::kDouble));  // every block writes its own
  const double elements = static_cast<double>(batch * slices);
  const double factor = mean ? grad_factor / elements : grad_factor;
  const float* moments = moments_in.has_value() ? moments_in->const_data_ptr<float>() : nullptr;
  const cuda::StatisticArgs args{partials.const_data_ptr<float>(), stat.data_ptr<float>(), coef.data_ptr<float>(),
                                 moments, batch, partials.size(1), slices, knots, samples,
                                 knot_spacing(static_cast<int>(knots), t_max), factor,
                                 clip_value.has_value(), static_cast<float>(clip_value.value_or(0.0)),
                                 plan.slices_per_block, plan.cached, block_sums.data_ptr<double>(),
                                 arrivals_ptr(arrivals, partials_in.device()), loss.data_ptr<float>(),
                                 mean ? elements : 1.0, plan.blocks, 0, unbiased};
  C10_CUDA_CHECK(cuda::launch_statistic(plan, args, c10::cuda::getCurrentCUDAStream()));
  return {stat, coef, loss};
}

// G of coef and scale at x (with directions) or at the projection x (without), into g.
void slice_gradient_into(const at::Tensor& g, const at::Tensor& coef_in, const at::Tensor& scale,
                         const at::Tensor& x, const at::Tensor& directions, const float* weights,
                         const cuda::Problem& p) {
  const bool projected = !directions.defined();
  const DeviceInfo device = device_info(x);
  const cuda::GradientPlan plan =
      cuda::plan_slice_gradient(p.batch, p.samples, p.slices, p.knots, projected, device.multiprocessors);
  if (plan.blocks == 0) return;
  const at::Tensor coef = coef_in.contiguous();
  const void* directions_ptr = projected ? nullptr : directions.const_data_ptr();
  const cuda::GradientArgs args{coef.const_data_ptr<float>(), scale.const_data_ptr<float>(), scale.stride(0),
                                scale.stride(1), x.const_data_ptr(), directions_ptr, weights, g.data_ptr(),
                                p.batch, p.samples, p.dim, p.slices, p.knots, p.delta,
                                plan.n_tiles, plan.k_tiles, plan.passes,
                                rows_of_vectors(x.const_data_ptr(), x.size(2), x),
                                !projected && rows_of_vectors(directions_ptr, p.slices, directions),
                                rows_of_vectors(g.data_ptr(), p.slices, g), 0};
  C10_CUDA_CHECK(cuda::launch_slice_gradient(plan, args, kernel_dtype(x.scalar_type()),
                                             product_mode(x.scalar_type(), projected),
                                             c10::cuda::getCurrentCUDAStream()));
}

at::Tensor slice_gradient_cuda(const at::Tensor& coef, const at::Tensor& scale, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& directions_in, int64_t knots, double t_max,
                               const std::optional<at::Tensor>& weights) {
  const cuda::Problem p = check_x(x_in, directions_in, knots, t_max);
  check_coef(coef, scale, p, x_in);
  const float* weights_in = weights_ptr(weights, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor g = at::empty({p.batch, p.samples, p.slices}, x_in.options());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor directions = directions_in.has_value() ? directions_in->contiguous() : at::Tensor();
  slice_gradient_into(g, coef, scale, x, directions, weights_in, p);
  return g;
}

void slice_gradient_inplace_cuda(const at::Tensor& projection, const at::Tensor& coef, const at::Tensor& scale,
                                 int64_t knots, double t_max, const std::optional<at::Tensor>& weights) {
  const cuda::Problem p = check_x(projection, std::nullopt, knots, t_max);
  check_coef(coef, scale, p, projection);
  const float* weights_in = weights_ptr(weights, projection);
  TORCH_CHECK(projection.is_contiguous(), "sigreg: slice_gradient_ overwrites a contiguous projection, got strides ",
              projection.strides());
  const c10::cuda::CUDAGuard guard(projection.device());
  slice_gradient_into(projection, coef, scale, projection, at::Tensor(), weights_in, p);
}

}  // namespace
}  // namespace sigreg

TORCH_LIBRARY_IMPL(sigreg, CUDA, m) {
  m.impl("ecf_partials", &sigreg::ecf_partials_cuda);
  m.impl("statistic", &sigreg::statistic_cuda);
  m.impl("slice_gradient", &sigreg::slice_gradient_cuda);
  m.impl("slice_gradient_", &sigreg::slice_gradient_inplace_cuda);
}
