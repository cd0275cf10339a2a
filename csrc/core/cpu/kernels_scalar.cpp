// Scalar fallback: runs on any x86-64 (and any other) CPU.
#include "core/cpu/kernels.h"
#include "core/cpu/score_key.h"
#include "core/half_convert.h"

namespace fluxion::core::cpu::scalar {
namespace {

struct Ops {
  using V = float;
  static constexpr bool kBf16Dot = false;
  static constexpr bool kReduce16 = false;
  static void reduce16(const V*, float*) {}  // unused: kReduce16 is false
  static V dot_bf16(const uint16_t*, const uint16_t*, V acc) { return acc; }  // unused: kBf16Dot is false
  static constexpr int W = 1;
  static V zero() { return 0.f; }
  static V set1(float x) { return x; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V x) { *p = x; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static float reduce_add(V x) { return x; }
  static V load_bf16(const uint16_t* p) { return bf16_to_float(*p); }
  static V load_fp16(const uint16_t* p) { return fp16_to_float(*p); }
  static V exp(V x) { return x < -87.33654f ? 0.f : __builtin_expf(x); }
};

#include "core/cpu/kernels_impl.inc"

uint64_t stream_sum(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  uint64_t s0 = 0, s1 = 0;
  int64_t i = 0;
  for (; i + 16 <= bytes; i += 16) {
    uint64_t w[2];
    __builtin_memcpy(w, c + i, 16);
    s0 += w[0];
    s1 += w[1];
  }
  for (; i + 8 <= bytes; i += 8) {
    uint64_t w;
    __builtin_memcpy(&w, c + i, 8);
    s0 += w;
  }
  return s0 + s1;
}

}  // namespace

const KernelTable kTable = {Isa::kScalar, &score_rows, &attend_runs, &stream_sum, &gather_keys_scalar};

}  // namespace fluxion::core::cpu::scalar
