#include "core/cpu/retrieval.h"

#include <algorithm>
#include <numeric>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <memory>
#include <thread>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>

#include "core/cpu/score_key.h"
#include "core/half_convert.h"
#include "core/merge.h"

namespace fluxion::core::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A tuning knob from the environment (callers read it once per process): `unset` when it is not set.
int64_t env_knob(const char* name, int64_t unset) {
  const char* env = std::getenv(name);
  return env ? std::atoll(env) : unset;
}

// Metadata rows per scoring work item, at most (FLUXION_SCORE_ITEM_BLOCKS sets it, for tuning; rounded up to a
// multiple of 64). An item's first page is read without a software prefetch, so longer items start cold less
// often; on the H200 box, 1024 and 2048 were no faster than 512 within the host's swings.
int64_t max_score_item_blocks() {
  static const int64_t v = env_knob("FLUXION_SCORE_ITEM_BLOCKS", 0);
  return v > 0 ? (v + 63) / 64 * 64 : int64_t(512);  // unset, empty or <= 0: 512
}

// Size of a phase's work items: large enough to amortise per-item costs, small enough that a small batch (the
// CPU's share of a layer step near the end of the queue is often one or two tasks) still gives every thread
// a few items to balance with.
int64_t item_size(int64_t total, int threads, int64_t lo, int64_t hi) {
  return std::clamp<int64_t>(total / (4 * int64_t(std::max(threads, 1))), lo, hi);
}

// K/V bytes per attention work item. Each item is one kernel call with its own partial state, and a call
// costs ~0.5 us beyond its reads (the AMX pipeline and the tile configuration start afresh, the state is set
// up, written out and merged; dev VM, one thread: 1-block items 19.3 ms per 128K layer, 128 KiB items 13.4).
// So items are as large as balance allows, about 16 per thread, between 32 KiB and 2 MiB
// (FLUXION_ATTEND_ITEM_BYTES fixes the size, for tuning).
int64_t attend_item_bytes(int64_t total, int threads) {
  static const int64_t forced = env_knob("FLUXION_ATTEND_ITEM_BYTES", 0);
  if (forced > 0) return forced;  // unset, empty or <= 0: the rule below
  return std::clamp<int64_t>(total / (16 * int64_t(std::max(threads, 1))), int64_t(32) << 10, int64_t(2) << 20);
}

// Runs ahead to prefetch for runs of `run_bytes`: at least one when prefetching is on.
int64_t runs_ahead(int64_t run_bytes, int threads) {
  const int64_t b = prefetch_bytes(threads);
  return b == 0 ? 0 : std::max<int64_t>(1, (b + run_bytes - 1) / run_bytes);
}

// Threads that read the store at once in a phase of `items` work items (sets the prefetch distance).
int readers(const Executor& ex, int64_t items) {
  return int(std::min<int64_t>(std::max(ex.num_threads, 1), std::max<int64_t>(items, 1)));
}

// The run of a block: BS/16 consecutive units (K[16, D] then V[16, D] each), one contiguous 2*BS*D span.
const uint16_t* block_run(const LayerView& view, int b, int kv_head, int64_t block, int block_size) {
  const auto* pages = static_cast<const uint16_t*>(view.pages);
  const int64_t t0 = block * block_size;
  return pages + view.page_offset(b, kv_head, t0) + view.layout.block_offset(t0 % view.layout.page_tokens);
}

// run_group_tasks' buffers, reused across its calls on one thread.
struct CallScratch {
  std::vector<QueryScratch> query;  // per task
  std::vector<float> scores, part_out, part_lse;
  std::vector<int32_t> sel;
  struct Worker {
    std::vector<uint32_t> topk;
    std::vector<uint64_t> mark;
    std::vector<float> state;
  };
  std::vector<Worker> per_worker;
};

template <class T>
void grow(std::vector<T>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

}  // namespace

// A lone core is bound by the latency of its reads and gains from prefetching far ahead; many cores together
// fill the memory system, and deep prefetching then only adds traffic. Measured on the H200 box's CPU (budget
// 0.05, block 16, 128K; the CPU task's GB/s): 1 thread 7.0 with 16 KiB, 8.2-8.9 with 64-128 KiB; 2 threads 12.4
// (64 KiB), 14.1 (32 KiB); 8 threads 41.6 (32 KiB), 37.4 (128 KiB); 14 threads 74.7 (16 KiB), 58.8 (64 KiB).
int64_t prefetch_bytes(int threads) {
  static const int64_t forced = env_knob("FLUXION_PREFETCH_BYTES", -1);
  if (forced >= 0) return forced;
  if (threads == 1) return int64_t(64) << 10;
  return threads > 0 && threads <= 8 ? int64_t(32) << 10 : int64_t(16) << 10;
}

