// Core store: layout, incremental metadata at every granularity, growth, accounting, byte cap.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "catch_compat.h"
#include "core/kv_store.h"
#include "test_helpers.h"

using namespace fluxion;
using fluxion::test::bf;

namespace {

core::StoreConfig config(int64_t cap = 0) {
  core::StoreConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.page_tokens = 256;
  c.dtype = core::DType::kBFloat16;
  c.byte_cap = cap;
  return c;
}

// Appends tokens [t0, t1) of a [H, N, D] array.
void append_range(core::HostKVStore& s, int layer, int seq, const std::vector<uint16_t>& k,
                  const std::vector<uint16_t>& v, int64_t n, int64_t t0, int64_t t1, int D) {
  core::AppendItem it;
  it.seq = seq;
  it.src = core::TokenSource{k.data() + t0 * D, v.data() + t0 * D, n * D, D, t1 - t0};
  s.append(layer, {it});
}

// Whether this kernel prefaults with MADV_POPULATE_WRITE (Linux 5.14 on).
bool populate_supported() {
#ifdef MADV_POPULATE_WRITE
  const size_t bytes = size_t(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return false;
  const bool ok = madvise(p, bytes, MADV_POPULATE_WRITE) == 0;
  munmap(p, bytes);
  return ok;
#else
  return false;
#endif
}

// Frames of several MiB (Llama's KV heads): a fresh frame shares no huge page with a used one, and a 64 MiB commit
// holds only 14 frames.
core::StoreConfig llama_heads_config() {
  core::StoreConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.page_tokens = 1024;
  return c;
}

// Every token of layers x seqs reads back as k, v ([H, N, D] each) hold it.
void require_tokens(const core::HostKVStore& s, const std::vector<int>& seqs, const std::vector<uint16_t>& k,
                    const std::vector<uint16_t>& v, int64_t N) {
  const auto layout = s.layout();
  const int H = s.config().num_kv_heads, D = s.config().head_dim, P = s.config().page_tokens;
  for (int layer = 0; layer < s.config().num_layers; ++layer)
    for (int seq : seqs) {
      REQUIRE(s.seq_len(layer, seq) == N);
      const auto& frames = s.frames(layer, seq);
      for (int h = 0; h < H; ++h)
        for (int64_t tok = 0; tok < N; ++tok) {
          const uint16_t* page = s.page(frames[size_t(tok / P)], h);
          REQUIRE(std::memcmp(page + layout.k_offset(tok % P), &k[size_t((h * N + tok) * D)], D * 2) == 0);
          REQUIRE(std::memcmp(page + layout.v_offset(tok % P), &v[size_t((h * N + tok) * D)], D * 2) == 0);
        }
    }
}

// Stands in for cudaHostRegister: records who pinned what (from any thread), can fail or be slow.
class RecordingPinner : public core::HostPinner {
 public:
  struct Pin {
    void* ptr;
    size_t bytes;
    std::thread::id thread;
  };
  void pin(void* ptr, size_t bytes) override {
    if (fail) throw std::runtime_error("pin failed (test)");
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms.load()));
    auto* c = static_cast<volatile char*>(ptr);  // committed memory only: a PROT_NONE page would crash here
    c[0] = c[0];
    c[bytes - 1] = c[bytes - 1];
    std::lock_guard<std::mutex> lock(mu);
    pins.push_back({ptr, bytes, std::this_thread::get_id()});
  }
  void unpin(void* ptr, size_t) override {
    std::lock_guard<std::mutex> lock(mu);
    unpinned.push_back(ptr);
  }
  int64_t pins_on(std::thread::id id, bool same) {
    std::lock_guard<std::mutex> lock(mu);
    return std::count_if(pins.begin(), pins.end(), [&](const Pin& p) { return (p.thread == id) == same; });
  }
  // Every pinned range was unpinned once.
  bool all_unpinned() {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<void*> pinned;
    for (const Pin& p : pins) pinned.push_back(p.ptr);
    std::vector<void*> un = unpinned;
    std::sort(pinned.begin(), pinned.end());
    std::sort(un.begin(), un.end());
    return pinned == un;
  }
  std::atomic<bool> fail{false};
  std::atomic<int> delay_ms{0};
  std::mutex mu;
  std::vector<Pin> pins;
  std::vector<void*> unpinned;
};

}  // namespace

