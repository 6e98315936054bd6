// The CUDA source of cuda/sigmoid_focal.cu built for the CPU emulation (cuda/emulator.h): the
// kernels' logic runs in the test suite without a GPU (torch.ops.cbfused_emu).
#include "cuda/sigmoid_focal.cu"
