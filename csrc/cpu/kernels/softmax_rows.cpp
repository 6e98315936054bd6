// The softmax-family rows of cbfused::cb_loss on the CPU (softmax cross-entropy and softmax
// focal loss), compiled once per CPU ISA (csrc/cpu/kernels.h). A row's passes compute the
// class-balanced loss and, when asked, its gradient w.r.t. the logits (for reduction 'sum';
// the host entry folds in the mean's 1/D or leaves it to the backward).
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cpu/rows.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {
namespace {

// The passes over one softmax row (max, sums, gradient), which softmax_rows runs per row
// around the per-group vector math.

// The weights e_c a soft softmax row gives its classes' terms (pass 3 and the gradient):
//   float targets:  e_c = t_c alpha_c (alpha_c = 1 without a per-class alpha; the row's s
//                   multiplies after);
//   kSmooth (softmax focal; 1: 'sample', 2: 'class'): e_c = alpha_c a_c (P t_c + Q) (math.h,
//                   smooth_target; s is inside P and Q for 'sample'), t_c the float target or,
//                   for class indices, one-hot at y.
template <typename scalar_t, bool kHard, int kSmooth>
struct SoftTargets {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const scalar_t* t = nullptr;
  int64_t y = -1;
  const acc_t* w = nullptr;
  const acc_t* alpha_vec = nullptr;
  SmoothCoef<acc_t> K{0, 0};

  // e of the block [j, j + n) (n <= kStep; lanes past n are not defined)
  CBF_HD void load(int64_t j, int64_t n, V* ev) const {
    V tv[IO::kVecs];
    if constexpr (!kHard) IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) {
        ev[v] = V(0);
        continue;
      }
      const int64_t k0 = j + v * IO::kLanes;
      V e;
      if constexpr (kHard) {
        static_assert(kSmooth != 0, "class-index rows are soft only when smoothed");
        e = one_hot_vector<IO>(y, k0);
      } else {
        e = tv[v];
      }
      if constexpr (kSmooth != 0) {
        const V av = kSmooth == 2 ? V::loadu(w + k0, nv) : V(acc_t(1));
        e = smooth_target(SmoothCoef<V>{V(K.P), V(K.Q)}, av, e);
      }
      ev[v] = alpha_vec ? e * V::loadu(alpha_vec + k0, nv) : e;
    }
  }

  // Class-index rows: e off the target, a_c Q (alpha_c) (smooth_target at t_c = 0, to the
  // bit), with no one-hot lane compare; target_share() is what class y adds to it.
  CBF_HD void load_off_target(int64_t j, int64_t n, V* ev) const {
    static_assert(kHard && kSmooth != 0, "class-index rows with smoothing");
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v), k0 = j + v * IO::kLanes;
      const V e = kSmooth == 2 ? V::loadu(w + k0, nv) * V(K.Q) : V(K.Q);
      ev[v] = alpha_vec ? e * V::loadu(alpha_vec + k0, nv) : e;
    }
  }
  // e_y less its off-target part: a_y P (alpha_y)
  CBF_HD acc_t target_share() const {
    const acc_t share = (kSmooth == 2 ? w[y] : acc_t(1)) * K.P;
    return alpha_vec ? share * alpha_vec[y] : share;
  }
};

// How the passes read a row's logits: as stored (kAdj = kStoredLogits), or adjusted
// (math.h, adjusted_logit): z_c = s x_c + b_c, less s Delta_y at the target y (y < 0: no
// margin). Every pass reads the same z, so the row's max, sums and gradient agree. Without
// a logit adjustment (margins or a logit scale only: b = 0) kScaledLogits reads no b:
// s x_c + 0 is s x_c to the bit, one load and one add fewer per logit and pass.
constexpr int kStoredLogits = 0, kScaledLogits = 1, kOffsetLogits = 2;

template <typename scalar_t, int kAdj>
struct RowLogits {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const scalar_t* x = nullptr;
  const acc_t* b = nullptr;
  acc_t s = 1, margin_y = 0;
  int64_t y = -1;
  int64_t jy = -1;  // the start of the block (a multiple of kStep) that holds y

  // Scalars only: the passes copy the row's reader, and a vector member (the target
  // block's margin) cost a 64-byte store and reload per row and pass, a visible share of
  // an 80-class row.
  RowLogits() = default;
  RowLogits(const scalar_t* x_, const ClassOptions<acc_t>& adj, int64_t y_) : x(x_) {
    if constexpr (kAdj) {
      b = adj.offset;
      s = adj.scale;
      y = y_;
      margin_y = adj.target_margin(y_);
      if (y_ >= 0 && adj.margin) jy = y_ - y_ % IO::kStep;
    }
  }