TEST_CASE("tokens land block-contiguous and metadata matches a from-scratch min/max", "[store]") {
  const int H = 2, D = 64;
  const int64_t N = 1000;
  auto k = test::random_bf16(size_t(H * N * D), 1), v = test::random_bf16(size_t(H * N * D), 2);
  core::HostKVStore s(config());
  const int seq = s.add_sequence();
  // Odd chunk sizes exercise partially filled blocks at every level.
  int64_t t = 0;
  for (int64_t c : {1, 15, 17, 100, 1, 300, 566}) {
    append_range(s, 1, seq, k, v, N, t, t + c, D);
    t += c;
  }
  REQUIRE(t == N);
  REQUIRE(s.seq_len(1, seq) == N);
  REQUIRE(s.seq_len(0, seq) == 0);
  const auto layout = s.layout();
  const auto& frames = s.frames(1, seq);
  REQUIRE(frames.size() == 4);
  for (int h = 0; h < H; ++h) {
    for (int64_t tok = 0; tok < N; ++tok) {
      const uint16_t* page = s.page(frames[size_t(tok / 256)], h);
      REQUIRE(std::memcmp(page + layout.k_offset(tok % 256), &k[size_t((h * N + tok) * D)], D * 2) == 0);
      REQUIRE(std::memcmp(page + layout.v_offset(tok % 256), &v[size_t((h * N + tok) * D)], D * 2) == 0);
    }
    for (int level = 0; level < core::kNumGranularities; ++level) {
      const int g = core::kGranularities[level];
      for (int64_t j = 0; j < (N + g - 1) / g; ++j) {
        const uint16_t* row = s.page(frames[size_t(j * g / 256)], h) + layout.meta_offset(level) + ((j * g % 256) / g) * 2 * D;
        for (int d = 0; d < D; ++d) {
          float mn = INFINITY, mx = -INFINITY;
          for (int64_t tok = j * g; tok < std::min<int64_t>(N, (j + 1) * g); ++tok) {
            mn = std::min(mn, bf(k[size_t((h * N + tok) * D + d)]));
            mx = std::max(mx, bf(k[size_t((h * N + tok) * D + d)]));
          }
          REQUIRE(bf(row[d]) == mn);
          REQUIRE(bf(row[D + d]) == mx);
        }
      }
    }
  }
}

TEST_CASE("reserve then write in position order stores what a direct append stores", "[store]") {
  const int H = 2, D = 64;
  const int64_t N = 300;
  auto k = test::random_bf16(size_t(H * N * D), 3), v = test::random_bf16(size_t(H * N * D), 4);
  core::HostKVStore direct(config()), deferred(config());
  const int a = direct.add_sequence(), b = deferred.add_sequence();
  append_range(direct, 0, a, k, v, N, 0, N, D);
  append_range(deferred, 0, b, k, v, N, 0, 200, D);
  // Decode-style: each token's position is reserved a step before its data is written.
  int64_t reserved = deferred.reserve(0, {{b, 1}}).at(0);
  REQUIRE(reserved == 200);
  for (int64_t t = 200; t < N; ++t) {
    REQUIRE(deferred.seq_len(0, b) == t + 1);
    if (t + 1 < N) REQUIRE(deferred.reserve(0, {{b, 1}}).at(0) == t + 1);
    deferred.write(0, b, t, core::TokenSource{k.data() + t * D, v.data() + t * D, N * D, D, 1});
  }
  REQUIRE(deferred.seq_len(0, b) == N);
  const auto layout = direct.layout();
  for (size_t f = 0; f < direct.frames(0, a).size(); ++f)
    for (int h = 0; h < H; ++h) {
      // Whole pages compare equal: K/V units and the metadata tables of every granularity.
      const uint16_t* pa = direct.page(direct.frames(0, a)[f], h);
      const uint16_t* pb = deferred.page(deferred.frames(0, b)[f], h);
      const int64_t used = std::min<int64_t>(N - int64_t(f) * 256, 256);
      for (int64_t t = 0; t < used; ++t) {
        REQUIRE(std::memcmp(pa + layout.k_offset(t), pb + layout.k_offset(t), D * 2) == 0);
        REQUIRE(std::memcmp(pa + layout.v_offset(t), pb + layout.v_offset(t), D * 2) == 0);
      }
      for (int level = 0; level < core::kNumGranularities; ++level) {
        const int g = core::kGranularities[level];
        const int64_t rows = (used + g - 1) / g;
        REQUIRE(std::memcmp(pa + layout.meta_offset(level), pb + layout.meta_offset(level), size_t(rows * 2 * D) * 2) == 0);
      }
    }
  REQUIRE_THROWS_AS(deferred.write(0, b, N, core::TokenSource{k.data(), v.data(), N * D, D, 1}), std::invalid_argument);
}