void for_each_dynamic(const Executor& ex, int64_t n, const std::function<void(int64_t, int)>& fn) {
  if (n <= 0) return;
  const int workers = int(std::min<int64_t>(std::max(ex.num_threads, 1), n));
  if (!ex.parallel || workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  ex.parallel(workers, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i, int(w));
    }
  });
}

PreparedQuery QueryScratch::prepare(const float* q, int G, int D, float scale) {
  const int64_t n = int64_t(G) * D;
  const int groups = (G + 15) / 16;
  const int64_t bound_elems = int64_t(groups) * (2 * D / 32) * 512, qk_elems = int64_t(groups) * (D / 32) * 512;
  f32.resize(size_t(3 * n));
  bf16.resize(size_t(3 * n + bound_elems + qk_elems));
  for (int64_t i = 0; i < n; ++i) {
    const float pos = q[i] > 0.f ? q[i] : 0.f, neg = q[i] < 0.f ? q[i] : 0.f;
    f32[size_t(i)] = pos;
    f32[size_t(n + i)] = neg;
    f32[size_t(2 * n + i)] = q[i] * scale;
    bf16[size_t(i)] = float_to_bf16(pos);
    bf16[size_t(n + i)] = float_to_bf16(neg);
    bf16[size_t(2 * n + i)] = float_to_bf16(q[i]);
  }
  // AMX B tiles of rows of `len` elements, row(head)[j] = elem(head, j): [groups, len/32, 16, 16, 2].
  // Columns past the last head stay zero (a group of 4 heads fills 4 of 16: the rest is written once, by the fill).
  auto tiles = [&](uint16_t* dst, int len, auto elem) {
    const int kchunks = len / 32;
    std::fill(dst, dst + int64_t(groups) * kchunks * 512, uint16_t(0));
    for (int head = 0; head < G; ++head) {
      const int g = head / 16, c = head % 16;
      for (int kc = 0; kc < kchunks; ++kc)
        for (int k = 0; k < 16; ++k) {
          uint16_t* d = dst + ((int64_t(g) * kchunks + kc) * 16 + k) * 32 + c * 2;
          d[0] = elem(head, kc * 32 + 2 * k);
          d[1] = elem(head, kc * 32 + 2 * k + 1);
        }
    }
  };
  uint16_t* amx = bf16.data() + 3 * n;
  uint16_t* amx_qk = amx + bound_elems;
  tiles(amx, 2 * D, [&](int head, int j) { return j < D ? bf16[size_t(n + head * D + j)] : bf16[size_t(head * D + j - D)]; });
  tiles(amx_qk, D, [&](int head, int j) { return bf16[size_t(2 * n + head * D + j)]; });
  PreparedQuery p;
  p.q_amx = amx;
  p.q_amx_qk = amx_qk;
  p.q_pos = f32.data();
  p.q_neg = f32.data() + n;
  p.q_scaled = f32.data() + 2 * n;
  p.q_pos_bf16 = bf16.data();
  p.q_neg_bf16 = bf16.data() + n;
  p.q_bf16 = bf16.data() + 2 * n;
  p.scale = scale;
  return p;
}

void score_blocks(const LayerView& view, int b, int kv_head, int G, int block_size, const PreparedQuery& q,
                  int64_t blk_begin, int64_t blk_end, float* scores, int64_t stride, int64_t prefetch_end,
                  int threads) {
  const KernelTable& kt = kernels();
  const int level = granularity_level(block_size);
  const int64_t per_page = view.layout.page_tokens / block_size;
  const auto* pages = static_cast<const uint16_t*>(view.pages);
  const int D = view.layout.head_dim;
  const int64_t row_bytes = 2 * D * 2;
  // The table of each page is one run; while scoring one, prefetch the one `ahead` pages later.
  const int64_t ahead = runs_ahead(per_page * row_bytes, threads);
  prefetch_end = std::max(prefetch_end, blk_end);
  auto table = [&](int64_t j, int64_t end) {  // rows of blocks [j, end of j's page) within [j, end)
    const int64_t in_page = j % per_page;
    const uint16_t* meta = pages + view.page_offset(b, kv_head, j * block_size) + view.layout.meta_offset(level) +
                           in_page * 2 * D;
    return std::make_pair(meta, std::min(end - j, per_page - in_page));
  };
  for (int64_t j = blk_begin; j < blk_end;) {
    const auto [meta, run] = table(j, blk_end);
    Prefetch next;
    const int64_t jn = (j / per_page + ahead) * per_page;
    if (ahead > 0 && jn < prefetch_end) {
      const auto [nmeta, nrun] = table(jn, prefetch_end);
      next = Prefetch{nmeta, nrun * row_bytes};
    }
    kt.score_rows(meta, run, q, G, D, view.dtype, scores + (j - blk_begin), stride, next);
    j += run;
  }
}