  // The block [j, j + n) (n <= kStep) as IO::load gives it (zeros past n).
  CBF_HD void load(int64_t j, int64_t n, V* xv) const {
    IO::load(x + j, n, xv);
    if constexpr (kAdj) {
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        if (nv == 0) break;
        xv[v] = kAdj == kOffsetLogits ? adjusted_logit(xv[v], V(s), V::loadu(b + j + v * IO::kLanes, nv))
                                      : scaled_logit(xv[v], V(s));
      }
      if (j == jy) {  // the target's block, once per row and pass: its margin by a lane compare
        CBF_UNROLL_VECS
        for (int v = 0; v < IO::kVecs; ++v)
          xv[v] = xv[v] - one_hot_vector<IO>(y, j + v * IO::kLanes) * V(margin_y);
      }
    }
  }

  // z_c of one class, less the target's margin (at) or not (at_unmargined)
  acc_t at_unmargined(int64_t c) const {
    const acc_t xc = static_cast<acc_t>(x[c]);
    if constexpr (kAdj != kStoredLogits)
      return kAdj == kOffsetLogits ? adjusted_logit(xc, s, b[c]) : scaled_logit(xc, s);
    return xc;
  }
  acc_t at(int64_t c) const {
    if constexpr (kAdj != kStoredLogits) return at_unmargined(c) - (c == y ? margin_y : acc_t(0));
    return at_unmargined(c);
  }
};

