// AVX-512 (F/BW/VL/DQ) kernels, and with FLUXION_AVX512_BF16 defined (kernels_avx512_bf16.cpp) the variant
// that also uses AVX512_BF16 dot products. Only reached when the CPU reports these features (isa.cpp).
#include <cstdint>
#include <cstdlib>

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

#include "core/cpu/score_key.h"  // after the target pragma: compiled for this ISA

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

#ifdef FLUXION_AVX512_AMX
// Palette 1 tile configuration (the 64-byte operand of ldtilecfg).
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tiles every AMX kernel here uses: 16 rows of 64 bytes each.
inline void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Scores of the 16 K rows of a unit for the 16 heads of B tiles 1.. (q_amx_qk, loaded by the caller):
// C[t][h] = q_bf16[h] . k[t] in tile C (0 or 7), one tile product per 32 elements of D; 5 and 6 alternate as
// the K tile. The caller stores C a unit later, so the products run while the previous unit's P V does.
// (The tile intrinsics paste their tile numbers into the instruction: they must be literals, hence a macro.)
#define FLUXION_QK_ISSUE_AMX(NAME, C)                  \
  template <int D>                                     \
  inline void NAME(const uint16_t* kc) {               \
    static_assert(D == 64 || D == 128, "head_dim 64 or 128"); \
    _tile_zero(C);                                     \
    _tile_loadd(5, kc, D * 2);                         \
    _tile_loadd(6, kc + 32, D * 2);                    \
    _tile_dpbf16ps(C, 5, 1);                           \
    _tile_dpbf16ps(C, 6, 2);                           \
    if constexpr (D == 128) {                          \
      _tile_loadd(5, kc + 64, D * 2);                  \
      _tile_loadd(6, kc + 96, D * 2);                  \
      _tile_dpbf16ps(C, 5, 3);                         \
      _tile_dpbf16ps(C, 6, 4);                         \
    }                                                  \
  }
FLUXION_QK_ISSUE_AMX(qk_issue_amx0, 0)
FLUXION_QK_ISSUE_AMX(qk_issue_amx7, 7)
#undef FLUXION_QK_ISSUE_AMX
template <int D>
inline void load_q_tiles(const uint16_t* qb) {
  _tile_loadd(1, qb, 64);
  _tile_loadd(2, qb + 512, 64);
  if constexpr (D == 128) {
    _tile_loadd(3, qb + 1024, 64);
    _tile_loadd(4, qb + 1536, 64);
  }
}
#endif

// ---- attention, AVX-512 ----
// The generic attend_rows (kernels_impl.inc) converts each V row per head (or stages it in an fp32 buffer) and
// reduces scores with scalar bookkeeping; that arithmetic, not the memory, bounded a core, worst where a block
// serves every head of the group (mode 'full'). Here, per call a whole work item (a list of runs):
//  - bf16 V rows are widened two vectors per 64-byte load (x << 16 gives the even elements, x & 0xffff0000
//    the odd ones), so the running output of a head is kept with each 32-element chunk split [even | odd]
//    while a call runs (permuted in place on entry, back on exit);
//  - every V row is widened once for up to four heads, whose accumulators stay in registers over the unit;
//  - the softmax bookkeeping is one vector per head and unit; the rescale is skipped when the max holds;
//  - with AMX, q.k of a whole unit for every head of a run chosen by two or more heads is one tile product per
//    32 elements of D, issued one unit ahead (for a run of one head, vdpbf16ps rows are as fast and keep the
//    K loads out of the tile unit).
constexpr int kPvHeads = 4;  // heads whose accumulators share one widened V row