namespace {
// The k-th largest of keys[0, n) (1 <= k <= n), `keys` left as they were. One pass finds the range, one
// counts the keys in up to 256 equal bins of it; the bin holding the k-th largest is gathered into `tmp` and
// nth_element runs over it alone: a few dozen keys instead of all n (about a third of the time on 8192-score
// rows).
uint32_t kth_largest(const uint32_t* keys, int64_t n, int64_t k, uint32_t* tmp) {
  uint32_t mn = keys[0], mx = keys[0];
  for (int64_t i = 1; i < n; ++i) {
    mn = std::min(mn, keys[i]);
    mx = std::max(mx, keys[i]);
  }
  if (mn == mx) return mn;
  const int range_bits = 32 - __builtin_clz(mx - mn);
  const int shift = range_bits > 8 ? range_bits - 8 : 0;
  uint32_t hist[256] = {};
  for (int64_t i = 0; i < n; ++i) ++hist[(keys[i] - mn) >> shift];
  int64_t above = 0;  // keys in the bins above `bin`
  int bin = int((mx - mn) >> shift);
  while (above + hist[bin] < uint32_t(k)) above += hist[bin--];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    tmp[m] = keys[i];
    m += ((keys[i] - mn) >> shift) == uint32_t(bin);
  }
  const int64_t rank = k - above - 1;
  std::nth_element(tmp, tmp + rank, tmp + m, std::greater<uint32_t>());
  return tmp[rank];
}
}  // namespace

int64_t select_topk(const float* scores, int64_t n, int64_t k, int32_t* out, std::vector<uint32_t>& scratch) {
  if (k <= 0 || n <= 0) return 0;
  // A strided sample gives a key `lo` that, with a wide margin, at least k scores reach. One branchless pass
  // gathers the scores >= lo (keys and indices, in index order); the exact k-th largest key among those few is
  // the threshold; a last branchless pass emits indices ascending, ties to the lowest. If the sample misjudged
  // (fewer than k reach lo), every selectable score is a candidate: same result, more work.
  constexpr int64_t kSample = 512;
  const int64_t S = std::min(n, kSample);
  // The gather may write up to kGatherSlack entries past the last one it keeps.
  const int64_t room = n + kGatherSlack;
  if (int64_t(scratch.size()) < S + 3 * room) scratch.resize(size_t(S + 3 * room));  // grows once, never shrinks
  uint32_t* sample = scratch.data();
  uint32_t* ckey = sample + S;
  uint32_t* cidx = ckey + room;
  uint32_t* tmp = cidx + room;
  if (S == kSample) {  // the usual case: a division by a constant, i.e. a shift
    for (int64_t i = 0; i < kSample; ++i) sample[i] = score_key(scores[i * n / kSample]);
  } else {
    for (int64_t i = 0; i < S; ++i) sample[i] = score_key(scores[i * n / S]);
  }
  const int64_t expect = (k * S + n - 1) / n;  // sample rank of the k-th largest score, in expectation
  const int64_t rank = expect + int64_t(3.0 * std::sqrt(double(expect))) + 4;
  const uint32_t lo = rank < S ? std::max(kth_largest(sample, S, rank + 1, tmp), 1u) : 1u;
  auto gather = [&](uint32_t bound) { return kernels().gather_keys(scores, n, bound, ckey, cidx); };
  int64_t c = gather(lo);
  if (c < k && lo > 1u) c = gather(1u);
  if (c <= k) {  // every candidate is selected: all scores >= lo (or all selectable ones)
    for (int64_t i = 0; i < c; ++i) out[i] = int32_t(cidx[i]);
    return c;
  }
  const uint32_t thr = kth_largest(ckey, c, k, tmp);
  int64_t above = 0;
  for (int64_t i = 0; i < c; ++i) above += ckey[i] > thr;
  // Candidates are in index order: all keys above thr, and the first k - above keys equal to it.
  int64_t ties = k - above, count = 0;
  for (int64_t i = 0; i < c && count < k; ++i) {
    const uint32_t key = ckey[i];
    const int64_t tie = key == thr && ties > 0;
    ties -= tie;
    out[count] = int32_t(cidx[i]);
    count += (key > thr) | tie;
  }
  return count;
}