// Pass 1: the row's max (padding lanes hold -inf). The hardware max may drop a NaN logit
// here; pass 2 takes it into the sum all the same.
template <typename scalar_t, int kAdj>
CBF_HD at::opmath_type<scalar_t> softmax_row_max(const RowLogits<scalar_t, kAdj>& X_, int64_t C) {
  const RowLogits<scalar_t, kAdj> X = X_;  // a local copy: no store can alias its members
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int kU = 4 / IO::kVecs;  // independent accumulators
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  V mv[kU];
  for (auto& m : mv) m = V(kNegInf);
  row_blocks<IO, kU>(C, [&](int64_t j, int64_t n, auto u) CBF_BLOCK {
    V xv[IO::kVecs];
    X.load(j, n, xv);
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
template <typename scalar_t, bool kTX, bool kPark, int kAdj>
CBF_HD void softmax_row_sums(const RowLogits<scalar_t, kAdj>& X_, const scalar_t* t, int64_t C,
                             at::opmath_type<scalar_t> mx, at::opmath_type<scalar_t>* park,
                             at::opmath_type<scalar_t>& sum_exp, at::opmath_type<scalar_t>& sum_tx,
                             const scalar_t* next = nullptr) {
  const RowLogits<scalar_t, kAdj> X = X_;  // a local copy: the parking stores cannot alias it
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  constexpr int kU = 4 / IO::kVecs;
  const V mxv(mx);
  V ev[kU], txv[kU];
  for (int u = 0; u < kU; ++u) ev[u] = txv[u] = V(0);
  row_blocks<IO, kU>(C, [&](int64_t j, int64_t n, auto u) CBF_BLOCK {
    V xv[IO::kVecs], tv[IO::kVecs], e[IO::kVecs];
    if (next) __builtin_prefetch(next + j);
    X.load(j, n, xv);
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
// less, for soft rows (kSoft), st e_k (cross-entropy, e from SoftTargets) or st (e_k G_k)
// (focal: pass 3 parked the product e_k G_k in `eG`, so this pass needs no targets). For
// float32 / float64 `park` is the gradient row itself (but for soft focal rows:
// park_scratch).
template <typename scalar_t, bool kFocal, bool kSoft, typename Targets>
CBF_HD void softmax_row_grad(const Targets& E, const at::opmath_type<scalar_t>* park,
                             const at::opmath_type<scalar_t>* eG, scalar_t* g, int64_t C,
                             at::opmath_type<scalar_t> cpe, at::opmath_type<scalar_t> st) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  const V cpev(cpe), stv(st);
  row_blocks<IO, 1>(C, [&](int64_t j, int64_t n, auto) CBF_BLOCK {
    V ev[IO::kVecs], gv[IO::kVecs];
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      gv[v] = nv > 0 ? V::loadu(park + j + v * IO::kLanes, nv) : V(0);
      if constexpr (kSoft && kFocal) ev[v] = nv > 0 ? V::loadu(eG + j + v * IO::kLanes, nv) : V(0);
    }
    if constexpr (kSoft && !kFocal) E.load(j, n, ev);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      if (IO::lanes(n, v) == 0) break;  // padding: gv[v] is 0 already
      V gk = cpev * gv[v];
      if constexpr (kSoft) gk = gk - stv * ev[v];  // ev: e_k, or (focal) e_k G_k
      gv[v] = gk;
    }
    IO::store(g + j, n, gv);
  });
}

// Where the exps of a group's rows are parked: in each row's gradient row in full
// precision (nullptr here), in `rows` per-thread float rows for float16 / bfloat16 and
// (kScratch) for rows that read their logits again after pass 2 (soft softmax focal:
// pass 3 and the gradient), so that the gradient may be written over the logits
// (kernels.h). Looked up once per group: a thread_local in a shared library costs a
// __tls_get_addr call, which per row was 2% of bfloat16 softmax at C = 80.
template <typename scalar_t, bool kScratch>
inline at::opmath_type<scalar_t>* park_scratch(int64_t C, int64_t rows) {
  using IO = RowIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  if constexpr (kScratch) {
    thread_local std::vector<acc_t> scratch;
    const int64_t need = rows * (C + IO::kStep);
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    return scratch.data();
  } else {
    return nullptr;
  }
}

// Row r's parking place: its gradient row g, or row r of the group's scratch.
template <typename scalar_t, bool kScratch>
inline at::opmath_type<scalar_t>* park_row(at::opmath_type<scalar_t>* scratch, scalar_t* g, int64_t C,
                                           int64_t r) {
  using IO = RowIO<scalar_t>;
  if constexpr (kScratch) {
    return scratch + r * (C + IO::kStep);
  } else {
    return reinterpret_cast<at::opmath_type<scalar_t>*>(g);
  }
}

// The start of softmax row i (lane k of its group): its pointers, target (y, s, T and the
// row's share of the denominator, in out) and max; false for an ignored row.
template <typename scalar_t, int kAdj>
struct SoftmaxRowStart {
  RowLogits<scalar_t, kAdj> X;
  const scalar_t* t = nullptr;
  scalar_t* g = nullptr;
  at::opmath_type<scalar_t>* park = nullptr;  // where pass 2 parks the exps (kGrad)
  const scalar_t* next = nullptr;             // the next row, for pass 2 to prefetch
};

template <typename scalar_t, bool kHard, bool kGrad, int kAdj, bool kScratch>
CBF_HD bool softmax_row_start(const Args<scalar_t>& a, const ClassOptions<at::opmath_type<scalar_t>>& adj,
                              int64_t i, int64_t k, at::opmath_type<scalar_t>* scratch,
                              SoftmaxRowStart<scalar_t, kAdj>& r, int64_t& y, at::opmath_type<scalar_t>& s,
                              at::opmath_type<scalar_t>& T, at::opmath_type<scalar_t>& mx,
                              RowOut<at::opmath_type<scalar_t>>& out, bool margin_after) {
  const scalar_t* x = a.x + i * a.x_stride;
  r.t = kHard ? nullptr : a.t + i * a.t_stride;
  r.g = kGrad ? a.grad + i * a.C : nullptr;
  out = {};
  if (!row_target<scalar_t, kHard, kGrad>(a, i, r.t, r.g, y, s, T, out)) return false;
  r.X = RowLogits<scalar_t, kAdj>(x, adj, kHard ? y : -1);
  if (margin_after) r.X.jy = -1;  // the passes read the target's logit without its margin
  mx = softmax_row_max(r.X, a.C);
  r.park = kGrad ? park_row<scalar_t, kScratch>(scratch, r.g, a.C, k) : nullptr;
  // Pass 2 prefetches the next row, which pass 1 of that row would otherwise wait for
  // (the passes over a cached row interrupt the hardware prefetcher's stream): at
  // 16384 x 1000 float32, 7.1 -> 5.6 ms a call on one thread.
  r.next = i + 1 < a.N ? x + a.x_stride : nullptr;
  return true;
}

// Softmax cross-entropy and softmax focal loss, rows [i0, i1) (at most one vector's lanes
// of them):
//   hard:  l = s * (1 - p_y)^gamma * (-log p_y),  grad_k = s * G * (p_k - [k == y])
//   soft:  l = s * sum_c e_c (1 - p_c)^gamma (-log p_c),
//          grad_k = s * (p_k * sum_c e_c G_c - e_k G_k)
// with e of SoftTargets: float targets, or (kSmooth, softmax focal) the smoothed targets of
// either kind, s = 1 then (it is inside e).
// Per row the max and sum passes (exps parked); then the per-row math (log of the sum and,
// for hard targets, the focal factors and 1 - p_y) for all rows at once, one row per lane:
// as scalars per row (libm's logf, expf, expm1f and the register spills around their
// calls) they were two thirds of softmax focal's time at C = 80. Then per row the soft
// focal sums (pass 3) and the gradient pass.
// margin_after (class indices, unsmoothed, every margin s Delta_c in [0, log 2]): passes 1
// and 2 read the target's logit without its margin, so that no block asks whether it holds
// the target (a branch whose outcome moves with the target from row to row: with it,
// margins cost 1.17x plain at 65536 x 80 in float32 for random targets, 1.10x with one
// target for every row), and the target's term of the sum is exchanged after them, for all
// rows at once: sum - e^(z0_y - max) + e^(z_y - max), z0_y the logit without the margin. The
// max of the passes is then an upper bound of the row's max, by at most log 2. The sum loses
// at most half of itself (e^-(s Delta) >= 1/2), so the difference carries no more than the
// sum's rounding.
template <typename scalar_t, bool kFocal, bool kGrad, bool kHard, int kAdj, int kSmooth = 0>
void softmax_rows(const Args<scalar_t>& a, const Smoothing& sm,
                  const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t i0, int64_t i1,
                  RowOut<at::opmath_type<scalar_t>>* out, bool margin_after = false) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  static_assert(kSmooth == 0 || kFocal, "smoothed cross-entropy: softmax_smooth_rows");
  constexpr bool kSoft = !kHard || kSmooth != 0;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, R = i1 - i0;
  // Unused and ignored lanes: s = 0, sum = 1, the rest 0 (finite math, zero loss).
  // xy: hard targets' x_y; T, tx: float targets' sum t and (cross-entropy) sum t (x - max).
  // zy (margin_after): x_y without its margin
  alignas(64) acc_t s[L] = {}, mx[L] = {}, xy[L] = {}, zy[L] = {}, T[L] = {}, tx[L] = {}, sum[L];
  int64_t y[L];
  bool live[L] = {};
  for (int64_t k = 0; k < L; ++k) sum[k] = acc_t(1);
  // Soft focal rows read their logits after pass 2: their exps are parked apart.
  constexpr bool kScratch = IO::kReduced || (kFocal && kSoft);
  // soft focal rows: R rows of parked exps, then R rows of pass 3's e_k G_k for the gradient
  acc_t* const scratch = kGrad ? park_scratch<scalar_t, kScratch>(C, kFocal && kSoft ? 2 * R : R) : nullptr;
  for (int64_t k = 0; k < R; ++k) {
    SoftmaxRowStart<scalar_t, kAdj> r;
    if (!softmax_row_start<scalar_t, kHard, kGrad, kAdj, kScratch>(a, adj, i0 + k, k, scratch, r, y[k], s[k],
                                                                   T[k], mx[k], out[k], margin_after))
      continue;
    live[k] = true;
    if constexpr (kHard) {  // before pass 2 parks over it
      if (margin_after) {   // the same z_y as at(y), for a reader of any kAdj
        zy[k] = r.X.at_unmargined(y[k]);
        xy[k] = zy[k] - adj.target_margin(y[k]);
      } else {
        xy[k] = r.X.at(y[k]);
      }
    }
    softmax_row_sums<scalar_t, !kHard && !kFocal, kGrad>(r.X, r.t, C, mx[k], r.park, sum[k], tx[k], r.next);
  }
  if (kHard && kSmooth == 0 && margin_after) {
    // the target's term of the sum with its margin (unused and ignored lanes: 1 - 1 + 1)
    const V mxv = V::loadu(mx);
    const V e0 = MathOps<V>::exp_nonpos(V::loadu(zy) - mxv), e1 = MathOps<V>::exp_nonpos(V::loadu(xy) - mxv);
    ((V::loadu(sum) - e0) + e1).store(sum);  // the target's parked exp is not read: grad_y is cy
  }
  // Row k's soft targets (its logits: margin at a class index y)
  auto targets = [&](int64_t k) {
    SoftTargets<scalar_t, kHard, kSmooth> E;
    E.t = kHard ? nullptr : a.t + (i0 + k) * a.t_stride;
    E.y = kHard ? y[k] : -1;
    E.w = a.w;
    E.alpha_vec = kFocal ? adj.alpha_vec : nullptr;
    if constexpr (kSmooth != 0)
      E.K = smooth_coef(s[k], static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), kSmooth == 2);
    return E;
  };
  const V sumv = V::loadu(sum), sv = V::loadu(s);
  const V ls = MathOps<V>::log(sumv);
  alignas(64) acc_t loss[L], cp[L], ls_k[L], st[L];  // st: the soft rows' factor of e (s, or 1)
  for (int64_t k = 0; k < L; ++k) st[k] = kSmooth != 0 ? acc_t(1) : s[k];
  if constexpr (kSoft) ls.store(ls_k);
  V q;  // hard targets: 1 - p_y
  if constexpr (!kSoft) {
    // a per-class alpha (softmax focal) scales the sample's loss and gradient by alpha_y
    alignas(64) acc_t sa[L];
    if (kFocal && adj.alpha_vec) {
      for (int64_t k = 0; k < L; ++k) sa[k] = live[k] ? s[k] * adj.alpha_vec[y[k]] : acc_t(0);
    }
    const V sl = kFocal && adj.alpha_vec ? V::loadu(sa) : sv;
    const SoftmaxRow<V> r = softmax_hard_row<kFocal>(sl, V::loadu(xy), V::loadu(mx), ls, a.gamma);
    r.loss.store(loss);
    r.cp.store(cp);
    q = r.q;
  } else if constexpr (!kFocal) {
    const SoftmaxRow<V> r = softmax_soft_row(sv, V::loadu(T), ls, V::loadu(tx));
    r.loss.store(loss);
    r.cp.store(cp);
  } else {
    // Pass 3 (soft focal), per row: sum_c e_c * focal loss, sum_c e_c G_c. For a class
    // index the blocks take e off the target for every class, and the target's share
    // follows for all rows at once (below).
    for (int64_t k = 0; k < R; ++k) {
      if (!live[k]) continue;
      const RowLogits<scalar_t, kAdj> X(a.x + (i0 + k) * a.x_stride, adj, kHard ? y[k] : -1);
      const auto E = targets(k);
      const V mxv(mx[k]), lsv(ls_k[k]);
      // e_c G_c, parked for the gradient pass
      acc_t* const eGk = kGrad ? park_row<scalar_t, kScratch>(scratch, nullptr, C, R + k) : nullptr;
      // with the gradient, pass 2 parked the exps: p = e / sum, and where every lane of a
      // vector has p <= 1/2 (all but at most one vector of a row) softmax_focal_low_p needs
      // no expm1, exp or division
      const acc_t* const pe = kGrad ? park_row<scalar_t, kScratch>(scratch, nullptr, C, k) : nullptr;
      const V inv_sum(acc_t(1) / sum[k]), half(acc_t(0.5));
      V lv(0), gsum(0);
      // The row's largest p is 1 / sum (its max's exp is 1): with sum >= 2 every class has
      // p <= 1/2 and no vector needs the test (NaN: the test, as before).
      auto blocks = [&](auto all_low_c) __attribute__((always_inline)) {
        row_blocks<IO, 1>(C, [&](int64_t j, int64_t n, auto) CBF_BLOCK {
          V xv[IO::kVecs], ev[IO::kVecs];
          X.load(j, n, xv);
          if constexpr (kHard) {
            E.load_off_target(j, n, ev);
          } else {
            E.load(j, n, ev);
          }
          CBF_UNROLL_VECS
          for (int v = 0; v < IO::kVecs; ++v) {
            const int64_t nv = IO::lanes(n, v);
            if (nv == 0) break;
            const V logp = log_softmax_of(xv[v], mxv, lsv);
            SoftmaxFocal<V> f;
            if constexpr (kGrad) {
              const V p = V::loadu(pe + j + v * IO::kLanes, nv) * inv_sum;  // zeros past nv
              if (decltype(all_low_c)::value || IO::none(p > half)) {
                f = softmax_focal_low_p(logp, p, a.gamma, a.gamma_int);
              } else {
                f = softmax_focal<true>(logp, a.gamma, a.gamma_int);
              }
            } else {
              f = softmax_focal<true>(logp, a.gamma, a.gamma_int);
            }
            const V eG = ev[v] * f.G;
            lv = lv + IO::keep(ev[v] * f.loss, nv, acc_t(0));
            gsum = gsum + IO::keep(eG, nv, acc_t(0));
            if constexpr (kGrad) eG.store(eGk + j + v * IO::kLanes, nv);
          }
        });
      };
      if (kGrad && sum[k] >= acc_t(2)) {
        blocks(std::true_type{});
      } else {
        blocks(std::false_type{});
      }
      loss[k] = st[k] * IO::hsum(lv);
      cp[k] = st[k] * IO::hsum(gsum);
    }
    if constexpr (kHard) {
      // the target's share of e times its focal terms, one row per lane (dead lanes:
      // log p = 0, finite)
      const SoftmaxFocal<V> fy =
          softmax_focal<true>(log_softmax_of(V::loadu(xy), V::loadu(mx), ls), a.gamma, a.gamma_int);
      alignas(64) acc_t ly[L], gy[L];
      fy.loss.store(ly);
      fy.G.store(gy);
      for (int64_t k = 0; k < R; ++k) {
        if (!live[k]) continue;
        const acc_t share = targets(k).target_share();
        loss[k] += st[k] * (share * ly[k]);
        cp[k] += st[k] * (share * gy[k]);
        if constexpr (kGrad) park_row<scalar_t, kScratch>(scratch, nullptr, C, R + k)[y[k]] += share * gy[k];
      }
    }
  }
  for (int64_t k = 0; k < R; ++k)
    if (live[k]) out[k].loss = loss[k];  // an ignored row keeps +0
  if constexpr (kGrad) {
    // cp: the coefficient of p_k, times the mean's 1/D when known up front (and the logit
    // scale s: d / dx = s d / dz).
    const acc_t pre = a.grad_prescale * (kAdj != kStoredLogits ? adj.scale : acc_t(1));
    const V cpv = V::loadu(cp) * V(pre);
    alignas(64) acc_t cpe[L], cy[L];
    (cpv / sumv).store(cpe);                     // cp p_k = cpe e_k
    if constexpr (!kSoft) (-cpv * q).store(cy);  // grad_y = cp * (p_y - 1) = -cp * (1 - p_y)
    for (int64_t k = 0; k < R; ++k) {
      if (!live[k]) continue;
      const int64_t i = i0 + k;
      scalar_t* g = a.grad + i * C;
      const acc_t* eGk = kFocal && kSoft ? park_row<scalar_t, kScratch>(scratch, g, C, R + k) : nullptr;
      softmax_row_grad<scalar_t, kFocal, kSoft>(targets(k), park_row<scalar_t, kScratch>(scratch, g, C, k),
                                                eGk, g, C, cpe[k], st[k] * pre);
      if constexpr (!kSoft) g[y[k]] = static_cast<scalar_t>(cy[k]);
    }
  }
}

// Pass 2 of a smoothed row (label smoothing, or PyTorch's class weighting of float targets;
// math.h, smooth_coef), after the max pass: sum_exp = sum e_c, e_c = exp(x_c - max) (parked
// in `park` when given), ad = sum a_c (x_c - max) and, for float targets,
// atd = sum a_c t_c (x_c - max) and at = sum a_c t_c, with a = w (kClass) or 1.
template <typename scalar_t, bool kHard, bool kClass, int kAdj>
CBF_HD void softmax_row_smooth_sums(const RowLogits<scalar_t, kAdj>& X, const scalar_t* t,
                                    const at::opmath_type<scalar_t>* w, int64_t C,
                                    at::opmath_type<scalar_t> mx, at::opmath_type<scalar_t>* park,
                                    at::opmath_type<scalar_t> (&acc)[4], const scalar_t* next) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int kU = 4 / IO::kVecs;  // independent accumulators, as softmax_row_sums
  const V mxv(mx);
  V ev[kU], adv[kU], atdv[kU], atv[kU];
  for (int u = 0; u < kU; ++u) ev[u] = adv[u] = atdv[u] = atv[u] = V(0);
  row_blocks<IO, kU>(C, [&](int64_t j, int64_t n, auto u) CBF_BLOCK {
    V xv[IO::kVecs], tv[IO::kVecs], e[IO::kVecs];
    if (next) __builtin_prefetch(next + j);
    X.load(j, n, xv);
    if constexpr (!kHard) IO::load(t + j, n, tv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) break;
      const V d = IO::keep(xv[v] - mxv, nv, acc_t(0));
      e[v] = MathOps<V>::exp_nonpos(d);
      ev[u] = ev[u] + IO::keep(e[v], nv, acc_t(0));
      V av(1);
      if constexpr (kClass) {
        av = V::loadu(w + j + v * IO::kLanes, nv);  // zeros past nv
        adv[u] = at::vec::fmadd(av, d, adv[u]);
      } else {
        adv[u] = adv[u] + d;
      }
      if constexpr (!kHard) {
        const V at = kClass ? av * tv[v] : tv[v];
        atdv[u] = at::vec::fmadd(at, d, atdv[u]);
        atv[u] = atv[u] + at;
      }
    }
    if (park) {
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        if (nv > 0) e[v].store(park + j + v * IO::kLanes, nv);
      }
    }
  });
  for (int u = 1; u < kU; ++u) {
    ev[0] = ev[0] + ev[u];
    adv[0] = adv[0] + adv[u];
    atdv[0] = atdv[0] + atdv[u];
    atv[0] = atv[0] + atv[u];
  }
  acc[0] = IO::hsum(ev[0]);
  acc[1] = IO::hsum(adv[0]);
  acc[2] = IO::hsum(atdv[0]);
  acc[3] = IO::hsum(atv[0]);
}

