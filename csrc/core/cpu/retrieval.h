// The CPU retrieval task and its building blocks: Quest scoring over the store's block metadata, top-k
// per head, and exact attention over the selected blocks, reading each block once for every head of the
// KV-head group that chose it. Torch-free; parallel work goes through a caller-supplied ParallelFor
// (ATen's pool in the glue) with dynamic work distribution inside.
#pragma once
#include <cstdint>
#include <vector>

#include "core/cpu/kernels.h"
#include "core/kv_store.h"
#include "core/layout.h"

namespace fluxion::core::cpu {

struct RetrievalConfig {
  int sink = 64;
  int local = 256;
  float scale = 1.f;  // softmax scale applied to q.k
};

// How a driver may run parallel work: `parallel(num_threads, fn)` must call fn once per worker index
// (fn(begin, end) over [0, num_threads)). An empty `parallel` or num_threads == 1 runs serially.
struct Executor {
  int num_threads = 1;
  ParallelFor parallel;
};

// One KV-head group (sequence b, KV head kv_head) of one layer.
struct GroupTask {
  int b = 0;
  int kv_head = 0;
  int block_size = 16;
  const float* q = nullptr;        // [G, D] fp32, unscaled: query heads kv_head*G ... kv_head*G + G - 1
  const float* budgets = nullptr;  // [G] fraction of the sequence's tokens; 0 = streaming head
  float* out = nullptr;            // [G, D] fp32
  float* lse = nullptr;            // [G] fp32, natural log; -inf for heads that selected nothing
  int64_t* bytes_read = nullptr;   // optional: metadata scanned (only where some head takes a strict subset of
                                   // the candidates) + K/V of the union of selected blocks
};

// Wall time of run_group_tasks' phases, added to (for per-step statistics).
// All phases run in one parallel region, a task's next phase starting once its own previous one is done, so the
// times are cut at the moments the last item of each phase ended.
struct PhaseTimes {
  double select_s = 0;  // until the last union ended: query prep, scoring, per-head top-k, union of the selections
  double score_s = 0;   // of select_s: until the last score chunk ended
  double topk_s = 0;    // of select_s: from then until the last top-k ended
  double attend_s = 0;  // from the last union to the end: attention and merges left (earlier tasks' overlap select_s)
};

// Runs `n` group tasks of one layer (G query heads per KV head) with dynamic load balancing over
// scoring chunks, per-head top-k and chunks of selected blocks; partial states are merged exactly.
void run_group_tasks(const LayerView& view, int G, const RetrievalConfig& cfg, const GroupTask* tasks, int64_t n,
                     const Executor& ex, PhaseTimes* times = nullptr);

// How far ahead the kernels prefetch, in bytes of the runs they read next, when `threads` threads read the
// store at once (FLUXION_PREFETCH_BYTES overrides it; 0 turns prefetching off).
int64_t prefetch_bytes(int threads);

// ---- building blocks ----

// Owns the prepared forms of one group's queries.
struct QueryScratch {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  // q: [G, D] fp32 (unscaled) -> the views the kernels read; valid until the next prepare.
  PreparedQuery prepare(const float* q, int G, int D, float scale);
};

// Quest scores of blocks [blk_begin, blk_end) at granularity block_size:
// scores[h * stride + (j - blk_begin)]. The blocks must lie inside the sequence. Metadata of blocks up to
// prefetch_end (>= blk_end, inside the sequence; default blk_end) may be prefetched: a caller scoring a range in
// pieces lets each piece prefetch the start of the next one. `threads`: how many threads read the store at once
// (it sets how far ahead to prefetch; 0 = many).
void score_blocks(const LayerView& view, int b, int kv_head, int G, int block_size, const PreparedQuery& q,
                  int64_t blk_begin, int64_t blk_end, float* scores, int64_t stride, int64_t prefetch_end = -1,
                  int threads = 0);

// Indices (in [0, n), ascending) of the min(k, #selectable) largest scores; ties go to the lower index
// (-0 ties +0); -inf and NaN are never selected. Returns the count. `scratch` is reused across calls.
int64_t select_topk(const float* scores, int64_t n, int64_t k, int32_t* out, std::vector<uint32_t>& scratch);

// Folds the tokens of `blocks[i]` (restricted to [tok_begin, tok_end)) into the state of each head whose
// bit is set in masks[i]. blocks[nblocks .. prefetch_blocks) (default: none) are only prefetched: the blocks the
// next piece of the same list will read. `threads`: how many threads read the store at once (it sets how far
// ahead to prefetch; 0 = many).
void attend_blocks(const LayerView& view, int b, int kv_head, int G, int block_size, const PreparedQuery& q,
                   const int32_t* blocks, const uint64_t* masks, int64_t nblocks, int64_t tok_begin, int64_t tok_end,
                   const OnlineSoftmax& st, int64_t prefetch_blocks = -1, int threads = 0);

void init_state(const OnlineSoftmax& st, int G, int D);
// out = acc / l, lse = m + log(l); heads with nothing attended get out 0 and lse -inf.
void finalize_state(const OnlineSoftmax& st, int G, int D, float* out, float* lse);

// Runs fn(i, worker) for i in [0, n) with dynamic distribution over ex's workers.
void for_each_dynamic(const Executor& ex, int64_t n, const std::function<void(int64_t, int)>& fn);

}  // namespace fluxion::core::cpu
