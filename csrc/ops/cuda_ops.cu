// CUDA implementations of the fluxion ops: argument checks and glue around csrc/core/cuda.
//
// `pages` stays in page-locked host memory (the store's arena) and is read in place over PCIe: the glue
// checks that it is pinned and passes the device address CUDA maps it to (a CUDA tensor on q's device is
// accepted too, read from device memory). Everything else lives on q's device. Each op enqueues on the current stream, allocates outputs and scratch through the caching
// allocator, derives every shape from input shapes only and never synchronises with the host, so the ops
// can be captured in CUDA graphs. Values that only the device knows (sequence lengths, frame ids, block
// indices, budgets, groups) cannot be checked here without a sync; the kernels make them safe instead
// (see csrc/core/cuda/retrieval.cuh) while the CPU kernels reject them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <limits>

#include "core/cuda/merge.cuh"
#include "core/cuda/retrieval.cuh"
#include "core/cuda/window.cuh"
#include "ops/checks.h"

namespace fluxion::ops {
namespace {

namespace kc = fluxion::core::cuda;

// Arguments that must live on the device of the reference tensor `ref_name`.
void check_same_cuda(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor on ", ref.device(), " (the device of ", ref_name,
              "), got a tensor on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), " (the device of ", ref_name, "), got ",
              t.device());
}

void check_is_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor (the CUDA kernel runs because another argument is on a "
              "CUDA device), got a tensor on ", t.device());
}

// The current stream (c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names; the c10
// header keeps this file free of ATen/cuda/CUDAContext.h and its cuBLAS/cuSPARSE includes).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Multiprocessor count of the current device, cached per device (the split heuristics use it).
int device_sms() {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < int(cache.size())) {
    const int cached = cache[size_t(dev)].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < int(cache.size())) cache[size_t(dev)].store(n, std::memory_order_relaxed);
  return n;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// Device address of the arena behind `pages`: page-locked host memory (the store's arena, read over PCIe)
// or, as an extension, a CUDA tensor on q's device (a device-resident copy of the arena; opcheck's input
// clones and staging experiments use it).
const void* device_pages(const at::Tensor& pages, const at::Tensor& q) {
  if (pages.is_cuda()) {
    TORCH_CHECK(pages.device() == q.device(), "pages on a CUDA device must be on ", q.device(),
                " (the device of q), got ", pages.device());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(pages.data_ptr()) % 16 == 0, "pages must be 16-byte aligned");
    return pages.numel() ? pages.data_ptr() : nullptr;
  }
  TORCH_CHECK(pages.device().is_cpu(),
              "pages must be the host store's arena in page-locked CPU memory (HostKVStore(pin=True).pages()), "
              "got a tensor on ", pages.device());
  if (pages.numel() == 0) return nullptr;  // an empty store: no frame id is valid, nothing is read
  TORCH_CHECK(pages.is_pinned(),
              "pages must be page-locked host memory (HostKVStore(pin=True)); got pageable CPU memory");
  void* host = pages.data_ptr();
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, host);
  void* dev = err == cudaSuccess ? attr.devicePointer : nullptr;
  if (err != cudaSuccess) (void)cudaGetLastError();
  if (dev == nullptr) {
    err = cudaHostGetDevicePointer(&dev, host, 0);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      dev = nullptr;
    }
  }
  TORCH_CHECK(dev != nullptr,
              "pages is page-locked but not mapped into the device address space; register it with "
              "cudaHostRegisterMapped (HostKVStore(pin=True) does)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dev) % 16 == 0, "pages must be 16-byte aligned, got address ", dev);
  return dev;
}

// Checked view of the store for the paged ops; keeps the contiguous q alive.
struct Paged {
  at::Tensor q;
  kc::PagedKV kv;
  int64_t G = 0;
};