TEST_CASE("page layout: 16-token K/V units, a block is one contiguous run, tables after the units", "[store]") {
  const int D = 128;
  core::PageLayout l{1024, D, 8};
  REQUIRE(l.unit_elems() == 2 * 16 * D);
  REQUIRE(l.meta_offset(0) == (1024 / 16) * l.unit_elems());  // the tables start right after the last unit
  REQUIRE(l.page_elems() == int64_t(1024) * D * 143 / 64);
  for (int64_t t = 0; t < 1024; ++t) {
    REQUIRE(l.k_offset(t) == (t / 16) * 32 * D + (t % 16) * D);
    REQUIRE(l.v_offset(t) == l.k_offset(t) + 16 * D);
  }
  for (int bs : core::kGranularities) {
    for (int64_t t0 = 0; t0 < 1024; t0 += bs) {
      // Every K and V row of the block's tokens lies in [block_offset, block_offset + block_elems), and the
      // next block starts where this one ends: one contiguous run, nothing else inside it.
      const int64_t lo = l.block_offset(t0), hi = lo + l.block_elems(bs);
      REQUIRE(hi - lo == 2 * bs * D);
      REQUIRE(l.block_offset(t0) == l.k_offset(t0));
      if (t0 + bs < 1024) REQUIRE(l.block_offset(t0 + bs) == hi);
      for (int64_t t = t0; t < t0 + bs; ++t) {
        REQUIRE((l.k_offset(t) >= lo && l.k_offset(t) + D <= hi));
        REQUIRE((l.v_offset(t) >= lo && l.v_offset(t) + D <= hi));
      }
    }
  }
  core::StoreConfig c;
  REQUIRE(c.page_tokens == 1024);  // the default: the block-16 table of a page is one 32 KiB run at D=128
}

TEST_CASE("accounting and frame reuse", "[store]") {
  const int D = 64;
  const int64_t N = 600;
  auto k = test::random_bf16(size_t(2 * N * D), 3);
  core::HostKVStore s(config());
  const int a = s.add_sequence();
  append_range(s, 0, a, k, k, N, 0, N, D);
  auto st = s.stats();
  REQUIRE(st.kv_bytes == N * 2 * 2 * D * 2);
  REQUIRE(st.frames_in_use == 3);
  REQUIRE(st.pinned_bytes == 0);
  REQUIRE(st.committed_bytes >= st.allocated_bytes);
  const int64_t committed = st.committed_bytes;
  s.free_sequence(a);
  REQUIRE(s.stats().kv_bytes == 0);
  const int b = s.add_sequence();
  append_range(s, 1, b, k, k, N, 0, N, D);
  REQUIRE(s.stats().committed_bytes == committed);
}

TEST_CASE("a byte cap fails before anything is written", "[store]") {
  const int D = 64;
  const int64_t N = 800;
  auto k = test::random_bf16(size_t(2 * N * D), 4);
  core::HostKVStore probe(config());
  const int64_t cap = 2 * probe.frame_bytes() + 8192;
  core::HostKVStore s(config(cap));
  const int seq = s.add_sequence();
  append_range(s, 0, seq, k, k, N, 0, 300, D);
  const auto before = s.stats();
  std::vector<uint16_t> page_copy(s.page(s.frames(0, seq)[0], 0), s.page(s.frames(0, seq)[0], 0) + s.layout().page_elems());
  REQUIRE_THROWS_AS(append_range(s, 0, seq, k, k, N, 300, N, D), core::CapacityError);
  REQUIRE(s.seq_len(0, seq) == 300);
  REQUIRE(s.stats().kv_bytes == before.kv_bytes);
  REQUIRE(s.stats().committed_bytes == before.committed_bytes);
  REQUIRE(std::equal(page_copy.begin(), page_copy.end(), s.page(s.frames(0, seq)[0], 0)));
  append_range(s, 0, seq, k, k, N, 300, 512, D);  // fits in the second frame
  REQUIRE(s.seq_len(0, seq) == 512);
}

