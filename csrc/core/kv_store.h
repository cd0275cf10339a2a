// Host-resident block KV store: for every layer x sequence x KV head, K and V of all tokens plus key
// min/max metadata at granularities 16/32/64/128, laid out as in layout.h.
//
// Memory: one virtual address range is reserved up front and committed in chunks as the cache grows, so
// the arena is a single base pointer (kernels index pages by a 32-bit frame id) and growth never copies
// stored data. When a HostPinner is given, every committed chunk is page-locked (cudaHostRegister) and
// the GPU reads it in place over PCIe; a background thread commits, faults in and pins the next chunk ahead of
// need (pin_ahead). Otherwise a background thread faults in the next never-used frames ahead of their first
// write (prefault_ahead). An optional byte cap is checked before anything is committed or
// written: a failing append throws and leaves every stored token and all metadata as they were.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/layout.h"

namespace fluxion::core {

// Page-locks host ranges for device access. Implemented by the CUDA glue; absent in CPU-only builds.
class HostPinner {
 public:
  virtual ~HostPinner() = default;
  virtual void pin(void* ptr, size_t bytes) = 0;
  virtual void unpin(void* ptr, size_t bytes) = 0;
};

// Runs fn(begin, end) over [0, n) in parallel chunks (ATen's pool in the glue; serial by default).
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

// Raised for a byte cap that an append would exceed (the store is unchanged).
class CapacityError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct StoreConfig {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_tokens = 1024;  // a multiple of 128; 1024 makes the block-16 metadata of a page one 32 KiB run
  DType dtype = DType::kBFloat16;
  int64_t byte_cap = 0;  // 0: no cap (the reservation is sized from physical memory)
};

struct StoreStats {
  int64_t kv_bytes = 0;         // K and V of stored tokens
  int64_t metadata_bytes = 0;   // key min/max of stored blocks, all four granularities
  int64_t allocated_bytes = 0;  // frames in use (includes the unused tail of each last frame)
  int64_t committed_bytes = 0;  // arena memory committed (in use or free frames)
  int64_t pinned_bytes = 0;     // committed and page-locked
  int64_t reserved_bytes = 0;   // virtual reservation
  int64_t byte_cap = 0;
  int64_t frames_in_use = 0;
  int64_t frames_committed = 0;
  int64_t num_sequences = 0;
};

// A contiguous-last-dim source of T tokens for all Hkv heads of one sequence: element (h, t, d) is at
// base + h * head_stride + t * token_stride + d (strides in elements).
struct TokenSource {
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t head_stride = 0;
  int64_t token_stride = 0;
  int64_t num_tokens = 0;
};

struct AppendItem {
  int seq = -1;
  TokenSource src;
};

class HostKVStore {
 public:
  HostKVStore(const StoreConfig& config, std::shared_ptr<HostPinner> pinner = nullptr);
  ~HostKVStore();
  HostKVStore(const HostKVStore&) = delete;
  HostKVStore& operator=(const HostKVStore&) = delete;

  int add_sequence();
  // Returns the sequence's frames to the free list (kept committed for reuse).
  void free_sequence(int seq);
  // Appends tokens for several sequences of one layer, all or nothing (validation and capacity are
  // checked before the first byte is written).
  void append(int layer, const std::vector<AppendItem>& items, const ParallelFor& parallel = {});
  // The same append in two phases, for tokens whose data is still on its way to the host (a decode token in
  // flight from the GPU): reserve() grows the sequences by num_tokens each now (frames, lengths; all or
  // nothing, capacity checked) and returns each one's first position; write() fills reserved positions later.
  // A layer's writes must come in position order, and nothing may read a reserved position before its write
  // (decode reads only positions outside the local window, which a new token is in for `local` steps).
  std::vector<int64_t> reserve(int layer, const std::vector<std::pair<int, int64_t>>& seq_tokens);
  void write(int layer, int seq, int64_t position, const TokenSource& src, const ParallelFor& parallel = {});

  // Frames that appends can still obtain without exceeding the byte cap or the reservation.
  int64_t frames_available() const;
  int64_t seq_len(int layer, int seq) const;
  const std::vector<int32_t>& frames(int layer, int seq) const;
  bool has_sequence(int seq) const;
  std::vector<int> sequences() const;

  void* arena() const { return arena_; }
  int64_t committed_frames() const { return committed_frames_; }
  PageLayout layout() const { return layout_; }
  const StoreConfig& config() const { return config_; }
  int64_t elem_bytes() const { return 2; }
  int64_t frame_bytes() const { return layout_.frame_elems() * elem_bytes(); }
  bool pinned() const { return pinner_ != nullptr; }
  StoreStats stats() const;
  // Blocks until the memory of the frames sent to the prefaulter (below) is faulted in; returns the bytes it has
  // faulted in so far. For tests and benchmarks: appends never wait for it.
  int64_t wait_prefaulted() const;
  // A pinned store: waits for the chunk being pinned ahead of need (if any) and takes it into the free frames;
  // returns the bytes pinned ahead so far. For tests and benchmarks: appends wait only when they need the chunk.
  int64_t wait_pinned_ahead();

