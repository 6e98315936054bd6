// 128-bit loads and stores for the CUDA kernels, with scalar head and tail elements
// where a span does not start on a 16-byte boundary.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit access

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

template <int K>
using Width = std::integral_constant<int, K>;

__device__ __forceinline__ unsigned misalignment(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) % 16);
}

// A misaligned 128-bit access faults on the GPU ("misaligned address"); the emulation,
// on x86 where it would not, reports it.
#if defined(__CUDACC__)
#define CBFUSED_ASSERT_PACK_ALIGNED(p)
#else
#define CBFUSED_ASSERT_PACK_ALIGNED(p) CUDA_KERNEL_ASSERT(misalignment(p) == 0 && "misaligned 128-bit access")
#endif

// K elements at p into acc_t registers: one 128-bit load when K is the pack width (p is
// then 16-byte aligned), else K scalar loads.
template <int K, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[K]) {
  if constexpr (K == kVec<T>) {
    CBFUSED_ASSERT_PACK_ALIGNED(p);
    const Pack<T> v = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = static_cast<A>(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = static_cast<A>(p[k]);
  }
}

template <int K, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&in)[K]) {
  if constexpr (K == kVec<T>) {
    CBFUSED_ASSERT_PACK_ALIGNED(p);
    Pack<T> v;
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T>*>(p) = v;
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = static_cast<T>(in[k]);
  }
}

// How a span of n elements is walked: [0, head) one by one, then nvec packs, then the
// tail one by one. Packs are used only when every (non-null) pointer of the span has
// the same misalignment, so that element c sits at the same offset in all of them.
struct Split {
  int64_t head;
  int64_t nvec;
};

template <typename T>
__device__ __forceinline__ Split split_span(int64_t n, const void* p0, const void* p1 = nullptr,
                                            const void* p2 = nullptr, const void* p3 = nullptr) {
  const unsigned m = misalignment(p0);
  if ((p1 && misalignment(p1) != m) || (p2 && misalignment(p2) != m) || (p3 && misalignment(p3) != m)) {
    return {n, 0};
  }
  const int64_t head = m == 0 ? 0 : static_cast<int64_t>((16 - m) / sizeof(T));
  if (head >= n) return {n, 0};
  return {head, (n - head) / kVec<T>};
}

// Calls f(Width<K>{}, c) for the groups of a span split by `sp`, spread over `threads`
// threads (`lane` is this thread's index among them): f handles elements c .. c + K - 1,
// with K = kVec<T> for a pack and 1 for a head or tail element.
template <typename T, typename F>
__device__ __forceinline__ void for_each_group_strided(const Split& sp, int64_t n, int64_t lane,
                                                       int64_t threads, F&& f) {
  constexpr int V = kVec<T>;
  for (int64_t c = lane; c < sp.head; c += threads) f(Width<1>{}, c);
  for (int64_t i = lane; i < sp.nvec; i += threads) f(Width<V>{}, sp.head + i * V);
  for (int64_t c = sp.head + sp.nvec * V + lane; c < n; c += threads) f(Width<1>{}, c);
}

// The same over the kThreads threads of a row (a warp or a block).
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void for_each_group(const Split& sp, int64_t n, int lane, F&& f) {
  for_each_group_strided<T>(sp, n, lane, kThreads, f);
}

}  // namespace cuda
}  // namespace cbfused
