#include "core/kv_store.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

#include "core/half_convert.h"

namespace fluxion::core {
namespace {

constexpr int64_t kCommitAlign = int64_t(2) << 20;    // 2 MiB: huge-page friendly, page-aligned for pinning
constexpr int64_t kMinCommitBytes = int64_t(64) << 20;
// Pinned ahead of need in pieces of this size: pinning one (faulted-in) piece holds the CUDA driver's lock for ~4 ms
// on the H200 box (4 GiB took 120 ms), and every thread's CUDA calls wait for it.
constexpr int64_t kPinPiece = int64_t(128) << 20;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

std::string mib(int64_t bytes) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << double(bytes) / double(1 << 20) << " MiB";
  return os.str();
}

// bf16 and fp16 are both sign-magnitude: flipping every bit of a negative value and the sign bit of the rest
// gives 16-bit keys in the values' order (-0 just below +0; a NaN key lies beyond +-inf). Key min/max is
// exactly the values' min/max with no conversion, and vectorizes: a decode append updates four metadata
// levels of every head, which through float conversions cost ~2 us per head.
inline uint16_t order_key(uint16_t u) { return uint16_t(u ^ (uint16_t(int16_t(u) >> 15) | 0x8000u)); }
inline uint16_t from_order_key(uint16_t k) { return uint16_t(k ^ (uint16_t(~(int16_t(k) >> 15)) | 0x8000u)); }

}  // namespace

// Faults in requested ranges of the arena on its own thread with MADV_POPULATE_WRITE, which maps the pages as a
// write would without writing to them: a page the store has written meanwhile keeps its data. Where the kernel
// lacks it (before Linux 5.14) the requests are dropped and first writes fault as before.
class HostKVStore::Prefaulter {
 public:
  Prefaulter() : thread_([this] { run(); }) {}
  ~Prefaulter() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void request(char* begin, int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace_back(begin, bytes);
    }
    cv_.notify_all();
  }
  int64_t wait_idle() {
    std::unique_lock<std::mutex> lock(mu_);
    idle_cv_.wait(lock, [this] { return queue_.empty() && !busy_; });
    return faulted_bytes_;
  }

 private:
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return quit_ || !queue_.empty(); });
      if (quit_) return;
      auto [begin, bytes] = queue_.front();
      queue_.pop_front();
      busy_ = true;
      lock.unlock();
      // In 2 MiB steps, so that a store being destroyed waits for one step at most, each followed by a pause as
      // long as the step took: faulting memory in can hold a core for milliseconds (on a VM the host does the
      // work), and the decode's threads need the cores more than the prefaulter, which is a page ahead.
      int64_t done = 0;
      for (int64_t off = 0; off < bytes && supported_ && !quit_; off += kCommitAlign) {
        const int64_t n = std::min(kCommitAlign, bytes - off);
#ifdef MADV_POPULATE_WRITE
        const auto t0 = std::chrono::steady_clock::now();
        if (madvise(begin + off, size_t(n), MADV_POPULATE_WRITE) != 0) {
          if (errno == EINVAL) supported_ = false;  // an older kernel: nothing to do
          continue;
        }
        done += n;
        std::this_thread::sleep_for(std::chrono::steady_clock::now() - t0);
#else
        supported_ = false;
#endif
      }
      lock.lock();
      faulted_bytes_ += done;
      busy_ = false;
      if (queue_.empty()) idle_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<std::pair<char*, int64_t>> queue_;
  bool busy_ = false;
  std::atomic<bool> quit_{false};
  bool supported_ = true;  // used by the thread only
  int64_t faulted_bytes_ = 0;
  std::thread thread_;  // last: started once the members above exist
};