// The gradient pass of a smoothed row from the parked e_k: grad_k = cpe e_k - a_k (P t_k + Q)
// (E p_k - e_k of math.h, smooth_coef; e from SoftTargets; for a class index the caller
// writes grad_y, and every other class has t_k = 0).
template <typename scalar_t, bool kHard, int kSmooth>
CBF_HD void softmax_row_smooth_grad(const SoftTargets<scalar_t, kHard, kSmooth>& E,
                                    const at::opmath_type<scalar_t>* park, scalar_t* g, int64_t C,
                                    at::opmath_type<scalar_t> cpe) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  const V cpev(cpe);
  row_blocks<IO, 1>(C, [&](int64_t j, int64_t n, auto) CBF_BLOCK {
    V ev[IO::kVecs], gv[IO::kVecs];
    if constexpr (kHard) {
      // off the target e_k = a_k (P 0 + Q) = a_k Q (SoftTargets::load_off_target, written
      // out here): under class weighting grad_k = cpe e_k - w_k Q in one fused
      // multiply-subtract
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        if (nv == 0) {
          gv[v] = V(0);
          continue;
        }
        const V cp = cpev * V::loadu(park + j + v * IO::kLanes, nv);
        gv[v] = kSmooth == 2 ? at::vec::fnmadd(V::loadu(E.w + j + v * IO::kLanes, nv), V(E.K.Q), cp)
                             : cp - V(E.K.Q);
      }
    } else {
      E.load(j, n, ev);
      CBF_UNROLL_VECS
      for (int v = 0; v < IO::kVecs; ++v) {
        const int64_t nv = IO::lanes(n, v);
        gv[v] = nv > 0 ? cpev * V::loadu(park + j + v * IO::kLanes, nv) - ev[v] : V(0);
      }
    }
    IO::store(g + j, n, gv);
  });
}

