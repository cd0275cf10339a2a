// The shared task queue: every task runs exactly once, largest first, pulls bounded by volume.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <set>
#include <thread>

#include "catch_compat.h"
#include "core/scheduler.h"

using namespace fluxion;

namespace {
// n tasks of 100 bytes each (groups 0 .. n - 1).
std::vector<core::QueueTask> equal_tasks(int n) {
  std::vector<core::QueueTask> tasks;
  for (int g = 0; g < n; ++g) tasks.push_back({g, 100});
  return tasks;
}

// A split whose CPU side expects `cpu_share` of the volume, its first pulls `first_pull` of each side's share.
core::QueueSplit split_at(double cpu_share, double first_pull = 1.0) {
  core::QueueSplit split;
  split.cpu_share = cpu_share;
  split.first_pull = first_pull;
  return split;
}

// Each side's pull sizes over one run of the queue. A GPU batch "runs" until the CPU side has pulled once, as a
// real one would, so the GPU cannot drain the queue before the CPU's first pull.
std::pair<std::vector<int64_t>, std::vector<int64_t>> pull_sizes(core::TaskQueue& q, const core::QueueSplit& split,
                                                                 core::ControlThread& control) {
  std::vector<int64_t> cpu_pulls, gpu_pulls;
  std::atomic<bool> cpu_pulled{false};
  core::run_task_queue(
      q,
      [&](int64_t b, int64_t e) {
        cpu_pulls.push_back(e - b);
        cpu_pulled = true;
      },
      [&](int64_t b, int64_t e, int) {
        gpu_pulls.push_back(e - b);
        return core::GpuWaitFn([&] {
          for (int i = 0; i < 100000 && !cpu_pulled; ++i) std::this_thread::sleep_for(std::chrono::microseconds(10));
        });
      },
      &control, split, nullptr);
  return {cpu_pulls, gpu_pulls};
}
}  // namespace

TEST_CASE("queue orders by volume and pops every task once", "[scheduler]") {
  core::TaskQueue q({{0, 5}, {1, 50}, {2, 7}, {3, 50}, {4, 1}});
  REQUIRE(q.total_volume() == 113);
  REQUIRE(q[0].group == 1);
  REQUIRE(q[1].group == 3);
  REQUIRE(q[4].group == 4);
  const auto [b, e] = q.pop_batch(60);  // 50 fits, 50 + 50 does not
  REQUIRE(b == 0);
  REQUIRE(e == 1);
  REQUIRE(q.pop() == 1);
  const auto [b2, e2] = q.pop_batch(12);  // 7 + 5 = 12
  REQUIRE(b2 == 2);
  REQUIRE(e2 == 4);
  REQUIRE(q.pop() == 4);
  REQUIRE(q.pop() == -1);
  const auto [b3, e3] = q.pop_batch(100);
  REQUIRE(b3 == e3);
}

TEST_CASE("a pull near a target takes the whole tasks nearest to it", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::TaskQueue q(tasks);
  auto [b, e] = q.pop_near(264);  // 2.64 tasks: 3 (a floor would take 2)
  REQUIRE(b == 0);
  REQUIRE(e == 3);
  std::tie(b, e) = q.pop_near(250);  // 2.5 tasks: a tie keeps the smaller pull
  REQUIRE(e - b == 2);
  std::tie(b, e) = q.pop_near(10);  // less than half a task: still one
  REQUIRE(e - b == 1);
  std::tie(b, e) = q.pop_near(1000);  // more than is left: the 2 left
  REQUIRE(e - b == 2);
  REQUIRE(e == 8);
  std::tie(b, e) = q.pop_near(100);
  REQUIRE(b == e);
}

TEST_CASE("guided shares shrink as the queue drains", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(12);
  core::TaskQueue q(tasks);
  auto [b, e] = q.pop_share(3);  // a third of 1200
  REQUIRE(b == 0);
  REQUIRE(e == 4);
  std::tie(b, e) = q.pop_share(3);  // a third of 800: 2 tasks
  REQUIRE(e - b == 2);
  std::tie(b, e) = q.pop_share(100);  // less than one task: still one
  REQUIRE(e - b == 1);
}

