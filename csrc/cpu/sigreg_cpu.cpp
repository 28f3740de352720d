// Fused SIGReg kernels for the CPU.
//
// Forward: P = x_b A with at::matmul (the product torch.matmul would compute,
// same precision rules), then the ECF sums at every knot in one pass over P:
// sums of cos(t_j p) - 1 and sin(t_j p) (cpu/registration.py's contract).
// The projection is kept for the backward: it saves a third matmul, and its
// N x K floats are far below the N x K x T tensors the reference builds.
// Backward: G (dstat/dP) row tile by row tile, each tile turned into its rows
// of dx = G A^T (and dA += x^T G) right away, so only one tile of G exists.
// Without directions (the univariate test of x's columns) P = x: no product in
// either pass, nothing kept by the forward, and G is written straight into dx.
//
// Determinism: forward work is split by slice (each task owns whole columns
// of the sums and walks all rows in order), backward by row; no result
// depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../sigreg_checks.h"
#include "../sigreg_math.h"

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time, so one build is fast on any x86-64 machine. Their helpers must be
// inlined into them (SIGREG_INLINE) to be compiled for each instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIGREG_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SIGREG_INLINE inline __attribute__((always_inline))
#else
#define SIGREG_CPU_CLONES
#define SIGREG_INLINE inline
#endif

