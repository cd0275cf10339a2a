// Argument checks shared by the CPU and CUDA glue: every message names the argument, what was expected
// and what was given.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "core/layout.h"

namespace fluxion::ops {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape_doc) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape_doc, ", got shape ", shape_str(t));
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_kv_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
              " must be bfloat16 or float16, got ", t.scalar_type());
}

inline void check_head_dim(int64_t d, const char* name) {
  TORCH_CHECK(d == 64 || d == 128, "head_dim (last dim of ", name, ") must be 64 or 128, got ", d);
}

inline void check_block_size(int64_t bs) {
  TORCH_CHECK(core::granularity_level(int(bs)) >= 0, "block_size must be one of 16, 32, 64, 128, got ", bs);
}

inline core::DType to_core_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? core::DType::kBFloat16 : core::DType::kFloat16;
}

inline void check_window_args(int64_t sink, int64_t local) {
  TORCH_CHECK(sink >= 0, "sink must be >= 0, got ", sink);
  TORCH_CHECK(local >= 0, "local must be >= 0, got ", local);
}

// Checks the store arguments shared by the paged ops and returns the page layout; `q` is [B, Hq, D].
inline core::PageLayout check_paged_args(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table,
                                         const at::Tensor& seq_lens, int64_t page_tokens) {
  check_dim(q, 3, "q", "[B, Hq, D]");
  check_kv_dtype(q, "q");
  check_head_dim(q.size(2), "q");
  check_dim(pages, 3, "pages", "[F, Hkv, page_elems] (HostKVStore.pages())");
  TORCH_CHECK(pages.scalar_type() == q.scalar_type(), "pages must have q's dtype ", q.scalar_type(), ", got ",
              pages.scalar_type());
  TORCH_CHECK(pages.is_contiguous(), "pages must be contiguous (HostKVStore.pages())");
  TORCH_CHECK(page_tokens > 0 && page_tokens % core::kMaxGranularity == 0,
              "page_tokens must be a positive multiple of 128, got ", page_tokens);
  const int64_t D = q.size(2);
  const int64_t hkv = pages.size(1);
  TORCH_CHECK(hkv > 0 && q.size(1) % hkv == 0, "q's head count ", q.size(1), " must be a multiple of the store's ",
              hkv, " KV heads (pages.size(1))");
  TORCH_CHECK(pages.size(2) == core::page_elems_for(int(page_tokens), int(D)), "pages.size(2) is ", pages.size(2),
              " but page_tokens=", page_tokens, " and head_dim=", D, " need ", core::page_elems_for(int(page_tokens), int(D)));
  check_dim(frame_table, 2, "frame_table", "[B, max_frames] int32");
  check_dtype(frame_table, at::kInt, "frame_table");
  TORCH_CHECK(frame_table.is_contiguous(), "frame_table must be contiguous");
  check_dim(seq_lens, 1, "seq_lens", "[B] int32");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  TORCH_CHECK(frame_table.size(0) == q.size(0) && seq_lens.size(0) == q.size(0), "batch mismatch: q has ", q.size(0),
              " sequences, frame_table ", frame_table.size(0), ", seq_lens ", seq_lens.size(0));
  return core::PageLayout{int(page_tokens), int(D), int(hkv)};
}

}  // namespace fluxion::ops