TEST_CASE("first pulls take the expected shares, later ones guided shares", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(20);
  core::TaskQueue q(tasks);
  // The CPU is three times as fast: its first pull is 0.8 x 75% of the volume.
  core::QueueSplit split = split_at(0.75, 0.8);
  split.gpu_in_flight = 1;
  core::ControlThread control;
  const auto [cpu_pulls, gpu_pulls] = pull_sizes(q, split, control);
  REQUIRE(cpu_pulls.at(0) == 12);
  REQUIRE((gpu_pulls.empty() || gpu_pulls[0] <= 4));  // at most 0.8 x 25% of the 20 tasks
}

TEST_CASE("the CPU side and the GPU control thread share the queue without loss or repeats", "[scheduler]") {
  std::vector<core::QueueTask> tasks;
  for (int g = 0; g < 200; ++g) tasks.push_back({g, 1000 + (g * 37) % 500});
  core::TaskQueue q(tasks);
  std::mutex mu;
  std::multiset<int32_t> seen;
  int64_t gpu_seen = 0;
  core::QueueRunStats st;
  core::ControlThread control;
  auto record = [&](int64_t b, int64_t e) {
    std::this_thread::sleep_for(std::chrono::microseconds(50 * (e - b)));
    std::lock_guard<std::mutex> l(mu);
    for (int64_t i = b; i < e; ++i) seen.insert(q[size_t(i)].group);
  };
  core::run_task_queue(
      q, record,
      [&](int64_t b, int64_t e, int) {
        // Launch returns at once; the work happens in the wait, as on a GPU.
        gpu_seen += e - b;
        return core::GpuWaitFn([&record, b, e] { record(b, e); });
      },
      &control, core::QueueSplit{}, &st);
  REQUIRE(seen.size() == 200);
  REQUIRE(std::set<int32_t>(seen.begin(), seen.end()).size() == 200);
  REQUIRE(st.cpu_tasks + st.gpu_tasks == 200);
  REQUIRE(st.gpu_tasks == gpu_seen);
  REQUIRE(st.gpu_tasks > 0);  // both sides pulled
  REQUIRE(st.cpu_tasks > 0);
}

TEST_CASE("in a shared queue the GPU side pulls its first share before the CPU side pulls", "[scheduler]") {
  // A CPU side that drains the queue at once must still leave the GPU its first pull, however late the control
  // thread runs.
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  for (int rep = 0; rep < 20; ++rep) {
    core::TaskQueue q(tasks);
    core::QueueRunStats st;
    int64_t first_gpu_begin = -1, first_gpu_size = -1;
    core::run_task_queue(
        q, [&](int64_t, int64_t) {},
        [&](int64_t b, int64_t e, int batch) {
          if (batch == 0) first_gpu_begin = b, first_gpu_size = e - b;
          return core::GpuWaitFn{};
        },
        &control, core::QueueSplit{}, &st);
    // The queue's first tasks, the GPU's whole expected half of 8 equal tasks (first_pull 1): 4 of them.
    REQUIRE(first_gpu_begin == 0);
    REQUIRE(first_gpu_size == 4);
    REQUIRE(st.cpu_tasks + st.gpu_tasks == 8);
  }
}

TEST_CASE("a side's first pull rounds its expected share to the nearest whole task", "[scheduler]") {
  // 8 equal tasks and a CPU twice as fast: the GPU's share is 2.64 tasks, so it takes 3 in its first batch
  // and the CPU the other 5, rather than 2 and 5 with the last one left to whoever is free first.
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  const core::QueueSplit split = split_at(0.67);
  for (int rep = 0; rep < 10; ++rep) {
    core::TaskQueue q(tasks);
    const auto [cpu_pulls, gpu_pulls] = pull_sizes(q, split, control);
    REQUIRE(gpu_pulls.at(0) == 3);
    REQUIRE(cpu_pulls.at(0) == 5);
    REQUIRE(gpu_pulls.size() == 1);
    REQUIRE(cpu_pulls.size() == 1);
  }
}

