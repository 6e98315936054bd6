// The CUDA kernels of cbfused::cb_loss, with the formulas of cbfused/math.h.
//
// cb_row_kernel: one warp (C <= 1024) or one block (C > 1024) per row. Softmax rows are
// read from global memory once: the online max / sum pass parks the row in shared
// memory (when it fits) and the gradient pass reads it from there.
// cb_flat_kernel: sigmoid / focal with small C: a block takes a tile of whole rows and
// spreads its R x C elements over all its threads, so C = 10 or 80 keeps every thread
// busy; each row's class weight is gathered once, by one thread, into shared memory.
// Both use 128-bit loads / stores where the pointers allow (cuda/vec.cuh), write the
// gradient of the un-normalised sum, and write per-row loss and denominator to O(N)
// buffers that finish_kernel reduces deterministically.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cbfused/targets.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace cbfused {
namespace cuda {

constexpr int kBlock = 256;
constexpr int kFlatTile = 2048;  // elements of a cb_flat_kernel tile

template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// One element (class c) of a sigmoid / focal loss: the (alpha-weighted) loss term and its
// derivative, before the row's class weight. kAlphaVec: the per-class alpha may be given
// (cb_flat_kernel takes none: reading it there made the float64 sigmoid kernel spill on sm_90).
template <bool kFoc, bool kAlphaVec = true, typename scalar_t>
__device__ __forceinline__ void binary_element(const RowArgs<scalar_t>& a, at::opmath_type<scalar_t> x,
                                               at::opmath_type<scalar_t> t, int pow_k,
                                               at::opmath_type<scalar_t>& l, at::opmath_type<scalar_t>& d,
                                               int64_t c, const at::opmath_type<scalar_t>* alpha_vec) {
  binary_term<kFoc, true>(x, t, a.gamma, l, d, pow_k);
  if constexpr (!kAlphaVec) {
    if (a.alpha >= 0) {
      const auto at_ = alpha_t(t, a.alpha);
      l *= at_;
      d *= at_;
    }
  } else if (a.alpha >= 0 || alpha_vec) {
    const auto at_ = a.alpha >= 0 ? alpha_t(t, a.alpha) : alpha_t_of(t, alpha_vec[c]);
    l *= at_;
    d *= at_;
  }
}

// The weight e_c a soft softmax focal row gives class c's focal term (the CPU rows'
// SoftTargets), from its target t (float, or 1 / 0 for a class index): t alpha_c, or with
// kSmooth alpha_c a_c (P t + Q) (math.h, smooth_target; a_c = w_c for 'class', else 1).
// alpha_vec null: no per-class alpha.
template <bool kSmooth, typename acc_t>
__device__ __forceinline__ acc_t soft_target(acc_t t, const Smoothing& sm, const SmoothCoef<acc_t>& K,
                                             const acc_t* w, const acc_t* alpha_vec, int64_t c) {
  acc_t e = t;
  if constexpr (kSmooth) e = smooth_target(K, sm.class_weighting ? w[c] : acc_t(1), t);
  return alpha_vec ? e * alpha_vec[c] : e;
}

// The adjusted logits (math.h, adjusted_logit) of K classes from c on, in place: z = s x + b,
// less s Delta_y at the target y (y < 0: none).
template <int K, typename acc_t>
__device__ __forceinline__ void adjust_logits(const ClassOptions<acc_t>& adj, int64_t c, int64_t y,
                                              acc_t (&xv)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    xv[k] = adjusted_logit(xv[k], adj.scale, adj.offset[c + k]);
    if (c + k == y) xv[k] -= adj.target_margin(y);
  }
}

// Targets are checked on the device, without a host sync: class targets in [0, C) or
// ignore_index, float targets in [0, 1] (NaN fails too), as on the CPU. A kernel collects
// a flag (a bad class row is treated as ignored, so nothing is read out of bounds) and
// asserts once, at its end: one assert call site, reached with few live registers,
// keeps the hot loops free of the call's stack frame and spills.
template <typename A>
__device__ __forceinline__ bool bad_float_target(A t) {
  return !(t >= A(0) && t <= A(1));
}

