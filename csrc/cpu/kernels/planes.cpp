// cbfused::cb_loss on the CPU in the planes layout (channels-first dense logits
// [N, C, d1, ..., dk], csrc/cbfused/checks.h): each class is a plane of S positions at unit
// stride, so a vector holds one class of kLanes consecutive positions, every lane is one
// position, and the class loop is a reduction across vectors. The per-position math is that
// of the rows (math.h, targets.h), lane by lane; the sums run in fixed chunks of tiles, so
// their bits do not depend on the thread count. Compiled once per CPU ISA (csrc/cpu/kernels.h).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cbfused/targets.h"
#include "cpu/rows.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {
namespace {

// One vector of n <= kLanes positions of a plane (zeros past n), in the accumulation type.
template <typename IO>
inline typename IO::V load_lanes(const typename IO::scalar_type* p, int64_t n) {
  typename IO::V v[IO::kVecs];
  IO::load(p, n, v);
  return v[0];
}

template <typename IO>
inline void store_lanes(typename IO::scalar_type* p, int64_t n, const typename IO::V& x) {
  typename IO::V v[IO::kVecs];
  v[0] = x;
  if constexpr (IO::kVecs > 1) v[1] = typename IO::V(0);
  IO::store(p, n, v);
}

// RowIO with its element type named (load_lanes / store_lanes take it).
template <typename scalar_t>
struct PlaneIO : RowIO<scalar_t> {
  using scalar_type = scalar_t;
};

// A tile: positions [p0, p0 + m) of sample n (m <= kLanes), and its per-lane target state.
template <typename scalar_t>
struct Tile {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  static constexpr int64_t L = IO::kLanes;
  int64_t n = 0, p0 = 0, m = 0;
  const scalar_t* x = nullptr;      // class 0 of the tile's first position
  const scalar_t* t = nullptr;      // float targets, alike
  scalar_t* g = nullptr;            // gradient, alike (contiguous planes), or null
  alignas(64) acc_t s[L] = {};      // class weight s (0 for an ignored or padding lane)
  alignas(64) acc_t denom[L] = {};  // share of the mean's D
  alignas(64) acc_t live[L] = {};   // 1 for a live lane
  alignas(64) acc_t T[L] = {};      // float targets: sum t
  int64_t y[L] = {};                // hard targets: the class (-1: not live)
};

// The tile's targets: class weight, denominator share and liveness per lane; checks them.
template <typename scalar_t, bool kHard>
inline void tile_targets(const RowArgs<scalar_t>& a, const Planes& pl, Tile<scalar_t>& tl) {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const int64_t r0 = tl.n * pl.S + tl.p0;
  if constexpr (kHard) {
    for (int64_t k = 0; k < tl.m; ++k) {
      const int64_t y = a.y[r0 + k];
      const HardTarget<acc_t> h = hard_target(y, a.C, a.ignore_index, a.w, a.weighted);
      if (h.bad) target_out_of_range(y, a.C, r0 + k, a.ignore_index);
      tl.y[k] = h.live() ? y : -1;
      tl.s[k] = h.s;
      tl.denom[k] = h.denom;
      tl.live[k] = h.live() ? acc_t(1) : acc_t(0);
    }
    for (int64_t k = tl.m; k < Tile<scalar_t>::L; ++k) tl.y[k] = -1;
  } else {
    V sv(0), Tv(0), lo(0), hi(0);
    for (int64_t c = 0; c < a.C; ++c) {
      const V tv = load_lanes<IO>(tl.t + c * pl.t_cstride, tl.m);  // padding lanes: 0
      sv = at::vec::fmadd(tv, V(a.w[c]), sv);
      Tv = Tv + tv;
      lo = at::vec::minimum(lo, tv);
      hi = at::vec::maximum(hi, tv);
    }
    const V ok = (lo >= V(acc_t(0))) & (hi <= V(acc_t(1)));
    if (ok.zero_mask() != 0) {
      alignas(64) acc_t l[Tile<scalar_t>::L], h[Tile<scalar_t>::L];
      lo.store(l);
      hi.store(h);
      for (int64_t k = 0; k < Tile<scalar_t>::L; ++k) {
        if (!(l[k] >= acc_t(0))) float_target_out_of_range(l[k], r0 + k);
        if (!(h[k] <= acc_t(1))) float_target_out_of_range(h[k], r0 + k);
      }
    }
    sv.store(tl.s);
    Tv.store(tl.T);
    for (int64_t k = 0; k < tl.m; ++k) {
      tl.denom[k] = float_target_denom(tl.s[k], tl.T[k], a.weighted);
      tl.live[k] = acc_t(1);
    }
  }
}

// How the softmax passes read a tile's logits: as stored (kAdj = false), or adjusted (math.h,
// adjusted_logit): class c of every lane as z_c = s x_c + b_c, less s Delta_c on the lanes
// whose target is c (kMargin: class-index targets).
template <typename scalar_t, bool kAdj>
struct TileLogits {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const Tile<scalar_t>& tl;
  const Planes& pl;
  const ClassOptions<acc_t>& adj;
  V yv;  // the lanes' targets as numbers (-1: none)

