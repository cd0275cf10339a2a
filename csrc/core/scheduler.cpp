#include "core/scheduler.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <exception>
#include <stdexcept>

namespace fluxion::core {
namespace {
double now_s() { return steady_seconds(); }
}  // namespace

TaskQueue::TaskQueue(std::vector<QueueTask> tasks) : tasks_(std::move(tasks)) {
  std::stable_sort(tasks_.begin(), tasks_.end(), [](const QueueTask& a, const QueueTask& b) {
    return a.volume != b.volume ? a.volume > b.volume : a.group < b.group;
  });
  suffix_.assign(tasks_.size() + 1, 0);
  for (size_t i = tasks_.size(); i-- > 0;) suffix_[i] = suffix_[i + 1] + tasks_[i].volume;
}

int64_t TaskQueue::pop() {
  const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
  return i < int64_t(tasks_.size()) ? i : -1;
}

template <class Joins>
std::pair<int64_t, int64_t> TaskQueue::pop_while(Joins joins) {
  const int64_t n = int64_t(tasks_.size());
  int64_t begin = next_.load(std::memory_order_relaxed);
  while (begin < n) {
    int64_t end = begin + 1, vol = tasks_[size_t(begin)].volume;
    while (end < n && joins(vol, tasks_[size_t(end)].volume)) vol += tasks_[size_t(end++)].volume;
    if (next_.compare_exchange_weak(begin, end, std::memory_order_relaxed)) return {begin, end};
  }
  return {n, n};
}

std::pair<int64_t, int64_t> TaskQueue::pop_batch(int64_t max_volume) {
  return pop_while([max_volume](int64_t vol, int64_t next) { return vol + next <= max_volume; });
}

std::pair<int64_t, int64_t> TaskQueue::pop_near(int64_t target) {
  // The next task joins while it brings the sum nearer to the target: vol + next / 2 < target.
  return pop_while([target](int64_t vol, int64_t next) { return 2 * vol + next < 2 * target; });
}

std::pair<int64_t, int64_t> TaskQueue::pop_share(int divisor) {
  const int64_t n = int64_t(tasks_.size());
  int64_t begin = next_.load(std::memory_order_relaxed);
  while (begin < n) {
    const int64_t budget = suffix_[size_t(begin)] / std::max(divisor, 1);
    int64_t end = begin + 1;
    while (end < n && suffix_[size_t(begin)] - suffix_[size_t(end + 1)] <= budget) ++end;
    if (next_.compare_exchange_weak(begin, end, std::memory_order_relaxed)) return {begin, end};
  }
  return {n, n};
}

ControlThread::ControlThread() {
  thread_ = std::thread([this] {
    for (;;) {
      // Poll briefly for the next job, then sleep until one is posted.
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (!posted_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < spin_until)
        std::this_thread::yield();
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return quit_ || (busy_ && job_); });
      if (quit_) return;
      auto fn = std::move(job_);
      job_ = nullptr;
      posted_.store(false, std::memory_order_relaxed);
      lock.unlock();
      fn();  // the job catches its own exceptions
      lock.lock();
      busy_ = false;
      cv_.notify_all();
    }
  });
}

ControlThread::~ControlThread() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    quit_ = true;
  }
  posted_.store(true, std::memory_order_release);  // ends the polling at once
  cv_.notify_all();
  thread_.join();
}

void ControlThread::start(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (busy_) throw std::logic_error("ControlThread::start while a job is running");
  job_ = std::move(fn);
  busy_ = true;
  posted_.store(true, std::memory_order_release);
  cv_.notify_all();
}

void ControlThread::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !busy_; });
}

bool SharingChoice::next() {
  exploring_ = explored_ < kExplore;
  if (exploring_) return explored_++ % 2 == 0;
  const bool faster = shared_rate_ >= alone_rate_;
  if (++since_probe_ >= kProbeEvery) {
    since_probe_ = 0;
    return !faster;
  }
  return faster;
}

void SharingChoice::record(bool shared, int64_t bytes, double seconds) {
  if (bytes <= 0 || seconds <= 0) return;
  const double sample = double(bytes) / seconds;
  double& rate = shared ? shared_rate_ : alone_rate_;
  rate = exploring_ || rate <= 0 ? std::max(rate, sample) : 0.7 * rate + 0.3 * sample;
}

