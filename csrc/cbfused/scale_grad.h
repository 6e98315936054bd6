// The backward's one elementwise step on the GPU: the saved logit-gradient times
// grad_output * grad_scale. torch's `grad * (g_loss * grad_scale)` on CUDA would first
// round the float32 scale to a float16 / bfloat16 gradient's dtype (a CUDA 0-dim tensor
// is an operand, not a host scalar); this kernel forms the product of the two device
// scalars in float32 (float64 for float64 logits) and rounds each element once, as the
// CPU path does, and reads both scalars on the device (no host sync). Defined in
// cuda/scale_grad.cu.
#pragma once

#include <ATen/core/Tensor.h>

namespace cbfused {
namespace cuda {

// grad: the contiguous saved gradient (any float dtype); g_loss: a one-element tensor of
// grad's dtype; grad_scale: a one-element tensor of grad's accumulation type; all on one
// GPU. Returns grad scaled in place when in_place, else a new tensor.
at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale,
                      bool in_place);

// Whether scale_grad takes these operands (else the caller uses torch's ops).
bool scale_grad_applies(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale);

}  // namespace cuda
}  // namespace cbfused