// Commits, faults in and pins one chunk of the arena at a time on a thread of its own (see pin_ahead). The store
// hands it a chunk beyond its committed memory and touches none of it until finish() has returned the pinned pieces.
class HostKVStore::PinAhead {
 public:
  explicit PinAhead(HostPinner& pinner) : pinner_(pinner), thread_([this] { run(); }) {}
  ~PinAhead() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    thread_.join();
    unpin(pieces_);  // a chunk finished but never taken in
  }
  // urgent: no pauses (appends are about to need the chunk).
  void start(char* begin, int64_t bytes, bool urgent) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (state_ != State::kIdle) throw std::logic_error("PinAhead::start while a chunk is in flight");
      job_ = {begin, bytes};
      state_ = State::kQueued;
      urgent_ = urgent;
    }
    cv_.notify_all();
  }
  void hurry() { urgent_ = true; }
  bool done() {
    std::lock_guard<std::mutex> lock(mu_);
    return state_ == State::kDone;
  }
  // Waits for the chunk, from then on without pauses; returns its pinned pieces, which the caller now owns (none if
  // it failed: then nothing of it stays committed).
  std::vector<std::pair<void*, size_t>> finish() {
    std::unique_lock<std::mutex> lock(mu_);
    urgent_ = true;
    done_cv_.wait(lock, [this] { return state_ == State::kDone || state_ == State::kIdle; });
    state_ = State::kIdle;
    return std::exchange(pieces_, {});
  }

 private:
  enum class State { kIdle, kQueued, kRunning, kDone };
  void unpin(const std::vector<std::pair<void*, size_t>>& pieces) {
    for (const auto& [ptr, bytes] : pieces) {
      try {
        pinner_.unpin(ptr, bytes);
      } catch (...) {  // best effort: the caller goes on either way
      }
    }
  }
  void run() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return quit_ || state_ == State::kQueued; });
      if (quit_) return;
      state_ = State::kRunning;
      const auto [begin, bytes] = job_;
      lock.unlock();
      std::vector<std::pair<void*, size_t>> pieces;
      bool ok = mprotect(begin, size_t(bytes), PROT_READ | PROT_WRITE) == 0;
      for (int64_t off = 0; ok && off < bytes; off += kPinPiece) {
        if (quit_) {
          ok = false;
          break;
        }
        const auto t0 = std::chrono::steady_clock::now();
        const size_t n = size_t(std::min(kPinPiece, bytes - off));
#ifdef MADV_POPULATE_WRITE
        madvise(begin + off, n, MADV_POPULATE_WRITE);  // best effort: pinning faults in whatever is left
#endif
        try {
          pinner_.pin(begin + off, n);
          pieces.emplace_back(begin + off, n);
        } catch (...) {
          ok = false;
        }
        // A pause as long as the piece took: the decode's threads need the cores, and the driver's lock, more.
        if (!urgent_) std::this_thread::sleep_for(std::chrono::steady_clock::now() - t0);
      }
      if (!ok) {  // give the chunk back whole: the append that needs it grows the store itself (and reports why not)
        unpin(pieces);
        pieces.clear();
        madvise(begin, size_t(bytes), MADV_DONTNEED);
        mprotect(begin, size_t(bytes), PROT_NONE);
      }
      lock.lock();
      pieces_ = std::move(pieces);
      state_ = State::kDone;
      done_cv_.notify_all();
    }
  }

  HostPinner& pinner_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  State state_ = State::kIdle;
  std::pair<char*, int64_t> job_{nullptr, 0};
  std::vector<std::pair<void*, size_t>> pieces_;
  std::atomic<bool> urgent_{false}, quit_{false};
  std::thread thread_;  // last: started once the members above exist
};

