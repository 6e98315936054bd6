// Fused CPU kernels: one pass per row computes the class-balanced loss and,
// when asked, its gradient w.r.t. the logits (for reduction 'sum'; the
// backward scales it by grad_output and by the mean's 1/D).
//
// Parallel over fixed chunks of rows whose partial sums are combined in chunk
// order: the bits do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "cbfused/checks.h"
#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {
namespace {

// A double result in scalar_t: beyond the type's range it is +-inf (a loss too large for
// the dtype overflows, as in torch's losses), never an error or undefined behaviour.
template <typename scalar_t>
scalar_t cast_saturating(double v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr double kMax = static_cast<double>(std::numeric_limits<acc_t>::max());
  const acc_t a = v > kMax ? std::numeric_limits<acc_t>::infinity()
                           : (v < -kMax ? -std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(v));
  return static_cast<scalar_t>(a);  // float -> half / bfloat16 rounds to inf past their range
}

// Rows per chunk: about kChunkElems logits, independent of the thread count.
constexpr int64_t kChunkElems = 1 << 14;

template <typename scalar_t>
using Args = RowArgs<scalar_t>;

template <typename acc_t>
struct RowOut {
  acc_t loss = 0;   // s_i * l_i
  acc_t denom = 0;  // this row's share of the mean's D
};

[[noreturn]] void target_out_of_range(int64_t y, int64_t C, int64_t i, int64_t ignore_index) {
  TORCH_CHECK(false, "cbfused: target ", y, " is out of range for ", C, " classes (sample ", i,
              "); class indices must be in [0, ", C, ") or equal ignore_index (", ignore_index, ")");
}

template <typename acc_t>
[[noreturn]] void float_target_out_of_range(acc_t v, int64_t i) {
  TORCH_CHECK(v == v, "cbfused: float target nan in row ", i,
              " is outside [0, 1]; float targets are multi-hot labels or class probabilities");
  TORCH_CHECK(false, "cbfused: float target ", v, " in row ", i,
              " is outside [0, 1]; float targets are multi-hot labels or class probabilities");
}

// Reads the float target row: s = sum_c t_c w_c, T = sum_c t_c; checks 0 <= t <= 1.
template <typename scalar_t>
inline void target_row_sums(const Args<scalar_t>& a, const scalar_t* t, int64_t i,
                            at::opmath_type<scalar_t>& s, at::opmath_type<scalar_t>& T) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  V sv(0), Tv(0), lo(0), hi(0);
  row_blocks<IO, 1>(a.C, [&](int64_t j, int64_t n, auto) {
    V tv[IO::kVecs];
    IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) break;
      const V wv = V::loadu(a.w + j + v * IO::kLanes, nv);
      sv = at::vec::fmadd(tv[v], wv, sv);
      Tv = Tv + tv[v];
      lo = at::vec::minimum(lo, tv[v]);
      hi = at::vec::maximum(hi, tv[v]);
    }
  });
  // minimum / maximum propagate NaN, so a NaN target fails the check too (a comparison
  // with NaN is false). One vector test per row; lane by lane only to report a bad one.
  const V ok = (lo >= V(acc_t(0))) & (hi <= V(acc_t(1)));
  if (ok.zero_mask() != 0) {
    alignas(64) acc_t l[IO::kLanes], h[IO::kLanes];
    lo.store(l);
    hi.store(h);
    for (int64_t k = 0; k < IO::kLanes; ++k) {
      if (!(l[k] >= acc_t(0))) float_target_out_of_range(l[k], i);
      if (!(h[k] <= acc_t(1))) float_target_out_of_range(h[k], i);
    }
  }
  s = IO::hsum(sv);
  T = IO::hsum(Tv);
}