  TileLogits(const Tile<scalar_t>& tl_, const Planes& pl_, const ClassOptions<acc_t>& adj_, bool hard)
      : tl(tl_), pl(pl_), adj(adj_), yv(-1) {
    if (kAdj && hard) {
      alignas(64) acc_t yf[IO::kLanes];
      for (int64_t k = 0; k < IO::kLanes; ++k) yf[k] = static_cast<acc_t>(tl.y[k]);
      yv = V::loadu(yf);
    }
  }

  V load(int64_t c) const {
    const V xv = load_lanes<IO>(tl.x + c * pl.x_cstride, tl.m);
    if constexpr (!kAdj) {
      return xv;
    } else {
      const V z = adjusted_logit(xv, V(adj.scale), V(adj.offset[c]));
      return z - (V(adj.target_margin(c)) & (yv == V(static_cast<acc_t>(c))));
    }
  }

  // lane k's logit of class c
  acc_t at(int64_t k, int64_t c) const {
    const acc_t xc = static_cast<acc_t>(tl.x[c * pl.x_cstride + k]);
    if constexpr (!kAdj) {
      return xc;
    } else {
      return adjusted_logit(xc, adj.scale, adj.offset[c]) - (tl.y[k] == c ? adj.target_margin(c) : acc_t(0));
    }
  }
};

// Pass 1 of a softmax tile: the max of each position over the classes (0 for a dead lane);
// the tile's logits are parked (contiguous, in cache) for the passes after it, so the planes
// are read from memory once, and the next tile's lines of each plane are prefetched.
template <typename scalar_t, bool kAdj>
inline typename PlaneIO<scalar_t>::V tile_max_park(const RowArgs<scalar_t>& a, const Planes& pl,
                                                   const Tile<scalar_t>& tl,
                                                   const TileLogits<scalar_t, kAdj>& X,
                                                   at::opmath_type<scalar_t>* park,
                                                   const typename PlaneIO<scalar_t>::V& live_mask) {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t L = IO::kLanes;
  V mx(-std::numeric_limits<at::opmath_type<scalar_t>>::infinity());
  const bool more = tl.p0 + L < pl.S;
  for (int64_t c = 0; c < a.C; ++c) {
    if (more) __builtin_prefetch(tl.x + c * pl.x_cstride + L);
    const V xv = X.load(c);
    xv.store(park + c * L);
    mx = hw_max(mx, xv);
  }
  return V::blendv(V(0), mx, live_mask);
}

// Softmax cross-entropy and softmax focal loss over one tile (the formulas of softmax_rows,
// one position per lane, kSmooth too); writes the tile's per-lane loss.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard, bool kAdj, int kSmooth = 0>
void softmax_tile(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                  const ClassOptions<at::opmath_type<scalar_t>>& adj, Tile<scalar_t>& tl,
                  at::opmath_type<scalar_t>* park, at::opmath_type<scalar_t>* loss_out) {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  static_assert(kSmooth == 0 || kFocal, "smoothed cross-entropy: softmax_smooth_tile");
  constexpr bool kSoft = !kHard || kSmooth != 0;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, m = tl.m;
  const V live_mask = V::loadu(tl.live) > V(acc_t(0));
  const bool more = tl.p0 + L < pl.S;
  const TileLogits<scalar_t, kAdj> X(tl, pl, adj, kHard);
  const V mx = tile_max_park(a, pl, tl, X, park, live_mask);
  // Pass 2: sum of exp(x - max), parked in place of x; float-target cross-entropy:
  // sum t (x - max).
  V sum(0), tx(0);
  for (int64_t c = 0; c < C; ++c) {
    const V d = V::loadu(park + c * L) - mx;
    const V e = MathOps<V>::exp_nonpos(d);
    sum = sum + e;
    e.store(park + c * L);
    if constexpr (!kHard && !kFocal) tx = at::vec::fmadd(load_lanes<IO>(tl.t + c * pl.t_cstride, m), d, tx);
  }
  // Dead lanes (ignored, padding): sum 1, s 0: finite math, zero loss.
  const V sumv = V::blendv(V(1), sum, live_mask);
  const V sv = V::loadu(tl.s);
  const V ls = MathOps<V>::log(sumv);
  V loss, cp, q;
  // The soft targets e_c of every lane (softmax_rows' SoftTargets): t_c alpha_c, or
  // alpha_c a_c (P t_c + Q) (kSmooth; t one-hot at y for class indices); st: their factor.
  SmoothCoef<V> K{V(0), V(0)};
  if constexpr (kSmooth != 0)
    K = smooth_coef(sv, static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), kSmooth == 2);
  const V st = kSmooth != 0 ? V(acc_t(1)) : sv;
  V yv(-1);  // class indices: the lanes' targets as numbers
  if constexpr (kHard && kSmooth != 0) {
    alignas(64) acc_t yf[L];
    for (int64_t k = 0; k < L; ++k) yf[k] = static_cast<acc_t>(tl.y[k]);
    yv = V::loadu(yf);
  }
  auto targets = [&](int64_t c) {
    V e = kHard ? V(acc_t(1)) & (yv == V(static_cast<acc_t>(c))) : load_lanes<IO>(tl.t + c * pl.t_cstride, m);
    if constexpr (kSmooth != 0) e = smooth_target(K, V(kSmooth == 2 ? a.w[c] : acc_t(1)), e);
    return adj.alpha_vec ? e * V(adj.alpha_vec[c]) : e;
  };
  if constexpr (!kSoft) {
    alignas(64) acc_t xy[L] = {};
    for (int64_t k = 0; k < m; ++k)
      if (tl.y[k] >= 0) xy[k] = X.at(k, tl.y[k]);  // in cache
    // a per-class alpha (softmax focal) scales the position's loss and gradient by alpha_y
    alignas(64) acc_t ay[L];
    for (int64_t k = 0; k < L; ++k)
      ay[k] = kFocal && adj.alpha_vec && tl.y[k] >= 0 ? adj.alpha_vec[tl.y[k]] : acc_t(1);
    const SoftmaxRow<V> r = softmax_hard_row<kFocal>(sv * V::loadu(ay), V::loadu(xy), mx, ls, a.gamma);
    loss = r.loss;
    cp = r.cp;
    q = r.q;
  } else if constexpr (!kFocal) {
    const SoftmaxRow<V> r = softmax_soft_row(sv, V::loadu(tl.T), ls, tx);
    loss = r.loss;
    cp = r.cp;
  } else {
    // Pass 3 (soft focal): sum_c e_c * focal loss, sum_c e_c G_c.
    V lv(0), gsum(0);
    for (int64_t c = 0; c < C; ++c) {
      const auto f = softmax_focal<true>(log_softmax_of(X.load(c), mx, ls), a.gamma, a.gamma_int);
      const V e = targets(c);
      lv = at::vec::fmadd(e, f.loss, lv);
      gsum = at::vec::fmadd(e, f.G, gsum);
    }
    loss = st * lv;
    cp = st * gsum;
  }
  V::blendv(V(0), loss, live_mask).store(loss_out);
  if constexpr (kGrad) {
    const V pre(a.grad_prescale * (kAdj ? adj.scale : acc_t(1)));  // d / dx = s d / dz
    const V cpv = cp * pre;
    const V cpe = cpv / sumv;  // cp p_k = cpe e_k
    const V stp = st * pre;
    for (int64_t c = 0; c < C; ++c) {
      if (more) __builtin_prefetch(tl.g + c * pl.S + L, 1);
      V gk = cpe * V::loadu(park + c * L);
      if constexpr (kSoft) {
        if constexpr (kFocal) {
          const V lp = log_softmax_of(X.load(c), mx, ls);
          gk = gk - stp * targets(c) * softmax_focal<true>(lp, a.gamma, a.gamma_int).G;
        } else {
          gk = gk - stp * load_lanes<IO>(tl.t + c * pl.t_cstride, m);
        }
      }
      store_lanes<IO>(tl.g + c * pl.S, m, V::blendv(V(0), gk, live_mask));
    }
    if constexpr (!kSoft) {
      alignas(64) acc_t cy[L];
      (-cpv * q).store(cy);  // grad_y = cp * (p_y - 1)
      for (int64_t k = 0; k < m; ++k)
        if (tl.y[k] >= 0) tl.g[tl.y[k] * pl.S + k] = static_cast<scalar_t>(cy[k]);
    }
  }
}

