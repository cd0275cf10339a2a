// Core CPU kernels on every SIMD level the CPU has: scoring, top-k, attention, merge, the retrieval task.
#include <algorithm>
#include <limits>
#include <numeric>
#include <set>
#include <tuple>

#include "catch_compat.h"
#include "core/cpu/kernels.h"
#include "core/cpu/retrieval.h"
#include "core/kv_store.h"
#include "core/merge.h"
#include "test_helpers.h"

using namespace fluxion;
using fluxion::test::bf;

namespace {

struct Fixture {
  static constexpr int H = 2, G = 4, D = 128;
  int64_t N;
  std::vector<uint16_t> k, v;
  core::HostKVStore store;
  int seq;
  std::vector<int32_t> frames;
  int32_t len;
  core::LayerView view;

  explicit Fixture(int64_t n) : N(n), store(make_config()) {
    k = test::random_bf16(size_t(H * N * D), 11);
    v = test::random_bf16(size_t(H * N * D), 12);
    seq = store.add_sequence();
    core::AppendItem it;
    it.seq = seq;
    it.src = core::TokenSource{k.data(), v.data(), N * D, D, N};
    store.append(0, {it});
    frames = store.frames(0, seq);
    len = int32_t(N);
    view.pages = store.arena();
    view.layout = store.layout();
    view.dtype = core::DType::kBFloat16;
    view.frame_table = frames.data();
    view.frame_stride = int64_t(frames.size());
    view.seq_lens = &len;
  }
  static core::StoreConfig make_config() {
    core::StoreConfig c;
    c.num_layers = 1;
    c.num_kv_heads = H;
    c.head_dim = D;
    return c;
  }
  const uint16_t* key(int h, int64_t t) const { return &k[size_t((h * N + t) * D)]; }
};

std::vector<float> random_q(int G, int D, uint32_t seed) {
  auto h = test::random_bf16(size_t(G * D), seed);
  std::vector<float> q(h.size());
  for (size_t i = 0; i < h.size(); ++i) q[i] = bf(h[i]);
  return q;
}

std::vector<core::cpu::Isa> isas() {
  std::vector<core::cpu::Isa> out;
  for (auto isa : core::cpu::kAllIsas)
    if (core::cpu::isa_supported(isa)) out.push_back(isa);
  return out;
}

// The k largest of x by a stable sort (ties to the lower index), in ascending index order: what select_topk
// must return.
std::vector<int32_t> sorted_topk(const std::vector<float>& x, int64_t k) {
  std::vector<int32_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return x[size_t(a)] > x[size_t(b)]; });
  std::vector<int32_t> want(idx.begin(), idx.begin() + k);
  std::sort(want.begin(), want.end());
  return want;
}

}  // namespace

TEST_CASE("Quest scores match the naive bound at every granularity and SIMD level", "[kernels]") {
  Fixture f(1000);
  const auto q = random_q(Fixture::G, Fixture::D, 21);
  core::cpu::QueryScratch qs;
  const auto pq = qs.prepare(q.data(), Fixture::G, Fixture::D, 1.f);
  for (auto isa : isas()) {
    core::cpu::set_active_isa(isa);
    for (int bs : {16, 32, 64, 128}) {
      const int64_t nb = (f.N + bs - 1) / bs;
      std::vector<float> scores(static_cast<size_t>(Fixture::G * nb));
      core::cpu::score_blocks(f.view, 0, 1, Fixture::G, bs, pq, 0, nb, scores.data(), nb);
      for (int h = 0; h < Fixture::G; ++h)
        for (int64_t j = 0; j < nb; ++j) {
          double want = 0;
          for (int d = 0; d < Fixture::D; ++d) {
            float mn = INFINITY, mx = -INFINITY;
            for (int64_t t = j * bs; t < std::min<int64_t>(f.N, (j + 1) * bs); ++t) {
              mn = std::min(mn, bf(f.key(1, t)[d]));
              mx = std::max(mx, bf(f.key(1, t)[d]));
            }
            want += std::max(double(q[size_t(h * Fixture::D + d)]) * mn, double(q[size_t(h * Fixture::D + d)]) * mx);
          }
          REQUIRE(scores[size_t(h * nb + j)] == Approx(want).epsilon(1e-5).margin(1e-3));
        }
    }
  }
  core::cpu::set_active_isa(core::cpu::best_supported_isa());
}