template <bool kHard>
__device__ __forceinline__ void assert_targets_ok(bool bad) {
  if constexpr (kHard) {
    CUDA_KERNEL_ASSERT(!bad && "cbfused: target out of range [0, C) and not ignore_index");
  } else {
    CUDA_KERNEL_ASSERT(!bad && "cbfused: float target outside [0, 1]");
  }
}

// Loads K float targets t[0..K) and adds them to the row's checks and sums:
// bad |= t outside [0, 1], sw += sum t w, st += sum t.
template <int K, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_target_sums(const scalar_t* t, const acc_t* w, acc_t (&tv)[K], bool& bad,
                                                acc_t& sw, acc_t& st) {
  load<K>(t, tv);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    bad |= bad_float_target(tv[k]);
    sw += tv[k] * w[k];
    st += tv[k];
  }
}

// cache_stride > 0: the softmax row is parked in dynamic shared memory, cache_stride
// elements per row slot (see launch.cuh); 0: the gradient pass reads the row again.
// kSmooth (the softmax family): label smoothing / class weighting `sm` (math.h, smooth_coef;
// softmax focal takes the soft path then, for class indices too). The binary family reads
// sm.eps at run time (math.h, smooth_binary_target; exact for eps = 0).
// kAdj (softmax family): adjusted logits `adj` (math.h, adjusted_logit); the cache keeps the
// stored logits, every pass adjusts what it reads.
template <typename scalar_t, int kLoss, bool kHard, int kThreads, bool kSmooth = false, bool kAdj = false>
__global__ void __launch_bounds__(kBlock, 2)
    cb_row_kernel(RowArgs<scalar_t> a, int64_t cache_stride, Smoothing sm = {},
                  ClassOptions<at::opmath_type<scalar_t>> adj = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  using RR = RowReduce<kThreads>;
  constexpr int kRowsPerBlock = kBlock / kThreads;
  __shared__ acc_t smem_a[kBlock / kWarp], smem_b[kBlock / kWarp];
  const int slot = static_cast<int>(threadIdx.x) / kThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + slot;
  const int lane = static_cast<int>(threadIdx.x) % kThreads;
  // A warp-per-row block's last warps may have no row; block-per-row kernels never
  // take this exit, so no thread leaves before a block-wide barrier.
  if (row >= a.N) return;
  const int64_t C = a.C;
  const scalar_t* x = a.x + row * a.x_stride;
  const scalar_t* t = kHard ? nullptr : a.t + row * a.t_stride;
  scalar_t* g = a.grad ? a.grad + row * C : nullptr;
  const Split sp = split_span<scalar_t>(C, x, t, g);

  acc_t s = 0, T = 0, denom = 0;
  int64_t y = -1;
  bool bad = false;
  if constexpr (kHard) {
    y = a.y[row];
    const HardTarget<acc_t> h = hard_target(y, C, a.ignore_index, a.w, a.weighted);
    bad = h.bad;
    if (!h.live()) {
      if (g) {
        for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
          constexpr int K = decltype(w)::value;
          acc_t z[K] = {};
          store<K>(g + c, z);
        });
      }
      if (lane == 0) {
        a.row_loss[row] = 0;
        a.row_denom[row] = 0;
        if (a.per_row_out) a.per_row_out[row] = scalar_t(0);
      }
      assert_targets_ok<kHard>(bad);
      return;
    }
    s = h.s;
    denom = h.denom;
  }

  acc_t loss = 0;
  constexpr bool kFoc = is_focal(kLoss);
  constexpr bool kSmoothCE = kSmooth && !kFoc;  // smoothed softmax cross-entropy
  if constexpr (!is_softmax_family(kLoss)) {
    if constexpr (!kHard) {  // s = sum_c t_c w_c is needed before the first gradient
      acc_t sw = 0, st = 0;
      for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
        constexpr int K = decltype(w)::value;
        acc_t tv[K];
        add_target_sums<K>(t + c, a.w + c, tv, bad, sw, st);
      });
      s = RR::sum(sw, smem_a);
      T = RR::sum(st, smem_b);
      denom = float_target_denom(s, T, a.weighted);
    }
    const acc_t eps = static_cast<acc_t>(sm.eps);
    const int pow_k = kHard && sm.eps == 0 ? a.gamma_int : -1;  // binary targets only
    acc_t part = 0;
    for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
      constexpr int K = decltype(w)::value;
      acc_t xv[K], tv[K], gv[K];
      load<K>(x + c, xv);
      if constexpr (!kHard) load<K>(t + c, tv);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const acc_t tc = smooth_binary_target(kHard ? acc_t(c + k == y) : tv[k], eps);
        acc_t l, d;
        binary_element<kFoc>(a, xv[k], tc, pow_k, l, d, c + k, adj.alpha_vec);
        part += l;
        gv[k] = s * d;
      }
      if (g) store<K>(g + c, gv);
    });
    loss = s * RR::sum(part, smem_a);
  } else {
    // The row's slot in shared memory, placed so that element c has the same 16-byte
    // misalignment as x + c (the packs of the split are then aligned there too). Each
    // thread reads back only what it wrote itself: no barrier needed.
    scalar_t* cache =
        cache_stride > 0 ? dynamic_smem<scalar_t>() + slot * cache_stride + misalignment(x) / sizeof(scalar_t)
                         : nullptr;
    // One read of the row: online max / sum of exp (one exp per element plus one per
    // group), and for float targets sum t w, sum t and (cross-entropy) tx = sum t (x - m)
    // relative to this thread's running max m, re-based as m grows.
    MaxSum<acc_t> ms{acc_t(-INFINITY), acc_t(0)};
    acc_t sw = 0, st = 0, tx = 0;
    // kSmoothCE: ad = sum a (x - m), A = sum a, and for float targets atd = sum a t (x - m),
    // at = sum a t, with a_c = w_c (class weighting) or 1, relative to m as tx is.
    acc_t ad = 0, A = 0, atd = 0, at = 0;
    for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
      constexpr int K = decltype(w)::value;
      acc_t xv[K];
      load<K>(x + c, xv);
      if (cache) store<K>(cache + c, xv);
      if constexpr (kAdj) adjust_logits<K>(adj, c, y, xv);
      acc_t mx = xv[0];
#pragma unroll
      for (int k = 1; k < K; ++k) mx = nan_max(mx, xv[k]);
      const acc_t m = nan_max(ms.m, mx), m_old = ms.m;
      if (m != acc_t(-INFINITY)) {
        acc_t sum = ms.s * ::exp(ms.m - m);
#pragma unroll
        for (int k = 0; k < K; ++k) sum += ::exp(xv[k] - m);
        ms = {m, sum};
      }
      if constexpr (kSmoothCE) {
        if (m_old != acc_t(-INFINITY)) {
          ad -= A * (m - m_old);
          atd -= at * (m - m_old);
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const acc_t ac = sm.class_weighting ? a.w[c + k] : acc_t(1);
          A += ac;
          ad += ac * (xv[k] - m);
        }
      }
      if constexpr (!kHard) {
        acc_t tv[K];
        const acc_t st_old = st;
        add_target_sums<K>(t + c, a.w + c, tv, bad, sw, st);
        if constexpr (kSmoothCE) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const acc_t atk = (sm.class_weighting ? a.w[c + k] : acc_t(1)) * tv[k];
            at += atk;
            atd += atk * (xv[k] - m);
          }
        } else if constexpr (!kFoc) {
          if (st_old > acc_t(0)) tx -= st_old * (m - m_old);
#pragma unroll
          for (int k = 0; k < K; ++k) tx += tv[k] * (xv[k] - m);
        }
      }
    });
    const acc_t m_thread = ms.m;
    ms = RR::max_sum(ms, smem_a, smem_b);
    const acc_t log_sum = ::log(ms.s);  // log p: log_softmax_of (math.h)
    if constexpr (!kHard) {
      s = RR::sum(sw, smem_a);
      T = RR::sum(st, smem_b);
      denom = float_target_denom(s, T, a.weighted);
    }
    acc_t cp = 0, cy = 0, es = s;  // es: the soft focal rows' factor of e (s, or 1)
    // hard targets: the target's (adjusted) logit
    acc_t x_y = 0;
    if constexpr (kHard) {
      x_y = static_cast<acc_t>(x[y]);
      if constexpr (kAdj) x_y = adjusted_logit(x_y, adj.scale, adj.offset[y]) - adj.target_margin(y);
    }
    SmoothCoef<acc_t> sc{0, 0};  // kSmooth: P and Q
    if constexpr (kSmooth)
      sc = smooth_coef(s, static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), sm.class_weighting);
    if constexpr (kSmoothCE) {
      // the sums relative to the row's max (each thread summed them relative to its own)
      const acc_t shift = m_thread != acc_t(-INFINITY) ? ms.m - m_thread : acc_t(0);
      const acc_t ad_row = RR::sum(ad - A * shift, smem_a);
      const acc_t A_row = RR::sum(A, smem_b);
      acc_t at_row, atd_row;
      if constexpr (kHard) {
        at_row = sm.class_weighting ? s : acc_t(1);  // a_y
        atd_row = at_row * (x_y - ms.m);
      } else {
        atd_row = RR::sum(atd - at * shift, smem_a);
        at_row = RR::sum(at, smem_b);
      }
      const SoftmaxRow<acc_t> r =
          softmax_soft_row(acc_t(1), sc.P * at_row + sc.Q * A_row, log_sum, sc.P * atd_row + sc.Q * ad_row);
      loss = r.loss;
      cp = r.cp;
      if constexpr (kHard) {
        const acc_t q = softmax_one_minus_p(log_softmax_of(x_y, ms.m, log_sum));
        cy = smooth_grad_y(sc, at_row, A_row, q);
      }
    } else if constexpr (kHard && !kSmooth) {
      // a per-class alpha (softmax focal) scales the sample's loss and gradient by alpha_y
      const acc_t sl = kFoc && adj.alpha_vec ? s * adj.alpha_vec[y] : s;
      const SoftmaxRow<acc_t> r = softmax_hard_row<kFoc>(sl, x_y, ms.m, log_sum, a.gamma);
      loss = r.loss;
      cp = r.cp;
      cy = -cp * r.q;  // cp * (p_y - 1)
    } else if constexpr (!kFoc) {
      // tx relative to the row's max (each thread summed it relative to its own)
      const acc_t tx_row = RR::sum(st > acc_t(0) ? tx - st * (ms.m - m_thread) : tx, smem_a);
      const SoftmaxRow<acc_t> r = softmax_soft_row(s, T, log_sum, tx_row);
      loss = r.loss;
      cp = r.cp;
    } else {
      // soft focal: float targets, or (kSmooth) the smoothed targets of either kind
      acc_t lf = 0, gs = 0;
      for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
        constexpr int K = decltype(w)::value;
        acc_t xv[K], tv[K];
        load<K>(cache ? cache + c : x + c, xv);
        if constexpr (kAdj) adjust_logits<K>(adj, c, y, xv);
        if constexpr (!kHard) load<K>(t + c, tv);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const auto f = softmax_focal<true>(log_softmax_of(xv[k], ms.m, log_sum), a.gamma, a.gamma_int);
          const acc_t tc = kHard ? acc_t(c + k == y) : tv[k];
          const acc_t e = soft_target<kSmooth>(tc, sm, sc, a.w, adj.alpha_vec, c + k);
          lf += e * f.loss;
          gs += e * f.G;
        }
      });
      es = kSmooth ? acc_t(1) : s;  // e carries the weights when smoothed
      loss = es * RR::sum(lf, smem_a);
      cp = es * RR::sum(gs, smem_b);
    }
    if (g) {
      for_each_group<kThreads, scalar_t>(sp, C, lane, [&](auto w, int64_t c) {
        constexpr int K = decltype(w)::value;
        acc_t xv[K], tv[K], gv[K];
        load<K>(cache ? cache + c : x + c, xv);
        if constexpr (kAdj) adjust_logits<K>(adj, c, y, xv);
        if constexpr (!kHard) load<K>(t + c, tv);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const acc_t lp = log_softmax_of(xv[k], ms.m, log_sum);
          acc_t gk = cp * ::exp(lp);
          if constexpr (kSmoothCE) {  // E p_k - a_k (P t_k + Q)
            const acc_t ac = sm.class_weighting ? a.w[c + k] : acc_t(1);
            if constexpr (kHard) {
              gk = c + k == y ? cy : gk - smooth_target(sc, ac, acc_t(0));
            } else {
              gk -= smooth_target(sc, ac, tv[k]);
            }
          } else if constexpr (kHard && !kSmooth) {
            if (c + k == y) gk = cy;
          } else if constexpr (kFoc) {
            const acc_t tc = kHard ? acc_t(c + k == y) : tv[k];
            gk -= es * soft_target<kSmooth>(tc, sm, sc, a.w, adj.alpha_vec, c + k) *
                  softmax_focal<true>(lp, a.gamma, a.gamma_int).G;
          } else {
            gk -= s * tv[k];
          }
          gv[k] = kAdj ? gk * adj.scale : gk;  // d / dx = s d / dz
        }
        store<K>(g + c, gv);
      });
    }
  }
  if (lane == 0) {
    a.row_loss[row] = loss;
    a.row_denom[row] = denom;
    if (a.per_row_out) a.per_row_out[row] = static_cast<scalar_t>(loss);
  }
  assert_targets_ok<kHard>(bad);
}