void attend_blocks(const LayerView& view, int b, int kv_head, int G, int block_size, const PreparedQuery& q,
                   const int32_t* blocks, const uint64_t* masks, int64_t nblocks, int64_t tok_begin, int64_t tok_end,
                   const OnlineSoftmax& st, int64_t prefetch_blocks, int threads) {
  const int D = view.layout.head_dim;
  const int64_t run_elems = view.layout.block_elems(block_size);
  const int64_t v_in_unit = int64_t(PageLayout::kUnitTokens) * D;
  // Every block is one contiguous run; while attending one, the kernel prefetches the one `ahead` blocks later.
  const int64_t ahead = runs_ahead(run_elems * 2, threads);
  const int64_t listed = std::min(std::max(prefetch_blocks, nblocks), nblocks + ahead);
  thread_local std::vector<RowRun> runs;
  runs.resize(size_t(listed));
  for (int64_t i = 0; i < listed; ++i) {
    const int64_t t0 = int64_t(blocks[i]) * block_size;
    const uint16_t* run = block_run(view, b, kv_head, blocks[i], block_size);
    runs[size_t(i)] = RowRun{run, run + v_in_unit, std::max(t0, tok_begin) - t0, std::min(t0 + block_size, tok_end) - t0,
                             i < nblocks ? masks[i] : 0};
  }
  kernels().attend_runs(runs.data(), nblocks, listed, ahead, view.layout.unit_elems(), q, G, D, view.dtype, st);
}

void init_state(const OnlineSoftmax& st, int G, int D) {
  std::fill(st.m, st.m + G, kNegInf);
  std::fill(st.l, st.l + G, 0.f);
  std::fill(st.acc, st.acc + int64_t(G) * D, 0.f);
}

void finalize_state(const OnlineSoftmax& st, int G, int D, float* out, float* lse) {
  for (int h = 0; h < G; ++h) {
    if (st.m[h] == kNegInf || !(st.l[h] > 0.f)) {
      std::fill(out + int64_t(h) * D, out + int64_t(h + 1) * D, 0.f);
      lse[h] = kNegInf;
      continue;
    }
    const float inv = 1.f / st.l[h];
    for (int d = 0; d < D; ++d) out[int64_t(h) * D + d] = st.acc[int64_t(h) * D + d] * inv;
    lse[h] = st.m[h] + std::log(st.l[h]);
  }
}

