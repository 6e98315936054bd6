// cbfused::cb_loss on CUDA: the host entry (on the current stream, with a device guard, no
// host synchronisation: the normalisers stay on the device, and no float atomics) and its
// registration. The row kernels are row_kernel.cuh, instantiated per family in softmax.cu
// and sigmoid.cu. Under a host compiler (csrc/emulated/) the same code runs the kernels in
// the CPU emulation of cuda/emulator.h and registers them as torch.ops.cbfused_emu.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>

#include "cbfused/checks.h"
#include "cbfused/kinds.h"
#include "cuda/launch.cuh"
#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cb_loss_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& class_weight, int64_t loss_type,
    double gamma, double alpha, int64_t reduction, int64_t ignore_index, int64_t grad_mode,
    double label_smoothing, int64_t weighting, const std::optional<at::Tensor>& logit_offset,
    const std::optional<at::Tensor>& margins, double logit_scale,
    const std::optional<at::Tensor>& class_alpha) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const AdjustArgs adjust{logit_offset, margins, logit_scale, class_alpha};
  const CbLossPlan plan = check_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction,
                                        label_smoothing, weighting, &adjust);
  const Smoothing sm{label_smoothing, weighting == kClassWeighting};
  const DeviceGuard guard(plan.logits.device());
  CbLossOutputs out = alloc_cb_loss(plan, reduction, compute_grad);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.logits.scalar_type(), "cbfused_cb_loss_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor row_loss = at::empty({plan.N}, acc_options(plan.logits));
        at::Tensor row_denom = at::empty({plan.N}, acc_options(plan.logits));
        RowArgs<scalar_t> a =
            make_row_args<scalar_t>(plan, out, gamma, alpha, reduction, ignore_index, compute_grad);
        a.row_loss = row_loss.mutable_data_ptr<acc_t>();
        a.row_denom = row_denom.mutable_data_ptr<acc_t>();
        const Planes pl = make_planes(plan);
        if (is_softmax_family(loss_type)) {
          launch_family<scalar_t, kSoftmax, kSoftmaxFocal>(a, pl, sm, make_adjust<acc_t>(plan), loss_type,
                                                           plan.hard, stream);
        } else {
          launch_family<scalar_t, kSigmoid, kFocal>(a, pl, sm, make_adjust<acc_t>(plan), loss_type, plan.hard,
                                                    stream);
        }
        if (reduction == kNone) {
          out.inv_norm.fill_(1);
        } else {
          const bool mean = reduction == kMean || reduction == kWeightedMean;
          launch_kernel(finish_kernel<scalar_t, acc_t>, dim3(1), dim3(kFinishBlock), 0, stream,
                        static_cast<const acc_t*>(a.row_loss), static_cast<const acc_t*>(a.row_denom), plan.N,
                        mean, acc_t(1), out.loss.mutable_data_ptr<scalar_t>(),
                        out.inv_norm.mutable_data_ptr<acc_t>());
        }
      });
  return {out.loss, out.grad, out.inv_norm};
}

}  // namespace

#if defined(__CUDACC__)
TORCH_LIBRARY_IMPL(cbfused, CUDA, m) { m.impl("cb_loss", &cb_loss_cuda); }
#else
TORCH_LIBRARY_IMPL(cbfused_emu, CPU, m) { m.impl("cb_loss", &cb_loss_cuda); }
#endif

}  // namespace cuda
}  // namespace cbfused
