// torch.classes.fluxion.HostKVStore: the C++ host KV store exposed to Python (wrapped by fluxion.HostKVStore).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "core/kv_store.h"
#include "ops/checks.h"
#include "ops/cpu_executor.h"
#include "ops/hybrid_runtime.h"
#include "ops/store_class.h"

#ifdef FLUXION_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

namespace fluxion::ops {
namespace {

#ifdef FLUXION_WITH_CUDA
// Page-locks committed arena chunks in place so kernels read them over PCIe (UVA: host pointer == device pointer).
// The store also pins on a thread of its own: that thread works on the device current where the store was made.
class CudaHostPinner : public core::HostPinner {
 public:
  CudaHostPinner() { C10_CUDA_CHECK(cudaGetDevice(&device_)); }
  void pin(void* ptr, size_t bytes) override {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current != device_) C10_CUDA_CHECK(cudaSetDevice(device_));
    const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("HostKVStore: cudaHostRegister of ") + std::to_string(bytes >> 20) +
                               " MiB failed: " + cudaGetErrorString(err));
    }
  }
  void unpin(void* ptr, size_t) override { cudaHostUnregister(ptr); }

 private:
  int device_ = 0;
};
#endif

bool cuda_device_present() {
#ifdef FLUXION_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
#else
  return false;
#endif
}

std::shared_ptr<core::HostPinner> make_pinner(int64_t pin_mode) {
  TORCH_CHECK(pin_mode >= -1 && pin_mode <= 1, "pin must be -1 (auto), 0 or 1, got ", pin_mode);
  const bool present = cuda_device_present();
  if (pin_mode == 1) {
#ifdef FLUXION_WITH_CUDA
    TORCH_CHECK(present, "pin=True needs a CUDA device, and none is visible");
#else
    TORCH_CHECK(false, "pin=True needs fluxion built with CUDA (FLUXION_CUDA=1); this build is CPU-only");
#endif
  }
#ifdef FLUXION_WITH_CUDA
  if (pin_mode == 1 || (pin_mode == -1 && present)) return std::make_shared<CudaHostPinner>();
#endif
  return nullptr;
}

core::DType parse_dtype(const std::string& s) {
  if (s == "bfloat16") return core::DType::kBFloat16;
  if (s == "float16") return core::DType::kFloat16;
  TORCH_CHECK(false, "dtype must be bfloat16 or float16, got ", s);
}

}  // namespace

at::ScalarType StoreHolder::scalar_type() const {
  return store->config().dtype == core::DType::kBFloat16 ? at::kBFloat16 : at::kHalf;
}