namespace sigreg {
namespace {

constexpr int64_t kSliceBlock = 64;  // slices per vector loop: the accumulators stay in L1
constexpr int64_t kRowBlock = 128;   // rows summed in the working dtype before joining the float64 total

// sin, cos and cos - 1 of `angle[0..width)` (width <= kSliceBlock): a vectorized
// polynomial, then std::sin/std::cos for the rare elements outside its range
// (huge, Inf or NaN). Inlined into each clone of its callers, so it is compiled
// for each instruction set too. cosm1_out may be null (the backward needs no cos - 1).
SIGREG_INLINE void sincos_block(const float* angle, int64_t width, float* sin_out, float* cos_out,
                                float* cosm1_out) {
  // Out-of-range elements (overwritten below) go through the polynomial as 0:
  // its float-to-int conversion of a NaN, Inf or huge quadrant is undefined
  // behaviour (UBSan's float-cast-overflow), not merely a wrong value. A
  // separate pass: a select inside the polynomial's loop stops GCC from
  // vectorizing it (5x slower); this pass costs about 10% of the sin/cos.
  float safe[kSliceBlock];
  int out_of_range = 0;
#pragma omp simd reduction(| : out_of_range)
  for (int64_t i = 0; i < width; ++i) {
    const bool in_range = std::fabs(angle[i]) <= kPolySinCosMaxArg;
    safe[i] = in_range ? angle[i] : 0.0f;
    out_of_range |= !in_range;
  }
  if (cosm1_out != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) sincos_cosm1_poly(safe[i], &sin_out[i], &cos_out[i], &cosm1_out[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) sincos_poly(safe[i], &sin_out[i], &cos_out[i]);
  }
  if (out_of_range) {
    for (int64_t i = 0; i < width; ++i) {
      if (!(std::fabs(angle[i]) <= kPolySinCosMaxArg)) {
        sin_out[i] = std::sin(angle[i]);
        cos_out[i] = std::cos(angle[i]);
        if (cosm1_out != nullptr) cosm1_out[i] = cos_out[i] - 1.0f;  // (the angle's own error is larger)
      }
    }
  }
}

inline void sincos_block(const double* angle, int64_t width, double* sin_out, double* cos_out,
                         double* cosm1_out) {
  for (int64_t i = 0; i < width; ++i) {
    sin_out[i] = std::sin(angle[i]);
    cos_out[i] = std::cos(angle[i]);
    if (cosm1_out != nullptr) {
      const double half_sin = std::sin(0.5 * angle[i]);
      cosm1_out[i] = -2.0 * half_sin * half_sin;  // cos - 1, full relative precision near 0
    }
  }
}

// The knot loops work on kLanes slices at once held in GCC vector types, so the
// rotation state stays in registers whatever instruction set a clone targets.
constexpr int64_t kLanes = 16;
template <typename T>
struct LaneVector {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
using lanes_t = typename LaneVector<T>::type;

template <typename T>
SIGREG_INLINE lanes_t<T> load_lanes(const T* p) {
  lanes_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
SIGREG_INLINE void store_lanes(T* p, const lanes_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// cos/sin (and cos - 1 unless cosm1 is null) of delta * p for up to kRows rows of one slice block; lanes
// past `width` get angle 0 so every vector loop runs over whole kSliceBlock lanes.
constexpr int kRows = 2;  // rows per pass: they share the accumulator / coefficient traffic
// weights (null: none): a row of weight 0 gets angle 0 whatever p holds (NaN, Inf), so that
// it contributes exactly nothing.
template <typename scalar_t>
SIGREG_INLINE void unit_rotations(const scalar_t* p, int64_t stride, int rows, int64_t width, scalar_t delta,
                           const scalar_t* weights, scalar_t (&cos1)[kRows][kSliceBlock],
                           scalar_t (&sin1)[kRows][kSliceBlock], scalar_t (*cosm1)[kSliceBlock]) {
  scalar_t angle[kSliceBlock];
  for (int r = 0; r < rows; ++r) {
    const int64_t used = weights != nullptr && !(weights[r] > 0) ? 0 : width;
    for (int64_t i = 0; i < kSliceBlock; ++i) angle[i] = i < used ? delta * p[r * stride + i] : scalar_t(0);
    sincos_block(angle, kSliceBlock, sin1[r], cos1[r], cosm1 == nullptr ? nullptr : cosm1[r]);
  }
}

// acc_cos/acc_sin [knots][kSliceBlock] += cos(t_j p) - 1 / sin(t_j p) summed over `rows` (<= kRows)
// rows. Knot 0 (cos 0 - 1 = 0, sin 0 = 0) adds nothing. WEIGHTED: each row's terms times its
// weight w, carried as (w (cos - 1), w sin) from the additive constants (w u1, w sin1) that
// unit_weights made (cosm1 scaled in place, wsin1), the rotation itself by (c1, s1).
template <int ROWS, bool WEIGHTED, typename scalar_t>
SIGREG_INLINE void accumulate_ecf(const scalar_t (&cos1)[kRows][kSliceBlock], const scalar_t (&sin1)[kRows][kSliceBlock],
                           const scalar_t (&cosm1)[kRows][kSliceBlock], const scalar_t (&wsin1)[kRows][kSliceBlock],
                           int64_t knots, scalar_t* acc_cos, scalar_t* acc_sin) {
  using V = lanes_t<scalar_t>;
  for (int64_t l0 = 0; l0 < kSliceBlock; l0 += kLanes) {
    V c1[ROWS], s1[ROWS], u1[ROWS], ws1[ROWS], u[ROWS], s[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      c1[r] = load_lanes(&cos1[r][l0]);
      s1[r] = load_lanes(&sin1[r][l0]);
      u1[r] = load_lanes(&cosm1[r][l0]);
      if (WEIGHTED) ws1[r] = load_lanes(&wsin1[r][l0]);
      u[r] = u1[r];  // knot 1
      s[r] = WEIGHTED ? ws1[r] : s1[r];
    }
    for (int64_t j = 1; j < knots; ++j) {
      if (j > 1) {
        for (int r = 0; r < ROWS; ++r) rotate_cosm1(u[r], s[r], c1[r], u1[r], s1[r], WEIGHTED ? ws1[r] : s1[r]);
      }
      V sum_c = u[0], sum_s = s[0];
      for (int r = 1; r < ROWS; ++r) {
        sum_c += u[r];
        sum_s += s[r];
      }
      scalar_t* pc = acc_cos + j * kSliceBlock + l0;
      scalar_t* ps = acc_sin + j * kSliceBlock + l0;
      store_lanes(pc, load_lanes(pc) + sum_c);
      store_lanes(ps, load_lanes(ps) + sum_s);
    }
  }
}

// The additive constants of a weighted row: cos - 1 scaled in place, w sin1 beside sin1.
template <typename scalar_t>
SIGREG_INLINE void unit_weights(const scalar_t* weights, int rows, const scalar_t (&sin1)[kRows][kSliceBlock],
                                scalar_t (&cosm1)[kRows][kSliceBlock], scalar_t (&wsin1)[kRows][kSliceBlock]) {
  for (int r = 0; r < rows; ++r) {
    const scalar_t w = weights[r] > 0 ? weights[r] : scalar_t(0);
    for (int64_t i = 0; i < kSliceBlock; ++i) {
      cosm1[r][i] *= w;
      wsin1[r][i] = w * sin1[r][i];
    }
  }
}

// weights: null (every row weighs 1), or the rows' weights.
template <typename scalar_t>
SIGREG_CPU_CLONES void accumulate_ecf_rows(const scalar_t* p, int64_t stride, int64_t rows, int64_t width,
                                           int64_t knots, scalar_t delta, const scalar_t* weights,
                                           scalar_t* acc_cos, scalar_t* acc_sin) {
  scalar_t cos1[kRows][kSliceBlock], sin1[kRows][kSliceBlock], cosm1[kRows][kSliceBlock], wsin1[kRows][kSliceBlock];
  for (int64_t n = 0; n < rows; n += kRows) {
    const int pass_rows = static_cast<int>(std::min<int64_t>(kRows, rows - n));
    const scalar_t* w = weights == nullptr ? nullptr : weights + n;
    unit_rotations(p + n * stride, stride, pass_rows, width, delta, w, cos1, sin1, cosm1);
    if (w != nullptr) {
      unit_weights(w, pass_rows, sin1, cosm1, wsin1);
      if (pass_rows == kRows) {
        accumulate_ecf<kRows, true>(cos1, sin1, cosm1, wsin1, knots, acc_cos, acc_sin);
      } else {
        accumulate_ecf<1, true>(cos1, sin1, cosm1, wsin1, knots, acc_cos, acc_sin);
      }
    } else if (pass_rows == kRows) {
      accumulate_ecf<kRows, false>(cos1, sin1, cosm1, wsin1, knots, acc_cos, acc_sin);
    } else {
      accumulate_ecf<1, false>(cos1, sin1, cosm1, wsin1, knots, acc_cos, acc_sin);
    }
  }
}

// g rows = sum_j coef_cos[j] cos(t_j p) + coef_sin[j] sin(t_j p) for `rows` (<= kRows) rows of
// one slice block; coef rows have stride `coef_stride` and are padded to whole blocks.
template <int ROWS, typename scalar_t>
SIGREG_INLINE void gradient_rows(const scalar_t (&cos1)[kRows][kSliceBlock], const scalar_t (&sin1)[kRows][kSliceBlock],
                          int64_t knots, const scalar_t* coef_cos, const scalar_t* coef_sin, int64_t coef_stride,
                          scalar_t (&g)[kRows][kSliceBlock]) {
  using V = lanes_t<scalar_t>;
  for (int64_t l0 = 0; l0 < kSliceBlock; l0 += kLanes) {
    V c1[ROWS], s1[ROWS], c[ROWS], s[ROWS], acc[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      c1[r] = c[r] = load_lanes(&cos1[r][l0]);
      s1[r] = s[r] = load_lanes(&sin1[r][l0]);
      acc[r] = V{} ;  // knot 0 has t_0 = 0: no contribution
    }
    for (int64_t j = 1; j < knots; ++j) {
      if (j > 1) {
        for (int r = 0; r < ROWS; ++r) rotate(c[r], s[r], c1[r], s1[r]);
      }
      const V a = load_lanes(coef_cos + j * coef_stride + l0);
      const V b = load_lanes(coef_sin + j * coef_stride + l0);
      for (int r = 0; r < ROWS; ++r) acc[r] += a * c[r] + b * s[r];
    }
    for (int r = 0; r < ROWS; ++r) store_lanes(&g[r][l0], acc[r]);
  }
}

// sums [B, 2, K, knots] from the projection [B, N, K] (weights: undefined, or [B, N]).
template <typename scalar_t>
void ecf_sums_from_projection(const at::Tensor& projection, const at::Tensor& weights, int64_t knots, double t_max,
                              at::Tensor& sums) {
  const int64_t batch = projection.size(0), samples = projection.size(1), slices = projection.size(2);
  const int64_t slice_blocks = (slices + kSliceBlock - 1) / kSliceBlock;
  const scalar_t delta = static_cast<scalar_t>(knot_spacing(static_cast<int>(knots), t_max));
  const scalar_t* proj = projection.data_ptr<scalar_t>();
  const scalar_t* w = weights.defined() ? weights.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = sums.data_ptr<scalar_t>();

  at::parallel_for(0, batch * slice_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(2 * knots * kSliceBlock);
    std::vector<double> total(2 * knots * kSliceBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slice_blocks, k0 = (task % slice_blocks) * kSliceBlock;
      const int64_t width = std::min(kSliceBlock, slices - k0);
      std::fill(total.begin(), total.end(), 0.0);
      // Two-level sum: short runs in the working dtype, their totals in float64,
      // so the error does not grow with N (the statistic subtracts phi from C).
      for (int64_t row0 = 0; row0 < samples; row0 += kRowBlock) {
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        const int64_t row1 = std::min(samples, row0 + kRowBlock);
        accumulate_ecf_rows(proj + (b * samples + row0) * slices + k0, slices, row1 - row0, width, knots, delta,
                            w == nullptr ? nullptr : w + b * samples + row0, acc.data(),
                            acc.data() + knots * kSliceBlock);
        for (size_t i = 0; i < acc.size(); ++i) total[i] += static_cast<double>(acc[i]);
      }
      for (int64_t part = 0; part < 2; ++part) {  // 0: cos - 1, 1: sin
        for (int64_t i = 0; i < width; ++i) {
          for (int64_t j = 0; j < knots; ++j) {
            out[((b * 2 + part) * slices + k0 + i) * knots + j] =
                static_cast<scalar_t>(total[(part * knots + j) * kSliceBlock + i]);
          }
        }
      }
    }
  });
}

// G rows of `rows` (<= kRows) consecutive rows of one batch, all slices.
// weights: null, or the rows' weights (G times the weight; 0 on a row of weight 0).
template <typename scalar_t>
SIGREG_CPU_CLONES void gradient_of_rows(const scalar_t* p, int rows, int64_t slices, int64_t knots, scalar_t delta,
                                        const scalar_t* weights, const scalar_t* coef_cos, const scalar_t* coef_sin,
                                        int64_t coef_stride, scalar_t* g_out) {
  scalar_t cos1[kRows][kSliceBlock], sin1[kRows][kSliceBlock], g[kRows][kSliceBlock];
  for (int64_t k0 = 0; k0 < slices; k0 += kSliceBlock) {
    const int64_t width = std::min(kSliceBlock, slices - k0);
    unit_rotations(p + k0, slices, rows, width, delta, weights, cos1, sin1,
                   static_cast<scalar_t (*)[kSliceBlock]>(nullptr));
    if (rows == kRows) {
      gradient_rows<kRows>(cos1, sin1, knots, coef_cos + k0, coef_sin + k0, coef_stride, g);
    } else {
      gradient_rows<1>(cos1, sin1, knots, coef_cos + k0, coef_sin + k0, coef_stride, g);
    }
    if (weights != nullptr) {
      for (int r = 0; r < rows; ++r) {
        const scalar_t w = weights[r] > 0 ? weights[r] : scalar_t(0);
        for (int64_t i = 0; i < width; ++i) g[r][i] *= w;
      }
    }
    for (int r = 0; r < rows; ++r) std::memcpy(g_out + r * slices + k0, g[r], width * sizeof(scalar_t));
  }
}

// G rows [row0, row1) of the flattened [B*N, K] projection into g_tile [row1-row0, K].
// coef: [B, 2, knots, coef_stride] (cos then sin coefficients, slices padded to whole blocks).
template <typename scalar_t>
void gradient_tile(const scalar_t* proj, const scalar_t* weights, const scalar_t* coef, int64_t samples, int64_t slices,
                   int64_t coef_stride, int64_t knots, scalar_t delta, int64_t row0, int64_t row1, scalar_t* g_tile) {
  at::parallel_for(row0, row1, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / samples;
      // Rows of one pass share their batch's coefficients.
      const int rows = (r + 1 < end && (r + 1) / samples == b) ? kRows : 1;
      const scalar_t* coef_cos = coef + b * 2 * knots * coef_stride;
      gradient_of_rows(proj + r * slices, rows, slices, knots, delta, weights == nullptr ? nullptr : weights + r,
                       coef_cos, coef_cos + knots * coef_stride, coef_stride, g_tile + (r - row0) * slices);
      r += rows;
    }
  });
}

// directions=None (the univariate test of x's own columns, K = D): the op's own
// checks, since there is no (D, K) matrix to check against x.
void check_column_inputs(const at::Tensor& x, int64_t knots, double t_max) {
  TORCH_CHECK(x.dim() == 3, "sigreg: x must be 3-D (B, N, D), got ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, "sigreg: x must hold at least one sample (N > 0), got ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, "sigreg: x must have at least one column (D > 0) when directions is None, got ",
              x.sizes());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "sigreg: x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.device().type() == at::kCPU, "sigreg: x must be a cpu tensor, got ", x.device());
  TORCH_CHECK(knots >= 2, "sigreg: knots must be >= 2, got ", knots);
  TORCH_CHECK(std::isfinite(t_max) && t_max > 0, "sigreg: t_max must be finite and > 0, got ", t_max);
}

// Checks the inputs and returns K: directions.size(1), or D without directions.
int64_t check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& directions, int64_t knots,
                     double t_max) {
  if (!directions.has_value()) {
    check_column_inputs(x, knots, t_max);
    return x.size(2);
  }
  check_ecf_inputs(x, *directions, knots, t_max, at::kCPU);
  return directions->size(1);
}

// The sample weights as the kernels read them: undefined, or [B, N] contiguous in the accumulation dtype.
at::Tensor checked_weights(const std::optional<at::Tensor>& weights, const at::Tensor& x, at::ScalarType acc) {
  if (!weights.has_value()) return at::Tensor();
  const at::Tensor& w = *weights;
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == x.size(1),
              "sigreg: weights must have shape (B, N) = (", x.size(0), ", ", x.size(1), "), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), "sigreg: weights must be on ", x.device(), ", got ", w.device());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()) || w.scalar_type() == at::kBool,
              "sigreg: weights must be bool or floating point, got ", w.scalar_type());
  return w.to(acc).contiguous();
}

