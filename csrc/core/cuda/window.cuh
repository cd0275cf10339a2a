// CUDA kernels of the dense GPU window (sink + ring of recent tokens). Torch-free; plain C++ header.
//
// Window layout: k_win / v_win [B, Hkv, W, D] (W = sink + local), contiguous, bf16 or fp16. Token at
// position p lives in slot p when p < sink, else in slot sink + (p - sink) % local. For a sequence of N
// tokens, sink slot s is valid iff s < min(N, sink) and ring slot sink + r iff r < min(max(N - sink, 0),
// local): exactly the tokens [0, sink) U [N - local, N) once the window has seen every position.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/layout.h"

namespace fluxion::core::cuda {

// Writes k/v [B, Hkv, T, D] into the window at positions [B, T] int32 (-1 = skip; tokens at p >= sink are
// dropped when local == 0). When several tokens of one call land in the same slot, the last one in T
// order wins, as in the sequential CPU kernel. Workspace: B * W int32 when T > 1, else none.
struct WindowAppendParams {
  void* k_win = nullptr;
  void* v_win = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* positions = nullptr;
  int32_t batch = 0, num_kv_heads = 0, head_dim = 0, elem_bytes = 2;
  int64_t window = 0, num_tokens = 0, sink = 0;
};
size_t window_append_workspace_bytes(const WindowAppendParams& p);
cudaError_t window_append(const WindowAppendParams& p, void* workspace, cudaStream_t stream);

// Exact attention of q [B, Hq, D] over the valid slots of each sequence's window (seq_lens [B] int32):
// out [B, Hq, D] float32, lse [B, Hq] float32 (natural log; 0 / -inf when no slot is valid). One cluster of
// up to 8 CTAs per (sequence, KV head, slice of <= 8 query heads) splits the window; the ranks merge the partial
// states through distributed shared memory, so the op is a single launch. D in {64, 128}, Hq / Hkv <= 64.
struct WindowAttentionParams {
  const void* q = nullptr;
  const void* k_win = nullptr;
  const void* v_win = nullptr;
  const int32_t* seq_lens = nullptr;
  DType dtype = DType::kBFloat16;
  int32_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t window = 0, sink = 0;
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;
};
size_t window_attention_workspace_bytes(const WindowAttentionParams& p);  // 0
cudaError_t window_attention(const WindowAttentionParams& p, void* workspace, cudaStream_t stream);

}  // namespace fluxion::core::cuda
