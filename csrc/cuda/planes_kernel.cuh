// The CUDA kernel of cbfused::cb_loss in the planes layout (channels-first dense logits
// [N, C, d1, ..., dk], csrc/cbfused/checks.h): one thread per position, threads along the
// positions, so a warp's loads of one class are consecutive addresses (coalesced); the class
// loop runs in each thread. The per-position math is that of cb_row_kernel (math.h,
// targets.h). Writes the gradient of the un-normalised sum and per-position loss and
// denominator to O(positions) buffers that finish_kernel reduces deterministically.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cbfused/targets.h"
#include "cuda/row_kernel.cuh"

namespace cbfused {
namespace cuda {

// kSmooth (the softmax family): label smoothing / class weighting `sm` (math.h, smooth_coef;
// softmax focal takes the soft path then). The binary family reads sm.eps at run time.
// kAdj (softmax family): adjusted logits `adj` (math.h, adjusted_logit).
template <typename scalar_t, int kLoss, bool kHard, bool kSmooth = false, bool kAdj = false>
__global__ void __launch_bounds__(kBlock, 2)
    cb_planes_kernel(RowArgs<scalar_t> a, Planes pl, Smoothing sm = {},
                     ClassOptions<at::opmath_type<scalar_t>> adj = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFoc = is_focal(kLoss);
  constexpr bool kSmoothCE = kSmooth && !kFoc;  // smoothed softmax cross-entropy
  // blockIdx.y walks the samples (a 64-bit division per thread cost registers and a stack
  // frame), blockIdx.x the positions of one
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const int64_t samples = a.N / pl.S;
  bool bad = false;
  for (int64_t n = blockIdx.y; p < pl.S && n < samples; n += gridDim.y) {
    const int64_t r = n * pl.S + p, C = a.C;
    const scalar_t* x = a.x + n * a.x_stride + p;
    const scalar_t* t = kHard ? nullptr : a.t + n * a.t_stride + p;
    scalar_t* g = a.grad ? a.grad + n * C * pl.S + p : nullptr;
    const int64_t xs = pl.x_cstride, ts = pl.t_cstride, gs = pl.S;
    int64_t y = -1;
    // class c's logit, adjusted with kAdj (the margin on the target y)
    auto X = [&](int64_t c) {
      const acc_t xc = static_cast<acc_t>(x[c * xs]);
      if constexpr (kAdj)
        return adjusted_logit(xc, adj.scale, adj.offset[c]) - (c == y ? adj.target_margin(y) : acc_t(0));
      return xc;
    };
    auto Tc = [&](int64_t c) { return static_cast<acc_t>(t[c * ts]); };
    acc_t s = 0, T = 0, denom = 0, loss = 0;
    bool live = true;
    if constexpr (kHard) {
      y = a.y[r];
      const HardTarget<acc_t> h = hard_target(y, C, a.ignore_index, a.w, a.weighted);
      bad = h.bad;
      live = h.live();
      s = h.s;
      denom = h.denom;
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t tc = Tc(c);
        bad |= bad_float_target(tc);
        s += tc * a.w[c];
        T += tc;
      }
      denom = float_target_denom(s, T, a.weighted);
    }
    if (!live) {
      if (g)
        for (int64_t c = 0; c < C; ++c) g[c * gs] = scalar_t(0);
    } else if constexpr (is_softmax_family(kLoss)) {
      acc_t m = X(0);
      for (int64_t c = 1; c < C; ++c) m = nan_max(m, X(c));
      acc_t sum = 0, tx = 0;
      acc_t ad = 0, A = 0, atd = 0, at = 0;  // kSmoothCE: as in cb_row_kernel
      for (int64_t c = 0; c < C; ++c) {
        const acc_t d = X(c) - m;
        sum += ::exp(d);
        if constexpr (kSmoothCE) {
          const acc_t ac = sm.class_weighting ? a.w[c] : acc_t(1);
          A += ac;
          ad += ac * d;
          if constexpr (!kHard) {
            at += ac * Tc(c);
            atd += ac * Tc(c) * d;
          }
        } else if constexpr (!kHard && !kFoc) {
          tx += Tc(c) * d;
        }
      }
      const acc_t log_sum = ::log(sum);
      acc_t cp = 0, cy = 0, es = s;  // es: the soft focal rows' factor of e (s, or 1)
      SmoothCoef<acc_t> K{0, 0};
      if constexpr (kSmooth)
        K = smooth_coef(s, static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), sm.class_weighting);
      // soft focal: class c's weight e_c (float targets, or kSmooth's of either kind)
      auto E = [&](int64_t c) {
        return soft_target<kSmooth>(kHard ? acc_t(c == y) : Tc(c), sm, K, a.w, adj.alpha_vec, c);
      };
      if constexpr (kSmoothCE) {
        if constexpr (kHard) {
          at = sm.class_weighting ? s : acc_t(1);  // a_y
          atd = at * (X(y) - m);
        }
        const SoftmaxRow<acc_t> r =
            softmax_soft_row(acc_t(1), K.P * at + K.Q * A, log_sum, K.P * atd + K.Q * ad);
        loss = r.loss;
        cp = r.cp;
        if constexpr (kHard)
          cy = smooth_grad_y(K, at, A, softmax_one_minus_p(log_softmax_of(X(y), m, log_sum)));
      } else if constexpr (kHard && !kSmooth) {
        const acc_t sl = kFoc && adj.alpha_vec ? s * adj.alpha_vec[y] : s;  // a per-class alpha: alpha_y
        const SoftmaxRow<acc_t> r = softmax_hard_row<kFoc>(sl, X(y), m, log_sum, a.gamma);
        loss = r.loss;
        cp = r.cp;
        cy = -cp * r.q;  // cp * (p_y - 1)
      } else if constexpr (!kFoc) {
        const SoftmaxRow<acc_t> r = softmax_soft_row(s, T, log_sum, tx);
        loss = r.loss;
        cp = r.cp;
      } else {
        acc_t lf = 0, gsum = 0;
        for (int64_t c = 0; c < C; ++c) {
          const auto f = softmax_focal<true>(log_softmax_of(X(c), m, log_sum), a.gamma, a.gamma_int);
          const acc_t e = E(c);
          lf += e * f.loss;
          gsum += e * f.G;
        }
        es = kSmooth ? acc_t(1) : s;  // e carries the weights when smoothed
        loss = es * lf;
        cp = es * gsum;
      }
      if (g) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t lp = log_softmax_of(X(c), m, log_sum);
          acc_t gk = cp * ::exp(lp);
          if constexpr (kSmoothCE) {  // E p_k - a_k (P t_k + Q)
            const acc_t ac = sm.class_weighting ? a.w[c] : acc_t(1);
            if constexpr (kHard) {
              gk = c == y ? cy : gk - smooth_target(K, ac, acc_t(0));
            } else {
              gk -= smooth_target(K, ac, Tc(c));
            }
          } else if constexpr (kHard && !kSmooth) {
            if (c == y) gk = cy;
          } else if constexpr (kFoc) {
            gk -= es * E(c) * softmax_focal<true>(lp, a.gamma, a.gamma_int).G;
          } else {
            gk -= s * Tc(c);
          }
          g[c * gs] = static_cast<scalar_t>(kAdj ? gk * adj.scale : gk);  // d / dx = s d / dz
        }
      }
    } else {
      const acc_t eps = static_cast<acc_t>(sm.eps);
      const int pow_k = kHard && sm.eps == 0 ? a.gamma_int : -1;  // binary targets only
      acc_t part = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t tc = smooth_binary_target(kHard ? acc_t(c == y) : Tc(c), eps);
        acc_t l, d;
        binary_element<kFoc>(a, X(c), tc, pow_k, l, d, c, adj.alpha_vec);
        part += l;
        if (g) g[c * gs] = static_cast<scalar_t>(s * d);
      }
      loss = s * part;
    }
    a.row_loss[r] = loss;
    a.row_denom[r] = denom;
    if (a.per_row_out) a.per_row_out[r] = static_cast<scalar_t>(loss);
  }
  assert_targets_ok<kHard>(bad);
}

}  // namespace cuda
}  // namespace cbfused
