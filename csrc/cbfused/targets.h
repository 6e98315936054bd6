// A row's target rule, shared by the CPU and CUDA row kernels: whether a class-index target
// is ignored or out of range, the row's class weight s, and its share of the mean's
// denominator D (docs/losses.md, "Reductions"). Host and device (CBF_HD).
#pragma once

#include <cstdint>

#include "cbfused/math.h"

namespace cbfused {

template <typename acc_t>
struct HardTarget {
  bool ignored = false;  // y == ignore_index: loss 0, gradient 0, no share of D
  bool bad = false;      // neither ignored nor in [0, C): an error (CPU) or device assert (CUDA)
  acc_t s = 0;           // the row's class weight w[y]
  acc_t denom = 0;       // its share of D: 1, or w[y] for 'weighted_mean'
  CBF_HD bool live() const { return !ignored && !bad; }
};

template <typename acc_t>
CBF_HD HardTarget<acc_t> hard_target(int64_t y, int64_t C, int64_t ignore_index, const acc_t* w,
                                     bool weighted) {
  HardTarget<acc_t> h;
  h.ignored = y == ignore_index;
  h.bad = !h.ignored && !(y >= 0 && y < C);
  if (h.live()) {
    h.s = w[y];
    h.denom = weighted ? h.s : acc_t(1);
  }
  return h;
}

// A float-target row's share of D from s = sum_c t_c w_c and T = sum_c t_c: s for
// 'weighted_mean', T (the number of positive labels) for 'mean'.
template <typename acc_t>
CBF_HD acc_t float_target_denom(acc_t s, acc_t T, bool weighted) {
  return weighted ? s : T;
}

}  // namespace cbfused