TEST_CASE("a capped GPU side leaves the rest to the CPU, and one side alone takes one batch", "[scheduler]") {
  std::vector<core::QueueTask> tasks;
  for (int g = 0; g < 50; ++g) tasks.push_back({g, 10});
  core::ControlThread control;
  core::TaskQueue q(tasks);
  core::QueueRunStats st;
  std::atomic<int64_t> ran{0};  // both sides add to it
  core::QueueSplit one_gpu_pull;
  one_gpu_pull.max_gpu_batches = 1;
  core::run_task_queue(
      q, [&](int64_t b, int64_t e) { ran += e - b; }, [&](int64_t b, int64_t e, int) {
        ran += e - b;
        return core::GpuWaitFn{};
      },
      &control,
      one_gpu_pull, &st);
  REQUIRE(ran == 50);
  REQUIRE(st.gpu_batches <= 1);
  core::TaskQueue alone(tasks);
  core::run_task_queue(alone, {}, [&](int64_t b, int64_t e, int) {
    REQUIRE(e - b == 50);
    return core::GpuWaitFn{};
  }, &control, core::QueueSplit{}, &st);
  REQUIRE(st.gpu_batches == 1);
}

TEST_CASE("without a GPU callback every task runs on the CPU and errors propagate", "[scheduler]") {
  core::TaskQueue q({{0, 1}, {1, 2}, {2, 3}});
  int ran = 0, batches = 0;
  core::run_task_queue(q, [&](int64_t b, int64_t e) { ran += int(e - b), ++batches; }, {}, nullptr, core::QueueSplit{}, nullptr);
  REQUIRE(ran == 3);
  REQUIRE(batches == 1);
  core::TaskQueue q2({{0, 1}, {1, 2}});
  core::ControlThread control;
  REQUIRE_THROWS_AS(core::run_task_queue(
                        q2, [&](int64_t, int64_t) { throw std::runtime_error("boom"); }, {}, nullptr, core::QueueSplit{}, nullptr),
                    std::runtime_error);
  core::TaskQueue q3({{0, 1}, {1, 2}});
  REQUIRE_THROWS_AS(core::run_task_queue(
                        q3, {}, [](int64_t, int64_t, int) -> core::GpuWaitFn { throw std::runtime_error("gpu"); },
                        &control, core::QueueSplit{}, nullptr),
                    std::runtime_error);
}

TEST_CASE("the GPU side pulls ahead of a running batch only while the queue holds more than it runs", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(24);
  core::TaskQueue q(tasks);
  core::ControlThread control;
  // First pulls of half the shares: the GPU's is one task (1.2) and the CPU's 11 (10.8), so the queue is long when
  // the GPU could pull again.
  const core::QueueSplit split = split_at(0.9, 0.5);
  std::mutex mu;
  int64_t running = 0, running_volume = 0, launches_ahead = 0;
  int max_running = 0;
  bool guard_held = true;
  core::QueueRunStats st;
  std::atomic<bool> cpu_started{false};
  core::run_task_queue(
      q,
      [&](int64_t, int64_t) {
        cpu_started = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      },
      [&](int64_t b, int64_t e, int batch) {
        // The first launch returns once the CPU side has pulled (a real launch takes tens of microseconds), so
        // the check that follows it sees the queue the two first pulls left, however loaded this machine is.
        while (batch == 0 && !cpu_started) std::this_thread::yield();
        std::lock_guard<std::mutex> l(mu);
        const int64_t volume = (e - b) * 100, remaining_before = q.remaining_volume() + volume;
        if (running > 0) {
          ++launches_ahead;
          guard_held = guard_held && remaining_before > running_volume;
        }
        ++running;
        running_volume += volume;
        max_running = std::max<int>(max_running, int(running));
        return core::GpuWaitFn([&, volume] {
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
          std::lock_guard<std::mutex> l2(mu);
          --running;
          running_volume -= volume;
        });
      },
      &control, split, &st);
  REQUIRE(st.cpu_tasks + st.gpu_tasks == 24);
  REQUIRE(max_running <= split.gpu_in_flight);
  REQUIRE(guard_held);
  REQUIRE(launches_ahead > 0);  // it did pull ahead while the queue was long
  REQUIRE(running == 0);        // every launched batch was waited for
}

// Drives one layer's choice for `steps` steps; the step that shares reads at `shared` bytes/s, the CPU alone at
// `alone` (functions of the step index). Returns the choices.
template <class SharedRate, class AloneRate>
std::vector<bool> drive(core::SharingChoice& c, int steps, SharedRate shared, AloneRate alone) {
  std::vector<bool> picks;
  for (int i = 0; i < steps; ++i) {
    const bool share = c.next();
    c.record(share, 1000000, 1000000.0 / (share ? shared(i) : alone(i)));
    picks.push_back(share);
  }
  return picks;
}