// Each 32-element chunk of one head's row of D becomes (permutex2var(lo, first, hi), permutex2var(lo, second,
// hi)) of its two 16-element halves: natural -> [even | odd] with split_even_odd, back with join_even_odd.
template <int D>
void permute_chunks(float* acc, __m512i first, __m512i second) {
  for (int c = 0; c < D; c += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + c), hi = _mm512_loadu_ps(acc + c + 16);
    _mm512_storeu_ps(acc + c, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(acc + c + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
}
template <int D>
void split_even_odd(float* acc) {
  permute_chunks<D>(acc, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}
template <int D>
void join_even_odd(float* acc) {
  permute_chunks<D>(acc, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// acc[i] = acc[i] * alpha[i] + sum_t p[i][t] * V[t] over rows [ta, tb) of one unit, for NH heads. bf16 rows are
// widened [even | odd] per 32 elements (the accumulators' layout during a call); fp16 rows in order. pf (may be
// null) takes one step per row of each 64-element pass.
template <int D, bool kBf16, int NH>
inline void pv_unit(const uint16_t* vc, int ta, int tb, float* const* acc, const float* alpha, const float (*p)[16],
                    PrefetchCursor* pf) {
  constexpr int DB = 64;        // output elements per register block: NH * 4 accumulators
  constexpr int NB = DB / 16;
  const __m512i hi_mask = _mm512_set1_epi32(int(0xffff0000u));
  for (int d0 = 0; d0 < D; d0 += DB) {
    __m512 a[NH][NB];
    for (int i = 0; i < NH; ++i)
      for (int j = 0; j < NB; ++j) {
        a[i][j] = _mm512_loadu_ps(acc[i] + d0 + 16 * j);
        if (alpha[i] != 1.f) a[i][j] = _mm512_mul_ps(a[i][j], _mm512_set1_ps(alpha[i]));
      }
    for (int t = ta; t < tb; ++t) {
      if (pf) pf->step();
      const uint16_t* row = vc + int64_t(t) * D + d0;
      __m512 x[NB];
      if constexpr (kBf16) {
        for (int j = 0; j < NB; j += 2) {
          const __m512i w = _mm512_loadu_si512(row + 16 * j);
          x[j] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
          x[j + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask));
        }
      } else {
        for (int j = 0; j < NB; ++j) x[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * j)));
      }
      for (int i = 0; i < NH; ++i) {
        const __m512 pt = _mm512_set1_ps(p[i][t]);
        for (int j = 0; j < NB; ++j) a[i][j] = _mm512_fmadd_ps(pt, x[j], a[i][j]);
      }
    }
    for (int i = 0; i < NH; ++i)
      for (int j = 0; j < NB; ++j) _mm512_storeu_ps(acc[i] + d0 + 16 * j, a[i][j]);
  }
}

// Scores scale * q.k of the 16 rows of one unit for head h (rows outside [ta, tb) are computed on row ta).
template <int D, bool kBf16>
inline __m512 unit_scores(const uint16_t* kc, int ta, int tb, const PreparedQuery& q, int h, float* kbuf) {
  __m512 a[16];
  for (int t = 0; t < 16; ++t) a[t] = _mm512_setzero_ps();
  alignas(64) float s[16];
  if constexpr (kBf16 && Ops::kBf16Dot) {
    const uint16_t* qb = q.q_bf16 + h * D;
    for (int c = 0; c < D; c += 32)
      for (int t = 0; t < 16; ++t) a[t] = Ops::dot_bf16(qb + c, kc + (t >= ta && t < tb ? t : ta) * D + c, a[t]);
    Ops::reduce16(a, s);
    return _mm512_mul_ps(_mm512_load_ps(s), _mm512_set1_ps(q.scale));
  } else {
    // kbuf: the unit's K rows widened to fp32 once per unit (by the caller's first head).
    const float* qh = q.q_scaled + h * D;
    for (int c = 0; c < D; c += 16) {
      const __m512 qv = _mm512_loadu_ps(qh + c);
      for (int t = 0; t < 16; ++t) a[t] = _mm512_fmadd_ps(qv, _mm512_load_ps(kbuf + (t >= ta && t < tb ? t : ta) * D + c), a[t]);
    }
    Ops::reduce16(a, s);
    return _mm512_load_ps(s);
  }
}

// Runs with fewer heads than this score their units with vdpbf16ps instead of AMX tiles (FLUXION_AMX_MIN_HEADS
// overrides the default, for tuning).
inline int amx_min_heads() {
  static const int n = [] {
    const char* env = std::getenv("FLUXION_AMX_MIN_HEADS");
    return env ? std::atoi(env) : 2;
  }();
  return n;
}

template <int D, bool kBf16>
void attend_runs_avx512(const RowRun* runs, int64_t n, int64_t n_listed, int64_t ahead, int64_t chunk_stride,
                        const PreparedQuery& q, int G, const OnlineSoftmax& st) {
  constexpr bool kDot = kBf16 && Ops::kBf16Dot;
  const uint64_t heads_of_g = G >= 64 ? ~uint64_t(0) : (uint64_t(1) << G) - 1;
  auto has_work = [&](int64_t i) { return runs[i].row_hi > runs[i].row_lo && (runs[i].mask & heads_of_g) != 0; };
  auto skip = [&](int64_t i) {  // first run >= i with rows and heads
    while (i < n && !has_work(i)) ++i;
    return i;
  };
  // Runs with at least amx_min_heads() heads score their whole units on AMX (where the CPU has it).
  auto amx_heads = [&](int64_t i) { return __builtin_popcountll(runs[i].mask & heads_of_g) >= amx_min_heads(); };
  uint64_t used = 0;
  bool any_amx_run = false;
  for (int64_t i = 0; i < n; ++i)
    if (has_work(i)) {
      used |= runs[i].mask & heads_of_g;
      any_amx_run = any_amx_run || amx_heads(i);
    }
  if (used == 0) return;
  if constexpr (kBf16)
    for (uint64_t m = used; m; m &= m - 1) split_even_odd<D>(st.acc + int64_t(__builtin_ctzll(m)) * D);
  alignas(64) float kbuf[kDot ? 1 : 16 * D];
  alignas(64) float p[64][16];
  [[maybe_unused]] alignas(64) float cbuf[16 * 16];  // AMX scores [row][head]
  float alpha[64];
  int heads[64], live[64];  // heads of the run; those with a finite max after the unit
#ifdef FLUXION_AVX512_AMX
  // Tiles are configured only for a call that uses them: most calls of a sparse step hold runs of one head.
  const bool amx = kBf16 && q.q_amx_qk != nullptr && G <= 16 && any_amx_run;
  if (amx) {
    load_tile_config();
    load_q_tiles<D>(q.q_amx_qk);
  }
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
#else
  constexpr bool amx = false;
#endif
  // Units scored on AMX: whole ones only (a partial unit's other rows may lie past the caller's array).
  auto amx_unit = [&](int64_t i, int64_t c0) {
    return amx && i < n && c0 * 16 >= runs[i].row_lo && (c0 + 1) * 16 <= runs[i].row_hi && amx_heads(i);
  };
  int64_t i = skip(0), c0 = i < n ? runs[i].row_lo / 16 : 0;
#ifdef FLUXION_AVX512_AMX
  if (amx_unit(i, c0)) qk_issue_amx0<D>(runs[i].k + c0 * chunk_stride);
#endif
  int nh = 0;
  // The run `ahead` places on is prefetched while this run is folded: steps at the start of each unit, after the
  // softmax of each of its first kPvHeads heads and at every row of its first head group's P V passes.
  PrefetchCursor pf;
  for (bool odd = false; i < n; odd = !odd) {
    const RowRun& r = runs[i];
    if (c0 == r.row_lo / 16) {  // first unit of the run
      nh = 0;
      for (uint64_t m = r.mask & heads_of_g; m; m &= m - 1) heads[nh++] = __builtin_ctzll(m);
      pf.finish();  // what the previous run's partial units left
      const int64_t steps_per_unit = 1 + (nh < kPvHeads ? nh : kPvHeads) + (D / 64) * 16;
      pf.start(ahead > 0 && i + ahead < n_listed ? run_prefetch(runs[i + ahead], chunk_stride) : Prefetch{},
               ((r.row_hi + 15) / 16 - r.row_lo / 16) * steps_per_unit);
    }
    pf.step();
    // The unit after this one: the next of this run, or the first of the next run with work.
    int64_t ni = i, nc = c0 + 1;
    if (nc * 16 >= r.row_hi) {
      ni = skip(i + 1);
      nc = ni < n ? runs[ni].row_lo / 16 : 0;
    }
    const uint16_t* kc = r.k + c0 * chunk_stride;
    const uint16_t* vc = r.v + c0 * chunk_stride;
    const int ta = r.row_lo > c0 * 16 ? int(r.row_lo - c0 * 16) : 0;
    const int tb = r.row_hi < (c0 + 1) * 16 ? int(r.row_hi - c0 * 16) : 16;
    const __mmask16 valid = __mmask16(((1u << tb) - 1u) & ~((1u << ta) - 1u));
    if constexpr (!kDot) {
      for (int t = ta; t < tb; ++t)
        for (int c = 0; c < D; c += 16) _mm512_store_ps(kbuf + t * D + c, load_kv<kBf16>(kc + t * D + c));
    }
    // A whole unit's scores for every head at once from AMX tiles, issued one unit ahead so the tile products
    // run during this unit's P V.
    [[maybe_unused]] const bool unit_amx = amx_unit(i, c0);
#ifdef FLUXION_AVX512_AMX
    if (unit_amx) {
      if (odd) _tile_stored(7, cbuf, 64);
      else _tile_stored(0, cbuf, 64);
    }
    if (amx_unit(ni, nc)) {
      if (odd) qk_issue_amx0<D>(runs[ni].k + nc * chunk_stride);
      else qk_issue_amx7<D>(runs[ni].k + nc * chunk_stride);
    }
#endif
    int nlive = 0;
    for (int j = 0; j < nh; ++j) {
      const int h = heads[j];
      __m512 s;
#ifdef FLUXION_AVX512_AMX
      if (unit_amx)
        s = _mm512_mul_ps(_mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(h)), cbuf, 4),
                          _mm512_set1_ps(q.scale));
      else
#endif
        s = _mm512_mask_blend_ps(valid, _mm512_set1_ps(kNegInf), unit_scores<D, kBf16>(kc, ta, tb, q, h, kbuf));
      const float m_old = st.m[h];
      const float smax = _mm512_reduce_max_ps(s);
      const float m_new = m_old > smax ? m_old : smax;
      if (m_new == kNegInf) continue;  // nothing finite yet (NaN-free inputs always give a finite max)
      const __m512 pv = Ops::exp(_mm512_sub_ps(s, _mm512_set1_ps(m_new)));
      _mm512_store_ps(p[nlive], pv);
      const float a = m_old == m_new ? 1.f : m_old == kNegInf ? 0.f : __builtin_expf(m_old - m_new);
      st.l[h] = st.l[h] * a + _mm512_reduce_add_ps(pv);
      st.m[h] = m_new;
      alpha[nlive] = a;
      live[nlive++] = h;
      if (j < kPvHeads) pf.step();
    }
    for (int i0 = 0; i0 < nlive; i0 += kPvHeads) {
      float* acc[kPvHeads];
      const int cnt = nlive - i0 < kPvHeads ? nlive - i0 : kPvHeads;
      for (int j = 0; j < cnt; ++j) acc[j] = st.acc + int64_t(live[i0 + j]) * D;
      PrefetchCursor* pfc = i0 == 0 ? &pf : nullptr;
      switch (cnt) {
        case 1: pv_unit<D, kBf16, 1>(vc, ta, tb, acc, alpha + i0, p + i0, pfc); break;
        case 2: pv_unit<D, kBf16, 2>(vc, ta, tb, acc, alpha + i0, p + i0, pfc); break;
        case 3: pv_unit<D, kBf16, 3>(vc, ta, tb, acc, alpha + i0, p + i0, pfc); break;
        default: pv_unit<D, kBf16, 4>(vc, ta, tb, acc, alpha + i0, p + i0, pfc); break;
      }
    }
    i = ni;
    c0 = nc;
  }
  pf.finish();
  if constexpr (kBf16)
    for (uint64_t m = used; m; m &= m - 1) join_even_odd<D>(st.acc + int64_t(__builtin_ctzll(m)) * D);
#ifdef FLUXION_AVX512_AMX
  if (amx) _tile_release();
#endif
}