// Sigmoid / focal over a tile of `rows_per_tile` whole rows (rows_per_tile * C <=
// kFlatTile, rows_per_tile <= kBlock and a multiple of 8, so that every tile starts on
// a 16-byte boundary when the tensor does). Needs contiguous rows (x_stride == C, and
// t_stride == C for float targets).
template <typename scalar_t, int kLoss, bool kHard>
__global__ void __launch_bounds__(kBlock) cb_flat_kernel(RowArgs<scalar_t> a, int rows_per_tile) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFoc = is_focal(kLoss);
  __shared__ acc_t s_row[kBlock];  // class weight of each row of the tile
  __shared__ int y_row[kBlock];    // hard targets: the class, -1 for an ignored row
  __shared__ acc_t tile_l[kFlatTile];
  __shared__ acc_t tile_t[kHard ? 1 : kFlatTile];  // float targets, parked by pass 0
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_tile;
  const int rows = static_cast<int>(a.N - r0 < rows_per_tile ? a.N - r0 : rows_per_tile);
  const int C = static_cast<int>(a.C);
  const int n = rows * C;
  const int64_t base = r0 * a.C;
  const scalar_t* x = a.x + base;
  const scalar_t* t = kHard ? nullptr : a.t + base;
  scalar_t* g = a.grad ? a.grad + base : nullptr;
  const Split sp = split_span<scalar_t>(n, x, t, g);

  bool bad = false;
  if constexpr (kHard) {
    if (tid < rows) {
      const int64_t row = r0 + tid;
      const int64_t y = a.y[row];
      const HardTarget<acc_t> h = hard_target(y, a.C, a.ignore_index, a.w, a.weighted);
      bad = h.bad;
      y_row[tid] = h.live() ? static_cast<int>(y) : -1;
      s_row[tid] = h.s;
      a.row_denom[row] = h.denom;
    }
  } else {
    // Pass 0, coalesced over the tile: park t, and t w in tile_l, then one thread per
    // row sums its row in a fixed order.
    for_each_group<kBlock, scalar_t>(sp, n, tid, [&](auto w, int64_t e) {
      constexpr int K = decltype(w)::value;
      acc_t tv[K];
      load<K>(t + e, tv);
      int c = static_cast<int>(e % C);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        bad |= bad_float_target(tv[k]);
        tile_t[e + k] = tv[k];
        tile_l[e + k] = tv[k] * a.w[c];
        c = c + 1 == C ? 0 : c + 1;
      }
    });
    __syncthreads();
    if (tid < rows) {
      acc_t sw = 0, st = 0;
      for (int c = 0; c < C; ++c) {
        sw += tile_l[tid * C + c];
        st += tile_t[tid * C + c];
      }
      s_row[tid] = sw;
      a.row_denom[r0 + tid] = float_target_denom(sw, st, a.weighted);
    }
  }
  __syncthreads();

  const int pow_k = kHard ? a.gamma_int : -1;
  for_each_group<kBlock, scalar_t>(sp, n, tid, [&](auto w, int64_t e) {
    constexpr int K = decltype(w)::value;
    acc_t xv[K], gv[K];
    load<K>(x + e, xv);
    int r = static_cast<int>(e / C);
    int c = static_cast<int>(e - static_cast<int64_t>(r) * C);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t l = 0, d = 0;
      const int yr = kHard ? y_row[r] : 0;
      if (!kHard || yr >= 0) {
        const acc_t tc = kHard ? acc_t(c == yr) : tile_t[e + k];
        binary_element<kFoc, false>(a, xv[k], tc, pow_k, l, d, c, nullptr);
        d *= s_row[r];
      }
      tile_l[e + k] = l;
      gv[k] = d;
      if (++c == C) {
        c = 0;
        ++r;
      }
    }
    if (g) store<K>(g + e, gv);
  });
  __syncthreads();
  if (tid < rows) {
    acc_t part = 0;
    for (int c = 0; c < C; ++c) part += tile_l[tid * C + c];
    const acc_t loss = s_row[tid] * part;
    a.row_loss[r0 + tid] = loss;
    if (a.per_row_out) a.per_row_out[r0 + tid] = static_cast<scalar_t>(loss);
  }
  assert_targets_ok<kHard>(bad);
}

