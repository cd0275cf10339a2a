// fluxion._C: a Python module that only loads the op library, plus a few tiny functions: the SIMD level,
// ATen's parallel settings, a streaming-read probe for the benchmarks and the window_attention CUDA kernel
// choice (no pybind11: ops and classes are registered with the dispatcher when this library loads).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
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
  for (Isa isa : fluxion::core::cpu::kAllIsas) {
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
  Isa isa;
  if (!fluxion::core::cpu::isa_from_name(name, &isa)) {
    std::string names;
    for (Isa i : fluxion::core::cpu::kAllIsas) names += std::string(names.empty() ? "" : ", ") + fluxion::core::cpu::isa_name(i);
    PyErr_Format(PyExc_ValueError, "simd level must be one of %s, got '%s'", names.c_str(), name);
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

// stream_read(tensor, threads=0) -> int: reads every byte of a contiguous CPU tensor once with the widest
// SIMD loads (KernelTable::stream_sum), each of `threads` workers of ATen's pool (0: the current count)
// streaming one contiguous slice; returns a checksum (the sum of its 64-bit words mod 2^64) so the reads
// cannot be optimised away. The benchmarks time it for the host read-bandwidth ceiling.
PyObject* stream_read(PyObject*, PyObject* args) {
  PyObject* obj = nullptr;
  int threads = 0;
  if (!PyArg_ParseTuple(args, "O|i", &obj, &threads)) return nullptr;
  if (!THPVariable_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "stream_read: tensor must be a torch.Tensor");
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.device().is_cpu() || !t.is_contiguous() || t.nbytes() % 64 != 0) {
    PyErr_SetString(PyExc_ValueError, "stream_read: tensor must be a contiguous CPU tensor of a multiple of 64 bytes");
    return nullptr;
  }
  const char* base = static_cast<const char*>(t.data_ptr());
  const int64_t lines = int64_t(t.nbytes()) / 64;
  const auto& kt = fluxion::core::cpu::kernels();
  const int before = at::get_num_threads();
  if (threads > 0) at::set_num_threads(threads);
  std::atomic<uint64_t> total{0};
  Py_BEGIN_ALLOW_THREADS
  // A grain of 1 MiB; at::parallel_for gives each worker one contiguous range of lines.
  at::parallel_for(0, lines, int64_t(1) << 14, [&](int64_t begin, int64_t end) {
    total.fetch_add(kt.stream_sum(base + begin * 64, (end - begin) * 64), std::memory_order_relaxed);
  });
  Py_END_ALLOW_THREADS
  if (threads > 0) at::set_num_threads(before);
  return PyLong_FromUnsignedLongLong(total.load());
}

PyMethodDef kMethods[] = {
    {"simd_level", simd_level, METH_NOARGS, "SIMD level the CPU kernels use now."},
    {"simd_supported", simd_supported, METH_NOARGS, "SIMD levels this CPU supports."},
    {"set_simd_level", set_simd_level, METH_O, "Use 'scalar', 'avx2', 'avx512', 'avx512_bf16' or 'avx512_amx' kernels (must be supported)."},
    {"window_kernel", window_kernel, METH_NOARGS, "Kernel window_attention launches on CUDA (see set_window_kernel)."},
    {"set_window_kernel", set_window_kernel, METH_O,
     "window_attention's CUDA kernel: 'auto', 'tile', 'mma' or 'mma:R' (R = 1..8 CTAs per head slice)."},
    {"parallel_info", parallel_info, METH_NOARGS, "ATen's parallel backend and thread settings."},
    {"stream_read", stream_read, METH_VARARGS,
     "stream_read(tensor, threads=0) -> checksum: one SIMD streaming read of a contiguous CPU tensor on `threads` "
     "workers of ATen's pool (0: the current count)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "Fluxion op library (ops live under torch.ops.fluxion).", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
