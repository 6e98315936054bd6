// cbfused._emulated_cuda: importing it registers torch.ops.cbfused_emu (the CUDA kernels
// run in the CPU emulation of cuda/emulator.h), for the tests.
#include <Python.h>
#include <torch/library.h>

#include "cbfused/schemas.h"

// The emulated ops' schemas; each csrc/cuda/*.cu registers its kernel beside its host entry.
TORCH_LIBRARY(cbfused_emu, m) {
  m.def(cbfused::kCbLossSchema);
  m.def(cbfused::kSigmoidFocalSchema);
  m.def("scale_grad(Tensor grad, Tensor g_loss, Tensor grad_scale, bool in_place) -> Tensor");
}

extern "C" PyObject* PyInit__emulated_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emulated_cuda",
                                          "The CUDA kernels in a CPU emulation (tests only).", -1, nullptr};
  return PyModule_Create(&module_def);
}
