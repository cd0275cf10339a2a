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

void run_task_queue(TaskQueue& queue, const CpuBatchFn& cpu_fn, const GpuBatchFn& gpu_fn, ControlThread* control,
                    const QueueSplit& split, QueueRunStats* stats, const std::function<void()>& control_job,
                    const std::function<double()>& cpu_prelude) {
  if (!cpu_fn && !gpu_fn) throw std::invalid_argument("run_task_queue needs a CPU or a GPU consumer");
  if (gpu_fn && !control) throw std::invalid_argument("run_task_queue: a GPU consumer needs a control thread");
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
  std::exception_ptr gpu_error;
  // In a shared queue the CPU side starts pulling only once the GPU side has made its first pull: the GPU then
  // always gets its first share (a CPU side that drains a small queue before the control thread runs would
  // leave it nothing), while the launch itself still runs on the control thread, alongside the CPU's work.
  std::atomic<bool> gpu_first_pulled{!shared || split.max_gpu_batches <= 0};
  // Likewise the GPU side pulls ahead of its running batches only once the CPU side has made its first pull, so
  // both first pulls are the shares they were sized as.
  std::atomic<bool> cpu_first_pulled{!shared};
  // When the GPU's batches could start at the earliest (from the prelude): busy intervals count from there.
  std::atomic<double> gpu_ready_at{0.0};
  std::atomic<bool> prelude_failed{false};  // the GPU side stops pulling
  bool job_done = !control_job;
  auto run_job = [&] {
    if (job_done) return;
    job_done = true;
    control_job();
  };
  auto gpu_loop = [&] {
    // Up to gpu_in_flight batches run at once; busy time is the union of their [launch, finished] intervals.
    std::deque<std::pair<GpuWaitFn, int64_t>> running;  // waiter, volume
    int64_t running_volume = 0;
    double busy_since = 0;
    auto wait_oldest = [&] {
      if (running.front().first) running.front().first();
      running_volume -= running.front().second;
      running.pop_front();
      if (running.empty())
        st.gpu_busy_s += now_s() - std::max(busy_since, gpu_ready_at.load(std::memory_order_acquire));
    };
    try {
      while (st.gpu_batches < split.max_gpu_batches && !prelude_failed.load(std::memory_order_acquire)) {
        if (!running.empty() && (int(running.size()) >= std::max(split.gpu_in_flight, 1) ||
                                 !cpu_first_pulled.load(std::memory_order_acquire) ||
                                 queue.remaining_volume() <= running_volume)) {
          wait_oldest();
          continue;
        }
        const auto [b, e] = pull(st.gpu_batches == 0, 1.0 - cpu_share);
        gpu_first_pulled.store(true, std::memory_order_release);
        if (b >= e) break;
        int64_t volume = 0;
        for (int64_t i = b; i < e; ++i) volume += queue[size_t(i)].volume;
        if (running.empty()) busy_since = now_s();
        running.emplace_back(gpu_fn(b, e, int(st.gpu_batches++)), volume);
        running_volume += volume;
        st.gpu_tasks += e - b;
        run_job();  // while the first batch runs
      }
      run_job();
      while (!running.empty()) wait_oldest();
    } catch (...) {
      gpu_error = std::current_exception();
      run_job();
      try {  // launched batches still write their outputs: let them finish before the step's buffers go
        while (!running.empty()) wait_oldest();
      } catch (...) {
      }
    }
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
    gpu_ready_at.store(ready, std::memory_order_release);
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
  if (gpu_fn || (control_job && control)) control->wait();
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
          st.gpu_busy_s += now_s() - t;
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