TEST_CASE("the control job runs once, after the GPU side's first launch or beside a CPU-only run", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  const auto caller = std::this_thread::get_id();
  for (int rep = 0; rep < 20; ++rep) {
    // Shared: the job runs on the control thread, after the first launch and before that batch is waited for.
    {
      core::TaskQueue q(tasks);
      std::atomic<int> jobs{0}, launches{0}, waited{0};
      std::atomic<int> launches_before_job{-1}, waits_before_job{-1};
      std::thread::id job_thread;
      const core::QueueSplit split = split_at(0.5);
      core::run_task_queue(
          q, [&](int64_t, int64_t) {},
          [&](int64_t, int64_t, int) {
            ++launches;
            return core::GpuWaitFn([&] { ++waited; });
          },
          &control, split, nullptr,
          [&] {
            launches_before_job = launches.load();
            waits_before_job = waited.load();
            job_thread = std::this_thread::get_id();
            ++jobs;
          });
      REQUIRE(jobs == 1);
      REQUIRE(launches_before_job == 1);
      REQUIRE(waits_before_job == 0);
      REQUIRE(job_thread != caller);
    }
    // CPU only, with a control thread: the job runs there while the CPU side works, and the run returns after it.
    {
      core::TaskQueue q(tasks);
      std::atomic<bool> job_started{false}, job_done{false};
      std::thread::id job_thread;
      int cpu_batches = 0;
      core::run_task_queue(
          q,
          [&](int64_t, int64_t) {
            ++cpu_batches;
            for (int i = 0; i < 100000 && !job_started; ++i) std::this_thread::sleep_for(std::chrono::microseconds(10));
          },
          core::GpuBatchFn{}, &control, core::QueueSplit{}, nullptr,
          [&] {
            job_started = true;
            job_thread = std::this_thread::get_id();
            std::this_thread::sleep_for(std::chrono::milliseconds(2));
            job_done = true;
          });
      REQUIRE(job_started);
      REQUIRE(job_done);  // the run waited for it
      REQUIRE(cpu_batches == 1);
      REQUIRE(job_thread != caller);
    }
    // No control thread: the calling thread runs it.
    {
      core::TaskQueue q(tasks);
      std::thread::id job_thread;
      core::run_task_queue(q, [&](int64_t, int64_t) {}, core::GpuBatchFn{}, nullptr, core::QueueSplit{}, nullptr,
                           [&] { job_thread = std::this_thread::get_id(); });
      REQUIRE(job_thread == caller);
    }
  }
}

TEST_CASE("the CPU prelude runs while the GPU's first batch is out, and a failing one stops the run", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  const core::QueueSplit split = split_at(0.5);
  for (int rep = 0; rep < 20; ++rep) {
    // The GPU launches its first batch before the prelude returns; the CPU pulls only after the prelude.
    {
      core::TaskQueue q(tasks);
      std::atomic<int> launches{0}, launches_in_prelude{-1};
      std::atomic<bool> prelude_done{false}, cpu_before_prelude{false};
      std::mutex mu;
      std::set<int64_t> seen;
      core::QueueRunStats stats;
      core::run_task_queue(
          q,
          [&](int64_t b, int64_t e) {
            if (!prelude_done) cpu_before_prelude = true;
            std::lock_guard<std::mutex> lock(mu);
            for (int64_t i = b; i < e; ++i) REQUIRE(seen.insert(i).second);
          },
          [&](int64_t b, int64_t e, int) {
            ++launches;
            {
              std::lock_guard<std::mutex> lock(mu);
              for (int64_t i = b; i < e; ++i) REQUIRE(seen.insert(i).second);
            }
            // Like a real batch, it cannot finish before q is there (the prelude's end).
            return core::GpuWaitFn([&] {
              for (int i = 0; i < 100000 && !prelude_done; ++i) std::this_thread::sleep_for(std::chrono::microseconds(10));
              std::this_thread::sleep_for(std::chrono::microseconds(200));
            });
          },
          &control, split, &stats, {},
          [&] {
            // Like the host's wait for q: long enough for the control thread to launch.
            for (int i = 0; i < 100000 && launches == 0; ++i) std::this_thread::sleep_for(std::chrono::microseconds(10));
            launches_in_prelude = launches.load();
            const double ready = core::steady_seconds();
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
            prelude_done = true;
            return ready + 0.002;
          });
      REQUIRE(launches_in_prelude == 1);
      REQUIRE_FALSE(cpu_before_prelude);
      REQUIRE(seen.size() == tasks.size());
      // The GPU's busy time counts from when the prelude says the GPU could start (2 ms in), not from the launch
      // before it; the first batch ran until 5 ms in at the earliest.
      REQUIRE(stats.gpu_busy_s > 0.0029);
      REQUIRE(stats.gpu_busy_s < stats.wall_s - 0.0019);
    }
    // A prelude that throws: the GPU stops pulling, its batches are waited for, the error reaches the caller.
    {
      core::TaskQueue q(tasks);
      std::atomic<int> running{0}, cpu_batches{0};
      REQUIRE_THROWS_AS(core::run_task_queue(
                              q, [&](int64_t, int64_t) { ++cpu_batches; },
                              [&](int64_t, int64_t, int) {
                                ++running;
                                return core::GpuWaitFn([&] { --running; });
                              },
                              &control, split, nullptr, {}, []() -> double { throw std::invalid_argument("q never came"); }),
                          std::invalid_argument);
      REQUIRE(running == 0);
      REQUIRE(cpu_batches == 0);
    }
  }
}

