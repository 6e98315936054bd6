// CPU side of math.h: MathOps for at::vec::Vectorized, and loads / stores that
// widen float16 / bfloat16 rows to float lanes (the accumulation type).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <utility>

#include "cbfused/math.h"

namespace cbfused {

// The hardware max / min, one instruction: (a > b ? a : b) / (a < b ? a : b), so where
// either is NaN the result is b. Callers put the operand whose NaN must survive second,
// or do not need it to (a NaN reaches their result another way); at::vec::maximum /
// minimum propagate a NaN from either side at three instructions.
template <bool kMax, typename A>
inline at::vec::Vectorized<A> hw_pick(const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return kMax ? _mm512_max_ps(a, b) : _mm512_min_ps(a, b);
  if constexpr (std::is_same_v<A, double>) return kMax ? _mm512_max_pd(a, b) : _mm512_min_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) return kMax ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b);
  if constexpr (std::is_same_v<A, double>) return kMax ? _mm256_max_pd(a, b) : _mm256_min_pd(a, b);
#endif
  return at::vec::Vectorized<A>::blendv(b, a, kMax ? a > b : a < b);
}
template <typename A>
inline at::vec::Vectorized<A> hw_max(const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b) {
  return hw_pick<true>(a, b);
}
template <typename A>
inline at::vec::Vectorized<A> hw_min(const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b) {
  return hw_pick<false>(a, b);
}

// c_n x^n + ... + c_1 x + c_0 by Horner's rule, one fused multiply-add per coefficient,
// the coefficients given from c_n down to c_0.
template <typename A, typename... C>
inline at::vec::Vectorized<A> horner(const at::vec::Vectorized<A>& x, std::type_identity_t<A> c_n,
                                     C... rest) {
  using V = at::vec::Vectorized<A>;
  V q(c_n);
  ((q = at::vec::fmadd(q, x, V(static_cast<A>(rest)))), ...);
  return q;
}

