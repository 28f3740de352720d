// The op schema, defined once; each device registers its kernels in its own file
// (csrc/cpu/, csrc/cuda/). The Python side adds fake kernels and autograd
// (sigreg_kernels/ops.py); the contract of both ops is written there.
#include <torch/extension.h>

TORCH_LIBRARY(sigreg, m) {
  m.def("ecf_sums(Tensor x, Tensor directions, int knots, float t_max) -> (Tensor, Tensor)");
  m.def(
      "ecf_sums_backward(Tensor grad_sums, Tensor x, Tensor directions, Tensor projection, "
      "int knots, float t_max, bool need_grad_directions) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SIGReg kernels; the ops are torch.ops.sigreg.*";
#ifdef SIGREG_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