TEST_CASE("top-k selects the largest with ties to the lower index in ascending order", "[kernels]") {
  for (auto isa : isas()) {  // the candidate pass is a per-ISA kernel
    core::cpu::set_active_isa(isa);
    INFO("SIMD level " << core::cpu::isa_name(isa));
    std::vector<uint32_t> scratch;
    const float ninf = -INFINITY;
    std::vector<float> s = {1.f, 5.f, 5.f, ninf, 3.f, 5.f, 0.5f, NAN};
    std::vector<int32_t> out(8, -1);
    REQUIRE(core::cpu::select_topk(s.data(), int64_t(s.size()), 2, out.data(), scratch) == 2);
    REQUIRE(out[0] == 1);
    REQUIRE(out[1] == 2);
    REQUIRE(core::cpu::select_topk(s.data(), int64_t(s.size()), 100, out.data(), scratch) == 6);  // no -inf, no NaN
    REQUIRE(std::vector<int32_t>(out.begin(), out.begin() + 6) == std::vector<int32_t>({0, 1, 2, 4, 5, 6}));
    REQUIRE(core::cpu::select_topk(s.data(), int64_t(s.size()), 0, out.data(), scratch) == 0);
    // A strided sample that overrates the threshold (large scores exactly on the sampled positions) must
    // fall back to taking every selectable score as a candidate, with the same result.
    {
      const int64_t n = 8192, k = 600;
      std::vector<float> x(static_cast<size_t>(n));
      std::mt19937 r(3);
      for (int64_t i = 0; i < n; ++i) x[size_t(i)] = i % 16 == 0 ? 100.f + float(i) : float(r() % 1000) / 100.f;
      std::vector<int32_t> got(static_cast<size_t>(k));
      REQUIRE(core::cpu::select_topk(x.data(), n, k, got.data(), scratch) == k);
      const std::vector<int32_t> want = sorted_topk(x, k);
      REQUIRE(got == want);
    }
    // -0 ties +0: the lower index wins.
    {
      std::vector<float> z = {-0.f, 0.f, -1.f};
      std::vector<int32_t> got(1);
      REQUIRE(core::cpu::select_topk(z.data(), 3, 1, got.data(), scratch) == 1);
      REQUIRE(got[0] == 0);
    }
    // Random rows against a sort-based selection.
    std::mt19937 rng(5);
    for (int trial = 0; trial < 50; ++trial) {
      const int64_t n = 1 + rng() % (trial < 40 ? 3000 : 20000);
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& e : x) e = float(int(rng() % 200)) / 10.f;  // many ties
      const int64_t k = rng() % (n + 1);
      std::vector<int32_t> got(static_cast<size_t>(n));
      const int64_t c = core::cpu::select_topk(x.data(), n, k, got.data(), scratch);
      const std::vector<int32_t> want = sorted_topk(x, k);
      REQUIRE(c == k);
      REQUIRE(std::vector<int32_t>(got.begin(), got.begin() + c) == want);
    }
    // Continuous scores (no ties), decode-sized rows and budgets: the threshold search narrows the candidates'
    // key range by a histogram before its nth_element, and the sample's the same way.
    for (int trial = 0; trial < 20; ++trial) {
      const int64_t n = trial < 10 ? 8192 : 1 + rng() % 30000;
      std::normal_distribution<float> normal(0.f, trial % 2 ? 1e-3f : 30.f);
      std::vector<float> x(static_cast<size_t>(n));
      for (auto& e : x) e = normal(rng);
      const int64_t k = trial < 10 ? std::max<int64_t>(1, n / (5 + trial)) : int64_t(rng() % (n + 1));
      std::vector<int32_t> got(static_cast<size_t>(n));
      const int64_t c = core::cpu::select_topk(x.data(), n, k, got.data(), scratch);
      REQUIRE(c == k);
      REQUIRE(std::vector<int32_t>(got.begin(), got.begin() + c) == sorted_topk(x, k));
    }
    // Rows with -inf, NaN, +-0, +inf and negative scores in every lane position: never -inf or NaN; the rest by
    // value, ties to the lower index.
    for (int trial = 0; trial < 30; ++trial) {
      const int64_t n = 1 + rng() % 700;
      std::vector<float> x(static_cast<size_t>(n));
      const float specials[] = {-INFINITY, NAN, -0.f, 0.f, INFINITY, -1e30f, 1e-30f};
      for (auto& e : x) e = rng() % 4 == 0 ? specials[rng() % 7] : float(int(rng() % 200) - 100) / 10.f;
      int64_t selectable = 0;
      std::vector<float> ranked(x);  // -inf and NaN can never win: rank them below everything
      for (auto& e : ranked) {
        if (!(e > -INFINITY)) e = -std::numeric_limits<float>::max();
        else ++selectable;
        if (e == 0.f) e = 0.f;
      }
      const int64_t k = rng() % (n + 1);
      std::vector<int32_t> got(static_cast<size_t>(n));
      const int64_t c = core::cpu::select_topk(x.data(), n, k, got.data(), scratch);
      REQUIRE(c == std::min(k, selectable));
      REQUIRE(std::vector<int32_t>(got.begin(), got.begin() + c) == sorted_topk(ranked, c));
    }
  }
  core::cpu::set_active_isa(core::cpu::best_supported_isa());
}

