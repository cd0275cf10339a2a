// torch.classes.fluxion.HybridRuntime: the per-layer hybrid decode step in C++.
//
// For one layer and one new token per sequence it appends K/V to the host store and the dense window,
// runs exact attention over the window on the model's device, runs the retrieval tasks (one per
// sequence x KV-head group with a non-zero budget) from one shared queue ordered by data volume — the
// CPU side (every CPU thread on one batch) and one GPU control thread each pull the next share of the
// queue when free — and merges every part by LSE. A step that reads little (short contexts) runs on the GPU
// alone and never waits for the device, its token reaching the store through an async copy. On a CPU-only
// machine the same step runs entirely on the CPU.
#pragma once
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/scheduler.h"
#include "ops/store_class.h"

struct CUevent_st;  // cudaEvent_t's pointee (CUDA builds only create them)

namespace fluxion::ops {

struct GraphStepEvent;  // hybrid_runtime.cpp: the completion event of one graph step

struct HybridRuntime : torch::CustomClassHolder {
  c10::intrusive_ptr<StoreHolder> store;
  int64_t num_q_heads = 0, sink = 64, local = 256;
  at::Device device{at::kCPU};
  int64_t cpu_workers = 0;          // threads of the CPU side; 0 = at::get_num_threads() at each step
  int64_t max_gpu_batches = 16;
  // Bytes a layer's retrieval reads below which a GPU step runs on the GPU alone, with no host sync (set by
  // configure; the Python runtime passes HybridAttentionRuntime.min_shared_volume).
  int64_t min_shared_volume = 24 << 20;
  double cpu_rate = 0, gpu_rate = 0;  // measured retrieval bytes/s of each side (set the queue split)
  bool cpu_retrieval = true;         // false: the GPU takes every task (FluxionConfig.device_policy='gpu')
  // Adaptive sharing (FluxionConfig.device_policy='auto'): a step that would share the queue runs on the CPU
  // alone instead where that has been reading faster, measured per layer (layers differ in budgets and block
  // sizes); see core::SharingChoice.
  bool adaptive_sharing = false;
  std::vector<core::SharingChoice> sharing_choice;  // per layer
  // Token-range parts the dense groups of a step are split into (hybrid_runtime.cpp, RetrievalRows): 0 = as
  // needed in steps the CPU and GPU share (a layer with few tasks balances badly between the two), 1 = never,
  // n >= 2 = always n (tests use it to run the split on the CPU).
  int64_t dense_parts = 0;
  std::unique_ptr<core::ControlThread> control;  // the GPU side's thread, kept across steps
  std::vector<int64_t> seq_ids;          // batch row -> store sequence
  std::vector<at::Tensor> k_win, v_win;  // per layer [B, Hkv, sink + local, D] on `device`

  // Per-step statistics, summed since the last reset_stats().
  int64_t steps = 0, cpu_tasks = 0, gpu_tasks = 0, cpu_bytes = 0, gpu_bytes = 0, gpu_alone_steps = 0;
  int64_t cpu_alone_steps = 0;  // steps adaptive sharing ran on the CPU alone though the GPU could have shared
  at::Tensor gpu_bytes_pending;  // bytes read by GPU-alone steps, summed on the device (read by stats())
  double cpu_select_s = 0, cpu_attend_s = 0;  // the CPU side's phases: score + top-k + union, attention + merge
  double cpu_score_s = 0, cpu_topk_s = 0;     // of cpu_select_s: the scoring and top-k phases
  // model_wait_s: a shared step's wait for q on the host, i.e. for the model's GPU work before this layer's
  // attention (part of step_s, and of append_s when the token is written before the retrieval; not attention,
  // and not in retrieval_s either, although the GPU's first batch is already enqueued during it).
  double model_wait_s = 0;
  // plan_s: planning the layer step, uploading the plan, launching the window append; append_s: the new token
  // into the host store (staging copies; also the wait for q and the store write when the token is written before
  // the retrieval, local < 128: else the write runs beside it on the control thread).
  double plan_s = 0;
  double append_s = 0, dense_s = 0, retrieval_s = 0, shared_retrieval_s = 0, cpu_busy_s = 0, gpu_busy_s = 0, merge_s = 0, step_s = 0;

