// Input validation and output allocation shared by every backend (host only).
// Error messages name the tensor, the problem and the value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace cbfused {

// Logits [N, C, d1, ..., dk] (k >= 0, class dimension 1, as F.cross_entropy) or [C] are
// read in place in one of two layouts (docs/design.md, "Layouts"):
//   rows:   each position's C logits at unit stride, positions at a uniform stride: [N, C]
//           (any row stride), [C], and channels-last [N, C, d...] (NHWC / NDHWC memory);
//   planes: each sample's classes at one stride and its S = d1 * ... * dk positions at
//           unit stride: contiguous NCHW, or any view whose spatial dimensions collapse.
// Other views are copied once to contiguous (planes).
struct CbLossPlan {
  int64_t N = 0;  // positions: rows of the kernels (samples x S)
  int64_t C = 0;
  int64_t S = 0;                    // planes: positions per sample (>= 1); 0: the rows layout
  bool hard = true;                 // integer class targets (else float targets of the logits' shape)
  at::Tensor target;                // int64 [N] contiguous, or floating: [N, C] unit class stride (rows),
                                    // [samples, C, S] unit position stride (planes)
  at::Tensor logits;                // [N, C] unit class stride (rows) or [samples, C, S] (planes)
  at::Tensor weight;                // [C], accumulation dtype, contiguous
  at::Tensor shape_of;              // the logits as given (the gradient takes their shape and layout)
  bool grad_like = false;           // the gradient takes shape_of's strides (dense channels-last)
  std::vector<int64_t> loss_shape;  // reduction 'none': [samples, d1, ..., dk], or [] for [C]
  // Adjusted logits (softmax family): offset and margin [C] in the accumulation type (zeros
  // where not given), both defined when any of the three is on.
  at::Tensor offset, margin;
  double scale = 1;
  at::Tensor alpha_vec;  // per-class alpha [C] in the accumulation type, or undefined
};

// The adjusted-logit arguments of cb_loss (schemas.h).
struct AdjustArgs {
  const std::optional<at::Tensor>& offset;
  const std::optional<at::Tensor>& margins;
  double scale;
  const std::optional<at::Tensor>& class_alpha;  // per-class alpha (focal, sigmoid, softmax focal)
};

// Validates the arguments of cbfused::cb_loss and normalises the layouts the
// kernels accept (unit stride along classes, int64 targets, weights in the
// accumulation type).
// label_smoothing / weighting: softmax cross-entropy's options (schemas.h), checked here.
CbLossPlan check_cb_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight,
                         int64_t loss_type, double gamma, double alpha, int64_t reduction,
                         double label_smoothing = 0, int64_t weighting = 0,
                         const AdjustArgs* adjust = nullptr);

// The op's outputs: loss ([] or loss_shape), grad (the logits' shape, or [0]), inv_norm ([]).
struct CbLossOutputs {
  at::Tensor loss;
  at::Tensor grad;
  at::Tensor inv_norm;
};
CbLossOutputs alloc_cb_loss(const CbLossPlan& plan, int64_t reduction, bool compute_grad);

struct FocalPlan {
  at::Tensor inputs;     // contiguous
  at::Tensor targets;    // contiguous, same shape and dtype
  at::Tensor weight;     // [K] in the accumulation type, or undefined
  at::Tensor alpha_vec;  // [K] per-class alpha in the accumulation type, or undefined
  int64_t row = 1;       // the last dimension, 1 for a 0-d input: the CPU kernel's rows
  int64_t rows = 0;      // numel / row
  // The weight's dimension (weight_dim): K classes, `inner` elements apart (the product of
  // the sizes after it): element e has class (e / inner) % K. inner = 1: the last dimension.
  int64_t K = 1;
  int64_t inner = 1;
};

FocalPlan check_sigmoid_focal(const at::Tensor& inputs, const at::Tensor& targets,
                              const std::optional<at::Tensor>& weight, double alpha, double gamma,
                              int64_t reduction, int64_t weight_dim,
                              const std::optional<at::Tensor>& class_alpha = std::nullopt);

std::string shape_str(const at::Tensor& t);

// grad_mode of the ops' schemas: 0 (none), 1 or 2 (compute the gradient).
bool check_grad_mode(int64_t grad_mode);

// The errors of a bad target, raised where the kernels find it (name the value, the sample
// and the allowed range).
[[noreturn]] inline void target_out_of_range(int64_t y, int64_t C, int64_t i, int64_t ignore_index) {
  TORCH_CHECK(false, "cbfused: target ", y, " is out of range for ", C, " classes (sample ", i,
              "); class indices must be in [0, ", C, ") or equal ignore_index (", ignore_index, ")");
}

template <typename acc_t>
[[noreturn]] inline void float_target_out_of_range(acc_t v, int64_t i) {
  TORCH_CHECK(v == v, "cbfused: float target nan in row ", i,
              " is outside [0, 1]; float targets are multi-hot labels or class probabilities");
  TORCH_CHECK(false, "cbfused: float target ", v, " in row ", i,
              " is outside [0, 1]; float targets are multi-hot labels or class probabilities");
}

// The accumulation type of a float dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_type_of(at::ScalarType s);

// `like`'s options with its accumulation type.
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_type_of(like.scalar_type()));
}

}  // namespace cbfused
