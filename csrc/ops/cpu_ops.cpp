// CPU implementations of the fluxion ops: argument checks and glue around csrc/core/cpu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "core/cpu/retrieval.h"
#include "core/merge.h"
#include "ops/checks.h"
#include "ops/cpu_executor.h"

namespace fluxion::ops {
namespace {

using core::LayerView;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Builds the kernels' view of the store and checks every sequence's frames on the host (cheap: B x frames).
LayerView cpu_layer_view(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table,
                         const at::Tensor& seq_lens, int64_t page_tokens) {
  const core::PageLayout layout = check_paged_args(q, pages, frame_table, seq_lens, page_tokens);
  for (const auto* t : {&q, &pages, &frame_table, &seq_lens})
    TORCH_CHECK(t->device().is_cpu(), "all arguments must be CPU tensors for the CPU kernel; got a tensor on ", t->device());
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* ft = frame_table.data_ptr<int32_t>();
  const int64_t F = pages.size(0), maxf = frame_table.size(1);
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 0 && (int64_t(lens[b]) + page_tokens - 1) / page_tokens <= maxf, "seq_lens[", b, "] = ",
                lens[b], " needs more frames than frame_table holds (", maxf, ")");
    for (int64_t f = 0; f < (int64_t(lens[b]) + page_tokens - 1) / page_tokens; ++f)
      TORCH_CHECK(ft[b * maxf + f] >= 0 && ft[b * maxf + f] < F, "frame_table[", b, ", ", f, "] = ", ft[b * maxf + f],
                  " is outside pages (", F, " frames)");
  }
  LayerView view;
  view.pages = pages.data_ptr();
  view.layout = layout;
  view.dtype = to_core_dtype(pages.scalar_type());
  view.frame_table = ft;
  view.frame_stride = maxf;
  view.seq_lens = lens;
  return view;
}

at::Tensor score_blocks_cpu(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table,
                            const at::Tensor& seq_lens, int64_t page_tokens, int64_t block_size, int64_t sink,
                            int64_t local) {
  check_block_size(block_size);
  check_window_args(sink, local);
  const LayerView view = cpu_layer_view(q, pages, frame_table, seq_lens, page_tokens);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), hkv = pages.size(1), G = Hq / hkv;
  const int64_t nb = frame_table.size(1) * page_tokens / block_size;
  at::Tensor scores = at::full({B, Hq, nb}, kNegInf, q.options().dtype(at::kFloat));
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  // Work items are chunks of a group's candidate blocks, so that a few groups still keep every thread busy
  // (512 is a multiple of a page's blocks up to 512 per page: a page's table is then never split between two
  // items); each group's query is prepared once.
  constexpr int64_t kChunk = 512;
  std::vector<core::cpu::QueryScratch> scratch(size_t(B * hkv));
  std::vector<core::cpu::PreparedQuery> queries(size_t(B * hkv));
  std::vector<core::RetrievalRange> ranges(size_t(B * hkv));
  std::vector<std::pair<int64_t, int64_t>> items;  // (group, first block)
  for (int64_t g = 0; g < B * hkv; ++g) {
    const int64_t b = g / hkv, kvh = g % hkv;
    ranges[size_t(g)] = core::retrieval_range(view.seq_lens[b], sink, local, block_size);
    queries[size_t(g)] = scratch[size_t(g)].prepare(qf.data_ptr<float>() + (b * Hq + kvh * G) * D, int(G), int(D), 1.f);
    for (int64_t j = ranges[size_t(g)].block_begin; j < ranges[size_t(g)].block_end; j = j / kChunk * kChunk + kChunk)
      items.emplace_back(g, j);
  }
  const int readers = int(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(int64_t(items.size()), 1)));
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [g, j] = items[size_t(i)];
      const int64_t b = g / hkv, kvh = g % hkv;
      const auto& r = ranges[size_t(g)];
      core::cpu::score_blocks(view, int(b), int(kvh), int(G), int(block_size), queries[size_t(g)], j,
                              std::min(j / kChunk * kChunk + kChunk, r.block_end),
                              scores.data_ptr<float>() + (b * Hq + kvh * G) * nb + j, nb, r.block_end, readers);
    }
  });
  return scores;
}

