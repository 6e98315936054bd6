// cbfused::cb_loss on the CPU: the host entry (validation, outputs, the mean's
// denominator) and its registration. The rows run in the vectorised kernels of the CPU's
// ISA (csrc/cpu/kernels.h, csrc/cpu/kernels/); the gradient hand-off to autograd is
// described once, in csrc/autograd.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <utility>

#include "cbfused/checks.h"
#include "cbfused/math.h"
#include "cbfused/row_args.h"
#include "cbfused/targets.h"
#include "cpu/host.h"
#include "cpu/kernels.h"

namespace cbfused {
namespace cpu {
namespace {

// 1/D of the means for hard targets (D: non-ignored samples, or the signed sum of their
// class weights), 0 when D = 0; checks the targets' range on the way.
template <typename scalar_t>
double hard_target_inv_denominator(const RowArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  double d = 0;
  for (int64_t i = 0; i < a.N; ++i) {
    const HardTarget<acc_t> h = hard_target(a.y[i], a.C, a.ignore_index, a.w, a.weighted);
    if (h.bad) target_out_of_range(a.y[i], a.C, i, a.ignore_index);
    d += static_cast<double>(h.denom);  // 0 for an ignored sample
  }
  return inv_denominator(d);
}

// cb_loss's rows into `out`; grad_over_logits: the gradient is written over the logits
// (cb_loss_).
CbLossOutputs run_cb_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight,
                          int64_t loss_type, double gamma, double alpha, int64_t reduction,
                          int64_t ignore_index, bool compute_grad, double label_smoothing, int64_t weighting,
                          const std::optional<at::Tensor>& logit_offset,
                          const std::optional<at::Tensor>& margins, double logit_scale,
                          const std::optional<at::Tensor>& class_alpha, bool grad_over_logits) {
  const AdjustArgs adjust{logit_offset, margins, logit_scale, class_alpha};
  const CbLossPlan plan = check_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction,
                                        label_smoothing, weighting, &adjust);
  const Smoothing sm{label_smoothing, weighting == kClassWeighting};
  CbLossOutputs out = alloc_cb_loss(plan, reduction, compute_grad && !grad_over_logits);
  if (grad_over_logits) {
    // the kernels' contract (cpu/kernels.h): in the rows layout the gradient may be the logits
    TORCH_CHECK(plan.S == 0 && plan.logits.data_ptr() == logits.data_ptr() && logits.is_contiguous(),
                "cbfused: cb_loss_ writes the gradient over the logits: they must be a contiguous [N, C] "
                "tensor, got shape ",
                shape_str(logits), " and strides ", logits.strides());
    out.grad = logits;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.logits.scalar_type(), "cbfused_cb_loss_cpu", [&] {
        auto a = make_row_args<scalar_t>(plan, out, gamma, alpha, reduction, ignore_index, compute_grad);
        const bool mean = reduction == kMean || reduction == kWeightedMean;
        // Hard targets: the mean's D is an O(N) pass over the targets, so the gradient can
        // carry 1/D already and the usual backward (grad_output = 1) has nothing left to do.
        const bool fold = plan.hard && mean && compute_grad;
        if (fold) a.grad_prescale = static_cast<at::opmath_type<scalar_t>>(hard_target_inv_denominator(a));
        const std::pair<double, double> tot = active_kernels().get<scalar_t>().cb_rows(
            a, make_planes(plan), sm, make_adjust<at::opmath_type<scalar_t>>(plan), loss_type, compute_grad,
            plan.hard);
        const double inv = mean ? inv_denominator(tot.second) : 1.0;
        if (reduction != kNone)
          *out.loss.mutable_data_ptr<scalar_t>() = cast_saturating<scalar_t>(tot.first * inv);
        // what the backward still applies to the gradient
        *out.inv_norm.mutable_data_ptr<at::opmath_type<scalar_t>>() =
            static_cast<at::opmath_type<scalar_t>>(fold ? 1.0 : inv);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cb_loss_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight, int64_t loss_type,
    double gamma, double alpha, int64_t reduction, int64_t ignore_index, int64_t grad_mode,
    double label_smoothing, int64_t weighting, const std::optional<at::Tensor>& logit_offset,
    const std::optional<at::Tensor>& margins, double logit_scale,
    const std::optional<at::Tensor>& class_alpha) {
  const bool compute_grad = check_grad_mode(grad_mode);
  CbLossOutputs out = run_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction,
                                  ignore_index, compute_grad, label_smoothing, weighting, logit_offset,
                                  margins, logit_scale, class_alpha, false);
  return {out.loss, out.grad, out.inv_norm};
}

// cb_loss_ (schemas.h): the gradient over the logits; returns (loss, grad_scale).
std::tuple<at::Tensor, at::Tensor> cb_loss_inplace_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight, int64_t loss_type,
    double gamma, double alpha, int64_t reduction, int64_t ignore_index, double label_smoothing,
    int64_t weighting, const std::optional<at::Tensor>& logit_offset,
    const std::optional<at::Tensor>& margins, double logit_scale,
    const std::optional<at::Tensor>& class_alpha) {
  CbLossOutputs out =
      run_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction, ignore_index, true,
                  label_smoothing, weighting, logit_offset, margins, logit_scale, class_alpha, true);
  return {out.loss, out.inv_norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbfused, CPU, m) {
  m.impl("cb_loss", &cb_loss_cpu);
  m.impl("cb_loss_", &cb_loss_inplace_cpu);
}

}  // namespace cpu
}  // namespace cbfused
