// Per-element and per-row math shared by the CPU and CUDA kernels.
//
// One copy of every formula. Each formula is a template over T, the arithmetic
// type: `float` / `double` on the host and the device, and
// `at::vec::Vectorized<float|double>` in the CPU kernels (cpu/vec_ops.h
// specialises MathOps for it). The semantics are those of
// shared/design/losses.md; the derivations are in README.md ("Numerics").
//
// Every binary term is written in t and u = 1 - t so that nothing cancels at saturated
// logits:
//   bce(x, t)   = t * softplus(-x) + u * softplus(x)  = (x >= 0 ? u : t) |x| + log(1 + e^-|x|)
//   d bce / dx  = u * sigmoid(x) - t * sigmoid(-x)
//   focal z     = t * softplus(x) + u * softplus(-x)  = (x >= 0 ? t : u) |x| + log(1 + e^-|x|)
//   m = exp(-gamma * z)
// which equal softplus(x) - t x, sigmoid(x) - t and t x + softplus(-x) exactly. The
// softplus mixes are taken in their right-hand form (softplus_mix): two non-negative terms,
// one select and one multiply-add.
#pragma once

#include <cmath>
#include <cstdint>

#include "cbfused/kinds.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CBF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: a formula that is not inlined into a vector loop returns its struct through
// memory and spills every live vector register around the call.
#define CBF_HD inline __attribute__((always_inline))
#else
#define CBF_HD inline
#endif