HostKVStore::HostKVStore(const StoreConfig& config, std::shared_ptr<HostPinner> pinner)
    : config_(config), pinner_(std::move(pinner)) {
  if (config.num_layers <= 0) throw std::invalid_argument("num_layers must be positive, got " + std::to_string(config.num_layers));
  if (config.num_kv_heads <= 0) throw std::invalid_argument("num_kv_heads must be positive, got " + std::to_string(config.num_kv_heads));
  if (config.head_dim != 64 && config.head_dim != 128)
    throw std::invalid_argument("head_dim must be 64 or 128, got " + std::to_string(config.head_dim));
  if (config.page_tokens <= 0 || config.page_tokens % kMaxGranularity != 0)
    throw std::invalid_argument("page_tokens must be a positive multiple of 128, got " + std::to_string(config.page_tokens));
  if (config.byte_cap < 0) throw std::invalid_argument("byte_cap must be >= 0, got " + std::to_string(config.byte_cap));
  layout_ = PageLayout{config.page_tokens, config.head_dim, config.num_kv_heads};

  int64_t want = config.byte_cap;
  if (want == 0) {
    // No cap: reserve address space for all of physical memory (pinned memory cannot exceed it anyway).
    const int64_t phys = int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGESIZE));
    want = std::max<int64_t>(phys, int64_t(1) << 30);
  }
  want = std::min<int64_t>(want, int64_t(INT32_MAX) * frame_bytes());
  reserved_bytes_ = round_up(want, kCommitAlign);
  void* p = mmap(nullptr, size_t(reserved_bytes_), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("HostKVStore: could not reserve " + mib(reserved_bytes_) + " of address space");
  arena_ = p;
#ifdef MADV_HUGEPAGE
  madvise(arena_, size_t(reserved_bytes_), MADV_HUGEPAGE);  // fewer TLB misses on scattered block reads
#endif
}

HostKVStore::~HostKVStore() {
  prefaulter_.reset();  // its thread touches the arena: stopped before the mapping goes
  pin_ahead_.reset();   // likewise; it unpins a chunk never taken in
  if (pinner_) {
    for (auto& [ptr, bytes] : pinned_chunks_) {
      try {
        pinner_->unpin(ptr, bytes);
      } catch (...) {
        // Destruction must not throw; the mapping is released below either way.
      }
    }
  }
  if (arena_) munmap(arena_, size_t(reserved_bytes_));
}

void HostKVStore::check_layer(int layer) const {
  if (layer < 0 || layer >= config_.num_layers)
    throw std::out_of_range("layer must be in [0, " + std::to_string(config_.num_layers) + "), got " + std::to_string(layer));
}

void HostKVStore::check_seq(int seq) const {
  if (!has_sequence(seq)) throw std::out_of_range("unknown sequence id " + std::to_string(seq));
}

bool HostKVStore::has_sequence(int seq) const { return seq >= 0 && seq < int(seqs_.size()) && seqs_[seq].live; }

std::vector<int> HostKVStore::sequences() const {
  std::vector<int> out;
  for (int i = 0; i < int(seqs_.size()); ++i)
    if (seqs_[i].live) out.push_back(i);
  return out;
}

int HostKVStore::add_sequence() {
  Sequence s;
  s.frames.assign(config_.num_layers, {});
  s.lengths.assign(config_.num_layers, 0);
  s.live = true;
  for (int i = 0; i < int(seqs_.size()); ++i) {
    if (!seqs_[i].live) {
      seqs_[i] = std::move(s);
      return i;
    }
  }
  seqs_.push_back(std::move(s));
  return int(seqs_.size()) - 1;
}

void HostKVStore::free_sequence(int seq) {
  check_seq(seq);
  Sequence& s = seqs_[seq];
  for (int l = 0; l < config_.num_layers; ++l) {
    stored_tokens_ -= s.lengths[l];
    for (int32_t f : s.frames[l]) free_frames_.push_back(f);
  }
  s = Sequence{};
}

int64_t HostKVStore::seq_len(int layer, int seq) const {
  check_layer(layer);
  check_seq(seq);
  return seqs_[seq].lengths[layer];
}

const std::vector<int32_t>& HostKVStore::frames(int layer, int seq) const {
  check_layer(layer);
  check_seq(seq);
  return seqs_[seq].frames[layer];
}

