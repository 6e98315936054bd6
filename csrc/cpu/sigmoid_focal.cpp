// cbfused::sigmoid_focal on the CPU (torchvision.ops.sigmoid_focal_loss semantics with an
// optional per-class weight): the host entry and its registration; the elementwise loop is
// csrc/cpu/kernels/focal_elementwise.cpp, per CPU ISA.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include "cbfused/checks.h"
#include "cbfused/kinds.h"
#include "cpu/host.h"
#include "cpu/kernels.h"

namespace cbfused {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_cpu(const at::Tensor& inputs, const at::Tensor& targets,
                                                     const std::optional<at::Tensor>& weight, double alpha,
                                                     double gamma, int64_t reduction, int64_t grad_mode,
                                                     int64_t weight_dim,
                                                     const std::optional<at::Tensor>& class_alpha) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const FocalPlan plan =
      check_sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction, weight_dim, class_alpha);
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
        const double total = active_kernels().get<scalar_t>().focal(
            plan, gamma, alpha, gscale, lptr, compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
        if (reduction != kNone) *loss.mutable_data_ptr<scalar_t>() = cast_saturating<scalar_t>(total * scale);
      });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbfused, CPU, m) { m.impl("sigmoid_focal", &sigmoid_focal_cpu); }

}  // namespace cpu
}  // namespace cbfused