// The row's class weight s and its share of the mean's denominator; false for
// an ignored sample (whose gradient row is zeroed here).
template <typename scalar_t, bool kHard, bool kGrad>
inline bool row_target(const Args<scalar_t>& a, int64_t i, const scalar_t* t, scalar_t* g, int64_t& y,
                       at::opmath_type<scalar_t>& s, at::opmath_type<scalar_t>& T,
                       RowOut<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (kHard) {
    y = a.y[i];
    if (y == a.ignore_index) {
      if constexpr (kGrad) std::fill(g, g + a.C, scalar_t(0));
      return false;
    }
    if (y < 0 || y >= a.C) target_out_of_range(y, a.C, i, a.ignore_index);
    s = a.w[y];
    out.denom = a.weighted ? s : acc_t(1);
  } else {
    target_row_sums(a, t, i, s, T);
    out.denom = a.weighted ? s : T;
  }
  return true;
}

// The one-hot target vector of the kLanes elements from k0 (which hold the row's class y):
// a lane compare, no memory round trip.
template <typename IO>
inline typename IO::V one_hot_vector(int64_t y, int64_t k0) {
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  return V(acc_t(1)) & (V::arange(acc_t(0), acc_t(1)) == V(static_cast<acc_t>(y - k0)));
}

// pow_k of a sigmoid row as a template constant: kAnyPow reads a.gamma_int at run time.
constexpr int kAnyPow = -2;

// Sigmoid cross-entropy and the paper's sigmoid focal loss, one row:
//   l = s * sum_c alpha_t * m * bce(x_c, t_c),  grad_c = s * d/dx_c(...)
// kAlpha (alpha given) and kPow (the focal power for hard targets: -1 none, k >= 0 an
// integer gamma, kAnyPow read at run time) are template parameters, chosen once per call
// (run_sigmoid), not tested per vector: the power's loop with a run-time trip count alone
// cost 5 to 8% of the focal kernel at gamma = 2.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard, bool kAlpha, int kPow>
RowOut<at::opmath_type<scalar_t>> sigmoid_row(const Args<scalar_t>& a, int64_t i) {
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
  const int pow_k = !kHard ? -1 : kPow == kAnyPow ? a.gamma_int : kPow;
  const V sv(s * a.grad_prescale);
  // A vector of t = 0 (hard targets, away from the class) has the row constant alpha_t0:
  // its gradient takes one factor alpha_t0 * s, and its losses are summed in lacc0 and
  // scaled once at the end. A vector with the class scales by alpha_t * s lane by lane, so
  // a t = 0 lane there gets the same bits as in a t = 0 vector (and a bfloat16 row the
  // same as a float32 one).
  const V at0 = kAlpha ? alpha_t(V(0), alpha) : V(1);
  const V sv0 = kAlpha ? at0 * sv : sv;
  V lacc(0), lacc0(0);
  // One vector: adds its loss (lanes [0, nv)) and returns its gradient.
  auto vec = [&](auto zero_t, const V& xv, const V& tv, int64_t nv) -> V {
    constexpr bool kZeroT = decltype(zero_t)::value;
    V lv, dv;
    binary_term<kFocal, kGrad, kZeroT>(xv, tv, gamma, lv, dv, pow_k);
    if constexpr (kZeroT) {
      V& acc = kAlpha ? lacc0 : lacc;
      acc = acc + IO::keep(lv, nv, acc_t(0));
      return dv * sv0;
    } else {
      V gs = sv;
      if constexpr (kAlpha) {
        const V at = alpha_t(tv, alpha);
        lv = lv * at;
        gs = at * sv;
      }
      lacc = lacc + IO::keep(lv, nv, acc_t(0));
      return dv * gs;
    }
  };
  // One block of kStep elements; kZeroT: a hard-target block without the row's class
  // (every t is 0), where binary_term folds t away. kFull: a whole block (n = kStep
  // known at compile time: no per-vector lane counts).
  auto block = [&](auto zero_t, auto full_t, int64_t j) {
    constexpr bool kZeroT = decltype(zero_t)::value;
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
      if constexpr (kZeroT) {
        gv[v] = vec(std::true_type{}, xv[v], V(0), nv);
      } else if constexpr (kHard) {
        // the class block: only the vector that holds y takes the one-hot path
        if (y >= k0 && y < k0 + IO::kLanes) {
          gv[v] = vec(std::false_type{}, xv[v], one_hot_vector<IO>(y, k0), nv);
        } else {
          gv[v] = vec(std::true_type{}, xv[v], V(0), nv);
        }
      } else {
        gv[v] = vec(std::false_type{}, xv[v], tv[v], nv);
      }
    }
    if constexpr (kGrad) IO::store(g + j, n, gv);
  };
  auto run = [&](auto full_t, int64_t j) {
    if (kHard && (y < j || y >= j + IO::kStep)) {
      block(std::true_type{}, full_t, j);
    } else {
      block(std::false_type{}, full_t, j);
    }
  };
  int64_t j = 0;
  for (; j + IO::kStep <= C; j += IO::kStep) run(std::true_type{}, j);
  if (j < C) run(std::false_type{}, j);
  if constexpr (kAlpha) lacc = at::vec::fmadd(lacc0, at0, lacc);
  out.loss = s * IO::hsum(lacc);
  return out;
}

