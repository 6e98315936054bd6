// cbfused._cpu_<ISA>: this ISA's CPU kernels as a kernels.h table, exported to Python as a
// capsule (the module attribute `kernels`); cbfused/_cpu.py hands the chosen one to _C.
// setup.py compiles this folder once per ISA with -DCBFUSED_ISA=<ISA> and the ISA's flags.
#include <Python.h>

#include "cbfused/kinds.h"
#include "cpu/kernels.h"
#include "cpu/rows.h"

#ifndef CBFUSED_ISA
#error "compile csrc/cpu/kernels/ with -DCBFUSED_ISA=DEFAULT | AVX2 | AVX512 | AVX512_BF16"
#endif
#define CBFUSED_STR2(x) #x
#define CBFUSED_STR(x) CBFUSED_STR2(x)
#define CBFUSED_CAT2(a, b) a##b
#define CBFUSED_CAT(a, b) CBFUSED_CAT2(a, b)

namespace cbfused {
namespace cpu {
template <typename scalar_t>
void accumulate_rows(float* acc, const scalar_t* src, int64_t begin, int64_t end);

namespace {

// cb_loss's rows: the layout (rows or planes, checks.h) and the family of the loss kind
// (kinds.h) pick the composition.
template <typename scalar_t>
std::pair<double, double> cb_rows(const RowArgs<scalar_t>& a, const Planes& pl, const Smoothing& sm,
                                  const ClassOptions<at::opmath_type<scalar_t>>& adj, int64_t loss_type,
                                  bool grad, bool hard) {
  if (pl.S > 0)
    return is_softmax_family(loss_type)
               ? softmax_family_planes<scalar_t>(a, pl, sm, adj, is_focal(loss_type), grad, hard)
               : binary_family_planes<scalar_t>(a, pl, sm, adj, is_focal(loss_type), grad, hard);
  return is_softmax_family(loss_type)
             ? softmax_family_rows<scalar_t>(a, sm, adj, is_focal(loss_type), grad, hard)
             : binary_family_rows<scalar_t>(a, sm, adj, is_focal(loss_type), grad, hard);
}

template <typename scalar_t>
constexpr KernelSet<scalar_t> kernel_set() {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return {&cb_rows<scalar_t>, &focal_elementwise_rows<scalar_t>, nullptr};
  } else {
    return {&cb_rows<scalar_t>, &focal_elementwise_rows<scalar_t>, &accumulate_rows<scalar_t>};
  }
}

const Kernels kTable = {kKernelsAbi,          CBFUSED_STR(CBFUSED_ISA), kernel_set<float>(),
                        kernel_set<double>(), kernel_set<c10::Half>(),  kernel_set<c10::BFloat16>()};

}  // namespace
}  // namespace cpu
}  // namespace cbfused

extern "C" PyObject* CBFUSED_CAT(PyInit__cpu_, CBFUSED_ISA)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu_" CBFUSED_STR(CBFUSED_ISA),
                                          "cbfused's CPU kernels for one x86 ISA (see cbfused/_cpu.py).", -1,
                                          nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  PyObject* cap = PyCapsule_New(const_cast<cbfused::cpu::Kernels*>(&cbfused::cpu::kTable),
                                cbfused::cpu::kKernelsCapsule, nullptr);
  if (!cap || PyModule_AddObject(m, "kernels", cap) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddStringConstant(m, "capability", CBFUSED_STR(CBFUSED_ISA)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
