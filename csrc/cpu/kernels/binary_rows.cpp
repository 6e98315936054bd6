// The binary-family rows of cbfused::cb_loss on the CPU (sigmoid cross-entropy and the
// paper's sigmoid focal loss), compiled once per CPU ISA (csrc/cpu/kernels.h).
//
// Scheduled by GCC's first (pre-register-allocation), pressure-aware scheduling pass, which
// is off by default on x86: a float16 / bfloat16 block holds two float vectors of state, and
// without it the block loop kept values and constants on the stack. Measured: bfloat16
// sigmoid / focal 9-10% faster at 1024x1024, level with float32 per element; float32 within
// noise; outputs bit-identical (3840 tensors compared). Only this file: the softmax rows got
// 10% slower in bfloat16 at 65536x80 with it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("schedule-insns", "sched-pressure")
#endif

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cpu/rows.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {
namespace {

// pow_k of a sigmoid row as a template constant: kAnyPow reads a.gamma_int at run time.
constexpr int kAnyPow = -2;

// Sigmoid cross-entropy and the paper's sigmoid focal loss, one row:
//   l = s * sum_c alpha_t * m * bce(x_c, t_c),  grad_c = s * d/dx_c(...)
// kSmooth: label smoothing eps, every t_c taken as math.h's smooth_binary_target (a hard
// target's t = 0 blocks have t = eps / 2 then: kTargetLow blocks, and kPow = -1).
// kAlpha (0: no alpha, 1: the scalar alpha, 2: a per-class alpha vector) and kPow (the focal power for hard
// targets: -1 none, k >= 0 an integer gamma, kAnyPow read at run time) are template parameters, chosen once
// per call (run_sigmoid), not tested per vector: the power's loop with a run-time trip count alone cost 5 to
// 8% of the focal kernel at gamma = 2.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard, int kAlpha, int kPow, bool kSmooth>
RowOut<at::opmath_type<scalar_t>> sigmoid_row(const Args<scalar_t>& a,
                                              const at::opmath_type<scalar_t>* alpha_vec,
                                              at::opmath_type<scalar_t> eps, int64_t i) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const int64_t C = a.C;
  const scalar_t* x = a.x + i * a.x_stride;
  const scalar_t* t = kHard ? nullptr : a.t + i * a.t_stride;
  scalar_t* g = kGrad ? a.grad + i * C : nullptr;
  RowOut<acc_t> out;
  acc_t s = 0, T = 0;
  int64_t y = -1;
  if (!row_target<scalar_t, kHard, kGrad>(a, i, t, g, y, s, T, out)) return out;
  // The row's constants as locals: as far as the compiler knows, the gradient stores may
  // alias `a`, so a.gamma and a.alpha used in the block loop were loaded again for every
  // vector.
  const acc_t gamma = a.gamma, alpha = a.alpha;
  // Hard targets are exactly 0 / 1: an integer gamma needs no second exp.
  static_assert(!kSmooth || kPow == -1, "smoothed targets are not 0 / 1");
  const int pow_k = !kHard ? -1 : kPow == kAnyPow ? a.gamma_int : kPow;
  const V sv(s * a.grad_prescale);
  // A vector of t = 0 (hard targets, away from the class) has the row constant alpha_t0:
  // its gradient takes one factor alpha_t0 * s. A vector with the class scales by alpha_t *
  // s lane by lane, so a t = 0 lane there gets the same bits as in a t = 0 vector (and a
  // bfloat16 row the same as a float32 one). Losses are scaled by alpha_t element by
  // element (t = 0: one multiply-add into the sum), as the reference and the CUDA kernels
  // do: summing the t = 0 losses first and scaling once overflowed to inf at logits near
  // float32's range, and alpha = 1 then gave inf * 0 = NaN for a finite loss.
  // (kAlpha = 2: alpha_t of t = 0 is 1 - alpha_c, per vector)
  const V at0 = kAlpha == 1 ? alpha_t(V(0), alpha) : V(1);
  const V sv0 = kAlpha == 1 ? at0 * sv : sv;
  V lacc(0);
  // One vector: adds its loss (lanes [0, nv)) and returns its gradient. Forced inline:
  // in the float16 / bfloat16 rows, with a pack's two vectors and a tail, GCC kept the t = 0
  // version out of line, and each call spilled every live vector register (zmm registers
  // are all caller-saved): at 65536 x 80 in bfloat16 (two packs and a tail of 16) sigmoid
  // took 1.17x and focal 1.14x the float32 time, 1.08x and 1.08x with it inline (one
  // thread, alternating builds; RowIO's one-vector tail then made them 1.06x and 1.02x).
  // av: the vector's per-class alphas (kAlpha = 2).
  // kind_t: math.h's kTarget* of the vector's t.
  auto vec = [&](auto kind_t, const V& xv, const V& tv, int64_t nv, const V& av)
                 __attribute__((always_inline)) -> V {
    constexpr int kT = decltype(kind_t)::value;
    constexpr bool kZeroT = kT == kTargetZero;
    V lv, dv;
    binary_term<kFocal, kGrad, kT>(xv, tv, gamma, lv, dv, pow_k);
    if constexpr (kZeroT && kAlpha == 2) {
      const V at0v = alpha_t_of(V(0), av);  // 1 - alpha_c
      lacc = at::vec::fmadd(IO::keep(lv, nv, acc_t(0)), at0v, lacc);
      return dv * (at0v * sv);
    } else if constexpr (kZeroT) {
      lacc = at::vec::fmadd(IO::keep(lv, nv, acc_t(0)), at0, lacc);  // at0 = 1: an exact add
      return dv * sv0;
    } else {
      V gs = sv;
      if constexpr (kAlpha != 0) {
        const V at = kAlpha == 1 ? alpha_t(tv, alpha) : alpha_t_of(tv, av);
        lv = lv * at;
        gs = at * sv;
      }
      lacc = lacc + IO::keep(lv, nv, acc_t(0));
      return dv * gs;
    }
  };
  // One block of kStep elements. kind_t: kTargetZero for a hard-target block without the
  // row's class (every t is 0), where binary_term folds t away; kTargetLow for a smoothed
  // hard-target block without it (every t is eps / 2); else kTargetAny. kFull: a whole
  // block (n = kStep known at compile time: no per-vector lane counts).
  using Any = std::integral_constant<int, kTargetAny>;
  using Zero = std::integral_constant<int, kTargetZero>;
  using Low = std::integral_constant<int, kTargetLow>;
  using Off = std::conditional_t<kSmooth, Low, Zero>;                // a hard row's t away from its class
  const V t_off = kSmooth ? smooth_binary_target(V(0), eps) : V(0);  // t away from the class
  auto block = [&](auto kind_t, auto full_t, int64_t j) {
    constexpr int kT = decltype(kind_t)::value;
    constexpr bool kFull = decltype(full_t)::value;
    const int64_t n = kFull ? IO::kStep : std::min(IO::kStep, C - j);
    V xv[IO::kVecs], tv[IO::kVecs], gv[IO::kVecs];
    IO::load(x + j, n, xv);
    if constexpr (!kHard) IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      gv[v] = V(0);
      if (nv == 0) break;  // a float16 / bfloat16 tail of <= 16: no math on padding
      const int64_t k0 = j + v * IO::kLanes;
      const V av = kAlpha == 2 ? V::loadu(alpha_vec + k0, nv) : V(0);
      if constexpr (kT != kTargetAny) {
        gv[v] = vec(kind_t, xv[v], t_off, nv, av);
      } else if constexpr (kHard) {
        // the class block: only the vector that holds y takes the one-hot path
        if (y >= k0 && y < k0 + IO::kLanes) {
          const V oh = one_hot_vector<IO>(y, k0);
          gv[v] = vec(Any{}, xv[v], kSmooth ? smooth_binary_target(oh, eps) : oh, nv, av);
        } else {
          gv[v] = vec(Off{}, xv[v], t_off, nv, av);
        }
      } else {
        gv[v] = vec(Any{}, xv[v], kSmooth ? smooth_binary_target(tv[v], eps) : tv[v], nv, av);
      }
    }
    if constexpr (kGrad) IO::store(g + j, n, gv);
  };
  auto run = [&](auto full_t, int64_t j) {
    if (kHard && (y < j || y >= j + IO::kStep)) {
      block(Off{}, full_t, j);
    } else {
      block(Any{}, full_t, j);
    }
  };
  int64_t j = 0;
  for (; j + IO::kStep <= C; j += IO::kStep) run(std::true_type{}, j);
  if (j < C) run(std::false_type{}, j);
  out.loss = s * IO::hsum(lacc);
  return out;
}

