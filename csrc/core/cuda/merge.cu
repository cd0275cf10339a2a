// LSE merge of partial attention states: one warp per row, lanes over D. See merge.cuh.
#include <algorithm>

#include "core/cuda/common.cuh"
#include "core/cuda/merge.cuh"

namespace fluxion::core::cuda {
namespace {

constexpr int kMergeThreads = 256;

// Where part s of row `row` lives: stacked [S, rows, ...] arrays, or a list of per-part arrays.
struct StackedStates {
  const float* outs;
  const float* lses;
  int64_t rows, head_dim;
  __device__ const float* out(int64_t s, int64_t row) const { return outs + (s * rows + row) * head_dim; }
  __device__ float lse(int64_t s, int64_t row) const { return lses[s * rows + row]; }
};
struct ListedStates {
  const MergeListedParams* p;  // in the kernel's parameter space
  __device__ const float* out(int64_t s, int64_t row) const { return p->outs[s] + row * p->head_dim; }
  __device__ float lse(int64_t s, int64_t row) const { return p->lses[s][row]; }
};

__device__ __forceinline__ void store_as(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_as(__half* p, float x) { *p = __float2half_rn(x); }

template <class States, typename Out>
__device__ void merge_row(const States& st, int64_t S, int64_t rows, int64_t D, Out* out_all, float* lse_all) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (kMergeThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  float m = -INFINITY;
  for (int64_t s = lane; s < S; s += 32) m = fmaxf(m, st.lse(s, row));
  m = group_max<32>(m);
  Out* out = out_all + row * D;
  if (m == -INFINITY) {
    for (int64_t d = lane; d < D; d += 32) store_as(out + d, 0.f);
    if (lane == 0 && lse_all) lse_all[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int64_t s = lane; s < S; s += 32) total += expf(st.lse(s, row) - m);
  total = group_sum<32>(total);
  const float inv = 1.f / total;
  for (int64_t d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int64_t s = 0; s < S; ++s) {
      const float l = st.lse(s, row);
      if (l != -INFINITY) acc += expf(l - m) * st.out(s, row)[d];
    }
    store_as(out + d, acc * inv);
  }
  if (lane == 0 && lse_all) lse_all[row] = m + logf(total);
}

__global__ void __launch_bounds__(kMergeThreads) merge_states_kernel(const MergeStatesParams p) {
  merge_row(StackedStates{p.outs, p.lses, p.rows, p.head_dim}, p.num_states, p.rows, p.head_dim, p.out, p.lse);
}

template <typename Out>
__global__ void __launch_bounds__(kMergeThreads) merge_listed_kernel(const MergeListedParams p) {
  merge_row(ListedStates{&p}, p.num_states, p.rows, p.head_dim, static_cast<Out*>(p.out), p.lse);
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

cudaError_t merge_listed_states(const MergeListedParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.num_states < 0 || p.num_states > kMaxListedStates) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(p.rows, kMergeThreads / 32);
  if (blocks > int64_t(0x7fffffff)) return cudaErrorInvalidValue;
  switch (p.out_type) {
    case MergeOut::kFloat32: merge_listed_kernel<float><<<unsigned(blocks), kMergeThreads, 0, stream>>>(p); break;
    case MergeOut::kBFloat16:
      merge_listed_kernel<__nv_bfloat16><<<unsigned(blocks), kMergeThreads, 0, stream>>>(p);
      break;
    case MergeOut::kFloat16: merge_listed_kernel<__half><<<unsigned(blocks), kMergeThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fluxion::core::cuda
