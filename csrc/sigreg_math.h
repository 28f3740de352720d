// Per-element math of the SIGReg kernels, shared by the CPU and CUDA code so the
// CPU tests exercise the very formulas the GPU runs. Header-only, no torch.
//
// The knots are equally spaced, t_j = j * delta, so cos/sin(t_j p) follow from
// cos/sin(delta p) by rotation (angle addition): one sin/cos pair per element
// instead of one per knot. Why the recurrence is accurate: the angle error after
// j steps is j * |delta p| * eps, the same as rounding t_j * p directly, and the
// modulus drifts by at most j * eps (j <= 16 by default). The forward sums
// cos - 1 rather than cos (rotate_cosm1), so that at small angles, where C - phi
// is a small difference of two numbers near 1, that drift is relative to
// cos - 1, not to 1.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SIGREG_HD __host__ __device__ __forceinline__
#else
#define SIGREG_HD inline
#endif

namespace sigreg {

// Beyond this |argument| the float range reduction below loses accuracy;
// callers send such (rare) elements, and NaN/Inf, to std::sin/std::cos.
constexpr float kPolySinCosMaxArg = 8192.0f;

SIGREG_HD double knot_spacing(int knots, double t_max) {
  return t_max / static_cast<double>(knots - 1);
}

// (c, s) <- (c, s) rotated by the angle whose cosine and sine are (c1, s1).
template <typename T>
SIGREG_HD void rotate(T& c, T& s, T c1, T s1) {
  const T c_next = c * c1 - s * s1;
  s = s * c1 + c * s1;
  c = c_next;
}

// Branch-free float sin, cos and cos - 1 for |x| <= kPolySinCosMaxArg, written so
// the compiler can vectorize a loop over it (std::sin/std::cos do not vectorize).
// Cody-Waite reduction by pi/2 in three parts (the first ones have few mantissa
// bits, so q * part is exact), then minimax polynomials on [-pi/4, pi/4]
// (Cephes sinf/cosf coefficients): about 1 ulp.
// cos - 1 keeps full relative precision near x = 0 (where cos x rounds to within
// a few ulps of 1 and cos x - 1 would keep only those few bits): the polynomial
// without its leading 1 in quadrant 0; elsewhere |cos x - 1| >= 1 - cos(pi/4),
// and cos x - 1 loses nothing.
SIGREG_HD void sincos_cosm1_poly(float x, float* sin_out, float* cos_out, float* cosm1_out) {
  const float q = rintf(x * 0.636619772367581343f);  // nearest multiple of pi/2
  float r = x - q * 1.5703125f;
  r = r - q * 4.837512969970703125e-4f;
  r = r - q * 7.54978995489188216e-8f;
  const float r2 = r * r;
  const float sin_r = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cosm1_r =
      -0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const float cos_r = 1.0f + cosm1_r;
  const int quadrant = static_cast<int>(q) & 3;
  // quadrant 0: ( sin,  cos)   1: ( cos, -sin)   2: (-sin, -cos)   3: (-cos,  sin)
  const float s = (quadrant & 1) ? cos_r : sin_r;
  const float c = (quadrant & 1) ? sin_r : cos_r;
  *sin_out = (quadrant & 2) ? -s : s;
  *cos_out = ((quadrant + 1) & 2) ? -c : c;
  *cosm1_out = quadrant == 0 ? cosm1_r : *cos_out - 1.0f;
}

SIGREG_HD void sincos_poly(float x, float* sin_out, float* cos_out) {
  float cosm1;
  sincos_cosm1_poly(x, sin_out, cos_out, &cosm1);
}

// The forward's rotation carries u = cos - 1 instead of cos: (1 + u, s) rotated by
// the angle whose cos, cos - 1 and sin are (c1, u1, s1), rounded relative to u and
// s themselves. Rotating cos itself rounds to an ulp of 1 per knot, and for small
// angles those ulps are all of C - phi that is left after the cancellation. Same
// operation count: two FMAs each.
// Sample weights scale the state, (w u, w s); the rotation is linear in (1 + u, s), so the
// weighted state rotates with the additive constants scaled alike: (w u1, w s1) as u1, ws1.
template <typename T>
SIGREG_HD void rotate_cosm1(T& u, T& s, T c1, T u1, T s1, T ws1) {
  const T u_next = (u * c1 + u1) - s * s1;  // (1 + u) c1 - s s1 - 1
  s = s * c1 + (u * s1 + ws1);              // s c1 + (1 + u) s1
  u = u_next;
}

template <typename T>
SIGREG_HD void rotate_cosm1(T& u, T& s, T c1, T u1, T s1) {
  rotate_cosm1(u, s, c1, u1, s1, s1);
}

// Gradient of the per-slice statistic w.r.t. the ECF sums (SPEC §1):
// stat = N * sum_j w_j [(C_j - phi_j)^2 + S_j^2] with C_j = sum_cos_j / N, so
// d stat / d sum_cos_j = 2 w_j (C_j - phi_j) and d stat / d sum_sin_j = 2 w_j S_j.
// The backward kernels take any upstream gradient of the sums and turn it into
// the per-element coefficients of cos(t_j p) and sin(t_j p) in dstat/dp:
//   d/dp sum_cos_j = -t_j sin(t_j p),   d/dp sum_sin_j = t_j cos(t_j p).
template <typename T>
SIGREG_HD void knot_gradient_coefficients(T t_j, T grad_sum_cos, T grad_sum_sin, T* coef_cos, T* coef_sin) {
  *coef_cos = t_j * grad_sum_sin;   // multiplies cos(t_j p)
  *coef_sin = -t_j * grad_sum_cos;  // multiplies sin(t_j p)
}

}  // namespace sigreg