// The passes over one softmax row (max, sums, gradient), which softmax_rows runs per row
// around the per-group vector math.

// Pass 1: the row's max (padding lanes hold -inf). The hardware max may drop a NaN logit
// here; pass 2 takes it into the sum all the same.
template <typename scalar_t>
CBF_HD at::opmath_type<scalar_t> softmax_row_max(const scalar_t* x, int64_t C) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int kU = 4 / IO::kVecs;  // independent accumulators
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  V mv[kU];
  for (auto& m : mv) m = V(kNegInf);
  row_blocks<IO, kU>(C, [&](int64_t j, int64_t n, auto u) {
    V xv[IO::kVecs];
    IO::load(x + j, n, xv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) break;
      mv[u] = hw_max(mv[u], IO::keep(xv[v], nv, kNegInf));
    }
  });
  for (int u = 1; u < kU; ++u) mv[0] = hw_max(mv[0], mv[u]);
  return IO::hmax(mv[0]);
}

// Pass 2: sum_exp = sum of exp(x - max) and, with kTX (float-target cross-entropy),
// sum_tx = sum t (x - max) (<= 0: the loss T log(sum_exp) - sum_tx adds two terms of one
// sign, and neither depends on the logits' offset). With kPark the exps are parked in
// `park` (in the accumulation type) so the gradient pass needs none. `next`: a row to
// prefetch, one 64-byte line per block.
template <typename scalar_t, bool kTX, bool kPark>
CBF_HD void softmax_row_sums(const scalar_t* x, const scalar_t* t, int64_t C, at::opmath_type<scalar_t> mx,
                             at::opmath_type<scalar_t>* park, at::opmath_type<scalar_t>& sum_exp,
                             at::opmath_type<scalar_t>& sum_tx, const scalar_t* next = nullptr) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  constexpr int kU = 4 / IO::kVecs;
  const V mxv(mx);
  V ev[kU], txv[kU];
  for (int u = 0; u < kU; ++u) ev[u] = txv[u] = V(0);
  row_blocks<IO, kU>(C, [&](int64_t j, int64_t n, auto u) {
    V xv[IO::kVecs], tv[IO::kVecs], e[IO::kVecs];
    if (next) __builtin_prefetch(next + j);
    IO::load(x + j, n, xv);
    if constexpr (kTX) IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) break;
      const V d = xv[v] - mxv;
      e[v] = MathOps<V>::exp_nonpos(d);
      ev[u] = ev[u] + IO::keep(e[v], nv, 0);
      if constexpr (kTX) txv[u] = at::vec::fmadd(tv[v], d, txv[u]);
    }
    if constexpr (kPark) {
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        if (nv > 0) e[v].store(park + j + v * IO::kLanes, nv);
      }
    }
  });
  for (int u = 1; u < kU; ++u) {
    ev[0] = ev[0] + ev[u];
    txv[0] = txv[0] + txv[u];
  }
  sum_exp = IO::hsum(ev[0]);
  sum_tx = IO::hsum(txv[0]);
}

