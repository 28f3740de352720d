// The op schema, defined once; each device registers its kernels in its own file
// (csrc/cpu/, csrc/cuda/). The Python side adds fake kernels and autograd
// (sigreg_kernels/ops.py); the contract of the ops is written there.
#include <torch/extension.h>

TORCH_LIBRARY(sigreg, m) {
  // weights: None, or float32 [B, N] sample weights (contiguous; 0 means the row is left out,
  // whatever it holds): the contract's "Sample weights" (sigreg_kernels/primitives.py).
  m.def("ecf_sums(Tensor x, Tensor? directions, int knots, float t_max, Tensor? weights=None) -> (Tensor, Tensor)");
  m.def(
      "ecf_sums_backward(Tensor grad_sums, Tensor x, Tensor? directions, Tensor projection, "
      "int knots, float t_max, bool need_grad_directions, Tensor? weights=None) -> (Tensor, Tensor)");
  // The GPU kernels of sigreg_kernels/primitives.py (the contract), strung
  // together with library GEMMs by sigreg_kernels/fused.py.
  // arrivals: statistic's arrival counter (int32, one element), which ecf_partials
  // zeroes and statistic leaves at 0 again (so statistic does not declare it mutated).
  // moments: None, or float32 [B, 2] (sum w, sum w^2) of the sample weights.
  // unbiased: the U-statistic (|ECF|^2 without its i = j terms), sigreg_kernels/primitives.py.
  m.def(
      "ecf_partials(Tensor x, Tensor? directions, int knots, float t_max, Tensor(a!)? arrivals=None, "
      "Tensor? weights=None) -> Tensor");
  m.def(
      "statistic(Tensor partials, int samples, int knots, float t_max, str reduction, float? clip_value, "
      "float grad_factor, Tensor? arrivals=None, Tensor? moments=None, bool unbiased=False) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "slice_gradient(Tensor coef, Tensor scale, Tensor x, Tensor? directions, int knots, float t_max, "
      "Tensor? weights=None) -> Tensor");
  m.def(
      "slice_gradient_(Tensor(a!) projection, Tensor coef, Tensor scale, int knots, float t_max, "
      "Tensor? weights=None) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SIGReg kernels; the ops are torch.ops.sigreg.*";
#ifdef SIGREG_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