  HybridRuntime(c10::intrusive_ptr<StoreHolder> store, int64_t num_q_heads, const std::string& device, int64_t sink,
                int64_t local, int64_t cpu_workers);
  ~HybridRuntime() override;
  // Batch rows of the next calls (store sequence ids); windows are (re)allocated, filled from the store.
  void set_sequences(const std::vector<int64_t>& ids);
  // Appends a prefill chunk: k, v [B, Hkv, T, D] (any device), valid [B, T] bool or None.
  void prefill(int64_t layer, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& valid);
  // One decode step of one layer: q [B, Hq, D], k/v [B, Hkv, 1, D] on `device`; budgets [B, Hq] float32 and
  // block_sizes [B, Hkv] int32 on the CPU; use_gpu: whether the GPU pulls retrieval tasks (false = the
  // paper's fixed baseline: the CPU does all retrieval). Returns out [B, Hq, D] float32 on `device`.
  at::Tensor decode(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& budgets, const at::Tensor& block_sizes, bool use_gpu, double scale);
  // The same step for sequences `ids` whose windows the caller owns (k_win/v_win [B, Hkv, sink + local, D]
  // of this layer, updated in place): the form the Python runtime (fluxion/runtime.py) calls. With `out`
  // ([B, Hq, D] on `device`, contiguous, float32 / bfloat16 / float16) the result is written there (in its dtype)
  // and `out` is returned.
  // A step that shares its queue with the GPU returns once its CPU side is done and the GPU side has launched its
  // last batch: the merge is enqueued behind those batches, so the GPU goes on to it (and to the model's next
  // work) without waiting for the host. The control thread waits for the batches meanwhile; that wait and the
  // step's accounting end in the next shared step, stats(), reset_stats() or set_sequences(), which also rethrow
  // an error of those batches.
  at::Tensor step(int64_t layer, const std::vector<int64_t>& ids, at::Tensor& k_win, at::Tensor& v_win,
                  const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& budgets,
                  const at::Tensor& block_sizes, bool use_gpu, double scale,
                  const c10::optional<at::Tensor>& out = c10::nullopt);
  c10::Dict<std::string, double> stats();
  void reset_stats();
  // Waits for the last shared step's GPU batches (rethrowing their error) and does its accounting (see step()).
  void finish_shared_step();

  // ---- The whole decode step as one CUDA graph (fluxion/graphs.py), for steps that run on the GPU alone.
  // Per step: graph_begin() on the host (flushes the previous step's tokens into the store, reserves this
  // step's positions in every layer, writes every layer's plan into one page-locked buffer), then the captured
  // work (or the same calls run eagerly): graph_step(0), ..., graph_step(L-1) between the model's segments,
  // then graph_end() once the work is enqueued. graph_step does no host work that depends on the step: it
  // uploads the plan (layer 0), copies the new K/V to a page-locked staging slot of its layer (written into
  // the store by the next graph_begin or reader), and runs window append, window attention, retrieval over
  // the store in place and the merge, all on the current stream.
  //
  // graph_begin(ids, budgets [L, B, Hq] float32, block_sizes [L, B, Hkv] int32, both CPU) returns
  // (frame_capacity, committed_frames, plan_signature): a graph captured under an equal triple (and the same
  // windows) replays correctly; frame_capacity 0 means this step is not a GPU-alone step (nothing was
  // reserved; run the ordinary step).
  std::tuple<int64_t, int64_t, int64_t> graph_begin(const std::vector<int64_t>& ids, const at::Tensor& budgets,
                                                    const at::Tensor& block_sizes);
  at::Tensor graph_step(int64_t layer, at::Tensor& k_win, at::Tensor& v_win, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, double scale);
  void graph_end();

