#include "cbfused/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>

#include "cbfused/math.h"

namespace cbfused {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool check_grad_mode(int64_t grad_mode) {
  TORCH_CHECK(grad_mode >= 0 && grad_mode <= 2, "cbfused: grad_mode must be 0, 1 or 2, got ", grad_mode);
  return grad_mode > 0;
}

at::ScalarType acc_type_of(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// Unit stride along the class dimension; any row stride (e.g. a column slice of a
// wider tensor) is read in place.
at::Tensor unit_class_stride(const at::Tensor& t) {
  if (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= 0) return t;
  return t.contiguous();
}

void check_common(double gamma, int64_t reduction) {
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0, "cbfused: gamma must be a finite number >= 0, got ", gamma);
  TORCH_CHECK(valid_reduction(reduction), "cbfused: unknown reduction code ", reduction);
}

// Class weights in the accumulation type, contiguous. A CPU tensor of another floating type
// (ClassBalancedLoss keeps its weights in float64) is converted by a plain loop into a
// fresh buffer: at::Tensor::to's copy machinery cost 1 to 2 us a call, a tenth of a whole
// forward+backward at 128 x 10.
at::Tensor weights_as(const at::Tensor& w, at::ScalarType acc) {
  if (w.scalar_type() == acc && w.is_contiguous()) return w;
  if (!w.is_cpu()) return w.to(acc).contiguous();
  at::Tensor out = at::empty({w.size(0)}, w.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "cbfused_weights", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    const int64_t n = w.size(0), stride = w.stride(0);
    if (acc == at::kDouble) {
      double* dst = out.mutable_data_ptr<double>();
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<double>(src[k * stride]);
    } else {
      float* dst = out.mutable_data_ptr<float>();
      for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(src[k * stride]);
    }
  });
  return out;
}

}  // namespace

namespace {

// t [samples, C, d1, ..., dk] as [samples, C, S] with unit position stride: a view when the
// spatial dimensions collapse into one of unit stride, else a contiguous copy.
at::Tensor as_planes(const at::Tensor& t, int64_t samples, int64_t C, int64_t S) {
  int64_t expected = 1;
  bool collapses = true;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) {
      collapses = false;
      break;
    }
    expected *= t.size(d);
  }
  if (collapses && t.stride(0) >= 0 && t.stride(1) >= 0)
    return t.as_strided({samples, C, S}, {t.stride(0), t.stride(1), 1}, t.storage_offset());
  return t.contiguous().view({samples, C, S});
}

// [samples, C, d...] stored as [samples, d..., C] rows (channels-last and its k-D kin).
bool dense_channels_last(const at::Tensor& t) { return t.stride(1) == 1 && t.movedim(1, -1).is_contiguous(); }

}  // namespace

namespace {

// A [C] per-class tensor of the adjusted logits, in the accumulation type; zeros if absent.
at::Tensor per_class(const std::optional<at::Tensor>& t, const char* name, const CbLossPlan& plan,
                     const at::Tensor& logits) {
  const auto acc = acc_type_of(logits.scalar_type());
  if (!t.has_value() || !t->defined()) return at::zeros({plan.C}, logits.options().dtype(acc));
  TORCH_CHECK(t->device() == logits.device(), "cbfused: ", name, " is on ", t->device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == plan.C, "cbfused: ", name, " must have shape [", plan.C,
              "] (one per class), got ", shape_str(*t));
  TORCH_CHECK(t->is_floating_point(), "cbfused: ", name, " must be floating point, got ", t->scalar_type());
  return weights_as(*t, acc);
}

void check_adjust(CbLossPlan& plan, const AdjustArgs& adj, const at::Tensor& logits, int64_t loss_type,
                  double alpha) {
  if (adj.class_alpha.has_value() && adj.class_alpha->defined()) {
    TORCH_CHECK(
        loss_kind(loss_type).alpha || loss_type == kSoftmaxFocal,
        "cbfused: a per-class alpha applies to the focal and sigmoid losses and softmax_focal, not to '",
        loss_kind(loss_type).name, "'");
    TORCH_CHECK(alpha < 0, "cbfused: give alpha as a number or as a per-class tensor, not both");
    plan.alpha_vec = per_class(adj.class_alpha, "class_alpha", plan, logits);
  }
  const bool offset = adj.offset.has_value() && adj.offset->defined();
  const bool margins = adj.margins.has_value() && adj.margins->defined();
  TORCH_CHECK(std::isfinite(adj.scale) && adj.scale > 0,
              "cbfused: logit_scale must be a finite number > 0, got ", adj.scale);
  if (!offset && !margins && adj.scale == 1) return;
  TORCH_CHECK(is_softmax_family(loss_type),
              "cbfused: logit adjustment, margins and logit_scale apply to the softmax losses only, not to '",
              loss_kind(loss_type).name, "'");
  TORCH_CHECK(
      !margins || plan.hard,
      "cbfused: margins apply to class-index targets only (the margin is on the target class's logit)");
  plan.offset = per_class(adj.offset, "logit_offset", plan, logits);
  plan.margin = per_class(adj.margins, "margins", plan, logits);
  plan.scale = adj.scale;
}

}  // namespace

