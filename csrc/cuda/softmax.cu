// Softmax cross-entropy and softmax focal row kernels (a compile unit of their own).
#include "cuda/launch.cuh"

namespace cbfused {
namespace cuda {
CBFUSED_FAMILY(kSoftmax, kSoftmaxFocal, )
}  // namespace cuda
}  // namespace cbfused