// The GPU side of a run: its running batches and accounting. On the heap, shared with the control thread's job,
// since with a QueueTail that job still waits for the batches after run_task_queue returned.
struct GpuSide {
  std::deque<std::pair<GpuWaitFn, int64_t>> running;  // waiter, volume
  int64_t running_volume = 0;
  double busy_since = 0, busy_s = 0, done_at = 0;
  // When the GPU's batches could start at the earliest (from the prelude): busy intervals count from there.
  std::atomic<double> ready_at{0.0};
  // Set once the side launches no more batches and the control job has run; launch_error is final then.
  std::atomic<bool> launched{false};
  std::exception_ptr launch_error, wait_error;  // wait_error: read only after the job ended

  // Busy time is the union of the batches' [launch, finished] intervals.
  void wait_oldest() {
    const GpuWaitFn wait = std::move(running.front().first);  // off the list first: a failed wait is not retried
    running_volume -= running.front().second;
    running.pop_front();
    if (wait) wait();
    if (running.empty()) {
      done_at = steady_seconds();
      busy_s += done_at - std::max(busy_since, ready_at.load(std::memory_order_acquire));
    }
  }
  // Waits for every launched batch; the first error is kept, the rest still waited for (their outputs are written
  // into buffers the caller may free).
  void wait_all() {
    while (!running.empty()) {
      try {
        wait_oldest();
      } catch (...) {
        if (!wait_error) wait_error = std::current_exception();
      }
    }
  }
  static void hand_over(QueueTail* tail, ControlThread* control, std::shared_ptr<GpuSide> side) {
    tail->control_ = control;
    tail->side_ = std::move(side);
  }
};

void QueueTail::finish(QueueRunStats* stats) {
  if (!side_) return;
  const std::shared_ptr<GpuSide> side = std::move(side_);  // not pending any more, even if this throws
  control_->wait();
  control_ = nullptr;
  if (stats) {
    stats->gpu_busy_s += side->busy_s;
    stats->gpu_done_at = side->done_at;
  }
  if (side->wait_error) std::rethrow_exception(side->wait_error);
}