// Without directions P = x: no product, and nothing to keep for the backward
// (it reads x, which autograd saves anyway), so the projection output is empty.
std::tuple<at::Tensor, at::Tensor> ecf_sums_cpu(const at::Tensor& x, const std::optional<at::Tensor>& directions,
                                                int64_t knots, double t_max, const std::optional<at::Tensor>& weights) {
  const int64_t slices = check_inputs(x, directions, knots, t_max);
  NoAutocastGuard no_autocast;
  const auto acc = accumulation_dtype(x.scalar_type());
  const at::Tensor w = checked_weights(weights, x, acc);
  const at::Tensor projection = directions.has_value()
                                    ? at::matmul(x.to(acc), directions->to(acc)).contiguous()
                                    : x.to(acc).contiguous();
  at::Tensor sums = at::empty({x.size(0), 2, slices, knots}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "sigreg_ecf_sums_cpu",
                             [&] { ecf_sums_from_projection<scalar_t>(projection, w, knots, t_max, sums); });
  if (!directions.has_value()) return {sums, at::empty({0}, x.options().dtype(acc))};
  return {sums, projection};
}

std::tuple<at::Tensor, at::Tensor> ecf_sums_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& x,
                                                         const std::optional<at::Tensor>& directions,
                                                         const at::Tensor& projection, int64_t knots, double t_max,
                                                         bool need_grad_directions,
                                                         const std::optional<at::Tensor>& weights) {
  const int64_t slices = check_inputs(x, directions, knots, t_max);
  TORCH_CHECK(grad_sums.dim() == 4 && grad_sums.size(0) == x.size(0) && grad_sums.size(1) == 2 &&
                  grad_sums.size(2) == slices && grad_sums.size(3) == knots,
              "sigreg: grad_sums must have shape (B, 2, K, knots) = (", x.size(0), ", 2, ", slices, ", ", knots,
              "), got ", grad_sums.sizes());
  TORCH_CHECK(grad_sums.device() == x.device(), "sigreg: grad_sums must be on ", x.device());
  TORCH_CHECK(directions.has_value() || !need_grad_directions,
              "sigreg: need_grad_directions requires directions (got None)");
  NoAutocastGuard no_autocast;
  const auto acc = accumulation_dtype(x.scalar_type());
  const int64_t batch = x.size(0), samples = x.size(1), dim = x.size(2);
  const int64_t rows = batch * samples;
  const at::Tensor w = checked_weights(weights, x, acc);
  at::Tensor x_acc = x.to(acc).contiguous().view({rows, dim});
  // A row of weight 0 gets G = 0; it must not bring NaN or Inf into x^T G either.
  if (w.defined() && need_grad_directions) x_acc = at::where(w.view({rows, 1}) > 0, x_acc, at::zeros({}, x_acc.options()));
  const at::Tensor a_acc = directions.has_value() ? directions->to(acc).contiguous() : at::Tensor();
  // Without directions P = x. A projection from the forward is reused; without one (a direct call), recompute it.
  const at::Tensor proj = !directions.has_value()               ? x_acc
                          : projection.numel() == rows * slices ? projection.to(acc).contiguous().view({rows, slices})
                                                                : at::matmul(x_acc, a_acc);

  // Coefficients [B, 2, knots, K] of cos(t_j p) and sin(t_j p) in dstat/dp, knot-major
  // so the inner loop over slices reads them contiguously.
  const at::Tensor t = at::arange(knots, grad_sums.options().dtype(at::kDouble)) * knot_spacing(knots, t_max);
  const at::Tensor g = grad_sums.to(at::kDouble);
  const at::Tensor coef_cos = g.select(1, 1) * t;   // t_j * d/dsum_sin
  const at::Tensor coef_sin = -g.select(1, 0) * t;  // -t_j * d/dsum_cos
  const int64_t coef_stride = (slices + kSliceBlock - 1) / kSliceBlock * kSliceBlock;
  at::Tensor coef = at::zeros({batch, 2, knots, coef_stride}, x.options().dtype(acc));
  coef.narrow(3, 0, slices).copy_(at::stack({coef_cos, coef_sin}, 1).transpose(2, 3));

  at::Tensor grad_x = at::empty({rows, dim}, x.options().dtype(acc));
  if (!directions.has_value()) {
    // dx = G: written straight into grad_x, all rows at once (no product follows).
    AT_DISPATCH_FLOATING_TYPES(acc, "sigreg_ecf_sums_backward_cpu", [&] {
      const scalar_t delta = static_cast<scalar_t>(knot_spacing(static_cast<int>(knots), t_max));
      gradient_tile<scalar_t>(proj.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                              coef.data_ptr<scalar_t>(), samples, slices, coef_stride, knots, delta, 0, rows,
                              grad_x.data_ptr<scalar_t>());
    });
    // A row of weight 0 gets exactly 0, even where the statistic is NaN (0 * NaN coefficients).
    if (w.defined()) grad_x = at::where(w.view({rows, 1}) > 0, grad_x, at::zeros({}, grad_x.options()));
    return {grad_x.view({batch, samples, dim}).to(x.scalar_type()), at::empty({0}, x.options())};
  }

  at::Tensor grad_a = need_grad_directions ? at::zeros({dim, slices}, x.options().dtype(acc)) : at::Tensor();
  const int64_t tile_rows = std::max<int64_t>(64, (int64_t{1} << 18) / slices);  // ~1 MiB of G in float32
  at::Tensor g_tile = at::empty({std::min(tile_rows, rows), slices}, x.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES(acc, "sigreg_ecf_sums_backward_cpu", [&] {
    const scalar_t delta = static_cast<scalar_t>(knot_spacing(static_cast<int>(knots), t_max));
    for (int64_t row0 = 0; row0 < rows; row0 += tile_rows) {
      const int64_t row1 = std::min(rows, row0 + tile_rows);
      at::Tensor g_rows = g_tile.narrow(0, 0, row1 - row0);
      gradient_tile<scalar_t>(proj.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                              coef.data_ptr<scalar_t>(), samples, slices, coef_stride, knots, delta, row0, row1,
                              g_rows.data_ptr<scalar_t>());
      at::Tensor grad_x_rows = grad_x.narrow(0, row0, row1 - row0);
      at::mm_out(grad_x_rows, g_rows, a_acc.t());
      if (w.defined()) {  // rows of weight 0: exactly 0, even with NaN directions or statistics (0 * NaN)
        const scalar_t* wr = w.data_ptr<scalar_t>() + row0;
        scalar_t* out = grad_x_rows.data_ptr<scalar_t>();
        for (int64_t r = 0; r < row1 - row0; ++r) {
          if (!(wr[r] > 0)) std::fill(out + r * dim, out + (r + 1) * dim, scalar_t(0));
        }
      }
      if (need_grad_directions) grad_a.addmm_(x_acc.narrow(0, row0, row1 - row0).t(), g_rows);
    }
  });

  at::Tensor grad_x_out = grad_x.view({batch, samples, dim}).to(x.scalar_type());
  at::Tensor grad_a_out = need_grad_directions ? grad_a.to(directions->scalar_type())
                                               : at::empty({0}, directions->options());
  return {grad_x_out, grad_a_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(sigreg, CPU, m) {
  m.impl("ecf_sums", &ecf_sums_cpu);
  m.impl("ecf_sums_backward", &ecf_sums_backward_cpu);
}

}  // namespace sigreg