// The sigmoid / focal rows of one call, with alpha on or off and, for the focal loss with
// hard targets, the power of a common integer gamma (1, 2) or of none as a constant.
// eps > 0: label smoothing (kSmooth rows; smoothed targets are not 0 / 1, so no power).
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard>
std::pair<double, double> run_sigmoid(const Args<scalar_t>& a, const at::opmath_type<scalar_t>* alpha_vec,
                                      double eps, int64_t N, scalar_t* per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t e = static_cast<acc_t>(eps);
  auto rows = [&](auto alpha_c, auto pow_c, auto smooth_c) {
    return run_rows<scalar_t>(N, a.C, per_row, [&](int64_t i) {
      return sigmoid_row<scalar_t, kFocal, kGrad, kHard, decltype(alpha_c)::value, decltype(pow_c)::value,
                         decltype(smooth_c)::value>(a, alpha_vec, e, i);
    });
  };
  auto with_alpha = [&](auto pow_c, auto smooth_c) {
    if (a.alpha >= 0) return rows(std::integral_constant<int, 1>{}, pow_c, smooth_c);
    if (alpha_vec) return rows(std::integral_constant<int, 2>{}, pow_c, smooth_c);
    return rows(std::integral_constant<int, 0>{}, pow_c, smooth_c);
  };
  constexpr std::integral_constant<int, -1> kNoPow{};
  if (eps > 0) return with_alpha(kNoPow, std::true_type{});
  if constexpr (!kFocal || !kHard) {
    return with_alpha(kNoPow, std::false_type{});
  } else {
    switch (a.gamma_int) {
      case -1:
        return with_alpha(kNoPow, std::false_type{});
      case 1:
        return with_alpha(std::integral_constant<int, 1>{}, std::false_type{});
      case 2:
        return with_alpha(std::integral_constant<int, 2>{}, std::false_type{});
      default:
        return with_alpha(std::integral_constant<int, kAnyPow>{}, std::false_type{});
    }
  }
}

}  // namespace

template <typename scalar_t>
std::pair<double, double> binary_family_rows(const RowArgs<scalar_t>& a, const Smoothing& sm,
                                             const ClassOptions<at::opmath_type<scalar_t>>& adj, bool focal,
                                             bool grad, bool hard) {
  return with_flags(focal, grad, hard, [&](auto focal_c, auto grad_c, auto hard_c) {
    return run_sigmoid<scalar_t, decltype(focal_c)::value, decltype(grad_c)::value, decltype(hard_c)::value>(
        a, adj.alpha_vec, sm.eps, a.N, a.per_row_out);
  });
}

CBFUSED_FOR_EACH_DTYPE(CBFUSED_FAMILY_ROWS, binary_family_rows)

}  // namespace cpu
}  // namespace cbfused
