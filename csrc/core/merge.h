// Exact merge of partial attention states by natural-log log-sum-exp (host and device).
#pragma once
#include <cmath>

#include "core/layout.h"

namespace fluxion::core {

// Merges S states of one head: out_s = outs[s * out_stride + d] (d < D), lse_s = lses[s * lse_stride].
// lse = log(sum_s exp(lse_s)); out = sum_s exp(lse_s - lse) * out_s. Parts with lse = -inf contribute
// nothing; all empty gives out 0, lse -inf (never NaN).
FLUXION_HD void merge_states_one(const float* outs, const float* lses, int S, long long out_stride, long long lse_stride,
                                 int D, float* out, float* lse) {
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) m = fmaxf(m, lses[s * lse_stride]);
  if (m == -INFINITY) {
    for (int d = 0; d < D; ++d) out[d] = 0.f;
    *lse = -INFINITY;
    return;
  }
  // One expf per part (not per element): the CPU task merges dozens of parts per head.
  float total = 0.f;
  for (int d = 0; d < D; ++d) out[d] = 0.f;
  for (int s = 0; s < S; ++s) {
    const float l = lses[s * lse_stride];
    if (l == -INFINITY) continue;
    const float w = expf(l - m);
    total += w;
    for (int d = 0; d < D; ++d) out[d] += w * outs[s * out_stride + d];
  }
  for (int d = 0; d < D; ++d) out[d] /= total;
  *lse = m + logf(total);
}

}  // namespace fluxion::core
