// The shared task queue of the hybrid decode step: retrieval tasks (one per sequence x KV-head group of
// a layer) ordered by data volume, largest first; CPU workers pop single tasks, one control thread pops
// batches for the GPU, each side pulling again when free. Torch-free; the devices are callbacks.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/kv_store.h"

namespace fluxion::core {

struct QueueTask {
  int32_t group = 0;   // b * Hkv + kv_head
  int64_t volume = 0;  // bytes the task is expected to read (metadata + selected K/V)
};

class TaskQueue {
 public:
  // Sorts by volume, largest first (ties: lower group first, so the order is deterministic).
  explicit TaskQueue(std::vector<QueueTask> tasks);
  size_t size() const { return tasks_.size(); }
  const QueueTask& operator[](size_t i) const { return tasks_[i]; }
  int64_t total_volume() const { return total_; }
  // Next task index, or -1 when the queue is empty.
  int64_t pop();
  // Consecutive tasks [begin, end) whose volume adds up to at most max_volume (always at least one task
  // when any is left; empty range when none is).
  std::pair<int64_t, int64_t> pop_batch(int64_t max_volume);

 private:
  std::vector<QueueTask> tasks_;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0};
};

struct QueueRunStats {
  double wall_s = 0;       // whole run
  double cpu_busy_s = 0;   // summed over workers
  double gpu_busy_s = 0;   // control thread: from launch to completion of its batches
  int64_t cpu_tasks = 0, gpu_tasks = 0, gpu_batches = 0;
};

// Runs the queue to exhaustion. cpu_fn(task_index, worker) runs one task on a CPU worker (there are
// `cpu_workers` of them, started through `parallel`); gpu_fn(begin, end, batch) launches a batch on the
// GPU and returns when it has finished. With gpu_fn empty, everything runs on the CPU; with
// cpu_workers == 0, everything runs on the GPU. A GPU pull takes at most `gpu_batch_volume` bytes of
// tasks, and at most `max_gpu_batches` pulls happen.
void run_task_queue(TaskQueue& queue, int cpu_workers, const ParallelFor& parallel,
                    const std::function<void(int64_t, int)>& cpu_fn,
                    const std::function<void(int64_t, int64_t, int)>& gpu_fn, int64_t gpu_batch_volume,
                    int max_gpu_batches, QueueRunStats* stats);

}  // namespace fluxion::core
