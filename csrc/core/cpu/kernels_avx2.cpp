// AVX2 + FMA + F16C kernels. Only reached when the CPU reports these features (isa.cpp).
#include <cstdint>

#include "core/cpu/kernels.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive inside intrinsics headers
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "core/cpu/score_key.h"  // after the target pragma: compiled for this ISA

namespace fluxion::core::cpu::avx2 {
namespace {

struct Ops {
  using V = __m256;
  static constexpr bool kBf16Dot = false;
  static constexpr bool kReduce16 = false;
  static void reduce16(const V*, float*) {}  // unused: kReduce16 is false
  static V dot_bf16(const uint16_t*, const uint16_t*, V acc) { return acc; }  // unused: kBf16Dot is false
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V x) { _mm256_storeu_ps(p, x); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static float reduce_add(V x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    __m128 sh = _mm_movehdup_ps(s);
    s = _mm_add_ps(s, sh);
    sh = _mm_movehl_ps(sh, s);
    return _mm_cvtss_f32(_mm_add_ss(s, sh));
  }
  static V load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // Cephes-style expf: |rel err| < 2e-7 on [-87, 88]; exactly 0 below -87.3 (masked scores are -inf).
  static V exp(V x) {
    const V under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(poly, _mm256_castsi256_ps(e)));
  }
};

#include "core/cpu/kernels_impl.inc"

// Four independent accumulators of 32-byte loads (see the AVX-512 twin).
uint64_t stream_sum(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)));
    a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i + 96)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  uint64_t sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, c + i, 8);
    sum += w;
  }
  return sum;
}

// Lane indices of the set bits of each 8-bit mask, packed to the front: AVX2 has no compress instruction, so a
// permute by this table does its job.
struct CompressTable {
  alignas(32) int32_t lanes[256][8];
};
constexpr CompressTable make_compress_table() {
  CompressTable t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int i = 0; i < 8; ++i)
      if (m >> i & 1) t.lanes[m][c++] = i;
  }
  return t;
}
constexpr CompressTable kCompress = make_compress_table();

// Top-k's candidate pass, 8 scores per step (see the AVX-512 twin): keys by bit operations, the unsigned
// compare as max(key, bound) == key, the passing lanes packed by a table permute and stored whole.
int64_t gather_keys(const float* scores, int64_t n, uint32_t bound, uint32_t* keys, uint32_t* idx) {
  const __m256 neg_inf = _mm256_set1_ps(-__builtin_inff()), zero = _mm256_setzero_ps();
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u)), vbound = _mm256_set1_epi32(int(bound));
  const __m256i step = _mm256_set1_epi32(8);
  __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_add_ps(_mm256_loadu_ps(scores + i), zero);  // -0 + 0 = +0
    const __m256 selectable = _mm256_cmp_ps(f, neg_inf, _CMP_GT_OQ);     // not -inf, not NaN
    const __m256i u = _mm256_castps_si256(f);
    const __m256i negative = _mm256_srai_epi32(u, 31);
    // negative: ~u; otherwise u with the sign bit set
    const __m256i key = _mm256_or_si256(_mm256_xor_si256(u, negative), _mm256_andnot_si256(negative, sign));
    const __m256i at_least = _mm256_cmpeq_epi32(_mm256_max_epu32(key, vbound), key);
    const int take = _mm256_movemask_ps(_mm256_and_ps(selectable, _mm256_castsi256_ps(at_least)));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress.lanes[take]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + c), _mm256_permutevar8x32_epi32(key, perm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + c), _mm256_permutevar8x32_epi32(vidx, perm));
    c += __builtin_popcount(unsigned(take));
    vidx = _mm256_add_epi32(vidx, step);
  }
  return gather_keys_from(scores, i, n, bound, keys, idx, c);
}

}  // namespace

const KernelTable kTable = {Isa::kAvx2, &score_rows, &attend_runs, &stream_sum, &gather_keys};

}  // namespace fluxion::core::cpu::avx2
#pragma GCC pop_options
#else
namespace fluxion::core::cpu::avx2 {
const KernelTable kTable = scalar::kTable;
}
#endif
