#include "ops/hybrid_runtime.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <thread>

#include "core/cpu/retrieval.h"
#include "core/half_convert.h"
#include "core/scheduler.h"
#include "ops/checks.h"
#include "ops/cpu_executor.h"

#ifdef FLUXION_WITH_CUDA
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/cuda/merge.cuh"
#endif

namespace fluxion::ops {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The registered ops, called through the dispatcher so the CPU and CUDA kernels (and their checks) are
// the same ones users call.
using WindowAppendFn = void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using WindowAttentionFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, int64_t, double);
using RetrievalFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, int64_t, int64_t, double);
using MergeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&);

template <class Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

constexpr int64_t kCpuBytesPerThread = 256 << 10;

// The first n elements of a buffer kept across calls (page-locked when pinned), reallocated when too small.
at::Tensor reuse_buffer(at::Tensor& buf, int64_t n, at::ScalarType dtype, bool pinned) {
  if (!buf.defined() || buf.numel() < n || buf.scalar_type() != dtype)
    buf = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(dtype).pinned_memory(pinned));
  return buf.narrow(0, 0, n);
}

#ifdef FLUXION_WITH_CUDA
// The decode step's small copies go straight to cudaMemcpyAsync: a copy_ through the dispatcher costs tens of
// microseconds of host time, and the step makes several per layer.
// src (on the device) into page-locked host memory at dst, enqueued on `stream`; anything but a contiguous copy in
// the same dtype goes through copy_.
void copy_to_host_async(void* dst, const at::Tensor& src, at::ScalarType dtype, cudaStream_t stream) {
  if (src.is_cuda() && src.scalar_type() == dtype && src.is_contiguous()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src.data_ptr(), size_t(src.nbytes()), cudaMemcpyDeviceToHost, stream));
  } else {
    at::from_blob(dst, src.sizes(), at::TensorOptions().dtype(dtype)).copy_(src, /*non_blocking=*/true);
  }
}

// Tells torch's caching host allocator that work enqueued on `stream` reads `host` (page-locked, from that
// allocator), so its block is not handed out again before the work has run: what copy_ does for its copies.
void record_host_use(const at::Tensor& host, const c10::cuda::CUDAStream& stream) {
  at::getHostAllocator(at::kCUDA)->record_event(host.data_ptr(), host.storage().data_ptr().get_context(),
                                                stream.unwrap());
}

// A copy on `device` of src (page-locked, from torch's caching host allocator), enqueued on the current stream.
at::Tensor upload_pinned(const at::Tensor& src, at::Device device) {
  at::Tensor dst = at::empty(src.sizes(), at::TensorOptions().dtype(src.scalar_type()).device(device));
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  C10_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), size_t(src.nbytes()), cudaMemcpyHostToDevice,
                                 stream.stream()));
  record_host_use(src, stream);
  return dst;
}

// An event (on the current device), destroyed with its last reference (a deferred store write may hold it).
std::shared_ptr<CUevent_st> new_shared_event() {
  cudaEvent_t ev;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  return std::shared_ptr<CUevent_st>(ev, [](cudaEvent_t e) { cudaEventDestroy(e); });
}

// A new event recorded on `stream` now.
std::shared_ptr<CUevent_st> record_shared_event(cudaStream_t stream) {
  auto event = new_shared_event();
  C10_CUDA_CHECK(cudaEventRecord(event.get(), stream));
  return event;
}

// Records `event`, kept across steps and created (on `device`) by its first use, on `stream` now.
void record_kept_event(std::shared_ptr<CUevent_st>& event, at::Device device, cudaStream_t stream) {
  if (!event) {
    const c10::cuda::CUDAGuard guard(device);
    event = new_shared_event();
  }
  C10_CUDA_CHECK(cudaEventRecord(event.get(), stream));
}
#endif

// Writes a layer's pending store writes when it goes out of scope (a no-op once they are written): a shared step
// that fails between reserving its token and writing it must not leave a write whose staging buffer the next step
// reuses.
struct FlushOnExit {
  const StoreHolder& store;
  int64_t layer;
  FlushOnExit(const StoreHolder& s, int64_t l) : store(s), layer(l) {}
  FlushOnExit(const FlushOnExit&) = delete;
  FlushOnExit& operator=(const FlushOnExit&) = delete;
  ~FlushOnExit() {
    try {
      store.flush_pending(layer);
    } catch (...) {  // a destructor must not throw; the step's own error is the one reported
    }
  }
};

// The per-head tables of a step, checked: budgets float32 in [0, 1], block sizes int32 in {16, 32, 64, 128},
// both on the CPU with the given shapes. Returns contiguous tensors.
std::pair<at::Tensor, at::Tensor> checked_plan_tables(const at::Tensor& budgets, const at::Tensor& block_sizes,
                                                      at::IntArrayRef budget_shape, at::IntArrayRef size_shape,
                                                      const char* budget_dims, const char* size_dims) {
  check_dtype(budgets, at::kFloat, "budgets");
  TORCH_CHECK(budgets.device().is_cpu() && budgets.sizes() == budget_shape, "budgets must be a CPU ", budget_dims,
              " = ", budget_shape, " tensor, got ", shape_str(budgets), " on ", budgets.device());
  check_dtype(block_sizes, at::kInt, "block_sizes");
  TORCH_CHECK(block_sizes.device().is_cpu() && block_sizes.sizes() == size_shape, "block_sizes must be a CPU ",
              size_dims, " = ", size_shape, " tensor, got ", shape_str(block_sizes), " on ", block_sizes.device());
  at::Tensor bud = budgets.contiguous(), bsz = block_sizes.contiguous();
  for (int64_t i = 0; i < bud.numel(); ++i) {
    const float x = bud.data_ptr<float>()[i];
    TORCH_CHECK(x >= 0.f && x <= 1.f, "budgets must be in [0, 1], got ", x);
  }
  for (int64_t i = 0; i < bsz.numel(); ++i) check_block_size(bsz.data_ptr<int32_t>()[i]);
  return {bud, bsz};
}


// The rows a shared step's retrieval runs over. Without a split, the batch's rows. With the dense groups split
// into `parts` token ranges: the batch's rows first (they keep the groups that are not split), then part p of row
// b at row (1 + p) * B + b. A part row is row b seen from page origin o: its frame table is row b's from frame
// o / page_tokens on, and its length is chosen so that its retrieval region [sink, n - local) is the part's
// tokens. Each part is a task of its own (the queue balances finer), and parts merge by LSE like any other.
struct RetrievalRows {
  int64_t B = 0, parts = 0;
  std::vector<int32_t> lens;          // per row: the length its retrieval sees (after this step's token)
  std::vector<int64_t> frame_offset;  // per row: its first frame in row (r % B)'s frame table
  std::vector<float> budgets;         // [rows, Hq]
  std::vector<int32_t> block_sizes;   // [rows, Hkv]
  int64_t rows() const { return B * (1 + parts); }
  int64_t base(int64_t row) const { return row % B; }
  // Bit k set: some of `groups` (row * Hkv + kv_head) lie in row block k, rows [k * B, (k + 1) * B).
  uint64_t blocks_of(const int32_t* groups, int64_t n, int64_t Hkv) const {
    uint64_t m = 0;
    for (int64_t i = 0; i < n; ++i) m |= uint64_t(1) << (groups[i] / Hkv / B);
    return m;
  }
};

// A group is dense when each of its heads takes every candidate or none (budget 1 or 0) and one takes them all.
bool dense_group(const float* head_budgets, int64_t G) {
  bool any = false;
  for (int64_t h = 0; h < G; ++h) {
    if (head_budgets[h] > 0.f && head_budgets[h] < 1.f) return false;
    any = any || head_budgets[h] >= 1.f;
  }
  return any;
}