TEST_CASE("bad configuration is rejected", "[store]") {
  auto c = config();
  c.head_dim = 96;
  REQUIRE_THROWS_AS(core::HostKVStore(c), std::invalid_argument);
  c = config();
  c.page_tokens = 100;
  REQUIRE_THROWS_AS(core::HostKVStore(c), std::invalid_argument);
  core::HostKVStore s(config());
  REQUIRE_THROWS_AS(s.seq_len(0, 3), std::out_of_range);
  REQUIRE_THROWS_AS(s.seq_len(7, 0), std::out_of_range);
}

TEST_CASE("frames_available counts what an append can still obtain", "[store]") {
  const int D = 64;
  core::HostKVStore probe(config());
  const int64_t cap = 3 * probe.frame_bytes() + 8192;
  core::HostKVStore s(config(cap));
  REQUIRE(s.frames_available() == 3);
  auto k = test::random_bf16(size_t(2 * 800 * D), 6);
  const int seq = s.add_sequence();
  append_range(s, 0, seq, k, k, 800, 0, 300, D);  // 2 frames
  REQUIRE(s.frames_available() == 1);
  REQUIRE_THROWS_AS(append_range(s, 0, seq, k, k, 800, 300, 800, D), core::CapacityError);  // needs 2 more
  s.free_sequence(seq);
  REQUIRE(s.frames_available() == 3);
}

TEST_CASE("an unpinned store faults in the next fresh frames before their first use, keeping stored data", "[store]") {
  const core::StoreConfig c = llama_heads_config();
  const int H = c.num_kv_heads, D = c.head_dim;
  const int64_t N = 2 * c.page_tokens + 5;  // crosses two page boundaries one token at a time
  auto k = test::random_bf16(size_t(H * N * D), 11), v = test::random_bf16(size_t(H * N * D), 12);
  core::HostKVStore s(c);
  const int seqs[2] = {s.add_sequence(), s.add_sequence()};
  for (int64_t t = 0; t < N; ++t)
    for (int layer = 0; layer < 2; ++layer)
      for (int seq : seqs) append_range(s, layer, seq, k, v, N, t, t + 1, D);
  const int64_t faulted = s.wait_prefaulted();

  // Every token reads back as written while the prefaulter worked beside the appends.
  require_tokens(s, {seqs[0], seqs[1]}, k, v, N);
  REQUIRE(s.frames(0, seqs[0]).size() == 3);

  // The next fresh frames, one per (sequence, layer), are resident before anything is written to them.
  int32_t fresh = 0;
  for (int layer = 0; layer < 2; ++layer)
    for (int seq : seqs)
      for (int32_t f : s.frames(layer, seq)) fresh = std::max(fresh, f + 1);
  const int64_t ahead = std::min<int64_t>(4, s.committed_frames() - fresh);
  REQUIRE(ahead > 0);
  if (!populate_supported()) {
    WARN("MADV_POPULATE_WRITE is not supported here: the store prefaults nothing");
    REQUIRE(faulted == 0);
    return;
  }
  REQUIRE(faulted >= ahead * s.frame_bytes());
  const int64_t os_page = sysconf(_SC_PAGESIZE);
  auto* begin = reinterpret_cast<char*>(s.page(fresh, 0));
  auto* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(begin) + os_page - 1) / os_page * os_page);
  const int64_t bytes = (begin + ahead * s.frame_bytes() - aligned) / os_page * os_page;
  std::vector<unsigned char> resident(size_t(bytes / os_page));
  REQUIRE(mincore(aligned, size_t(bytes), resident.data()) == 0);
  REQUIRE(std::all_of(resident.begin(), resident.end(), [](unsigned char r) { return (r & 1) != 0; }));
}

