// AVX-512 (F/BW/VL/DQ) kernels, and with FLUXION_AVX512_BF16 defined (kernels_avx512_bf16.cpp) the variant
// that also uses AVX512_BF16 dot products. Only reached when the CPU reports these features (isa.cpp).
#include <cstdint>

#ifndef FLUXION_AVX512_NS
#define FLUXION_AVX512_NS avx512
#define FLUXION_AVX512_ISA Isa::kAvx512
#endif

#include "core/cpu/kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside intrinsics headers
#if defined(FLUXION_AVX512_AMX)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")
#elif defined(FLUXION_AVX512_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
#include <immintrin.h>

namespace fluxion::core::cpu::FLUXION_AVX512_NS {
namespace {

struct Ops {
  using V = __m512;
  static constexpr int W = 16;
#ifdef FLUXION_AVX512_BF16
  static constexpr bool kBf16Dot = true;
  // acc += pairwise products of 2W bf16 elements of a and b (exact products, fp32 sums).
  static V dot_bf16(const uint16_t* a, const uint16_t* b, V acc) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a), (__m512bh)_mm512_loadu_si512(b));
  }
#else
  static constexpr bool kBf16Dot = false;
  static V dot_bf16(const uint16_t*, const uint16_t*, V acc) { return acc; }  // unused: kBf16Dot is false
#endif
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V x) { _mm512_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static float reduce_add(V x) { return _mm512_reduce_add_ps(x); }
  // out[i] = sum of the lanes of v[i], i < 16, as one transposing tree: 45 shuffles and adds instead of 16
  // separate horizontal sums.
  static constexpr bool kReduce16 = true;
  static void reduce16(const V* v, float* out) {
    V t[8], u[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] partial sums at positions 0, 2; v[2i+1] at 1, 3
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: partial sums of v[4i .. 4i+3]
      u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    const V x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const V x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD)));
  }
  static V load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load_fp16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // Cephes-style expf with scalef for 2^n; exactly 0 below -87.3 (masked scores are -inf).
  static V exp(V x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.37626f));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V poly = _mm512_set1_ps(1.9875691500e-4f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
    poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_mov_ps(__mmask16(~under), _mm512_scalef_ps(poly, n));
  }
};

#include "core/cpu/kernels_impl.inc"

// Four independent accumulators of 64-byte loads: far more load throughput than DRAM can feed one core.
uint64_t stream_sum(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(c + i));
    a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(c + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(c + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(c + i + 192));
  }
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  uint64_t sum = 0;
  for (uint64_t x : lanes) sum += x;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, c + i, 8);
    sum += w;
  }
  return sum;
}

#ifdef FLUXION_AVX512_AMX
// Palette 1 tile configuration (the 64-byte operand of ldtilecfg).
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One tile product per 16 rows, K chunk of 32 and 16-head group: C[row, head] += A[row, 32 of [min | max]] *
// B[32, head] with B the matching 32 of [q_neg | q_pos] (q.q_amx). Tiles 0-3 accumulate four 16-row groups (a
// 64-row page) so each B tile is loaded once per four products; 4 holds B, 5 and 6 alternate as A. (The tile
// intrinsics take literal tile numbers, hence no loop over the groups.)
void score_rows_amx(const uint16_t* meta, int64_t nrows, const PreparedQuery& q, int G, int D, DType dt, float* scores,
                    int64_t stride, Prefetch next) {
  // Only whole 16-row tiles: a tile never reads past the table (the block-128 table of a page has 8 rows).
  const int64_t full = dt == DType::kBFloat16 && q.q_amx ? nrows / 16 * 16 : 0;
  if (full < nrows)
    score_rows(meta + full * 2 * D, nrows - full, q, G, D, dt, scores + full, stride, full ? Prefetch{} : next);
  if (full == 0) return;
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int kchunks = 2 * D / 32;
  const int64_t row_bytes = 2 * int64_t(D) * 2;
  const int64_t steps = (full + 63) / 64 * kchunks * ((G + 15) / 16);
  int64_t step = 0;
  alignas(64) float c[16 * 16];
  for (int g0 = 0; g0 < G; g0 += 16) {
    const uint16_t* qb = q.q_amx + int64_t(g0 / 16) * kchunks * 512;
    const int hn = G - g0 < 16 ? G - g0 : 16;
    for (int64_t r0 = 0; r0 < full; r0 += 64) {
      const int groups = full - r0 >= 64 ? 4 : int((full - r0) / 16);
      const uint16_t* a = meta + r0 * 2 * D;
      const int64_t a16 = 16 * 2 * int64_t(D);  // elements from one 16-row group to the next
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int kc = 0; kc < kchunks; ++kc, ++step) {
        if (next.ptr) prefetch_slice(next, step, steps);
        _tile_loadd(4, qb + kc * 512, 64);
        _tile_loadd(5, a + kc * 32, row_bytes);
        _tile_dpbf16ps(0, 5, 4);
        if (groups > 1) {
          _tile_loadd(6, a + a16 + kc * 32, row_bytes);
          _tile_dpbf16ps(1, 6, 4);
        }
        if (groups > 2) {
          _tile_loadd(5, a + 2 * a16 + kc * 32, row_bytes);
          _tile_dpbf16ps(2, 5, 4);
        }
        if (groups > 3) {
          _tile_loadd(6, a + 3 * a16 + kc * 32, row_bytes);
          _tile_dpbf16ps(3, 6, 4);
        }
      }
      for (int grp = 0; grp < groups; ++grp) {
        switch (grp) {
          case 0: _tile_stored(0, c, 64); break;
          case 1: _tile_stored(1, c, 64); break;
          case 2: _tile_stored(2, c, 64); break;
          default: _tile_stored(3, c, 64); break;
        }
        for (int h = 0; h < hn; ++h)
          for (int r = 0; r < 16; ++r) scores[int64_t(g0 + h) * stride + r0 + grp * 16 + r] = c[r * 16 + h];
      }
    }
  }
  _tile_release();  // tile state back to init: no 8 KiB of tile data to save at every context switch
}
#endif

}  // namespace

#ifdef FLUXION_AVX512_AMX
const KernelTable kTable = {FLUXION_AVX512_ISA, &score_rows_amx, &attend_rows, &stream_sum};
#else
const KernelTable kTable = {FLUXION_AVX512_ISA, &score_rows, &attend_rows, &stream_sum};
#endif

}  // namespace fluxion::core::cpu::FLUXION_AVX512_NS
#pragma GCC pop_options
#else
namespace fluxion::core::cpu::FLUXION_AVX512_NS {
const KernelTable kTable = scalar::kTable;
}
#endif
