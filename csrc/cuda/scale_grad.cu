// The CUDA backward's scale step (cbfused/scale_grad.h): the saved gradient times
// grad_output * grad_scale, both read on the device, rounded once per element. Called by
// csrc/autograd.cpp; in the emulation build registered as torch.ops.cbfused_emu.scale_grad.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <torch/library.h>

#include <algorithm>

#include "cbfused/checks.h"
#include "cbfused/scale_grad.h"
#include "cuda/row_kernel.cuh"
#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {
namespace {

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

#if !defined(__CUDACC__)
TORCH_LIBRARY_IMPL(cbfused_emu, CPU, m) { m.impl("scale_grad", &scale_grad); }
#endif

}  // namespace cuda
}  // namespace cbfused
