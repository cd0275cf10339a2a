// fluxion._C: a Python module that only loads the op library, plus a few tiny functions: the SIMD level,
// ATen's parallel settings, streaming- and scattered-read probes for the benchmarks and the window_attention CUDA kernel
// choice (no pybind11: ops and classes are registered with the dispatcher when this library loads).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "core/cpu/kernels.h"
#include "core/cpu/retrieval.h"
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

// The probes' tensor argument: a contiguous CPU tensor (nullptr with the Python error set otherwise).
const at::Tensor* cpu_tensor_arg(PyObject* obj, const char* fn, const char* what) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s: %s must be a torch.Tensor", fn, what);
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.device().is_cpu() || !t.is_contiguous()) {
    PyErr_Format(PyExc_ValueError, "%s: %s must be a contiguous CPU tensor", fn, what);
    return nullptr;
  }
  return &t;
}

// ATen's thread count set to `threads` (0: left as it is) for the scope, then restored.
struct ThreadCount {
  int before = at::get_num_threads(), threads;
  explicit ThreadCount(int n) : threads(n) {
    if (threads > 0) at::set_num_threads(threads);
  }
  ~ThreadCount() {
    if (threads > 0) at::set_num_threads(before);
  }
};

// stream_read(tensor, threads=0) -> int: reads every byte of a contiguous CPU tensor once with the widest
// SIMD loads (KernelTable::stream_sum), each of `threads` workers of ATen's pool (0: the current count)
// streaming one contiguous slice; returns a checksum (the sum of its 64-bit words mod 2^64) so the reads
// cannot be optimised away. The benchmarks time it for the host read-bandwidth ceiling.
PyObject* stream_read(PyObject*, PyObject* args) {
  PyObject* obj = nullptr;
  int threads = 0;
  if (!PyArg_ParseTuple(args, "O|i", &obj, &threads)) return nullptr;
  const at::Tensor* t = cpu_tensor_arg(obj, "stream_read", "tensor");
  if (t == nullptr) return nullptr;
  if (t->nbytes() % 64 != 0) {
    PyErr_SetString(PyExc_ValueError, "stream_read: tensor must be a contiguous CPU tensor of a multiple of 64 bytes");
    return nullptr;
  }
  const char* base = static_cast<const char*>(t->data_ptr());
  const int64_t lines = int64_t(t->nbytes()) / 64;
  const auto& kt = fluxion::core::cpu::kernels();
  const ThreadCount scope(threads);
  std::atomic<uint64_t> total{0};
  Py_BEGIN_ALLOW_THREADS
  // A grain of 1 MiB; at::parallel_for gives each worker one contiguous range of lines.
  at::parallel_for(0, lines, int64_t(1) << 14, [&](int64_t begin, int64_t end) {
    total.fetch_add(kt.stream_sum(base + begin * 64, (end - begin) * 64), std::memory_order_relaxed);
  });
  Py_END_ALLOW_THREADS
  return PyLong_FromUnsignedLongLong(total.load());
}

// scatter_read(tensor, offsets, run_bytes, threads=0) -> int: reads the runs [offsets[i], offsets[i] + run_bytes)
// of a contiguous CPU tensor once, the way the retrieval kernels read selected blocks: each worker takes a
// contiguous range of runs (offsets: int64 byte offsets, ascending) and, a quarter run at a time, prefetches
// into L2 the run core::cpu::prefetch_bytes ahead while it reads one. Returns a checksum. The benchmarks time
// it for the bandwidth ceiling of that access pattern (scattered runs cost a core more than a stream: its
// hardware prefetchers do not run ahead across them).
PyObject* scatter_read(PyObject*, PyObject* args) {
  PyObject *obj = nullptr, *off_obj = nullptr;
  long long run_bytes = 0;
  int threads = 0;
  if (!PyArg_ParseTuple(args, "OOL|i", &obj, &off_obj, &run_bytes, &threads)) return nullptr;
  const at::Tensor* t = cpu_tensor_arg(obj, "scatter_read", "tensor");
  if (t == nullptr) return nullptr;
  if (run_bytes <= 0 || run_bytes % 256 != 0) {
    PyErr_Format(PyExc_ValueError, "scatter_read: run_bytes must be a positive multiple of 256, got %lld", run_bytes);
    return nullptr;
  }
  const at::Tensor* off_t = cpu_tensor_arg(off_obj, "scatter_read", "offsets");
  if (off_t == nullptr) return nullptr;
  if (off_t->scalar_type() != at::kLong || off_t->dim() != 1) {
    PyErr_SetString(PyExc_ValueError, "scatter_read: offsets must be a contiguous 1-D int64 CPU tensor");
    return nullptr;
  }
  const at::Tensor& offsets = *off_t;
  const int64_t n = offsets.numel(), limit = int64_t(t->nbytes()) - run_bytes;
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (off[i] < 0 || off[i] > limit || off[i] % 64 != 0) {
      PyErr_Format(PyExc_ValueError, "scatter_read: offsets[%lld] = %lld is not a 64-byte aligned run start inside the "
                   "tensor's %lld bytes", (long long)i, (long long)off[i], (long long)t->nbytes());
      return nullptr;
    }
  }
  const char* base = static_cast<const char*>(t->data_ptr());
  const auto& kt = fluxion::core::cpu::kernels();
  const ThreadCount scope(threads);
  const int readers = int(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n, 1)));
  const int64_t pf_bytes = fluxion::core::cpu::prefetch_bytes(readers);
  const int64_t ahead = pf_bytes == 0 ? 0 : std::max<int64_t>(1, (pf_bytes + run_bytes - 1) / run_bytes);
  const int64_t quarter = run_bytes / 4;
  std::atomic<uint64_t> total{0};
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    uint64_t sum = 0;
    for (int64_t i = begin; i < end; ++i) {
      const char* next = ahead > 0 && i + ahead < end ? base + off[i + ahead] : nullptr;
      for (int64_t q = 0; q < 4; ++q) {
        if (next)
          for (int64_t b = q * quarter; b < (q + 1) * quarter; b += 64) __builtin_prefetch(next + b, 0, 1);
        sum += kt.stream_sum(base + off[i] + q * quarter, quarter);
      }
    }
    total.fetch_add(sum, std::memory_order_relaxed);
  });
  Py_END_ALLOW_THREADS
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
    {"scatter_read", scatter_read, METH_VARARGS,
     "scatter_read(tensor, offsets, run_bytes, threads=0) -> checksum: one read of each run [offsets[i], offsets[i] + "
     "run_bytes) of a contiguous CPU tensor, prefetched as the retrieval kernels prefetch selected blocks."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "Fluxion op library (ops live under torch.ops.fluxion).", -1,
                       kMethods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
