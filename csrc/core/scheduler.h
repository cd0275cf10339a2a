// The shared task queue of the hybrid decode step: retrieval tasks (one per sequence x KV-head group of
// a layer) ordered by data volume, largest first. Two consumers pull from it, each taking the next tasks
// when it is free: the CPU side (a batch runs on every CPU thread at once) and one control thread that
// launches batches on the GPU. Torch-free; the devices are callbacks.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace fluxion::core {

// Seconds on the steady clock: the time base of the queue's timers and of run_task_queue's cpu_prelude.
inline double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

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
  int64_t total_volume() const { return suffix_.empty() ? 0 : suffix_[0]; }
  // Volume of the tasks nobody has pulled yet.
  int64_t remaining_volume() const {
    const int64_t i = std::min<int64_t>(next_.load(std::memory_order_relaxed), int64_t(tasks_.size()));
    return suffix_.empty() ? 0 : suffix_[size_t(i)];
  }
  // Whether every task has been pulled.
  bool drained() const { return next_.load(std::memory_order_relaxed) >= int64_t(tasks_.size()); }
  // Next task index, or -1 when the queue is empty.
  int64_t pop();
  // Consecutive tasks [begin, end) whose volume adds up to at most max_volume (always at least one task
  // when any is left; empty range when none is).
  std::pair<int64_t, int64_t> pop_batch(int64_t max_volume);
  // Consecutive tasks whose volume adds up as near to `target` as whole tasks allow (at least one task when any
  // is left): a side's first pull, so a share of 2.6 tasks takes 3 in one batch, not 2 and a late single.
  std::pair<int64_t, int64_t> pop_near(int64_t target);
  // Guided self-scheduling: at most 1/divisor of the volume still queued (at least one task), so pulls shrink
  // as the queue drains and the consumers finish close together.
  std::pair<int64_t, int64_t> pop_share(int divisor);

 private:
  // Consecutive tasks from the next one (at least one when any is left) while joins(volume so far, next task's
  // volume) holds; claimed atomically.
  template <class Joins>
  std::pair<int64_t, int64_t> pop_while(Joins joins);
  std::vector<QueueTask> tasks_;
  std::vector<int64_t> suffix_;  // suffix_[i] = volume of tasks [i, n)
  std::atomic<int64_t> next_{0};
};

struct QueueRunStats {
  double wall_s = 0;      // whole run (until run_task_queue returned)
  double cpu_busy_s = 0;  // CPU side: time spent running its batches (on all its threads)
  double gpu_busy_s = 0;  // control thread: from launch to completion of its batches
  double gpu_done_at = 0;  // steady_seconds() when the GPU side's last batch finished (0: it ran none)
  int64_t cpu_tasks = 0, gpu_tasks = 0, cpu_batches = 0, gpu_batches = 0;
};

// A thread kept across runs so that a decode step does not pay a thread start per layer. Between jobs it
// polls for the next one for up to kSpin before it sleeps: a decode step hands it a job per layer, about a
// millisecond apart, and waking a sleeping thread takes tens of microseconds that the GPU would sit idle for.
// The thread has a core of its own (the CPU side leaves one to it), so the polling costs no other work.
class ControlThread {
 public:
  ControlThread();
  ~ControlThread();
  ControlThread(const ControlThread&) = delete;
  ControlThread& operator=(const ControlThread&) = delete;
  // Runs fn on the thread; wait() returns once it has returned. One job at a time.
  void start(std::function<void()> fn);
  void wait();

 private:
  static constexpr std::chrono::microseconds kSpin{5000};
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> job_;
  bool busy_ = false, quit_ = false;
  std::atomic<bool> posted_{false};  // a job waits (read without the lock while polling)
  std::thread thread_;
};

using CpuBatchFn = std::function<void(int64_t begin, int64_t end)>;
// The GPU side launches a batch and returns at once with a function that waits for it (empty: the batch has
// already finished), so the control thread can launch its next batch while one runs and the GPU never idles
// through the host's launch work between batches.
using GpuWaitFn = std::function<void()>;
using GpuBatchFn = std::function<GpuWaitFn(int64_t begin, int64_t end, int batch)>;