// The gradient pass, from the parked e_k = exp(x_k - max): grad_k = cpe e_k (= cp p_k),
// less, for float targets, st t_k (cross-entropy) or st t_k G_k (focal, G of log p_k =
// (x_k - max) - log sum). For float32 / float64 `park` is the gradient row itself.
template <typename scalar_t, bool kFocal, bool kHard>
CBF_HD void softmax_row_grad(const scalar_t* x, const scalar_t* t, const at::opmath_type<scalar_t>* park,
                             scalar_t* g, int64_t C, at::opmath_type<scalar_t> cpe,
                             at::opmath_type<scalar_t> st, at::opmath_type<scalar_t> mx,
                             at::opmath_type<scalar_t> log_sum, double gamma) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  const V cpev(cpe), stv(st), mxv(mx), lsv(log_sum);
  row_blocks<IO, 1>(C, [&](int64_t j, int64_t n, auto) {
    V xv[IO::kVecs], tv[IO::kVecs], gv[IO::kVecs];
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      gv[v] = nv > 0 ? V::loadu(park + j + v * IO::kLanes, nv) : V(0);
    }
    if constexpr (!kHard && kFocal) IO::load(x + j, n, xv);
    if constexpr (!kHard) IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      if (IO::lanes(n, v) == 0) break;  // padding: gv[v] is 0 already
      V gk = cpev * gv[v];
      if constexpr (!kHard) {
        if constexpr (kFocal) {
          gk = gk - stv * tv[v] * softmax_focal<true>(log_softmax_of(xv[v], mxv, lsv), gamma).G;
        } else {
          gk = gk - stv * tv[v];
        }
      }
      gv[v] = gk;
    }
    IO::store(g + j, n, gv);
  });
}

// Where the exps of a group's rows are parked: in each row's gradient row in full
// precision (nullptr here), in `rows` per-thread float rows for float16 / bfloat16.
// Looked up once per group: a thread_local in a shared library costs a __tls_get_addr
// call, which per row was 2% of bfloat16 softmax at C = 80.
template <typename scalar_t>
inline at::opmath_type<scalar_t>* park_scratch(int64_t C, int64_t rows) {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  if constexpr (IO::kReduced) {
    thread_local std::vector<acc_t> scratch;
    const int64_t need = rows * (C + IO::kStep);
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    return scratch.data();
  } else {
    return nullptr;
  }
}

// Row r's parking place: its gradient row g, or row r of the group's scratch.
template <typename scalar_t>
inline at::opmath_type<scalar_t>* park_row(at::opmath_type<scalar_t>* scratch, scalar_t* g, int64_t C,
                                           int64_t r) {
  using IO = RowIO<scalar_t>;
  if constexpr (IO::kReduced) {
    return scratch + r * (C + IO::kStep);
  } else {
    return reinterpret_cast<at::opmath_type<scalar_t>*>(g);
  }
}

