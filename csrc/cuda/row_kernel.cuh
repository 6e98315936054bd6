// The CUDA row kernel of cbfused::cb_loss: one warp (C <= 1024) or one block (C > 1024)
// per row computes the row's class-balanced loss and, when asked, its gradient
// (for the un-normalised sum), with the formulas of cbfused/math.h. Per-row loss and
// denominator go to O(N) buffers that finish_kernel reduces deterministically.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cuda/reduce.cuh"

namespace cbfused {
namespace cuda {

constexpr int kBlock = 256;

template <typename scalar_t, int kLoss, bool kHard, int kThreads>
__global__ void __launch_bounds__(kBlock) cb_row_kernel(RowArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  using RR = RowReduce<kThreads>;
  constexpr int kRowsPerBlock = kBlock / kThreads;
  __shared__ acc_t smem_a[kBlock / kWarp], smem_b[kBlock / kWarp];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  const int lane = threadIdx.x % kThreads;
  // With a warp per row, a block's last warps may have no row: they still must not
  // return before a block-wide barrier, but warp-per-row kernels use none.
  if (row >= a.N) return;
  const int64_t C = a.C;
  const scalar_t* x = a.x + row * a.x_stride;
  const scalar_t* t = kHard ? nullptr : a.t + row * a.t_stride;
  scalar_t* g = a.grad ? a.grad + row * C : nullptr;

  acc_t s = 0, T = 0, denom = 0;
  int64_t y = -1;
  if constexpr (kHard) {
    y = a.y[row];
    if (y == a.ignore_index) {
      if (g)
        for (int64_t c = lane; c < C; c += kThreads) g[c] = scalar_t(0);
      if (lane == 0) {
        a.row_loss[row] = 0;
        a.row_denom[row] = 0;
        if (a.per_row_out) a.per_row_out[row] = scalar_t(0);
      }
      return;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < C && "cbfused: target out of range [0, C) and not ignore_index");
    s = a.w[y];
    denom = a.weighted ? s : acc_t(1);
  } else {
    acc_t sw = 0, st = 0;
    for (int64_t c = lane; c < C; c += kThreads) {
      const acc_t tc = static_cast<acc_t>(t[c]);
      CUDA_KERNEL_ASSERT(tc >= acc_t(0) && tc <= acc_t(1) && "cbfused: float target outside [0, 1]");
      sw += tc * a.w[c];
      st += tc;
    }
    s = RR::sum(sw, smem_a);
    T = RR::sum(st, smem_b);
    denom = a.weighted ? s : T;
  }

  acc_t loss = 0;
  if constexpr (kLoss == kSigmoid || kLoss == kFocal) {
    constexpr bool kFoc = kLoss == kFocal;
    const int pow_k = kHard ? a.gamma_int : -1;
    const bool has_alpha = a.alpha >= acc_t(0);
    acc_t part = 0;
    for (int64_t c = lane; c < C; c += kThreads) {
      const acc_t xc = static_cast<acc_t>(x[c]);
      const acc_t tc = kHard ? acc_t(c == y) : static_cast<acc_t>(t[c]);
      acc_t l, d;
      binary_term<kFoc, true>(xc, tc, a.gamma, l, d, pow_k);
      if (has_alpha) {
        const acc_t at = alpha_t(tc, a.alpha);
        l *= at;
        d *= at;
      }
      part += l;
      if (g) g[c] = static_cast<scalar_t>(s * d);
    }
    loss = s * RR::sum(part, smem_a);
  } else {
    constexpr bool kFoc = kLoss == kSoftmaxFocal;
    // Online max / sum of exp in one read of the row.
    MaxSum<acc_t> ms{acc_t(-INFINITY), acc_t(0)};
    acc_t tx = 0;
    for (int64_t c = lane; c < C; c += kThreads) {
      const acc_t xc = static_cast<acc_t>(x[c]);
      ms = merge(ms, MaxSum<acc_t>{xc, acc_t(1)});
      if constexpr (!kHard && !kFoc) tx += static_cast<acc_t>(t[c]) * xc;
    }
    ms = RR::max_sum(ms, smem_a, smem_b);
    const acc_t lse = ms.m + ::log(ms.s);
    acc_t cp = 0, cy = 0;
    if constexpr (kHard) {
      const acc_t logp = static_cast<acc_t>(x[y]) - lse;
      const auto f = softmax_focal<kFoc>(logp, a.gamma);
      loss = s * f.loss;
      cp = s * f.G;
      cy = cp * ::expm1(logp);  // cp * (p_y - 1)
    } else if constexpr (!kFoc) {
      loss = s * (T * lse - RR::sum(tx, smem_a));
      cp = s * T;
    } else {
      acc_t lf = 0, gs = 0;
      for (int64_t c = lane; c < C; c += kThreads) {
        const acc_t tc = static_cast<acc_t>(t[c]);
        const auto f = softmax_focal<true>(static_cast<acc_t>(x[c]) - lse, a.gamma);
        lf += tc * f.loss;
        gs += tc * f.G;
      }
      loss = s * RR::sum(lf, smem_a);
      cp = s * RR::sum(gs, smem_b);
    }
    if (g) {
      for (int64_t c = lane; c < C; c += kThreads) {
        const acc_t lp = static_cast<acc_t>(x[c]) - lse;
        acc_t gk = cp * ::exp(lp);
        if constexpr (kHard) {
          if (c == y) gk = cy;
        } else if constexpr (kFoc) {
          gk -= s * static_cast<acc_t>(t[c]) * softmax_focal<true>(lp, a.gamma).G;
        } else {
          gk -= s * static_cast<acc_t>(t[c]);
        }
        g[c] = static_cast<scalar_t>(gk);
      }
    }
  }
  if (lane == 0) {
    a.row_loss[row] = loss;
    a.row_denom[row] = denom;
    if (a.per_row_out) a.per_row_out[row] = static_cast<scalar_t>(loss);
  }
}

// Deterministic sums of [n] partials (fixed per-thread strides, fixed tree) in double (a
// mean can be in range while its float sum is not), then the reduction's final value:
// loss = sum * inv, inv = 1/D (means; 0 when D = 0) or 1.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlock)
    finish_kernel(const acc_t* part_loss, const acc_t* part_denom, int64_t n, bool mean, acc_t extra_scale,
                  scalar_t* loss_out, acc_t* inv_out) {
  __shared__ double smem[kBlock / kWarp];
  double l = 0, d = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) {
    l += part_loss[i];
    if (part_denom) d += part_denom[i];
  }
  l = RowReduce<kBlock>::sum(l, smem);
  d = RowReduce<kBlock>::sum(d, smem);
  if (threadIdx.x == 0) {
    const double inv = mean ? (d > 0 ? 1.0 / d : 0.0) : 1.0;
    if (inv_out) *inv_out = static_cast<acc_t>(inv);
    *loss_out = static_cast<scalar_t>(l * inv * static_cast<double>(extra_scale));
  }
}

}  // namespace cuda
}  // namespace cbfused
