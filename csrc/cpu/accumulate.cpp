// cbfused::accumulate_ on the CPU, host entry and registration: acc += src for a float32
// accumulator and a bfloat16 / float16 / float32 addend of the same shape, in one pass (the
// vector loop is csrc/cpu/kernels/accumulate.cpp, per CPU ISA). The fused linear path adds each chunk's
// reduced-precision weight-gradient product into its float32 accumulator with it: torch's
// CPU add_ of mixed dtypes first copies the addend to a float32 temporary (211 of 1030 ms,
// copy and add, of the bfloat16 fused linear path's fwd+bwd at 4096 x 2048 x 8142).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/kernels.h"

namespace cbfused {
namespace cpu {
namespace {

void accumulate_cpu(const at::Tensor& acc, const at::Tensor& src) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "cbfused: accumulate_: the accumulator must be float32, got ",
              acc.scalar_type());
  TORCH_CHECK(
      src.scalar_type() == at::kFloat || src.scalar_type() == at::kBFloat16 || src.scalar_type() == at::kHalf,
      "cbfused: accumulate_: the addend must be float32, bfloat16 or float16, got ", src.scalar_type());
  TORCH_CHECK(acc.sizes() == src.sizes(), "cbfused: accumulate_: the accumulator has shape ", acc.sizes(),
              " but the addend has shape ", src.sizes());
  TORCH_CHECK(acc.is_contiguous(), "cbfused: accumulate_: the accumulator must be contiguous");
  TORCH_CHECK(src.device() == acc.device(), "cbfused: accumulate_: the addend is on ", src.device(),
              " but the accumulator is on ", acc.device());
  const at::Tensor s = src.contiguous();
  float* a = acc.mutable_data_ptr<float>();
  constexpr int64_t kGrain = 1 << 15;  // elements per task: well above the per-task overhead
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cbfused_accumulate_cpu", [&] {
    const auto add = active_kernels().get<scalar_t>().accumulate;
    TORCH_CHECK(add != nullptr, "cbfused: accumulate_: no kernel for ", s.scalar_type());
    const scalar_t* p = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, s.numel(), kGrain, [&](int64_t b, int64_t e) { add(a, p, b, e); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cbfused, CPU, m) { m.impl("accumulate_", &accumulate_cpu); }

}  // namespace cpu
}  // namespace cbfused