void attend_runs_fast(const RowRun* runs, int64_t n, int64_t n_listed, int64_t ahead, int64_t chunk_stride,
                      const PreparedQuery& q, int G, int D, DType dt, const OnlineSoftmax& st) {
  const bool bf16 = dt == DType::kBFloat16;
  if (D == 128) {
    if (bf16) attend_runs_avx512<128, true>(runs, n, n_listed, ahead, chunk_stride, q, G, st);
    else attend_runs_avx512<128, false>(runs, n, n_listed, ahead, chunk_stride, q, G, st);
  } else {
    if (bf16) attend_runs_avx512<64, true>(runs, n, n_listed, ahead, chunk_stride, q, G, st);
    else attend_runs_avx512<64, false>(runs, n, n_listed, ahead, chunk_stride, q, G, st);
  }
}

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

// Top-k's candidate pass, 16 scores per step: score_key on the vector, a compare against the bound, and the
// passing keys and indices compressed to the front of a vector stored whole (hence kGatherSlack).
int64_t gather_keys(const float* scores, int64_t n, uint32_t bound, uint32_t* keys, uint32_t* idx) {
  const __m512 neg_inf = _mm512_set1_ps(-__builtin_inff()), zero = _mm512_setzero_ps();
  const __m512i sign = _mm512_set1_epi32(int(0x80000000u)), ones = _mm512_set1_epi32(-1);
  const __m512i vbound = _mm512_set1_epi32(int(bound)), step = _mm512_set1_epi32(16);
  __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_add_ps(_mm512_loadu_ps(scores + i), zero);      // -0 + 0 = +0
    const __mmask16 selectable = _mm512_cmp_ps_mask(f, neg_inf, _CMP_GT_OQ);  // not -inf, not NaN
    const __m512i u = _mm512_castps_si512(f);
    // negative: ~u; otherwise u with the sign bit set
    const __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(u, sign), _mm512_movepi32_mask(u), u, ones);
    const __mmask16 take = _mm512_mask_cmpge_epu32_mask(selectable, key, vbound);
    _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(take, key));
    _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(take, vidx));
    c += __builtin_popcount(take);
    vidx = _mm512_add_epi32(vidx, step);
  }
  return gather_keys_from(scores, i, n, bound, keys, idx, c);
}