// The rows of a step over sequences of lens_before[b] + 1 tokens with the given tables, dense groups split into
// `parts` page-aligned token ranges (parts <= 1: no split). A row too short for every part leaves the last ones
// empty (no candidates, so no task).
RetrievalRows retrieval_rows(const std::vector<int32_t>& lens_before, const float* budgets, const int32_t* block_sizes,
                             int64_t Hq, int64_t Hkv, int64_t sink, int64_t local, int64_t page_tokens, int64_t parts) {
  RetrievalRows r;
  r.B = int64_t(lens_before.size());
  r.parts = parts > 1 ? parts : 0;
  const int64_t B = r.B, G = Hq / Hkv, R = r.rows();
  r.lens.assign(size_t(R), 0);
  r.frame_offset.assign(size_t(R), 0);
  r.budgets.assign(size_t(R * Hq), 0.f);
  r.block_sizes.resize(size_t(R * Hkv));
  for (int64_t row = 0; row < R; ++row)
    std::copy(block_sizes + r.base(row) * Hkv, block_sizes + (r.base(row) + 1) * Hkv, r.block_sizes.begin() + row * Hkv);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens_before[size_t(b)] + 1;
    r.lens[size_t(b)] = int32_t(n);
    for (int64_t kv = 0; kv < Hkv; ++kv) {
      const float* gb = budgets + b * Hq + kv * G;
      // The batch row keeps the groups that are not split; the part rows take the dense ones.
      const int64_t first_row = r.parts && dense_group(gb, G) ? B + b : b;
      for (int64_t row = first_row; row < (first_row == b ? b + 1 : R); row += B)
        std::copy(gb, gb + G, r.budgets.begin() + row * Hq + kv * G);
    }
    if (!r.parts) continue;
    // Page-aligned origins o_p of the region [sink, n - local): part p is [o_p + sink, o_{p+1} + sink), the last
    // one ends at n - local.
    const int64_t region = std::max<int64_t>(0, n - local - sink);
    for (int64_t p = 0; p < r.parts; ++p) {
      const int64_t row = (1 + p) * B + b;
      const int64_t o = p * region / r.parts / page_tokens * page_tokens;
      const int64_t o_next = (p + 1) * region / r.parts / page_tokens * page_tokens;
      const int64_t end = p + 1 < r.parts ? std::min(o_next + sink, n - local) : n - local;
      const bool empty = end <= o + sink;  // the region is shorter than `parts` pages
      r.frame_offset[size_t(row)] = o / page_tokens;
      r.lens[size_t(row)] = int32_t(empty ? sink + local : end - o + local);
    }
  }
  return r;
}

// One layer step's plan as int32 words, uploaded to the device in one page-locked copy:
//   [lens before B | lens after B | budgets B*Hq (fp32 bits) | block sizes B*Hkv | task groups (`groups` slots)
//    | frame table B*F]
struct PlanRow {
  int64_t B, Hq, Hkv, groups, F;
  int64_t o_bud() const { return 2 * B; }
  int64_t o_bsz() const { return o_bud() + B * Hq; }
  int64_t o_groups() const { return o_bsz() + B * Hkv; }
  int64_t o_frames() const { return o_groups() + groups; }
  int64_t words() const { return o_frames() + B * F; }
  // Writes everything but the task groups (those slots are zeroed) for the rows `r` (B == r.rows()) of the
  // batch `ids`.
  void fill(int32_t* ph, const RetrievalRows& r, const core::HostKVStore& store, int64_t layer,
            const std::vector<int64_t>& ids) const {
    for (int64_t row = 0; row < B; ++row) {
      ph[row] = r.lens[size_t(row)] - 1;
      ph[B + row] = r.lens[size_t(row)];
    }
    std::memcpy(ph + o_bud(), r.budgets.data(), size_t(B * Hq) * 4);
    std::memcpy(ph + o_bsz(), r.block_sizes.data(), size_t(B * Hkv) * 4);
    std::fill(ph + o_groups(), ph + words(), 0);
    for (int64_t row = 0; row < B; ++row) {
      const auto& fr = store.frames(int(layer), int(ids[size_t(r.base(row))]));
      const int64_t first = std::min<int64_t>(r.frame_offset[size_t(row)], int64_t(fr.size()));
      const int64_t count = std::min<int64_t>(F, int64_t(fr.size()) - first);
      std::copy(fr.begin() + first, fr.begin() + first + count, ph + o_frames() + row * F);
    }
  }
  // Views of an uploaded row: (lens before [B], lens after [B], budgets [B, Hq] float32, block sizes [B, Hkv],
  // frame table [B, F]); groups via row.narrow(0, o_groups() + first, count).
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> views(const at::Tensor& row) const {
    return {row.narrow(0, 0, B), row.narrow(0, B, B), row.narrow(0, o_bud(), B * Hq).view(at::kFloat).view({B, Hq}),
            row.narrow(0, o_bsz(), B * Hkv).view({B, Hkv}), row.narrow(0, o_frames(), B * F).view({B, F})};
  }
};
}  // namespace

HybridRuntime::HybridRuntime(c10::intrusive_ptr<StoreHolder> s, int64_t hq, const std::string& dev, int64_t sink_,
                             int64_t local_, int64_t workers)
    : store(std::move(s)), num_q_heads(hq), sink(sink_), local(local_), device(dev) {
  const auto& cfg = store->store->config();
  TORCH_CHECK(hq > 0 && hq % cfg.num_kv_heads == 0, "num_q_heads must be a positive multiple of the store's ",
              cfg.num_kv_heads, " KV heads, got ", hq);
  TORCH_CHECK(hq / cfg.num_kv_heads <= 64, "at most 64 query heads per KV head are supported");
  check_window_args(sink, local);
  TORCH_CHECK(sink + local > 0, "sink + local must be positive");
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "device must be cpu or cuda, got ", dev);
  if (device.is_cuda()) {
    TORCH_CHECK(store->store->pinned(), "a CUDA runtime needs a pinned HostKVStore (pin=True)");
    // "cuda" means the current device; name it, so that device checks against tensors on "cuda:N" compare equal.
#ifdef FLUXION_WITH_CUDA
    if (!device.has_index()) device = at::Device(at::kCUDA, c10::cuda::current_device());
#else
    TORCH_CHECK(false, "this build of fluxion has no CUDA kernels; build with FLUXION_CUDA=1 for device ", dev);
#endif
  }
  TORCH_CHECK(workers >= 0, "cpu_workers must be >= 0 (0 = ATen's thread count), got ", workers);
  cpu_workers = workers;  // 0: ATen's thread count at each step (fluxion.enable leaves a core to the GPU side)
}

void HybridRuntime::set_sequences(const std::vector<int64_t>& ids) {
  finish_shared_step();
  store->check_seqs(ids);
  seq_ids = ids;
  const auto& cfg = store->store->config();
  const int64_t B = int64_t(ids.size());
  const auto opts = at::TensorOptions().dtype(store->scalar_type()).device(device);
  k_win.clear();
  v_win.clear();
  for (int64_t l = 0; l < cfg.num_layers; ++l) {
    k_win.push_back(at::zeros({B, cfg.num_kv_heads, sink + local, cfg.head_dim}, opts));
    v_win.push_back(at::zeros({B, cfg.num_kv_heads, sink + local, cfg.head_dim}, opts));
    // Sequences that already hold tokens (e.g. a prefix) get their window from the store.
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = store->store->seq_len(int(l), int(ids[size_t(b)]));
      if (n == 0) continue;
      auto [kk, vv] = store->gather(l, ids[size_t(b)]);  // [Hkv, N, D]
      at::Tensor pos = at::arange(n, at::kInt).unsqueeze(0);
      at::Tensor kw = k_win.back().narrow(0, b, 1), vw = v_win.back().narrow(0, b, 1);
      op<WindowAppendFn>("fluxion::window_append")
          .call(kw, vw, kk.unsqueeze(0).to(device), vv.unsqueeze(0).to(device), pos.to(device), sink);
    }
  }
}

void HybridRuntime::prefill(int64_t layer, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& valid) {
  store->check_layer(layer);
  TORCH_CHECK(!seq_ids.empty(), "call set_sequences before prefill");
  TORCH_CHECK(k.dim() == 4 && k.size(0) == int64_t(seq_ids.size()), "k must be [B, Hkv, T, D] with B = ",
              seq_ids.size(), ", got ", shape_str(k));
  const int64_t B = k.size(0), T = k.size(2);
  // Window positions: each valid token continues its sequence; padding gets -1.
  at::Tensor lens = store->seq_lens(layer, seq_ids).to(at::kLong);
  at::Tensor mask = valid.has_value() ? valid->to(at::kCPU).to(at::kBool) : at::ones({B, T}, at::kBool);
  at::Tensor pos = (lens.unsqueeze(1) + mask.to(at::kLong).cumsum(1) - 1).masked_fill(~mask, -1).to(at::kInt);
  store->append(layer, seq_ids, k, v, valid);
  op<WindowAppendFn>("fluxion::window_append")
      .call(k_win[size_t(layer)], v_win[size_t(layer)], k.to(device), v.to(device), pos.to(device), sink);
}

