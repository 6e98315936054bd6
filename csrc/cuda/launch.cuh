// Launchers of the row kernel, split by loss family into separate compile units
// (softmax.cu, sigmoid.cu) so that they compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "cuda/row_kernel.cuh"

namespace cbfused {
namespace cuda {

// Rows up to this many classes get a warp each; longer rows a block of kBlock threads.
constexpr int64_t kWarpRowMaxC = 1024;

template <typename scalar_t, int kLoss, bool kHard>
void launch_rows(const RowArgs<scalar_t>& a, cudaStream_t stream) {
  if (a.N == 0) return;
  if (a.C <= kWarpRowMaxC) {
    constexpr int kRows = kBlock / kWarp;
    const int64_t blocks = (a.N + kRows - 1) / kRows;
    cb_row_kernel<scalar_t, kLoss, kHard, kWarp><<<blocks, kBlock, 0, stream>>>(a);
  } else {
    cb_row_kernel<scalar_t, kLoss, kHard, kBlock><<<a.N, kBlock, 0, stream>>>(a);
  }
}

// One loss family (kA or kB, hard or float targets); instantiated in softmax.cu and sigmoid.cu.
template <typename scalar_t, int kA, int kB>
void launch_family(const RowArgs<scalar_t>& a, int64_t loss_type, bool hard, cudaStream_t stream) {
  if (loss_type == kA) {
    hard ? launch_rows<scalar_t, kA, true>(a, stream) : launch_rows<scalar_t, kA, false>(a, stream);
  } else {
    hard ? launch_rows<scalar_t, kB, true>(a, stream) : launch_rows<scalar_t, kB, false>(a, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CBFUSED_FAMILY(A, B, EXTERN)                                                                     \
  EXTERN template void launch_family<float, A, B>(const RowArgs<float>&, int64_t, bool, cudaStream_t);   \
  EXTERN template void launch_family<double, A, B>(const RowArgs<double>&, int64_t, bool, cudaStream_t); \
  EXTERN template void launch_family<c10::Half, A, B>(const RowArgs<c10::Half>&, int64_t, bool,          \
                                                      cudaStream_t);                                     \
  EXTERN template void launch_family<c10::BFloat16, A, B>(const RowArgs<c10::BFloat16>&, int64_t, bool,  \
                                                          cudaStream_t);

CBFUSED_FAMILY(kSoftmax, kSoftmaxFocal, extern)
CBFUSED_FAMILY(kSigmoid, kFocal, extern)

}  // namespace cuda
}  // namespace cbfused