// Smoothed softmax cross-entropy over one tile (label smoothing, or PyTorch's class weighting
// of float targets): softmax_smooth_rows' formulas (math.h, smooth_coef), one position per
// lane, with a_c = w_c (kClass) or 1 a broadcast per class.
template <typename scalar_t, bool kGrad, bool kHard, bool kClass, bool kAdj>
void softmax_smooth_tile(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                         const ClassOptions<at::opmath_type<scalar_t>>& adj, Tile<scalar_t>& tl,
                         at::opmath_type<scalar_t>* park, at::opmath_type<scalar_t>* loss_out) {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, m = tl.m;
  const V live_mask = V::loadu(tl.live) > V(acc_t(0));
  const bool more = tl.p0 + L < pl.S;
  const TileLogits<scalar_t, kAdj> X(tl, pl, adj, kHard);
  const V mx = tile_max_park(a, pl, tl, X, park, live_mask);
  // sum e, ad = sum a (x - max), A = sum a; float targets: atd = sum a t (x - max), at = sum a t
  V sum(0), ad(0), atd(0), at(0);
  acc_t A = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ac = kClass ? a.w[c] : acc_t(1);
    A += ac;
    const V d = V::loadu(park + c * L) - mx;
    const V e = MathOps<V>::exp_nonpos(d);
    sum = sum + e;
    e.store(park + c * L);
    ad = at::vec::fmadd(V(ac), d, ad);
    if constexpr (!kHard) {
      const V tv = V(ac) * load_lanes<IO>(tl.t + c * pl.t_cstride, m);
      atd = at::vec::fmadd(tv, d, atd);
      at = at + tv;
    }
  }
  const V sumv = V::blendv(V(1), sum, live_mask);
  const V sv = V::loadu(tl.s);
  const V ls = MathOps<V>::log(sumv);
  alignas(64) acc_t xy[L] = {};
  if constexpr (kHard) {
    for (int64_t k = 0; k < m; ++k)
      if (tl.y[k] >= 0) xy[k] = X.at(k, tl.y[k]);         // in cache
    at = kClass ? sv : V::blendv(V(0), V(1), live_mask);  // a_y
    atd = at * (V::loadu(xy) - mx);
  }
  const V Av = V::blendv(V(0), V(A), live_mask);
  const SmoothCoef<V> K = smooth_coef(sv, static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), kClass);
  const V E = K.P * at + K.Q * Av;
  const SoftmaxRow<V> row = softmax_soft_row(V(1), E, ls, K.P * atd + K.Q * ad);
  V::blendv(V(0), row.loss, live_mask).store(loss_out);
  if constexpr (kGrad) {
    const V pre(a.grad_prescale * (kAdj ? adj.scale : acc_t(1)));  // d / dx = s d / dz
    const SmoothCoef<V> Kp{K.P * pre, K.Q * pre};
    const V cpe = row.cp * pre / sumv;
    for (int64_t c = 0; c < C; ++c) {
      if (more) __builtin_prefetch(tl.g + c * pl.S + L, 1);
      const V tc = kHard ? V(0) : load_lanes<IO>(tl.t + c * pl.t_cstride, m);  // the caller writes grad_y
      const V gk = cpe * V::loadu(park + c * L) - smooth_target(Kp, V(kClass ? a.w[c] : acc_t(1)), tc);
      store_lanes<IO>(tl.g + c * pl.S, m, V::blendv(V(0), gk, live_mask));
    }
    if constexpr (kHard) {
      alignas(64) acc_t cy[L];
      const V q = softmax_one_minus_p(log_softmax_of(V::loadu(xy), mx, ls));
      smooth_grad_y(Kp, at, Av, q).store(cy);
      for (int64_t k = 0; k < m; ++k)
        if (tl.y[k] >= 0) tl.g[tl.y[k] * pl.S + k] = static_cast<scalar_t>(cy[k]);
    }
  }
}

