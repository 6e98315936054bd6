// The host side of the CUDA ops: on the current stream, with a device guard, no host
// synchronisation (normalisers stay on the device) and no float atomics.
// Under nvcc: TORCH_LIBRARY_IMPL(cbfused, CUDA). Under a host compiler (csrc/emulated/)
// the same code runs the kernels in the CPU emulation of cuda/emulator.h and registers
// them as torch.ops.cbfused_emu on CPU tensors, for the tests.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>

#include "cbfused/checks.h"
#include "cbfused/scale_grad.h"
#include "cbfused/schemas.h"
#include "cuda/launch.cuh"
#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {
namespace {

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cb_loss_cuda(const at::Tensor& logits,
                                                            const at::Tensor& target,
                                                            const at::Tensor& class_weight, int64_t loss_type,
                                                            double gamma, double alpha, int64_t reduction,
                                                            int64_t ignore_index, int64_t grad_mode) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const CbLossPlan plan = check_cb_loss(logits, target, class_weight, loss_type, gamma, alpha, reduction);
  const DeviceGuard guard(plan.logits.device());
  CbLossOutputs out = alloc_cb_loss(plan, reduction, compute_grad);
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, plan.logits.scalar_type(), "cbfused_cb_loss_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor row_loss = at::empty({plan.N}, acc_options<acc_t>(plan.logits));
        at::Tensor row_denom = at::empty({plan.N}, acc_options<acc_t>(plan.logits));
        RowArgs<scalar_t> a =
            make_row_args<scalar_t>(plan, out, gamma, alpha, reduction, ignore_index, compute_grad);
        a.row_loss = row_loss.mutable_data_ptr<acc_t>();
        a.row_denom = row_denom.mutable_data_ptr<acc_t>();
        if (is_softmax_family(loss_type)) {
          launch_family<scalar_t, kSoftmax, kSoftmaxFocal>(a, loss_type, plan.hard, stream);
        } else {
          launch_family<scalar_t, kSigmoid, kFocal>(a, loss_type, plan.hard, stream);
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

constexpr int64_t kMaxFocalBlocks = 1024;  // fixed: the reduction order does not depend on the GPU

// torchvision.ops.sigmoid_focal_loss semantics, elementwise over the flattened input
// (grid-stride, 128-bit packs where x, t and the outputs share their alignment).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock, 2)
    focal_elementwise_kernel(const scalar_t* x, const scalar_t* t, const at::opmath_type<scalar_t>* w,
                             int64_t classes, int64_t numel, at::opmath_type<scalar_t> gamma,
                             at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> grad_scale,
                             scalar_t* loss_out, scalar_t* grad, at::opmath_type<scalar_t>* block_part) {
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
    int64_t c = w ? i % classes : 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t l, d;
      torchvision_focal_term<true>(xv[k], tv[k], gamma, l, d);
      acc_t scale = alpha_t(tv[k], alpha);
      if (w) {
        scale *= w[c];
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
                                                      double gamma, int64_t reduction, int64_t grad_mode) {
  const bool compute_grad = check_grad_mode(grad_mode);
  const FocalPlan plan = check_sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction);
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
        at::Tensor part = at::empty({blocks}, acc_options<acc_t>(inputs));
        launch_kernel(
            focal_elementwise_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(kBlock), 0, stream,
            plan.inputs.const_data_ptr<scalar_t>(), plan.targets.const_data_ptr<scalar_t>(),
            plan.weight.defined() ? plan.weight.const_data_ptr<acc_t>() : nullptr, plan.K, numel,
            static_cast<acc_t>(gamma), static_cast<acc_t>(alpha),
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

// out = in * (g_loss * grad_scale): the scalars' product in acc_t, one rounding per element.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    scale_grad_kernel(const scalar_t* in, scalar_t* out, int64_t n, const scalar_t* g_loss,
                      const at::opmath_type<scalar_t>* grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(*g_loss) * *grad_scale;
  const Split sp = split_span<scalar_t>(n, in, out);
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kBlock;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  for_each_group_strided<scalar_t>(sp, n, lane, threads, [&](auto width, int64_t i) {
    constexpr int K = decltype(width)::value;
    acc_t v[K];
    load<K>(in + i, v);
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] *= s;
    store<K>(out + i, v);
  });
}

constexpr int64_t kMaxScaleBlocks = 4096;  // grid-stride beyond (about 30 blocks per SM)

}  // namespace

bool scale_grad_applies(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale) {
  return grad.is_contiguous() && g_loss.numel() == 1 && grad_scale.numel() == 1 &&
         g_loss.scalar_type() == grad.scalar_type() &&
         grad_scale.scalar_type() == acc_type_of(grad.scalar_type()) && g_loss.device() == grad.device() &&
         grad_scale.device() == grad.device();
}

at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& g_loss, const at::Tensor& grad_scale,
                      bool in_place) {
  TORCH_CHECK(scale_grad_applies(grad, g_loss, grad_scale),
              "cbfused: scale_grad got operands it does not take: ", grad.scalar_type(), " grad on ",
              grad.device(), ", ", g_loss.scalar_type(), " grad_output of ", g_loss.numel(), " elements on ",
              g_loss.device(), ", ", grad_scale.scalar_type(), " scale on ", grad_scale.device());
  const DeviceGuard guard(grad.device());
  at::Tensor out = in_place ? grad : at::empty_like(grad);
  const int64_t n = grad.numel();
  if (n == 0) return out;
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "cbfused_scale_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const int64_t groups = n / kVec<scalar_t> + kVec<scalar_t>;
        const int64_t blocks = std::clamp<int64_t>((groups + kBlock - 1) / kBlock, 1, kMaxScaleBlocks);
        launch_kernel(scale_grad_kernel<scalar_t>, dim3(static_cast<unsigned>(blocks)), dim3(kBlock), 0,
                      stream, grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
                      g_loss.const_data_ptr<scalar_t>(), grad_scale.const_data_ptr<acc_t>());
      });
  return out;
}

#if defined(__CUDACC__)
TORCH_LIBRARY_IMPL(cbfused, CUDA, m) {
  m.impl("cb_loss", &cb_loss_cuda);
  m.impl("sigmoid_focal", &sigmoid_focal_cuda);
}
#else
TORCH_LIBRARY(cbfused_emu, m) {
  m.def(kCbLossSchema);
  m.def(kSigmoidFocalSchema);
  m.def("scale_grad(Tensor grad, Tensor g_loss, Tensor grad_scale, bool in_place) -> Tensor");
}
TORCH_LIBRARY_IMPL(cbfused_emu, CPU, m) {
  m.impl("cb_loss", &cb_loss_cuda);
  m.impl("sigmoid_focal", &sigmoid_focal_cuda);
  m.impl("scale_grad", &scale_grad);
}
#endif

}  // namespace cuda
}  // namespace cbfused
