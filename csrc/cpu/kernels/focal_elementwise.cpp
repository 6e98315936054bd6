// cbfused::sigmoid_focal on the CPU: torchvision.ops.sigmoid_focal_loss's term elementwise,
// compiled once per CPU ISA (csrc/cpu/kernels.h).
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "cbfused/checks.h"
#include "cbfused/math.h"
#include "cpu/rows.h"
#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {
namespace {

// torchvision.ops.sigmoid_focal_loss semantics, elementwise, with an optional weight and an
// optional alpha per class (in place of the scalar alpha): along the last dimension (per
// element of a row), or along an earlier one (one class per row: plan.inner is then a
// multiple of the row).
template <typename scalar_t, bool kGrad>
double focal_elementwise(const FocalPlan& p, double gamma, double alpha, double grad_scale,
                         scalar_t* loss_out, scalar_t* grad) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  const scalar_t* x = p.inputs.const_data_ptr<scalar_t>();
  const scalar_t* t = p.targets.const_data_ptr<scalar_t>();
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* av = p.alpha_vec.defined() ? p.alpha_vec.const_data_ptr<acc_t>() : nullptr;
  const int64_t K = p.row;
  const bool per_element = (w || av) && p.inner == 1;
  const acc_t g = static_cast<acc_t>(gamma), al = static_cast<acc_t>(alpha);
  const int pow_k = small_integer_gamma(gamma);
  const bool has_alpha = al >= acc_t(0);
  const V gs(static_cast<acc_t>(grad_scale));
  // Rows of K elements; the per-row "loss" is the row's sum.
  auto res = run_rows<scalar_t>(p.rows, K, nullptr, [&](int64_t i) {
    RowOut<acc_t> out;
    V lacc(0);
    const int64_t base = i * K;
    const int64_t c_row = (w || av) && !per_element ? (base / p.inner) % p.K : 0;  // the row's class
    const V wrow(w && !per_element ? w[c_row] : acc_t(1));
    const V arow(av && !per_element ? av[c_row] : acc_t(0));
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
        // Every lane's target 0 or 1 (padding lanes load 0): the term without a log of B,
        // at a gamma that is no small integer. One multiply and compare per vector; a NaN
        // target takes the general form.
        const bool binary = pow_k < 0 && IO::none(tv[v] * (V(acc_t(1)) - tv[v]) != V(acc_t(0)));
        torchvision_focal_term<kGrad>(xv[v], tv[v], g, l, d, pow_k, binary);
        if (has_alpha || av) {
          const V at = has_alpha     ? alpha_t(tv[v], al)
                       : per_element ? alpha_t_of(tv[v], V::loadu(av + j + v * IO::kLanes, nv))
                                     : alpha_t_of(tv[v], arow);
          l = l * at;
          if constexpr (kGrad) d = d * at;
        }
        if (w) {
          const V wv = per_element ? V::loadu(w + j + v * IO::kLanes, nv) : wrow;
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

}  // namespace

template <typename scalar_t>
double focal_elementwise_rows(const FocalPlan& p, double gamma, double alpha, double grad_scale,
                              scalar_t* loss_out, scalar_t* grad) {
  return grad ? focal_elementwise<scalar_t, true>(p, gamma, alpha, grad_scale, loss_out, grad)
              : focal_elementwise<scalar_t, false>(p, gamma, alpha, grad_scale, loss_out, nullptr);
}

CBFUSED_FOR_EACH_DTYPE(CBFUSED_FOCAL_ROWS, focal_elementwise_rows)

}  // namespace cpu
}  // namespace cbfused
