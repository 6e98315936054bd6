// cbfused::sigmoid_focal on CUDA (torchvision.ops.sigmoid_focal_loss semantics with an
// optional per-class weight): its elementwise kernel, host entry and registration.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>

#include "cbfused/checks.h"
#include "cbfused/kinds.h"
#include "cbfused/math.h"
#include "cuda/row_kernel.cuh"
#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {
namespace {

constexpr int64_t kMaxFocalBlocks = 1024;  // fixed: the reduction order does not depend on the GPU

// torchvision.ops.sigmoid_focal_loss semantics, elementwise over the flattened input
// (grid-stride, 128-bit packs where x, t and the outputs share their alignment). w: the
// per-class weight, av: the per-class alpha (then alpha < 0), each [classes] or null.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock, 2)
    focal_elementwise_kernel(const scalar_t* x, const scalar_t* t, const at::opmath_type<scalar_t>* w,
                             const at::opmath_type<scalar_t>* av, int64_t classes, int64_t inner,
                             int64_t numel, at::opmath_type<scalar_t> gamma, at::opmath_type<scalar_t> alpha,
                             at::opmath_type<scalar_t> grad_scale, scalar_t* loss_out, scalar_t* grad,
                             at::opmath_type<scalar_t>* block_part) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t smem[kBlock / kWarp];
  acc_t part = 0;
  const Split sp = split_span<scalar_t>(numel, x, t, loss_out, grad);
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kBlock;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  for_each_group_strided<scalar_t>(sp, numel, lane, threads, [&](auto width, int64_t i) {
    constexpr int K = decltype(width)::value;
    acc_t xv[K], tv[K], lv[K], gv[K];
    load<K>(x + i, xv);
    load<K>(t + i, tv);
    // element i's class: (i / inner) % classes (inner = 1: the last dimension)
    const bool per_class = w || av;
    int64_t c = per_class ? (i / inner) % classes : 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t l, d;
      torchvision_focal_term<true>(xv[k], tv[k], gamma, l, d);
      acc_t scale = alpha_t(tv[k], alpha);
      if (per_class) {
        if (inner != 1) c = ((i + k) / inner) % classes;
        if (av) scale = alpha_t_of(tv[k], av[c]);
        if (w) scale *= w[c];
        c = c + 1 == classes ? 0 : c + 1;
      }
      lv[k] = l * scale;
      gv[k] = d * scale * grad_scale;
      part += lv[k];
    }
    if (loss_out) store<K>(loss_out + i, lv);
    if (grad) store<K>(grad + i, gv);
  });
  part = RowReduce<kBlock>::sum(part, smem);
  if (threadIdx.x == 0) block_part[blockIdx.x] = part;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_cuda(const at::Tensor& inputs, const at::Tensor& targets,
                                                      const std::optional<at::Tensor>& weight, double alpha,
                                                      double gamma, int64_t reduction, int64_t grad_mode,
                                                      int64_t weight_dim,
                                                      const std::optional<at::Tensor>& class_alpha) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const FocalPlan plan =
      check_sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction, weight_dim, class_alpha);
  const DeviceGuard guard(inputs.device());
  const auto opts = inputs.options();
  at::Tensor loss = reduction == kNone ? at::empty(inputs.sizes(), opts) : at::empty({}, opts);
  at::Tensor grad = compute_grad ? at::empty(inputs.sizes(), opts) : at::empty({0}, opts);
  const int64_t numel = inputs.numel();
  const double scale = reduction == kMean ? (numel > 0 ? 1.0 / static_cast<double>(numel) : 0.0) : 1.0;
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, inputs.scalar_type(), "cbfused_sigmoid_focal_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t blocks = std::clamp<int64_t>((numel + kBlock - 1) / kBlock, 1, kMaxFocalBlocks);
        at::Tensor part = at::empty({blocks}, acc_options(inputs));
        launch_kernel(
            focal_elementwise_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(kBlock), 0, stream,
            plan.inputs.const_data_ptr<scalar_t>(), plan.targets.const_data_ptr<scalar_t>(),
            plan.weight.defined() ? plan.weight.const_data_ptr<acc_t>() : nullptr,
            plan.alpha_vec.defined() ? plan.alpha_vec.const_data_ptr<acc_t>() : nullptr, plan.K, plan.inner,
            numel, static_cast<acc_t>(gamma), static_cast<acc_t>(alpha),
            static_cast<acc_t>(reduction == kNone ? 1.0 : scale),
            reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr,
            compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr, part.mutable_data_ptr<acc_t>());
        if (reduction != kNone) {
          launch_kernel(finish_kernel<scalar_t, acc_t>, dim3(1), dim3(kFinishBlock), 0, stream,
                        part.const_data_ptr<acc_t>(), static_cast<const acc_t*>(nullptr), blocks, false,
                        static_cast<acc_t>(scale), loss.mutable_data_ptr<scalar_t>(),
                        static_cast<acc_t*>(nullptr));
        }
      });
  return {loss, grad};
}

}  // namespace

#if defined(__CUDACC__)
TORCH_LIBRARY_IMPL(cbfused, CUDA, m) { m.impl("sigmoid_focal", &sigmoid_focal_cuda); }
#else
TORCH_LIBRARY_IMPL(cbfused_emu, CPU, m) { m.impl("sigmoid_focal", &sigmoid_focal_cuda); }
#endif

}  // namespace cuda
}  // namespace cbfused
