// The cbfused library (schemas in cbfused/schemas.h). Backends register their kernels
// with TORCH_LIBRARY_IMPL in cpu/ and cuda/; autograd is in autograd.cpp and the fake
// (meta) kernels in cbfused/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cbfused/schemas.h"

#ifndef CBFUSED_CPU_CAPABILITY_NAME
#define CBFUSED_CPU_CAPABILITY_NAME "DEFAULT"
#endif
#ifdef CBFUSED_WITH_CUDA
#define CBFUSED_CUDA_FLAG "1"
#else
#define CBFUSED_CUDA_FLAG "0"
#endif
#ifndef CBFUSED_CUDA_ARCHS
#define CBFUSED_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(cbfused, m) {
  m.def(cbfused::kCbLossSchema);
  m.def(cbfused::kSigmoidFocalSchema);
  m.def(cbfused::kAccumulateSchema);
}

static PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s,s:s}", "cpu_capability", CBFUSED_CPU_CAPABILITY_NAME, "cuda",
                       CBFUSED_CUDA_FLAG, "cuda_archs", CBFUSED_CUDA_ARCHS);
}

static PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "How this extension was built."},
                                {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