int64_t HostKVStore::limit_bytes() const {
  const int64_t os_page = int64_t(sysconf(_SC_PAGESIZE));
  const int64_t limit = config_.byte_cap > 0 ? std::min(config_.byte_cap, reserved_bytes_) : reserved_bytes_;
  return limit / os_page * os_page;
}

int64_t HostKVStore::frames_available() const {
  const int64_t max_frames = std::min<int64_t>(limit_bytes() / frame_bytes(), INT32_MAX);
  return max_frames - (committed_frames_ - int64_t(free_frames_.size()));
}

int64_t HostKVStore::growth_end(int64_t need_end) const {
  // At least a quarter of what is committed (and 64 MiB), so that pinning calls stay few.
  const int64_t end = std::max(need_end, committed_bytes_ + std::max(kMinCommitBytes, committed_bytes_ / 4));
  return std::min(round_up(end, kCommitAlign), limit_bytes());
}

void HostKVStore::reserve_free_frames(int64_t frames_needed) {
  int64_t missing = frames_needed - int64_t(free_frames_.size());
  if (missing <= 0) return;
  const int64_t fb = frame_bytes();
  const int64_t os_page = int64_t(sysconf(_SC_PAGESIZE));
  // Taking in a chunk pinned ahead adds as many committed frames as free ones: this end stays what it is.
  const int64_t need_end = round_up((committed_frames_ + missing) * fb, os_page);
  const int64_t limit = limit_bytes();
  if (need_end > limit) {
    std::ostringstream os;
    os << "HostKVStore: appending needs " << missing << " more frame(s) of " << mib(fb) << " ("
       << mib(need_end) << " committed in all), over the " << (config_.byte_cap > 0 ? "byte_cap of " : "reservation of ")
       << mib(limit) << "; nothing was stored. Raise byte_cap or free sequences.";
    throw CapacityError(os.str());
  }
  if (pin_ahead_end_ > 0) {
    adopt_pinned_ahead(/*wait=*/true);
    missing = frames_needed - int64_t(free_frames_.size());
    if (missing <= 0) return;
  }
  const int64_t new_end = growth_end(need_end);
  if (new_end > committed_bytes_) {
    char* base = static_cast<char*>(arena_) + committed_bytes_;
    const size_t bytes = size_t(new_end - committed_bytes_);
    if (mprotect(base, bytes, PROT_READ | PROT_WRITE) != 0)
      throw std::runtime_error("HostKVStore: could not commit " + mib(int64_t(bytes)) + " of host memory");
    if (pinner_) {
      try {
        pinner_->pin(base, bytes);
      } catch (...) {
        mprotect(base, bytes, PROT_NONE);
        throw;
      }
      pinned_chunks_.emplace_back(base, bytes);
      pinned_bytes_ += int64_t(bytes);
      pin_ahead_failed_ = false;  // pinning works again: the next chunk may go ahead
    }
    committed_bytes_ = new_end;
  }
  add_committed_frames();
}

void HostKVStore::add_committed_frames() {
  const int64_t new_frames = std::min<int64_t>(committed_bytes_ / frame_bytes(), INT32_MAX);
  // The free list is a stack (back = next). New frames go under the free ones, lowest id nearest the top: frames
  // that were never used are then handed out in id order, which prefault_ahead relies on.
  std::vector<int32_t> fresh;
  for (int64_t f = new_frames - 1; f >= committed_frames_; --f) fresh.push_back(int32_t(f));
  free_frames_.insert(free_frames_.begin(), fresh.begin(), fresh.end());
  committed_frames_ = new_frames;
}

void HostKVStore::append(int layer, const std::vector<AppendItem>& items, const ParallelFor& parallel) {
  std::vector<std::pair<int, int64_t>> seq_tokens;
  for (const AppendItem& it : items) {
    if (it.src.num_tokens > 0 && (it.src.k == nullptr || it.src.v == nullptr)) throw std::invalid_argument("null K/V source");
    seq_tokens.emplace_back(it.seq, it.src.num_tokens);
  }
  const std::vector<int64_t> first = reserve(layer, seq_tokens);
  for (size_t i = 0; i < items.size(); ++i) write_tokens(layer, seqs_[items[i].seq], first[i], items[i].src, parallel);
}