CbLossPlan check_cb_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight,
                         int64_t loss_type, double gamma, double alpha, int64_t reduction,
                         double label_smoothing, int64_t weighting, const AdjustArgs* adjust) {
  TORCH_CHECK(valid_loss_type(loss_type), "cbfused: unknown loss type code ", loss_type);
  TORCH_CHECK(valid_weighting(weighting), "cbfused: unknown weighting code ", weighting);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "cbfused: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(weighting == kSampleWeighting || is_softmax_family(loss_type),
              "cbfused: weighting='class' applies to the softmax losses only, got loss_type '",
              loss_kind(loss_type).name, "'");
  check_common(gamma, reduction);
  TORCH_CHECK(std::isfinite(alpha) && alpha <= 1,
              "cbfused: alpha must be in [0, 1] (or negative to disable), got ", alpha);
  TORCH_CHECK(logits.dim() >= 1,
              "cbfused: logits must be [N, C, d1, ..., dk] (class dimension 1) or [C], got a 0-d tensor");
  TORCH_CHECK(is_supported_float(logits.scalar_type()),
              "cbfused: logits must be float16, bfloat16, float32 or float64, got ", logits.scalar_type());
  const bool unbatched = logits.dim() == 1;
  const int64_t samples = unbatched ? 1 : logits.size(0);
  CbLossPlan plan;
  plan.C = unbatched ? logits.size(0) : logits.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) S *= logits.size(d);
  plan.N = samples * S;
  TORCH_CHECK(plan.C >= 1, "cbfused: logits need at least one class, got shape ", shape_str(logits));
  TORCH_CHECK(target.device() == logits.device(), "cbfused: target is on ", target.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(class_weight.device() == logits.device(), "cbfused: class weights are on ",
              class_weight.device(), " but logits are on ", logits.device(),
              " (build them on the logits' device, or use ClassBalancedLoss, which moves with .to())");
  TORCH_CHECK(class_weight.dim() == 1 && class_weight.size(0) == plan.C,
              "cbfused: class weights must have shape [", plan.C, "] (one per class), got ",
              shape_str(class_weight), " for logits of shape ", shape_str(logits),
              " (classes along dimension ", unbatched ? 0 : 1, ")");
  TORCH_CHECK(class_weight.is_floating_point(), "cbfused: class weights must be floating point, got ",
              class_weight.scalar_type());

  // reduction 'none' (and a class-index target): the logits' shape without the class dimension
  if (!unbatched) {
    plan.loss_shape.push_back(samples);
    for (int64_t d = 2; d < logits.dim(); ++d) plan.loss_shape.push_back(logits.size(d));
  }
  // The layout the kernels read (see CbLossPlan).
  plan.shape_of = logits;
  const bool spatial = logits.dim() >= 3 && S != 1;
  const bool rows_cl = spatial && plan.C > 1 && plan.N > 0 && dense_channels_last(logits);
  if (logits.dim() == 2) {  // no view of a view: a new tensor costs ~1 us, a tenth of a 128 x 10 step
    plan.logits = unit_class_stride(logits);
  } else if (!spatial) {
    plan.logits = unit_class_stride(logits.reshape({samples, plan.C}));
  } else if (rows_cl) {
    plan.logits = logits.movedim(1, -1).view({plan.N, plan.C});
    plan.grad_like = true;
  } else {
    plan.S = S;
    plan.logits = as_planes(logits, samples, plan.C, S);
  }

  const auto ts = target.scalar_type();
  if (ts == at::kLong || ts == at::kInt) {
    plan.hard = true;
    TORCH_CHECK(target.sizes() == at::IntArrayRef(plan.loss_shape),
                "cbfused: class-index target must have shape ", at::IntArrayRef(plan.loss_shape),
                " for logits of shape ", shape_str(logits), ", got ", shape_str(target),
                " (the logits' shape without the class dimension, 1)");
    plan.target = (ts == at::kLong ? target : target.to(at::kLong)).contiguous();
    if (plan.target.dim() != 1) plan.target = plan.target.view({plan.N});
  } else if (target.is_floating_point()) {
    plan.hard = false;
    TORCH_CHECK(target.sizes() == logits.sizes(),
                "cbfused: float (multi-hot / soft) target must have the logits' shape ", shape_str(logits),
                ", got ", shape_str(target));
    TORCH_CHECK(ts == logits.scalar_type(), "cbfused: float target dtype ", ts,
                " does not match the logits' dtype ", logits.scalar_type());
    if (logits.dim() == 2) {
      plan.target = unit_class_stride(target);
    } else if (!spatial) {
      plan.target = unit_class_stride(target.reshape({samples, plan.C}));
    } else if (rows_cl) {
      plan.target = target.movedim(1, -1).reshape({plan.N, plan.C});
    } else {
      plan.target = as_planes(target, samples, plan.C, S);
    }
  } else {
    TORCH_CHECK(false,
                "cbfused: target must be int64 / int32 class indices or a float tensor of the logits' shape, "
                "got dtype ",
                ts);
  }
  plan.weight = weights_as(class_weight, acc_type_of(logits.scalar_type()));
  if (adjust) check_adjust(plan, *adjust, logits, loss_type, alpha);
  return plan;
}