at::Tensor HybridRuntime::decode(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& budgets, const at::Tensor& block_sizes, bool use_gpu,
                                 double scale) {
  TORCH_CHECK(!seq_ids.empty(), "call set_sequences before decode");
  store->check_layer(layer);
  at::Tensor kw = k_win[size_t(layer)], vw = v_win[size_t(layer)];
  return step(layer, seq_ids, kw, vw, q, k, v, budgets, block_sizes, use_gpu, scale);
}

at::Tensor HybridRuntime::step(int64_t layer, const std::vector<int64_t>& ids, at::Tensor& k_win_l,
                               at::Tensor& v_win_l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& budgets, const at::Tensor& block_sizes, bool use_gpu, double scale,
                               const c10::optional<at::Tensor>& out) {
  const auto t_step = Clock::now();
  store->check_layer(layer);
  store->check_seqs(ids);
  const auto& cfg = store->store->config();
  const int64_t B = int64_t(ids.size()), Hq = num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim,
                G = Hq / Hkv;
  TORCH_CHECK(B > 0, "ids must not be empty");
  TORCH_CHECK(k_win_l.dim() == 4 && k_win_l.size(0) == B && k_win_l.size(1) == Hkv && k_win_l.size(2) == sink + local &&
                  k_win_l.size(3) == D && k_win_l.device() == device,
              "k_win must be [B, Hkv, sink + local, D] = [", B, ", ", Hkv, ", ", sink + local, ", ", D, "] on ", device,
              ", got ", shape_str(k_win_l), " on ", k_win_l.device());
  TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) == Hq && q.size(2) == D, "q must be [B, Hq, D] = [", B,
              ", ", Hq, ", ", D, "], got ", shape_str(q));
  TORCH_CHECK(q.device() == device, "q must be on the runtime's device ", device, ", got ", q.device());
  TORCH_CHECK(k.dim() == 4 && k.size(2) == 1, "decode takes one new token per sequence: k must be [B, Hkv, 1, D], got ",
              shape_str(k));
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, Hkv, 1, D}), "k must be [B, Hkv, 1, D] = [", B, ", ", Hkv, ", 1, ", D,
              "], got ", shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  TORCH_CHECK(k.device() == device && v.device() == device, "k and v must be on the runtime's device ", device,
              ", got ", k.device(), " and ", v.device());
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kHalf ||
                                                     k.scalar_type() == at::kFloat),
              "k and v must be bfloat16, float16 or float32 tensors of one dtype, got ", k.scalar_type(), " and ",
              v.scalar_type());
  if (out.has_value()) {
    const auto dt = out->scalar_type();
    TORCH_CHECK(out->sizes() == q.sizes() && out->device() == device && out->is_contiguous() &&
                    (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
                "out must be a contiguous float32, bfloat16 or float16 [B, Hq, D] = [", B, ", ", Hq, ", ", D,
                "] tensor on ", device, ", got ", shape_str(*out), " ", dt, " on ", out->device());
  }
  at::Tensor bud, bsz;
  std::tie(bud, bsz) = checked_plan_tables(budgets, block_sizes, {B, Hq}, {B, Hkv}, "[B, Hq]", "[B, Hkv]");
  use_gpu = use_gpu && device.is_cuda();
  const bool on_gpu = device.is_cuda();

  // 1. The plan: retrieval tasks (sequence x KV-head group with a non-zero budget), largest data volume first.
  //    Lengths are known on the host, so planning needs nothing from the device.
  auto t = Clock::now();
  store->flush_pending(layer);  // the previous step's token of this layer (its copy finished long ago)
  std::vector<int32_t> lens_before(size_t(B), 0);
  int64_t max_frames = 1;
  for (int64_t b = 0; b < B; ++b) {
    lens_before[size_t(b)] = int32_t(store->store->seq_len(int(layer), int(ids[size_t(b)])));
    // frames this step may touch, the new token's page included
    max_frames = std::max<int64_t>(max_frames, lens_before[size_t(b)] / store->store->layout().page_tokens + 1);
  }
  std::vector<core::QueueTask> tasks = plan_tasks(lens_before, bud.data_ptr<float>(), bsz.data_ptr<int32_t>());
  int64_t volume = 0;
  for (const auto& task : tasks) volume += task.volume;
  // A small step runs on the GPU alone, without waiting for the device: the host enqueues it and returns,
  // which keeps the GPU's queue full (a CPU share would need q on the host, i.e. a sync whose latency costs
  // more than the CPU saves). Larger steps share the queue between the CPU and the GPU. Without a local window
  // the new token is retrieved at once, so its host copy must land first: no GPU-alone steps then.
  use_gpu = use_gpu && on_gpu;
  const bool gpu_alone = use_gpu && local > 0 && (!cpu_retrieval || volume < min_shared_volume);
  const bool adaptive = adaptive_sharing && use_gpu && !gpu_alone;
  if (adaptive) {
    if (int64_t(sharing_choice.size()) <= layer) sharing_choice.resize(size_t(layer) + 1);
    use_gpu = sharing_choice[size_t(layer)].next();
  }
  // The retrieval's rows: the batch's, plus token-range parts of the dense groups when the queue is short.
  const int64_t page_tokens = store->store->layout().page_tokens;
  const RetrievalRows rows =
      retrieval_rows(lens_before, bud.data_ptr<float>(), bsz.data_ptr<int32_t>(), Hq, Hkv, sink, local, page_tokens,
                     gpu_alone ? 0 : split_parts(tasks, lens_before, bud.data_ptr<float>(), use_gpu && cpu_retrieval));
  const int64_t R = rows.rows();
  if (rows.parts) {
    std::vector<int32_t> rows_before(rows.lens.begin(), rows.lens.end());
    for (auto& n : rows_before) --n;
    tasks = plan_tasks(rows_before, rows.budgets.data(), rows.block_sizes.data());
  }
  core::TaskQueue queue(std::move(tasks));
  plan_s += since(t);
  t = Clock::now();

  // 2. The new token: host store and dense window. On a GPU the step reserves the token's store positions now
  //    and writes them once an async device -> host copy has landed. The GPU-alone step never waits for that copy
  //    (the token is read from the store only after it leaves the local window, `local` steps from now). The
  //    shared step stages q/k/v in one transfer, since its CPU side needs q anyway, and waits for it only after it
  //    has enqueued the plan and the window's kernels: the host does that work while the GPU still runs the
  //    model's layer that produces q, rather than after it.
  const auto host_opts = at::TensorOptions().dtype(store->scalar_type()).pinned_memory(on_gpu);
  const uint16_t* q16 = nullptr;  // the shared step's staged q [B, Hq, D]
#ifdef FLUXION_WITH_CUDA
  std::shared_ptr<CUevent_st> staged_event;  // the shared step's staging copies done (on a GPU)
#endif
  std::optional<FlushOnExit> flush_staged;
  if (gpu_alone) {
#ifdef FLUXION_WITH_CUDA
    const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    at::Tensor kv_h = at::empty({2, B, Hkv, 1, D}, host_opts);
    kv_h[0].copy_(k, /*non_blocking=*/true);
    kv_h[1].copy_(v, /*non_blocking=*/true);
    auto copied = record_shared_event(stream.stream());
    store->append_deferred(layer, ids, kv_h[0], kv_h[1], [copied] { C10_CUDA_CHECK(cudaEventSynchronize(copied.get())); });
#endif
  } else {
    // Staged as raw memory: views and copies through the dispatcher cost ~1-2 us each, and a layer step is
    // ~1.5 ms long.
    const int64_t nq = B * Hq * D, nkv = B * Hkv * D;
    at::Tensor staged = reuse_buffer(shared_staging_, nq + 2 * nkv, store->scalar_type(), on_gpu);
    q16 = static_cast<const uint16_t*>(staged.data_ptr());
    auto* base = static_cast<char*>(staged.data_ptr());
    void *q_dst = base, *k_dst = base + nq * 2, *v_dst = base + (nq + nkv) * 2;  // 2-byte elements
    if (on_gpu) {
#ifdef FLUXION_WITH_CUDA
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
      copy_to_host_async(q_dst, q, store->scalar_type(), stream);
      copy_to_host_async(k_dst, k, store->scalar_type(), stream);
      copy_to_host_async(v_dst, v, store->scalar_type(), stream);
      // One event, recorded again by every shared step (its deferred write is flushed before the step returns).
      record_kept_event(staged_event_, device, stream);
      staged_event = staged_event_;
#endif
    } else {
      const auto opts = at::TensorOptions().dtype(store->scalar_type());
      at::from_blob(q_dst, {B, Hq, D}, opts).copy_(q);
      at::from_blob(k_dst, {B, Hkv, 1, D}, opts).copy_(k);
      at::from_blob(v_dst, {B, Hkv, 1, D}, opts).copy_(v);
    }
    // Written by flush_pending(layer) after the wait for q below, beside or before the retrieval (by flush_staged if
    // the step fails first).
    std::function<void()> ready;
#ifdef FLUXION_WITH_CUDA
    if (staged_event) ready = [ev = staged_event] { C10_CUDA_CHECK(cudaEventSynchronize(ev.get())); };
#endif
    flush_staged.emplace(*store, layer);
    store->append_deferred(layer, ids, staged.narrow(0, nq, nkv).view({B, Hkv, 1, D}),
                           staged.narrow(0, nq + nkv, nkv).view({B, Hkv, 1, D}), std::move(ready));
  }
  append_s += since(t);
  t = Clock::now();

  // The plan goes to the device in one page-locked copy (no per-batch uploads), task groups in queue order. A
  // shared step's buffers alternate between two slots kept across steps; a slot is refilled once its last upload
  // has landed (kernels that read its device copy are ordered before the next upload on the same stream), which
  // the step before has waited for already. A GPU-alone step never waits for the device: its plan gets buffers
  // of its own.
  const int64_t n_tasks = int64_t(queue.size());
  const PlanRow layout{R, Hq, Hkv, n_tasks, max_frames};
  at::Tensor plan, plan_dev;
  PlanSlot* slot = nullptr;
  if (on_gpu && !gpu_alone) {
    slot = &plan_slots_[plan_slot_next_];
    plan_slot_next_ ^= 1;
#ifdef FLUXION_WITH_CUDA
    if (slot->uploaded) C10_CUDA_CHECK(cudaEventSynchronize(slot->uploaded.get()));
#endif
    plan = reuse_buffer(slot->host, layout.words(), at::kInt, true);
  } else {
    plan = at::empty({layout.words()}, at::TensorOptions().dtype(at::kInt).pinned_memory(on_gpu));
  }
  int32_t* ph = plan.data_ptr<int32_t>();
  layout.fill(ph, rows, *store->store, layer, ids);
  for (int64_t i = 0; i < n_tasks; ++i) ph[layout.o_groups() + i] = queue[size_t(i)].group;
#ifdef FLUXION_WITH_CUDA
  if (slot) {
    if (!slot->device.defined() || slot->device.numel() < layout.words())
      slot->device = at::empty({layout.words()}, at::TensorOptions().dtype(at::kInt).device(device));
    plan_dev = slot->device.narrow(0, 0, layout.words());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    C10_CUDA_CHECK(cudaMemcpyAsync(plan_dev.data_ptr(), ph, size_t(layout.words()) * 4, cudaMemcpyHostToDevice, stream));
    record_kept_event(slot->uploaded, device, stream);
  } else if (on_gpu) {
    plan_dev = upload_pinned(plan, device);
  }
#endif
  if (!plan_dev.defined()) plan_dev = plan;
  const at::Tensor lens_host = plan.narrow(0, R, R);
  at::Tensor lens_before_dev, lens_dev, bud_dev, bsz_dev, frames_dev;  // (lambdas below capture them)
  std::tie(lens_before_dev, lens_dev, bud_dev, bsz_dev, frames_dev) = layout.views(plan_dev);
  // The window belongs to the batch's rows, the first B.
  op<WindowAppendFn>("fluxion::window_append")
      .call(k_win_l, v_win_l, k, v, lens_before_dev.narrow(0, 0, B).unsqueeze(1), sink);
  plan_s += since(t);

  // 3. Dense part over the window, enqueued first so the GPU works while the host prepares retrieval.
  t = Clock::now();
  auto [o_dense, lse_dense] =
      op<WindowAttentionFn>("fluxion::window_attention").call(q, k_win_l, v_win_l, lens_dev.narrow(0, 0, B), sink, scale);
  dense_s += since(t);

  t = Clock::now();
  // Retrieval of queue entries [begin, end) on the GPU, reading the page-locked store in place; part rows
  // read their batch row's q.
  const at::Tensor q_rows = rows.parts ? q.repeat({1 + rows.parts, 1, 1}) : q;
  auto retrieve_on_gpu = [&](int64_t begin, int64_t end) {
    return op<RetrievalFn>("fluxion::retrieval_attention")
        .call(q_rows, store->arena_view(), frames_dev, lens_dev, bud_dev, bsz_dev,
              plan_dev.narrow(0, layout.o_groups() + begin, end - begin),
              store->store->layout().page_tokens, sink, local, scale);
  };
  if (gpu_alone) {
    // 4a. Every task in one launch; the bytes it read are summed on the device (no sync).
    std::vector<MergePart> parts{{o_dense, lse_dense}};
    if (n_tasks > 0) {
      auto [o, l, nbytes] = retrieve_on_gpu(0, n_tasks);
      parts.push_back({o, l});
      gpu_bytes_pending = gpu_bytes_pending.defined() ? gpu_bytes_pending + nbytes.sum() : nbytes.sum();
      gpu_tasks += n_tasks;
    }
    ++gpu_alone_steps;
    retrieval_s += since(t);
    return merge_parts(parts, B, out, Clock::now(), t_step);
  }

  // 4b. The shared queue: the CPU side and the GPU control thread each pull the next share when free. The CPU side
  //     first waits for q on the host (the model's own GPU work of this layer, timed apart), which also waits for
  //     everything enqueued before, i.e. for the previous steps' merges that read the CPU part buffer: it is
  //     cleared only after that wait. When the local window holds at least one block of the largest size, the
  //     retrieval reads neither the token's rows nor a metadata row its write changes (the last candidate block
  //     ends `local` tokens before it, at every granularity): the write runs beside the retrieval, and the GPU's
  //     first batch is enqueued before the host's wait (it reads q on the device), so it starts as soon as the
  //     window's kernels are done.
  // The last shared step's GPU batches ended long before this step's q (the model's work between ran behind
  // them): finishing it here, after this step's window launches, costs no wait. Its rates set this step's split, and
  // its waiters are done with the buffers reused below.
  finish_shared_step();
  t = Clock::now();
  const double queue_start_s = core::steady_seconds();
  // On a GPU the control thread has a core of its own and idles while its first batch runs (or, in `fixed` mode,
  // throughout): the write goes there, and run_task_queue returns only after it.
  const bool write_beside = on_gpu && local >= core::kGranularities[core::kNumGranularities - 1];
  std::exception_ptr write_error;
  std::function<void()> write_token;
  if (write_beside) {
    write_token = [this, layer, &write_error] {
      try {
        store->flush_pending(layer);  // waits for the staging copies (the deferred write's `ready`)
      } catch (...) {
        write_error = std::current_exception();
      }
    };
    if (!control) control = std::make_unique<core::ControlThread>();
  }
  // The CPU side's part, one per row (heads it does not run keep lse = -inf): out [R, Hq, D] | lse [R, Hq]. On a
  // GPU the merge reads it in place.
  const at::Tensor part = reuse_buffer(cpu_part_, R * Hq * (D + 1), at::kFloat, on_gpu);
  float* const out_cpu = part.data_ptr<float>();
  float* const lse_cpu = out_cpu + R * Hq * D;
  double wait_s = 0;  // for q, inside the queue's time when the GPU starts first
  // Returns when the host saw q (core::steady_seconds()): the GPU's batches could start from then.
  auto wait_for_q = [&]() -> double {
    const auto w = Clock::now();
#ifdef FLUXION_WITH_CUDA
    if (staged_event) C10_CUDA_CHECK(cudaEventSynchronize(staged_event.get()));
#endif
    const double q_ready = core::steady_seconds();
    wait_s = since(w);
    if (!write_beside) store->flush_pending(layer);
    q_float_.resize(size_t(B * Hq * D));
    // One loop per dtype, so each vectorises.
    if (store->scalar_type() == at::kBFloat16) {
      for (size_t i = 0; i < q_float_.size(); ++i) q_float_[i] = core::bf16_to_float(q16[i]);
    } else {
      for (size_t i = 0; i < q_float_.size(); ++i) q_float_[i] = core::fp16_to_float(q16[i]);
    }
    std::fill_n(out_cpu, R * Hq * D, 0.f);
    std::fill_n(lse_cpu, R * Hq, -std::numeric_limits<float>::infinity());
    return q_ready;
  };
  // The GPU's first batch may go out before the host has q only when the token's write runs beside the retrieval.
  const bool gpu_first = write_beside;
  if (!gpu_first) {
    wait_for_q();
    append_s += since(t);
    t = Clock::now();
  }
  core::LayerView view;
  view.pages = store->store->arena();
  view.layout = store->store->layout();
  view.dtype = to_core_dtype(store->scalar_type());
  view.frame_table = ph + layout.o_frames();
  view.frame_stride = layout.F;
  view.seq_lens = lens_host.data_ptr<int32_t>();
  std::vector<int64_t> bytes_cpu(size_t(R * Hkv), 0);
  uint64_t cpu_row_blocks = 0;  // row blocks (RetrievalRows::blocks_of) the CPU side wrote
  const core::cpu::RetrievalConfig rcfg{int(sink), int(local), float(scale)};
  const int max_threads = cpu_workers > 0 ? int(cpu_workers) : at::get_num_threads();
  core::CpuBatchFn cpu_fn = [&](int64_t begin, int64_t end) {
    // Each parallel phase wakes every thread it uses: a small batch (short contexts) uses a few threads only,
    // one per kCpuBytesPerThread of expected reads.
    int64_t volume = 0;
    for (int64_t i = begin; i < end; ++i) volume += queue[size_t(i)].volume;
    const int threads = int(std::clamp<int64_t>(volume / kCpuBytesPerThread, 1, max_threads));
    const core::cpu::Executor executor{threads, aten_parallel_for()};
    std::vector<core::cpu::GroupTask> batch;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = queue[size_t(i)].group, row = g / Hkv, kvh = g % Hkv, b = rows.base(row);
      core::cpu::GroupTask task;
      task.b = int(row);
      task.kv_head = int(kvh);
      task.block_size = rows.block_sizes[size_t(g)];
      task.q = q_float_.data() + (b * Hq + kvh * G) * D;
      task.budgets = rows.budgets.data() + row * Hq + kvh * G;
      task.out = out_cpu + (row * Hq + kvh * G) * D;
      task.lse = lse_cpu + row * Hq + kvh * G;
      task.bytes_read = bytes_cpu.data() + g;
      batch.push_back(task);
      cpu_row_blocks |= uint64_t(1) << (row / B);
    }
    core::cpu::PhaseTimes phases;
    core::cpu::run_group_tasks(view, int(G), rcfg, batch.data(), int64_t(batch.size()), executor, &phases);
    cpu_select_s += phases.select_s;
    cpu_score_s += phases.score_s;
    cpu_topk_s += phases.topk_s;
    cpu_attend_s += phases.attend_s;
  };
  std::vector<at::Tensor> gpu_out, gpu_lse;
  std::vector<uint64_t> gpu_row_blocks;  // per GPU batch, the row blocks it wrote
  core::GpuBatchFn gpu_fn;