std::vector<int64_t> HostKVStore::reserve(int layer, const std::vector<std::pair<int, int64_t>>& seq_tokens) {
  check_layer(layer);
  int64_t frames_needed = 0;
  const int64_t P = config_.page_tokens;
  for (size_t i = 0; i < seq_tokens.size(); ++i) {
    const auto [seq, tokens] = seq_tokens[i];
    check_seq(seq);
    for (size_t j = 0; j < i; ++j)
      if (seq_tokens[j].first == seq) throw std::invalid_argument("sequence " + std::to_string(seq) + " appears twice in one append");
    if (tokens < 0) throw std::invalid_argument("num_tokens must be >= 0");
    const int64_t n0 = seqs_[seq].lengths[layer];
    const int64_t have = int64_t(seqs_[seq].frames[layer].size());
    frames_needed += std::max<int64_t>(0, (n0 + tokens + P - 1) / P - have);
  }
  reserve_free_frames(frames_needed);  // throws before anything changes
  std::vector<int64_t> first;
  for (const auto& [seq, tokens] : seq_tokens) {
    Sequence& s = seqs_[seq];
    first.push_back(s.lengths[layer]);
    const int64_t n_end = s.lengths[layer] + tokens;
    while (int64_t(s.frames[layer].size()) * P < n_end) {
      s.frames[layer].push_back(free_frames_.back());
      fresh_frames_ = std::max<int64_t>(fresh_frames_, free_frames_.back() + 1);
      free_frames_.pop_back();
    }
    s.lengths[layer] = n_end;
    stored_tokens_ += tokens;
  }
  if (pinner_) pin_ahead();
  else prefault_ahead();
  return first;
}

void HostKVStore::pin_ahead() {
  // Best effort throughout, as prefault_ahead: whatever fails here is done by the append that needs the frames.
  try {
    adopt_pinned_ahead(/*wait=*/false);
    if (pin_ahead_failed_) return;
    const int64_t low = 2 * live_rows(), free = int64_t(free_frames_.size());
    // Below one page turn of every live (sequence, layer) the appends are catching up with the chunk (a prefill
    // fills pages far faster than a decode): the thread pins without pauses.
    const bool urgent = 2 * free < low;
    if (pin_ahead_end_ > 0) {
      if (urgent) pin_ahead_->hurry();
      return;
    }
    if (free >= low) return;
    const int64_t fb = frame_bytes();
    const int64_t end = growth_end((committed_frames_ + low - free) * fb);
    if (end <= committed_bytes_ || end / fb <= committed_frames_) return;
    if (!pin_ahead_) pin_ahead_ = std::make_unique<PinAhead>(*pinner_);
    pin_ahead_->start(static_cast<char*>(arena_) + committed_bytes_, end - committed_bytes_, urgent);
    pin_ahead_end_ = end;
  } catch (...) {
  }
}

void HostKVStore::adopt_pinned_ahead(bool wait) {
  if (pin_ahead_end_ == 0 || (!wait && !pin_ahead_->done())) return;
  const auto pieces = pin_ahead_->finish();
  const int64_t end = std::exchange(pin_ahead_end_, 0);
  if (pieces.empty()) {
    pin_ahead_failed_ = true;
    return;
  }
  for (const auto& piece : pieces) {
    pinned_chunks_.push_back(piece);
    pinned_bytes_ += int64_t(piece.second);
    pinned_ahead_bytes_ += int64_t(piece.second);
  }
  committed_bytes_ = end;
  add_committed_frames();
}