template <typename A>
struct VecMathOps {
  using V = at::vec::Vectorized<A>;
  using Mask = V;
  static V exp_nonpos(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V expm1_nonpos(const V& x) { return x.expm1(); }
  // log1p(x) for x in [-1/2, 1]: 2 atanh(s), s = x / (2 + x) in [-1/3, 1/3], by its odd
  // series 2 s (1 + s^2/3 + s^4/5 + ...), truncated where (1/9)^K / (2K + 1) is below the
  // type's epsilon. Relative error of a few ulp over the whole domain, tiny x included,
  // at one division and K multiply-adds (a third of Sleef's general log1p).
  static V log1p_neg_half(const V& x) { return log1p_unit(x); }
  static V log1p_unit(const V& x) {
    constexpr int K = std::is_same_v<A, float> ? 7 : 16;
    const V s = x / (V(A(2)) + x);
    const V z = s * s;
    V p(A(1) / A(2 * K + 1));
    for (int k = K - 1; k >= 0; --k) p = at::vec::fmadd(p, z, V(A(1) / A(2 * k + 1)));
    return V(A(2)) * s * p;
  }
  static V abs(const V& x) { return x.abs(); }
  static V recip_1_2(const V& x) { return V(A(1)) / x; }
  // The hardware max: a NaN logit still reaches the result through log1p(exp(-|x|)).
  static V max(const V& a, const V& b) { return hw_max(a, b); }
  static Mask ge(const V& a, const V& b) { return a >= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& if_true, const V& if_false) {
    return V::blendv(if_false, if_true, m);
  }
};

// float32 exp, log1p_unit and recip_1_2, inline and division-free (at::vec's exp calls
// Sleef out of line: the call spills every live vector register, and was a fifth of the
// sigmoid kernel's time).
// exp_nonpos is Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts (|r| <= ln2 / 2),
// e^r = 1 + r + r^2 P(r) with P of degree 5 (about 1 ulp), times 2^n: one vscalefps on
// AVX512, else two factors 2^n1 2^n2 that are both normal for every n in [-150, 128];
// either way denormal results round correctly. x <= 0 is clamped below at -104, beyond
// which the result is 0 anyway (no upper clamp: one instruction and, in the bfloat16
// kernels, one register fewer; measured 2 to 5% there); NaN propagates.
template <>
struct MathOps<at::vec::Vectorized<float>> : VecMathOps<float> {
  static V exp_nonpos(const V& x) {
    const V xc = hw_max(V(-104.0f), x);  // x second: NaN stays NaN
    const V n = (xc * V(1.44269504088896341f)).round();
    V r = at::vec::fmadd(n, V(-0.693359375f), xc);
    r = at::vec::fmadd(n, V(2.12194440e-4f), r);
    const V P = horner(r, 1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                       1.6666665459e-1f, 5.0000001201e-1f);
    const V p = at::vec::fmadd(P, r * r, r + V(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
    return V(_mm512_scalef_ps(p, n));  // p 2^n in one instruction, denormals rounded
#else
    using I = at::vec::Vectorized<int32_t>;
    const V n1 = (n * V(0.5f)).floor();
    const V n2 = n - n1;
    const I bias(127), shift(23);
    const V s1 = at::vec::cast<float>((at::vec::convert_to_int_of_same_size(n1) + bias) << shift);
    const V s2 = at::vec::cast<float>((at::vec::convert_to_int_of_same_size(n2) + bias) << shift);
    return p * s1 * s2;
#endif
  }
  // expm1 of x <= 0: x + x^2 P(x) for |x| < 1/2, P the Taylor series of (e^x - 1 - x) / x^2
  // to x^7 (truncation below 2^-28 relative), else exp(x) - 1, which cancels at most 1.6x
  // there. About 2 ulp; -inf and NaN give -1 and NaN. Inline: at::vec's is Sleef's
  // double-float expm1, out of line, and was most of the float-target softmax focal
  // kernel's time (two per element).
  static V expm1_nonpos(const V& x) {
    const V p = horner(x, 1.0f / 362880.0f, 1.0f / 40320.0f, 1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f,
                       1.0f / 24.0f, 1.0f / 6.0f, 0.5f);
    const V small = at::vec::fmadd(x * x, p, x);
    const V big = exp_nonpos(x) - V(1.0f);
    return V::blendv(big, small, x.abs() < V(0.5f));
  }
  // log1p(x) for x in [0, 1] without a division: x Q(x), Q the degree-9 Chebyshev fit of
  // log1p(x) / x on [0, 1] (float32 coefficients). Measured against float64 log1p on 420k
  // points of [1e-40, 1]: at most 1.9 ulp, 1.7e-7 relative (tiny x included: Q(0) = 1).
  static V log1p_unit(const V& x) {
    return x * horner(x, -3.214070108e-03f, 1.964936778e-02f, -5.643551052e-02f, 1.053329036e-01f,
                      -1.525149792e-01f, 1.965151280e-01f, -2.494781464e-01f, 3.332909942e-01f,
                      -4.999985099e-01f, 1.0f);
  }
  // log1p(x) for x in [-1/2, 0] (log(1 - p) of a softmax probability p <= 1/2) without a
  // division: x Q(x), Q the degree-9 Chebyshev fit of log1p(x) / x on [-1/2, 0] (float32
  // coefficients, Q(0) = 1). Measured against long double log1p on every float32 of
  // [-1/2, 0]: at most 1.6 ulp (1.7 where fmadd is not fused). At a focal power of a gamma
  // that is no integer it replaces log(1 - p), Sleef's out-of-line log: ten instructions
  // inline.
  static V log1p_neg_half(const V& x) {
    return x * horner(x, -1.7770181894e+00f, -2.5557680130e+00f, -2.0497319698e+00f, -6.3501286507e-01f,
                      -3.5381534696e-01f, 1.7321175337e-01f, -2.5216984749e-01f, 3.3324497938e-01f,
                      -5.0000137091e-01f, 1.0f);
  }
  // 1 / x for x in [1, 2] (no zero, inf, NaN or denormal to care for): the hardware
  // estimate refined by Newton steps (r += r (1 - x r) squares the relative error)
  // instead of a division, which costs several times an FMA. AVX512: 14-bit estimate, one
  // step; AVX2: 12-bit estimate, two steps; both about 1 ulp after rounding.
  static V recip_1_2(const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
    V r(_mm512_rcp14_ps(x));
    r = at::vec::fmadd(r, at::vec::fnmadd(x, r, V(1.0f)), r);
#elif defined(CPU_CAPABILITY_AVX2)
    V r(_mm256_rcp_ps(x));
    r = at::vec::fmadd(r, at::vec::fnmadd(x, r, V(1.0f)), r);
    r = at::vec::fmadd(r, at::vec::fnmadd(x, r, V(1.0f)), r);
#else
    const V r = V(1.0f) / x;
#endif
    return r;
  }
};
template <>
struct MathOps<at::vec::Vectorized<double>> : VecMathOps<double> {};

namespace cpu {

// Loops over the kVecs vectors of a block are unrolled, so that the block's vector arrays
// live in registers: GCC keeps an array that a loop indexes by a variable on the stack.
#define CBF_UNROLL_VECS _Pragma("GCC unroll 4")

#if defined(CPU_CAPABILITY_AVX512)
// Lanes [0, n) of a 32-lane mask: the tail of a float16 / bfloat16 block.
inline __mmask32 first_lanes32(int64_t n) { return static_cast<__mmask32>((uint64_t(1) << n) - 1); }
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// float -> bfloat16 (round to nearest even) for the lanes `valid` of 32 floats, as torch
// converts: AVX512-BF16's vcvtne2ps2bf16 in one instruction, which also keeps NaN a NaN but
// flushes denormal results to zero. So a valid lane that came out +-0 (one test on the
// packed result: rare, as a gradient is seldom exactly 0) takes at::vec's integer
// conversion, which keeps the denormals.
inline __m512i float_to_bf16(const __m512& lo, const __m512& hi, __mmask32 valid) {
  const __m512i fast = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  const __mmask32 zero = _mm512_mask_testn_epi16_mask(valid, fast, _mm512_set1_epi16(0x7fff));
  if (__builtin_expect(zero == 0, 1)) return fast;
  const __m512i exact = at::vec::convert_from_float<c10::BFloat16>(at::vec::Vectorized<float>(lo),
                                                                   at::vec::Vectorized<float>(hi));
  return _mm512_mask_mov_epi16(fast, zero, exact);
}
#endif

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

#if defined(CPU_CAPABILITY_AVX512)
  // A bfloat16 row's tail of n <= kLanes elements as one vector, which load and store take
  // instead of a masked pack, its permute and its second conversion (the vector loops skip
  // the all-padding second vector already). An 80-class row is two packs and a tail of 16;
  // at 65536 x 80, one thread, bfloat16 over float32 time went from 1.00-1.03x to
  // 0.89-0.95x for softmax and from 1.05-1.08x to 1.01-1.03x for softmax focal
  // (alternating builds).
  static inline V load_bf16_tail(const c10::BFloat16* p, int64_t n) {
    const __m256i h = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  static inline void store_bf16_tail(c10::BFloat16* p, int64_t n, const V& in) {
    const __mmask32 m = first_lanes32(n);
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(m),
                             _mm512_castsi512_si256(float_to_bf16(in, V(0), m)));
  }
#endif

  static inline void load(const scalar_t* p, int64_t n, V* out) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (n != kStep && n <= kLanes) {
        out[0] = load_bf16_tail(p, n);
        out[1] = V(0);
        return;
      }
      // bf16 -> float is the 16 bits placed above 16 zero bits. Quadwords reordered
      // q0 q4 q1 q5 q2 q6 q3 q7, the in-lane unpacks give elements 0..15 and 16..31 in
      // order: 3 instructions for 32 values (at::vec's widening takes 5).
      __m512i v = n == kStep ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(first_lanes32(n), p);
      v = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0), v);
      out[0] = V(_mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v)));
      out[1] = V(_mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v)));
      return;
    }
