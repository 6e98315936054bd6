// The CPU row kernels as a table of function pointers: the one interface between the host
// entries (cpu/cb_loss.cpp, cpu/sigmoid_focal.cpp, cpu/accumulate.cpp, in cbfused._C) and
// the vectorised kernels, which are compiled once per x86 ISA into cbfused._cpu_<ISA>
// (csrc/cpu/kernels/). At import, cbfused/_cpu.py picks the best table the running CPU can
// execute (or the one CBFUSED_CPU_CAPABILITY names) and hands it to _C, as ATen's
// DispatchStub picks a kernel per CPU_CAPABILITY.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <utility>

#include "cbfused/checks.h"
#include "cbfused/row_args.h"

namespace cbfused {
namespace cpu {

// Bumped when the table's layout or a signature changes: _C refuses a table of another
// version (a stale _cpu_<ISA> module next to a newer _C).
constexpr int kKernelsAbi = 7;
constexpr const char* kKernelsCapsule = "cbfused.cpu_kernels";

template <typename scalar_t>
struct KernelSet {
  // cb_loss: the rows of one call (loss_type's family, hard or float targets, with or
  // without the gradient). Writes a.grad and a.per_row_out where given; returns the totals
  // of loss and denominator (sums in fixed chunks: the bits do not depend on the thread count).
  // pl.S > 0: the planes layout; sm: label smoothing / class weighting; adj: adjusted logits
  // (row_args.h). In the rows layout a.grad may be a.x itself (x_stride = C; cb_loss_, the
  // gradient over the logits): every row kernel reads a block of logits before it stores
  // that block's gradient, and no logit of a row once it has stored any of the row's gradient
  // (the softmax rows park their exps elsewhere when they read the logits again).
  std::pair<double, double> (*cb_rows)(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                                       const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t loss_type,
                                       bool grad, bool hard);
  // sigmoid_focal: torchvision's focal term elementwise, times alpha_t and the class weight;
  // writes the per-element loss (loss_out, or null) and the gradient times grad_scale (grad,
  // or null); returns the sum of the losses.
  double (*focal)(const FocalPlan& p, double gamma, double alpha, double grad_scale, scalar_t* loss_out,
                  scalar_t* grad);
  // accumulate_: acc[begin, end) += src[begin, end) into float32 (null for float64).
  void (*accumulate)(float* acc, const scalar_t* src, int64_t begin, int64_t end);
};

struct Kernels {
  int abi;
  const char* capability;  // DEFAULT, AVX2, AVX512 or AVX512_BF16
  KernelSet<float> f32;
  KernelSet<double> f64;
  KernelSet<c10::Half> f16;
  KernelSet<c10::BFloat16> bf16;

  template <typename scalar_t>
  const KernelSet<scalar_t>& get() const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return f32;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      return f64;
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      return f16;
    } else {
      return bf16;
    }
  }
};

// The table in use (cbfused._C): set once at import by cbfused/_cpu.py; the host entries
// fail with a clear error before that.
const Kernels& active_kernels();

}  // namespace cpu
}  // namespace cbfused