int64_t HostKVStore::wait_pinned_ahead() {
  adopt_pinned_ahead(/*wait=*/true);
  return pinned_ahead_bytes_;
}

int64_t HostKVStore::live_rows() const {
  int64_t live = 0;
  for (const Sequence& s : seqs_) live += s.live;
  return live * config_.num_layers;
}

void HostKVStore::prefault_ahead() {
  // Frames never handed out go in id order (the free list hands out low ids first, and a freed frame has been
  // used), so the next ones to be used for the first time are those from fresh_frames_ on.
  const int64_t max_frames = std::min<int64_t>(limit_bytes() / frame_bytes(), INT32_MAX);
  const int64_t want = std::min(max_frames, fresh_frames_ + live_rows());
  // Best effort throughout: the append that called this has already reserved its tokens, and whatever fails here
  // is done by the append that needs the frames (which reports its own errors).
  try {
    // Commit them now if need be (for an unpinned store only an mprotect), so the prefaulter can work ahead of the
    // append that will need them instead of that append committing and faulting them itself.
    if (want > committed_frames_) reserve_free_frames(int64_t(free_frames_.size()) + want - committed_frames_);
    const int64_t end = std::min(committed_frames_, want);
    const int64_t begin = std::max(prefault_end_, fresh_frames_);
    if (end <= begin) return;
    if (!prefaulter_) prefaulter_ = std::make_unique<Prefaulter>();
    prefaulter_->request(reinterpret_cast<char*>(page(int32_t(begin), 0)), (end - begin) * frame_bytes());
    prefault_end_ = end;
  } catch (...) {
  }
}

int64_t HostKVStore::wait_prefaulted() const { return prefaulter_ ? prefaulter_->wait_idle() : 0; }

void HostKVStore::write(int layer, int seq, int64_t position, const TokenSource& src, const ParallelFor& parallel) {
  check_layer(layer);
  check_seq(seq);
  if (src.num_tokens > 0 && (src.k == nullptr || src.v == nullptr)) throw std::invalid_argument("null K/V source");
  if (position < 0 || src.num_tokens < 0 || position + src.num_tokens > seqs_[seq].lengths[layer])
    throw std::invalid_argument("write of positions [" + std::to_string(position) + ", " +
                                std::to_string(position + src.num_tokens) + ") outside the " +
                                std::to_string(seqs_[seq].lengths[layer]) + " reserved ones");
  write_tokens(layer, seqs_[seq], position, src, parallel);
}

// Token x head rows below which an append runs on the calling thread.
constexpr int64_t kMinParallelTokenHeads = 256;

