// LSE merge of partial attention states: one warp per row, lanes over D. See merge.cuh.
#include <algorithm>

#include "core/cuda/common.cuh"
#include "core/cuda/merge.cuh"

namespace fluxion::core::cuda {
namespace {

constexpr int kMergeThreads = 256;

__global__ void __launch_bounds__(kMergeThreads) merge_states_kernel(const MergeStatesParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (kMergeThreads / 32) + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const int64_t S = p.num_states, D = p.head_dim;
  float m = -INFINITY;
  for (int64_t s = lane; s < S; s += 32) m = fmaxf(m, p.lses[s * p.rows + row]);
  m = group_max<32>(m);
  float* out = p.out + row * D;
  if (m == -INFINITY) {
    for (int64_t d = lane; d < D; d += 32) out[d] = 0.f;
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int64_t s = lane; s < S; s += 32) total += expf(p.lses[s * p.rows + row] - m);
  total = group_sum<32>(total);
  const float inv = 1.f / total;
  for (int64_t d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const float l = p.lses[s * p.rows + row];
      if (l != -INFINITY) acc += expf(l - m) * p.outs[(s * p.rows + row) * D + d];
    }
    out[d] = acc * inv;
  }
  if (lane == 0) p.lse[row] = m + logf(total);
}

}  // namespace

size_t merge_attention_states_workspace_bytes(const MergeStatesParams&) { return 0; }

cudaError_t merge_attention_states(const MergeStatesParams& p, void*, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(p.rows, kMergeThreads / 32);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  merge_states_kernel<<<unsigned(blocks), kMergeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fluxion::core::cuda