#ifdef FLUXION_AVX512_AMX
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
  load_tile_config();
  const int kchunks = 2 * D / 32;
  const int64_t row_bytes = 2 * int64_t(D) * 2;
  // A step before each A tile load: a step per round of four (64 lines at a time) stalled the loads behind a
  // burst of prefetches (H200 box, one thread, 128K task: 0.66-0.72 -> 0.71-0.73 of the streaming read).
  PrefetchCursor pf;
  pf.start(next, full / 16 * kchunks * ((G + 15) / 16));
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
      for (int kc = 0; kc < kchunks; ++kc) {
        _tile_loadd(4, qb + kc * 512, 64);
        pf.step();
        _tile_loadd(5, a + kc * 32, row_bytes);
        _tile_dpbf16ps(0, 5, 4);
        if (groups > 1) {
          pf.step();
          _tile_loadd(6, a + a16 + kc * 32, row_bytes);
          _tile_dpbf16ps(1, 6, 4);
        }
        if (groups > 2) {
          pf.step();
          _tile_loadd(5, a + 2 * a16 + kc * 32, row_bytes);
          _tile_dpbf16ps(2, 5, 4);
        }
        if (groups > 3) {
          pf.step();
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
const KernelTable kTable = {FLUXION_AVX512_ISA, &score_rows_amx, &attend_runs_fast, &stream_sum, &gather_keys};
#else
const KernelTable kTable = {FLUXION_AVX512_ISA, &score_rows, &attend_runs_fast, &stream_sum, &gather_keys};
#endif

}  // namespace fluxion::core::cpu::FLUXION_AVX512_NS
#pragma GCC pop_options
#else
namespace fluxion::core::cpu::FLUXION_AVX512_NS {
const KernelTable kTable = scalar::kTable;
}
#endif