#endif
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
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (n == kStep) {
        _mm512_storeu_si512(p, float_to_bf16(in[0], in[1], ~__mmask32(0)));
      } else if (n <= kLanes) {
        store_bf16_tail(p, n, in[0]);
      } else {
        const __mmask32 m = first_lanes32(n);
        _mm512_mask_storeu_epi16(p, m, float_to_bf16(in[0], in[1], m));
      }
      return;
    }
#endif
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

  // v with the lanes at and past `valid` (0..kLanes) replaced by `fill`. A lane mask and
  // one blend, no branch: at::vec's set takes its operands by reference, which made GCC
  // park every loss vector on the stack and read it back (a store-to-load forward in each
  // block of the sigmoid kernels, full blocks included).
  static inline V keep(const V& v, int64_t valid, acc_t fill) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      const auto m = static_cast<__mmask16>((uint32_t(1) << valid) - 1);
      return V(_mm512_mask_mov_ps(_mm512_set1_ps(fill), m, v));
    } else {
      const auto m = static_cast<__mmask8>((uint32_t(1) << valid) - 1);
      return V(_mm512_mask_mov_pd(_mm512_set1_pd(fill), m, v));
    }
#else
    const V lane = V::arange(acc_t(0), acc_t(1));
    return V::blendv(V(fill), v, lane < V(static_cast<acc_t>(valid)));