// Sigmoid cross-entropy and the paper's sigmoid focal loss over one tile (binary_term per
// element, one position per lane; the rows' formulas), label smoothing `eps` included.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard>
void binary_tile(const RowArgs<scalar_t>& a, const Planes& pl,
                 const ClassOptions<at::opmath_type<scalar_t>>& adj, at::opmath_type<scalar_t> eps,
                 Tile<scalar_t>& tl, at::opmath_type<scalar_t>* loss_out) {
  using IO = PlaneIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, m = tl.m;
  const V live_mask = V::loadu(tl.live) > V(acc_t(0));
  const V sv = V::loadu(tl.s);
  const V gs = sv * V(a.grad_prescale);
  const bool smooth = eps > acc_t(0);
  const int pow_k = kHard && !smooth ? a.gamma_int : -1;  // binary t only
  const acc_t gamma = a.gamma, alpha = a.alpha;
  alignas(64) acc_t yf[L];
  for (int64_t k = 0; k < L; ++k) yf[k] = static_cast<acc_t>(tl.y[k]);
  const V yv = V::loadu(yf);
  V lacc(0);
  const bool more = tl.p0 + L < pl.S;
  for (int64_t c = 0; c < C; ++c) {
    if (more) __builtin_prefetch(tl.x + c * pl.x_cstride + L);
    const V xv = load_lanes<IO>(tl.x + c * pl.x_cstride, m);
    V tv =
        kHard ? V(acc_t(1)) & (yv == V(static_cast<acc_t>(c))) : load_lanes<IO>(tl.t + c * pl.t_cstride, m);
    if (smooth) tv = smooth_binary_target(tv, eps);
    V lv, dv;
    binary_term<kFocal, kGrad>(xv, tv, gamma, lv, dv, pow_k);
    if (alpha >= 0 || adj.alpha_vec) {
      const V at = alpha >= 0 ? alpha_t(tv, alpha) : alpha_t_of(tv, V(adj.alpha_vec[c]));
      lv = lv * at;
      if constexpr (kGrad) dv = dv * at;
    }
    lacc = lacc + lv;
    if constexpr (kGrad) {
      if (more) __builtin_prefetch(tl.g + c * pl.S + L, 1);
      store_lanes<IO>(tl.g + c * pl.S, m, V::blendv(V(0), dv * gs, live_mask));
    }
  }
  V::blendv(V(0), sv * lacc, live_mask).store(loss_out);
}

