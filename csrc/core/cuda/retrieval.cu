// CUDA kernels of the retrieval path: see retrieval.cuh for the contract of every entry point.
//
// Pipeline of retrieval_attention (one launch each, all on the caller's stream):
//   init    out = 0, lse = -inf, bytes_read = 0 for every head / group (unlisted groups stay so)
//   score   grid (token chunk, task): each warp reads the [2, D] key min/max rows of its blocks from host
//           memory with one coalesced 16-byte load per lane, U blocks in flight per warp, and scores the
//           block for all G heads of the group (q in shared memory); also zeroes the task's head masks
//   topk    one CTA per (task, head): radix select over the fp32 score bits (4 x 8-bit passes with early
//           exit) gives the k-th largest key, then one index-ordered pass marks the selected blocks with
//           atomicOr(head bit) in the task's per-block head mask
//   union   one CTA per task: compacts the nonzero masks (ascending block order) into a list, writes the
//           task descriptor and bytes_read
//   attend  grid (split, task, head slice): split-K over the union list; each CTA streams its blocks'
//           16-token K/V tiles from host memory (16-byte register loads, 3 tiles in flight, double-
//           buffered shared stage) and folds them into the flash-decoding state of its heads; writes a
//           partial (out, lse)
//   merge   one warp per (task, head): LSE merge of the splits into out/lse
// sparse_attention reuses union/attend/merge after marking the given block_idx into the masks.
#include <algorithm>

#include "core/cuda/common.cuh"
#include "core/cuda/retrieval.cuh"
#include "core/cuda/tile_attention.cuh"

namespace fluxion::core::cuda {
namespace {

// ------------------------------------------------------------------------------------------------------
// Task resolution shared by the kernels.

struct TaskInfo {
  int32_t b, kv_head, block_size, count;  // count < 0: empty / invalid task
  int64_t tok_begin, tok_end;
};

struct TaskSource {
  const int32_t* groups = nullptr;       // retrieval: task -> g = b * Hkv + kv_head; null: task == g
  const int32_t* block_sizes = nullptr;  // [B * Hkv]; null: uniform_bs
  int32_t uniform_bs = 16;
  int32_t batch = 0, num_kv_heads = 0;
};

__device__ __forceinline__ bool resolve_task(const TaskSource& s, int task, int& b, int& kvh, int& bs) {
  const int g = s.groups ? s.groups[task] : task;
  if (g < 0 || g >= s.batch * s.num_kv_heads) return false;
  b = g / s.num_kv_heads;
  kvh = g % s.num_kv_heads;
  bs = s.block_sizes ? s.block_sizes[g] : s.uniform_bs;
  return granularity_level(bs) >= 0;
}

__device__ __forceinline__ int64_t clamped_len(const LayerView& v, int b) {
  const int64_t cap = v.frame_stride * v.layout.page_tokens;
  const int64_t n = v.seq_lens[b];
  return n < 0 ? 0 : (n > cap ? cap : n);
}

// Element offset of the page holding `token` of (b, kvh), or -1 when its frame id is out of range.
__device__ __forceinline__ int64_t page_base(const LayerView& v, int64_t num_frames, int b, int kvh, int64_t token) {
  const int64_t frame = v.frame_table[b * v.frame_stride + token / v.layout.page_tokens];
  if (frame < 0 || frame >= num_frames) return -1;
  return (frame * v.layout.num_kv_heads + kvh) * v.layout.page_elems();
}

__device__ __forceinline__ bool any_head_retrieves(const float* budgets, int b, int kvh, int G, int Hq, int64_t n,
                                                   int bs, int64_t ncand) {
  bool mine = false;
  if (int(threadIdx.x) < G) mine = budget_blocks(budgets[int64_t(b) * Hq + kvh * G + threadIdx.x], n, bs, ncand) > 0;
  return __syncthreads_or(mine) != 0;
}

// True when some head of the group takes a strict subset of the candidates: only then are scores needed (a
// head that takes every candidate selects all of them without; dense heads read no metadata).
__device__ __forceinline__ bool heads_need_scores(const float* budgets, int b, int kvh, int G, int Hq, int64_t n,
                                                  int bs, int64_t ncand) {
  bool mine = false;
  if (int(threadIdx.x) < G) {
    const int64_t k = budget_blocks(budgets[int64_t(b) * Hq + kvh * G + threadIdx.x], n, bs, ncand);
    mine = k > 0 && k < ncand;
  }
  return __syncthreads_or(mine) != 0;
}

// ------------------------------------------------------------------------------------------------------
// init: out = 0, lse = -inf, bytes = 0.

__global__ void init_outputs_kernel(float* out, float* lse, int64_t* bytes, int64_t n_out, int64_t n_lse,
                                    int64_t n_bytes) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_out; i += stride) out[i] = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_lse; i += stride) lse[i] = -INFINITY;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_bytes; i += stride) bytes[i] = 0;
}

// ------------------------------------------------------------------------------------------------------
// score

struct ScoreArgs {
  LayerView view;
  int64_t num_frames;
  TaskSource src;
  int32_t G, Hq;
  const void* q;
  const float* budgets;  // retrieval: skip tasks where no head retrieves; null: score every task
  int64_t sink, local;
  int32_t chunk_tokens;
  float* scores;
  int64_t row_stride;
  bool per_task_rows;  // true: rows task * G + i (workspace); false: rows b * Hq + kvh * G + i (output)
  uint64_t* masks;     // retrieval: [T, mask_stride], zeroed over the candidate range; may be null
  int64_t mask_stride;
};

constexpr int kScoreThreads = 256;
constexpr int kScoreUnroll = 4;  // independent 16-byte host loads in flight per lane