void HostKVStore::write_tokens(int layer, const Sequence& s, int64_t n0, const TokenSource& src,
                               const ParallelFor& parallel) {
  const int64_t T = src.num_tokens;
  if (T == 0) return;
  const int64_t n1 = n0 + T;
  const int64_t P = config_.page_tokens;
  const int D = config_.head_dim;
  const int H = config_.num_kv_heads;
  const int64_t first_frame = n0 / P;
  const int64_t num_spans = (n1 - 1) / P - first_frame + 1;
  const std::vector<int32_t>& frames = s.frames[layer];

  // One work item = one KV head x one frame span: blocks never cross frames, so items are independent.
  auto work = [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> mn(D), mx(D);  // order keys
    for (int64_t item = begin; item < end; ++item) {
      const int h = int(item % H);
      const int64_t span = first_frame + item / H;
      const int64_t a = std::max(n0, span * P), b = std::min(n1, (span + 1) * P);
      uint16_t* page = this->page(frames[span], h);
      const auto* ks = static_cast<const uint16_t*>(src.k) + h * src.head_stride;
      const auto* vs = static_cast<const uint16_t*>(src.v) + h * src.head_stride;
      for (int64_t t = a; t < b; ++t) {
        const int64_t row = t - span * P;
        std::memcpy(page + layout_.k_offset(row), ks + (t - n0) * src.token_stride, size_t(D) * 2);
        std::memcpy(page + layout_.v_offset(row), vs + (t - n0) * src.token_stride, size_t(D) * 2);
      }
      // Finest level from the keys; a block that already held tokens folds the new ones into its min/max.
      uint16_t* meta0 = page + layout_.meta_offset(0);
      for (int64_t j = a / 16; j <= (b - 1) / 16; ++j) {
        const int64_t lo = std::max(a, j * 16), hi = std::min(b, (j + 1) * 16);
        uint16_t* row = meta0 + ((j * 16 - span * P) / 16) * 2 * D;
        if (j * 16 < n0) {  // the block held tokens
          for (int d = 0; d < D; ++d) {
            mn[d] = order_key(row[d]);
            mx[d] = order_key(row[D + d]);
          }
        } else {
          const uint16_t* k0 = page + layout_.k_offset(lo - span * P);
          for (int d = 0; d < D; ++d) mn[d] = mx[d] = order_key(k0[d]);
        }
        for (int64_t t = lo; t < hi; ++t) {
          const uint16_t* kr = page + layout_.k_offset(t - span * P);
          for (int d = 0; d < D; ++d) {
            const uint16_t x = order_key(kr[d]);
            mn[d] = std::min(mn[d], x);
            mx[d] = std::max(mx[d], x);
          }
        }
        for (int d = 0; d < D; ++d) {
          row[d] = from_order_key(mn[d]);
          row[D + d] = from_order_key(mx[d]);
        }
      }
      // Coarser levels from the finer ones: block j of level l = blocks 2j and 2j+1 of level l-1.
      for (int l = 1; l < kNumGranularities; ++l) {
        const int64_t g = kGranularities[l], half = g / 2;
        const uint16_t* fine = page + layout_.meta_offset(l - 1);
        uint16_t* coarse = page + layout_.meta_offset(l);
        for (int64_t j = a / g; j <= (b - 1) / g; ++j) {
          const int64_t jl = j - span * P / g;
          const uint16_t* c0 = fine + (2 * jl) * 2 * D;
          // Without a second child yet, the first one's bounds (read twice).
          const uint16_t* c1 = (2 * j + 1) * half < n1 ? fine + (2 * jl + 1) * 2 * D : c0;
          uint16_t* row = coarse + jl * 2 * D;
          for (int d = 0; d < D; ++d) {
            row[d] = from_order_key(std::min(order_key(c0[d]), order_key(c1[d])));
            row[D + d] = from_order_key(std::max(order_key(c0[D + d]), order_key(c1[D + d])));
          }
        }
      }
    }
  };
  const int64_t items = num_spans * H;
  // A decode append (a token per head) takes microseconds: waking a thread pool would cost more than it saves.
  if (parallel && items > 1 && T * H >= kMinParallelTokenHeads) {
    parallel(items, work);
  } else {
    work(0, items);
  }
}

StoreStats HostKVStore::stats() const {
  StoreStats st;
  const int64_t H = config_.num_kv_heads, D = config_.head_dim, eb = elem_bytes();
  int64_t blocks = 0;
  for (const Sequence& s : seqs_) {
    if (!s.live) continue;
    ++st.num_sequences;
    for (int l = 0; l < config_.num_layers; ++l) {
      for (int g : kGranularities) blocks += (s.lengths[l] + g - 1) / g;
      st.frames_in_use += int64_t(s.frames[l].size());
    }
  }
  st.kv_bytes = stored_tokens_ * H * 2 * D * eb;
  st.metadata_bytes = blocks * H * 2 * D * eb;
  st.allocated_bytes = st.frames_in_use * frame_bytes();
  st.frames_committed = committed_frames_;
  st.committed_bytes = committed_bytes_;
  st.pinned_bytes = pinned_bytes_;
  st.reserved_bytes = reserved_bytes_;
  st.byte_cap = config_.byte_cap;
  return st;
}

}  // namespace fluxion::core
