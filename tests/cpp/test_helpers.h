// Small helpers for the core tests: random bf16 data and naive double-precision references.
#pragma once
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/half_convert.h"

namespace fluxion::test {

inline std::vector<uint16_t> random_bf16(size_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<uint16_t> out(n);
  for (auto& x : out) x = core::float_to_bf16(dist(rng));
  return out;
}

inline float bf(uint16_t x) { return core::bf16_to_float(x); }

// Exact attention of one query over rows [lo, hi) of K/V [N, D] (bf16), in double.
inline void naive_attention(const std::vector<float>& q, const uint16_t* k, const uint16_t* v, int D, int64_t lo,
                            int64_t hi, double scale, std::vector<double>& out, double& lse) {
  out.assign(size_t(D), 0.0);
  if (hi <= lo) {
    lse = -INFINITY;
    return;
  }
  std::vector<double> s(static_cast<size_t>(hi - lo));
  double m = -INFINITY;
  for (int64_t t = lo; t < hi; ++t) {
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += double(q[size_t(d)]) * bf(k[t * D + d]);
    s[size_t(t - lo)] = dot * scale;
    m = std::max(m, s[size_t(t - lo)]);
  }
  double l = 0;
  for (int64_t t = lo; t < hi; ++t) {
    const double p = std::exp(s[size_t(t - lo)] - m);
    l += p;
    for (int d = 0; d < D; ++d) out[size_t(d)] += p * bf(v[t * D + d]);
  }
  for (auto& x : out) x /= l;
  lse = m + std::log(l);
}

}  // namespace fluxion::test
