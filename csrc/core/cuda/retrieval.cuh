// CUDA kernels of the retrieval path over the host KV store: Quest block scoring, per-row top-k, sparse
// attention over selected blocks and the fused retrieval task. Torch-free: raw pointers and POD params;
// this header is plain C++ (includable from host-only translation units).
//
// Conventions (as in csrc/core/layout.h and fluxion/reference.py):
//   * `view.pages` is a *device-accessible* address of the store's arena: for page-locked host memory the
//     pointer that cudaHostGetDevicePointer / cudaPointerGetAttributes return (== the host pointer under
//     UVA). K/V and metadata are read in place over PCIe (zero-copy), 16 bytes per thread, coalesced.
//     `view.frame_table` [B, frame_stride] and `view.seq_lens` [B] int32 are device memory.
//   * q [B, Hq, D] has the store's dtype (bf16 or fp16), contiguous; query head h reads KV head h / G with
//     G = Hq / Hkv (1 <= G <= 64); D is 64 or 128.
//   * lse is the natural-log log-sum-exp of the scaled scores (float32); empty selection: out 0, lse -inf.
//   * Values that the torch glue cannot check without a device sync are made safe instead: sequence
//     lengths are clamped to [0, frame_stride * page_tokens], frame ids outside [0, num_frames) hold no
//     tokens, block indices outside the candidate range are ignored, groups outside [0, B*Hkv) and block
//     sizes not in {16, 32, 64, 128} give an empty task, budgets go through core::budget_blocks (<= 0 or
//     NaN: none, >= 1: all candidates).
// Every launch function enqueues on `stream` only (no host sync, no allocation: graph-capturable) and
// returns the first CUDA error it saw (cudaSuccess otherwise).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/layout.h"

namespace fluxion::core::cuda {

// The store view every paged kernel takes.
struct PagedKV {
  LayerView view;          // pages: device-accessible arena pointer; frame_table, seq_lens: device
  int64_t num_frames = 0;  // F = frames in the arena (frame ids are bounds-checked against it)
  int32_t batch = 0;       // B
  int32_t num_q_heads = 0; // Hq (a multiple of view.layout.num_kv_heads)
  const void* q = nullptr; // [B, Hq, D], the store's dtype, contiguous
};

// ---- score_blocks ------------------------------------------------------------------------------------
// scores[b, h, j] = sum_i max(q[b,h,i] * kmin[j,i], q[b,h,i] * kmax[j,i]) in fp32 (unscaled) for the
// candidate blocks j of sequence b at granularity block_size; -inf for every other j in [0, num_blocks).
// scores: [B, Hq, num_blocks] float32 with num_blocks = frame_stride * page_tokens / block_size.
struct ScoreBlocksParams {
  PagedKV kv;
  int32_t block_size = 16;
  int64_t sink = 0, local = 0;
  float* scores = nullptr;
  int64_t num_blocks = 0;
  int32_t num_sms = 0;  // 0: query the current device
};
size_t score_blocks_workspace_bytes(const ScoreBlocksParams& p);  // 0
cudaError_t score_blocks(const ScoreBlocksParams& p, void* workspace, cudaStream_t stream);

// ---- topk_blocks -------------------------------------------------------------------------------------
// Per row r: the min(k[r] clamped to [0, max_k], #selectable) largest scores, ties to the lower index,
// written ascending to out[r, :], -1 padded. -inf and NaN are never selected (+inf is); -0 == +0.
// scores [rows, num_blocks] float32 (row stride `row_stride`), k [rows] int32 -> out [rows, max_k] int32.
struct TopkBlocksParams {
  const float* scores = nullptr;
  int64_t rows = 0, num_blocks = 0, row_stride = 0;
  const int32_t* k = nullptr;
  int32_t max_k = 0;
  int32_t* out = nullptr;
};
size_t topk_blocks_workspace_bytes(const TopkBlocksParams& p);  // 0
cudaError_t topk_blocks(const TopkBlocksParams& p, void* workspace, cudaStream_t stream);

// ---- sparse_attention --------------------------------------------------------------------------------
// Exact attention of each query head over the tokens of its selected blocks, restricted to the retrieval
// region [sink, N - local). block_idx [B, Hq, K] int32 (-1 = unused; duplicates count once). Each KV-head
// group reads the union of its heads' blocks once (per slice of 8 heads when G > 8), split-K over the
// union and merged by LSE. out [B, Hq, D] float32, lse [B, Hq] float32 (natural log).
struct SparseAttentionParams {
  PagedKV kv;
  const int32_t* block_idx = nullptr;
  int32_t max_blocks = 0;  // K
  int32_t block_size = 16;
  int64_t sink = 0, local = 0;
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;
  int32_t num_sms = 0;
};
size_t sparse_attention_workspace_bytes(const SparseAttentionParams& p);
cudaError_t sparse_attention(const SparseAttentionParams& p, void* workspace, cudaStream_t stream);

// ---- retrieval_attention -----------------------------------------------------------------------------
// The retrieval task for the KV-head groups g = b * Hkv + kv_head listed in groups[0..num_groups):
// Quest scores of the group's candidate blocks at BS = block_sizes[g] (metadata read once for all heads;
// skipped when no head of the group retrieves or each retrieving head takes every candidate),
// k_h = budget_blocks(budgets[b, h], N, BS, #candidates) per head, top-k per head, then attention over the union of the heads' blocks, each block read once per
// group (per slice of 8 heads when G > 8), split-K + LSE merge.
//   budgets [B, Hq] float32, block_sizes [B, Hkv] int32, groups [num_groups] int32 (device);
//   out [B, Hq, D] float32, lse [B, Hq] float32, bytes_read [B, Hkv] int64 (all written: heads of groups
//   not listed get out 0 / lse -inf / bytes 0).
//   bytes_read = (some 0 < k_h < #candidates ? #candidates * 2 * D * 2 : 0) + |union| * 2 * BS * D * 2, the
//   same count as the CPU kernel.
struct RetrievalAttentionParams {
  PagedKV kv;
  const float* budgets = nullptr;
  const int32_t* block_sizes = nullptr;
  const int32_t* groups = nullptr;
  int32_t num_groups = 0;
  int64_t sink = 0, local = 0;
  float scale = 1.f;
  float* out = nullptr;
  float* lse = nullptr;
  int64_t* bytes_read = nullptr;
  int32_t num_sms = 0;
};
size_t retrieval_attention_workspace_bytes(const RetrievalAttentionParams& p);
cudaError_t retrieval_attention(const RetrievalAttentionParams& p, void* workspace, cudaStream_t stream);

}  // namespace fluxion::core::cuda
