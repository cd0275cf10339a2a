// LSE merge of partial attention states on the GPU. Torch-free; plain C++ header.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fluxion::core::cuda {

// Merges S partial states of `rows` rows: outs [S, rows, D] float32, lses [S, rows] float32 (natural log)
// -> out [rows, D], lse [rows]: lse = log(sum_s exp(lse_s)), out = sum_s exp(lse_s - lse) * out_s.
// Parts with lse = -inf contribute nothing (their out is never read); all empty (or S == 0) gives out 0,
// lse -inf, never NaN. All pointers are device memory, contiguous.
struct MergeStatesParams {
  const float* outs = nullptr;
  const float* lses = nullptr;
  int64_t num_states = 0;  // S
  int64_t rows = 0;
  int64_t head_dim = 0;    // D (any positive size)
  float* out = nullptr;
  float* lse = nullptr;
};
size_t merge_attention_states_workspace_bytes(const MergeStatesParams& p);  // 0
cudaError_t merge_attention_states(const MergeStatesParams& p, void* workspace, cudaStream_t stream);

// The same merge of parts at separate addresses (outs[s] [rows, D], lses[s] [rows]), such as the partial states
// of one decode step written by different kernels and by the CPU: no stacking copy first. A part may live in
// page-locked host memory (its device-accessible pointer). out is written in out_type (the model's dtype: the
// decode step's result goes straight into the model's buffer, with no conversion kernel after it); lse may be
// null (not written).
constexpr int kMaxListedStates = 64;
enum class MergeOut : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
struct MergeListedParams {
  const float* outs[kMaxListedStates] = {};
  const float* lses[kMaxListedStates] = {};
  int num_states = 0;  // <= kMaxListedStates
  int64_t rows = 0;
  int64_t head_dim = 0;
  void* out = nullptr;
  MergeOut out_type = MergeOut::kFloat32;
  float* lse = nullptr;
};
cudaError_t merge_listed_states(const MergeListedParams& p, cudaStream_t stream);

}  // namespace fluxion::core::cuda
