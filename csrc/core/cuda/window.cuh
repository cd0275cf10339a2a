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
#include <string>

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
// out [B, Hq, D] float32, lse [B, Hq] float32 (natural log; 0 / -inf when no slot is valid). One launch;
// D in {64, 128}, Hq / Hkv <= 64. Two kernels (see set_window_kernel), both with a cluster of up to 8 CTAs
// per (sequence, KV head, slice of <= 8 query heads) that split the window and merge their partial states
// through distributed shared memory:
//   tile: 128 threads per CTA fold 16-token K/V tiles staged in shared memory (cp.async) on CUDA cores.
//   mma:  each warp owns 16-token tiles held in registers (16-byte loads issued at entry, before anything
//         else) and runs both products on tensor cores (mma.sync m16n8k16, fp32 accumulation; P is split
//         into a high and a low half so the result keeps about 16 mantissa bits); the warps of a CTA merge
//         in shared memory. With one rank there is no cluster at all.
struct WindowAttentionParams {
  const void* q = nullptr;
  const void* k_win = nullptr;
  const void* v_win = nullptr;
  const int32_t* seq_lens = nullptr;
  DType dtype = DType::kBFloat16;
  int32_t batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t window = 0, sink = 0;
  float scale = 1.f;
  int32_t num_sms = 0;  // multiprocessors of the device (the mma kernel's split heuristic); 0: assume 132
  float* out = nullptr;
  float* lse = nullptr;
};
size_t window_attention_workspace_bytes(const WindowAttentionParams& p);  // 0
cudaError_t window_attention(const WindowAttentionParams& p, void* workspace, cudaStream_t stream);

// Which kernel window_attention launches, process-wide (a captured CUDA graph keeps the one it captured):
// "auto" (the default: mma with 2 ranks, the fastest measured on the H200), "tile", "mma" (ranks by heuristic) or "mma:R" (R = 1..8 CTAs per
// (sequence, KV head, head slice); 1 = a single CTA, no cluster). The initial value comes from the
// environment variable FLUXION_WINDOW_KERNEL (read once; an invalid value means "auto").
bool set_window_kernel(const std::string& spec);  // false (nothing changed) when spec is not valid
std::string window_kernel();

}  // namespace fluxion::core::cuda