namespace cbfused {

// Primitive operations on T. Mask is what comparisons return and select takes.
// exp_nonpos and expm1_nonpos take x <= 0 (or NaN) only: every exp of the losses is of a
// non-positive number (e^-|x|, exp(-gamma softplus), exp(gamma log(1 - p)), exp(log p),
// exp(x - max)), and the CPU vector exp needs no upper clamp then.
template <typename T>
struct MathOps;

template <typename T>
struct ScalarMathOps {
  using Mask = bool;
  static CBF_HD T exp_nonpos(T x) { return ::exp(x); }
  static CBF_HD T log(T x) { return ::log(x); }
  static CBF_HD T log1p(T x) { return ::log1p(x); }
  static CBF_HD T expm1_nonpos(T x) { return ::expm1(x); }
  // log1p for x in [0, 1] (the CPU vector version exploits the narrow domain).
  static CBF_HD T log1p_unit(T x) { return log1p(x); }
  // log1p for x in [-1/2, 0]: log(1 - p) of a probability p <= 1/2, exact for tiny p where
  // log(1 - p) would round 1 - p first (the CPU vector version exploits the narrow domain).
  static CBF_HD T log1p_neg_half(T x) { return log1p(x); }
  static CBF_HD T abs(T x) { return ::fabs(x); }
  // 1 / x for x in [1, 2] (the CPU vector version may use a hardware estimate + Newton).
  static CBF_HD T recip_1_2(T x) { return T(1) / x; }
  static CBF_HD T max(T a, T b) { return a > b ? a : b; }
  static CBF_HD Mask ge(T a, T b) { return a >= b; }
  static CBF_HD Mask gt(T a, T b) { return a > b; }
  static CBF_HD T select(Mask m, T if_true, T if_false) { return m ? if_true : if_false; }
};

template <>
struct MathOps<float> : ScalarMathOps<float> {
  static CBF_HD float exp_nonpos(float x) { return ::expf(x); }
  static CBF_HD float log(float x) { return ::logf(x); }
  static CBF_HD float log1p(float x) { return ::log1pf(x); }
  static CBF_HD float log1p_unit(float x) { return ::log1pf(x); }
  static CBF_HD float log1p_neg_half(float x) { return ::log1pf(x); }
  static CBF_HD float expm1_nonpos(float x) { return ::expm1f(x); }
  static CBF_HD float abs(float x) { return ::fabsf(x); }
};

template <>
struct MathOps<double> : ScalarMathOps<double> {};

// softplus(x), softplus(-x), sigmoid(x) and sigmoid(-x) from one exp and one
// log1p, each accurate to a few ulp for every finite x (no log(1 + exp(x))).
template <typename T>
struct Logistic {
  T sp_pos;                       // softplus(x)  = log(1 + e^x)
  T sp_neg;                       // softplus(-x) = log(1 + e^-x)
  T sig_pos;                      // sigmoid(x)
  T sig_neg;                      // sigmoid(-x) = 1 - sigmoid(x), without the cancellation
  T abs_x;                        // |x|
  T l;                            // log(1 + e^-|x|): softplus(+-x) = max(+-x, 0) + l
  typename MathOps<T>::Mask pos;  // x >= 0
};

template <typename T>
CBF_HD Logistic<T> logistic(T x) {
  using O = MathOps<T>;
  const T zero(0), one(1);
  const T e = O::exp_nonpos(-O::abs(x));  // in (0, 1]
  const T l = O::log1p_unit(e);
  const T r = O::recip_1_2(one + e);
  const T er = e * r;
  const auto pos = O::ge(x, zero);
  Logistic<T> out;
  out.sp_pos = O::max(x, zero) + l;
  out.sp_neg = O::max(-x, zero) + l;
  out.sig_pos = O::select(pos, r, er);
  out.sig_neg = O::select(pos, er, r);
  out.abs_x = O::abs(x);
  out.l = l;
  out.pos = pos;
  return out;
}

// a softplus(-x) + b softplus(x) for a + b = 1 (a, b >= 0): bce(x, t) with (a, b) = (t, u),
// the focal exponent z with (u, t). Equal to (x >= 0 ? b : a) |x| + l, since
// max(-x, 0) = |x| for x < 0 and max(x, 0) = |x| for x >= 0: two non-negative terms, so
// nothing cancels, and one select and one multiply-add where the combination of the two
// softplus takes five operations. (At a t = 0 lane the bits are those of softplus(x)
// itself: 1 |x| + l and 0 |x| + l are exact.)
template <typename T>
CBF_HD T softplus_mix(const Logistic<T>& L, T a, T b) {
  using O = MathOps<T>;
  return O::select(L.pos, b, a) * L.abs_x + L.l;
}

// Class-balanced paper's sigmoid focal term (losses.md, "focal"), for a target
// t in [0, 1], gamma >= 0 and alpha_t already folded into `scale`:
//   loss = m * bce,  m = exp(-gamma * (t x + softplus(-x)))
//   dloss/dx = m * ((sigmoid(x) - t) + gamma * (1 - sigmoid(x) - t) * bce)
// kFocal = false gives the plain sigmoid cross-entropy (gamma = 0).
//
// pow_k >= 0 is a shortcut the caller may take when every t is 0 or 1 and gamma is
// the integer pow_k: then m = (1 - p_t)^gamma = (u sigmoid(x) + t sigmoid(-x))^pow_k,
// by multiplication instead of a second exp (same value, to rounding).
//
// kT, what the caller knows of t:
//   kTargetAny:  nothing (t in [0, 1]);
//   kTargetZero: t = 0 (a one-hot row away from its class): the same formulas with t = 0,
//                u = 1 folded (the compiler may not fold 0 * v itself: inf * 0 is NaN);
//   kTargetLow:  t <= 1/2 (label smoothing's eps / 2 away from a class index's class): the
//                differences sigmoid(x) - t and 1 - sigmoid(x) - t taken directly, one
//                operation each where the convex forms take two and sigmoid(-x). The
//                convex forms guard the t -> 1 end (sigmoid(x) - 1 at large x loses all of
//                sigmoid(-x)); for t <= 1/2 both forms carry the same absolute error, an
//                ulp of t or of sigmoid(x).
constexpr int kTargetAny = 0, kTargetZero = 1, kTargetLow = 2;

template <bool kZeroT, typename T>
CBF_HD T convex(T t, T u, T a, T b) {  // t a + u b
  if constexpr (kZeroT) {
    return b;
  } else {
    return t * a + u * b;
  }
}

template <bool kZeroT, typename T>
CBF_HD T convex_diff(T t, T u, T a, T b) {  // u b - t a
  if constexpr (kZeroT) {
    return b;
  } else {
    return u * b - t * a;
  }
}

// base^k for an integer k >= 0 by repeated multiplication (k = 0 gives 1, k = 1 base
// itself: 1 * base is not formed).
template <typename T>
CBF_HD T integer_power(T base, int k) {
  T m = k == 0 ? T(1) : base;
  for (int i = 1; i < k; ++i) m = m * base;
  return m;
}

// The term above from logistic(x) (L) and u = 1 - t, for a caller that has them already;
// binary_term (below) from x.
template <bool kFocal, bool kGrad, int kT = kTargetAny, typename T, typename G>
CBF_HD void binary_term_of(const Logistic<T>& L, T t, T u, G gamma, T& loss, T& grad, int pow_k = -1) {
  using O = MathOps<T>;
  constexpr bool kZeroT = kT == kTargetZero;
  T bce, d1;  // bce(x, t), sigmoid(x) - t
  if constexpr (kZeroT) {
    bce = L.sp_pos;
    d1 = L.sig_pos;
  } else {
    bce = softplus_mix(L, t, u);
    d1 = kT == kTargetLow ? L.sig_pos - t : convex_diff<false>(t, u, L.sig_neg, L.sig_pos);
  }
  if constexpr (!kFocal) {
    loss = bce;
    if constexpr (kGrad) grad = d1;
  } else {
    const T g(gamma);
    T m;
    if (pow_k >= 0) {
      m = integer_power(convex<kZeroT>(t, u, L.sig_neg, L.sig_pos), pow_k);  // (1 - p_t)^pow_k
    } else {
      const T z = kZeroT ? L.sp_neg : softplus_mix(L, u, t);  // t x + softplus(-x)
      m = O::exp_nonpos(-g * z);
    }
    loss = m * bce;
    if constexpr (kGrad) {
      // 1 - sigmoid(x) - t
      const T d2 = kT == kTargetLow ? u - L.sig_pos : convex_diff<kZeroT>(t, u, L.sig_pos, L.sig_neg);
      grad = m * (d1 + g * d2 * bce);
    }
  }
}

template <bool kFocal, bool kGrad, int kT = kTargetAny, typename T, typename G>
CBF_HD void binary_term(T x, T t, G gamma, T& loss, T& grad, int pow_k = -1) {
  binary_term_of<kFocal, kGrad, kT>(logistic(x), t, T(1) - t, gamma, loss, grad, pow_k);
}

// torchvision.ops.sigmoid_focal_loss's term, exactly its semantics for soft
// targets too: loss = bce * (1 - p_t)^gamma, p_t = p t + (1 - p)(1 - t).
//   B = 1 - p_t = u sigmoid(x) + t sigmoid(-x),  m = B^gamma
//   dm/dx = gamma * m * sigmoid(x) sigmoid(-x) (u - t) / B
// B = 0 only when t is 0 or 1 and x saturates past the dtype's range; there m -> 0
// (gamma > 0) and dm -> 0.
// pow_k >= 0: gamma is that integer (small_integer_gamma), for any t in [0, 1]: then
// m = B^k and dm/dx = k B^(k-1) sigmoid(x) sigmoid(-x) (u - t) by multiplication, with no
// log, exp or division (the same values to rounding; at B = 0 the same limits).
// binary_t: the caller knows every t is 0 or 1. Then B = exp(-z) with binary_term's focal
// exponent z = t softplus(x) + u softplus(-x), so m = exp(-gamma z) and
// dm/dx = gamma m (u sigmoid(-x) - t sigmoid(x)): binary_term<true>, the same values to
// rounding, with no log of B and no division (for any gamma).
template <bool kGrad, typename T, typename G>
CBF_HD void torchvision_focal_term(T x, T t, G gamma, T& loss, T& grad, int pow_k = -1,
                                   bool binary_t = false) {
  using O = MathOps<T>;
  const T zero(0), one(1);
  const T u = one - t;
  const Logistic<T> L = logistic(x);
  if (binary_t && pow_k < 0) {
    binary_term_of<true, kGrad>(L, t, u, gamma, loss, grad);
    return;
  }
  const T bce = softplus_mix(L, t, u);
  const T B = u * L.sig_pos + t * L.sig_neg;
  if (pow_k >= 0) {
    const T pk1 = pow_k >= 1 ? integer_power(B, pow_k - 1) : one;  // B^(k-1)
    const T mk = pow_k == 0 ? one : pk1 * B;
    loss = mk * bce;
    if constexpr (kGrad) {
      const T d1 = u * L.sig_pos - t * L.sig_neg;
      const T dm = pow_k == 0 ? zero : T(static_cast<float>(pow_k)) * pk1 * L.sig_pos * L.sig_neg * (u - t);
      grad = dm * bce + mk * d1;
    }
    return;
  }
  const T g(gamma);
  const auto b_pos = O::gt(B, zero);
  const T safe_B = O::select(b_pos, B, one);
  const T m = O::select(b_pos, O::exp_nonpos(g * O::log(safe_B)), gamma == G(0) ? one : zero);
  loss = m * bce;
  if constexpr (kGrad) {
    const T d1 = u * L.sig_pos - t * L.sig_neg;
    const T dm = O::select(b_pos, g * m * L.sig_pos * L.sig_neg * (u - t) / safe_B, zero);
    grad = dm * bce + m * d1;
  }
}

// log p of a softmax class from its logit x, the row's max and log(sum_c exp(x_c - max)):
// (x - max) - log sum, as torch's log_softmax. Two terms of one sign, so the error is that
// of log sum (an ulp of 1 or so), not an ulp of max + log sum (6e-5 in float32 at logits
// near 1000, where x - (max + log sum) cancels).
template <typename T>
CBF_HD T log_softmax_of(T x, T max, T log_sum) {
  return (x - max) - log_sum;
}

// 1 - p of a softmax class from its log p: -expm1(log p), exact as p -> 1 where 1 - p would
// cancel. The one formula of both backends for the target class's gradient p_y - 1 and the
// softmax focal factor.
template <typename T>
CBF_HD T softmax_one_minus_p(T logp) {
  return -MathOps<T>::expm1_nonpos(logp);
}

// Softmax focal factors for log p (p = softmax probability of a class):
//   loss factor  (1 - p)^gamma * (-log p)
//   G            = (1 - p)^gamma * (1 - gamma * p * log p / (1 - p))  >= 0
// so that d[(1 - p_y)^gamma (-log p_y)] / dz_k = G * (p_k - [k == y]).
// 1 - p is -expm1(log p): exact as p -> 1, where 1 - p would cancel, and the
// ratio log p / (1 - p) tends to -1 there; (1 - p)^gamma is exp(gamma log(1 - p))
// with the limits 0^gamma = 0 (gamma > 0) and 0^0 = 1, so gamma < 1 never
// produces the inf * 0 of d/dp (1 - p)^gamma. pow_k >= 0: gamma is that integer
// (small_integer_gamma), and (1 - p)^gamma is a product and for pow_k >= 1 G too
// (softmax_focal_integer; the same values to rounding, the same limits): two
// transcendentals and a division fewer, which the soft rows save for every class.
template <typename T>
struct SoftmaxFocal {
  T loss;  // (1 - p)^gamma * (-log p)
  T G;
};

// The factors from log p, p, pw = (1 - p)^gamma and ratio = log p / (1 - p), as
// softmax_focal and softmax_focal_low_p compose them.
template <typename T>
CBF_HD SoftmaxFocal<T> softmax_focal_factors(T logp, T p, T pw, T ratio, T g) {
  SoftmaxFocal<T> out;
  out.loss = pw * (-logp);
  out.G = pw * (T(1) - g * p * ratio);
  return out;
}

// The same factors for an integer gamma = k >= 1 from q = 1 - p:
//   loss = q^k (-log p),  G = q^(k-1) (q - gamma p log p)
// (G as above, multiplied out): products only, no ratio and so no division, and q and
// -gamma p log p are both >= 0, so nothing cancels; at q = 0 (p = 1) G = 0, the limit.
template <typename T>
CBF_HD SoftmaxFocal<T> softmax_focal_integer(T logp, T p, T q, T g, int k) {
  const T qk1 = integer_power(q, k - 1);  // q^(k-1)
  SoftmaxFocal<T> out;
  out.loss = (qk1 * q) * (-logp);
  out.G = qk1 * (q - g * p * logp);
  return out;
}

template <bool kFocal, typename T, typename G>
CBF_HD SoftmaxFocal<T> softmax_focal(T logp, G gamma, int pow_k = -1) {
  using O = MathOps<T>;
  SoftmaxFocal<T> out;
  if constexpr (!kFocal) {
    out.loss = -logp;
    out.G = T(1);
  } else {
    const T zero(0), one(1);
    const T g(gamma);
    const T q = softmax_one_minus_p(logp);
    const T p = O::exp_nonpos(logp);
    if (pow_k >= 1) return softmax_focal_integer(logp, p, q, g, pow_k);
    const auto q_pos = O::gt(q, zero);
    const T safe_q = O::select(q_pos, q, one);
    const T pw =
        pow_k == 0 ? one : O::select(q_pos, O::exp_nonpos(g * O::log(safe_q)), gamma == G(0) ? one : zero);
    const T ratio = O::select(q_pos, logp / safe_q, -one);  // log p / (1 - p)
    out = softmax_focal_factors(logp, p, pw, ratio, g);
  }
  return out;
}

// softmax_focal for a class with p <= 1/2, from log p and p itself (the CPU rows divide the
// parked exp(x - max) by the row's sum): there 1 - p has no cancellation and lies in
// [1/2, 1], so it is taken as 1 - p, and (for a gamma that is no integer >= 1) 1 / (1 - p)
// as 2 recip_1_2(2 (1 - p)) and (1 - p)^gamma as exp(gamma log1p(-p)) (log1p_neg_half, a
// polynomial on the CPU): no expm1, general log or division. The same factors as
// softmax_focal, to rounding. At most one class of a row has p > 1/2: softmax_focal serves
// it.
template <typename T, typename G>
CBF_HD SoftmaxFocal<T> softmax_focal_low_p(T logp, T p, G gamma, int pow_k = -1) {
  using O = MathOps<T>;
  const T one(1), two(2), g(gamma);
  const T q = one - p;
  if (pow_k >= 1) return softmax_focal_integer(logp, p, q, g, pow_k);
  const T pw = pow_k == 0 ? one : O::exp_nonpos(g * O::log1p_neg_half(-p));  // (1 - p)^gamma
  const T ratio = logp * (two * O::recip_1_2(two * q));                      // log p / (1 - p)
  return softmax_focal_factors(logp, p, pw, ratio, g);
}

// A softmax-family row's results, the one composition of every backend and layout (the
// CPU rows and planes, the CUDA row and planes kernels):
//   loss = s (1 - p_y)^gamma (-log p_y)        (hard target y; gamma = 0: cross-entropy)
//   grad_k = cp p_k  for k != y,  grad_y = cp p_y - cp = -cp q,  q = 1 - p_y
// and for float-target cross-entropy, with T = sum_c t_c and tx = sum_c t_c (x_c - max):
//   loss = s (T log sum - tx)  (two terms of one sign),  grad_k = cp p_k - s t_k,  cp = s T.
template <typename T>
struct SoftmaxRow {
  T loss;
  T cp;  // the coefficient of p_k in the gradient
  T q;   // hard targets: 1 - p_y
};

template <bool kFocal, typename T, typename G>
CBF_HD SoftmaxRow<T> softmax_hard_row(T s, T x_y, T max, T log_sum, G gamma) {
  const T logp = log_softmax_of(x_y, max, log_sum);
  const SoftmaxFocal<T> f = softmax_focal<kFocal>(logp, gamma);
  return {s * f.loss, s * f.G, softmax_one_minus_p(logp)};
}

template <typename T>
CBF_HD SoftmaxRow<T> softmax_soft_row(T s, T t_sum, T log_sum, T tx) {
  return {s * (t_sum * log_sum - tx), s * t_sum, T(0)};
}

// Label smoothing and the class-weighting rule of softmax cross-entropy (docs/losses.md,
// "Label smoothing and class weighting"). The row's effective target is
//   e_c = a_c (P t_c + Q),  a_c = 1 ('sample': the paper's rule, s scales the whole row)
//                           or w_c ('class': PyTorch's, class term c weighted by w_c),
// t the one-hot or float target, and
//   sample:  P = s (1 - eps),  Q = s eps / C;     class:  P = 1 - eps,  Q = eps / C.
// With E = sum_c e_c = P sum_c a_c t_c + Q A (A = sum_c a_c) and
// tx = sum_c e_c (x_c - max) = P sum_c a_c t_c (x_c - max) + Q sum_c a_c (x_c - max):
//   loss = E log sum - tx  (softmax_soft_row with s = 1: two terms of one sign),
//   grad_k = E p_k - e_k.
// For a hard target y the target class's gradient is written without the cancellation of
// E p_y - e_y as p_y -> 1:  grad_y = -P a_y (1 - p_y) + Q (A p_y - a_y).
template <typename T>
struct SmoothCoef {
  T P, Q;
};

template <typename T, typename A>
CBF_HD SmoothCoef<T> smooth_coef(T s, A eps, A C, bool class_weighting) {
  const T keep(A(1) - eps), spread(eps / C);
  if (class_weighting) return {keep, spread};
  return {s * keep, s * spread};
}

template <typename T>
CBF_HD T smooth_grad_y(const SmoothCoef<T>& k, T a_y, T A, T q) {
  return -k.P * a_y * q + k.Q * (A * (T(1) - q) - a_y);
}

// The effective target e_c = a_c (P t_c + Q) of one class (t_c: the float target, or 1 / 0
// for a class index). Softmax focal takes its focal term of every class with it:
//   loss = sum_c e_c F_c,  grad_k = p_k sum_c e_c G_c - e_k G_k  (softmax_focal's F and G).
template <typename T>
CBF_HD T smooth_target(const SmoothCoef<T>& k, T a, T t) {
  return a * (k.P * t + k.Q);
}

// Label smoothing of the sigmoid family: every target moves towards 1/2,
// t' = (1 - eps) t + eps / 2 (t' = t for eps = 0; the sample weight and the mean's
// denominator keep the unsmoothed t).
template <typename T, typename A>
CBF_HD T smooth_binary_target(T t, A eps) {
  return t * T(A(1) - eps) + T(eps * A(0.5));
}

// Logit adjustment (Menon et al., ICLR 2021; tau = 1 is Balanced Softmax), LDAM's target
// margin (Cao et al., NeurIPS 2019) and a logit scale (docs/losses.md, "Adjusted logits"):
// the softmax family's loss is taken on
//   z_c = s x_c + b_c - s Delta_y [c == y],   b = tau log(pi),
// read once per pass from the stored x, so d loss / d x_c = s d loss / d z_c.
// Without a logit adjustment (b = 0: margins or a logit scale only) the logit is s x, the
// same bits as s x + 0.
template <typename T>
CBF_HD T scaled_logit(T x, T s) {
  return s * x;
}
template <typename T>
CBF_HD T adjusted_logit(T x, T s, T b) {
  return scaled_logit(x, s) + b;
}

// gamma as a small integer (0..8) when it is one, else -1: with hard (0 / 1) targets the
// focal modulator is then a product (binary_term's pow_k).
CBF_HD int small_integer_gamma(double gamma) {
  return (gamma >= 0 && gamma <= 8 && gamma == static_cast<double>(static_cast<int>(gamma)))
             ? static_cast<int>(gamma)
             : -1;
}

// The mean's 1/D: D is the number of non-ignored samples, the sum of float targets or (for
// 'weighted_mean') the signed sum of the sample weights, as F.cross_entropy divides by it.
// D = 0 (empty batch, every sample ignored, weights that cancel) gives 0: loss 0 and
// gradient 0, never NaN (torch returns NaN there).
CBF_HD double inv_denominator(double d) { return d != 0 ? 1.0 / d : 0.0; }

// alpha_t = alpha t + (1 - alpha)(1 - t) (torchvision's alpha; alpha may be a class's entry
// of a per-class alpha vector, or a vector of them).
template <typename T>
CBF_HD T alpha_t_of(T t, T alpha) {
  return alpha * t + (T(1) - alpha) * (T(1) - t);
}

// The scalar alpha of the options: < 0 means "no alpha" and gives 1.
template <typename T, typename G>
CBF_HD T alpha_t(T t, G alpha) {
  if (alpha < G(0)) return T(1);
  return alpha_t_of(t, T(alpha));
}

}  // namespace cbfused