// Softmax cross-entropy and softmax focal loss, rows [i0, i1) (at most one vector's lanes
// of them):
//   hard:  l = s * (1 - p_y)^gamma * (-log p_y),  grad_k = s * G * (p_k - [k == y])
//   float: l = s * sum_c t_c (1 - p_c)^gamma (-log p_c),
//          grad_k = s * (p_k * sum_c t_c G_c - t_k G_k)
// Per row the max and sum passes (exps parked); then the per-row math (log of the sum and,
// for hard targets, the focal factors and 1 - p_y) for all rows at once, one row per lane:
// as scalars per row (libm's logf, expf, expm1f and the register spills around their
// calls) they were two thirds of softmax focal's time at C = 80. Then per row the float-
// target focal sums (pass 3) and the gradient pass.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard>
void softmax_rows(const Args<scalar_t>& a, int64_t i0, int64_t i1, RowOut<at::opmath_type<scalar_t>>* out) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, R = i1 - i0;
  // Unused and ignored lanes: s = 0, sum = 1, the rest 0 (finite math, zero loss).
  // xy, ey: hard targets' x_y and parked exp(x_y - max); T, tx: float targets' sum t and
  // (cross-entropy) sum t (x - max).
  alignas(64) acc_t s[L] = {}, mx[L] = {}, xy[L] = {}, ey[L] = {}, T[L] = {}, tx[L] = {}, sum[L];
  int64_t y[L];
  bool live[L] = {};
  for (int64_t k = 0; k < L; ++k) sum[k] = acc_t(1);
  acc_t* const scratch = kGrad ? park_scratch<scalar_t>(C, R) : nullptr;
  for (int64_t k = 0; k < R; ++k) {
    const int64_t i = i0 + k;
    const scalar_t* x = a.x + i * a.x_stride;
    const scalar_t* t = kHard ? nullptr : a.t + i * a.t_stride;
    scalar_t* g = kGrad ? a.grad + i * C : nullptr;
    out[k] = {};
    if (!row_target<scalar_t, kHard, kGrad>(a, i, t, g, y[k], s[k], T[k], out[k])) continue;
    live[k] = true;
    mx[k] = softmax_row_max(x, C);
    acc_t* park = kGrad ? park_row(scratch, g, C, k) : nullptr;
    // Pass 2 prefetches the next row, which pass 1 of that row would otherwise wait for
    // (the passes over a cached row interrupt the hardware prefetcher's stream): at
    // 16384 x 1000 float32, 7.1 -> 5.6 ms a call on one thread.
    const scalar_t* next = i + 1 < a.N ? x + a.x_stride : nullptr;
    softmax_row_sums<scalar_t, !kHard && !kFocal, kGrad>(x, t, C, mx[k], park, sum[k], tx[k], next);
    if constexpr (kHard) {
      xy[k] = static_cast<acc_t>(x[y[k]]);
      if constexpr (kGrad && !kFocal) ey[k] = park[y[k]];
    }
  }
  const V sumv = V::loadu(sum), sv = V::loadu(s);
  const V ls = MathOps<V>::log(sumv);
  alignas(64) acc_t loss[L], cp[L], ls_k[L];
  if constexpr (!kHard) ls.store(ls_k);
  V q;  // hard targets: 1 - p_y
  if constexpr (kHard) {
    const V logp = log_softmax_of(V::loadu(xy), V::loadu(mx), ls);
    const auto f = softmax_focal<kFocal>(logp, a.gamma);
    (sv * f.loss).store(loss);
    (sv * f.G).store(cp);
    if constexpr (!kFocal) {
      // (sum - e_y) / sum from the parked e_y = exp(x_y - max): without cancellation, as
      // y holding the max makes e_y = 1 and sum in [1, 2] (an exact difference), and
      // otherwise p_y <= 1/2.
      q = (sumv - V::loadu(ey)) / sumv;
    } else {
      q = -MathOps<V>::expm1_nonpos(logp);
    }
  } else if constexpr (!kFocal) {
    // sum_c t_c (-log p_c) = T log sum - sum t (x - max).
    const V Tv = V::loadu(T);
    (sv * (Tv * ls - V::loadu(tx))).store(loss);
    (sv * Tv).store(cp);
  } else {
    // Pass 3 (float-target focal), per row: sum_c t_c * focal loss, sum_c t_c G_c.
    for (int64_t k = 0; k < R; ++k) {
      if (!live[k]) continue;
      const scalar_t* x = a.x + (i0 + k) * a.x_stride;
      const scalar_t* t = a.t + (i0 + k) * a.t_stride;
      const V mxv(mx[k]), lsv(ls_k[k]);
      V lv(0), gsum(0);
      row_blocks<IO, 1>(C, [&](int64_t j, int64_t n, auto) {
        V xv[IO::kVecs], tv[IO::kVecs];
        IO::load(x + j, n, xv);
        IO::load(t + j, n, tv);
        CBF_UNROLL_VECS
        for (int v = 0; v < IO::kVecs; ++v) {
          const int64_t nv = IO::lanes(n, v);
          if (nv == 0) break;
          const auto f = softmax_focal<true>(log_softmax_of(xv[v], mxv, lsv), a.gamma);
          lv = lv + IO::keep(tv[v] * f.loss, nv, acc_t(0));
          gsum = gsum + IO::keep(tv[v] * f.G, nv, acc_t(0));
        }
      });
      loss[k] = s[k] * IO::hsum(lv);
      cp[k] = s[k] * IO::hsum(gsum);
    }
  }
  for (int64_t k = 0; k < R; ++k)
    if (live[k]) out[k].loss = loss[k];  // an ignored row keeps +0
  if constexpr (kGrad) {
    // cp: the coefficient of p_k, times the mean's 1/D when known up front.
    const V cpv = V::loadu(cp) * V(a.grad_prescale);
    alignas(64) acc_t cpe[L], cy[L];
    (cpv / sumv).store(cpe);                    // cp p_k = cpe e_k
    if constexpr (kHard) (-cpv * q).store(cy);  // grad_y = cp * (p_y - 1) = -cp * (1 - p_y)
    for (int64_t k = 0; k < R; ++k) {
      if (!live[k]) continue;
      const int64_t i = i0 + k;
      scalar_t* g = a.grad + i * C;
      const scalar_t* x = a.x + i * a.x_stride;
      const scalar_t* t = kHard ? nullptr : a.t + i * a.t_stride;
      softmax_row_grad<scalar_t, kFocal, kHard>(x, t, park_row(scratch, g, C, k), g, C, cpe[k],
                                                s[k] * a.grad_prescale, mx[k], kHard ? acc_t(0) : ls_k[k],
                                                a.gamma);
      if constexpr (kHard) g[y[k]] = static_cast<scalar_t>(cy[k]);
    }
  }
}

