// cbfused._emulated_cuda: importing it registers torch.ops.cbfused_emu (the CUDA kernels
// run in the CPU emulation of cuda/emulator.h), for the tests.
#include <Python.h>

extern "C" PyObject* PyInit__emulated_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emulated_cuda",
                                          "The CUDA kernels in a CPU emulation (tests only).", -1, nullptr};
  return PyModule_Create(&module_def);
}
