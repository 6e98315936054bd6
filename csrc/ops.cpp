// Every schema of the cbfused library, defined once. Backends register their
// kernels with TORCH_LIBRARY_IMPL in cpu/ and cuda/; Python attaches the fake
// (meta) kernels and autograd in cbfused/_ops.py.
#include <Python.h>
#include <torch/library.h>

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
  // Class-balanced loss. Returns (loss, grad, grad_scale): loss is [] or [N] (reduction
  // 'none'); grad ([N, C] when grad_mode > 0, else [0]) times grad_scale ([]) is
  // d(loss)/d(logits): a backend may fold the mean's 1/D into grad (grad_scale = 1) or
  // leave it to the backward (grad_scale = 1/D, 0 when D = 0).
  // grad_mode: 0 no gradient; 1 gradient; 2 gradient, and the backward may scale the
  // returned grad buffer in place (callers that never read it, like cbfused's own
  // wrappers, save one N x C buffer that way).
  m.def(
      "cb_loss(Tensor logits, Tensor target, Tensor class_weight, int loss_type, float gamma, "
      "float alpha, int reduction, int ignore_index, int grad_mode) -> (Tensor, Tensor, Tensor)");
  // torchvision.ops.sigmoid_focal_loss semantics with an optional per-class weight.
  // Returns (loss, grad): grad already carries the mean's 1/numel. grad_mode as above.
  m.def(
      "sigmoid_focal(Tensor inputs, Tensor targets, Tensor? weight, float alpha, float gamma, "
      "int reduction, int grad_mode) -> (Tensor, Tensor)");
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