// Runs `rows(i0, i1, out)` over all N rows in fixed chunks, `group` rows (at most
// kMaxGroup) a call, each filling out[0 .. i1 - i0). Writes the per-row loss when
// `per_row` is given; returns the totals of loss and denominator.
template <typename scalar_t, int64_t kMaxGroup, typename RowsFn>
std::pair<double, double> run_row_groups(int64_t N, int64_t C, int64_t group, scalar_t* per_row,
                                         const RowsFn& rows) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
  const int64_t chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<double> loss_part(chunks, 0.0), denom_part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * rows_per_chunk, i1 = std::min(N, i0 + rows_per_chunk);
      // Sums across rows in double: a mean can be in range while the float sum is not.
      double l = 0, d = 0;
      for (int64_t i = i0; i < i1; i += group) {
        const int64_t e = std::min(i1, i + group);
        RowOut<at::opmath_type<scalar_t>> out[kMaxGroup];
        rows(i, e, out);
        for (int64_t k = 0; k < e - i; ++k) {
          if (per_row) per_row[i + k] = static_cast<scalar_t>(out[k].loss);
          l += out[k].loss;
          d += out[k].denom;
        }
      }
      loss_part[c] = l;
      denom_part[c] = d;
    }
  });
  double l = 0, d = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    l += loss_part[c];
    d += denom_part[c];
  }
  return {l, d};
}

// run_row_groups for a function of one row.
template <typename scalar_t, typename RowFn>
std::pair<double, double> run_rows(int64_t N, int64_t C, scalar_t* per_row, const RowFn& row) {
  return run_row_groups<scalar_t, 1>(N, C, 1, per_row,
                                     [&](int64_t i, int64_t, auto* out) { out[0] = row(i); });
}

// Softmax rows per group: about kGroupElems logits, so that a group's rows and parked exps
// are still in cache for the gradient pass; one vector's lanes at most.
constexpr int64_t kGroupElems = 1 << 12;

template <typename scalar_t, bool kFocal, bool kGrad, bool kHard>
std::pair<double, double> run_softmax(const Args<scalar_t>& a, int64_t N, scalar_t* per_row) {
  constexpr int64_t L = RowIO<scalar_t>::kLanes;
  const int64_t group = std::clamp<int64_t>(kGroupElems / std::max<int64_t>(a.C, 1), 1, L);
  return run_row_groups<scalar_t, L>(N, a.C, group, per_row, [&](int64_t i0, int64_t i1, auto* out) {
    softmax_rows<scalar_t, kFocal, kGrad, kHard>(a, i0, i1, out);
  });
}