TEST_CASE("attention over selected blocks matches naive attention and the merge of parts equals the union", "[kernels]") {
  Fixture f(700);
  const int G = Fixture::G, D = Fixture::D;
  const auto q = random_q(G, D, 31);
  const float scale = 1.f / std::sqrt(float(D));
  core::cpu::QueryScratch qs;
  const auto pq = qs.prepare(q.data(), G, D, scale);
  for (auto isa : isas()) {
    core::cpu::set_active_isa(isa);
    // Two parts: blocks {0..9} and {10..40} of size 16 over tokens [0, 656); head 2 only in part 2.
    std::vector<float> outs(static_cast<size_t>(2 * G * D)), lses(static_cast<size_t>(2 * G));
    for (int part = 0; part < 2; ++part) {
      std::vector<int32_t> blocks;
      std::vector<uint64_t> masks;
      for (int32_t j = part ? 10 : 0; j < (part ? 41 : 10); ++j) {
        blocks.push_back(j);
        masks.push_back(part ? 0xF : 0xB);  // head 2 absent from part 0
      }
      std::vector<float> st(static_cast<size_t>(G * D + 2 * G));
      core::cpu::OnlineSoftmax s{st.data(), st.data() + G, st.data() + 2 * G};
      core::cpu::init_state(s, G, D);
      core::cpu::attend_blocks(f.view, 0, 0, G, 16, pq, blocks.data(), masks.data(), int64_t(blocks.size()), 0, 656, s);
      core::cpu::finalize_state(s, G, D, &outs[size_t(part * G * D)], &lses[size_t(part * G)]);
    }
    REQUIRE(std::isinf(lses[2]));  // head 2 selected nothing in part 0
    for (int h = 0; h < G; ++h) {
      float out[Fixture::D], lse;
      core::merge_states_one(&outs[size_t(h * D)], &lses[size_t(h)], 2, G * D, G, D, out, &lse);
      std::vector<double> want;
      double want_lse;
      const std::vector<float> qh(q.begin() + h * D, q.begin() + (h + 1) * D);
      test::naive_attention(qh, f.k.data(), f.v.data(), D, h == 2 ? 160 : 0, 656, scale, want, want_lse);
      REQUIRE(lse == Approx(want_lse).margin(1e-4));
      for (int d = 0; d < D; ++d) REQUIRE(out[d] == Approx(want[size_t(d)]).margin(1e-4));
    }
  }
  core::cpu::set_active_isa(core::cpu::best_supported_isa());
}

TEST_CASE("attention over blocks with edges inside units and across a page boundary", "[kernels]") {
  Fixture f(2500);  // 1024-token pages: blocks of 32 around token 1024 sit in two pages
  const int G = Fixture::G, D = Fixture::D;
  const auto q = random_q(G, D, 37);
  const float scale = 1.f / std::sqrt(float(D));
  core::cpu::QueryScratch qs;
  const auto pq = qs.prepare(q.data(), G, D, scale);
  std::vector<int32_t> blocks;
  std::vector<uint64_t> masks;
  for (int32_t j = 28; j < 36; ++j) {  // tokens [896, 1152)
    blocks.push_back(j);
    masks.push_back(0xF);
  }
  const int64_t lo = 901, hi = 1139;  // inside the first and the last unit
  for (auto isa : isas()) {
    core::cpu::set_active_isa(isa);
    std::vector<float> st(static_cast<size_t>(G * D + 2 * G)), out(static_cast<size_t>(G * D)), lse(static_cast<size_t>(G));
    core::cpu::OnlineSoftmax s{st.data(), st.data() + G, st.data() + 2 * G};
    core::cpu::init_state(s, G, D);
    core::cpu::attend_blocks(f.view, 0, 1, G, 32, pq, blocks.data(), masks.data(), int64_t(blocks.size()), lo, hi, s);
    core::cpu::finalize_state(s, G, D, out.data(), lse.data());
    for (int h = 0; h < G; ++h) {
      std::vector<double> want;
      double want_lse;
      const std::vector<float> qh(q.begin() + h * D, q.begin() + (h + 1) * D);
      test::naive_attention(qh, f.k.data() + f.N * D, f.v.data() + f.N * D, D, lo, hi, scale, want, want_lse);
      REQUIRE(lse[size_t(h)] == Approx(want_lse).margin(1e-4));
      for (int d = 0; d < D; ++d) REQUIRE(out[size_t(h * D + d)] == Approx(want[size_t(d)]).margin(1e-4));
    }
  }
  core::cpu::set_active_isa(core::cpu::best_supported_isa());
}