#ifdef FLUXION_WITH_CUDA
  if (use_gpu && queue.size() > 0) {
    if (!control) control = std::make_unique<core::ControlThread>();
    gpu_out.resize(size_t(max_gpu_batches) + 1);
    gpu_lse.resize(size_t(max_gpu_batches) + 1);
    gpu_row_blocks.assign(size_t(max_gpu_batches) + 1, 0);
    // Bytes each batch read ([R, Hkv] per batch), copied back into page-locked slots and summed on the host.
    int64_t* batch_bytes =
        reuse_buffer(gpu_batch_bytes_, (max_gpu_batches + 1) * R * Hkv, at::kLong, true).data_ptr<int64_t>();
    const c10::cuda::CUDAStream main_stream = c10::cuda::getCurrentCUDAStream(device.index());
    gpu_fn = [&, main_stream, batch_bytes](int64_t begin, int64_t end, int batch) -> core::GpuWaitFn {
      c10::cuda::CUDAGuard guard(device);
      // Launch on the step's stream: q and the window append were enqueued there.
      c10::cuda::CUDAStreamGuard stream_guard(main_stream);
      auto [o, l, nbytes] = retrieve_on_gpu(begin, end);
      gpu_out[size_t(batch)] = o;
      gpu_lse[size_t(batch)] = l;
      gpu_row_blocks[size_t(batch)] = rows.blocks_of(ph + layout.o_groups() + begin, end - begin, Hkv);
      int64_t* slot = batch_bytes + int64_t(batch) * R * Hkv;
      TORCH_INTERNAL_ASSERT(nbytes.is_contiguous() && nbytes.numel() == R * Hkv);
      C10_CUDA_CHECK(cudaMemcpyAsync(slot, nbytes.data_ptr<int64_t>(), size_t(R * Hkv) * 8, cudaMemcpyDeviceToHost,
                                     main_stream.stream()));
      cudaEvent_t done;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
      C10_CUDA_CHECK(cudaEventRecord(done, main_stream.stream()));
      // The wait polls the event, yielding between polls: the control thread has a core of its own (the CPU
      // side uses cpu_workers of them), and a sleep would add its timer slack (~50 us) to every batch. It may run
      // after the step returned (see step()), so it refers to no local of the step.
      return [done, slot, n = R * Hkv, total = &shared_end_.gpu_bytes] {
        cudaError_t state;
        while ((state = cudaEventQuery(done)) == cudaErrorNotReady) std::this_thread::yield();
        C10_CUDA_CHECK(cudaEventDestroy(done));
        C10_CUDA_CHECK(state);
        for (int64_t i = 0; i < n; ++i) *total += slot[i];
      };
    };
  }
