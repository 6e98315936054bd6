// Launchers of the cb_loss kernels, split by loss family into separate compile units
// (softmax.cu, sigmoid.cu) so that they compile in parallel.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "cuda/planes_kernel.cuh"
#include "cuda/row_kernel.cuh"
#include "cuda/runtime.h"

namespace cbfused {
namespace cuda {

// Rows up to this many classes get a warp each; longer rows a block of kBlock threads.
constexpr int64_t kWarpRowMaxC = 1024;
// Sigmoid / focal rows up to this many classes go to cb_flat_kernel (8 rows per tile at least).
constexpr int64_t kFlatMaxC = kFlatTile / 8;
// A softmax block parks its rows in shared memory up to this size (and the device's
// limit); beyond it the gradient pass reads the row from global memory (L2) again.
// 80 KiB keeps two blocks per SM on A100 / H100.
constexpr size_t kMaxRowCacheBytes = 80 * 1024;
// The grid's y limit: the planes kernel's blocks walk further samples in steps of it.
constexpr int64_t kMaxGridY = 65535;

// Rows per cb_flat_kernel tile: a multiple of 8 (tiles start 16-byte aligned for every
// dtype), at most kBlock (one thread per row for the per-row steps) and kFlatTile / C.
inline int flat_rows_per_tile(int64_t C) {
  return static_cast<int>(std::min<int64_t>(kBlock, (kFlatTile / C) / 8 * 8));
}

template <typename scalar_t, int kLoss, bool kHard, bool kSmooth = false, bool kAdj = false>
void launch_rows(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                 const ClassOptions<at::opmath_type<scalar_t>>& adj, Stream stream) {
  if (a.N == 0) return;
  constexpr bool kBinary = !is_softmax_family(kLoss);
  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();
  if (pl.S > 0) {  // the planes layout: a thread per position, blockIdx.y over the samples
    const int64_t blocks = (pl.S + kBlock - 1) / kBlock;
    TORCH_CHECK(blocks <= kMaxGrid, "cbfused: ", pl.S, " positions per sample exceed the CUDA grid limit");
    const int64_t samples = std::min<int64_t>(a.N / pl.S, kMaxGridY);
    launch_kernel(cb_planes_kernel<scalar_t, kLoss, kHard, kSmooth, kAdj>,
                  dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(samples)), dim3(kBlock), 0,
                  stream, a, pl, sm, adj);
    return;
  }
  if constexpr (kBinary && !kSmooth && !kAdj) {
    // (a per-class alpha and label smoothing take the row kernel: cb_flat_kernel reads the
    // scalar alpha only, and its targets as they are)
    if (!adj.alpha_vec && sm.eps == 0 && a.C <= kFlatMaxC && a.x_stride == a.C &&
        (kHard || a.t_stride == a.C)) {
      const int rows = flat_rows_per_tile(a.C);
      const int64_t blocks = (a.N + rows - 1) / rows;
      TORCH_CHECK(blocks <= kMaxGrid, "cbfused: ", a.N, " rows exceed the CUDA grid limit");
      launch_kernel(cb_flat_kernel<scalar_t, kLoss, kHard>, dim3(static_cast<unsigned>(blocks)), dim3(kBlock),
                    0, stream, a, rows);
      return;
    }
  }
  // Softmax row cache: a slot per row of round_up(C + V - 1, V) elements (the row is
  // shifted by x's misalignment inside its slot).
  constexpr int64_t V = kVec<scalar_t>;
  const int64_t cache_stride = (a.C + 2 * V - 2) / V * V;
  const size_t cache_limit = std::min(kMaxRowCacheBytes, max_dynamic_smem());
  const bool warp_rows = a.C <= kWarpRowMaxC;
  const int64_t rows_per_block = warp_rows ? kBlock / kWarp : 1;
  const size_t cache_bytes = static_cast<size_t>(rows_per_block * cache_stride) * sizeof(scalar_t);
  const bool cache = !kBinary && cache_bytes <= cache_limit;
  const int64_t stride = cache ? cache_stride : 0;
  const size_t smem = cache ? cache_bytes : 0;
  const int64_t blocks = (a.N + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= kMaxGrid, "cbfused: ", a.N, " rows exceed the CUDA grid limit");
  const dim3 grid(static_cast<unsigned>(blocks));
  if (warp_rows) {
    launch_kernel(cb_row_kernel<scalar_t, kLoss, kHard, kWarp, kSmooth, kAdj>, grid, dim3(kBlock), smem,
                  stream, a, stride, sm, adj);
  } else {
    launch_kernel(cb_row_kernel<scalar_t, kLoss, kHard, kBlock, kSmooth, kAdj>, grid, dim3(kBlock), smem,
                  stream, a, stride, sm, adj);
  }
}

// launch_rows for the call's loss type (kA or kB) and target kind.
template <typename scalar_t, int kA, int kB, bool kSmooth, bool kAdj>
void launch_kind(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                 const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t loss_type, bool hard,
                 Stream stream) {
  if (loss_type == kA) {
    hard ? launch_rows<scalar_t, kA, true, kSmooth, kAdj>(a, pl, sm, adj, stream)
         : launch_rows<scalar_t, kA, false, kSmooth, kAdj>(a, pl, sm, adj, stream);
  } else {
    hard ? launch_rows<scalar_t, kB, true, kSmooth, kAdj>(a, pl, sm, adj, stream)
         : launch_rows<scalar_t, kB, false, kSmooth, kAdj>(a, pl, sm, adj, stream);
  }
}

template <typename scalar_t, int kA, int kB, bool kAdj>
void launch_with_adj(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                     const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t loss_type, bool hard,
                     Stream stream) {
  if constexpr (kA == kSoftmax) {
    if (sm.active(hard)) {  // smoothed softmax cross-entropy or softmax focal
      launch_kind<scalar_t, kA, kB, true, kAdj>(a, pl, sm, adj, loss_type, hard, stream);
      return;
    }
  }
  launch_kind<scalar_t, kA, kB, false, kAdj>(a, pl, sm, adj, loss_type, hard, stream);
}

// One loss family (kA or kB, hard or float targets); instantiated in softmax.cu and sigmoid.cu.
// Smoothed softmax-family rows (sm.active) take the kSmooth kernels; the binary family reads
// sm.eps at run time. Adjusted logits (adj.adjusted()) are the softmax family's (checked by
// check_cb_loss).
template <typename scalar_t, int kA, int kB>
void launch_family(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                   const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t loss_type, bool hard,
                   Stream stream) {
  if constexpr (kA == kSoftmax) {
    if (adj.adjusted()) {
      launch_with_adj<scalar_t, kA, kB, true>(a, pl, sm, adj, loss_type, hard, stream);
      return;
    }
  }
  launch_with_adj<scalar_t, kA, kB, false>(a, pl, sm, adj, loss_type, hard, stream);
}

#define CBFUSED_FAMILY_ONE(T, A, B, EXTERN)                                                           \
  EXTERN template void launch_family<T, A, B>(const RowArgs<T>&, const Planes&, const Smoothing&,     \
                                              const ClassOptions<at::opmath_type<T>>&, int64_t, bool, \
                                              Stream);
#define CBFUSED_FAMILY(A, B, EXTERN)          \
  CBFUSED_FAMILY_ONE(float, A, B, EXTERN)     \
  CBFUSED_FAMILY_ONE(double, A, B, EXTERN)    \
  CBFUSED_FAMILY_ONE(c10::Half, A, B, EXTERN) \
  CBFUSED_FAMILY_ONE(c10::BFloat16, A, B, EXTERN)

CBFUSED_FAMILY(kSoftmax, kSoftmaxFocal, extern)
CBFUSED_FAMILY(kSigmoid, kFocal, extern)

}  // namespace cuda
}  // namespace cbfused