#endif
  }

  // true when no lane of the comparison result m is set
  static inline bool none(const V& m) { return m.zero_mask() == (1 << kLanes) - 1; }

  // Horizontal sum in a fixed lane order (deterministic, thread-independent): a shuffle
  // tree for float (at::vec's), a left-to-right sum for double.
  static inline acc_t hsum(const V& v) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return at::vec::vec_reduce_all<float>([](const V& a, const V& b) { return a + b; }, v);
    }
    alignas(64) acc_t buf[kLanes];
    v.store(buf);
    acc_t s = 0;
    for (int64_t k = 0; k < kLanes; ++k) s += buf[k];
    return s;
  }

  // Horizontal max by a shuffle tree of hardware maxes (a NaN lane may be dropped: the
  // softmax max pass, its one user, does not rely on it).
  static inline acc_t hmax(const V& v) {
    return at::vec::vec_reduce_all<acc_t>([](const V& a, const V& b) { return hw_max(a, b); }, v);
  }
};

// A block body of row_blocks, forced inline (`[&](int64_t j, int64_t n, auto u) CBF_BLOCK {`):
// GCC otherwise leaves the larger bodies (adjusted logits, bfloat16 sums) out of line at
// the tail's call, and the caller's accumulators then go through memory every block.
#define CBF_BLOCK __attribute__((always_inline))

// Runs body(j, n, u) over the blocks of a row of C elements: the whole blocks U at a time
// with u = 0 .. U-1 as compile-time constants (so a reduction can keep U independent
// accumulators in registers: one chain would be bound by its add / max latency), then the
// rest one block at a time with u = 0. n is the block's length, kStep but at the tail.
template <typename IO, int U, typename Body>
CBF_HD void row_blocks(int64_t C, const Body& body) {
  int64_t j = 0;
  for (; j + U * IO::kStep <= C; j += U * IO::kStep) {
    // forced inline: an out-of-line call here spills the caller's accumulators
    [&]<int... u>(std::integer_sequence<int, u...>) __attribute__((always_inline)) {
      (body(j + u * IO::kStep, IO::kStep, std::integral_constant<int, u>{}), ...);
    }(std::make_integer_sequence<int, U>{});
  }
  for (; j < C; j += IO::kStep) body(j, std::min(IO::kStep, C - j), std::integral_constant<int, 0>{});
}

}  // namespace cpu
}  // namespace cbfused