// Tiles per chunk: about kChunkElems logits, independent of the thread count.
template <typename scalar_t, typename TileFn>
std::pair<double, double> run_tiles(const RowArgs<scalar_t>& a, const Planes& pl, bool grad,
                                    const TileFn& tile_fn) {
  using IO = PlaneIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t S = pl.S, samples = S > 0 ? a.N / S : 0;
  const int64_t per_sample = (S + L - 1) / L;
  const int64_t tiles = samples * per_sample;
  const int64_t tiles_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(a.C * L, 1));
  const int64_t chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  return sum_chunks(chunks, [&](int64_t ch) {
    thread_local std::vector<acc_t> park;  // a tile's C x kLanes values (softmax)
    if (static_cast<int64_t>(park.size()) < a.C * L) park.resize(a.C * L);
    double l = 0, d = 0;
    const int64_t e = std::min(tiles, (ch + 1) * tiles_per_chunk);
    for (int64_t i = ch * tiles_per_chunk; i < e; ++i) {
      Tile<scalar_t> tl;
      tl.n = i / per_sample;
      tl.p0 = (i - tl.n * per_sample) * L;
      tl.m = std::min(L, S - tl.p0);
      tl.x = a.x + tl.n * a.x_stride + tl.p0;
      if (a.t) tl.t = a.t + tl.n * a.t_stride + tl.p0;
      if (grad) tl.g = a.grad + tl.n * a.C * S + tl.p0;
      alignas(64) acc_t loss[L];
      tile_fn(tl, park.data(), loss);
      const int64_t r0 = tl.n * S + tl.p0;
      for (int64_t k = 0; k < tl.m; ++k) {
        if (a.per_row_out) a.per_row_out[r0 + k] = static_cast<scalar_t>(loss[k]);
        l += loss[k];
        d += tl.denom[k];
      }
    }
    return std::pair<double, double>{l, d};
  });
}

}  // namespace

