// The op schemas of the cbfused library, written once: csrc/library.cpp defines them for
// torch.ops.cbfused, and the CUDA emulation build (csrc/emulated/) for
// torch.ops.cbfused_emu.
#pragma once

namespace cbfused {

// Class-balanced loss. Returns (loss, grad, grad_scale): loss is [] or [N] (reduction
// 'none'); grad ([N, C] when grad_mode > 0, else [0]) times grad_scale ([]) is
// d(loss)/d(logits). grad_mode and grad_scale: docs/design.md, "The gradient hand-off".
// label_smoothing (every loss type) and weighting (kinds.h, Weighting; the softmax family):
// label smoothing and the class-weighting rule (docs/losses.md). logit_offset [C], margins [C] and
// logit_scale: the softmax family's adjusted logits s x + b - s Delta_y (math.h, adjusted_logit). class_alpha
// [C]: a per-class alpha (math.h, alpha_t_of) in place of the scalar alpha.
constexpr const char* kCbLossSchema =
    "cb_loss(Tensor logits, Tensor target, Tensor class_weight, int loss_type, float gamma, "
    "float alpha, int reduction, int ignore_index, int grad_mode, float label_smoothing=0., "
    "int weighting=0, Tensor? logit_offset=None, Tensor? margins=None, float logit_scale=1., "
    "Tensor? class_alpha=None) -> (Tensor, Tensor, Tensor)";

// cb_loss with the gradient written over the logits, which must be a contiguous [N, C]
// tensor: the fused linear path's chunk of logits becomes its gradient, with no second
// chunk-sized buffer. Returns (loss, grad_scale) as cb_loss (grad_mode 1). CPU only.
constexpr const char* kCbLossInplaceSchema =
    "cb_loss_(Tensor(a!) logits, Tensor target, Tensor class_weight, int loss_type, float gamma, "
    "float alpha, int reduction, int ignore_index, float label_smoothing=0., int weighting=0, "
    "Tensor? logit_offset=None, Tensor? margins=None, float logit_scale=1., Tensor? class_alpha=None) "
    "-> (Tensor, Tensor)";

// torchvision.ops.sigmoid_focal_loss semantics with an optional per-class weight.
// weight_dim: the inputs' dimension the weight (and class_alpha) runs along (-1: the last).
// class_alpha [K]: a per-class alpha (math.h, alpha_t_of) in place of the scalar alpha.
// Returns (loss, grad): grad already carries the mean's 1/numel. grad_mode as above.
constexpr const char* kSigmoidFocalSchema =
    "sigmoid_focal(Tensor inputs, Tensor targets, Tensor? weight, float alpha, float gamma, "
    "int reduction, int grad_mode, int weight_dim=-1, Tensor? class_alpha=None) -> (Tensor, Tensor)";

// acc += src, acc float32 and src float32 / bfloat16 / float16 of acc's shape, without a
// float32 copy of src (the fused linear path's weight-gradient accumulator). CPU only: on
// CUDA torch's add_ converts on the fly.
constexpr const char* kAccumulateSchema = "accumulate_(Tensor(a!) acc, Tensor src) -> ()";

}  // namespace cbfused