TEST_CASE("adaptive sharing explores both options, then runs the faster and probes the other", "[scheduler]") {
  core::SharingChoice c;
  const auto picks = drive(c, 3 * core::SharingChoice::kProbeEvery, [](int) { return 50.0; }, [](int) { return 80.0; });
  const int E = core::SharingChoice::kExplore;
  for (int i = 0; i < E; ++i) REQUIRE(picks[size_t(i)] == (i % 2 == 0));  // alternating, sharing first
  int shared_after = 0;
  for (size_t i = size_t(E); i < picks.size(); ++i) shared_after += picks[i];
  // The CPU alone is faster: sharing only on the probes, one every kProbeEvery steps.
  REQUIRE(shared_after == (3 * core::SharingChoice::kProbeEvery - E) / core::SharingChoice::kProbeEvery);
  REQUIRE(c.alone_rate() == Approx(80.0));
}

TEST_CASE("adaptive sharing: a slow first step does not decide", "[scheduler]") {
  // The first shared step pays one-off costs (a tenth of its real rate); exploring keeps each option's best.
  core::SharingChoice c;
  const auto picks = drive(c, 20, [](int i) { return i == 0 ? 10.0 : 100.0; }, [](int) { return 60.0; });
  for (size_t i = size_t(core::SharingChoice::kExplore); i < picks.size(); ++i) REQUIRE(picks[i]);
  REQUIRE(c.shared_rate() == Approx(100.0));
}

TEST_CASE("adaptive sharing follows a change in load through its probes", "[scheduler]") {
  // Sharing is faster at first; from step 40 on the CPU alone is (the other side's load grew).
  core::SharingChoice c;
  const auto picks = drive(c, 400, [](int i) { return i < 40 ? 100.0 : 30.0; }, [](int) { return 60.0; });
  REQUIRE(picks[20]);
  int shared_late = 0;
  for (size_t i = 300; i < 400; ++i) shared_late += picks[i];
  REQUIRE(shared_late <= 100 / core::SharingChoice::kProbeEvery + 1);  // probes only
  // No bytes or no time (a step with nothing to read) teaches nothing.
  core::SharingChoice d;
  d.next();
  d.record(true, 0, 1.0);
  d.record(true, 100, 0.0);
  REQUIRE(d.shared_rate() == 0.0);
}