void run_group_tasks(const LayerView& view, int G, const RetrievalConfig& cfg, const GroupTask* tasks, int64_t n,
                     const Executor& ex, PhaseTimes* times) {
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  if (G <= 0 || G > 64) throw std::invalid_argument("query heads per KV head must be in [1, 64]");
  const int D = view.layout.head_dim;
  const int64_t GD = int64_t(G) * D;
  const int64_t eb = 2;

  // Plan: per task, its candidate range, per-head k and offsets into shared buffers.
  struct Plan {
    RetrievalRange range;
    int64_t ncand = 0;
    std::vector<int64_t> k;
    bool scored = false;  // some head takes a strict subset of the candidates: scores (metadata) needed
    int64_t score_off = 0, sel_off = 0;
    std::vector<int64_t> sel_count;
    std::vector<int32_t> blocks;  // union of the heads' selections, absolute block ids, ascending
    std::vector<uint64_t> masks;
    int64_t max_blocks = 0;                              // the most blocks the union can hold
    int64_t item_begin = 0, item_end = 0, per_item = 1;  // attention item slots: [begin, end), blocks each
  };
  std::vector<Plan> plans(static_cast<size_t>(n));
  int64_t score_total = 0, sel_total = 0;
  std::vector<std::pair<int64_t, int64_t>> score_items;  // (task, first candidate)
  for (int64_t t = 0; t < n; ++t) {
    const GroupTask& task = tasks[t];
    Plan& p = plans[t];
    if (granularity_level(task.block_size) < 0) throw std::invalid_argument("block_size must be 16, 32, 64 or 128");
    const int64_t len = view.seq_lens[task.b];
    p.range = retrieval_range(len, cfg.sink, cfg.local, task.block_size);
    p.ncand = p.range.block_end - p.range.block_begin;
    p.k.assign(size_t(G), 0);
    int64_t ksum = 0;
    for (int h = 0; h < G; ++h) {
      p.k[h] = budget_blocks(task.budgets[h], len, task.block_size, p.ncand);
      ksum += p.k[h];
    }
    p.sel_count.assign(size_t(G), 0);
    if (ksum == 0) continue;
    p.sel_off = sel_total;
    sel_total += ksum;
    // A head that takes every candidate needs no scores; a task none of whose heads takes a strict subset
    // (dense heads, mode 'full') reads no metadata.
    p.scored = std::any_of(p.k.begin(), p.k.end(), [&](int64_t k) { return k > 0 && k < p.ncand; });
    if (!p.scored) continue;
    p.score_off = score_total;
    score_total += G * p.ncand;
  }
  int64_t scored_blocks = 0;
  for (int64_t t = 0; t < n; ++t) scored_blocks += plans[t].scored ? plans[t].ncand : 0;
  // Items end on multiples of score_chunk (a multiple of 64 blocks, so of a page's blocks at P = 1024): a page's
  // table is never split between two items.
  const int64_t score_chunk = (item_size(scored_blocks, ex.num_threads, 64, max_score_item_blocks()) + 63) / 64 * 64;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t begin = plans[t].range.block_begin;
    for (int64_t c = 0; plans[t].scored && c < plans[t].ncand; c = (begin + c) / score_chunk * score_chunk + score_chunk - begin)
      score_items.emplace_back(t, c);
  }
  // Buffers of the calling thread, kept across calls (a decode step calls this once per layer or queue pull):
  // they only grow, so a step allocates and faults in nothing once the first layer has run.
  // The workers must use the caller's buffers: a lambda names a thread_local as its own thread's copy, so they
  // reach this thread's through a local reference, which the lambdas capture.
  thread_local CallScratch scratch;
  CallScratch& cs = scratch;
  if (cs.query.size() < size_t(n)) cs.query.resize(size_t(n));
  grow(cs.scores, score_total);
  grow(cs.sel, sel_total);
  float* scores = cs.scores.data();
  int32_t* sel = cs.sel.data();
  std::vector<PreparedQuery> queries(static_cast<size_t>(n));
  // A few microseconds per task (the AMX tiles): worth spreading over the threads when a layer has many tasks.
  for_each_dynamic(ex, n, [&](int64_t t, int) { queries[size_t(t)] = cs.query[size_t(t)].prepare(tasks[t].q, G, D, cfg.scale); });

  // The attention's work items: chunks of per_item blocks of a task's union. A union is known only once its
  // top-k is done, so each task gets item slots for the most its union can hold (every candidate, or the sum of
  // its heads' k if smaller); the slots past the union's end stay empty. Items are sized from that bound, about
  // 16 per thread.
  int64_t bound_bytes = 0;
  for (int64_t t = 0; t < n; ++t) {
    Plan& p = plans[t];
    p.max_blocks = std::min(p.ncand, std::accumulate(p.k.begin(), p.k.end(), int64_t(0)));
    bound_bytes += p.max_blocks * 2 * tasks[t].block_size * D * eb;
  }
  const int64_t attend_chunk = attend_item_bytes(bound_bytes, ex.num_threads);
  int64_t n_slots = 0;
  for (int64_t t = 0; t < n; ++t) {
    Plan& p = plans[t];
    p.per_item = std::max<int64_t>(1, attend_chunk / (2 * tasks[t].block_size * D * eb));
    p.item_begin = n_slots;
    n_slots += (p.max_blocks + p.per_item - 1) / p.per_item;
    p.item_end = n_slots;
  }
  std::vector<int32_t> slot_task(static_cast<size_t>(n_slots));
  for (int64_t t = 0; t < n; ++t)
    std::fill(slot_task.begin() + plans[t].item_begin, slot_task.begin() + plans[t].item_end, int32_t(t));
  grow(cs.part_out, n_slots * GD);
  grow(cs.part_lse, n_slots * G);
  float* part_out = cs.part_out.data();
  float* part_lse = cs.part_lse.data();
  const size_t workers = size_t(std::max(ex.num_threads, 1));
  if (cs.per_worker.size() < workers) cs.per_worker.resize(workers);
  // A task's merge of its items' partial states (none: out 0, lse -inf).
  auto merge_task = [&](int64_t t) {
    const Plan& p = plans[t];
    const int S = int((int64_t(p.blocks.size()) + p.per_item - 1) / p.per_item);
    for (int h = 0; h < G; ++h) {
      if (S == 0) {
        std::fill(tasks[t].out + int64_t(h) * D, tasks[t].out + int64_t(h + 1) * D, 0.f);
        tasks[t].lse[h] = kNegInf;
        continue;
      }
      merge_states_one(&part_out[size_t(p.item_begin * GD + h * D)], &part_lse[size_t(p.item_begin * G + h)], S, GD, G,
                       D, tasks[t].out + int64_t(h) * D, tasks[t].lse + h);
    }
  };
  for (int64_t t = 0; t < n; ++t)
    if (plans[t].item_end == plans[t].item_begin) merge_task(t);  // nothing can be selected

  // One parallel phase runs all of it. Items are handed out in this order:
  //   1. scores, in chunks of candidate blocks;
  //   2. top-k per (task, head), which waits for its task's last score chunk;
  //   3. the union of each task's selections, which waits for its task's last top-k;
  //   4. the attention item slots, task by task, each waiting for its task's union; the thread that finishes a
  //      task's last slot merges that task.
  // An item waited for was handed out earlier to a thread that is working on it, so nothing waits for an idle
  // thread. A layer's work then has no barrier inside: the top-k, union and attention of early tasks run while
  // the last score chunks are read (with 15 threads, a barrier costs a fork/join and the idle tail of the phase
  // before it).
  const auto t_score = Clock::now();
  const int score_readers = readers(ex, int64_t(score_items.size()));
  const int attend_readers = readers(ex, n_slots);
  const int64_t n_score = int64_t(score_items.size()), n_topk = n * G;
  // Per task, what is not yet done: score chunks, heads' top-k, the union, attention item slots.
  struct Pending {
    std::atomic<int64_t> chunks{0}, slots{0};
    std::atomic<int> heads{0}, unions{0};
  };
  std::unique_ptr<Pending[]> pending(new Pending[size_t(n)]);
  for (int64_t t = 0; t < n; ++t) {
    pending[t].heads.store(G, std::memory_order_relaxed);
    pending[t].unions.store(1, std::memory_order_relaxed);
    pending[t].slots.store(plans[t].item_end - plans[t].item_begin, std::memory_order_relaxed);
  }
  for (const auto& item : score_items) pending[item.first].chunks.fetch_add(1, std::memory_order_relaxed);
  std::atomic<int64_t> score_items_left{n_score}, topk_items_left{n_topk}, unions_left{n};
  // ns since t_score at which the last score chunk, the last top-k and the last union ended
  std::atomic<int64_t> scored_at{0}, topk_at{0}, selected_at{0};
  auto since_score = [&] { return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t_score).count(); };
  auto wait_for = [](const auto& pending) {
    while (pending.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  };
  for_each_dynamic(ex, n_score + n_topk + n + n_slots, [&](int64_t i, int w) {
    if (i < n_score) {
      const auto [t, c] = score_items[size_t(i)];
      const Plan& p = plans[t];
      const int64_t begin = p.range.block_begin + c;
      const int64_t end = std::min(begin / score_chunk * score_chunk + score_chunk, p.range.block_end);
      score_blocks(view, tasks[t].b, tasks[t].kv_head, G, tasks[t].block_size, queries[size_t(t)], begin, end,
                   &scores[size_t(p.score_off + c)], p.ncand, p.range.block_end, score_readers);
      pending[t].chunks.fetch_sub(1, std::memory_order_acq_rel);
      if (score_items_left.fetch_sub(1, std::memory_order_acq_rel) == 1) scored_at.store(since_score());
      return;
    }
    i -= n_score;
    if (i < n_topk) {  // top-k of head h of task t
      const int64_t t = i / G;
      const int h = int(i % G);
      Plan& p = plans[t];
      if (p.k[h] > 0) {
        int64_t off = p.sel_off;
        for (int hh = 0; hh < h; ++hh) off += p.k[hh];
        if (!p.scored) {  // k == ncand: every candidate
          std::iota(&sel[size_t(off)], &sel[size_t(off)] + p.k[h], int32_t(0));
          p.sel_count[h] = p.k[h];
        } else {
          wait_for(pending[t].chunks);
          p.sel_count[h] = select_topk(&scores[size_t(p.score_off + h * p.ncand)], p.ncand, p.k[h], &sel[size_t(off)],
                                       cs.per_worker[size_t(w)].topk);
        }
      }
      pending[t].heads.fetch_sub(1, std::memory_order_acq_rel);
      if (topk_items_left.fetch_sub(1, std::memory_order_acq_rel) == 1) topk_at.store(since_score());
      return;
    }
    i -= n_topk;
    if (i < n) {  // the union of task t's selections, with a head mask per block
      const int64_t t = i;
      wait_for(pending[t].heads);
      Plan& p = plans[t];
      std::vector<uint64_t>& mark = cs.per_worker[size_t(w)].mark;
      mark.assign(size_t(p.ncand), 0);
      int64_t off = p.sel_off;
      for (int h = 0; h < G; ++h) {
        for (int64_t j = 0; j < p.sel_count[h]; ++j) mark[size_t(sel[size_t(off + j)])] |= uint64_t(1) << h;
        off += p.k[h];
      }
      // Branchless compaction: about a fifth of the candidates are chosen, at random, so a branch would miss.
      p.blocks.resize(size_t(p.ncand));
      p.masks.resize(size_t(p.ncand));
      int64_t c = 0;
      for (int64_t j = 0; j < p.ncand; ++j) {
        p.blocks[size_t(c)] = int32_t(p.range.block_begin + j);
        p.masks[size_t(c)] = mark[size_t(j)];
        c += mark[size_t(j)] != 0;
      }
      p.blocks.resize(size_t(c));
      p.masks.resize(size_t(c));
      if (tasks[t].bytes_read)
        *tasks[t].bytes_read = (p.scored ? p.ncand * 2 * D * eb : 0) + c * 2 * tasks[t].block_size * D * eb;
      pending[t].unions.store(0, std::memory_order_release);
      if (unions_left.fetch_sub(1, std::memory_order_acq_rel) == 1) selected_at.store(since_score());
      return;
    }
    // An attention item slot of task t: blocks [first, first + per_item) of its union, if it reaches that far.
    const int64_t slot = i - n;
    const int64_t t = slot_task[size_t(slot)];
    wait_for(pending[t].unions);
    const Plan& p = plans[t];
    const int64_t first = (slot - p.item_begin) * p.per_item;
    if (first < int64_t(p.blocks.size())) {
      const GroupTask& task = tasks[t];
      const int64_t count = std::min<int64_t>(p.per_item, int64_t(p.blocks.size()) - first);
      std::vector<float>& state = cs.per_worker[size_t(w)].state;
      grow(state, GD + 2 * G);
      float* s = state.data();
      OnlineSoftmax st{s, s + G, s + 2 * G};
      init_state(st, G, D);
      attend_blocks(view, task.b, task.kv_head, G, task.block_size, queries[size_t(t)], &p.blocks[size_t(first)],
                    &p.masks[size_t(first)], count, p.range.token_begin, p.range.token_end, st,
                    int64_t(p.blocks.size()) - first, attend_readers);
      finalize_state(st, G, D, &part_out[size_t(slot * GD)], &part_lse[size_t(slot * G)]);
    }
    if (pending[t].slots.fetch_sub(1, std::memory_order_acq_rel) == 1) merge_task(t);
  });
  const auto t_scored = t_score + std::chrono::nanoseconds(scored_at.load());
  const auto t_topk = t_score + std::chrono::nanoseconds(std::max(scored_at.load(), topk_at.load()));
  const auto t_selected = t_score + std::chrono::nanoseconds(std::max(topk_at.load(), selected_at.load()));
  if (times) {
    times->select_s += std::chrono::duration<double>(t_selected - t_start).count();
    times->score_s += std::chrono::duration<double>(t_scored - t_score).count();
    times->topk_s += std::chrono::duration<double>(t_topk - t_scored).count();
    times->attend_s += std::chrono::duration<double>(Clock::now() - t_selected).count();
  }
}

}  // namespace fluxion::core::cpu