StoreHolder::StoreHolder(int64_t num_layers, int64_t num_kv_heads, int64_t head_dim, const std::string& dtype,
                         int64_t page_tokens, int64_t byte_cap, int64_t pin_mode) {
  core::StoreConfig cfg;
  cfg.num_layers = int(num_layers);
  cfg.num_kv_heads = int(num_kv_heads);
  cfg.head_dim = int(head_dim);
  cfg.page_tokens = int(page_tokens);
  cfg.dtype = parse_dtype(dtype);
  cfg.byte_cap = byte_cap;
  try {
    store = std::make_shared<core::HostKVStore>(cfg, make_pinner(pin_mode));
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

void StoreHolder::check_seqs(const std::vector<int64_t>& seq_ids) const {
  for (int64_t s : seq_ids) TORCH_CHECK(store->has_sequence(int(s)), "seq_ids: unknown sequence id ", s);
}

void StoreHolder::check_layer(int64_t layer) const {
  TORCH_CHECK(layer >= 0 && layer < store->config().num_layers, "layer must be in [0, ", store->config().num_layers,
              "), got ", layer);
}

void StoreHolder::append(int64_t layer, const std::vector<int64_t>& seq_ids, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& valid) {
  check_layer(layer);
  check_seqs(seq_ids);
  flush_pending(layer);  // writes of a layer land in position order
  const auto& cfg = store->config();
  check_dim(k, 4, "k", "[B, Hkv, T, D]");
  TORCH_CHECK(k.scalar_type() == scalar_type(), "k must have the store's dtype ", scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == scalar_type(), "v must have the store's dtype ", scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(k.size(0) == int64_t(seq_ids.size()), "k has ", k.size(0), " rows but seq_ids has ", seq_ids.size(), " ids");
  TORCH_CHECK(k.size(1) == cfg.num_kv_heads, "k.size(1) must be num_kv_heads = ", cfg.num_kv_heads, ", got ", k.size(1));
  TORCH_CHECK(k.size(3) == cfg.head_dim, "k.size(3) must be head_dim = ", cfg.head_dim, ", got ", k.size(3));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  const int64_t B = k.size(0), T = k.size(2);
  if (valid.has_value()) {
    check_dtype(*valid, at::kBool, "valid");
    TORCH_CHECK(valid->sizes() == at::IntArrayRef({B, T}), "valid must be [B, T] = [", B, ", ", T, "], got ",
                shape_str(*valid));
  }
  // Host copies with a contiguous last dim; rows with a partial mask keep only their valid tokens.
  at::Tensor kc = k.to(at::kCPU).contiguous(), vc = v.to(at::kCPU).contiguous();
  std::vector<at::Tensor> keep;  // owns per-row gathered copies until append returns
  std::vector<core::AppendItem> items;
  at::Tensor vm = valid.has_value() ? valid->to(at::kCPU).contiguous() : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor kb = kc[b], vb = vc[b];
    if (vm.defined() && !vm[b].all().item<bool>()) {
      const at::Tensor idx = vm[b].nonzero().view({-1});
      kb = kb.index_select(1, idx).contiguous();
      vb = vb.index_select(1, idx).contiguous();
      keep.push_back(kb);
      keep.push_back(vb);
    }
    core::AppendItem it;
    it.seq = int(seq_ids[size_t(b)]);
    it.src = core::TokenSource{kb.data_ptr(), vb.data_ptr(), kb.stride(0), kb.stride(1), kb.size(1)};
    items.push_back(it);
  }
  append_items(layer, items);
}

void StoreHolder::append_token(int64_t layer, const std::vector<int64_t>& seq_ids, const void* k, const void* v) {
  check_layer(layer);
  check_seqs(seq_ids);
  flush_pending(layer);
  const int64_t H = store->config().num_kv_heads, D = store->config().head_dim;
  std::vector<core::AppendItem> items(seq_ids.size());
  for (size_t b = 0; b < seq_ids.size(); ++b) {
    const int64_t off = int64_t(b) * H * D * 2;  // bytes: 2-byte elements
    items[b].seq = int(seq_ids[b]);
    items[b].src = core::TokenSource{static_cast<const char*>(k) + off, static_cast<const char*>(v) + off, D, D, 1};
  }
  append_items(layer, items);
}

void StoreHolder::append_items(int64_t layer, const std::vector<core::AppendItem>& items) {
  try {
    store->append(int(layer), items, aten_parallel_for());
  } catch (const core::CapacityError& e) {
    TORCH_CHECK(false, "[fluxion.CapacityError] ", e.what());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

void StoreHolder::append_deferred(int64_t layer, const std::vector<int64_t>& seq_ids, at::Tensor k_host,
                                  at::Tensor v_host, std::function<void()> ready) {
  check_layer(layer);
  check_seqs(seq_ids);
  const int64_t B = int64_t(seq_ids.size());
  TORCH_CHECK(k_host.is_cpu() && k_host.is_contiguous() && k_host.dim() == 4 && k_host.size(0) == B &&
                  k_host.size(1) == store->config().num_kv_heads && k_host.size(2) == 1 &&
                  k_host.size(3) == store->config().head_dim && k_host.scalar_type() == scalar_type() &&
                  v_host.sizes() == k_host.sizes() && v_host.is_cpu() && v_host.is_contiguous() &&
                  v_host.scalar_type() == scalar_type(),
              "append_deferred takes contiguous host k/v [B, Hkv, 1, D] in the store's dtype, got ", shape_str(k_host));
  flush_pending(layer);  // writes of a layer land in position order
  PendingWrite w{layer, {}, {}, std::move(k_host), std::move(v_host), std::move(ready)};
  std::vector<std::pair<int, int64_t>> seq_tokens;
  for (int64_t id : seq_ids) {
    w.seqs.push_back(int(id));
    seq_tokens.emplace_back(int(id), 1);
  }
  try {
    w.positions = store->reserve(int(layer), seq_tokens);
  } catch (const core::CapacityError& e) {
    TORCH_CHECK(false, "[fluxion.CapacityError] ", e.what());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
  pending_.push_back(std::move(w));
}

void StoreHolder::flush_pending(int64_t layer) const {
  if (pending_.empty()) return;
  std::vector<PendingWrite> keep;
  for (PendingWrite& w : pending_) {
    if (layer >= 0 && w.layer != layer) {
      keep.push_back(std::move(w));
      continue;
    }
    if (w.ready) w.ready();
    const int64_t H = w.k.size(1), D = w.k.size(3);
    for (size_t b = 0; b < w.seqs.size(); ++b) {
      const auto* kb = static_cast<const uint16_t*>(w.k.data_ptr()) + int64_t(b) * H * D;
      const auto* vb = static_cast<const uint16_t*>(w.v.data_ptr()) + int64_t(b) * H * D;
      store->write(int(w.layer), w.seqs[b], w.positions[b], core::TokenSource{kb, vb, D, D, 1});
    }
  }
  pending_ = std::move(keep);
}

at::Tensor StoreHolder::pages() const {
  flush_pending();
  return arena_view();
}

at::Tensor StoreHolder::arena_view() const {
  const auto layout = store->layout();
  const int64_t F = store->committed_frames();
  const auto opts = at::TensorOptions().dtype(scalar_type()).device(at::kCPU);
  if (F == 0) return at::empty({0, layout.num_kv_heads, layout.page_elems()}, opts);
  auto keep = store;  // the view keeps the arena alive
  return at::from_blob(store->arena(), {F, layout.num_kv_heads, layout.page_elems()}, [keep](void*) {}, opts);
}

at::Tensor StoreHolder::frame_table(int64_t layer, const std::vector<int64_t>& seq_ids) const {
  check_layer(layer);
  check_seqs(seq_ids);
  int64_t maxf = 1;
  for (int64_t s : seq_ids) maxf = std::max<int64_t>(maxf, int64_t(store->frames(int(layer), int(s)).size()));
  at::Tensor t = at::zeros({int64_t(seq_ids.size()), maxf}, at::kInt);
  for (size_t b = 0; b < seq_ids.size(); ++b) {
    const auto& fr = store->frames(int(layer), int(seq_ids[b]));
    std::copy(fr.begin(), fr.end(), t.data_ptr<int32_t>() + int64_t(b) * maxf);
  }
  return t;
}

at::Tensor StoreHolder::seq_lens(int64_t layer, const std::vector<int64_t>& seq_ids) const {
  check_layer(layer);
  check_seqs(seq_ids);
  at::Tensor t = at::empty({int64_t(seq_ids.size())}, at::kInt);
  for (size_t b = 0; b < seq_ids.size(); ++b) t.data_ptr<int32_t>()[b] = int32_t(store->seq_len(int(layer), int(seq_ids[b])));
  return t;
}

std::tuple<at::Tensor, at::Tensor> StoreHolder::gather(int64_t layer, int64_t seq) const {
  check_layer(layer);
  check_seqs({seq});
  flush_pending(layer);
  const auto layout = store->layout();
  const int64_t n = store->seq_len(int(layer), int(seq)), H = layout.num_kv_heads, D = layout.head_dim,
                P = layout.page_tokens;
  at::Tensor k = at::empty({H, n, D}, scalar_type()), v = at::empty({H, n, D}, scalar_type());
  const auto& fr = store->frames(int(layer), int(seq));
  // K and V are interleaved per 16-token unit in a page (layout.h): copy unit by unit into logical [N, D].
  constexpr int64_t U = core::PageLayout::kUnitTokens;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t0 = 0; t0 < n; t0 += U) {
      const int64_t rows = std::min(U, n - t0);
      const uint16_t* page = store->page(fr[size_t(t0 / P)], int(h));
      std::memcpy(static_cast<uint16_t*>(k.data_ptr()) + (h * n + t0) * D, page + layout.k_offset(t0 % P),
                  size_t(rows * D) * 2);
      std::memcpy(static_cast<uint16_t*>(v.data_ptr()) + (h * n + t0) * D, page + layout.v_offset(t0 % P),
                  size_t(rows * D) * 2);
    }
  return {k, v};
}

at::Tensor StoreHolder::block_metadata(int64_t layer, int64_t seq, int64_t block_size) const {
  check_layer(layer);
  check_seqs({seq});
  flush_pending(layer);
  check_block_size(block_size);
  const auto layout = store->layout();
  const int level = core::granularity_level(int(block_size));
  const int64_t n = store->seq_len(int(layer), int(seq)), H = layout.num_kv_heads, D = layout.head_dim,
                P = layout.page_tokens, nb = (n + block_size - 1) / block_size, per_page = P / block_size;
  at::Tensor meta = at::empty({H, nb, 2, D}, scalar_type());
  const auto& fr = store->frames(int(layer), int(seq));
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < nb; ++j) {
      const uint16_t* page = store->page(fr[size_t(j / per_page)], int(h));
      std::memcpy(static_cast<uint16_t*>(meta.data_ptr()) + (h * nb + j) * 2 * D,
                  page + layout.meta_offset(level) + (j % per_page) * 2 * D, size_t(2 * D) * 2);
    }
  return meta;
}

c10::Dict<std::string, int64_t> StoreHolder::stats() const {
  const auto s = store->stats();
  c10::Dict<std::string, int64_t> d;
  d.insert("kv_bytes", s.kv_bytes);
  d.insert("metadata_bytes", s.metadata_bytes);
  d.insert("allocated_bytes", s.allocated_bytes);
  d.insert("committed_bytes", s.committed_bytes);
  d.insert("pinned_bytes", s.pinned_bytes);
  d.insert("reserved_bytes", s.reserved_bytes);
  d.insert("byte_cap", s.byte_cap);
  d.insert("frames_in_use", s.frames_in_use);
  d.insert("frames_committed", s.frames_committed);
  d.insert("num_sequences", s.num_sequences);
  return d;
}

TORCH_LIBRARY_FRAGMENT(fluxion, m) {
  m.class_<StoreHolder>("HostKVStore")
      .def(torch::init<int64_t, int64_t, int64_t, std::string, int64_t, int64_t, int64_t>())
      .def("add_sequence", [](const c10::intrusive_ptr<StoreHolder>& self) { return int64_t(self->store->add_sequence()); })
      .def("free_sequence",
           [](const c10::intrusive_ptr<StoreHolder>& self, int64_t seq) {
             self->check_seqs({seq});
             self->flush_pending();  // no write may land in a freed sequence's frames
             self->store->free_sequence(int(seq));
           })
      .def("append", &StoreHolder::append)
      .def("pages", &StoreHolder::pages)
      .def("flush", [](const c10::intrusive_ptr<StoreHolder>& self) { self->flush_pending(); })
      .def("frame_table", &StoreHolder::frame_table)
      .def("seq_lens", &StoreHolder::seq_lens)
      .def("seq_len",
           [](const c10::intrusive_ptr<StoreHolder>& self, int64_t layer, int64_t seq) {
             self->check_layer(layer);
             self->check_seqs({seq});
             return self->store->seq_len(int(layer), int(seq));
           })
      .def("gather", &StoreHolder::gather)
      .def("block_metadata", &StoreHolder::block_metadata)
      .def("stats", &StoreHolder::stats)
      .def("sequences",
           [](const c10::intrusive_ptr<StoreHolder>& self) {
             std::vector<int64_t> out;
             for (int s : self->store->sequences()) out.push_back(s);
             return out;
           })
      .def("pinned", [](const c10::intrusive_ptr<StoreHolder>& self) { return self->store->pinned(); })
      .def("wait_pinned_ahead",
           [](const c10::intrusive_ptr<StoreHolder>& self) { return self->store->wait_pinned_ahead(); })
      .def("frames_available",
           [](const c10::intrusive_ptr<StoreHolder>& self) { return self->store->frames_available(); })
      .def("page_elems", [](const c10::intrusive_ptr<StoreHolder>& self) { return self->store->layout().page_elems(); });
  register_hybrid_runtime(m);
}

}  // namespace fluxion::ops