#endif
  core::QueueSplit split;
  split.max_gpu_batches = int(max_gpu_batches);
  if (cpu_rate > 0 && gpu_rate > 0) split.cpu_share = cpu_rate / (cpu_rate + gpu_rate);
  SharedStepEnd& end = shared_end_;
  core::run_task_queue(queue, (cpu_retrieval || !gpu_fn) ? cpu_fn : core::CpuBatchFn{}, gpu_fn, control.get(), split,
                       &end.qs, write_token, gpu_first ? std::function<double()>(wait_for_q) : std::function<double()>{},
                       &end.tail);
  end.cpu_end_s = core::steady_seconds();
  if (write_error) std::rethrow_exception(write_error);
  model_wait_s += wait_s;
  end.layer = layer;
  end.cpu_bytes = 0;
  for (int64_t x : bytes_cpu) end.cpu_bytes += x;
  end.gpu_side = bool(gpu_fn);
  end.adaptive = adaptive;
  end.shared = use_gpu;
  end.start_s = queue_start_s;
  end.wait_s = gpu_first ? wait_s : 0.0;
  end.open = true;
  if (!end.tail.pending()) finish_shared_step();  // nothing left running: account for it now

  // 4. Merge: window, CPU part, GPU batches (parts have lse = -inf where they did not run). An output of R rows
  // is one part per block of B rows that a task wrote (part rows land on their batch row).
  t = Clock::now();
  std::vector<MergePart> parts{{o_dense, lse_dense}};
  // Row block k of an [R, Hq, D] out at out_offset and its [R, Hq] lse at lse_offset.
  auto add_row_blocks = [&](const at::Tensor& o, const at::Tensor& l, int64_t out_offset, int64_t lse_offset,
                            uint64_t blocks) {
    for (int64_t k = 0; k <= rows.parts; ++k)
      if (blocks >> k & 1) parts.push_back({o, l, out_offset + k * B * Hq * D, lse_offset + k * B * Hq});
  };
  add_row_blocks(part, part, 0, R * Hq * D, cpu_row_blocks);  // on a GPU: page-locked, read in place by the merge
  for (size_t i = 0; i < gpu_out.size(); ++i)
    if (gpu_out[i].defined()) add_row_blocks(gpu_out[i], gpu_lse[i], 0, 0, gpu_row_blocks[i]);
  return merge_parts(parts, B, out, t, t_step);
}