// Smoothed softmax cross-entropy, rows [i0, i1) (one vector's lanes at most): the passes of
// softmax_rows with the effective target of math.h's smooth_coef,
//   loss = E log sum - tx,  grad_k = E p_k - a_k (P t_k + Q).
// A_all: A = sum_c a_c, the same for every row (class_weight_sum).
template <typename scalar_t, bool kGrad, bool kHard, bool kClass, int kAdj>
void softmax_smooth_rows(const Args<scalar_t>& a, const Smoothing& sm,
                         const ClassOptions<at::opmath_type<scalar_t>>& adj, at::opmath_type<scalar_t> A_all,
                         int64_t i0, int64_t i1, RowOut<at::opmath_type<scalar_t>>* out) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = a.C, R = i1 - i0;
  // Dead lanes (unused, ignored): sum 1, everything else 0 (E = 0: zero loss).
  alignas(64) acc_t s[L] = {}, mx[L] = {}, xy[L] = {}, T[L] = {}, ad[L] = {}, A[L] = {}, atd[L] = {},
                    at_[L] = {}, sum[L];
  int64_t y[L];
  bool live[L] = {};
  for (int64_t k = 0; k < L; ++k) sum[k] = acc_t(1);
  constexpr bool kScratch = IO::kReduced;
  acc_t* const scratch = kGrad ? park_scratch<scalar_t, kScratch>(C, R) : nullptr;
  for (int64_t k = 0; k < R; ++k) {
    SoftmaxRowStart<scalar_t, kAdj> rs;
    if (!softmax_row_start<scalar_t, kHard, kGrad, kAdj, kScratch>(a, adj, i0 + k, k, scratch, rs, y[k], s[k],
                                                                   T[k], mx[k], out[k], false))
      continue;
    live[k] = true;
    if constexpr (kHard) xy[k] = rs.X.at(y[k]);  // before pass 2 parks over it
    acc_t r[4];
    softmax_row_smooth_sums<scalar_t, kHard, kClass>(rs.X, rs.t, a.w, C, mx[k], rs.park, r, rs.next);
    sum[k] = r[0];
    ad[k] = r[1];
    A[k] = A_all;  // dead lanes keep 0 (class weighting's E has no s to zero it)
    if constexpr (kHard) {
      at_[k] = kClass ? s[k] : acc_t(1);  // a_y
      atd[k] = at_[k] * (xy[k] - mx[k]);
    } else {
      atd[k] = r[2];
      at_[k] = r[3];
    }
  }
  const V sumv = V::loadu(sum), sv = V::loadu(s), Av = V::loadu(A), atv = V::loadu(at_);
  const V ls = MathOps<V>::log(sumv);
  const SmoothCoef<V> K = smooth_coef(sv, static_cast<acc_t>(sm.eps), static_cast<acc_t>(C), kClass);
  const V E = K.P * atv + K.Q * Av;
  const SoftmaxRow<V> row = softmax_soft_row(V(1), E, ls, K.P * V::loadu(atd) + K.Q * V::loadu(ad));
  alignas(64) acc_t loss[L];
  row.loss.store(loss);
  for (int64_t k = 0; k < R; ++k)
    if (live[k]) out[k].loss = loss[k];
  if constexpr (kGrad) {
    const V pre(a.grad_prescale * (kAdj != kStoredLogits ? adj.scale : acc_t(1)));  // d / dx = s d / dz
    const SmoothCoef<V> Kp{K.P * pre, K.Q * pre};
    alignas(64) acc_t cpe[L], P[L], Q[L], cy[L];
    (row.cp * pre / sumv).store(cpe);  // E p_k = cpe e_k
    Kp.P.store(P);
    Kp.Q.store(Q);
    if constexpr (kHard) {
      const V q = softmax_one_minus_p(log_softmax_of(V::loadu(xy), V::loadu(mx), ls));
      smooth_grad_y(Kp, atv, Av, q).store(cy);
    }
    for (int64_t k = 0; k < R; ++k) {
      if (!live[k]) continue;
      const int64_t i = i0 + k;
      scalar_t* g = a.grad + i * C;
      SoftTargets<scalar_t, kHard, kClass ? 2 : 1> E;  // a_k (P t_k + Q), prescaled
      E.t = kHard ? nullptr : a.t + i * a.t_stride;
      E.y = kHard ? y[k] : -1;
      E.w = a.w;
      E.K = {P[k], Q[k]};
      softmax_row_smooth_grad(E, park_row<scalar_t, kScratch>(scratch, g, C, k), g, C, cpe[k]);
      if constexpr (kHard) g[y[k]] = static_cast<scalar_t>(cy[k]);
    }
  }
}

