// CPU kernels on raw pointers, with the SIMD level chosen at run time (AVX-512, AVX2+FMA, scalar).
// The ISA-specific code only sees rows and lists of row runs; page addressing, top-k and scheduling live in
// retrieval.cpp, compiled for the baseline ISA.
#pragma once
#include <cstdint>

#include "core/layout.h"

namespace fluxion::core::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512Amx = 4 };
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAvx512Amx};

// Running softmax state of G heads: max m[G], sum l[G], unnormalised output acc[G, D] (fp32).
struct OnlineSoftmax {
  float* m;
  float* l;
  float* acc;
};

// One KV-head group's queries in the forms the kernels use, all [G, D]. The bf16 copies are exact when q
// came from bf16 (they feed AVX-512 BF16 dot products); q_scaled = q * scale.
struct PreparedQuery {
  const float* q_pos = nullptr;  // max(q, 0)
  const float* q_neg = nullptr;  // min(q, 0)
  const float* q_scaled = nullptr;
  const uint16_t* q_pos_bf16 = nullptr;
  const uint16_t* q_neg_bf16 = nullptr;
  const uint16_t* q_bf16 = nullptr;
  // [ceil(G/16), 2D/32, 16, 16, 2] bf16: [q_neg | q_pos] of each 16-head group as AMX B tiles (pairs of
  // consecutive elements of the 2D-long row interleaved per head, heads past G zero), for the Quest bound of
  // a metadata row [min | max] as one tile product.
  const uint16_t* q_amx = nullptr;
  // [ceil(G/16), D/32, 16, 16, 2] bf16: q_bf16 of each 16-head group as AMX B tiles (same arrangement), for
  // the scores of 16 K rows x 16 heads as one tile product per 32 elements of D.
  const uint16_t* q_amx_qk = nullptr;
  float scale = 1.f;
};

// A region a kernel prefetches into L2 while it works, spread evenly over its work: the caller names the
// data it will read next (the next selected block, the next page's metadata). Scattered runs are read
// faster this way than by a burst of prefetches before each run (a burst fills the core's miss buffers
// and stalls it) or by the hardware prefetchers alone (they do not cross into the next run's pages).
struct Prefetch {
  const void* ptr = nullptr;
  int64_t bytes = 0;
};

// A span of K/V rows the attention reads, for the heads of `mask`.
struct RowRun {
  const uint16_t* k = nullptr;  // row 0 of the run's first 16-row chunk
  const uint16_t* v = nullptr;
  int64_t row_lo = 0, row_hi = 0;
  uint64_t mask = 0;
};

// The whole 16-row chunks that cover a run's rows, K and V (when they are interleaved: chunk_stride = 32 * D).
inline Prefetch run_prefetch(const RowRun& r, int64_t chunk_stride) {
  constexpr int64_t U = PageLayout::kUnitTokens;
  const int64_t first = r.row_lo / U, last = (r.row_hi + U - 1) / U;
  return Prefetch{r.k + first * chunk_stride, (last - first) * chunk_stride * 2};
}

struct KernelTable {
  Isa isa;
  // Quest bound of each row r of a [nrows, 2, D] min/max table for G heads:
  // scores[h * stride + r] = sum_d q_pos[h,d] * max[r,d] + q_neg[h,d] * min[r,d]
  // (equal to sum_d max(q*min, q*max)).
  void (*score_rows)(const uint16_t* meta, int64_t nrows, const PreparedQuery& q, int G, int D, DType dt,
                     float* scores, int64_t stride, Prefetch next);
  // Folds runs[0 .. n) into the state: for each run, its rows [row_lo, row_hi) into every head h with bit h of its
  // mask set, with scores scale * q.k. Rows come in chunks of 16 (PageLayout::kUnitTokens): row i of a run is at
  // k + (i / 16) * chunk_stride + (i % 16) * D, V alike. chunk_stride = 16 * D reads contiguous [N, D] arrays;
  // 32 * D with v = k + 16 * D reads the store's interleaved K/V units. While a run is folded, the run `ahead`
  // places on (runs[n .. n_listed) are listed only for this) is prefetched; ahead = 0 prefetches nothing.
  void (*attend_runs)(const RowRun* runs, int64_t n, int64_t n_listed, int64_t ahead, int64_t chunk_stride,
                      const PreparedQuery& q, int G, int D, DType dt, const OnlineSoftmax& st);
  // Sum of the 64-bit words of [p, p + bytes) (bytes a multiple of 8): a plain streaming read with the
  // widest loads, for measuring the host read-bandwidth ceiling the kernels are compared against.
  uint64_t (*stream_sum)(const void* p, int64_t bytes);
  // Top-k's candidate pass: the keys (score_key.h) of the scores whose key is >= bound (bound >= 1, so -inf and
  // NaN never pass) and their indices, in index order; returns how many. keys and idx need room for
  // n + kGatherSlack entries (a vector pass stores whole vectors).
  int64_t (*gather_keys)(const float* scores, int64_t n, uint32_t bound, uint32_t* keys, uint32_t* idx);
};
constexpr int64_t kGatherSlack = 16;

bool isa_supported(Isa isa);
Isa best_supported_isa();
// The ISA in use: FLUXION_SIMD=scalar|avx2|avx512|avx512_bf16|avx512_amx if set (an unsupported request falls back to the best
// supported one), else the best supported one. set_active_isa throws for an unsupported ISA.
Isa active_isa();
void set_active_isa(Isa isa);
const char* isa_name(Isa isa);
// The Isa whose isa_name is `name`; false when there is none.
bool isa_from_name(const char* name, Isa* isa);
const KernelTable& kernels();
const KernelTable& kernels_for(Isa isa);

// Per-ISA tables, defined in kernels_{scalar,avx2,avx512,avx512_bf16,avx512_amx}.cpp.
namespace scalar { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }
namespace avx512_bf16 { extern const KernelTable kTable; }
namespace avx512_amx { extern const KernelTable kTable; }

}  // namespace fluxion::core::cpu
