// Argument checks of the ops, shared by the device implementations. The Python
// API checks first with friendlier messages; these guard direct op calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

namespace sigreg {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_ecf_inputs(const at::Tensor& x, const at::Tensor& directions, int64_t knots, double t_max,
                             at::DeviceType device) {
  TORCH_CHECK(x.dim() == 3, "sigreg: x must be 3-D (B, N, D), got ", x.sizes());
  TORCH_CHECK(directions.dim() == 2, "sigreg: directions must be 2-D (D, K), got ", directions.sizes());
  TORCH_CHECK(directions.size(0) == x.size(2), "sigreg: directions must have D = x.size(2) = ", x.size(2),
              " rows, got ", directions.sizes());
  TORCH_CHECK(x.size(1) > 0, "sigreg: x must hold at least one sample (N > 0), got ", x.sizes());
  TORCH_CHECK(directions.size(1) > 0, "sigreg: directions must hold at least one slice (K > 0)");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "sigreg: x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(directions.scalar_type() == x.scalar_type(), "sigreg: directions must have the dtype of x (",
              x.scalar_type(), "), got ", directions.scalar_type());
  TORCH_CHECK(x.device().type() == device && directions.device() == x.device(),
              "sigreg: x and directions must be on one ", c10::DeviceTypeName(device), " device, got ", x.device(),
              " and ", directions.device());
  TORCH_CHECK(knots >= 2, "sigreg: knots must be >= 2, got ", knots);
  TORCH_CHECK(std::isfinite(t_max) && t_max > 0, "sigreg: t_max must be finite and > 0, got ", t_max);
}

// The kernels choose their own precisions: matmuls inside them must not be
// re-cast by an autocast region the op was called from.
struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

inline void check_grad_sums(const at::Tensor& grad_sums, const at::Tensor& x, const at::Tensor& directions,
                            int64_t knots) {
  TORCH_CHECK(grad_sums.dim() == 4 && grad_sums.size(0) == x.size(0) && grad_sums.size(1) == 2 &&
                  grad_sums.size(2) == directions.size(1) && grad_sums.size(3) == knots,
              "sigreg: grad_sums must have shape (B, 2, K, knots) = (", x.size(0), ", 2, ", directions.size(1), ", ",
              knots, "), got ", grad_sums.sizes());
  TORCH_CHECK(grad_sums.device() == x.device(), "sigreg: grad_sums must be on ", x.device());
}

}  // namespace sigreg
