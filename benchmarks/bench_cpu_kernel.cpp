// The CPU attention kernel alone (kernels().attend_runs, the active SIMD level) streaming 8 KiB units
// (K[16, 128] + V[16, 128] bf16, the store's unit) from a buffer far larger than the caches, on N threads,
// against the streaming-read ceiling (kernels().stream_sum) measured on the same buffer and threads in the same
// run. It isolates what bench_cpu_task.py mixes with scoring and top-k: how well the kernel overlaps its reads
// with its arithmetic, for each prefetch distance (`ahead` runs; the store-facing code picks it from
// FLUXION_PREFETCH_BYTES or the reader count).
//
//   cmake -S . -B build/cmake -DFLUXION_BENCHMARKS=ON && cmake --build build/cmake -j --target bench_cpu_kernel
//   build/cmake/bench_cpu_kernel --threads 1 14 --order random --heads 4
//
// Options: --threads N... (default 1), --order seq|random|select (units in address order; shuffled; or as the
// CPU task reads a sparse selection: per region of 8192 units (one KV head's 128K tokens at block 16) each head
// picks --budget of the units at random, and the union is read in ascending order, each unit for the heads that
// picked it), --heads H (heads of the 4-head group that read each unit (seq, random) or select (select), 1-4),
// --budget F (select: default 0.05), --mib M (buffer, default 4096), --item U (units per kernel call, default
// 16), --reps R (median of R, default 5). --order select-shuffled reads select's units in random order;
// --deal hands the items out round-robin (item i to thread i % N, as the task's dynamic loop roughly does)
// instead of one contiguous slice of the reading order per thread.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/cpu/kernels.h"
#include "core/cpu/retrieval.h"