TEST_CASE("a pinned store pins its next chunk on a thread of its own before appends need it, keeping stored data",
          "[store]") {
  const core::StoreConfig c = llama_heads_config();
  const int H = c.num_kv_heads, D = c.head_dim;
  const int64_t N = 5 * c.page_tokens + 3;  // 6 frames per (sequence, layer): 24 in all, 14 in the first commit
  auto k = test::random_bf16(size_t(H * N * D), 21), v = test::random_bf16(size_t(H * N * D), 22);
  auto pinner = std::make_shared<RecordingPinner>();
  {
    core::HostKVStore s(c, pinner);
    const std::vector<int> seqs{s.add_sequence(), s.add_sequence()};
    for (int64_t t = 0; t < N; t += 256)
      for (int layer = 0; layer < 2; ++layer)
        for (int seq : seqs) append_range(s, layer, seq, k, v, N, t, std::min(N, t + 256), D);
    const int64_t ahead = s.wait_pinned_ahead();
    // The first commit was pinned by the append that made it; every later chunk on the store's own thread.
    REQUIRE(pinner->pins_on(std::this_thread::get_id(), true) == 1);
    REQUIRE(pinner->pins_on(std::this_thread::get_id(), false) >= 1);
    REQUIRE(ahead > 0);
    const auto st = s.stats();
    REQUIRE(st.pinned_bytes == st.committed_bytes);
    REQUIRE(st.committed_bytes >= st.allocated_bytes + 8 * s.frame_bytes());  // the low-water mark: 2 x live x layers
    require_tokens(s, seqs, k, v, N);
  }
  REQUIRE(pinner->all_unpinned());
}

TEST_CASE("a pinned store whose chunk failed to pin ahead grows on the append (or fails it, keeping every token) "
          "and pins ahead again once an append has pinned",
          "[store]") {
  const core::StoreConfig c = llama_heads_config();
  const int H = c.num_kv_heads, D = c.head_dim;
  const int64_t N = 6 * c.page_tokens;  // 24 frames in the end: fewer than 2 per (sequence, layer) stay free
  auto k = test::random_bf16(size_t(H * N * D), 23), v = test::random_bf16(size_t(H * N * D), 24);
  auto pinner = std::make_shared<RecordingPinner>();
  {
    core::HostKVStore s(c, pinner);
    const std::vector<int> seqs{s.add_sequence(), s.add_sequence()};
    auto append_all = [&](int64_t t0, int64_t t1) {
      for (int layer = 0; layer < 2; ++layer)
        for (int seq : seqs) append_range(s, layer, seq, k, v, N, t0, t1, D);
    };
    append_all(0, 1);      // the first commit (14 frames) pinned
    pinner->fail = true;   // from here on every pin fails, on either thread
    append_all(1, 2048);   // 8 frames in use: the chunk ahead is started, and fails
    REQUIRE(s.wait_pinned_ahead() == 0);
    const auto before = s.stats();
    REQUIRE(before.committed_bytes == before.pinned_bytes);
    // Frames 15-16 need new memory: the append pins it itself, which fails: nothing changes.
    REQUIRE_THROWS_AS(append_all(2048, 4096), std::runtime_error);
    REQUIRE(s.stats().committed_bytes == before.committed_bytes);
    REQUIRE(s.seq_len(1, seqs[1]) == 2048);
    pinner->fail = false;
    // The layers and sequences the failed call did not reach still take their tokens; the append that needs new
    // memory pins it on its own thread.
    const auto caller = std::this_thread::get_id();
    const int64_t pins_ahead = pinner->pins_on(caller, false);
    for (int layer = 0; layer < 2; ++layer)
      for (int seq : seqs)
        if (s.seq_len(layer, seq) < 4096) append_range(s, layer, seq, k, v, N, 2048, 4096, D);
    REQUIRE(s.stats().committed_bytes > before.committed_bytes);
    REQUIRE(pinner->pins_on(caller, false) == pins_ahead);
    // That pin worked: once few frames are free again, the next chunk is pinned ahead, on the thread.
    append_all(4096, N);
    REQUIRE(s.wait_pinned_ahead() > 0);
    REQUIRE(pinner->pins_on(caller, false) > pins_ahead);
    require_tokens(s, seqs, k, v, N);
  }
  REQUIRE(pinner->all_unpinned());
}

TEST_CASE("a pinned store destroyed while a chunk is being pinned ahead unpins everything", "[store]") {
  const core::StoreConfig c = llama_heads_config();
  const int H = c.num_kv_heads, D = c.head_dim;
  const int64_t N = 2048;
  auto k = test::random_bf16(size_t(H * N * D), 25);
  auto pinner = std::make_shared<RecordingPinner>();
  {
    core::HostKVStore s(c, pinner);
    const std::vector<int> seqs{s.add_sequence(), s.add_sequence()};
    pinner->delay_ms = 50;  // the chunk ahead is still being pinned when the store goes
    for (int layer = 0; layer < 2; ++layer)
      for (int seq : seqs) append_range(s, layer, seq, k, k, N, 0, N, D);
  }
  REQUIRE(pinner->pins.size() >= 1);
  REQUIRE(pinner->all_unpinned());
}