// The sigmoid / focal rows of one call, with alpha on or off and, for the focal loss with
// hard targets, the power of a common integer gamma (1, 2) or of none as a constant.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard>
std::pair<double, double> run_sigmoid(const Args<scalar_t>& a, int64_t N, scalar_t* per_row) {
  auto with_alpha = [&](auto alpha_c, auto pow_c) {
    return run_rows<scalar_t>(N, a.C, per_row, [&](int64_t i) {
      return sigmoid_row<scalar_t, kFocal, kGrad, kHard, decltype(alpha_c)::value, decltype(pow_c)::value>(a,
                                                                                                           i);
    });
  };
  auto with_pow = [&](auto pow_c) {
    return a.alpha >= 0 ? with_alpha(std::true_type{}, pow_c) : with_alpha(std::false_type{}, pow_c);
  };
  if constexpr (!kFocal || !kHard) {
    return with_pow(std::integral_constant<int, -1>{});
  } else {
    switch (a.gamma_int) {
      case -1:
        return with_pow(std::integral_constant<int, -1>{});
      case 1:
        return with_pow(std::integral_constant<int, 1>{});
      case 2:
        return with_pow(std::integral_constant<int, 2>{});
      default:
        return with_pow(std::integral_constant<int, kAnyPow>{});
    }
  }
}

// 1/D of the means for hard targets (D: non-ignored samples, or the sum of their class
// weights), 0 when D = 0; checks the targets' range on the way.
template <typename scalar_t>
double hard_target_inv_denominator(const Args<scalar_t>& a) {
  double d = 0;
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t y = a.y[i];
    if (y == a.ignore_index) continue;
    if (y < 0 || y >= a.C) target_out_of_range(y, a.C, i, a.ignore_index);
    d += a.weighted ? static_cast<double>(a.w[y]) : 1.0;
  }
  return d > 0 ? 1.0 / d : 0.0;
}

template <typename scalar_t, bool kGrad, bool kHard>
std::pair<double, double> dispatch_loss(const Args<scalar_t>& a, int64_t loss_type, int64_t N,
                                        scalar_t* per_row) {
  switch (loss_type) {
    case kSoftmax:
      return run_softmax<scalar_t, false, kGrad, kHard>(a, N, per_row);
    case kSoftmaxFocal:
      return run_softmax<scalar_t, true, kGrad, kHard>(a, N, per_row);
    case kSigmoid:
      return run_sigmoid<scalar_t, false, kGrad, kHard>(a, N, per_row);
    default:
      return run_sigmoid<scalar_t, true, kGrad, kHard>(a, N, per_row);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cb_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                           const at::Tensor& class_weight, int64_t loss_type,
                                                           double gamma, double alpha, int64_t reduction,
                                                           int64_t ignore_index, int64_t grad_mode) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const CbLossPlan plan = check_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction);
  CbLossOutputs out = alloc_cb_loss(plan, reduction, compute_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.logits.scalar_type(), "cbfused_cb_loss_cpu", [&] {
        auto a = make_row_args<scalar_t>(plan, out, gamma, alpha, reduction, ignore_index, compute_grad);
        const bool mean = reduction == kMean || reduction == kWeightedMean;
        // Hard targets: the mean's D is an O(N) pass over the targets, so the gradient can
        // carry 1/D already and the usual backward (grad_output = 1) has nothing left to do.
        const bool fold = plan.hard && mean && compute_grad;
        if (fold) a.grad_prescale = static_cast<at::opmath_type<scalar_t>>(hard_target_inv_denominator(a));
        scalar_t* per_row = a.per_row_out;
        std::pair<double, double> tot;
        if (compute_grad) {
          tot = plan.hard ? dispatch_loss<scalar_t, true, true>(a, loss_type, plan.N, per_row)
                          : dispatch_loss<scalar_t, true, false>(a, loss_type, plan.N, per_row);
        } else {
          tot = plan.hard ? dispatch_loss<scalar_t, false, true>(a, loss_type, plan.N, per_row)
                          : dispatch_loss<scalar_t, false, false>(a, loss_type, plan.N, per_row);
        }
        // D = 0 (empty batch, every sample ignored): loss 0 and gradient 0, never NaN.
        const double inv = mean ? (tot.second > 0 ? 1.0 / tot.second : 0.0) : 1.0;
        if (reduction != kNone)
          *out.loss.mutable_data_ptr<scalar_t>() = cast_saturating<scalar_t>(tot.first * inv);
        // what the backward still applies to the gradient
        *out.inv_norm.mutable_data_ptr<at::opmath_type<scalar_t>>() =
            static_cast<at::opmath_type<scalar_t>>(fold ? 1.0 : inv);
      });
  return {out.loss, out.grad, out.inv_norm};
}