// A = sum_c a_c of a smoothed cross-entropy row (math.h, smooth_coef): the class weights'
// sum under PyTorch's class weighting, else C; the same for every row, so summed once a call.
template <typename scalar_t>
at::opmath_type<scalar_t> class_weight_sum(const Args<scalar_t>& a, bool class_weighting) {
  if (!class_weighting) return static_cast<at::opmath_type<scalar_t>>(a.C);
  double A = 0;
  for (int64_t c = 0; c < a.C; ++c) A += a.w[c];
  return static_cast<at::opmath_type<scalar_t>>(A);
}

// Calls f(std::integral_constant<int, kAdj>) with how the rows read their logits
// (RowLogits): kScaledLogits where every offset is 0 (margins or a logit scale only);
// kStoredLogits also where `stored` (margins alone at s = 1, applied after the passes).
template <typename acc_t, typename F>
auto with_adjusted_logits(const ClassOptions<acc_t>& adj, int64_t C, bool stored, const F& f) {
  if (!adj.adjusted() || stored) return f(std::integral_constant<int, kStoredLogits>{});
  if (std::all_of(adj.offset, adj.offset + C, [](acc_t b) { return b == acc_t(0); }))
    return f(std::integral_constant<int, kScaledLogits>{});
  return f(std::integral_constant<int, kOffsetLogits>{});
}

