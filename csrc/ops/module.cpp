// fluxion._C: a Python module that only loads the op library, plus tiny functions for the SIMD level and the
// window_attention CUDA kernel (no pybind11: ops and classes are registered with the dispatcher when this
// library loads).
#include <Python.h>

#include <ATen/Parallel.h>

#include <stdexcept>
#include <string>

#include "core/cpu/kernels.h"
#ifdef FLUXION_WITH_CUDA
#include "core/cuda/window.cuh"
#endif

namespace {

using fluxion::core::cpu::Isa;

PyObject* simd_level(PyObject*, PyObject*) {
  return PyUnicode_FromString(fluxion::core::cpu::isa_name(fluxion::core::cpu::active_isa()));
}

PyObject* simd_supported(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16}) {
    if (!fluxion::core::cpu::isa_supported(isa)) continue;
    PyObject* s = PyUnicode_FromString(fluxion::core::cpu::isa_name(isa));
    PyList_Append(list, s);
    Py_DECREF(s);
  }
  return list;
}

PyObject* set_simd_level(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const std::string s(name);
  Isa isa;
  if (s == "scalar") isa = Isa::kScalar;
  else if (s == "avx2") isa = Isa::kAvx2;
  else if (s == "avx512") isa = Isa::kAvx512;
  else if (s == "avx512_bf16") isa = Isa::kAvx512Bf16;
  else {
    PyErr_Format(PyExc_ValueError, "simd level must be scalar, avx2, avx512 or avx512_bf16, got '%s'", name);
    return nullptr;
  }
  try {
    fluxion::core::cpu::set_active_isa(isa);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* window_kernel(PyObject*, PyObject*) {
#ifdef FLUXION_WITH_CUDA
  return PyUnicode_FromString(fluxion::core::cuda::window_kernel().c_str());
#else
  PyErr_SetString(PyExc_RuntimeError, "fluxion was built without CUDA kernels");
  return nullptr;
#endif
}

PyObject* set_window_kernel(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
#ifdef FLUXION_WITH_CUDA
  if (!fluxion::core::cuda::set_window_kernel(name)) {
    PyErr_Format(PyExc_ValueError, "window kernel must be auto, tile, mma or mma:R (R in 1..8), got '%s'", name);
    return nullptr;
  }
  Py_RETURN_NONE;
#else
  PyErr_SetString(PyExc_RuntimeError, "fluxion was built without CUDA kernels");
  return nullptr;
#endif
}

PyObject* parallel_info(PyObject*, PyObject*) { return PyUnicode_FromString(at::get_parallel_info().c_str()); }

PyMethodDef kMethods[] = {
    {"simd_level", simd_level, METH_NOARGS, "SIMD level the CPU kernels use now."},
    {"simd_supported", simd_supported, METH_NOARGS, "SIMD levels this CPU supports."},
    {"set_simd_level", set_simd_level, METH_O, "Use 'scalar', 'avx2', 'avx512' or 'avx512_bf16' kernels (must be supported)."},
    {"window_kernel", window_kernel, METH_NOARGS, "Kernel window_attention launches on CUDA (see set_window_kernel)."},
    {"set_window_kernel", set_window_kernel, METH_O,
     "window_attention's CUDA kernel: 'auto', 'tile', 'mma' or 'mma:R' (R = 1..8 CTAs per head slice)."},
    {"parallel_info", parallel_info, METH_NOARGS, "ATen's parallel backend and thread settings."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "Fluxion op library (ops live under torch.ops.fluxion).", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