 private:
  // Retrieval tasks of one layer step (groups with work for sequences of lens_before[b] + 1 tokens),
  // largest data volume first.
  std::vector<core::QueueTask> plan_tasks(const std::vector<int32_t>& lens_before, const float* budgets,
                                          const int32_t* block_sizes) const;
  // The last shared step's end, kept until finish_shared_step(): its queue's tail (the GPU batches still being
  // waited for) and what its accounting needs.
  struct SharedStepEnd {
    core::QueueTail tail;
    core::QueueRunStats qs;
    int64_t layer = 0, cpu_bytes = 0;
    int64_t gpu_bytes = 0;  // summed by the GPU batches' waiters, on the control thread
    bool open = false;      // accounting still to do
    bool gpu_side = false, adaptive = false, shared = false;
    double start_s = 0, cpu_end_s = 0, wait_s = 0;  // core::steady_seconds(); the wait for q inside the queue's time
  } shared_end_;

  // Parts to split the dense groups of a step with these tasks into (0: none); `shared`: both sides pull.
  int64_t split_parts(const std::vector<core::QueueTask>& tasks, const std::vector<int32_t>& lens_before,
                      const float* budgets, bool shared) const;

  // Buffers of the graph step, kept while the batch, the frame capacity and the plan shape stay the same.
  struct GraphPlan {
    std::vector<int64_t> ids;
    int64_t frame_capacity = 0;           // frames per sequence in the plan
    at::Tensor plan_host, plan_dev;       // [L, row] int32, page-locked / on `device`
    at::Tensor staging;                   // [L, 2, B, Hkv, 1, D] page-locked: each layer's new K/V
    std::vector<int64_t> num_groups;      // per layer: retrieval groups (those with a non-zero budget)
    std::shared_ptr<GraphStepEvent> done;  // recorded by graph_end; the deferred writes wait on it
    bool begun = false;
  } graph_;
  at::Tensor graph_bytes_;  // bytes read by graph steps' retrieval, summed on the device
  int64_t graph_steps_ = 0;

  // Buffers of the shared step, kept across layers and steps (allocating and copying through the dispatcher
  // cost more host time per layer than the step's whole merge): staged q | k | v of the new token and the CPU
  // side's partial state out | lse, page-locked on a GPU; q in fp32 for the CPU kernels; per GPU batch, the
  // bytes it read. The staging and part buffers are written only after the step's wait for q, which also waits
  // for everything enqueued earlier, i.e. for the previous steps' copies and merges that read them.
  at::Tensor shared_staging_, cpu_part_, gpu_batch_bytes_;
  std::vector<float> q_float_;
  std::shared_ptr<CUevent_st> staged_event_;  // the shared step's staging copies done (recorded by every step)
  // The per-layer plan's page-locked buffer and device copy, two slots used in turn; `uploaded`: the slot's last
  // upload done.
  struct PlanSlot {
    at::Tensor host, device;
    std::shared_ptr<CUevent_st> uploaded;
  };
  PlanSlot plan_slots_[2];
  int plan_slot_next_ = 0;
  // The device address of the last page-locked part buffer merged (cpu_part_ is reused, and the lookup is a
  // driver call).
  const void* mapped_host_ = nullptr;
  const void* mapped_device_ = nullptr;

  // One partial state of a step: out [B, Hq, D] and lse [B, Hq] (float32) at element offsets into two buffers
  // (one buffer for the CPU side's part), so that the merge makes no tensor views per part and layer.
  struct MergePart {
    at::Tensor out_buf, lse_buf;
    int64_t out_offset = 0, lse_offset = 0;
  };
  // Merges the step's parts (window first) into `into` ([B, Hq, D] on the device, float32 / bfloat16 / float16,
  // checked by the caller) or a new float32 tensor, and closes the step's timers.
  at::Tensor merge_parts(const std::vector<MergePart>& parts, int64_t B, const c10::optional<at::Tensor>& into,
                         std::chrono::steady_clock::time_point merge_start,
                         std::chrono::steady_clock::time_point step_start);
  const float* device_address(const at::Tensor& t, int64_t offset);
};

void register_hybrid_runtime(torch::Library& m);

}  // namespace fluxion::ops
