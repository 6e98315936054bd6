// A CPU emulation of the slice of CUDA that cbfused's kernels use, so that the kernels'
// own source (indexing, vector head/tail splits, shared-memory tiles, warp and block
// reductions, device asserts) runs in the CPU test suite on machines without a GPU.
//
// Model: a launch runs its blocks one after another; each block runs blockDim.x OS
// threads, so threads of a block really run concurrently and every __syncthreads and
// warp shuffle is a real barrier. Exited threads drop out of the barriers, as on Volta
// and later. A shuffle in a warp that lost lanes, a block size that is not a multiple of
// the warp, too much shared memory and a failed CUDA_KERNEL_ASSERT are reported as errors
// after the launch.
//
// What this does NOT check: the CUDA memory model beyond barriers, timing, occupancy,
// real warp scheduling, nvcc's code generation and device math libraries (the host libm
// is used). It is no substitute for running on a GPU; it makes the kernels' logic
// testable where none is present.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3() = default;
  constexpr dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cbfused {
namespace emu {

constexpr int kWarpSize = 32;
// The largest dynamic shared memory a block may ask for: that of sm_86 / sm_89 (99 KiB),
// the smallest among the default architectures, so the tests also take the paths that
// do not fit.
constexpr size_t kMaxDynamicSmem = 99 * 1024;

struct BlockState {
  explicit BlockState(unsigned threads, size_t smem_bytes)
      : block_barrier(threads), alive(threads / kWarpSize), slots(threads), smem(smem_bytes / 16 + 1) {
    for (unsigned w = 0; w < threads / kWarpSize; ++w) {
      warp_barriers.emplace_back(std::make_unique<std::barrier<>>(kWarpSize));
      alive[w] = kWarpSize;
    }
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::atomic<int>> alive;  // live lanes per warp
  std::vector<uint64_t> slots;          // one shuffle slot per thread
  struct alignas(16) Chunk {
    unsigned char b[16];
  };
  std::vector<Chunk> smem;  // dynamic shared memory
};

struct Launch {
  std::mutex mutex;      // one launch at a time: static __shared__ arrays are per kernel
  std::mutex err_mutex;  // guards `errors`
  std::string errors;
};

inline Launch& launch_state() {
  static Launch l;
  return l;
}

inline void fail(const std::string& what) {
  Launch& l = launch_state();
  const std::lock_guard<std::mutex> lock(l.err_mutex);
  if (l.errors.size() < 2000) l.errors += what + "\n";
}

inline thread_local BlockState* t_block = nullptr;

struct Trap {
  std::string what;
};

}  // namespace emu
}  // namespace cbfused

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { cbfused::emu::t_block->block_barrier.arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  using namespace cbfused::emu;
  BlockState& b = *t_block;
  const unsigned tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (not used by cbfused's kernels)");
  std::memcpy(&b.slots[tid], &v, sizeof(T));
  b.warp_barriers[warp]->arrive_and_wait();
  if (b.alive[warp].load() != kWarpSize) fail("__shfl_xor_sync in a warp whose other lanes have exited");
  T u;
  std::memcpy(&u, &b.slots[warp * kWarpSize + (lane ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  b.warp_barriers[warp]->arrive_and_wait();
  return u;
}

#ifdef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT
#endif
#define CBF_EMU_STR2(x) #x
#define CBF_EMU_STR(x) CBF_EMU_STR2(x)
// A failed assertion stops its thread (as a trap stops the kernel on the GPU) and is
// reported after the launch.
#define CUDA_KERNEL_ASSERT(cond)                                                                       \
  do {                                                                                                 \
    if (!(cond))                                                                                       \
      throw ::cbfused::emu::Trap{                                                                      \
          "device-side assertion `" #cond "` failed (" __FILE__ ":" CBF_EMU_STR(__LINE__) ", block " + \
          std::to_string(blockIdx.x) + ", thread " + std::to_string(threadIdx.x) + ")"};               \
  } while (0)

namespace cbfused {
namespace cuda {

using Stream = void*;

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline Stream current_stream() { return nullptr; }

inline size_t max_dynamic_smem() { return emu::kMaxDynamicSmem; }

template <typename T>
inline T* dynamic_smem() {
  return reinterpret_cast<T*>(emu::t_block->smem.data());
}

// kernel<<<grid, block, smem, stream>>>(args...), emulated; throws what the launch reported.
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Stream, Args&&... args) {
  using namespace emu;
  Launch& l = launch_state();
  const std::lock_guard<std::mutex> lock(l.mutex);
  l.errors.clear();
  TORCH_CHECK(block.x % kWarpSize == 0 && block.x > 0 && block.x <= 1024 && block.y == 1 && block.z == 1,
              "emulated launch: block of ", block.x, " threads (must be a multiple of 32, at most 1024)");
  TORCH_CHECK(smem <= kMaxDynamicSmem, "emulated launch: ", smem, " bytes of dynamic shared memory (max ",
              kMaxDynamicSmem, ")");
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z == 1, "emulated launch: grid of ", grid.x, " x ", grid.y,
              " blocks");
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x * grid.y && l.errors.empty(); ++b) {
    const unsigned bx = b % grid.x, by = b / grid.x;
    BlockState state(block.x, smem);
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t) {
      threads.emplace_back([&, t, bx, by] {
        threadIdx = dim3(t);
        blockIdx = dim3(bx, by);
        t_block = &state;
        try {
          kernel(args...);
        } catch (const Trap& trap) {
          fail(trap.what);
        }
        // An exited thread no longer counts at the block's or its warp's barriers.
        state.alive[t / kWarpSize].fetch_sub(1);
        state.warp_barriers[t / kWarpSize]->arrive_and_drop();
        state.block_barrier.arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
  }
  TORCH_CHECK(l.errors.empty(), "emulated CUDA kernel failed:\n", l.errors);
}

}  // namespace cuda
}  // namespace cbfused
