// Every Fluxion op schema, in one place. Implementations: cpu_ops.cpp (CPU) and cuda_ops.cu (CUDA);
// fake kernels: fluxion/_ops.py. Shapes use B batch, Hq/Hkv heads, D head_dim, N tokens, F frames.
// "pages" is the host store's arena [F, Hkv, page_elems] (see csrc/core/layout.h); on CUDA it must be
// page-locked host memory, read in place over PCIe.
#include <torch/library.h>

TORCH_LIBRARY(fluxion, m) {
  // Quest upper-bound score of every block: [B, Hq, max_frames * page_tokens / block_size] float32,
  // -inf for blocks outside the retrieval region [sink, N - local).
  m.def("score_blocks(Tensor q, Tensor pages, Tensor frame_table, Tensor seq_lens, int page_tokens, "
        "int block_size, int sink, int local) -> Tensor");
  // min(k, max_k, #finite) largest scores per row, ties to the lower index; ascending, -1 padded:
  // scores [R, NB] float32, k [R] int32 -> [R, max_k] int32.
  m.def("topk_blocks(Tensor scores, Tensor k, int max_k) -> Tensor");
  // Exact attention of each query head over the tokens of its selected blocks (window tokens masked):
  // block_idx [B, Hq, K] int32 (-1 = unused) -> (out [B, Hq, D] float32, lse [B, Hq] float32, natural log).
  m.def("sparse_attention(Tensor q, Tensor pages, Tensor frame_table, Tensor seq_lens, Tensor block_idx, "
        "int page_tokens, int block_size, int sink, int local, float scale) -> (Tensor, Tensor)");
  // The retrieval task for the KV-head groups listed in `groups` (g = b * Hkv + kv_head): score at the
  // group's block size, per-head top-k by budget, attention reading each selected block once per group.
  // budgets [B, Hq] float32 in [0, 1] (0 = streaming head), block_sizes [B, Hkv] int32 in {16,32,64,128},
  // groups [T] int32. Returns (out [B, Hq, D] float32, lse [B, Hq] float32, bytes_read [B, Hkv] int64);
  // heads of groups not listed get out 0 and lse -inf, so parts merge without masks.
  m.def("retrieval_attention(Tensor q, Tensor pages, Tensor frame_table, Tensor seq_lens, Tensor budgets, "
        "Tensor block_sizes, Tensor groups, int page_tokens, int sink, int local, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // Merge S partial states: outs [S, ..., D] float32, lses [S, ...] float32 -> (out, lse). Empty parts
  // (lse = -inf) contribute nothing; all empty gives (0, -inf).
  m.def("merge_attention_states(Tensor outs, Tensor lses) -> (Tensor, Tensor)");
  // Write tokens into the dense window [B, Hkv, sink + local, D]: token at position p goes to slot p when
  // p < sink, else to sink + (p - sink) % local. k/v [B, Hkv, T, D], positions [B, T] int32 (-1 = skip).
  m.def("window_append(Tensor(a!) k_win, Tensor(b!) v_win, Tensor k, Tensor v, Tensor positions, int sink) -> ()");
  // Exact attention over the dense window of sequences of seq_lens[b] tokens:
  // q [B, Hq, D], k_win/v_win [B, Hkv, sink + local, D] -> (out [B, Hq, D] float32, lse [B, Hq] float32).
  m.def("window_attention(Tensor q, Tensor k_win, Tensor v_win, Tensor seq_lens, int sink, float scale) "
        "-> (Tensor, Tensor)");
}
