// The vector loop of cbfused::accumulate_ (acc += src into float32), compiled once per CPU
// ISA (csrc/cpu/kernels.h); the host entry is csrc/cpu/accumulate.cpp.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/vec_ops.h"

namespace cbfused {
namespace cpu {

template <typename scalar_t>
void accumulate_rows(float* acc, const scalar_t* src, int64_t begin, int64_t end) {
  using IO = RowIO<scalar_t>;
  using V = typename IO::V;
  acc += begin;
  src += begin;
  row_blocks<IO, 1>(end - begin, [&](int64_t j, int64_t n, auto) CBF_BLOCK {
    V sv[IO::kVecs];
    IO::load(src + j, n, sv);
    CBF_UNROLL_VECS
    for (int v = 0; v < IO::kVecs; ++v) {
      const int64_t nv = IO::lanes(n, v);
      if (nv == 0) break;
      float* a = acc + j + v * IO::kLanes;
      (V::loadu(a, nv) + sv[v]).store(a, nv);
    }
  });
}

template void accumulate_rows<float>(float*, const float*, int64_t, int64_t);
template void accumulate_rows<c10::Half>(float*, const c10::Half*, int64_t, int64_t);
template void accumulate_rows<c10::BFloat16>(float*, const c10::BFloat16*, int64_t, int64_t);

}  // namespace cpu
}  // namespace cbfused