// How the two sides split the queue. Both devices run large batches far better than small ones (the CPU
// side runs a batch's top-k and unions on as many threads as it has tasks and heads, the GPU pays a launch, a
// wait and a latency-bound top-k), so each side's first pull is its whole expected share of the volume (from
// the throughputs measured on earlier steps; first_pull scales it), rounded to the nearest whole task, and
// later pulls take 1/share_divisor of what is left. Smaller pulls cost more than the balance they buy: on the
// H200 box (Llama-3.1-8B shape, 8 layers, 128K, batch 1, share16-0.05: 8 tasks per layer), first_pull 0.8 and
// share_divisor 3 left the CPU side at 40-44 GB/s and the attention step at 16.6-19.1 ms; 1.0 and 2 gave 72
// GB/s and 12.6 ms.
struct QueueSplit {
  double cpu_share = 0.5;   // expected fraction of the volume the CPU side finishes in the time the GPU does the rest
  double first_pull = 1.0;  // fraction of that share taken by each side's first pull
  int share_divisor = 2;
  int max_gpu_batches = 16;
  // GPU batches launched and not yet waited for (>= 1). A batch is pulled ahead of the running ones only while
  // the queue still holds more than they do: near the end the CPU side takes what is left instead.
  int gpu_in_flight = 2;
};

// Adaptive sharing for one layer (FluxionConfig.device_policy='auto'): whether its next step shares the queue
// with the GPU or runs on the CPU alone. Both devices read host DRAM and the GPU's reads slow the CPU's, so which
// is faster depends on the step (dense steps gain from both) and on the host's speed at the time.
// The first kExplore steps alternate between the two, each option keeping its best rate (a first step pays
// one-off costs: threads waking, buffers growing, and a noisy host only ever slows a step down); after that the
// faster option runs, the other every kProbeEvery steps, and rates are running averages.
class SharingChoice {
 public:
  static constexpr int kExplore = 4, kProbeEvery = 32;
  bool next();  // true: share the next step with the GPU
  // The step chosen by the last next() read `bytes` in `seconds` of retrieval.
  void record(bool shared, int64_t bytes, double seconds);
  double shared_rate() const { return shared_rate_; }
  double alone_rate() const { return alone_rate_; }

 private:
  double shared_rate_ = 0, alone_rate_ = 0;  // bytes / s
  int explored_ = 0, since_probe_ = 0;
  bool exploring_ = false;  // the last next() was an exploring step
};

struct GpuSide;  // scheduler.cpp: the GPU side of a run, shared with the control thread's job

// The end of a run that returned while its GPU batches were still running (run_task_queue's `tail`): the control
// thread goes on waiting for them. finish() waits for that, adds the GPU side's busy time and gpu_done_at to the
// run's stats and rethrows an error of that wait; it must run before `control` takes another job.
class QueueTail {
 public:
  bool pending() const { return side_ != nullptr; }
  void finish(QueueRunStats* stats);

 private:
  friend struct GpuSide;
  ControlThread* control_ = nullptr;
  std::shared_ptr<GpuSide> side_;
};

// Runs the queue to exhaustion. cpu_fn runs a batch of tasks on the calling thread (it may use every CPU
// thread); gpu_fn launches a batch from `control` (up to split.gpu_in_flight at once; a new pull happens when
// fewer are running). With both sides, the GPU side pulls first (the CPU side waits for that pull, not for the
// launch), so the GPU always gets its first share. Empty gpu_fn:
// everything runs on the CPU in one batch; empty cpu_fn: everything on the GPU in one batch. The GPU pulls
// at most split.max_gpu_batches times (anything left then runs on the CPU).
// control_job: work for the control thread that is off the critical path (the decode step's store write), run
// once: by the GPU side right after its first launch, or, without a GPU side, on `control` beside the CPU side
// (on the calling thread first when there is no `control`). It must not throw; the run returns after it.
// cpu_prelude: what the CPU side needs before its first pull (the decode step's wait for q on the host), run on
// the calling thread once the GPU side has started: the GPU's first batch, which needs nothing from the host, is
// then enqueued while the host still waits. It returns when (steady_seconds()) the GPU's batches could start at
// the earliest (the moment q was there); the GPU side's busy time counts from then, so its measured rate is not
// charged for the wait. If it throws, the GPU side stops pulling, launched batches finish, and the error is
// rethrown.
// tail: where given, the run returns as soon as the CPU side is done and the GPU side has launched its last batch
// (and run control_job), leaving the wait for its batches on `control` (GPU work enqueued after them, such as
// the decode step's merge, runs in stream order): *tail then holds that wait, and the stats lack the GPU side's
// busy time until tail->finish(). The waiters that gpu_fn returns then run after the run returned: they must
// not refer to the caller's locals. A run that fails, or has no GPU side, returns complete (tail empty).
void run_task_queue(TaskQueue& queue, const CpuBatchFn& cpu_fn, const GpuBatchFn& gpu_fn, ControlThread* control,
                    const QueueSplit& split, QueueRunStats* stats, const std::function<void()>& control_job = {},
                    const std::function<double()>& cpu_prelude = {}, QueueTail* tail = nullptr);

}  // namespace fluxion::core
