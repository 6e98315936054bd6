// Sigmoid cross-entropy and sigmoid focal row kernels (a compile unit of their own).
#include "cuda/launch.cuh"

namespace cbfused {
namespace cuda {
CBFUSED_FAMILY(kSigmoid, kFocal, )
}  // namespace cuda
}  // namespace cbfused
