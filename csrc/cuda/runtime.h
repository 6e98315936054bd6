// The runtime interface of the kernels: launch, stream, device guard, dynamic shared
// memory. Under nvcc it is CUDA; under a host compiler it is the CPU emulation in
// emulator.h, which runs the same kernel source in the CPU test suite.
#pragma once

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <utility>

namespace cbfused {
namespace cuda {

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// The most dynamic shared memory one block of the current device may opt in to.
inline size_t max_dynamic_smem() {
  static std::array<int, 64> cache{};  // per device; 0 = not asked yet
  const int dev = c10::cuda::current_device();
  if (dev >= 64) return 48 * 1024;
  if (cache[dev] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cache[dev] = v;
  }
  return static_cast<size_t>(cache[dev]);
}

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char cbfused_dynamic_smem[];
  return reinterpret_cast<T*>(cbfused_dynamic_smem);
}

template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream stream,
                   Args&&... args) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace cbfused

#else
#include "cuda/emulator.h"
#endif