at::Tensor topk_blocks_cpu(const at::Tensor& scores, const at::Tensor& k, int64_t max_k) {
  TORCH_CHECK(scores.dim() >= 1, "scores must be [..., NB], got a scalar");
  check_dtype(scores, at::kFloat, "scores");
  check_dtype(k, at::kInt, "k");
  TORCH_CHECK(max_k >= 0, "max_k must be >= 0, got ", max_k);
  TORCH_CHECK(k.sizes() == scores.sizes().slice(0, scores.dim() - 1), "k must have shape ",
              c10::str(scores.sizes().slice(0, scores.dim() - 1)), " (scores without its last dim), got ", shape_str(k));
  TORCH_CHECK(scores.device().is_cpu() && k.device().is_cpu(), "scores and k must be CPU tensors for the CPU kernel");
  const int64_t nb = scores.size(-1);
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), "scores has too many blocks: ", nb);
  auto out_shape = k.sizes().vec();
  out_shape.push_back(max_k);
  at::Tensor out = at::full(out_shape, -1, scores.options().dtype(at::kInt));
  const at::Tensor s = scores.contiguous().view({-1, nb});
  const at::Tensor kk = k.contiguous().view({-1});
  const int64_t rows = s.size(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> tmp;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t want = std::min<int64_t>(std::max<int32_t>(kk.data_ptr<int32_t>()[r], 0), max_k);
      core::cpu::select_topk(s.data_ptr<float>() + r * nb, nb, want, out.data_ptr<int32_t>() + r * max_k, tmp);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q, const at::Tensor& pages,
                                                        const at::Tensor& frame_table, const at::Tensor& seq_lens,
                                                        const at::Tensor& block_idx, int64_t page_tokens,
                                                        int64_t block_size, int64_t sink, int64_t local, double scale) {
  check_block_size(block_size);
  check_window_args(sink, local);
  const LayerView view = cpu_layer_view(q, pages, frame_table, seq_lens, page_tokens);
  check_dim(block_idx, 3, "block_idx", "[B, Hq, K] int32");
  check_dtype(block_idx, at::kInt, "block_idx");
  TORCH_CHECK(block_idx.device().is_cpu(), "block_idx must be a CPU tensor for the CPU kernel");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), hkv = pages.size(1), G = Hq / hkv;
  TORCH_CHECK(block_idx.size(0) == B && block_idx.size(1) == Hq, "block_idx must be [B, Hq, K] = [", B, ", ", Hq,
              ", K], got ", shape_str(block_idx));
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head are supported, got ", G);
  const int64_t K = block_idx.size(2);
  const int64_t nb = frame_table.size(1) * page_tokens / block_size;
  const at::Tensor idx = block_idx.contiguous();
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(ip[i] >= -1 && ip[i] < nb, "block_idx holds ", ip[i], ", outside [-1, ", nb, ")");
  at::Tensor out = at::zeros({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::full({B, Hq}, kNegInf, q.options().dtype(at::kFloat));
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    core::cpu::QueryScratch qscratch;
    std::vector<float> state(G * D + 2 * G);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g / hkv, kvh = g % hkv;
      const auto r = core::retrieval_range(view.seq_lens[b], sink, local, block_size);
      // Union of the group's per-head selections, one head mask per block, ascending block order.
      std::vector<uint64_t> mark(size_t(nb), 0);
      for (int64_t h = 0; h < G; ++h)
        for (int64_t i = 0; i < K; ++i) {
          const int32_t j = ip[((b * Hq) + kvh * G + h) * K + i];
          if (j >= r.block_begin && j < r.block_end) mark[size_t(j)] |= uint64_t(1) << h;
        }
      std::vector<int32_t> blocks;
      std::vector<uint64_t> masks;
      for (int64_t j = r.block_begin; j < r.block_end; ++j)
        if (mark[size_t(j)]) {
          blocks.push_back(int32_t(j));
          masks.push_back(mark[size_t(j)]);
        }
      const auto pq = qscratch.prepare(qf.data_ptr<float>() + (b * Hq + kvh * G) * D, int(G), int(D), float(scale));
      core::cpu::OnlineSoftmax st{state.data(), state.data() + G, state.data() + 2 * G};
      core::cpu::init_state(st, int(G), int(D));
      core::cpu::attend_blocks(view, int(b), int(kvh), int(G), int(block_size), pq, blocks.data(), masks.data(),
                               int64_t(blocks.size()), r.token_begin, r.token_end, st);
      core::cpu::finalize_state(st, int(G), int(D), out.data_ptr<float>() + (b * Hq + kvh * G) * D,
                                lse.data_ptr<float>() + b * Hq + kvh * G);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> retrieval_attention_cpu(
    const at::Tensor& q, const at::Tensor& pages, const at::Tensor& frame_table, const at::Tensor& seq_lens,
    const at::Tensor& budgets, const at::Tensor& block_sizes, const at::Tensor& groups, int64_t page_tokens, int64_t sink,
    int64_t local, double scale) {
  check_window_args(sink, local);
  const LayerView view = cpu_layer_view(q, pages, frame_table, seq_lens, page_tokens);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), hkv = pages.size(1), G = Hq / hkv;
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head are supported, got ", G);
  check_dtype(budgets, at::kFloat, "budgets");
  TORCH_CHECK(budgets.sizes() == at::IntArrayRef({B, Hq}), "budgets must be [B, Hq] = [", B, ", ", Hq, "], got ",
              shape_str(budgets));
  check_dtype(block_sizes, at::kInt, "block_sizes");
  TORCH_CHECK(block_sizes.sizes() == at::IntArrayRef({B, hkv}), "block_sizes must be [B, Hkv] = [", B, ", ", hkv,
              "], got ", shape_str(block_sizes));
  check_dim(groups, 1, "groups", "[T] int32");
  check_dtype(groups, at::kInt, "groups");
  for (const auto* t : {&budgets, &block_sizes, &groups})
    TORCH_CHECK(t->device().is_cpu(), "budgets, block_sizes and groups must be CPU tensors for the CPU kernel");
  const at::Tensor bud = budgets.contiguous(), bsz = block_sizes.contiguous(), grp = groups.contiguous();
  const float* bp = bud.data_ptr<float>();
  for (int64_t i = 0; i < bud.numel(); ++i)
    TORCH_CHECK(bp[i] >= 0.f && bp[i] <= 1.f, "budgets must be in [0, 1], got ", bp[i], " at flat index ", i);
  const int32_t* sp = bsz.data_ptr<int32_t>();
  for (int64_t i = 0; i < bsz.numel(); ++i) check_block_size(sp[i]);
  const int32_t* gp = grp.data_ptr<int32_t>();
  std::vector<char> seen(size_t(B * hkv), 0);
  for (int64_t i = 0; i < grp.numel(); ++i) {
    TORCH_CHECK(gp[i] >= 0 && gp[i] < B * hkv, "groups holds ", gp[i], ", outside [0, B*Hkv = ", B * hkv, ")");
    TORCH_CHECK(!seen[size_t(gp[i])], "groups lists group ", gp[i], " twice");
    seen[size_t(gp[i])] = 1;
  }

  at::Tensor out = at::zeros({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::full({B, Hq}, kNegInf, q.options().dtype(at::kFloat));
  at::Tensor bytes = at::zeros({B, hkv}, q.options().dtype(at::kLong));
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  std::vector<core::cpu::GroupTask> tasks(size_t(grp.numel()));
  for (int64_t i = 0; i < grp.numel(); ++i) {
    const int64_t b = gp[i] / hkv, kvh = gp[i] % hkv;
    core::cpu::GroupTask& t = tasks[size_t(i)];
    t.b = int(b);
    t.kv_head = int(kvh);
    t.block_size = sp[b * hkv + kvh];
    t.q = qf.data_ptr<float>() + (b * Hq + kvh * G) * D;
    t.budgets = bp + b * Hq + kvh * G;
    t.out = out.data_ptr<float>() + (b * Hq + kvh * G) * D;
    t.lse = lse.data_ptr<float>() + b * Hq + kvh * G;
    t.bytes_read = bytes.data_ptr<int64_t>() + b * hkv + kvh;
  }
  core::cpu::RetrievalConfig cfg{int(sink), int(local), float(scale)};
  core::cpu::run_group_tasks(view, int(G), cfg, tasks.data(), int64_t(tasks.size()), aten_executor());
  return {out, lse, bytes};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& outs, const at::Tensor& lses) {
  TORCH_CHECK(outs.dim() >= 2, "outs must be [S, ..., D], got shape ", shape_str(outs));
  check_dtype(outs, at::kFloat, "outs");
  check_dtype(lses, at::kFloat, "lses");
  TORCH_CHECK(lses.sizes() == outs.sizes().slice(0, outs.dim() - 1), "lses must have shape ",
              c10::str(outs.sizes().slice(0, outs.dim() - 1)), " (outs without D), got ", shape_str(lses));
  TORCH_CHECK(outs.device().is_cpu() && lses.device().is_cpu(), "outs and lses must be CPU tensors for the CPU kernel");
  const int64_t S = outs.size(0), D = outs.size(-1);
  const int64_t rows = S == 0 ? 0 : lses.numel() / S;
  at::Tensor out = at::empty(outs.sizes().slice(1), outs.options());
  at::Tensor lse = at::empty(lses.sizes().slice(1), lses.options());
  const at::Tensor o = outs.contiguous(), l = lses.contiguous();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      core::merge_states_one(o.data_ptr<float>() + r * D, l.data_ptr<float>() + r, int(S), rows * D, rows, int(D),
                             out.data_ptr<float>() + r * D, lse.data_ptr<float>() + r);
  });
  return {out, lse};
}

void check_window_pair(const at::Tensor& k_win, const at::Tensor& v_win) {
  check_dim(k_win, 4, "k_win", "[B, Hkv, W, D]");
  check_kv_dtype(k_win, "k_win");
  check_head_dim(k_win.size(3), "k_win");
  TORCH_CHECK(v_win.sizes() == k_win.sizes() && v_win.scalar_type() == k_win.scalar_type(),
              "v_win must match k_win (", shape_str(k_win), ", ", k_win.scalar_type(), "), got ", shape_str(v_win), ", ",
              v_win.scalar_type());
  TORCH_CHECK(k_win.is_contiguous() && v_win.is_contiguous(), "k_win and v_win must be contiguous");
}

void window_append_cpu(at::Tensor& k_win, at::Tensor& v_win, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& positions, int64_t sink) {
  check_window_pair(k_win, v_win);
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
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k_win, &v_win, &k, &v, &positions})
    TORCH_CHECK(t->device().is_cpu(), "all arguments must be CPU tensors for the CPU kernel; got one on ", t->device());
  const int64_t T = k.size(2), local = W - sink;
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), pc = positions.contiguous();
  const int32_t* pos = pc.data_ptr<int32_t>();
  for (int64_t i = 0; i < pc.numel(); ++i) TORCH_CHECK(pos[i] >= -1, "positions must be >= -1, got ", pos[i]);
  auto* kw = static_cast<uint16_t*>(k_win.data_ptr());
  auto* vw = static_cast<uint16_t*>(v_win.data_ptr());
  const auto* ks = static_cast<const uint16_t*>(kc.data_ptr());
  const auto* vs = static_cast<const uint16_t*>(vc.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos[b * T + t];
      if (p < 0) continue;
      if (p >= sink && local == 0) continue;
      const int64_t slot = p < sink ? p : sink + (p - sink) % local;
      for (int64_t h = 0; h < hkv; ++h) {
        std::memcpy(kw + ((b * hkv + h) * W + slot) * D, ks + ((b * hkv + h) * T + t) * D, size_t(D) * 2);
        std::memcpy(vw + ((b * hkv + h) * W + slot) * D, vs + ((b * hkv + h) * T + t) * D, size_t(D) * 2);
      }
    }
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& q, const at::Tensor& k_win,
                                                        const at::Tensor& v_win, const at::Tensor& seq_lens,
                                                        int64_t sink, double scale) {
  check_window_pair(k_win, v_win);
  check_dim(q, 3, "q", "[B, Hq, D]");
  TORCH_CHECK(q.scalar_type() == k_win.scalar_type(), "q must have the window's dtype ", k_win.scalar_type(), ", got ",
              q.scalar_type());
  const int64_t B = k_win.size(0), hkv = k_win.size(1), W = k_win.size(2), D = k_win.size(3);
  TORCH_CHECK(q.size(0) == B && q.size(2) == D && q.size(1) % hkv == 0, "q must be [", B, ", a multiple of ", hkv,
              ", ", D, "], got ", shape_str(q));
  TORCH_CHECK(sink >= 0 && sink <= W, "sink must be in [0, W = ", W, "], got ", sink);
  check_dim(seq_lens, 1, "seq_lens", "[B] int32");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  TORCH_CHECK(seq_lens.size(0) == B, "seq_lens must have B = ", B, " entries, got ", seq_lens.size(0));
  for (const auto* t : {&q, &k_win, &v_win, &seq_lens})
    TORCH_CHECK(t->device().is_cpu(), "all arguments must be CPU tensors for the CPU kernel; got one on ", t->device());
  const int64_t Hq = q.size(1), G = Hq / hkv, local = W - sink;
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head are supported, got ", G);
  at::Tensor out = at::zeros({B, Hq, D}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::full({B, Hq}, kNegInf, q.options().dtype(at::kFloat));
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const core::cpu::KernelTable& kt = core::cpu::kernels();
  const core::DType dt = to_core_dtype(k_win.scalar_type());
  at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
    core::cpu::QueryScratch qscratch;
    std::vector<float> state(G * D + 2 * G);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g / hkv, kvh = g % hkv, n = std::max<int32_t>(lens[b], 0);
      const auto pq = qscratch.prepare(qf.data_ptr<float>() + (b * Hq + kvh * G) * D, int(G), int(D), float(scale));
      core::cpu::OnlineSoftmax st{state.data(), state.data() + G, state.data() + 2 * G};
      core::cpu::init_state(st, int(G), int(D));
      const auto* kb = static_cast<const uint16_t*>(k_win.data_ptr()) + (b * hkv + kvh) * W * D;
      const auto* vb = static_cast<const uint16_t*>(v_win.data_ptr()) + (b * hkv + kvh) * W * D;
      const uint64_t all = G == 64 ? ~uint64_t(0) : (uint64_t(1) << G) - 1;
      const int64_t n_sink = std::min(n, sink);
      const int64_t n_ring = std::min(std::max<int64_t>(n - sink, 0), local);
      const int64_t rows16 = core::PageLayout::kUnitTokens * D;  // contiguous [W, D] rows
      const core::cpu::RowRun runs[2] = {{kb, vb, 0, n_sink, all}, {kb + sink * D, vb + sink * D, 0, n_ring, all}};
      kt.attend_runs(runs, 2, 2, 0, rows16, pq, int(G), int(D), dt, st);
      core::cpu::finalize_state(st, int(G), int(D), out.data_ptr<float>() + (b * Hq + kvh * G) * D,
                                lse.data_ptr<float>() + b * Hq + kvh * G);
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fluxion, CPU, m) {
  m.impl("score_blocks", &score_blocks_cpu);
  m.impl("topk_blocks", &topk_blocks_cpu);
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("retrieval_attention", &retrieval_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
  m.impl("window_append", &window_append_cpu);
  m.impl("window_attention", &window_attention_cpu);
}

}  // namespace fluxion::ops
