// Warp / block reductions for the CUDA kernels (device only). Every reduction uses a
// fixed butterfly / tree, so results are bitwise reproducible run to run (no atomics).
#pragma once

#include <cmath>

#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = (u > v || u != u) ? u : v;  // propagates NaN
  }
  return v;
}

// Online softmax state: max m and sum s of exp(x - m).
template <typename T>
struct MaxSum {
  T m;
  T s;
};

template <typename T>
__device__ __forceinline__ MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b) {
  const T m = (b.m > a.m || b.m != b.m) ? b.m : a.m;
  if (m == -INFINITY) return {m, T(0)};
  return {m, a.s * ::exp(a.m - m) + b.s * ::exp(b.m - m)};
}

template <typename T>
__device__ __forceinline__ MaxSum<T> warp_merge(MaxSum<T> v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    MaxSum<T> u{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = merge(v, u);
  }
  return v;
}

// A row handled by kThreads threads: one warp (kThreads == 32) or the whole block.
// All threads of the row get the result. `smem` holds kThreads / 32 values of T.
template <int kThreads>
struct RowReduce {
  static_assert(kThreads == kWarp || (kThreads % kWarp == 0 && kThreads <= 1024), "");
  static constexpr int kWarps = kThreads / kWarp;

  template <typename T>
  static __device__ __forceinline__ T sum(T v, T* smem) {
    v = warp_sum(v);
    if constexpr (kWarps == 1) {
      return v;
    } else {
      const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
      __syncthreads();
      if (lane == 0) smem[warp] = v;
      __syncthreads();
      T r = lane < kWarps ? smem[lane] : T(0);
      return warp_sum(r);
    }
  }

  template <typename T>
  static __device__ __forceinline__ MaxSum<T> max_sum(MaxSum<T> v, T* smem_m, T* smem_s) {
    v = warp_merge(v);
    if constexpr (kWarps == 1) {
      return v;
    } else {
      const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
      __syncthreads();
      if (lane == 0) {
        smem_m[warp] = v.m;
        smem_s[warp] = v.s;
      }
      __syncthreads();
      MaxSum<T> r = lane < kWarps ? MaxSum<T>{smem_m[lane], smem_s[lane]} : MaxSum<T>{T(-INFINITY), T(0)};
      return warp_merge(r);
    }
  }
};

}  // namespace cuda
}  // namespace cbfused
