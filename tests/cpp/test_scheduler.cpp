// The shared task queue: every task runs exactly once, largest first, GPU batches bounded by volume.
#include <mutex>
#include <set>
#include <thread>

#include "catch_compat.h"
#include "core/scheduler.h"

using namespace fluxion;

namespace {
core::ParallelFor threads_parallel() {
  return [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::vector<std::thread> ts;
    for (int64_t i = 0; i < n; ++i) ts.emplace_back([&fn, i] { fn(i, i + 1); });
    for (auto& t : ts) t.join();
  };
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

TEST_CASE("CPU workers and the GPU control thread share the queue without loss or repeats", "[scheduler]") {
  std::vector<core::QueueTask> tasks;
  for (int g = 0; g < 200; ++g) tasks.push_back({g, 1000 + (g * 37) % 500});
  core::TaskQueue q(tasks);
  std::mutex mu;
  std::multiset<int32_t> seen;
  int64_t gpu_seen = 0;
  core::QueueRunStats st;
  core::run_task_queue(
      q, 4, threads_parallel(),
      [&](int64_t i, int) {
        std::lock_guard<std::mutex> l(mu);
        seen.insert(q[size_t(i)].group);
      },
      [&](int64_t b, int64_t e, int) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        std::lock_guard<std::mutex> l(mu);
        for (int64_t i = b; i < e; ++i) seen.insert(q[size_t(i)].group);
        gpu_seen += e - b;
      },
      5000, 1000, &st);
  REQUIRE(seen.size() == 200);
  REQUIRE(std::set<int32_t>(seen.begin(), seen.end()).size() == 200);
  REQUIRE(st.cpu_tasks + st.gpu_tasks == 200);
  REQUIRE(st.gpu_tasks == gpu_seen);
}

TEST_CASE("without a GPU callback every task runs on the CPU and errors propagate", "[scheduler]") {
  core::TaskQueue q({{0, 1}, {1, 2}, {2, 3}});
  int ran = 0;
  core::run_task_queue(q, 1, {}, [&](int64_t, int) { ++ran; }, {}, 0, 0, nullptr);
  REQUIRE(ran == 3);
  core::TaskQueue q2({{0, 1}, {1, 2}});
  REQUIRE_THROWS_AS(core::run_task_queue(
                        q2, 1, {}, [&](int64_t, int) { throw std::runtime_error("boom"); }, {}, 0, 0, nullptr),
                    std::runtime_error);
}
