// CPU side of math.h: MathOps for at::vec::Vectorized, and loads / stores that
// widen float16 / bfloat16 rows to float lanes (the accumulation type).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cbfused/math.h"

namespace cbfused {

template <typename A>
struct VecMathOps {
  using V = at::vec::Vectorized<A>;
  using Mask = V;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V expm1(const V& x) { return x.expm1(); }
  // log1p(x) for x in [0, 1]: 2 atanh(s), s = x / (2 + x) in [0, 1/3], by its odd series
  // 2 s (1 + s^2/3 + s^4/5 + ...), truncated where (1/9)^K / (2K + 1) is below the
  // type's epsilon. Relative error of a few ulp over the whole domain, tiny x included,
  // at one division and K multiply-adds (a third of Sleef's general log1p).
  static V log1p_unit(const V& x) {
    constexpr int K = std::is_same_v<A, float> ? 7 : 16;
    const V s = x / (V(A(2)) + x);
    const V z = s * s;
    V p(A(1) / A(2 * K + 1));
    for (int k = K - 1; k >= 0; --k) p = at::vec::fmadd(p, z, V(A(1) / A(2 * k + 1)));
    return V(A(2)) * s * p;
  }
  static V abs(const V& x) { return x.abs(); }
  // Plain max: a NaN logit still reaches the result through log1p(exp(-|x|)).
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& if_true, const V& if_false) {
    return V::blendv(if_false, if_true, m);
  }
};

template <>
struct MathOps<at::vec::Vectorized<float>> : VecMathOps<float> {};
template <>
struct MathOps<at::vec::Vectorized<double>> : VecMathOps<double> {};

namespace cpu {

// Row I/O in blocks of kStep elements of scalar_t, seen as kVecs vectors of
// the accumulation type (float for float16 / bfloat16 / float, double for
// double). A partial block (the row's tail) loads zeros into the unused lanes;
// `lanes(n, v)` says how many lanes of vector v are real.
template <typename scalar_t>
struct RowIO {
  using acc_t = at::opmath_type<scalar_t>;
  using V = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kLanes = V::size();
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kStep = kLanes * kVecs;
  static_assert(!kReduced || at::vec::Vectorized<scalar_t>::size() == kStep, "");

  static inline void load(const scalar_t* p, int64_t n, V* out) {
    if constexpr (kReduced) {
      auto r =
          n == kStep ? at::vec::Vectorized<scalar_t>::loadu(p) : at::vec::Vectorized<scalar_t>::loadu(p, n);
      auto f = at::vec::convert_to_float<scalar_t>(r);
      out[0] = std::get<0>(f);
      out[1] = std::get<1>(f);
    } else {
      out[0] = n == kStep ? V::loadu(p) : V::loadu(p, n);
    }
  }

  static inline void store(scalar_t* p, int64_t n, const V* in) {
    if constexpr (kReduced) {
      auto r = at::vec::convert_from_float<scalar_t>(in[0], in[1]);
      if (n == kStep) {
        r.store(p);
      } else {
        r.store(p, n);
      }
    } else {
      if (n == kStep) {
        in[0].store(p);
      } else {
        in[0].store(p, n);
      }
    }
  }

  static inline int64_t lanes(int64_t n, int v) { return std::clamp<int64_t>(n - v * kLanes, 0, kLanes); }

  // v with the lanes at and past `valid` replaced by `fill`.
  static inline V keep(const V& v, int64_t valid, acc_t fill) {
    return valid == kLanes ? v : V::set(V(fill), v, valid);
  }

  // Horizontal sum in a fixed lane order (deterministic, thread-independent).
  static inline acc_t hsum(const V& v) {
    alignas(64) acc_t buf[kLanes];
    v.store(buf);
    acc_t s = 0;
    for (int64_t k = 0; k < kLanes; ++k) s += buf[k];
    return s;
  }

  static inline acc_t hmax(const V& v) {
    alignas(64) acc_t buf[kLanes];
    v.store(buf);
    acc_t m = buf[0];
    for (int64_t k = 1; k < kLanes; ++k) m = (buf[k] > m || buf[k] != buf[k]) ? buf[k] : m;
    return m;
  }
};

}  // namespace cpu
}  // namespace cbfused
