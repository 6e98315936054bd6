// Fused CPU kernels: the entry points of both ops, the softmax rows and the
// torchvision-style elementwise focal loss. A row's passes compute the class-balanced
// loss and, when asked, its gradient w.r.t. the logits (for reduction 'sum'; the
// backward scales it by grad_output and by the mean's 1/D). The sigmoid / focal rows are
// in sigmoid.cpp; the chunked row loop both use (fixed chunks, sums in chunk order: the
// bits do not depend on the number of threads) is in rows.h.
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
#include "cpu/rows.h"
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

// 1/D of the means for hard targets (D: non-ignored samples, or the signed sum of their
// class weights), 0 when D = 0; checks the targets' range on the way.
template <typename scalar_t>
double hard_target_inv_denominator(const Args<scalar_t>& a) {
  double d = 0;
  for (int64_t i = 0; i < a.N; ++i) {
    const int64_t y = a.y[i];
    if (y == a.ignore_index) continue;
    if (y < 0 || y >= a.C) target_out_of_range(y, a.C, i, a.ignore_index);
    d += a.weighted ? static_cast<double>(a.w[y]) : 1.0;
  }
  return inv_denominator(d);
}

template <typename scalar_t, bool kGrad, bool kHard>
std::pair<double, double> dispatch_loss(const Args<scalar_t>& a, int64_t loss_type, int64_t N,
                                        scalar_t* per_row) {
  if (is_softmax_family(loss_type)) {
    return is_focal(loss_type) ? run_softmax<scalar_t, true, kGrad, kHard>(a, N, per_row)
                               : run_softmax<scalar_t, false, kGrad, kHard>(a, N, per_row);
  }
  return sigmoid_loss_rows<scalar_t>(a, is_focal(loss_type), kGrad, kHard, N, per_row);  // sigmoid.cpp
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
        const double inv = mean ? inv_denominator(tot.second) : 1.0;
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
  const int pow_k = small_integer_gamma(gamma);
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
        torchvision_focal_term<kGrad>(xv[v], tv[v], g, l, d, pow_k);
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
  const FocalPlan plan = check_sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction);
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