// torchvision.ops.sigmoid_focal_loss semantics, elementwise, with an optional
// weight per class (the last dimension).
template <typename scalar_t, bool kGrad>
double focal_elementwise(const FocalPlan& p, double gamma, double alpha, double grad_scale,
                         scalar_t* loss_out, scalar_t* grad) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const scalar_t* x = p.inputs.const_data_ptr<scalar_t>();
  const scalar_t* t = p.targets.const_data_ptr<scalar_t>();
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  const int64_t K = p.K;
  const acc_t g = static_cast<acc_t>(gamma), al = static_cast<acc_t>(alpha);
  const bool has_alpha = al >= acc_t(0);
  const V gs(static_cast<acc_t>(grad_scale));
  // Rows of K elements; the per-row "loss" is the row's sum.
  auto res = run_rows<scalar_t>(p.rows, K, nullptr, [&](int64_t i) {
    RowOut<acc_t> out;
    V lacc(0);
    const int64_t base = i * K;
    for (int64_t j = 0; j < K; j += IO::kStep) {
      const int64_t n = std::min(IO::kStep, K - j);
      V xv[IO::kVecs], tv[IO::kVecs], lv[IO::kVecs], gv[IO::kVecs];
      IO::load(x + base + j, n, xv);
      IO::load(t + base + j, n, tv);
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        lv[v] = gv[v] = V(0);
        if (nv == 0) break;
        V l, d;
        torchvision_focal_term<kGrad>(xv[v], tv[v], g, l, d);
        if (has_alpha) {
          const V at = alpha_t(tv[v], al);
          l = l * at;
          if constexpr (kGrad) d = d * at;
        }
        if (w && nv > 0) {
          const V wv = V::loadu(w + j + v * IO::kLanes, nv);
          l = l * wv;
          if constexpr (kGrad) d = d * wv;
        }
        lv[v] = l;
        if constexpr (kGrad) gv[v] = d * gs;
        lacc = lacc + IO::keep(l, nv, acc_t(0));
      }
      if (loss_out) IO::store(loss_out + base + j, n, lv);
      if constexpr (kGrad) IO::store(grad + base + j, n, gv);
    }
    out.loss = IO::hsum(lacc);
    return out;
  });
  return res.first;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_cpu(const at::Tensor& inputs, const at::Tensor& targets,
                                                     const std::optional<at::Tensor>& weight, double alpha,
                                                     double gamma, int64_t reduction, int64_t grad_mode) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const FocalPlan plan = check_sigmoid_focal(inputs, targets, weight, gamma, reduction);
  const auto opts = inputs.options();
  at::Tensor loss = reduction == kNone ? at::empty(inputs.sizes(), opts) : at::empty({}, opts);
  at::Tensor grad = compute_grad ? at::empty(inputs.sizes(), opts) : at::empty({0}, opts);
  const int64_t numel = inputs.numel();
  // 'mean' is over all elements (torchvision); an empty input gives 0, not NaN.
  const double scale = reduction == kMean ? (numel > 0 ? 1.0 / static_cast<double>(numel) : 0.0) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "cbfused_sigmoid_focal_cpu", [&] {
        scalar_t* lptr = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
        // For 'none' the gradient is per element (scaled by grad_output later).
        const double gscale = reduction == kNone ? 1.0 : scale;
        double total = compute_grad
                           ? focal_elementwise<scalar_t, true>(plan, gamma, alpha, gscale, lptr,
                                                               grad.mutable_data_ptr<scalar_t>())
                           : focal_elementwise<scalar_t, false>(plan, gamma, alpha, gscale, lptr, nullptr);
        if (reduction != kNone) *loss.mutable_data_ptr<scalar_t>() = cast_saturating<scalar_t>(total * scale);
      });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbfused, CPU, m) {
  m.impl("cb_loss", &cb_loss_cpu);
  m.impl("sigmoid_focal", &sigmoid_focal_cpu);
}

}  // namespace cpu
}  // namespace cbfused