namespace {
using namespace fluxion::core;
using Clock = std::chrono::steady_clock;
constexpr int D = 128, G = 4;
constexpr int64_t kUnitElems = 32 * D;  // K[16, D] then V[16, D]

// Runs fn(worker) on `threads` threads at once; returns the wall time.
template <class Fn>
double on_threads(int threads, Fn fn) {
  std::vector<std::thread> pool;
  const auto t0 = Clock::now();
  for (int w = 0; w < threads; ++w) pool.emplace_back([&, w] { fn(w); });
  for (auto& t : pool) t.join();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<int> thread_counts;
  std::string order_name = "seq";
  double budget = 0.05;
  int heads = 4, item = 16, reps = 5;
  int64_t mib = 4096;
  bool deal = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return std::string(argv[++i]);
    };
    if (a == "--threads") {
      while (i + 1 < argc && argv[i + 1][0] != '-') thread_counts.push_back(std::atoi(argv[++i]));
    } else if (a == "--deal") {
      deal = true;
    } else if (a == "--order") {
      order_name = value();
      if (order_name != "seq" && order_name != "random" && order_name != "select" && order_name != "select-shuffled") {
        std::fprintf(stderr, "--order must be seq, random, select or select-shuffled, got %s\n", order_name.c_str());
        return 2;
      }
    } else if (a == "--budget") {
      budget = std::atof(value().c_str());
    } else if (a == "--heads") {
      heads = std::atoi(value().c_str());
    } else if (a == "--mib") {
      mib = std::atoll(value().c_str());
    } else if (a == "--item") {
      item = std::atoi(value().c_str());
    } else if (a == "--reps") {
      reps = std::atoi(value().c_str());
    } else {
      std::fprintf(stderr, "unknown option %s (see the header of bench_cpu_kernel.cpp)\n", a.c_str());
      return 2;
    }
  }
  if (thread_counts.empty()) thread_counts.push_back(1);
  if (heads < 1 || heads > G || item < 1 || reps < 1 || mib < 16 || !(budget > 0 && budget <= 1)) {
    std::fprintf(stderr, "need 1 <= --heads <= %d, --item >= 1, --reps >= 1, --mib >= 16, 0 < --budget <= 1\n", G);
    return 2;
  }
  const int64_t bytes = mib << 20, units = bytes / (kUnitElems * 2);
  auto* buf = static_cast<uint16_t*>(mmap(nullptr, size_t(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (buf == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  madvise(buf, size_t(bytes), MADV_HUGEPAGE);  // as the store does
  // Small finite bf16 values (0x3c00.. = 2^-7 ..), so the softmax stays in range.
  for (int64_t i = 0; i < bytes / 2; ++i) buf[i] = uint16_t(0x3c00 + ((uint64_t(i) * 2654435761u) >> 24 & 0x7f));
  std::mt19937 rng(1);
  std::vector<float> q(size_t(G * D));
  for (auto& x : q) x = std::normal_distribution<float>()(rng);
  // The units read, in reading order, and the heads that read each.
  std::vector<int64_t> order;
  std::vector<uint64_t> masks;
  if (order_name.rfind("select", 0) == 0) {
    constexpr int64_t kRegion = 8192;
    std::mt19937_64 pick(2);
    for (int64_t r0 = 0; r0 < units; r0 += kRegion) {
      const int64_t n = std::min(kRegion, units - r0), k = std::max<int64_t>(1, int64_t(budget * double(n)));
      std::vector<uint64_t> chosen(static_cast<size_t>(n), 0);
      std::vector<int64_t> idx(static_cast<size_t>(n));
      for (int h = 0; h < heads; ++h) {
        std::iota(idx.begin(), idx.end(), 0);
        for (int64_t i = 0; i < k; ++i) {  // a partial Fisher-Yates: k distinct units
          std::swap(idx[size_t(i)], idx[size_t(i + int64_t(pick() % uint64_t(n - i)))]);
          chosen[size_t(idx[size_t(i)])] |= uint64_t(1) << h;
        }
      }
      for (int64_t i = 0; i < n; ++i)
        if (chosen[size_t(i)]) order.push_back(r0 + i), masks.push_back(chosen[size_t(i)]);
    }
    if (order_name == "select-shuffled") {
      std::vector<size_t> perm(order.size());
      std::iota(perm.begin(), perm.end(), size_t(0));
      std::shuffle(perm.begin(), perm.end(), std::mt19937_64(3));
      std::vector<int64_t> o(order.size());
      std::vector<uint64_t> m(order.size());
      for (size_t i = 0; i < perm.size(); ++i) o[i] = order[perm[i]], m[i] = masks[perm[i]];
      order.swap(o), masks.swap(m);
    }
  } else {
    order.resize(static_cast<size_t>(units));
    std::iota(order.begin(), order.end(), 0);
    if (order_name == "random") std::shuffle(order.begin(), order.end(), std::mt19937_64(2));
    masks.assign(order.size(), (uint64_t(1) << heads) - 1);
  }
  const int64_t reads = int64_t(order.size()), read_bytes = reads * kUnitElems * 2;

  std::printf("# attend_runs on %s | %s units of 8 KiB (%lld of %lld read), %d of %d heads, %d units per call, "
              "%lld MiB, median of %d%s\n",
              cpu::isa_name(cpu::active_isa()), order_name.c_str(), static_cast<long long>(reads),
              static_cast<long long>(units), heads, G, item, static_cast<long long>(mib), reps,
              deal ? ", items dealt round-robin" : "");
  for (const int threads : thread_counts) {
    std::vector<double> t_stream;
    for (int r = 0; r < reps; ++r)
      t_stream.push_back(on_threads(threads, [&](int w) {
        const int64_t b = bytes * w / threads / 64 * 64, e = bytes * (w + 1) / threads / 64 * 64;
        volatile uint64_t sink = cpu::kernels().stream_sum(reinterpret_cast<const char*>(buf) + b, e - b);
        (void)sink;
      }));
    const double ceiling = double(bytes) / median(t_stream) / 1e9;
    for (const int ahead : {0, 1, 2, 4, 8}) {
      std::vector<double> t_kernel;
      for (int r = 0; r < reps; ++r)
        t_kernel.push_back(on_threads(threads, [&](int w) {
          cpu::QueryScratch scratch;
          const cpu::PreparedQuery pq = scratch.prepare(q.data(), G, D, 0.088f);
          std::vector<float> state(size_t(G * D + 2 * G));
          const cpu::OnlineSoftmax st{state.data(), state.data() + G, state.data() + 2 * G};
          std::vector<cpu::RowRun> runs(size_t(item + ahead));
          // One contiguous slice per thread, or (--deal) every threads-th item from the thread's first.
          const int64_t b = deal ? int64_t(w) * item : reads * w / threads;
          const int64_t e = deal ? reads : reads * (w + 1) / threads;
          const int64_t step = deal ? int64_t(threads) * item : item;
          for (int64_t u = b; u < e; u += step) {
            const int64_t n = std::min<int64_t>(item, e - u), listed = std::min<int64_t>(n + ahead, e - u);
            for (int64_t i = 0; i < listed; ++i) {  // runs past n are listed only to be prefetched
              const uint16_t* k = buf + order[size_t(u + i)] * kUnitElems;
              runs[size_t(i)] = cpu::RowRun{k, k + 16 * D, 0, 16, i < n ? masks[size_t(u + i)] : 0};
            }
            cpu::init_state(st, G, D);
            cpu::kernels().attend_runs(runs.data(), n, listed, ahead, 32 * D, pq, G, D, DType::kBFloat16, st);
          }
        }));
      const double t = median(t_kernel), gbs = double(read_bytes) / t / 1e9;
      std::printf("threads %2d ahead %d: %6.1f GB/s  ceiling %6.1f GB/s  ratio %.2f  %6.0f ns per unit per thread\n",
                  threads, ahead, gbs, ceiling, gbs / ceiling, t * 1e9 / (double(reads) / threads));
      std::fflush(stdout);
    }
  }
  munmap(buf, size_t(bytes));
  return 0;
}