TEST_CASE("with a tail the run returns once the GPU side has launched, and finish() waits for its batches", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  const core::QueueSplit split = split_at(0.5);
  for (int rep = 0; rep < 20; ++rep) {
    core::TaskQueue q(tasks);
    std::mutex mu;
    std::set<int64_t> seen;
    auto take = [&](int64_t b, int64_t e) {
      std::lock_guard<std::mutex> lock(mu);
      for (int64_t i = b; i < e; ++i) REQUIRE(seen.insert(i).second);
    };
    // The GPU's batches run until released, after the run has returned; the waiters own what they touch.
    auto release = std::make_shared<std::atomic<bool>>(false);
    auto finished = std::make_shared<std::atomic<int>>(0);
    std::atomic<int> launched{0};
    std::atomic<bool> cpu_started{false};
    bool job_ran = false;
    core::QueueRunStats stats;
    core::QueueTail tail;
    core::run_task_queue(
        q,
        [&](int64_t b, int64_t e) {
          cpu_started = true;
          take(b, e);
        },
        [&](int64_t b, int64_t e, int batch) {
          // The first launch returns once the CPU side has pulled: the GPU side cannot be waiting for its batch
          // (which here only finishes after the run) before the CPU side has drained the queue.
          while (batch == 0 && !cpu_started) std::this_thread::yield();
          take(b, e);
          ++launched;
          return core::GpuWaitFn([release, finished] {
            while (!*release) std::this_thread::yield();
            ++*finished;
          });
        },
        &control, split, &stats, [&] { job_ran = true; }, {}, &tail);
    REQUIRE(tail.pending());
    REQUIRE(job_ran);
    REQUIRE(seen.size() == tasks.size());
    REQUIRE(*finished == 0);
    REQUIRE(stats.gpu_busy_s == 0);
    REQUIRE(stats.cpu_tasks + stats.gpu_tasks == int64_t(tasks.size()));
    // Another run may not start before the tail is finished.
    core::TaskQueue q2(tasks);
    REQUIRE_THROWS_AS(core::run_task_queue(q2, take, core::GpuBatchFn{}, &control, split, nullptr, {}, {}, &tail),
                      std::logic_error);
    std::thread releaser([release] {
      std::this_thread::sleep_for(std::chrono::milliseconds(3));
      *release = true;
    });
    const double before = core::steady_seconds();
    tail.finish(&stats);
    releaser.join();
    REQUIRE_FALSE(tail.pending());
    REQUIRE(*finished == launched.load());
    REQUIRE(stats.gpu_busy_s > 0.002);
    REQUIRE(stats.gpu_done_at > before + 0.002);
    tail.finish(&stats);  // nothing pending: a no-op
  }
}

TEST_CASE("a tail's wait error reaches finish() and a launch error the run itself", "[scheduler]") {
  const std::vector<core::QueueTask> tasks = equal_tasks(8);
  core::ControlThread control;
  const core::QueueSplit split = split_at(0.5);
  for (int rep = 0; rep < 20; ++rep) {
    {
      core::TaskQueue q(tasks);
      core::QueueTail tail;
      auto release = std::make_shared<std::atomic<bool>>(false);
      std::atomic<bool> cpu_started{false};
      core::run_task_queue(
          q, [&](int64_t, int64_t) { cpu_started = true; },
          [&](int64_t, int64_t, int) {
            while (!cpu_started) std::this_thread::yield();  // as above: no wait before the queue drained
            return core::GpuWaitFn([release] {
              while (!*release) std::this_thread::yield();
              throw std::runtime_error("batch failed");
            });
          },
          &control, split, nullptr, {}, {}, &tail);
      REQUIRE(tail.pending());
      *release = true;
      REQUIRE_THROWS_AS(tail.finish(nullptr), std::runtime_error);
      REQUIRE_FALSE(tail.pending());
    }
    {
      // 24 tasks, the GPU's first pull one of them: it pulls again while the CPU side works, and that launch fails.
      core::TaskQueue q(equal_tasks(24));
      const core::QueueSplit uneven = split_at(0.9, 0.5);
      core::QueueTail tail;
      std::atomic<int> running{0};
      REQUIRE_THROWS_AS(core::run_task_queue(
                            q, [](int64_t, int64_t) { std::this_thread::sleep_for(std::chrono::milliseconds(1)); },
                            [&](int64_t, int64_t, int batch) {
                              if (batch > 0) throw std::runtime_error("launch failed");
                              ++running;
                              return core::GpuWaitFn([&] {
                                std::this_thread::sleep_for(std::chrono::microseconds(200));
                                --running;
                              });
                            },
                            &control, uneven, nullptr, {}, {}, &tail),
                        std::runtime_error);
      REQUIRE_FALSE(tail.pending());
      REQUIRE(running == 0);  // launched batches were waited for before the error came out
    }
  }
}
