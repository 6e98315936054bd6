// The arguments of a cb_loss row kernel, shared by the CPU and CUDA backends, and the one
// place that fills them from a validated plan.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cbfused/checks.h"
#include "cbfused/math.h"

namespace cbfused {

template <typename scalar_t>
struct RowArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;
  int64_t x_stride = 0;         // rows: between rows; planes: between samples
  const int64_t* y = nullptr;   // hard targets (contiguous), or null
  const scalar_t* t = nullptr;  // float targets, or null
  int64_t t_stride = 0;
  const acc_t* w = nullptr;  // class weights [C]
  scalar_t* grad = nullptr;  // [N, C] contiguous, or null (no gradient)
  int64_t N = 0, C = 0;      // N: positions (rows)
  acc_t gamma = 0;
  int gamma_int = -1;  // small_integer_gamma(gamma)
  acc_t alpha = -1;    // < 0: no alpha (a per-class alpha: ClassOptions)
  int64_t ignore_index = -100;
  bool weighted = false;            // the mean's denominator is the sum of sample weights
  acc_t grad_prescale = 1;          // folded into the gradient (the mean's 1/D when known up front)
  scalar_t* per_row_out = nullptr;  // [N] loss per sample (reduction 'none'), or null
  acc_t* row_loss = nullptr;        // CUDA: [N] per-row loss and denominator for the reduction
  acc_t* row_denom = nullptr;
};

// The planes layout (CbLossPlan) beside RowArgs: S > 0 positions per sample, position
// r = n S + p at x + n x_stride + c x_cstride + p (t alike), gradient contiguous
// [samples, C, S]; S = 0: the rows layout. A struct of its own: three more fields in the
// CUDA row kernels' parameter struct made ptxas spill in the flat kernel (sm_90).
struct Planes {
  int64_t S = 0;
  int64_t x_cstride = 0, t_cstride = 0;
};

inline Planes make_planes(const CbLossPlan& plan) {
  Planes pl;
  pl.S = plan.S;
  if (plan.S > 0) {
    pl.x_cstride = plan.logits.stride(1);
    if (!plan.hard) pl.t_cstride = plan.target.stride(1);
  }
  return pl;
}

// Label smoothing and the class-weighting rule of softmax cross-entropy (math.h,
// smooth_coef) beside RowArgs, like Planes: only the softmax kernels take it.
struct Smoothing {
  double eps = 0;                // label smoothing in [0, 1]
  bool class_weighting = false;  // PyTorch's rule: class term c weighted by w_c
  // Whether the row math differs from the plain rule: for a one-hot target the two
  // weighting rules coincide when eps = 0.
  bool active(bool hard) const { return eps > 0 || (class_weighting && !hard); }
};

// Per-class options beside RowArgs, like Planes (a pointer more in RowArgs, the CUDA row
// kernels' parameter struct, made ptxas spill in the bfloat16 / float16 flat kernel on sm_90):
// the softmax family's adjusted logits (math.h, adjusted_logit; adjusted(): offset and margin
// are both [C], zeros where not given) and a per-class alpha (math.h, alpha_t_of).
template <typename acc_t>
struct ClassOptions {
  const acc_t* offset = nullptr;     // b = tau log(pi)
  const acc_t* margin = nullptr;     // Delta, on the target class (class-index targets; null: none)
  acc_t scale = 1;                   // s
  const acc_t* alpha_vec = nullptr;  // per-class alpha [C] (RowArgs::alpha < 0 then), or null
  CBF_HD bool adjusted() const { return offset != nullptr; }
  // s Delta_y, what the target's adjusted logit loses (0 for y < 0)
  CBF_HD acc_t target_margin(int64_t y) const { return y >= 0 && margin ? scale * margin[y] : acc_t(0); }
};

template <typename acc_t>
ClassOptions<acc_t> make_adjust(const CbLossPlan& plan) {
  ClassOptions<acc_t> adj;
  if (plan.offset.defined()) {
    adj.offset = plan.offset.const_data_ptr<acc_t>();
    adj.margin = plan.margin.const_data_ptr<acc_t>();
    adj.scale = static_cast<acc_t>(plan.scale);
  }
  if (plan.alpha_vec.defined()) adj.alpha_vec = plan.alpha_vec.const_data_ptr<acc_t>();
  return adj;
}

template <typename scalar_t>
RowArgs<scalar_t> make_row_args(const CbLossPlan& plan, CbLossOutputs& out, double gamma, double alpha,
                                int64_t reduction, int64_t ignore_index, bool compute_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  RowArgs<scalar_t> a;
  a.x = plan.logits.const_data_ptr<scalar_t>();
  a.x_stride = plan.N > 0 ? plan.logits.stride(0) : 0;
  if (plan.hard) {
    a.y = plan.target.const_data_ptr<int64_t>();
  } else {
    a.t = plan.target.const_data_ptr<scalar_t>();
    a.t_stride = plan.N > 0 ? plan.target.stride(0) : 0;
  }
  a.w = plan.weight.const_data_ptr<acc_t>();
  a.grad = compute_grad ? out.grad.mutable_data_ptr<scalar_t>() : nullptr;
  a.N = plan.N;
  a.C = plan.C;
  a.gamma = static_cast<acc_t>(gamma);
  a.gamma_int = small_integer_gamma(gamma);
  a.alpha = static_cast<acc_t>(alpha);
  a.ignore_index = ignore_index;
  a.weighted = reduction == kWeightedMean;
  a.per_row_out = reduction == kNone ? out.loss.mutable_data_ptr<scalar_t>() : nullptr;
  return a;
}

}  // namespace cbfused
