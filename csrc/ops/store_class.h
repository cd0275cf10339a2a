// The torch custom class around core::HostKVStore; the C++ runtime reaches the core store through `store`.
#pragma once
#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/kv_store.h"

namespace fluxion::ops {

struct StoreHolder : torch::CustomClassHolder {
  std::shared_ptr<core::HostKVStore> store;

  // pin_mode: -1 auto (pinned when built with CUDA and a device is visible), 0 off, 1 on.
  StoreHolder(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, const std::string& dtype, int64_t page_tokens,
              int64_t byte_cap, int64_t pin_mode);

  at::ScalarType scalar_type() const;
  void check_seqs(const std::vector<int64_t>& seq_ids) const;
  void check_layer(int64_t layer) const;
  // k, v: [B, Hkv, T, D] on any device; valid: optional [B, T] bool (false = padding, skipped).
  void append(int64_t layer, const std::vector<int64_t>& seq_ids, const at::Tensor& k, const at::Tensor& v,
              const c10::optional<at::Tensor>& valid);
  // One decode token per sequence from contiguous host [B, Hkv, D] arrays in the store's dtype, unchecked
  // beyond the ids: the decode step's path, which stages them itself (a tensor append costs ~10 dispatcher calls).
  void append_token(int64_t layer, const std::vector<int64_t>& seq_ids, const void* k, const void* v);
  // Appends whose K/V are still on their way to the host (the GPU-alone decode step of HybridRuntime): the
  // positions are reserved now (capacity checked, lengths grow), the data is written once `ready` returns
  // (it waits for the device -> host copy into k_host/v_host [B, Hkv, 1, D]). Every method that reads or
  // changes stored data flushes first, so no caller sees an unwritten token.
  void append_deferred(int64_t layer, const std::vector<int64_t>& seq_ids, at::Tensor k_host, at::Tensor v_host,
                       std::function<void()> ready);
  void flush_pending(int64_t layer = -1) const;  // -1: every layer
  at::Tensor pages() const;  // [F, Hkv, page_elems]; flushes pending writes first
  at::Tensor arena_view() const;  // the same view without flushing (kernels that only read written positions)
  at::Tensor frame_table(int64_t layer, const std::vector<int64_t>& seq_ids) const;  // [B, max_frames] int32
  at::Tensor seq_lens(int64_t layer, const std::vector<int64_t>& seq_ids) const;     // [B] int32
  std::tuple<at::Tensor, at::Tensor> gather(int64_t layer, int64_t seq) const;       // K, V [Hkv, N, D]
  at::Tensor block_metadata(int64_t layer, int64_t seq, int64_t block_size) const;   // [Hkv, NB, 2, D]
  c10::Dict<std::string, int64_t> stats() const;

 private:
  struct PendingWrite {
    int64_t layer;
    std::vector<int> seqs;
    std::vector<int64_t> positions;
    at::Tensor k, v;  // [B, Hkv, 1, D] host
    std::function<void()> ready;
  };
  mutable std::vector<PendingWrite> pending_;  // in append order
  // The store's append with its errors as torch errors (CapacityError tagged for fluxion.store).
  void append_items(int64_t layer, const std::vector<core::AppendItem>& items);
};

}  // namespace fluxion::ops