TEST_CASE("merge of empty states gives zeros and -inf and never NaN", "[kernels]") {
  const float outs[4] = {1.f, 2.f, 3.f, 4.f};
  const float lses[2] = {-INFINITY, -INFINITY};
  float out[2], lse;
  core::merge_states_one(outs, lses, 2, 2, 1, 2, out, &lse);
  REQUIRE(out[0] == 0.f);
  REQUIRE(out[1] == 0.f);
  REQUIRE(std::isinf(lse));
}

TEST_CASE("retrieval task: full budget equals attention over the retrieval region and budget 0 is empty", "[kernels]") {
  Fixture f(2000);
  const int G = Fixture::G, D = Fixture::D;
  const auto q = random_q(G, D, 41);
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<float> budgets = {1.f, 1.f, 0.f, 1.f};
  std::vector<float> out(static_cast<size_t>(G * D)), lse(static_cast<size_t>(G));
  int64_t bytes = -1;
  core::cpu::GroupTask t;
  t.b = 0;
  t.kv_head = 1;
  t.block_size = 64;
  t.q = q.data();
  t.budgets = budgets.data();
  t.out = out.data();
  t.lse = lse.data();
  t.bytes_read = &bytes;
  core::cpu::RetrievalConfig cfg{64, 256, scale};
  core::cpu::Executor serial;
  core::cpu::run_group_tasks(f.view, G, cfg, &t, 1, serial);
  // candidates: blocks [1, 28) of 64 tokens over [64, 1744); each retrieving head takes all of them, so no
  // scores are needed and no metadata is read
  REQUIRE(bytes == 27 * 2 * 64 * D * 2);
  REQUIRE(std::isinf(lse[2]));
  for (int h : {0, 1, 3}) {
    std::vector<double> want;
    double want_lse;
    const std::vector<float> qh(q.begin() + h * D, q.begin() + (h + 1) * D);
    test::naive_attention(qh, f.k.data() + f.N * D, f.v.data() + f.N * D, D, 64, 1744, scale, want, want_lse);
    REQUIRE(lse[size_t(h)] == Approx(want_lse).margin(1e-4));
    for (int d = 0; d < D; ++d) REQUIRE(out[size_t(h * D + d)] == Approx(want[size_t(d)]).margin(1e-4));
  }
}

TEST_CASE("retrieval task: a call's result does not depend on the calls before it on the thread", "[kernels]") {
  // The task keeps its buffers (scores, selections, partial states, top-k scratch) per thread across calls;
  // a smaller call in between must leave nothing that changes a later larger one.
  Fixture f(3000);
  const int G = Fixture::G, D = Fixture::D;
  const float scale = 1.f / std::sqrt(float(D));
  const core::cpu::RetrievalConfig cfg{64, 256, scale};
  const auto q0 = random_q(G, D, 61), q1 = random_q(G, D, 62);
  const std::vector<float> sparse = {0.3f, 0.1f, 0.f, 0.5f}, full = {1.f, 1.f, 1.f, 1.f};
  auto run = [&](const std::vector<std::pair<const std::vector<float>*, int>>& spec, const std::vector<float>& budgets,
                 int block_size) {
    // spec: (q, kv head) per task; returns out | lse of every task
    const int64_t n = int64_t(spec.size());
    std::vector<float> res(static_cast<size_t>(n * G * (D + 1)));
    std::vector<core::cpu::GroupTask> tasks(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) {
      auto& task = tasks[size_t(t)];
      task.kv_head = spec[size_t(t)].second;
      task.block_size = block_size;
      task.q = spec[size_t(t)].first->data();
      task.budgets = budgets.data();
      task.out = &res[size_t(t * G * D)];
      task.lse = &res[size_t(n * G * D + t * G)];
    }
    core::cpu::run_group_tasks(f.view, G, cfg, tasks.data(), n, core::cpu::Executor{});
    return res;
  };
  const std::vector<std::pair<const std::vector<float>*, int>> large = {{&q0, 0}, {&q1, 1}}, small = {{&q1, 0}};
  const auto first = run(large, sparse, 16);
  const auto between = run(small, full, 64);
  const auto again = run(large, sparse, 16);
  REQUIRE(first == again);  // bit for bit
  // The small full-budget call in between is exact attention over the retrieval region [64, 2744).
  for (int h = 0; h < G; ++h) {
    std::vector<double> want;
    double want_lse;
    const std::vector<float> qh(q1.begin() + h * D, q1.begin() + (h + 1) * D);
    test::naive_attention(qh, f.k.data(), f.v.data(), D, 64, 2744, scale, want, want_lse);
    REQUIRE(between[size_t(G * D + h)] == Approx(want_lse).margin(1e-4));
    for (int d = 0; d < D; ++d) REQUIRE(between[size_t(h * D + d)] == Approx(want[size_t(d)]).margin(1e-4));
  }
}