void HybridRuntime::finish_shared_step() {
  SharedStepEnd& end = shared_end_;
  const bool open = end.open;
  end.open = false;
  try {
    end.tail.finish(&end.qs);
  } catch (...) {
    end.gpu_bytes = 0;
    throw;
  }
  const int64_t gpu_bytes_step = std::exchange(end.gpu_bytes, 0);  // the waiters are done: start the next step at 0
  if (!open) return;
  // The retrieval ran until the later side was done (the GPU's batches may have finished after the step returned).
  const double shared_s = std::max(0.0, std::max(end.cpu_end_s, end.qs.gpu_done_at) - end.start_s - end.wait_s);
  retrieval_s += shared_s;
  shared_retrieval_s += shared_s;
  // Throughputs for the next step's split (exponential average over steps; only steps where a side ran).
  auto update_rate = [](double& rate, int64_t bytes, double busy) {
    if (busy <= 0 || bytes <= 0) return;
    rate = rate > 0 ? 0.7 * rate + 0.3 * (double(bytes) / busy) : double(bytes) / busy;
  };
  if (end.gpu_side) {
    update_rate(cpu_rate, end.cpu_bytes, end.qs.cpu_busy_s);
    update_rate(gpu_rate, gpu_bytes_step, end.qs.gpu_busy_s);
  }
  if (end.adaptive) {
    if (size_t(end.layer) < sharing_choice.size())
      sharing_choice[size_t(end.layer)].record(end.shared, end.cpu_bytes + gpu_bytes_step, shared_s);
    cpu_alone_steps += !end.shared;
  }
  cpu_busy_s += end.qs.cpu_busy_s;
  gpu_busy_s += end.qs.gpu_busy_s;
  cpu_tasks += end.qs.cpu_tasks;
  gpu_tasks += end.qs.gpu_tasks;
  cpu_bytes += end.cpu_bytes;
  gpu_bytes += gpu_bytes_step;
}

HybridRuntime::~HybridRuntime() {
  try {  // the control thread may still wait for the last step's batches, whose waiters write shared_end_
    shared_end_.tail.finish(nullptr);
  } catch (...) {
  }
}

std::vector<core::QueueTask> HybridRuntime::plan_tasks(const std::vector<int32_t>& lens_before, const float* budgets,
                                                       const int32_t* block_sizes) const {
  const int64_t B = int64_t(lens_before.size()), Hq = num_q_heads, Hkv = store->store->config().num_kv_heads,
                D = store->store->config().head_dim, G = Hq / Hkv, eb = 2;
  std::vector<core::QueueTask> tasks;
  for (int64_t g = 0; g < B * Hkv; ++g) {
    const int64_t b = g / Hkv, bs = block_sizes[g], n = lens_before[size_t(b)] + 1;
    const auto r = core::retrieval_range(n, sink, local, bs);
    int64_t kv = 0;
    for (int64_t h = g % Hkv * G; h < (g % Hkv + 1) * G; ++h)
      kv += core::budget_blocks(budgets[b * Hq + h], n, bs, r.block_end - r.block_begin);
    if (kv == 0) continue;
    tasks.push_back({int32_t(g), (r.block_end - r.block_begin) * 2 * D * eb + kv * 2 * bs * D * eb});
  }
  return tasks;
}

int64_t HybridRuntime::split_parts(const std::vector<core::QueueTask>& tasks, const std::vector<int32_t>& lens_before,
                                   const float* budgets, bool shared) const {
  if (dense_parts >= 1) return dense_parts == 1 ? 0 : dense_parts;
  if (!shared) return 0;
  // Enough parts for ~kTargetTasks tasks per layer (Llama batch 1 `full`: 8 groups -> 2 parts; Qwen: 4 -> 4), none
  // shorter than kMinPartTokens (a part pays a task's fixed costs on both sides).
  constexpr int64_t kTargetTasks = 16, kMaxParts = 4, kMinPartTokens = 8192;
  const int64_t G = num_q_heads / store->store->config().num_kv_heads;
  int64_t dense = 0;
  for (const auto& task : tasks) dense += dense_group(budgets + int64_t(task.group) * G, G) ? 1 : 0;
  if (dense == 0 || int64_t(tasks.size()) >= kTargetTasks) return 0;
  const int64_t want = (kTargetTasks - (int64_t(tasks.size()) - dense) + dense - 1) / dense;
  int64_t longest = 0;
  for (int32_t n : lens_before) longest = std::max<int64_t>(longest, n + 1 - local - sink);
  const int64_t parts = std::min({want, kMaxParts, longest / kMinPartTokens});
  return parts >= 2 ? parts : 0;
}

const float* HybridRuntime::device_address(const at::Tensor& t, int64_t offset) {
  const float* base = nullptr;
#ifdef FLUXION_WITH_CUDA
  if (t.is_cuda()) {
    base = t.data_ptr<float>();
  } else {
    if (t.data_ptr() != mapped_host_) {
      cudaPointerAttributes attr{};
      void* dev = nullptr;
      if (cudaPointerGetAttributes(&attr, t.data_ptr()) == cudaSuccess) dev = attr.devicePointer;
      else (void)cudaGetLastError();
      TORCH_CHECK(dev != nullptr, "internal: a merged part is host memory the device cannot read");
      mapped_host_ = t.data_ptr();
      mapped_device_ = dev;
    }
    base = static_cast<const float*>(mapped_device_);
  }
#endif
  return base + offset;
}

at::Tensor HybridRuntime::merge_parts(const std::vector<MergePart>& parts, int64_t B,
                                      const c10::optional<at::Tensor>& into, Clock::time_point merge_start,
                                      Clock::time_point step_start) {
  const int64_t Hq = num_q_heads, D = store->store->config().head_dim;
  at::Tensor out;
#ifdef FLUXION_WITH_CUDA
  if (device.is_cuda() && parts.size() <= size_t(core::cuda::kMaxListedStates) && (parts.size() > 1 || into)) {
    // One kernel over the parts where they are (the CPU side's in page-locked memory), writing the caller's
    // buffer in its dtype: no stacking copies, no conversion after.
    core::cuda::MergeListedParams mp;
    mp.num_states = int(parts.size());
    mp.head_dim = D;
    mp.rows = B * Hq;
    for (size_t i = 0; i < parts.size(); ++i) {
      mp.outs[i] = device_address(parts[i].out_buf, parts[i].out_offset);
      mp.lses[i] = device_address(parts[i].lse_buf, parts[i].lse_offset);
    }
    out = into ? *into : at::empty({B, Hq, D}, at::TensorOptions().dtype(at::kFloat).device(device));
    mp.out = out.data_ptr();
    mp.out_type = out.scalar_type() == at::kBFloat16 ? core::cuda::MergeOut::kBFloat16
                  : out.scalar_type() == at::kHalf   ? core::cuda::MergeOut::kFloat16
                                                     : core::cuda::MergeOut::kFloat32;
    const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
    C10_CUDA_CHECK(core::cuda::merge_listed_states(mp, stream.stream()));
    // The runtime may be dropped right after this step, before the kernel has read a host part.
    for (size_t i = 0; i < parts.size(); ++i) {
      if (!parts[i].out_buf.is_cuda()) record_host_use(parts[i].out_buf, stream);
      if (!parts[i].lse_buf.is_cuda() && !parts[i].lse_buf.is_same(parts[i].out_buf))
        record_host_use(parts[i].lse_buf, stream);
    }
  } else
#endif
  {
    // Views of each part, moved to the device and stacked for the merge op.
    std::vector<at::Tensor> outs, lses;
    for (const auto& p : parts) {
      outs.push_back(p.out_buf.view(-1).narrow(0, p.out_offset, B * Hq * D).view({B, Hq, D}).to(device, true));
      lses.push_back(p.lse_buf.view(-1).narrow(0, p.lse_offset, B * Hq).view({B, Hq}).to(device, true));
    }
    out = outs.size() == 1 ? outs.front()
                           : std::get<0>(op<MergeFn>("fluxion::merge_attention_states").call(at::stack(outs),
                                                                                              at::stack(lses)));
    if (into) out = into->copy_(out);
  }
  merge_s += since(merge_start);
  step_s += since(step_start);
  ++steps;
  return out;
}

