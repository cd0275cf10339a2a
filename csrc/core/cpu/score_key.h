// The order-preserving key of a block score that top-k selects on. Static (internal linkage) on purpose: the
// per-ISA kernel files include it under their own target flags, and a shared inline definition could be merged
// with one compiled for a wider ISA than the CPU has.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace fluxion::core::cpu {

// Larger score -> larger key, nonzero for every selectable score; 0 for -inf and NaN, which are never
// selected. -0 is folded into +0 so that they tie, as float comparison says.
static inline uint32_t score_key(float f) {
  if (!(f > -std::numeric_limits<float>::infinity())) return 0u;
  if (f == 0.f) f = 0.f;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace fluxion::core::cpu