Paged make_paged(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table,
                 const at::Tensor& seq_lens, int64_t page_tokens) {
  check_is_cuda(q, "q");
  const core::PageLayout layout = check_paged_args(q, pages, frame_table, seq_lens, page_tokens);
  check_same_cuda(frame_table, "frame_table", q, "q");
  check_same_cuda(seq_lens, "seq_lens", q, "q");
  const int64_t G = q.size(1) / layout.num_kv_heads;
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head are supported, got Hq / Hkv = ", q.size(1), " / ",
              layout.num_kv_heads, " = ", G);
  TORCH_CHECK(pages.size(0) <= std::numeric_limits<int32_t>::max(), "pages has too many frames: ", pages.size(0));
  Paged p;
  p.q = q.contiguous();
  p.G = G;
  p.kv.view.pages = device_pages(pages, q);
  p.kv.view.layout = layout;
  p.kv.view.dtype = to_core_dtype(q.scalar_type());
  p.kv.view.frame_table = frame_table.data_ptr<int32_t>();
  p.kv.view.frame_stride = frame_table.size(1);
  p.kv.view.seq_lens = seq_lens.data_ptr<int32_t>();
  p.kv.num_frames = pages.size(0);
  p.kv.batch = int32_t(q.size(0));
  p.kv.num_q_heads = int32_t(q.size(1));
  p.kv.q = p.q.data_ptr();
  TORCH_CHECK(int64_t(q.size(0)) * layout.num_kv_heads <= 65535, "B * Hkv must be <= 65535, got ",
              q.size(0) * layout.num_kv_heads);
  return p;
}

