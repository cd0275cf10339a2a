// CPU kernels on raw pointers, with the SIMD level chosen at run time (AVX-512, AVX2+FMA, scalar).
// The ISA-specific code only sees contiguous rows; page addressing, top-k and scheduling live in
// retrieval.cpp, compiled for the baseline ISA.
#pragma once
#include <cstdint>

#include "core/layout.h"

namespace fluxion::core::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Running softmax state of G heads: max m[G], sum l[G], unnormalised output acc[G, D] (fp32).
struct OnlineSoftmax {
  float* m;
  float* l;
  float* acc;
};

struct KernelTable {
  Isa isa;
  // Quest bound of each row r of a [nrows, 2, D] min/max table for G heads:
  // scores[h * stride + r] = sum_d qpos[h,d] * max[r,d] + qneg[h,d] * min[r,d], with qpos = max(q, 0),
  // qneg = min(q, 0) (equal to sum_d max(q*min, q*max)).
  void (*score_rows)(const uint16_t* meta, int64_t nrows, const float* qpos, const float* qneg, int G, int D,
                     DType dt, float* scores, int64_t stride);
  // Folds nrows contiguous K/V rows ([nrows, D] each) into the state of every head h with bit h of mask
  // set. q_scaled: [G, D] fp32 queries already multiplied by the softmax scale.
  void (*attend_rows)(const uint16_t* k, const uint16_t* v, int64_t nrows, const float* q_scaled, int G,
                      uint64_t mask, int D, DType dt, const OnlineSoftmax& st);
};

bool isa_supported(Isa isa);
Isa best_supported_isa();
// The ISA in use: FLUXION_SIMD=scalar|avx2|avx512 if set (an unsupported request falls back to the best
// supported one), else the best supported one. set_active_isa throws for an unsupported ISA.
Isa active_isa();
void set_active_isa(Isa isa);
const char* isa_name(Isa isa);
const KernelTable& kernels();
const KernelTable& kernels_for(Isa isa);

// Per-ISA tables, defined in kernels_{scalar,avx2,avx512}.cpp.
namespace scalar { extern const KernelTable kTable; }
namespace avx2 { extern const KernelTable kTable; }
namespace avx512 { extern const KernelTable kTable; }

}  // namespace fluxion::core::cpu