template <typename T, int D>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const ScoreArgs a) {
  extern __shared__ __align__(16) float q_s[];  // [G, D]
  const int task = blockIdx.y;
  int b, kvh, bs;
  if (!resolve_task(a.src, task, b, kvh, bs)) return;
  const int G = a.G;
  const int64_t n = clamped_len(a.view, b);
  const RetrievalRange rr = retrieval_range(n, a.sink, a.local, bs);
  const int64_t j0 = int64_t(blockIdx.x) * a.chunk_tokens / bs;
  const int64_t j1 = (int64_t(blockIdx.x) + 1) * a.chunk_tokens / bs;
  float* rows = a.scores + (a.per_task_rows ? int64_t(task) * G : int64_t(b) * a.Hq + int64_t(kvh) * G) * a.row_stride;
  if (!a.per_task_rows) {
    const int64_t jend = j1 < a.row_stride ? j1 : a.row_stride;
    const int64_t cnt = jend > j0 ? jend - j0 : 0;
    for (int64_t i = threadIdx.x; i < cnt * G; i += blockDim.x) {
      const int64_t j = j0 + i % cnt;
      if (j < rr.block_begin || j >= rr.block_end) rows[(i / cnt) * a.row_stride + j] = -INFINITY;
    }
  }
  const int64_t lo = j0 > rr.block_begin ? j0 : rr.block_begin;
  const int64_t hi = j1 < rr.block_end ? j1 : rr.block_end;
  if (lo >= hi) return;
  if (a.masks)
    for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) a.masks[int64_t(task) * a.mask_stride + j] = 0;
  if (a.budgets &&
      !any_head_retrieves(a.budgets, b, kvh, G, a.Hq, n, bs, rr.block_end - rr.block_begin))
    return;
  if (a.budgets && !heads_need_scores(a.budgets, b, kvh, G, a.Hq, n, bs, rr.block_end - rr.block_begin)) {
    // Every retrieving head takes every candidate: equal scores select them all, no metadata read.
    for (int64_t i = threadIdx.x; i < int64_t(G) * (hi - lo); i += blockDim.x)
      rows[(i / (hi - lo)) * a.row_stride + lo + i % (hi - lo)] = 0.f;
    return;
  }
  {
    const T* qg = static_cast<const T*>(a.q) + (int64_t(b) * a.Hq + int64_t(kvh) * G) * D;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) q_s[i] = to_float<T>(qg[i]);
  }
  __syncthreads();

  constexpr int L = D / 4;       // lanes per block: the [2, D] rows are L 16-byte chunks
  constexpr int HALF = L / 2;    // lanes [0, HALF) hold min, [HALF, L) max of the same 8-dim chunks
  constexpr int BPW = 32 / L;    // blocks per warp-wide load
  constexpr int NW = kScoreThreads / 32;
  constexpr int U = kScoreUnroll;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / L, li = lane % L;
  const bool holds_max = li >= HALF;
  const int dbase = (li % HALF) * 8;
  const T* pages = static_cast<const T*>(a.view.pages);
  const int64_t meta_off = a.view.layout.meta_offset(granularity_level(bs)) + int64_t(li) * 8;
  const int64_t P = a.view.layout.page_tokens;

  for (int64_t base = lo; base < hi; base += int64_t(NW) * U * BPW) {
    uint4 raw[U];
    bool in_range[U], have[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + int64_t(warp * U + u) * BPW + sub;
      in_range[u] = j < hi;
      have[u] = false;
      raw[u] = make_uint4(0u, 0u, 0u, 0u);
      if (in_range[u]) {
        const int64_t token = j * bs;
        const int64_t page = page_base(a.view, a.num_frames, b, kvh, token);
        if (page >= 0) {
          have[u] = true;
          raw[u] = load16_cg(pages + page + meta_off + ((token % P) / bs) * 2 * D);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      uint4 other;
      other.x = __shfl_xor_sync(0xffffffffu, raw[u].x, HALF);
      other.y = __shfl_xor_sync(0xffffffffu, raw[u].y, HALF);
      other.z = __shfl_xor_sync(0xffffffffu, raw[u].z, HALF);
      other.w = __shfl_xor_sync(0xffffffffu, raw[u].w, HALF);
      float mine[8], oth[8], mn[8], mx[8];
      to_float8<T>(raw[u], mine);
      to_float8<T>(other, oth);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        mn[i] = holds_max ? oth[i] : mine[i];
        mx[i] = holds_max ? mine[i] : oth[i];
      }
      const int64_t j = base + int64_t(warp * U + u) * BPW + sub;
      for (int h = 0; h < G; ++h) {
        const float4 q0 = *reinterpret_cast<const float4*>(q_s + h * D + dbase);
        const float4 q1 = *reinterpret_cast<const float4*>(q_s + h * D + dbase + 4);
        const float qv[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) part += fmaxf(qv[i] * mn[i], qv[i] * mx[i]);
        part = group_sum<HALF>(part);
        if (li == 0 && in_range[u]) rows[int64_t(h) * a.row_stride + j] = have[u] ? part : -INFINITY;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// top-k

constexpr int kTopkThreads = 1024;
constexpr int kTopkItems = 4;

struct TopkArgs {
  const float* scores;
  int64_t row_stride;
  // standalone rows
  int64_t num_blocks;
  const int32_t* k;
  int32_t max_k;
  int32_t* out;
  // retrieval rows (task * G + i)
  LayerView view;
  TaskSource src;
  int32_t G, Hq;
  const float* budgets;
  int64_t sink, local;
  uint64_t* masks;
  int64_t mask_stride;
};

// Order-preserving map of a selectable score to a nonzero uint32 (larger score -> larger key); 0 for -inf
// and NaN. -0 is folded into +0 so that they tie, as float comparison says.
__device__ __forceinline__ uint32_t score_key(float s) {
  if (!(s > -INFINITY)) return 0u;
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct TopkSmem {
  uint32_t hist[256];
  uint32_t scan[33];
  int64_t red[32];
  uint32_t digit, above, count;
};

// Selects min(k, #selectable) entries of row[begin, end) (largest first, ties to the lower index) and calls
// emit(index, rank) for each, rank = position in ascending index order. Returns the number selected.
template <typename Emit>
__device__ __forceinline__ int64_t select_row(const float* row, int64_t begin, int64_t end, int64_t k, TopkSmem& sm,
                                              Emit emit) {
  constexpr int NT = kTopkThreads;
  const int tid = threadIdx.x;
  int64_t cnt = 0;
  for (int64_t i = begin + tid; i < end; i += NT) cnt += score_key(row[i]) != 0u;
  const int64_t nvalid = block_sum_i64<NT>(cnt, sm.red);
  const int64_t keff = k < nvalid ? k : nvalid;
  if (keff <= 0) return 0;

  // Selection rule: key > thr, plus the first `need` keys == thr in index order.
  uint32_t thr = 0u;
  int64_t need = 0;
  if (keff < nvalid) {
    uint32_t prefix = 0u, pmask = 0u;
    int64_t remaining = keff;
    bool exact = true;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += NT) sm.hist[i] = 0u;
      __syncthreads();
      for (int64_t i = begin + tid; i < end; i += NT) {
        const uint32_t key = score_key(row[i]);
        if (key != 0u && (key & pmask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      // Bins in descending digit order; the digit holding the remaining-th largest key.
      const uint32_t c = tid < 256 ? sm.hist[255 - tid] : 0u;
      uint32_t total;
      const uint32_t excl = block_exclusive_scan<NT>(c, sm.scan, total);
      if (tid < 256 && c > 0u && int64_t(excl) < remaining && remaining <= int64_t(excl + c)) {
        sm.digit = 255u - tid;
        sm.above = excl;
        sm.count = c;
      }
      __syncthreads();
      const uint32_t d = sm.digit, above = sm.above, count = sm.count;
      __syncthreads();
      remaining -= above;
      prefix |= d << shift;
      pmask |= 255u << shift;
      if (int64_t(count) == remaining) {  // the whole bin is taken: every key >= prefix
        thr = prefix == 0u ? 0u : prefix - 1u;
        need = 0;
        exact = false;
        break;
      }
    }
    if (exact) {
      thr = prefix;
      need = remaining;
    }
  }

  // Index-ordered emission: rank(x) = #greater before x + min(#equal before x, need).
  int64_t base_g = 0, base_e = 0;
  for (int64_t c0 = begin; c0 < end; c0 += int64_t(NT) * kTopkItems) {
    const int64_t i0 = c0 + int64_t(tid) * kTopkItems;
    uint32_t keys[kTopkItems];
    uint32_t g = 0, e = 0;
#pragma unroll
    for (int it = 0; it < kTopkItems; ++it) {
      keys[it] = i0 + it < end ? score_key(row[i0 + it]) : 0u;
      g += keys[it] > thr;
      e += need > 0 && keys[it] == thr && keys[it] != 0u;
    }
    uint32_t total;
    const uint32_t excl = block_exclusive_scan<NT>((e << 16) | g, sm.scan, total);
    int64_t gb = base_g + (excl & 0xffffu), eb = base_e + (excl >> 16);
#pragma unroll
    for (int it = 0; it < kTopkItems; ++it) {
      if (keys[it] > thr) {
        emit(i0 + it, gb + (eb < need ? eb : need));
        ++gb;
      } else if (need > 0 && keys[it] == thr && keys[it] != 0u) {
        if (eb < need) emit(i0 + it, gb + eb);
        ++eb;
      }
    }
    base_g += total & 0xffffu;
    base_e += total >> 16;
    if (base_g + (base_e < need ? base_e : need) >= keff) break;  // uniform: block totals
  }
  return keff;
}

__global__ void __launch_bounds__(kTopkThreads) topk_rows_kernel(const TopkArgs a) {
  __shared__ TopkSmem sm;
  const int64_t r = blockIdx.x;
  const int32_t kr = a.k[r];
  const int64_t k = kr < 0 ? 0 : (kr > a.max_k ? a.max_k : kr);
  int32_t* out = a.out + r * a.max_k;
  const int64_t got = select_row(a.scores + r * a.row_stride, 0, a.num_blocks, k, sm,
                                 [&](int64_t idx, int64_t rank) { out[rank] = int32_t(idx); });
  for (int64_t i = got + threadIdx.x; i < a.max_k; i += blockDim.x) out[i] = -1;
}

__global__ void __launch_bounds__(kTopkThreads) topk_retrieval_kernel(const TopkArgs a) {
  __shared__ TopkSmem sm;
  const int task = blockIdx.x / a.G, head = blockIdx.x % a.G;
  int b, kvh, bs;
  if (!resolve_task(a.src, task, b, kvh, bs)) return;
  const int64_t n = clamped_len(a.view, b);
  const RetrievalRange rr = retrieval_range(n, a.sink, a.local, bs);
  const int64_t k = budget_blocks(a.budgets[int64_t(b) * a.Hq + int64_t(kvh) * a.G + head], n, bs,
                                  rr.block_end - rr.block_begin);
  if (k <= 0) return;
  uint64_t* masks = a.masks + int64_t(task) * a.mask_stride;
  const unsigned long long bit = 1ull << head;
  select_row(a.scores + int64_t(blockIdx.x) * a.row_stride, rr.block_begin, rr.block_end, k, sm,
             [&](int64_t idx, int64_t) { atomicOr(reinterpret_cast<unsigned long long*>(masks + idx), bit); });
}

// ------------------------------------------------------------------------------------------------------
// sparse_attention: mark the given block indices into the per-task masks.

__global__ void mark_blocks_kernel(const int32_t* block_idx, int64_t total, int32_t K, int32_t Hq, int32_t G,
                                   int32_t Hkv, LayerView view, int32_t bs, int64_t sink, int64_t local,
                                   uint64_t* masks, int64_t mask_stride) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int32_t j = block_idx[e];
  if (j < 0) return;
  const int64_t bh = e / K;
  const int b = int(bh / Hq), h = int(bh % Hq);
  const RetrievalRange rr = retrieval_range(clamped_len(view, b), sink, local, bs);
  if (j < rr.block_begin || j >= rr.block_end) return;
  const int64_t task = int64_t(b) * Hkv + h / G;
  atomicOr(reinterpret_cast<unsigned long long*>(masks + task * mask_stride + j), 1ull << (h % G));
}

// ------------------------------------------------------------------------------------------------------
// union: compact the nonzero head masks of each task's candidate range into an ascending list.

constexpr int kUnionThreads = 1024;
constexpr int kUnionItems = 8;

struct UnionArgs {
  LayerView view;
  TaskSource src;
  int32_t G, Hq;
  const float* budgets;  // retrieval: bytes_read needs "any head retrieves"; null for sparse_attention
  int64_t sink, local;
  const uint64_t* masks;
  int64_t mask_stride;
  int32_t* list_blocks;
  uint64_t* list_masks;
  TaskInfo* tasks;
  int64_t* bytes_read;  // [B * Hkv] or null
};

__global__ void __launch_bounds__(kUnionThreads) union_kernel(const UnionArgs a) {
  __shared__ uint32_t scan[33];
  const int task = blockIdx.x;
  int b, kvh, bs;
  if (!resolve_task(a.src, task, b, kvh, bs)) {
    if (threadIdx.x == 0) a.tasks[task] = TaskInfo{0, 0, 16, -1, 0, 0};
    return;
  }
  const int64_t n = clamped_len(a.view, b);
  const RetrievalRange rr = retrieval_range(n, a.sink, a.local, bs);
  const int64_t ncand = rr.block_end - rr.block_begin;
  bool scanned = true, scored = false;
  if (a.budgets) {
    scanned = ncand > 0 && any_head_retrieves(a.budgets, b, kvh, a.G, a.Hq, n, bs, ncand);
    scored = scanned && heads_need_scores(a.budgets, b, kvh, a.G, a.Hq, n, bs, ncand);
  }
  int64_t count = 0;
  if (scanned) {
    const uint64_t* masks = a.masks + int64_t(task) * a.mask_stride;
    int32_t* lb = a.list_blocks + int64_t(task) * a.mask_stride;
    uint64_t* lm = a.list_masks + int64_t(task) * a.mask_stride;
    for (int64_t c0 = rr.block_begin; c0 < rr.block_end; c0 += int64_t(kUnionThreads) * kUnionItems) {
      const int64_t i0 = c0 + int64_t(threadIdx.x) * kUnionItems;
      uint64_t m[kUnionItems];
      uint32_t c = 0;
#pragma unroll
      for (int it = 0; it < kUnionItems; ++it) {
        m[it] = i0 + it < rr.block_end ? masks[i0 + it] : 0ull;
        c += m[it] != 0ull;
      }
      uint32_t total;
      int64_t pos = count + block_exclusive_scan<kUnionThreads>(c, scan, total);
#pragma unroll
      for (int it = 0; it < kUnionItems; ++it)
        if (m[it] != 0ull) {
          lb[pos] = int32_t(i0 + it);
          lm[pos] = m[it];
          ++pos;
        }
      count += total;
    }
  }
  if (threadIdx.x == 0) {
    a.tasks[task] = TaskInfo{b, kvh, bs, int32_t(count), rr.token_begin, rr.token_end};
    if (a.bytes_read) {
      const int64_t D = a.view.layout.head_dim, eb = 2;
      a.bytes_read[int64_t(b) * a.src.num_kv_heads + kvh] =
          (scored ? ncand * 2 * D * eb : 0) + count * 2 * int64_t(bs) * D * eb;
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// attend: split-K over each task's union list.

struct AttendArgs {
  LayerView view;
  int64_t num_frames;
  const void* q;
  int32_t Hq, G;
  const TaskInfo* tasks;
  const int32_t* list_blocks;
  const uint64_t* list_masks;
  int64_t list_stride;
  int32_t num_splits;
  float scale;
  float* part_o;    // [T, S, G, D]
  float* part_lse;  // [T, S, G]
};

constexpr int kAttendThreads = 128;
constexpr int kAttendRegTiles = 3;  // tiles whose host loads are in flight per CTA (24 KB at D=128)

template <typename T, int D, int HG>
__global__ void __launch_bounds__(kAttendThreads, 3) attend_kernel(const AttendArgs a) {
  using TA = TileAttention<T, D, HG>;
  __shared__ typename TA::Smem sm;
  const int split = blockIdx.x, task = blockIdx.y, slice = blockIdx.z;
  const int G = a.G, h0 = slice * HG;
  const int nh = G - h0 < HG ? G - h0 : HG;
  const TaskInfo ti = a.tasks[task];
  const int64_t prow = int64_t(task) * a.num_splits + split;
  float* po = a.part_o + (prow * G + h0) * D;
  float* pl = a.part_lse + prow * G + h0;
  int64_t lo = 0, hi = 0;
  if (ti.count > 0) {
    const int64_t chunk = ceil_div(ti.count, a.num_splits);
    lo = int64_t(split) * chunk;
    hi = lo + chunk < ti.count ? lo + chunk : ti.count;
  }
  if (lo >= hi) {
    for (int i = threadIdx.x; i < nh * D; i += blockDim.x) po[i] = 0.f;
    if (int(threadIdx.x) < nh) pl[threadIdx.x] = -INFINITY;
    return;
  }
  TA ta;
  ta.init(sm);

  const int bs = ti.block_size;
  const int tpb = bs / TA::TT;
  const int64_t ntiles = (hi - lo) * tpb;
  const int32_t* blocks = a.list_blocks + int64_t(task) * a.list_stride;
  const uint64_t* masks = a.list_masks + int64_t(task) * a.list_stride;
  const uint32_t slice_mask = (1u << nh) - 1u;
  const T* pages = static_cast<const T*>(a.view.pages);
  const int64_t P = a.view.layout.page_tokens;
  // A tile is one unit of the page (layout.h): tiles start at unit boundaries (blocks are BS-aligned and
  // split into 16-token tiles), and the unit's V rows follow its K rows.
  static_assert(TA::TT == PageLayout::kUnitTokens, "a tile must be exactly one K/V unit of the page");
  constexpr int64_t kUnitV = int64_t(PageLayout::kUnitTokens) * D;  // v_offset(t) - k_offset(t)

  struct Tile {
    const T* k;
    uint32_t tok_mask, head_mask;
  };
  auto tile = [&](int64_t t) {
    Tile d{nullptr, 0u, 0u};
    const int64_t li = lo + t / tpb;
    const int64_t tok0 = int64_t(blocks[li]) * bs + (t % tpb) * TA::TT;
    d.head_mask = uint32_t(masks[li] >> h0) & slice_mask;
    const int64_t tl = ti.tok_begin - tok0 > 0 ? ti.tok_begin - tok0 : 0;
    const int64_t th = ti.tok_end - tok0 < TA::TT ? ti.tok_end - tok0 : TA::TT;
    if (d.head_mask == 0u || th <= tl) return d;
    const int64_t page = page_base(a.view, a.num_frames, ti.b, ti.kv_head, tok0);
    if (page < 0) return d;
    d.tok_mask = ((th - tl) >= 32 ? 0xffffffffu : ((1u << (th - tl)) - 1u)) << tl;
    // tok0 is unit-aligned, so the tile is exactly one unit: K[16, D] at k_offset, V[16, D] right after it.
    d.k = pages + page + a.view.layout.k_offset(tok0 % P);
    return d;
  };
  // Tiles travel host -> registers -> shared memory: NR tiles' loads are in flight while one tile is
  // computed from a double-buffered shared stage (one barrier per tile besides compute's own).
  constexpr int NR = kAttendRegTiles;
  uint4 regs[NR][TA::PT];
  auto fetch = [&](int64_t t, uint4(&r)[TA::PT]) {
    if (t < ntiles) {
      const Tile d = tile(t);
      if (d.tok_mask) ta.load_regs(r, d.k, d.k + kUnitV);
    }
  };
#pragma unroll
  for (int r = 0; r < NR; ++r) fetch(r, regs[r]);
  ta.load_q(sm, static_cast<const T*>(a.q) + (int64_t(ti.b) * a.Hq + int64_t(ti.kv_head) * G + h0) * D, nh);
  for (int64_t t0 = 0; t0 < ntiles; t0 += NR) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const int64_t t = t0 + r;
      if (t < ntiles) {
        const Tile d = tile(t);
        // Stage t & 1 was last read by tile t - 2, which every thread finished before the barrier of t - 1.
        if (d.tok_mask) ta.store_regs(sm, int(t & 1), regs[r]);
        __syncthreads();
        fetch(t + NR, regs[r]);
        if (d.tok_mask) ta.compute(sm, int(t & 1), d.tok_mask, d.head_mask, a.scale);
      }
    }
  }
  ta.finish(sm, po, pl, nh);
}

// ------------------------------------------------------------------------------------------------------
// merge: one CTA per (task, head). The split weights exp(lse_s - max) go to shared memory first; then each
// thread owns one output element d for a slice of the splits, so the loads of consecutive splits are
// independent and coalesced (a warp walking the splits one after another is latency-bound: with 256 splits
// it took ~180 us, longer than the attention itself for small batches).

constexpr int kMergeThreads = 256;

struct MergeSplitsArgs {
  const TaskInfo* tasks;
  int32_t num_tasks, G, Hq, D, num_splits;
  const float* part_o;
  const float* part_lse;
  float* out;
  float* lse;
};

template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  v = kMax ? group_max<32>(v) : group_sum<32>(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  return kMax ? group_max<32>(v) : group_sum<32>(v);
}

__global__ void __launch_bounds__(kMergeThreads) merge_splits_kernel(const MergeSplitsArgs a) {
  __shared__ float weight[256];  // num_splits <= 256
  __shared__ float scratch[kMergeThreads / 32];
  __shared__ float partial[kMergeThreads];
  const int task = int(blockIdx.x) / a.G, g = int(blockIdx.x) % a.G;
  const TaskInfo ti = a.tasks[task];
  if (ti.count < 0) return;
  const int S = a.num_splits, D = a.D, tid = int(threadIdx.x);
  const float* pl = a.part_lse + int64_t(task) * S * a.G + g;
  const float* po = a.part_o + (int64_t(task) * S * a.G + g) * D;
  const int64_t row = int64_t(ti.b) * a.Hq + int64_t(ti.kv_head) * a.G + g;
  float* out = a.out + row * D;
  float m = -INFINITY;
  for (int s = tid; s < S; s += kMergeThreads) m = fmaxf(m, pl[int64_t(s) * a.G]);
  m = block_reduce<true>(m, scratch);
  if (m == -INFINITY) {
    for (int d = tid; d < D; d += kMergeThreads) out[d] = 0.f;
    if (tid == 0) a.lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int s = tid; s < S; s += kMergeThreads) {
    const float l = pl[int64_t(s) * a.G];
    const float w = l == -INFINITY ? 0.f : expf(l - m);
    weight[s] = w;
    total += w;
  }
  total = block_reduce<false>(total, scratch);  // its barriers also publish `weight`
  const int d = tid % D, slices = kMergeThreads / D, slice = tid / D;
  float acc = 0.f;
  if (slice < slices) {
#pragma unroll 4
    for (int s = slice; s < S; s += slices) acc += weight[s] * po[int64_t(s) * a.G * D + d];
  }
  partial[tid] = acc;
  __syncthreads();
  if (tid < D) {
    float sum = 0.f;
    for (int k = 0; k < slices; ++k) sum += partial[k * D + tid];
    out[tid] = sum / total;
  }
  if (tid == 0) a.lse[row] = m + logf(total);
}

// ------------------------------------------------------------------------------------------------------
// Host side.

int device_sms(int32_t given) {
  if (given > 0) return given;
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return n > 0 ? n : 132;
}

// Carves aligned regions out of a workspace; with a null base it only measures.
struct Carver {
  char* base;
  size_t off = 0;
  template <typename X>
  X* take(int64_t n) {
    off = size_t(round_up(int64_t(off), 256));
    X* p = base ? reinterpret_cast<X*>(base + off) : nullptr;
    off += size_t(n > 0 ? n : 0) * sizeof(X);
    return p;
  }
};

// Token chunk per score CTA: a multiple of 128 (blocks never straddle chunks), shrunk until the grid
// has about two CTAs per SM.
int score_chunk_tokens(int64_t tasks, int64_t max_tokens, int sms) {
  int64_t chunk = 8192;
  while (chunk > 512 && tasks * ceil_div(max_tokens, chunk) < 2 * int64_t(sms)) chunk /= 2;
  return int(chunk);
}

// Splits of each task's union list: about four CTAs per SM in total, at most one split per 4 tiles of the
// largest possible union, at most 256.
int attend_splits(int64_t tasks, int64_t slices, int64_t max_tiles, int sms) {
  int64_t s = ceil_div(4 * int64_t(sms), std::max<int64_t>(tasks * slices, 1));
  s = std::min<int64_t>(s, std::max<int64_t>(max_tiles / 4, 1));
  return int(std::clamp<int64_t>(s, 1, 256));
}

bool valid_common(const PagedKV& kv) {
  const int D = kv.view.layout.head_dim, hkv = kv.view.layout.num_kv_heads;
  if (D != 64 && D != 128) return false;
  if (hkv <= 0 || kv.num_q_heads % hkv != 0 || kv.num_q_heads / hkv > 64 || kv.num_q_heads / hkv < 1) return false;
  if (kv.view.layout.page_tokens <= 0 || kv.view.layout.page_tokens % kMaxGranularity != 0) return false;
  return true;
}

template <typename F>
cudaError_t dispatch_td(DType dt, int D, F&& f) {
  if (dt == DType::kBFloat16) {
    if (D == 128) return f(__nv_bfloat16{}, std::integral_constant<int, 128>{});
    if (D == 64) return f(__nv_bfloat16{}, std::integral_constant<int, 64>{});
  } else if (dt == DType::kFloat16) {
    if (D == 128) return f(__half{}, std::integral_constant<int, 128>{});
    if (D == 64) return f(__half{}, std::integral_constant<int, 64>{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_hg(int hg, F&& f) {
  switch (hg) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

// union -> attend -> merge for tasks whose masks are filled in.
struct UnionAttend {
  PagedKV kv;
  TaskSource src;
  const float* budgets;
  int64_t sink, local;
  float scale;
  int64_t num_tasks, mask_stride;
  const uint64_t* masks;
  int32_t* list_blocks;
  uint64_t* list_masks;
  TaskInfo* tasks;
  int64_t* bytes_read;
  int num_splits;
  float* part_o;
  float* part_lse;
  float* out;
  float* lse;
};

cudaError_t run_union_attend(const UnionAttend& u, cudaStream_t stream) {
  const int hkv = u.kv.view.layout.num_kv_heads, G = u.kv.num_q_heads / hkv, D = u.kv.view.layout.head_dim;
  const int hg = heads_per_slice(G), slices = int(ceil_div(G, hg));
  UnionArgs ua{u.kv.view, u.src, G, u.kv.num_q_heads, u.budgets, u.sink, u.local, u.masks, u.mask_stride,
               u.list_blocks, u.list_masks, u.tasks, u.bytes_read};
  union_kernel<<<unsigned(u.num_tasks), kUnionThreads, 0, stream>>>(ua);
  AttendArgs aa{u.kv.view, u.kv.num_frames, u.kv.q, u.kv.num_q_heads, G, u.tasks, u.list_blocks, u.list_masks,
                u.mask_stride, u.num_splits, u.scale, u.part_o, u.part_lse};
  const dim3 grid(unsigned(u.num_splits), unsigned(u.num_tasks), unsigned(slices));
  cudaError_t err = dispatch_td(u.kv.view.dtype, D, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int DD = decltype(d)::value;
    return dispatch_hg(hg, [&](auto h) {
      attend_kernel<T, DD, decltype(h)::value><<<grid, kAttendThreads, 0, stream>>>(aa);
      return cudaSuccess;
    });
  });
  if (err != cudaSuccess) return err;
  MergeSplitsArgs ma{u.tasks, int32_t(u.num_tasks), G, u.kv.num_q_heads, D, u.num_splits, u.part_o, u.part_lse,
                     u.out, u.lse};
  merge_splits_kernel<<<unsigned(u.num_tasks * G), kMergeThreads, 0, stream>>>(ma);
  return cudaGetLastError();
}

cudaError_t launch_score(const PagedKV& kv, const TaskSource& src, int64_t num_tasks, const float* budgets,
                         int64_t sink, int64_t local, float* scores, int64_t row_stride, bool per_task_rows,
                         uint64_t* masks, int64_t mask_stride, int sms, cudaStream_t stream) {
  const int hkv = kv.view.layout.num_kv_heads, G = kv.num_q_heads / hkv, D = kv.view.layout.head_dim;
  const int64_t max_tokens = kv.view.frame_stride * kv.view.layout.page_tokens;
  if (num_tasks <= 0 || max_tokens <= 0) return cudaSuccess;
  const int chunk = score_chunk_tokens(num_tasks, max_tokens, sms);
  ScoreArgs sa{kv.view, kv.num_frames, src, G, kv.num_q_heads, kv.q, budgets, sink, local, chunk,
               scores, row_stride, per_task_rows, masks, mask_stride};
  const dim3 grid(unsigned(ceil_div(max_tokens, chunk)), unsigned(num_tasks));
  const size_t smem = size_t(G) * D * sizeof(float);
  return dispatch_td(kv.view.dtype, D, [&](auto t, auto d) {
    score_kernel<decltype(t), decltype(d)::value><<<grid, kScoreThreads, smem, stream>>>(sa);
    return cudaGetLastError();
  });
}

struct SparseLayout {
  uint64_t* masks;
  int32_t* list_blocks;
  uint64_t* list_masks;
  TaskInfo* tasks;
  float* part_o;
  float* part_lse;
  int64_t num_tasks, mask_stride;
  int splits;
  size_t bytes;
};

SparseLayout sparse_layout(const SparseAttentionParams& p, void* ws) {
  SparseLayout l{};
  const int hkv = p.kv.view.layout.num_kv_heads;
  const int G = hkv > 0 ? p.kv.num_q_heads / hkv : 0;
  const int D = p.kv.view.layout.head_dim;
  const int bs = granularity_level(p.block_size) >= 0 ? p.block_size : 16;
  l.num_tasks = int64_t(p.kv.batch) * hkv;
  l.mask_stride = p.kv.view.frame_stride * p.kv.view.layout.page_tokens / bs;
  l.splits = attend_splits(l.num_tasks, ceil_div(std::max(G, 1), heads_per_slice(G)),
                           std::min<int64_t>(l.mask_stride, int64_t(G) * p.max_blocks) * (bs / 16),
                           device_sms(p.num_sms));
  Carver c{static_cast<char*>(ws)};
  l.masks = c.take<uint64_t>(l.num_tasks * l.mask_stride);
  l.list_blocks = c.take<int32_t>(l.num_tasks * l.mask_stride);
  l.list_masks = c.take<uint64_t>(l.num_tasks * l.mask_stride);
  l.tasks = c.take<TaskInfo>(l.num_tasks);
  l.part_o = c.take<float>(l.num_tasks * l.splits * G * D);
  l.part_lse = c.take<float>(l.num_tasks * l.splits * G);
  l.bytes = c.off;
  return l;
}

struct RetrievalLayout {
  float* scores;
  uint64_t* masks;
  int32_t* list_blocks;
  uint64_t* list_masks;
  TaskInfo* tasks;
  float* part_o;
  float* part_lse;
  int64_t mask_stride;
  int splits;
  size_t bytes;
};

RetrievalLayout retrieval_layout(const RetrievalAttentionParams& p, void* ws) {
  RetrievalLayout l{};
  const int hkv = p.kv.view.layout.num_kv_heads;
  const int G = hkv > 0 ? p.kv.num_q_heads / hkv : 0;
  const int D = p.kv.view.layout.head_dim;
  const int64_t T = std::max<int32_t>(p.num_groups, 0);
  l.mask_stride = p.kv.view.frame_stride * p.kv.view.layout.page_tokens / kGranularities[0];
  l.splits = attend_splits(T, ceil_div(std::max(G, 1), heads_per_slice(G)), l.mask_stride, device_sms(p.num_sms));
  Carver c{static_cast<char*>(ws)};
  l.scores = c.take<float>(T * G * l.mask_stride);
  l.masks = c.take<uint64_t>(T * l.mask_stride);
  l.list_blocks = c.take<int32_t>(T * l.mask_stride);
  l.list_masks = c.take<uint64_t>(T * l.mask_stride);
  l.tasks = c.take<TaskInfo>(T);
  l.part_o = c.take<float>(T * l.splits * G * D);
  l.part_lse = c.take<float>(T * l.splits * G);
  l.bytes = c.off;
  return l;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------

size_t score_blocks_workspace_bytes(const ScoreBlocksParams&) { return 0; }

cudaError_t score_blocks(const ScoreBlocksParams& p, void*, cudaStream_t stream) {
  if (!valid_common(p.kv) || granularity_level(p.block_size) < 0) return cudaErrorInvalidValue;
  if (p.kv.batch <= 0 || p.kv.num_q_heads <= 0 || p.num_blocks <= 0) return cudaSuccess;
  TaskSource src;
  src.uniform_bs = p.block_size;
  src.batch = p.kv.batch;
  src.num_kv_heads = p.kv.view.layout.num_kv_heads;
  return launch_score(p.kv, src, int64_t(p.kv.batch) * src.num_kv_heads, nullptr, p.sink, p.local, p.scores,
                      p.num_blocks, false, nullptr, 0, device_sms(p.num_sms), stream);
}

size_t topk_blocks_workspace_bytes(const TopkBlocksParams&) { return 0; }

cudaError_t topk_blocks(const TopkBlocksParams& p, void*, cudaStream_t stream) {
  if (p.rows <= 0 || p.max_k <= 0) return cudaSuccess;
  TopkArgs a{};
  a.scores = p.scores;
  a.row_stride = p.row_stride;
  a.num_blocks = p.num_blocks;
  a.k = p.k;
  a.max_k = p.max_k;
  a.out = p.out;
  topk_rows_kernel<<<unsigned(p.rows), kTopkThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

size_t sparse_attention_workspace_bytes(const SparseAttentionParams& p) { return sparse_layout(p, nullptr).bytes; }

cudaError_t sparse_attention(const SparseAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (!valid_common(p.kv) || granularity_level(p.block_size) < 0) return cudaErrorInvalidValue;
  if (p.kv.batch <= 0 || p.kv.num_q_heads <= 0) return cudaSuccess;
  const SparseLayout l = sparse_layout(p, workspace);
  const int hkv = p.kv.view.layout.num_kv_heads, G = p.kv.num_q_heads / hkv;
  cudaError_t err = cudaSuccess;
  if (l.mask_stride > 0) {
    err = cudaMemsetAsync(l.masks, 0, size_t(l.num_tasks * l.mask_stride) * sizeof(uint64_t), stream);
    if (err != cudaSuccess) return err;
    const int64_t total = int64_t(p.kv.batch) * p.kv.num_q_heads * p.max_blocks;
    if (total > 0) {
      mark_blocks_kernel<<<unsigned(ceil_div(total, 256)), 256, 0, stream>>>(
          p.block_idx, total, p.max_blocks, p.kv.num_q_heads, G, hkv, p.kv.view, p.block_size, p.sink, p.local,
          l.masks, l.mask_stride);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  UnionAttend u{};
  u.kv = p.kv;
  u.src.uniform_bs = p.block_size;
  u.src.batch = p.kv.batch;
  u.src.num_kv_heads = hkv;
  u.budgets = nullptr;
  u.sink = p.sink;
  u.local = p.local;
  u.scale = p.scale;
  u.num_tasks = l.num_tasks;
  u.mask_stride = l.mask_stride;
  u.masks = l.masks;
  u.list_blocks = l.list_blocks;
  u.list_masks = l.list_masks;
  u.tasks = l.tasks;
  u.bytes_read = nullptr;
  u.num_splits = l.splits;
  u.part_o = l.part_o;
  u.part_lse = l.part_lse;
  u.out = p.out;
  u.lse = p.lse;
  return run_union_attend(u, stream);
}

size_t retrieval_attention_workspace_bytes(const RetrievalAttentionParams& p) {
  return retrieval_layout(p, nullptr).bytes;
}

cudaError_t retrieval_attention(const RetrievalAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (!valid_common(p.kv)) return cudaErrorInvalidValue;
  const int hkv = p.kv.view.layout.num_kv_heads, G = p.kv.num_q_heads / hkv, D = p.kv.view.layout.head_dim;
  const int64_t n_lse = int64_t(p.kv.batch) * p.kv.num_q_heads;
  if (n_lse <= 0) return cudaSuccess;
  const int sms = device_sms(p.num_sms);
  {
    const int64_t n_out = n_lse * D;
    const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(n_out, 256), 4 * int64_t(sms)));
    init_outputs_kernel<<<blocks, 256, 0, stream>>>(p.out, p.lse, p.bytes_read, n_out, n_lse,
                                                     p.bytes_read ? int64_t(p.kv.batch) * hkv : 0);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.num_groups <= 0) return err;
  }
  const RetrievalLayout l = retrieval_layout(p, workspace);
  const int64_t T = p.num_groups;
  TaskSource src;
  src.groups = p.groups;
  src.block_sizes = p.block_sizes;
  src.batch = p.kv.batch;
  src.num_kv_heads = hkv;
  cudaError_t err = launch_score(p.kv, src, T, p.budgets, p.sink, p.local, l.scores, l.mask_stride, true, l.masks,
                                 l.mask_stride, sms, stream);
  if (err != cudaSuccess) return err;
  if (l.mask_stride > 0) {
    TopkArgs ta{};
    ta.scores = l.scores;
    ta.row_stride = l.mask_stride;
    ta.view = p.kv.view;
    ta.src = src;
    ta.G = G;
    ta.Hq = p.kv.num_q_heads;
    ta.budgets = p.budgets;
    ta.sink = p.sink;
    ta.local = p.local;
    ta.masks = l.masks;
    ta.mask_stride = l.mask_stride;
    topk_retrieval_kernel<<<unsigned(T * G), kTopkThreads, 0, stream>>>(ta);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  UnionAttend u{};
  u.kv = p.kv;
  u.src = src;
  u.budgets = p.budgets;
  u.sink = p.sink;
  u.local = p.local;
  u.scale = p.scale;
  u.num_tasks = T;
  u.mask_stride = l.mask_stride;
  u.masks = l.masks;
  u.list_blocks = l.list_blocks;
  u.list_masks = l.list_masks;
  u.tasks = l.tasks;
  u.bytes_read = p.bytes_read;
  u.num_splits = l.splits;
  u.part_o = l.part_o;
  u.part_lse = l.part_lse;
  u.out = p.out;
  u.lse = p.lse;
  return run_union_attend(u, stream);
}

}  // namespace fluxion::core::cuda