// Softmax rows per group: about kGroupElems logits, so that a group's rows and parked exps
// are still in cache for the gradient pass; one vector's lanes at most.
constexpr int64_t kGroupElems = 1 << 12;

}  // namespace

template <typename scalar_t>
std::pair<double, double> softmax_family_rows(const RowArgs<scalar_t>& a, const Smoothing& sm,
                                              const ClassOptions<at::opmath_type<scalar_t>>& adj_in,
                                              bool focal, bool grad, bool hard) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = RowIO<scalar_t>::kLanes;
  // All-zero margins (a logit adjustment alone) as none: the passes then skip the target
  // block's lane compare (s x - s 0 is s x to the bit).
  ClassOptions<acc_t> adj = adj_in;
  if (adj.margin && std::all_of(adj.margin, adj.margin + a.C, [](acc_t m) { return m == acc_t(0); }))
    adj.margin = nullptr;
  // Margins whose e^-(s Delta) is at least 1/2 (LDAM's default 0.5 at s = 1): softmax_rows'
  // margin_after.
  const acc_t kLog2 = acc_t(0.6931471805599453);
  const bool margin_after = adj.margin && std::all_of(adj.margin, adj.margin + a.C, [&](acc_t m) {
                              const acc_t sm_ = adj.scale * m;
                              return sm_ >= acc_t(0) && sm_ <= kLog2;
                            });
  // ... and with s = 1 and no logit adjustment, no pass reads an adjusted logit: the rows
  // read the logits as stored.
  const bool stored = margin_after && hard && !sm.active(hard) && adj.scale == acc_t(1) &&
                      std::all_of(adj.offset, adj.offset + a.C, [](acc_t b) { return b == acc_t(0); });
  const int64_t group = std::clamp<int64_t>(kGroupElems / std::max<int64_t>(a.C, 1), 1, L);
  return with_adjusted_logits(adj, a.C, stored, [&](auto adj_c) {
    constexpr int kA = decltype(adj_c)::value;
    if (!focal && sm.active(hard)) {
      const auto A_all = class_weight_sum(a, sm.class_weighting);
      return with_flags(sm.class_weighting, grad, hard, [&](auto class_c, auto grad_c, auto hard_c) {
        return run_row_groups<scalar_t, L>(
            a.N, a.C, group, a.per_row_out, [&](int64_t i0, int64_t i1, auto* out) {
              softmax_smooth_rows<scalar_t, decltype(grad_c)::value, decltype(hard_c)::value,
                                  decltype(class_c)::value, kA>(a, sm, adj, A_all, i0, i1, out);
            });
      });
    }
    if (focal && sm.active(hard)) {  // smoothed softmax focal: soft rows of either target kind
      return with_flags(sm.class_weighting, grad, hard, [&](auto class_c, auto grad_c, auto hard_c) {
        constexpr int kS = decltype(class_c)::value ? 2 : 1;
        return run_row_groups<scalar_t, L>(
            a.N, a.C, group, a.per_row_out, [&](int64_t i0, int64_t i1, auto* out) {
              softmax_rows<scalar_t, true, decltype(grad_c)::value, decltype(hard_c)::value, kA, kS>(
                  a, sm, adj, i0, i1, out);
            });
      });
    }
    return with_flags(focal, grad, hard, [&](auto focal_c, auto grad_c, auto hard_c) {
      return run_row_groups<scalar_t, L>(
          a.N, a.C, group, a.per_row_out, [&](int64_t i0, int64_t i1, auto* out) {
            softmax_rows<scalar_t, decltype(focal_c)::value, decltype(grad_c)::value, decltype(hard_c)::value,
                         kA>(a, sm, adj, i0, i1, out, margin_after);
          });
    });
  });
}

CBFUSED_FOR_EACH_DTYPE(CBFUSED_FAMILY_ROWS, softmax_family_rows)

}  // namespace cpu
}  // namespace cbfused