// Deterministic sums of [n] partials in double (a mean can be in range while its float
// sum is not), then the reduction's final value: loss = sum * inv, inv = 1/D (means; 0
// when D = 0) or 1. One block of kFinishBlock threads; thread i sums elements i + j *
// kFinishBlock into kFinishLanes accumulators by j % kFinishLanes (loads of several
// iterations in flight: with N = 65536 rows, one accumulator per thread over 256 threads
// took 15-26 us on an H100), which add up in a fixed order, then a fixed tree. The order
// depends on n alone, never on the GPU.
constexpr int kFinishBlock = 1024;
constexpr int kFinishLanes = 4;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinishBlock)
    finish_kernel(const acc_t* part_loss, const acc_t* part_denom, int64_t n, bool mean, acc_t extra_scale,
                  scalar_t* loss_out, acc_t* inv_out) {
  __shared__ double smem[kFinishBlock / kWarp];
  double l[kFinishLanes] = {}, d[kFinishLanes] = {};
  constexpr int64_t kStep = static_cast<int64_t>(kFinishBlock) * kFinishLanes;
  int64_t i0 = threadIdx.x;
  for (; i0 + (kFinishLanes - 1) * kFinishBlock < n; i0 += kStep) {
#pragma unroll
    for (int k = 0; k < kFinishLanes; ++k) {
      l[k] += part_loss[i0 + k * kFinishBlock];
      if (part_denom) d[k] += part_denom[i0 + k * kFinishBlock];
    }
  }
#pragma unroll
  for (int k = 0; k < kFinishLanes; ++k) {  // the last, partial step
    if (i0 + k * kFinishBlock < n) {
      l[k] += part_loss[i0 + k * kFinishBlock];
      if (part_denom) d[k] += part_denom[i0 + k * kFinishBlock];
    }
  }
  double lt = 0, dt = 0;
#pragma unroll
  for (int k = 0; k < kFinishLanes; ++k) {
    lt += l[k];
    dt += d[k];
  }
  lt = RowReduce<kFinishBlock>::sum(lt, smem);
  dt = RowReduce<kFinishBlock>::sum(dt, smem);
  if (threadIdx.x == 0) {
    const double inv = mean ? inv_denominator(dt) : 1.0;
    if (inv_out) *inv_out = static_cast<acc_t>(inv);
    *loss_out = static_cast<scalar_t>(lt * inv * static_cast<double>(extra_scale));
  }
}

}  // namespace cuda
}  // namespace cbfused
