// The cbfused library (schemas in cbfused/schemas.h). Backends register their kernels
// with TORCH_LIBRARY_IMPL in cpu/ and cuda/; autograd is in autograd.cpp and the fake
// (meta) kernels in cbfused/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cbfused/kinds.h"
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

// kinds.h's table as a list of dicts, the one source of cbfused/_ops.py's loss kinds.
static PyObject* loss_kinds(PyObject*, PyObject*) {
  PyObject* out = PyList_New(cbfused::kNumLossKinds);
  if (!out) return nullptr;
  for (int64_t i = 0; i < cbfused::kNumLossKinds; ++i) {
    const auto& k = cbfused::kLossKinds[i];
    PyObject* d =
        Py_BuildValue("{s:s,s:L,s:s,s:O,s:O,s:s}", "name", k.name, "code", static_cast<long long>(k.code),
                      "family", k.family == cbfused::Family::kSoftmaxRow ? "softmax" : "binary", "focal",
                      k.focal ? Py_True : Py_False, "alpha", k.alpha ? Py_True : Py_False, "doc", k.doc);
    if (!d) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, d);
  }
  return out;
}

static PyObject* reductions(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (!out) return nullptr;
  for (const auto& r : cbfused::kReductions) {
    PyObject* v = PyLong_FromLongLong(r.code);
    if (!v || PyDict_SetItemString(out, r.name, v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return out;
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"loss_kinds", loss_kinds, METH_NOARGS, "The loss kinds of csrc/cbfused/kinds.h."},
    {"reductions", reductions, METH_NOARGS, "The reductions of csrc/cbfused/kinds.h (name -> code)."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