void run_task_queue(TaskQueue& queue, const CpuBatchFn& cpu_fn, const GpuBatchFn& gpu_fn, ControlThread* control,
                    const QueueSplit& split, QueueRunStats* stats, const std::function<void()>& control_job,
                    const std::function<double()>& cpu_prelude, QueueTail* tail) {
  if (!cpu_fn && !gpu_fn) throw std::invalid_argument("run_task_queue needs a CPU or a GPU consumer");
  if (gpu_fn && !control) throw std::invalid_argument("run_task_queue: a GPU consumer needs a control thread");
  if (tail && tail->pending()) throw std::logic_error("run_task_queue: the previous run's tail is not finished");
  const double t0 = now_s();
  const bool shared = cpu_fn && gpu_fn;
  const double cpu_share = std::min(std::max(split.cpu_share, 0.0), 1.0);
  // A side's next pull: everything when it is alone; its scaled expected share first; then guided shares.
  auto pull = [&](bool first, double share) {
    if (!shared) return queue.pop_batch(queue.total_volume());
    if (first) return queue.pop_near(int64_t(double(queue.total_volume()) * share * split.first_pull));
    return queue.pop_share(split.share_divisor);
  };
  QueueRunStats st;
  // In a shared queue the CPU side starts pulling only once the GPU side has made its first pull: the GPU then
  // always gets its first share (a CPU side that drains a small queue before the control thread runs would
  // leave it nothing), while the launch itself still runs on the control thread, alongside the CPU's work.
  std::atomic<bool> gpu_first_pulled{!shared || split.max_gpu_batches <= 0};
  // Likewise the GPU side pulls ahead of its running batches only once the CPU side has made its first pull, so
  // both first pulls are the shares they were sized as.
  std::atomic<bool> cpu_first_pulled{!shared};
  std::atomic<bool> prelude_failed{false};  // the GPU side stops pulling
  bool job_done = !control_job;
  auto run_job = [&] {
    if (job_done) return;
    job_done = true;
    control_job();
  };
  const auto side = std::make_shared<GpuSide>();
  // Up to gpu_in_flight batches run at once. Once side->launched is set the caller may have returned (with a
  // tail): from there on the job touches nothing but `side`.
  auto gpu_loop = [&, side] {
    try {
      // A drained queue ends the launches at once (not after a wait for a running batch): a tail starts there.
      while (st.gpu_batches < split.max_gpu_batches && !prelude_failed.load(std::memory_order_acquire) &&
             !queue.drained()) {
        if (!side->running.empty() && (int(side->running.size()) >= std::max(split.gpu_in_flight, 1) ||
                                       !cpu_first_pulled.load(std::memory_order_acquire) ||
                                       queue.remaining_volume() <= side->running_volume)) {
          side->wait_oldest();
          continue;
        }
        const auto [b, e] = pull(st.gpu_batches == 0, 1.0 - cpu_share);
        gpu_first_pulled.store(true, std::memory_order_release);
        if (b >= e) break;
        int64_t volume = 0;
        for (int64_t i = b; i < e; ++i) volume += queue[size_t(i)].volume;
        if (side->running.empty()) side->busy_since = now_s();
        side->running.emplace_back(gpu_fn(b, e, int(st.gpu_batches++)), volume);
        side->running_volume += volume;
        st.gpu_tasks += e - b;
        run_job();  // while the first batch runs
      }
    } catch (...) {
      side->launch_error = std::current_exception();
    }
    run_job();
    side->launched.store(true, std::memory_order_release);
    side->wait_all();
  };
  if (gpu_fn) {
    control->start(gpu_loop);
  } else if (control_job) {
    if (control) control->start(run_job);
    else run_job();
  }
  std::exception_ptr cpu_error;
  auto cpu_batch = [&](int64_t b, int64_t e) {
    const double t = now_s();
    cpu_fn(b, e);
    st.cpu_busy_s += now_s() - t;
    st.cpu_tasks += e - b;
    ++st.cpu_batches;
  };
  if (cpu_prelude) {
    double ready = now_s();
    try {
      ready = cpu_prelude();
    } catch (...) {
      cpu_error = std::current_exception();
      prelude_failed.store(true, std::memory_order_release);
    }
    side->ready_at.store(ready, std::memory_order_release);
  }
  if (cpu_fn && !cpu_error) {
    while (!gpu_first_pulled.load(std::memory_order_acquire)) std::this_thread::yield();
    try {
      for (;;) {
        const auto [b, e] = pull(st.cpu_batches == 0, cpu_share);
        cpu_first_pulled.store(true, std::memory_order_release);
        if (b >= e) break;
        cpu_batch(b, e);
      }
    } catch (...) {
      cpu_error = std::current_exception();
    }
  }
  // With a tail, the GPU side's batches are left running once it has launched its last one (and nothing failed).
  bool deferred = false;
  if (gpu_fn) {
    if (tail && !cpu_error) {
      while (!side->launched.load(std::memory_order_acquire)) std::this_thread::yield();
      deferred = !side->launch_error;
    }
    if (deferred) GpuSide::hand_over(tail, control, side);
    else control->wait();
  } else if (control_job && control) {
    control->wait();
  }
  std::exception_ptr gpu_error = side->launch_error;
  if (!deferred) {
    if (!gpu_error) gpu_error = side->wait_error;
    st.gpu_busy_s = side->busy_s;
    st.gpu_done_at = side->done_at;
  }
  // The GPU stopped after max_gpu_batches pulls: what is left runs where it can.
  if (!cpu_error && !gpu_error) {
    const auto [b, e] = queue.pop_batch(queue.total_volume() + 1);
    if (b < e) {
      try {
        if (cpu_fn) {
          cpu_batch(b, e);
        } else {
          const double t = now_s();
          if (GpuWaitFn wait = gpu_fn(b, e, int(st.gpu_batches++))) wait();
          st.gpu_done_at = now_s();
          st.gpu_busy_s += st.gpu_done_at - t;
          st.gpu_tasks += e - b;
        }
      } catch (...) {
        cpu_error = std::current_exception();
      }
    }
  }
  if (gpu_error) std::rethrow_exception(gpu_error);
  if (cpu_error) std::rethrow_exception(cpu_error);
  st.wall_s = now_s() - t0;
  if (stats) *stats = st;
}

}  // namespace fluxion::core
