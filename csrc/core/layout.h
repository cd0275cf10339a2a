// Page layout of the host KV store, shared by the CPU kernels, the CUDA kernels and the store itself.
// Torch-free: plain integers and raw pointers only.
//
// The store keeps, for every (layer, sequence), a list of *frames*. A frame covers `page_tokens` (P)
// consecutive token positions for all Hkv KV heads and is laid out as Hkv *pages*, one per KV head:
//
//   page (elements of the KV dtype, bf16 or fp16):
//     units u = 0 .. P/16-1:             K[16, D] then V[16, D]  (tokens 16u .. 16u+15; 8 KiB at D=128)
//     meta  for g in {16, 32, 64, 128}:  [P/g, 2, D]  row 2j = key min, row 2j+1 = key max of block j
//
// K and V are interleaved per 16-token unit so that a BS-aligned block of BS in {16, 32, 64, 128} tokens
// is ONE contiguous run of 2*BS*D elements (BS/16 consecutive units): random reads of whole blocks are
// what the retrieval task does, and on host memory a random 8 KiB run streams markedly better than two
// separate 4 KiB K and V runs (see BENCHMARKS.md). Within a unit, K rows and V rows are each contiguous
// [16, D], the tile the CPU and CUDA attention kernels consume.
// Key min/max are elementwise over the block's keys, so they are exact values of the KV dtype (no
// rounding). A partially filled block's min/max cover the tokens appended so far.
// P is a multiple of 128, so every block at every granularity lies inside one page. The default P is 1024:
// the block-16 min/max table of a page is then one 32 KiB run for the metadata scan.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FLUXION_HD __host__ __device__ __forceinline__
#else
#define FLUXION_HD inline
#endif

namespace fluxion::core {

enum class DType : int32_t { kBFloat16 = 0, kFloat16 = 1 };

constexpr int kNumGranularities = 4;
constexpr int kGranularities[kNumGranularities] = {16, 32, 64, 128};
constexpr int kMaxGranularity = 128;

// Index of a granularity in kGranularities, or -1 when it is not one of them.
FLUXION_HD int granularity_level(int block_size) {
  switch (block_size) {
    case 16: return 0;
    case 32: return 1;
    case 64: return 2;
    case 128: return 3;
    default: return -1;
  }
}

// Geometry of one page; every offset is in elements of the KV dtype from the start of the page.
struct PageLayout {
  static constexpr int kUnitTokens = 16;  // tokens per K/V unit: the finest block size

  int32_t page_tokens = 0;  // P
  int32_t head_dim = 0;     // D
  int32_t num_kv_heads = 0; // Hkv: pages per frame

  // Elements of one unit: K[16, D] then V[16, D].
  FLUXION_HD int64_t unit_elems() const { return int64_t(2 * kUnitTokens) * head_dim; }
  // K row / V row of token `t` of the page (0 <= t < P). Rows of one unit are contiguous: the K rows of
  // tokens 16u .. 16u+15 are k_offset(16u) + i*D, their V rows v_offset(16u) + i*D.
  FLUXION_HD int64_t k_offset(int64_t t) const {
    return (t / kUnitTokens) * unit_elems() + (t % kUnitTokens) * head_dim;
  }
  FLUXION_HD int64_t v_offset(int64_t t) const { return k_offset(t) + int64_t(kUnitTokens) * head_dim; }
  // Start of the block that begins at token `t0` of the page (t0 a multiple of 16): BS/16 consecutive units,
  // one contiguous run of block_elems(BS) elements.
  FLUXION_HD int64_t block_offset(int64_t t0) const { return (t0 / kUnitTokens) * unit_elems(); }
  FLUXION_HD int64_t block_elems(int block_size) const { return int64_t(2) * block_size * head_dim; }
  // Offset of the [P/g, 2, D] min/max table of granularity level `level`.
  FLUXION_HD int64_t meta_offset(int level) const {
    int64_t off = 2 * int64_t(page_tokens) * head_dim;
    for (int l = 0; l < level; ++l) off += int64_t(page_tokens / (16 << l)) * 2 * head_dim;
    return off;
  }
  FLUXION_HD int64_t page_elems() const { return meta_offset(kNumGranularities); }
  FLUXION_HD int64_t frame_elems() const { return page_elems() * num_kv_heads; }
};
static_assert(PageLayout::kUnitTokens == 16 && kMaxGranularity % PageLayout::kUnitTokens == 0,
              "every block size is a whole number of units");

// Elements per page for given geometry (P*D*143/64: K + V + the four min/max tables).
FLUXION_HD int64_t page_elems_for(int page_tokens, int head_dim) {
  PageLayout l{page_tokens, head_dim, 1};
  return l.page_elems();
}

// Read-only view of one layer of the store for a batch of sequences, as the kernels see it.
// `pages` is the base of the store's arena (host memory; page-locked and device-addressable under UVA
// when the store was pinned). `frame_table[b * frame_stride + f]` is the frame id of the f-th
// P-token span of sequence b; page (frame, kv_head) starts at pages + (frame*Hkv + kv_head)*page_elems.
struct LayerView {
  const void* pages = nullptr;
  PageLayout layout;
  DType dtype = DType::kBFloat16;
  const int32_t* frame_table = nullptr;  // [B, frame_stride]
  int64_t frame_stride = 0;
  const int32_t* seq_lens = nullptr;     // [B] tokens stored per sequence (N)

  FLUXION_HD int64_t page_offset(int b, int kv_head, int64_t token) const {
    const int64_t frame = frame_table[b * frame_stride + token / layout.page_tokens];
    return (frame * layout.num_kv_heads + kv_head) * layout.page_elems();
  }
};

// The retrieval region of a sequence of N tokens: tokens [sink, N - local) are served from the host
// store; [0, sink) and [N - local, N) are the GPU's dense window. Blocks of size BS that hold at least one
// retrieval token are the candidates; tokens of a selected block that fall in the window are masked in
// attention, so no token is counted twice and none is lost at any block size.
struct RetrievalRange {
  int64_t token_begin = 0, token_end = 0;  // [token_begin, token_end) retrieval tokens; empty if equal
  int64_t block_begin = 0, block_end = 0;  // candidate blocks [block_begin, block_end)
};

FLUXION_HD RetrievalRange retrieval_range(int64_t n, int64_t sink, int64_t local, int64_t block_size) {
  RetrievalRange r;
  r.token_begin = sink < n ? sink : n;
  int64_t end = n - local;
  r.token_end = end > r.token_begin ? end : r.token_begin;
  if (r.token_end > r.token_begin) {
    r.block_begin = r.token_begin / block_size;
    r.block_end = (r.token_end + block_size - 1) / block_size;
  }
  return r;
}

// Blocks a head with budget `budget` (fraction of the sequence's N tokens) retrieves:
// ceil(budget * N / BS), at most the number of candidates. Budget 0 means a streaming head (no retrieval).
FLUXION_HD int64_t budget_blocks(float budget, int64_t n, int64_t block_size, int64_t num_candidates) {
  if (!(budget > 0.f)) return 0;
  double want = double(budget) * double(n) / double(block_size);
  int64_t k = int64_t(want);
  if (double(k) < want - 1e-6) ++k;  // ceil, forgiving float noise such as 0.05f * 32768 / 16
  if (k < 1) k = 1;
  return k < num_candidates ? k : num_candidates;
}

}  // namespace fluxion::core