void check_launch(cudaError_t err) {
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor score_blocks_cuda(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table,
                             const at::Tensor& seq_lens, int64_t page_tokens, int64_t block_size, int64_t sink,
                             int64_t local) {
  check_block_size(block_size);
  check_window_args(sink, local);
  check_is_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const Paged p = make_paged(q, pages, frame_table, seq_lens, page_tokens);
  const int64_t nb = frame_table.size(1) * page_tokens / block_size;
  at::Tensor scores = at::empty({q.size(0), q.size(1), nb}, q.options().dtype(at::kFloat));
  if (scores.numel() == 0) return scores;
  kc::ScoreBlocksParams sp;
  sp.kv = p.kv;
  sp.block_size = int32_t(block_size);
  sp.sink = sink;
  sp.local = local;
  sp.scores = scores.data_ptr<float>();
  sp.num_blocks = nb;
  sp.num_sms = device_sms();
  check_launch(kc::score_blocks(sp, nullptr, current_stream()));
  return scores;
}

at::Tensor topk_blocks_cuda(const at::Tensor& scores, const at::Tensor& k, int64_t max_k) {
  TORCH_CHECK(scores.dim() >= 1, "scores must be [..., NB], got a scalar");
  check_is_cuda(scores, "scores");
  check_same_cuda(k, "k", scores, "scores");
  check_dtype(scores, at::kFloat, "scores");
  check_dtype(k, at::kInt, "k");
  TORCH_CHECK(max_k >= 0, "max_k must be >= 0, got ", max_k);
  TORCH_CHECK(max_k <= std::numeric_limits<int32_t>::max(), "max_k must fit in int32, got ", max_k);
  TORCH_CHECK(k.sizes() == scores.sizes().slice(0, scores.dim() - 1), "k must have shape ",
              c10::str(scores.sizes().slice(0, scores.dim() - 1)), " (scores without its last dim), got ", shape_str(k));
  const int64_t nb = scores.size(-1);
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), "scores has too many blocks: ", nb);
  const c10::cuda::CUDAGuard guard(scores.device());
  auto out_shape = k.sizes().vec();
  out_shape.push_back(max_k);
  at::Tensor out = at::empty(out_shape, scores.options().dtype(at::kInt));
  const int64_t rows = k.numel();
  if (rows == 0 || max_k == 0) return out;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "topk_blocks: too many rows: ", rows);
  const at::Tensor s = scores.contiguous();
  const at::Tensor kk = k.contiguous();
  kc::TopkBlocksParams tp;
  tp.scores = s.data_ptr<float>();
  tp.rows = rows;
  tp.num_blocks = nb;
  tp.row_stride = nb;
  tp.k = kk.data_ptr<int32_t>();
  tp.max_k = int32_t(max_k);
  tp.out = out.data_ptr<int32_t>();
  check_launch(kc::topk_blocks(tp, nullptr, current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& q, const at::Tensor& pages,
                                                         const at::Tensor& frame_table, const at::Tensor& seq_lens,
                                                         const at::Tensor& block_idx, int64_t page_tokens,
                                                         int64_t block_size, int64_t sink, int64_t local,
                                                         double scale) {
  check_block_size(block_size);
  check_window_args(sink, local);
  check_is_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const Paged p = make_paged(q, pages, frame_table, seq_lens, page_tokens);
  check_dim(block_idx, 3, "block_idx", "[B, Hq, K] int32");
  check_dtype(block_idx, at::kInt, "block_idx");
  check_same_cuda(block_idx, "block_idx", q, "q");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(block_idx.size(0) == B && block_idx.size(1) == Hq, "block_idx must be [B, Hq, K] = [", B, ", ", Hq,
              ", K], got ", shape_str(block_idx));
  TORCH_CHECK(block_idx.size(2) <= std::numeric_limits<int32_t>::max(), "block_idx has too many blocks per head");
  at::Tensor out = at::empty({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0) return {out, lse};
  const at::Tensor idx = block_idx.contiguous();
  kc::SparseAttentionParams sp;
  sp.kv = p.kv;
  sp.block_idx = idx.data_ptr<int32_t>();
  sp.max_blocks = int32_t(block_idx.size(2));
  sp.block_size = int32_t(block_size);
  sp.sink = sink;
  sp.local = local;
  sp.scale = float(scale);
  sp.out = out.data_ptr<float>();
  sp.lse = lse.data_ptr<float>();
  sp.num_sms = device_sms();
  at::Tensor ws = workspace(kc::sparse_attention_workspace_bytes(sp), q);
  check_launch(kc::sparse_attention(sp, ws.data_ptr(), current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> retrieval_attention_cuda(
    const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table, const at::Tensor& seq_lens,
    const at::Tensor& budgets, const at::Tensor& block_sizes, const at::Tensor& groups, int64_t page_tokens, int64_t sink,
    int64_t local, double scale) {
  check_window_args(sink, local);
  check_is_cuda(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const Paged p = make_paged(q, pages, frame_table, seq_lens, page_tokens);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), hkv = pages.size(1);
  check_dtype(budgets, at::kFloat, "budgets");
  TORCH_CHECK(budgets.sizes() == at::IntArrayRef({B, Hq}), "budgets must be [B, Hq] = [", B, ", ", Hq, "], got ",
              shape_str(budgets));
  check_same_cuda(budgets, "budgets", q, "q");
  check_dtype(block_sizes, at::kInt, "block_sizes");
  TORCH_CHECK(block_sizes.sizes() == at::IntArrayRef({B, hkv}), "block_sizes must be [B, Hkv] = [", B, ", ", hkv,
              "], got ", shape_str(block_sizes));
  check_same_cuda(block_sizes, "block_sizes", q, "q");
  check_dim(groups, 1, "groups", "[T] int32");
  check_dtype(groups, at::kInt, "groups");
  check_same_cuda(groups, "groups", q, "q");
  TORCH_CHECK(groups.size(0) <= 65535, "groups may list at most 65535 groups, got ", groups.size(0));
  at::Tensor out = at::empty({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  at::Tensor bytes = at::empty({B, hkv}, q.options().dtype(at::kLong));
  if (B == 0 || Hq == 0) return {out, lse, bytes};
  const at::Tensor bud = budgets.contiguous(), bsz = block_sizes.contiguous(), grp = groups.contiguous();
  kc::RetrievalAttentionParams rp;
  rp.kv = p.kv;
  rp.budgets = bud.data_ptr<float>();
  rp.block_sizes = bsz.data_ptr<int32_t>();
  rp.groups = grp.data_ptr<int32_t>();
  rp.num_groups = int32_t(groups.size(0));
  rp.sink = sink;
  rp.local = local;
  rp.scale = float(scale);
  rp.out = out.data_ptr<float>();
  rp.lse = lse.data_ptr<float>();
  rp.bytes_read = bytes.data_ptr<int64_t>();
  rp.num_sms = device_sms();
  at::Tensor ws = workspace(kc::retrieval_attention_workspace_bytes(rp), q);
  check_launch(kc::retrieval_attention(rp, ws.data_ptr(), current_stream()));
  return {out, lse, bytes};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& outs, const at::Tensor& lses) {
  TORCH_CHECK(outs.dim() >= 2, "outs must be [S, ..., D], got shape ", shape_str(outs));
  check_is_cuda(outs, "outs");
  check_same_cuda(lses, "lses", outs, "outs");
  check_dtype(outs, at::kFloat, "outs");
  check_dtype(lses, at::kFloat, "lses");
  TORCH_CHECK(lses.sizes() == outs.sizes().slice(0, outs.dim() - 1), "lses must have shape ",
              c10::str(outs.sizes().slice(0, outs.dim() - 1)), " (outs without D), got ", shape_str(lses));
  const c10::cuda::CUDAGuard guard(outs.device());
  at::Tensor out = at::empty(outs.sizes().slice(1), outs.options());
  at::Tensor lse = at::empty(lses.sizes().slice(1), lses.options());
  const int64_t rows = lse.numel();
  if (rows == 0) return {out, lse};
  const at::Tensor o = outs.contiguous(), l = lses.contiguous();
  kc::MergeStatesParams mp;
  mp.outs = o.data_ptr<float>();
  mp.lses = l.data_ptr<float>();
  mp.num_states = outs.size(0);
  mp.rows = rows;
  mp.head_dim = outs.size(-1);
  mp.out = out.data_ptr<float>();
  mp.lse = lse.data_ptr<float>();
  check_launch(kc::merge_attention_states(mp, nullptr, current_stream()));
  return {out, lse};
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// A contiguous copy whose data is 16-byte aligned (the kernels move rows with 16-byte vector accesses).
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

void check_window_pair_cuda(const at::Tensor& k_win, const at::Tensor& v_win) {
  check_dim(k_win, 4, "k_win", "[B, Hkv, W, D]");
  check_kv_dtype(k_win, "k_win");
  check_head_dim(k_win.size(3), "k_win");
  check_is_cuda(k_win, "k_win");
  check_same_cuda(v_win, "v_win", k_win, "k_win");
  TORCH_CHECK(v_win.sizes() == k_win.sizes() && v_win.scalar_type() == k_win.scalar_type(),
              "v_win must match k_win (", shape_str(k_win), ", ", k_win.scalar_type(), "), got ", shape_str(v_win), ", ",
              v_win.scalar_type());
  TORCH_CHECK(k_win.is_contiguous() && v_win.is_contiguous(), "k_win and v_win must be contiguous");
  TORCH_CHECK(aligned16(k_win) && aligned16(v_win), "k_win and v_win must be 16-byte aligned");
}

void window_append_cuda(at::Tensor& k_win, at::Tensor& v_win, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& positions, int64_t sink) {
  check_window_pair_cuda(k_win, v_win);
  const int64_t B = k_win.size(0), hkv = k_win.size(1), W = k_win.size(2), D = k_win.size(3);
  TORCH_CHECK(sink >= 0 && sink <= W, "sink must be in [0, W = ", W, "], got ", sink);
  check_dim(k, 4, "k", "[B, Hkv, T, D]");
  TORCH_CHECK(k.size(0) == B && k.size(1) == hkv && k.size(3) == D, "k must be [", B, ", ", hkv, ", T, ", D, "], got ",
              shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  TORCH_CHECK(k.scalar_type() == k_win.scalar_type() && v.scalar_type() == k_win.scalar_type(),
              "k and v must have the window's dtype ", k_win.scalar_type(), ", got ", k.scalar_type(), " and ",
              v.scalar_type());
  check_dtype(positions, at::kInt, "positions");
  TORCH_CHECK(positions.sizes() == at::IntArrayRef({B, k.size(2)}), "positions must be [B, T] = [", B, ", ", k.size(2),
              "], got ", shape_str(positions));
  check_same_cuda(k, "k", k_win, "k_win");
  check_same_cuda(v, "v", k_win, "k_win");
  check_same_cuda(positions, "positions", k_win, "k_win");
  const c10::cuda::CUDAGuard guard(k_win.device());
  const at::Tensor kc_ = contiguous_aligned(k), vc = contiguous_aligned(v), pc = positions.contiguous();
  kc::WindowAppendParams ap;
  ap.k_win = k_win.data_ptr();
  ap.v_win = v_win.data_ptr();
  ap.k = kc_.data_ptr();
  ap.v = vc.data_ptr();
  ap.positions = pc.data_ptr<int32_t>();
  ap.batch = int32_t(B);
  ap.num_kv_heads = int32_t(hkv);
  ap.head_dim = int32_t(D);
  ap.elem_bytes = int32_t(k_win.element_size());
  ap.window = W;
  ap.num_tokens = k.size(2);
  ap.sink = sink;
  at::Tensor ws = workspace(kc::window_append_workspace_bytes(ap), k_win);
  check_launch(kc::window_append(ap, ws.data_ptr(), current_stream()));
}

std::tuple<at::Tensor, at::Tensor> window_attention_cuda(const at::Tensor& q, const at::Tensor& k_win,
                                                         const at::Tensor& v_win, const at::Tensor& seq_lens,
                                                         int64_t sink, double scale) {
  check_is_cuda(q, "q");
  check_window_pair_cuda(k_win, v_win);
  check_dim(q, 3, "q", "[B, Hq, D]");
  TORCH_CHECK(q.scalar_type() == k_win.scalar_type(), "q must have the window's dtype ", k_win.scalar_type(), ", got ",
              q.scalar_type());
  check_same_cuda(k_win, "k_win", q, "q");
  const int64_t B = k_win.size(0), hkv = k_win.size(1), W = k_win.size(2), D = k_win.size(3);
  TORCH_CHECK(hkv > 0, "k_win must have at least one KV head, got shape ", shape_str(k_win));
  TORCH_CHECK(q.size(0) == B && q.size(2) == D && q.size(1) % hkv == 0, "q must be [", B, ", a multiple of ", hkv,
              ", ", D, "], got ", shape_str(q));
  TORCH_CHECK(sink >= 0 && sink <= W, "sink must be in [0, W = ", W, "], got ", sink);
  check_dim(seq_lens, 1, "seq_lens", "[B] int32");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  TORCH_CHECK(seq_lens.size(0) == B, "seq_lens must have B = ", B, " entries, got ", seq_lens.size(0));
  check_same_cuda(seq_lens, "seq_lens", q, "q");
  const int64_t Hq = q.size(1), G = hkv > 0 ? Hq / hkv : 0;
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head are supported, got ", G);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, Hq}, q.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0) return {out, lse};
  TORCH_CHECK(B * hkv * ((G + 7) / 8) <= 65535, "window_attention: B * Hkv * ceil(G / 8) must be <= 65535, got ",
              B * hkv * ((G + 7) / 8));
  const at::Tensor qc = q.contiguous();
  kc::WindowAttentionParams wp;
  wp.q = qc.data_ptr();
  wp.k_win = k_win.data_ptr();
  wp.v_win = v_win.data_ptr();
  wp.seq_lens = seq_lens.data_ptr<int32_t>();
  wp.dtype = to_core_dtype(q.scalar_type());
  wp.batch = int32_t(B);
  wp.num_q_heads = int32_t(Hq);
  wp.num_kv_heads = int32_t(hkv);
  wp.head_dim = int32_t(D);
  wp.window = W;
  wp.sink = sink;
  wp.scale = float(scale);
  wp.num_sms = device_sms();
  wp.out = out.data_ptr<float>();
  wp.lse = lse.data_ptr<float>();
  check_launch(kc::window_attention(wp, nullptr, current_stream()));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fluxion, CUDA, m) {
  m.impl("score_blocks", &score_blocks_cuda);
  m.impl("topk_blocks", &topk_blocks_cuda);
  m.impl("sparse_attention", &sparse_attention_cuda);
  m.impl("retrieval_attention", &retrieval_attention_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
  m.impl("window_append", &window_append_cuda);
  m.impl("window_attention", &window_attention_cuda);
}

}  // namespace fluxion::ops