  // Pointer to page (frame, kv_head).
  uint16_t* page(int32_t frame, int kv_head) const {
    return static_cast<uint16_t*>(arena_) + (int64_t(frame) * layout_.num_kv_heads + kv_head) * layout_.page_elems();
  }

 private:
  struct Sequence {
    std::vector<std::vector<int32_t>> frames;  // [layer] -> frame ids
    std::vector<int64_t> lengths;              // [layer]
    bool live = false;
  };
  void check_layer(int layer) const;
  void check_seq(int seq) const;
  int64_t limit_bytes() const;  // committed memory may not pass this (cap or reservation, page-aligned)
  // Where committed memory ends after growing to hold at least `need_end` bytes (an append's growth and a chunk
  // pinned ahead alike), within the limit.
  int64_t growth_end(int64_t need_end) const;
  // Makes at least `frames_needed` free frames available, committing (and pinning) memory; throws
  // CapacityError without changing anything if the cap or the reservation would be exceeded.
  void reserve_free_frames(int64_t frames_needed);
  // Writes src's tokens at positions [n0, n0 + T) (reserved) with their metadata.
  void write_tokens(int layer, const Sequence& s, int64_t n0, const TokenSource& src, const ParallelFor& parallel);
  // The first write to a frame never used before faults its memory in, which costs far more than the write (on
  // the VMs here ~5 ms per 2 MiB huge page: a batch-4 decode step that crossed a page boundary took 15x its
  // usual time). So an unpinned store has the next never-used frames faulted in on a thread of its own, enough
  // for every live (sequence, layer) to start a new page; a pinned store's memory is faulted in by pinning.
  void prefault_ahead();
  // Pinning commits and faults in memory inside cudaHostRegister, ~4 GiB/s on the H200 box, and holds the CUDA
  // driver's lock meanwhile, stalling every thread's CUDA calls: a decode step that grew a 70 GiB store by its
  // usual quarter stalled for seconds. So a pinned store grows ahead of need, once fewer free frames are left
  // than two new pages for every live (sequence, layer): a thread of its own commits the next chunk, faults it in
  // (no driver lock) and pins it in pieces of kPinPiece with pauses between them, so that a decode step is held
  // up by one piece (a few ms) at most. The pauses stop once fewer than one new page per live (sequence, layer)
  // is left free: appends that fill pages that fast (a prefill) would otherwise wait for a thread at half speed.
  // The chunk's frames are taken in by the first append that needs them, or by the first append after it is done;
  // an append that needs them earlier waits for it.
  void pin_ahead();
  // (sequence, layer) pairs that may start a new page on the next append: live sequences x layers.
  int64_t live_rows() const;
  // Takes a finished chunk into the free frames (waiting for it when `wait`).
  void adopt_pinned_ahead(bool wait);
  // Adds the frames of committed memory not yet on the free list.
  void add_committed_frames();

  class Prefaulter;  // kv_store.cpp
  std::unique_ptr<Prefaulter> prefaulter_;
  class PinAhead;  // kv_store.cpp
  std::unique_ptr<PinAhead> pin_ahead_;
  int64_t pin_ahead_end_ = 0;      // end (bytes into the arena) of the chunk in flight; 0: none
  int64_t pinned_ahead_bytes_ = 0;  // pinned by the thread and taken in, in all
  // A chunk failed: growth stays on the appends (which report the error) until one of them pins successfully.
  bool pin_ahead_failed_ = false;
  int64_t fresh_frames_ = 0;    // frames [0, fresh_frames_) have been handed out (new ones go in id order)
  int64_t prefault_end_ = 0;    // frames below this were handed out or sent to the prefaulter

  StoreConfig config_;
  PageLayout layout_;
  std::shared_ptr<HostPinner> pinner_;
  void* arena_ = nullptr;
  int64_t reserved_bytes_ = 0;
  int64_t committed_frames_ = 0;
  int64_t committed_bytes_ = 0;
  int64_t pinned_bytes_ = 0;
  std::vector<std::pair<void*, size_t>> pinned_chunks_;
  std::vector<int32_t> free_frames_;
  std::vector<Sequence> seqs_;
  int64_t stored_tokens_ = 0;  // sum over layers, sequences of lengths (per KV head)
  int64_t stored_blocks_ = 0;  // sum of min/max rows written across granularities, per KV head
};

}  // namespace fluxion::core