// ---- whole-step CUDA graph -------------------------------------------------------------------------

#ifdef FLUXION_WITH_CUDA
// Completion of one graph step's enqueued work; the step's deferred store writes wait on it.
struct GraphStepEvent {
  cudaEvent_t event = nullptr;
  bool recorded = false;
  GraphStepEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
  ~GraphStepEvent() { cudaEventDestroy(event); }
  void wait() const {
    // Not recorded: graph_end never ran (the step failed on the way); everything enqueued has to land.
    if (recorded) C10_CUDA_CHECK(cudaEventSynchronize(event));
    else C10_CUDA_CHECK(cudaDeviceSynchronize());
  }
};
#else
struct GraphStepEvent {};
#endif

std::tuple<int64_t, int64_t, int64_t> HybridRuntime::graph_begin(const std::vector<int64_t>& ids,
                                                                 const at::Tensor& budgets,
                                                                 const at::Tensor& block_sizes) {
#ifndef FLUXION_WITH_CUDA
  TORCH_CHECK(false, "graph steps need a CUDA build of fluxion (FLUXION_CUDA=1)");
  return {0, 0, 0};
#else
  TORCH_CHECK(device.is_cuda(), "graph steps need a runtime on a CUDA device, this one runs on ", device);
  TORCH_CHECK(!graph_.begun, "graph_begin: the previous graph step was not closed with graph_end");
  store->check_seqs(ids);
  const auto& cfg = store->store->config();
  const int64_t L = cfg.num_layers, B = int64_t(ids.size()), Hq = num_q_heads, Hkv = cfg.num_kv_heads,
                D = cfg.head_dim, G = Hq / Hkv, P = store->store->layout().page_tokens;
  TORCH_CHECK(B > 0, "ids must not be empty");
  at::Tensor bud, bsz;
  std::tie(bud, bsz) =
      checked_plan_tables(budgets, block_sizes, {L, B, Hq}, {L, B, Hkv}, "[L, B, Hq]", "[L, B, Hkv]");
  const float* bud_p = bud.data_ptr<float>();
  const int32_t* bsz_p = bsz.data_ptr<int32_t>();

  // Is every layer's step a GPU-alone step? (Checked before anything changes; never without a local window, see
  // step().)
  store->flush_pending();  // the previous step's tokens: its graph has finished with the staging slots
  if (local == 0) return {0, 0, 0};
  std::vector<std::vector<int32_t>> lens(static_cast<size_t>(L), std::vector<int32_t>(static_cast<size_t>(B)));
  int64_t frames = 1;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      lens[size_t(l)][size_t(b)] = int32_t(store->store->seq_len(int(l), int(ids[size_t(b)])));
      frames = std::max<int64_t>(frames, lens[size_t(l)][size_t(b)] / P + 1);
    }
    int64_t volume = 0;
    for (const auto& task : plan_tasks(lens[size_t(l)], bud_p + l * B * Hq, bsz_p + l * B * Hkv)) volume += task.volume;
    if (cpu_retrieval && volume >= min_shared_volume) return {0, 0, 0};
  }

  // Buffers: reallocated when the batch changes or the frame tables outgrow them (with room to grow, so that
  // a long generation recaptures only every ~25% of growth).
  if (ids != graph_.ids || frames > graph_.frame_capacity) {
    graph_.ids = ids;
    graph_.frame_capacity = frames + std::max<int64_t>(4, frames / 4);
    const int64_t row = PlanRow{B, Hq, Hkv, B * Hkv, graph_.frame_capacity}.words();
    graph_.plan_host = at::empty({L, row}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    graph_.plan_dev = at::empty({L, row}, at::TensorOptions().dtype(at::kInt).device(device));
    graph_.staging = at::empty({L, 2, B, Hkv, 1, D}, at::TensorOptions().dtype(store->scalar_type()).pinned_memory(true));
  }
  if (!graph_bytes_.defined()) graph_bytes_ = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(device));

  // Reserve the new token's positions in every layer; the writes wait for this step's work to finish.
  auto done = std::make_shared<GraphStepEvent>();
  for (int64_t l = 0; l < L; ++l)
    store->append_deferred(l, ids, graph_.staging[l][0], graph_.staging[l][1], [done] { done->wait(); });

  // Each layer's plan row (PlanRow, B*Hkv group slots): the retrieval groups are every group with a non-zero
  // budget, whatever the length (a group with no candidate block yet is an empty task), so the captured
  // launches fit every step until the tables change.
  const PlanRow layout{B, Hq, Hkv, B * Hkv, graph_.frame_capacity};
  graph_.num_groups.assign(size_t(L), 0);
  for (int64_t l = 0; l < L; ++l) {
    int32_t* ph = graph_.plan_host.data_ptr<int32_t>() + l * layout.words();
    layout.fill(ph,
                retrieval_rows(lens[size_t(l)], bud_p + l * B * Hq, bsz_p + l * B * Hkv, Hq, Hkv, sink, local, P, 0),
                *store->store, l, ids);
    int64_t n = 0;
    for (int64_t g = 0; g < B * Hkv; ++g) {
      const float* gb = bud_p + l * B * Hq + g * G;  // the group's G heads are consecutive in [B, Hq]
      if (std::any_of(gb, gb + G, [](float x) { return x > 0.f; })) ph[layout.o_groups() + n++] = int32_t(g);
    }
    graph_.num_groups[size_t(l)] = n;
    gpu_tasks += n;
  }
  graph_.done = done;
  graph_.begun = true;
  steps += L;
  gpu_alone_steps += L;
  ++graph_steps_;
  // The captured launches depend on the tables only through the group lists and block sizes; hash all of it.
  const std::string_view tables(reinterpret_cast<const char*>(bud_p), size_t(bud.numel()) * 4);
  const std::string_view sizes(reinterpret_cast<const char*>(bsz_p), size_t(bsz.numel()) * 4);
  const int64_t signature =
      int64_t(std::hash<std::string_view>{}(tables) ^ (std::hash<std::string_view>{}(sizes) * 31u) ^ size_t(B));
  return {graph_.frame_capacity, store->store->committed_frames(), signature};
#endif
}

