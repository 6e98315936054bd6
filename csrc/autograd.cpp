// TORCH_LIBRARY_IMPL(cbfused, Autograd): autograd for every op, in C++ (a Python
// torch.library autograd wrapper cost ~45 us per forward+backward, more than the whole
// kernel at CIFAR-sized batches). The forward runs the backend kernel, which writes the
// loss and the logit-gradient in one pass; the backward scales that saved gradient (the
// hand-off, grad_mode and grad_scale, is described in docs/design.md).
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "cbfused/math.h"
#if defined(CBFUSED_WITH_CUDA)
#include "cbfused/scale_grad.h"
#endif

namespace cbfused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Under tracing (torch.compile's AOTAutograd, make_fx: fake / functional tensors, or a
// Python dispatch mode) the backward must stay functional.
bool traced(const at::Tensor& t) {
  return c10::impl::TorchDispatchModeTLS::any_modes_set() || t.key_set().has(c10::DispatchKey::Python) ||
         t.key_set().has(c10::DispatchKey::Functionalize);
}

// A one-element CPU tensor that is not being traced: its value can be read on the host
// (no device sync) and used as a number.
bool host_scalar(const at::Tensor& t) {
  return !traced(t) && !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && t.device().is_cpu() &&
         t.numel() == 1;
}

// The value of a host_scalar, read from its memory: Tensor::item goes through the dispatcher
// (_local_scalar_dense), about 1 us a call, and loss.backward() reads two of them per step.
template <typename T>
T host_value(const at::Tensor& t) {
  if (!t.is_floating_point()) return t.item<T>();
  T v{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "cbfused_host_value",
                                  [&] { v = static_cast<T>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

void check_first_order(const at::Tensor& grad) {
  if (at::GradMode::is_enabled() && !traced(grad)) {
    TORCH_CHECK(
        false,
        "cbfused losses support first derivatives only (backward with create_graph=True is not supported)");
  }
}

// Whether the backward may hand over or scale in place the kernel's saved gradient
// (grad_mode 2): only outside tracing and when the graph is not kept, so that nothing can
// read the saved gradient again.
bool reuse_saved(const at::Tensor& grad, bool may_reuse) {
  return may_reuse && !traced(grad) && !torch::autograd::get_current_graph_task_keep_graph();
}

// grad * scale: in place where the saved gradient may be reused, and not at all when the
// scale is exactly 1 on the CPU (loss.backward(); reading a CPU scalar needs no device sync).
at::Tensor scale_saved_grad(const at::Tensor& grad, const at::Tensor& scale, bool may_reuse) {
  check_first_order(grad);
  if (!reuse_saved(grad, may_reuse) || traced(scale)) return grad * scale;
  if (host_scalar(scale) && host_value<double>(scale) == 1.0) return grad;
  return grad.mul_(scale);
}

// grad * scale for a scale known to be exactly 1: grad itself where scale_saved_grad would
// reuse it, else a copy.
at::Tensor unit_scaled_grad(const at::Tensor& grad, bool may_reuse) {
  check_first_order(grad);
  return reuse_saved(grad, may_reuse) ? grad : grad.clone();
}

// Whether g_loss * grad_scale, two host scalars, is exactly 1 in grad_scale's type (float32,
// or float64 for float64 logits), as their 0-dim tensor product would be.
bool unit_product(const at::Tensor& g_loss, const at::Tensor& grad_scale) {
  if (grad_scale.scalar_type() == at::kDouble)
    return host_value<double>(g_loss) * host_value<double>(grad_scale) == 1.0;
  return host_value<float>(g_loss) * host_value<float>(grad_scale) == 1.0f;
}

// Whether the GPU's own backward scaling (cuda::scale_grad) takes these operands.
bool device_scalars(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale) {
#if defined(CBFUSED_WITH_CUDA)
  return grad.is_cuda() && !traced(grad) && !traced(g_loss) && !traced(grad_scale) &&
         cuda::scale_grad_applies(grad, g_loss, grad_scale);
#else
  (void)grad, (void)g_loss, (void)grad_scale;
  return false;
#endif
}

// Only reached where device_scalars said yes, so only in a CUDA build.
at::Tensor scale_on_device(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale,
                           bool in_place) {
#if defined(CBFUSED_WITH_CUDA)
  return cuda::scale_grad(grad, g_loss, grad_scale, in_place);
#else
  (void)g_loss, (void)grad_scale, (void)in_place;
  TORCH_INTERNAL_ASSERT(false, "cbfused: the GPU backward scaling in a build without CUDA kernels");
  return grad;
#endif
}

using CbLossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, int64_t, double, double,
                                                                int64_t, int64_t, int64_t, double, int64_t,
                                                                const std::optional<at::Tensor>&,
                                                                const std::optional<at::Tensor>&, double,
                                                                const std::optional<at::Tensor>&);

class CbLossFunction : public torch::autograd::Function<CbLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& class_weight, int64_t loss_type, double gamma, double alpha,
                               int64_t reduction, int64_t ignore_index, int64_t grad_mode,
                               double label_smoothing, int64_t weighting,
                               const std::optional<at::Tensor>& logit_offset,
                               const std::optional<at::Tensor>& margins, double logit_scale,
                               const std::optional<at::Tensor>& class_alpha) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cbfused::cb_loss", "").typed<CbLossFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad, grad_scale] =
        op.call(logits, target, class_weight, loss_type, gamma, alpha, reduction, ignore_index, grad_mode,
                label_smoothing, weighting, logit_offset, margins, logit_scale, class_alpha);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->save_for_backward({grad, grad_scale});
    ctx->mark_non_differentiable({grad, grad_scale});
    ctx->set_materialize_grads(false);
    return {loss, grad, grad_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(15);  // undefined: no gradient for the non-tensor / non-differentiable inputs
    const at::Tensor& g_loss = grads[0];
    if (!g_loss.defined()) return out;
    const int64_t grad_mode = ctx->saved_data["grad_mode"].toInt();
    TORCH_CHECK(grad_mode != 0,
                "cbfused: cb_loss ran with grad_mode=0, so it saved no gradient to backpropagate");
    const auto saved = ctx->get_saved_variables();
    const bool none = ctx->saved_data["reduction"].toInt() == kNone;
    if (!none && host_scalar(g_loss) && host_scalar(saved[1]) && unit_product(g_loss, saved[1])) {
      // loss.backward() where the kernel folded the mean's 1/D into its gradient: the scale
      // is 1, known from the two host scalars without their tensor product (a mul, and for
      // a float16 / bfloat16 loss a cast: 7% of a bfloat16 step at 128 x 10).
      out[0] = unit_scaled_grad(saved[0], grad_mode == 2);
    } else if (!none && device_scalars(saved[0], g_loss, saved[1])) {
      // On the GPU: one kernel forms g_loss * grad_scale on the device and scales the
      // gradient by it in float32 (torch's mul would round the scale to a float16 /
      // bfloat16 gradient's dtype first, and take two launches).
      check_first_order(saved[0]);
      out[0] = scale_on_device(saved[0], g_loss, saved[1], reuse_saved(saved[0], grad_mode == 2));
    } else {
      // reduction 'none': the loss has the logits' shape without the class dimension (1, or
      // 0 for unbatched [C] logits, whose loss is 0-d).
      const at::Tensor scale = !none ? g_loss * saved[1] : saved[0].dim() >= 2 ? g_loss.unsqueeze(1) : g_loss;
      out[0] = scale_saved_grad(saved[0], scale, grad_mode == 2);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cb_loss_autograd(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight, int64_t loss_type,
    double gamma, double alpha, int64_t reduction, int64_t ignore_index, int64_t grad_mode,
    double label_smoothing, int64_t weighting, const std::optional<at::Tensor>& logit_offset,
    const std::optional<at::Tensor>& margins, double logit_scale,
    const std::optional<at::Tensor>& class_alpha) {
  auto r = CbLossFunction::apply(logits, target, class_weight, loss_type, gamma, alpha, reduction,
                                 ignore_index, grad_mode, label_smoothing, weighting, logit_offset, margins,
                                 logit_scale, class_alpha);
  return {r[0], r[1], r[2]};
}

using FocalFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, double, double, int64_t,
                                                   int64_t, int64_t, const std::optional<at::Tensor>&);

class SigmoidFocalFunction : public torch::autograd::Function<SigmoidFocalFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& inputs, const at::Tensor& targets,
                               const std::optional<at::Tensor>& weight, double alpha, double gamma,
                               int64_t reduction, int64_t grad_mode, int64_t weight_dim,
                               const std::optional<at::Tensor>& class_alpha) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("cbfused::sigmoid_focal", "").typed<FocalFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] =
        op.call(inputs, targets, weight, alpha, gamma, reduction, grad_mode, weight_dim, class_alpha);
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const at::Tensor& g_loss = grads[0];
    if (!g_loss.defined()) return out;
    const int64_t grad_mode = ctx->saved_data["grad_mode"].toInt();
    TORCH_CHECK(grad_mode != 0, "cbfused: sigmoid_focal ran with grad_mode=0, so it saved no gradient");
    out[0] = scale_saved_grad(ctx->get_saved_variables()[0], g_loss, grad_mode == 2);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_autograd(const at::Tensor& inputs, const at::Tensor& targets,
                                                          const std::optional<at::Tensor>& weight,
                                                          double alpha, double gamma, int64_t reduction,
                                                          int64_t grad_mode, int64_t weight_dim,
                                                          const std::optional<at::Tensor>& class_alpha) {
  auto r = SigmoidFocalFunction::apply(inputs, targets, weight, alpha, gamma, reduction, grad_mode,
                                       weight_dim, class_alpha);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cbfused, Autograd, m) {
  m.impl("cb_loss", &cb_loss_autograd);
  m.impl("sigmoid_focal", &sigmoid_focal_autograd);
}

}  // namespace cbfused