TEST_CASE("attend_runs over a list of runs equals naive attention on every SIMD level", "[kernels]") {
  // One call folds a list of runs with partial units, empty runs and runs of 0, 1, 2 or all heads: the AVX-512
  // kernel's per-call state (accumulators kept [even | odd], AMX scores issued a unit ahead across runs) must
  // give what folding each head's rows one by one gives.
  for (const int D : {64, 128}) {
    for (const int G : {4, 20}) {  // 20: more heads than one AMX tile holds
      const int64_t N = 40 * 16;
      const auto k = test::random_bf16(size_t(N * D), 51), v = test::random_bf16(size_t(N * D), 52);
      const auto q = random_q(G, D, 53);
      const float scale = 1.f / std::sqrt(float(D));
      core::cpu::QueryScratch qs;
      const auto pq = qs.prepare(q.data(), G, D, scale);
      const uint64_t all = (uint64_t(1) << G) - 1;
      // (first row, rows, mask) of each run; a run starts at a unit and may cover several.
      const std::vector<std::tuple<int64_t, int64_t, int64_t, uint64_t>> spec = {
          {0, 0, 16, all},      {16, 3, 16, 0x1},     {32, 0, 0, all},  // empty run
          {48, 0, 16, 0x6},     {64, 0, 48, all},     {112, 5, 9, 0x1},
          {128, 0, 16, 0},                                               // no heads
          {160, 0, 32, 0x3},    {192, 7, 40, all},    {320, 0, 16, uint64_t(1) << (G - 1)},
      };
      std::vector<core::cpu::RowRun> runs;
      for (const auto& [start, lo, hi, mask] : spec)
        runs.push_back(core::cpu::RowRun{&k[size_t(start * D)], &v[size_t(start * D)], lo, hi, mask});
      for (auto isa : isas()) {
        core::cpu::set_active_isa(isa);
        std::vector<float> st(static_cast<size_t>(G * D + 2 * G)), out(static_cast<size_t>(G * D)), lse(static_cast<size_t>(G));
        core::cpu::OnlineSoftmax s{st.data(), st.data() + G, st.data() + 2 * G};
        core::cpu::init_state(s, G, D);
        core::cpu::kernels().attend_runs(runs.data(), int64_t(runs.size()), int64_t(runs.size()), 1, 16 * D, pq, G, D,
                                         core::DType::kBFloat16, s);
        core::cpu::finalize_state(s, G, D, out.data(), lse.data());
        for (int h = 0; h < G; ++h) {
          // Naive: the rows of every run with head h, in double.
          std::vector<int64_t> rows;
          for (const auto& [start, lo, hi, mask] : spec)
            if ((mask >> h) & 1u)
              for (int64_t r = lo; r < hi; ++r) rows.push_back(start + r);
          if (rows.empty()) {
            REQUIRE(std::isinf(lse[size_t(h)]));
            continue;
          }
          std::vector<double> sc, want(size_t(D), 0.0);
          double m = -INFINITY, l = 0;
          for (int64_t r : rows) {
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += double(q[size_t(h * D + d)]) * bf(k[size_t(r * D + d)]);
            sc.push_back(dot * scale);
            m = std::max(m, sc.back());
          }
          for (size_t i = 0; i < rows.size(); ++i) {
            const double p = std::exp(sc[i] - m);
            l += p;
            for (int d = 0; d < D; ++d) want[size_t(d)] += p * bf(v[size_t(rows[i] * D + d)]);
          }
          INFO("isa " << core::cpu::isa_name(isa) << " D " << D << " G " << G << " head " << h);
          REQUIRE(lse[size_t(h)] == Approx(m + std::log(l)).margin(1e-4));
          for (int d = 0; d < D; ++d) REQUIRE(out[size_t(h * D + d)] == Approx(want[size_t(d)] / l).margin(1e-4));
        }
      }
    }
  }
  core::cpu::set_active_isa(core::cpu::best_supported_isa());
}