CbLossOutputs alloc_cb_loss(const CbLossPlan& plan, int64_t reduction, bool compute_grad) {
  const auto opts = plan.logits.options();
  CbLossOutputs out;
  out.loss = reduction == kNone ? at::empty(plan.loss_shape, opts) : at::empty({}, opts);
  if (!compute_grad) {
    out.grad = at::empty({0}, opts);
  } else if (plan.grad_like) {
    out.grad = at::empty_strided(plan.shape_of.sizes(), plan.shape_of.strides(), opts);
  } else {
    out.grad = at::empty(plan.shape_of.sizes(), opts);  // contiguous: rows [N, C] or planes
  }
  out.inv_norm = at::empty({}, opts.dtype(acc_type_of(plan.logits.scalar_type())));
  return out;
}

FocalPlan check_sigmoid_focal(const at::Tensor& inputs, const at::Tensor& targets,
                              const std::optional<at::Tensor>& weight, double alpha, double gamma,
                              int64_t reduction, int64_t weight_dim,
                              const std::optional<at::Tensor>& class_alpha) {
  check_common(gamma, reduction);
  TORCH_CHECK(!(alpha > 1) && alpha == alpha,
              "cbfused: alpha must be in [0, 1] (or negative to disable it), got ", alpha);
  TORCH_CHECK(reduction != kWeightedMean, "cbfused: sigmoid_focal_loss takes reduction none, sum or mean");
  TORCH_CHECK(is_supported_float(inputs.scalar_type()),
              "cbfused: inputs must be float16, bfloat16, float32 or float64, got ", inputs.scalar_type());
  TORCH_CHECK(targets.sizes() == inputs.sizes(), "cbfused: targets must have the inputs' shape ",
              shape_str(inputs), ", got ", shape_str(targets));
  TORCH_CHECK(targets.device() == inputs.device(), "cbfused: targets are on ", targets.device(),
              " but inputs are on ", inputs.device());
  TORCH_CHECK(targets.scalar_type() == inputs.scalar_type(), "cbfused: targets dtype ", targets.scalar_type(),
              " does not match the inputs' dtype ", inputs.scalar_type());
  FocalPlan plan;
  plan.inputs = inputs.contiguous();
  plan.targets = targets.contiguous();
  plan.row = inputs.dim() == 0 ? 1 : inputs.size(-1);
  plan.rows = plan.row == 0 ? 0 : inputs.numel() / plan.row;
  plan.K = plan.row;
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_alpha = class_alpha.has_value() && class_alpha->defined();
  if (!has_weight && !has_alpha) return plan;
  const int64_t nd = std::max<int64_t>(inputs.dim(), 1);
  TORCH_CHECK(weight_dim >= -nd && weight_dim < nd, "cbfused: weight dim ", weight_dim,
              " is out of range for inputs of shape ", shape_str(inputs), " (expected in [", -nd, ", ",
              nd - 1, "])");
  if (inputs.dim() > 0) {
    const int64_t d = weight_dim < 0 ? weight_dim + inputs.dim() : weight_dim;
    plan.K = inputs.size(d);
    plan.inner = 1;
    for (int64_t k = d + 1; k < inputs.dim(); ++k) plan.inner *= inputs.size(k);
  }
  // a [K] tensor along weight_dim, in the accumulation type
  auto per_class = [&](const at::Tensor& w, const char* name) {
    TORCH_CHECK(w.device() == inputs.device(), "cbfused: ", name, " is on ", w.device(),
                " but inputs are on ", inputs.device());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == plan.K, "cbfused: ", name, " must have shape [", plan.K,
                "] (one per class, the inputs' ",
                weight_dim == -1 ? std::string("last dimension") : "dimension " + std::to_string(weight_dim),
                "), got ", shape_str(w), " for inputs of shape ", shape_str(inputs));
    TORCH_CHECK(w.is_floating_point(), "cbfused: ", name, " must be floating point, got ", w.scalar_type());
    return weights_as(w, acc_type_of(inputs.scalar_type()));
  };
  if (has_weight) plan.weight = per_class(*weight, "weight");
  if (has_alpha) {
    TORCH_CHECK(alpha < 0, "cbfused: give alpha as a number or as a per-class tensor, not both");
    plan.alpha_vec = per_class(*class_alpha, "class_alpha");
  }
  return plan;
}

}  // namespace cbfused