template <typename scalar_t>
std::pair<double, double> softmax_family_planes(const RowArgs<scalar_t>& a, const Planes& pl,
                                                const Smoothing& sm,
                                                const ClassOptions<at::opmath_type<scalar_t>>& adj,
                                                bool focal, bool grad, bool hard) {
  return with_flag(adj.adjusted(), [&](auto adj_c) {
    constexpr bool kA = decltype(adj_c)::value;
    if (!focal && sm.active(hard)) {
      return with_flags(sm.class_weighting, grad, hard, [&](auto class_c, auto grad_c, auto hard_c) {
        constexpr bool kC = decltype(class_c)::value, kG = decltype(grad_c)::value,
                       kH = decltype(hard_c)::value;
        return run_tiles(a, pl, kG, [&](Tile<scalar_t>& tl, auto* park, auto* loss) {
          tile_targets<scalar_t, kH>(a, pl, tl);
          softmax_smooth_tile<scalar_t, kG, kH, kC, kA>(a, pl, sm, adj, tl, park, loss);
        });
      });
    }
    if (focal && sm.active(hard)) {  // smoothed softmax focal: soft tiles of either target kind
      return with_flags(sm.class_weighting, grad, hard, [&](auto class_c, auto grad_c, auto hard_c) {
        constexpr bool kG = decltype(grad_c)::value, kH = decltype(hard_c)::value;
        constexpr int kS = decltype(class_c)::value ? 2 : 1;
        return run_tiles(a, pl, kG, [&](Tile<scalar_t>& tl, auto* park, auto* loss) {
          tile_targets<scalar_t, kH>(a, pl, tl);
          softmax_tile<scalar_t, true, kG, kH, kA, kS>(a, pl, sm, adj, tl, park, loss);
        });
      });
    }
    return with_flags(focal, grad, hard, [&](auto focal_c, auto grad_c, auto hard_c) {
      constexpr bool kF = decltype(focal_c)::value, kG = decltype(grad_c)::value,
                     kH = decltype(hard_c)::value;
      return run_tiles(a, pl, kG, [&](Tile<scalar_t>& tl, auto* park, auto* loss) {
        tile_targets<scalar_t, kH>(a, pl, tl);
        softmax_tile<scalar_t, kF, kG, kH, kA>(a, pl, sm, adj, tl, park, loss);
      });
    });
  });
}

template <typename scalar_t>
std::pair<double, double> binary_family_planes(const RowArgs<scalar_t>& a, const Planes& pl,
                                               const Smoothing& sm,
                                               const ClassOptions<at::opmath_type<scalar_t>>& adj, bool focal,
                                               bool grad, bool hard) {
  const auto eps = static_cast<at::opmath_type<scalar_t>>(sm.eps);
  return with_flags(focal, grad, hard, [&](auto focal_c, auto grad_c, auto hard_c) {
    constexpr bool kF = decltype(focal_c)::value, kG = decltype(grad_c)::value, kH = decltype(hard_c)::value;
    return run_tiles(a, pl, kG, [&](Tile<scalar_t>& tl, auto*, auto* loss) {
      tile_targets<scalar_t, kH>(a, pl, tl);
      binary_tile<scalar_t, kF, kG, kH>(a, pl, adj, eps, tl, loss);
    });
  });
}

CBFUSED_FOR_EACH_DTYPE(CBFUSED_FAMILY_PLANES, softmax_family_planes)
CBFUSED_FOR_EACH_DTYPE(CBFUSED_FAMILY_PLANES, binary_family_planes)

}  // namespace cpu
}  // namespace cbfused
