// The row machinery of the CPU kernel files (csrc/cpu/kernels/: the softmax-family rows,
// the binary-family rows, the torchvision-style focal op), compiled once per CPU ISA:
// per-row outputs, a row's target and class weight, and the chunked row loop whose sums do
// not depend on the thread count.
//
// In an unnamed namespace on purpose: each kernel file compiles its own copy with its own
// optimisation options (sigmoid.cpp schedules for register pressure), and no copy is
// shared between them at link time.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cbfused/targets.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {

// The rows of one cb_loss call, per loss family (kernels/softmax_rows.cpp,
// kernels/binary_rows.cpp): totals of loss and denominator, as run_row_groups returns them.
// sm: label smoothing (both families) and the class-weighting rule (the softmax family);
// adj: adjusted logits (the softmax family) and a per-class alpha.
template <typename scalar_t>
std::pair<double, double> softmax_family_rows(const RowArgs<scalar_t>& a, const Smoothing& sm,
                                              const ClassOptions<at::opmath_type<scalar_t>>& adj, bool focal,
                                              bool grad, bool hard);
template <typename scalar_t>
std::pair<double, double> binary_family_rows(const RowArgs<scalar_t>& a, const Smoothing& sm,
                                             const ClassOptions<at::opmath_type<scalar_t>>& adj, bool focal,
                                             bool grad, bool hard);
// The same families in the planes layout (kernels/planes.cpp; pl.S > 0).
template <typename scalar_t>
std::pair<double, double> softmax_family_planes(const RowArgs<scalar_t>& a, const Planes& pl,
                                                const Smoothing& sm,
                                                const ClassOptions<at::opmath_type<scalar_t>>& adj,
                                                bool focal, bool grad, bool hard);
template <typename scalar_t>
std::pair<double, double> binary_family_planes(const RowArgs<scalar_t>& a, const Planes& pl,
                                               const Smoothing& sm,
                                               const ClassOptions<at::opmath_type<scalar_t>>& adj, bool focal,
                                               bool grad, bool hard);
// sigmoid_focal's elementwise rows (kernels/focal_elementwise.cpp).
template <typename scalar_t>
double focal_elementwise_rows(const FocalPlan& p, double gamma, double alpha, double grad_scale,
                              scalar_t* loss_out, scalar_t* grad);

// Explicit instantiations for the four dtypes of a function template F with the signature
// of macro M(F, T).
#define CBFUSED_FAMILY_ROWS(F, T)                                              \
  template std::pair<double, double> F<T>(const RowArgs<T>&, const Smoothing&, \
                                          const ClassOptions<at::opmath_type<T>>&, bool, bool, bool);
#define CBFUSED_FAMILY_PLANES(F, T)                                                           \
  template std::pair<double, double> F<T>(const RowArgs<T>&, const Planes&, const Smoothing&, \
                                          const ClassOptions<at::opmath_type<T>>&, bool, bool, bool);
#define CBFUSED_FOCAL_ROWS(F, T) template double F<T>(const FocalPlan&, double, double, double, T*, T*);
#define CBFUSED_FOR_EACH_DTYPE(M, F) M(F, float) M(F, double) M(F, c10::Half) M(F, c10::BFloat16)

namespace {

// Calls f(focal_c, grad_c, hard_c) with the three flags as std::true_type / false_type:
// one instantiation per combination, picked once per call.
template <typename F>
auto with_flags(bool focal, bool grad, bool hard, const F& f) {
  auto with_hard = [&](auto focal_c, auto grad_c) {
    return hard ? f(focal_c, grad_c, std::true_type{}) : f(focal_c, grad_c, std::false_type{});
  };
  auto with_grad = [&](auto focal_c) {
    return grad ? with_hard(focal_c, std::true_type{}) : with_hard(focal_c, std::false_type{});
  };
  return focal ? with_grad(std::true_type{}) : with_grad(std::false_type{});
}

// Calls f(flag_c) with the flag as std::true_type / false_type.
template <typename F>
auto with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// The one-hot target vector of the kLanes elements from k0 (y outside them: zeros):
// a lane compare, no memory round trip.
template <typename IO>
inline typename IO::V one_hot_vector(int64_t y, int64_t k0) {
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  return V(acc_t(1)) & (V::arange(acc_t(0), acc_t(1)) == V(static_cast<acc_t>(y - k0)));
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

// Reads the float target row: s = sum_c t_c w_c, T = sum_c t_c; checks 0 <= t <= 1.
template <typename scalar_t>
inline void target_row_sums(const Args<scalar_t>& a, const scalar_t* t, int64_t i,
                            at::opmath_type<scalar_t>& s, at::opmath_type<scalar_t>& T) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  V sv(0), Tv(0), lo(0), hi(0);
  row_blocks<IO, 1>(a.C, [&](int64_t j, int64_t n, auto) CBF_BLOCK {
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
    const HardTarget<acc_t> h = hard_target(y, a.C, a.ignore_index, a.w, a.weighted);
    if (h.ignored) {
      if constexpr (kGrad) std::fill(g, g + a.C, scalar_t(0));
      return false;
    }
    if (h.bad) target_out_of_range(y, a.C, i, a.ignore_index);
    s = h.s;
    out.denom = h.denom;
  } else {
    target_row_sums(a, t, i, s, T);
    out.denom = float_target_denom(s, T, a.weighted);
  }
  return true;
}

// Runs chunk(c) -> {loss, denominator} for c in [0, chunks) on the threads and adds the
// results in chunk order: with chunks of a fixed size the totals do not depend on the
// thread count. Each chunk sums in double: a mean can be in range while the float sum is not.
template <typename ChunkFn>
std::pair<double, double> sum_chunks(int64_t chunks, const ChunkFn& chunk) {
  std::vector<double> loss_part(chunks, 0.0), denom_part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) std::tie(loss_part[c], denom_part[c]) = chunk(c);
  });
  double l = 0, d = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    l += loss_part[c];
    d += denom_part[c];
  }
  return {l, d};
}

// Runs `rows(i0, i1, out)` over all N rows in fixed chunks, `group` rows (at most
// kMaxGroup) a call, each filling out[0 .. i1 - i0). Writes the per-row loss when
// `per_row` is given; returns the totals of loss and denominator.
template <typename scalar_t, int64_t kMaxGroup, typename RowsFn>
std::pair<double, double> run_row_groups(int64_t N, int64_t C, int64_t group, scalar_t* per_row,
                                         const RowsFn& rows) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
  const int64_t chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  return sum_chunks(chunks, [&](int64_t c) {
    const int64_t i0 = c * rows_per_chunk, i1 = std::min(N, i0 + rows_per_chunk);
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
    return std::pair<double, double>{l, d};
  });
}

// run_row_groups for a function of one row.
template <typename scalar_t, typename RowFn>
std::pair<double, double> run_rows(int64_t N, int64_t C, scalar_t* per_row, const RowFn& row) {
  return run_row_groups<scalar_t, 1>(N, C, 1, per_row,
                                     [&](int64_t i, int64_t, auto* out) { out[0] = row(i); });
}

}  // namespace
}  // namespace cpu
}  // namespace cbfused