at::Tensor HybridRuntime::graph_step(int64_t layer, at::Tensor& k_win_l, at::Tensor& v_win_l, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, double scale) {
#ifndef FLUXION_WITH_CUDA
  TORCH_CHECK(false, "graph steps need a CUDA build of fluxion (FLUXION_CUDA=1)");
  return {};
#else
  TORCH_CHECK(graph_.begun, "graph_step must come between graph_begin and graph_end");
  store->check_layer(layer);
  const auto& cfg = store->store->config();
  const int64_t B = int64_t(graph_.ids.size()), Hq = num_q_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;
  const auto dt = store->scalar_type();
  TORCH_CHECK(q.sizes() == at::IntArrayRef({B, Hq, D}) && q.device() == device && q.scalar_type() == dt,
              "q must be [B, Hq, D] = [", B, ", ", Hq, ", ", D, "] ", dt, " on ", device, ", got ", shape_str(q), " ",
              q.scalar_type(), " on ", q.device());
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, Hkv, D}) && t->is_contiguous() && t->device() == device &&
                    t->scalar_type() == dt,
                "k and v must be contiguous [B, Hkv, D] = [", B, ", ", Hkv, ", ", D, "] ", dt, " on ", device, ", got ",
                shape_str(*t), " ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(k_win_l.dim() == 4 && k_win_l.size(0) == B && k_win_l.size(2) == sink + local && k_win_l.device() == device,
              "k_win must be [B, Hkv, sink + local, D] on ", device, ", got ", shape_str(k_win_l));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  // Raw copies: the buffers are page-locked already, and torch's pinned-copy bookkeeping is not needed here.
  if (layer == 0)
    C10_CUDA_CHECK(cudaMemcpyAsync(graph_.plan_dev.data_ptr(), graph_.plan_host.data_ptr(),
                                   size_t(graph_.plan_host.nbytes()), cudaMemcpyHostToDevice, stream));
  const at::Tensor slot = graph_.staging[layer];
  const size_t token_bytes = size_t(B * Hkv * D) * 2;
  C10_CUDA_CHECK(cudaMemcpyAsync(slot[0].data_ptr(), k.data_ptr(), token_bytes, cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaMemcpyAsync(slot[1].data_ptr(), v.data_ptr(), token_bytes, cudaMemcpyDeviceToHost, stream));

  const PlanRow layout{B, Hq, Hkv, B * Hkv, graph_.frame_capacity};
  const at::Tensor row = graph_.plan_dev[layer];
  const auto [lens_before_dev, lens_dev, bud_dev, bsz_dev, frames_dev] = layout.views(row);
  const int64_t n = graph_.num_groups[size_t(layer)];
  op<WindowAppendFn>("fluxion::window_append")
      .call(k_win_l, v_win_l, k.unsqueeze(2), v.unsqueeze(2), lens_before_dev.unsqueeze(1), sink);
  auto [o_dense, lse_dense] =
      op<WindowAttentionFn>("fluxion::window_attention").call(q, k_win_l, v_win_l, lens_dev, sink, scale);
  if (n == 0) return o_dense;
  auto [o, l, nbytes] = op<RetrievalFn>("fluxion::retrieval_attention")
                            .call(q, store->arena_view(), frames_dev, lens_dev, bud_dev, bsz_dev,
                                  row.narrow(0, layout.o_groups(), n), store->store->layout().page_tokens, sink,
                                  local, scale);
  graph_bytes_.add_(nbytes.sum());
  return std::get<0>(
      op<MergeFn>("fluxion::merge_attention_states").call(at::stack({o_dense, o}), at::stack({lse_dense, l})));
#endif
}

void HybridRuntime::graph_end() {
#ifdef FLUXION_WITH_CUDA
  TORCH_CHECK(graph_.begun, "graph_end without graph_begin");
  C10_CUDA_CHECK(cudaEventRecord(graph_.done->event, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  graph_.done->recorded = true;
  graph_.begun = false;
#endif
}

c10::Dict<std::string, double> HybridRuntime::stats() {
  finish_shared_step();
  c10::Dict<std::string, double> d;
  d.insert("steps", double(steps));
  d.insert("append_s", append_s);
  d.insert("model_wait_s", model_wait_s);
  d.insert("plan_s", plan_s);
  d.insert("dense_s", dense_s);
  d.insert("retrieval_s", retrieval_s);
  d.insert("cpu_busy_s", cpu_busy_s);
  d.insert("gpu_busy_s", gpu_busy_s);
  d.insert("cpu_select_s", cpu_select_s);
  d.insert("cpu_score_s", cpu_score_s);
  d.insert("cpu_topk_s", cpu_topk_s);
  d.insert("cpu_attend_s", cpu_attend_s);
  d.insert("merge_s", merge_s);
  d.insert("step_s", step_s);
  d.insert("cpu_tasks", double(cpu_tasks));
  d.insert("gpu_tasks", double(gpu_tasks));
  d.insert("cpu_bytes", double(cpu_bytes));
  d.insert("gpu_bytes", double(gpu_bytes + (gpu_bytes_pending.defined() ? gpu_bytes_pending.item<int64_t>() : 0) +
                                (graph_bytes_.defined() ? graph_bytes_.item<int64_t>() : 0)));
  d.insert("gpu_alone_steps", double(gpu_alone_steps));
  d.insert("cpu_alone_steps", double(cpu_alone_steps));
  d.insert("graph_steps", double(graph_steps_));
  // The GPU is busy with retrieval only while a batch runs; the window kernel is small in comparison.
  // GPU-alone steps count as busy: the host never makes the GPU wait for it there.
  d.insert("gpu_idle_ratio", retrieval_s > 0 ? std::max(0.0, shared_retrieval_s - gpu_busy_s) / retrieval_s : 1.0);
  return d;
}

void HybridRuntime::reset_stats() {
  finish_shared_step();
  steps = cpu_tasks = gpu_tasks = cpu_bytes = gpu_bytes = gpu_alone_steps = cpu_alone_steps = 0;
  gpu_bytes_pending = at::Tensor();
  graph_steps_ = 0;
  if (graph_bytes_.defined()) graph_bytes_.zero_();
  model_wait_s = plan_s = append_s = dense_s = retrieval_s = shared_retrieval_s = cpu_select_s = cpu_score_s = cpu_topk_s = cpu_attend_s = cpu_busy_s = gpu_busy_s = merge_s = step_s = 0;
}

// Called from store_class.cpp's registration, after HostKVStore's: the class takes a HostKVStore, so its
// type must be registered first (static initialisation order across files is unspecified).
void register_hybrid_runtime(torch::Library& m) {
  m.class_<HybridRuntime>("HybridRuntime")
      .def(torch::init<c10::intrusive_ptr<StoreHolder>, int64_t, std::string, int64_t, int64_t, int64_t>())
      .def("set_sequences", &HybridRuntime::set_sequences)
      .def("prefill", &HybridRuntime::prefill)
      .def("decode", &HybridRuntime::decode)
      .def("step", [](const c10::intrusive_ptr<HybridRuntime>& self, int64_t layer, std::vector<int64_t> ids,
                      at::Tensor k_win, at::Tensor v_win, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& budgets, const at::Tensor& block_sizes, bool use_gpu, double scale,
                      const c10::optional<at::Tensor>& out) {
        return self->step(layer, ids, k_win, v_win, q, k, v, budgets, block_sizes, use_gpu, scale, out);
      })
      .def("configure",
           [](const c10::intrusive_ptr<HybridRuntime>& self, int64_t cpu_workers, bool cpu_retrieval,
              int64_t min_shared_volume) {
             TORCH_CHECK(cpu_workers >= 0, "cpu_workers must be >= 0 (0 = ATen's thread count), got ", cpu_workers);
             TORCH_CHECK(min_shared_volume >= 0, "min_shared_volume must be >= 0 bytes, got ", min_shared_volume);
             self->cpu_workers = cpu_workers;
             self->cpu_retrieval = cpu_retrieval;
             self->min_shared_volume = min_shared_volume;
           })
      .def("set_adaptive_sharing",
           [](const c10::intrusive_ptr<HybridRuntime>& self, bool on) {
             // A new policy starts its measurements afresh.
             self->finish_shared_step();
             self->adaptive_sharing = on;
             self->sharing_choice.clear();
           })
      .def("set_dense_parts",
           [](const c10::intrusive_ptr<HybridRuntime>& self, int64_t parts) {
             TORCH_CHECK(parts >= 0 && parts <= 16, "dense_parts must be in [0, 16] (0 = as needed, 1 = never split), got ",
                         parts);
             self->dense_parts = parts;
           })
      .def("graph_begin", &HybridRuntime::graph_begin)
      .def("graph_step",
           [](const c10::intrusive_ptr<HybridRuntime>& self, int64_t layer, at::Tensor k_win, at::Tensor v_win,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
             return self->graph_step(layer, k_win, v_win, q, k, v, scale);
           })
      .def("graph_end", &HybridRuntime::graph_end)
      .def("stats", &HybridRuntime::stats)
      .def("reset_stats", &HybridRuntime::reset_stats)
      .def("window", [](const c10::intrusive_ptr<HybridRuntime>& self, int64_t layer) {
        self->store->check_layer(layer);
        TORCH_CHECK(!self->k_win.empty(), "call set_sequences before window");
        return std::make_tuple(self->k_win[size_t(layer)], self->v_win[size_t(layer)]);
      });
}

}  // namespace fluxion::ops
