// Helpers of the CPU host entries (cb_loss.cpp, sigmoid_focal.cpp).
#pragma once

#include <ATen/OpMathType.h>

#include <limits>

namespace cbfused {
namespace cpu {

// A double result in scalar_t: beyond the type's range it is +-inf (a loss too large for
// the dtype overflows, as in torch's losses), never an error or undefined behaviour.
template <typename scalar_t>
scalar_t cast_saturating(double v) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr double kMax = static_cast<double>(std::numeric_limits<acc_t>::max());
  const acc_t a = v > kMax ? std::numeric_limits<acc_t>::infinity()
                           : (v < -kMax ? -std::numeric_limits<acc_t>::infinity() : static_cast<acc_t>(v));
  return static_cast<scalar_t>(a);  // float -> half / bfloat16 rounds to inf past their range
}

}  // namespace cpu
}  // namespace cbfused
