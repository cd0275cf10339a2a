#include "core/scheduler.h"

#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

namespace fluxion::core {
namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

TaskQueue::TaskQueue(std::vector<QueueTask> tasks) : tasks_(std::move(tasks)) {
  std::stable_sort(tasks_.begin(), tasks_.end(), [](const QueueTask& a, const QueueTask& b) {
    return a.volume != b.volume ? a.volume > b.volume : a.group < b.group;
  });
  for (const auto& t : tasks_) total_ += t.volume;
}

int64_t TaskQueue::pop() {
  const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
  return i < int64_t(tasks_.size()) ? i : -1;
}

std::pair<int64_t, int64_t> TaskQueue::pop_batch(int64_t max_volume) {
  const int64_t n = int64_t(tasks_.size());
  int64_t begin = next_.load(std::memory_order_relaxed);
  while (begin < n) {
    int64_t end = begin + 1, vol = tasks_[size_t(begin)].volume;
    while (end < n && vol + tasks_[size_t(end)].volume <= max_volume) vol += tasks_[size_t(end++)].volume;
    if (next_.compare_exchange_weak(begin, end, std::memory_order_relaxed)) return {begin, end};
  }
  return {n, n};
}

void run_task_queue(TaskQueue& queue, int cpu_workers, const ParallelFor& parallel,
                    const std::function<void(int64_t, int)>& cpu_fn,
                    const std::function<void(int64_t, int64_t, int)>& gpu_fn, int64_t gpu_batch_volume,
                    int max_gpu_batches, QueueRunStats* stats) {
  const double t0 = now_s();
  std::atomic<int64_t> cpu_tasks{0};
  std::vector<double> busy(size_t(std::max(cpu_workers, 1)), 0.0);
  double gpu_busy = 0;
  int64_t gpu_tasks = 0;
  int batches = 0;
  std::exception_ptr gpu_error;
  std::thread control;
  if (gpu_fn) {
    control = std::thread([&] {
      try {
        while (batches < max_gpu_batches) {
          const auto [b, e] = queue.pop_batch(std::max<int64_t>(gpu_batch_volume, 1));
          if (b >= e) break;
          const double t = now_s();
          gpu_fn(b, e, batches++);
          gpu_busy += now_s() - t;
          gpu_tasks += e - b;
        }
      } catch (...) {
        gpu_error = std::current_exception();
      }
    });
  }
  std::exception_ptr cpu_error;
  std::mutex err_mu;
  auto worker = [&](int w) {
    try {
      for (int64_t i = queue.pop(); i >= 0; i = queue.pop()) {
        const double t = now_s();
        cpu_fn(i, w);
        busy[size_t(w)] += now_s() - t;
        cpu_tasks.fetch_add(1, std::memory_order_relaxed);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (!cpu_error) cpu_error = std::current_exception();
    }
  };
  if (cpu_workers > 0) {
    if (parallel && cpu_workers > 1) {
      parallel(cpu_workers, [&](int64_t b, int64_t e) {
        for (int64_t w = b; w < e; ++w) worker(int(w));
      });
    } else {
      worker(0);
    }
  }
  if (control.joinable()) control.join();
  // The GPU stops after max_gpu_batches pulls: anything left (rare) runs on the CPU.
  if (cpu_workers == 0 || gpu_fn) worker(0);
  if (gpu_error) std::rethrow_exception(gpu_error);
  if (cpu_error) std::rethrow_exception(cpu_error);
  if (stats) {
    stats->wall_s = now_s() - t0;
    stats->cpu_busy_s = 0;
    for (double b : busy) stats->cpu_busy_s += b;
    stats->gpu_busy_s = gpu_busy;
    stats->cpu_tasks = cpu_tasks.load();
    stats->gpu_tasks = gpu_tasks;
    stats->gpu_batches = batches;
  }
}

}  // namespace fluxion::core
