// Runs core parallel work on ATen's intra-op pool (OpenMP), so the thread count is torch.set_num_threads.
#pragma once
#include <ATen/Parallel.h>

#include "core/cpu/retrieval.h"

namespace fluxion::ops {

inline core::ParallelFor aten_parallel_for() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) { at::parallel_for(0, n, 1, fn); };
}

inline core::cpu::Executor aten_executor() { return core::cpu::Executor{at::get_num_threads(), aten_parallel_for()}; }

}  // namespace fluxion::ops
