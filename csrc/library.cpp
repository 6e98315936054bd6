// The cbfused library and the cbfused._C module: the op schemas (cbfused/schemas.h), how
// the module was built, the loss-kind table (cbfused/kinds.h) and the CPU kernel choice
// (cpu/dispatch.h) for Python. Each backend's host entry registers its kernel beside itself
// (cpu/*.cpp, cuda/*.cu); autograd is autograd.cpp, the fake kernels cbfused/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cbfused/kinds.h"
#include "cbfused/schemas.h"
#include "cpu/dispatch.h"

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
  m.def(cbfused::kCbLossInplaceSchema);
  m.def(cbfused::kSigmoidFocalSchema);
  m.def(cbfused::kAccumulateSchema);
}

static PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:s}", "cuda", CBFUSED_CUDA_FLAG, "cuda_archs", CBFUSED_CUDA_ARCHS);
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

// A {name: code} dict of a kinds.h table of named codes.
template <typename Table>
static PyObject* name_codes(const Table& table) {
  PyObject* out = PyDict_New();
  if (!out) return nullptr;
  for (const auto& r : table) {
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

static PyObject* reductions(PyObject*, PyObject*) { return name_codes(cbfused::kReductions); }
static PyObject* weightings(PyObject*, PyObject*) { return name_codes(cbfused::kWeightings); }

// The ISAs the running CPU executes, from DEFAULT up.
static PyObject* cpu_capabilities_supported(PyObject*, PyObject*) {
  const auto caps = cbfused::cpu::cpu_capabilities_supported();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(caps.size()));
  if (!out) return nullptr;
  for (size_t i = 0; i < caps.size(); ++i) {
    PyObject* s = PyUnicode_FromString(caps[i].c_str());
    if (!s) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), s);
  }
  return out;
}

// Takes a cbfused._cpu_<ISA>.kernels capsule: its table becomes the CPU kernels in use.
static PyObject* set_cpu_kernels(PyObject*, PyObject* capsule) {
  auto* k =
      static_cast<const cbfused::cpu::Kernels*>(PyCapsule_GetPointer(capsule, cbfused::cpu::kKernelsCapsule));
  if (!k) return nullptr;  // PyCapsule_GetPointer set the error
  const std::string err = cbfused::cpu::set_active_kernels(k);
  if (!err.empty()) {
    PyErr_SetString(PyExc_ImportError, ("cbfused: " + err).c_str());
    return nullptr;
  }
  return PyUnicode_FromString(k->capability);
}

static PyMethodDef methods[] = {
    {"cpu_capabilities_supported", cpu_capabilities_supported, METH_NOARGS,
     "The x86 ISAs the running CPU executes (DEFAULT, AVX2, AVX512, AVX512_BF16)."},
    {"set_cpu_kernels", set_cpu_kernels, METH_O, "Use a cbfused._cpu_<ISA> module's kernel table."},
    {"build_info", build_info, METH_NOARGS, "How this extension was built."},
    {"loss_kinds", loss_kinds, METH_NOARGS, "The loss kinds of csrc/cbfused/kinds.h."},
    {"reductions", reductions, METH_NOARGS, "The reductions of csrc/cbfused/kinds.h (name -> code)."},
    {"weightings", weightings, METH_NOARGS,
     "The class-weighting rules of csrc/cbfused/kinds.h (name -> code)."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
