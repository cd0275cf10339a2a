// Dense-window kernels: see window.cuh.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "core/cuda/common.cuh"
#include "core/cuda/tile_attention.cuh"
#include "core/cuda/window.cuh"

namespace fluxion::core::cuda {
namespace {

namespace cg = cooperative_groups;

__device__ __forceinline__ int64_t window_slot(int64_t p, int64_t sink, int64_t local) {
  if (p < 0) return -1;
  if (p < sink) return p;
  if (local <= 0) return -1;
  return sink + (p - sink) % local;
}

__global__ void append_winner_kernel(const int32_t* positions, int64_t B, int64_t T, int64_t W, int64_t sink,
                                     int32_t* winner) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * T) return;
  const int64_t b = e / T, t = e % T;
  const int64_t slot = window_slot(positions[e], sink, W - sink);
  if (slot >= 0) atomicMax(winner + b * W + slot, int32_t(t));
}

// One thread per 16-byte chunk of a (b, kv_head, t) row, K and V.
__global__ void append_copy_kernel(const WindowAppendParams p, const int32_t* winner, int64_t chunks_per_row) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t T = p.num_tokens, H = p.num_kv_heads, W = p.window;
  const int64_t rows = int64_t(p.batch) * H * T;
  if (e >= rows * chunks_per_row) return;
  const int64_t row = e / chunks_per_row, c = e % chunks_per_row;
  const int64_t t = row % T, bh = row / T, b = bh / H;
  const int64_t slot = window_slot(p.positions[b * T + t], p.sink, W - p.sink);
  if (slot < 0) return;
  if (winner && winner[b * W + slot] != int32_t(t)) return;
  const int64_t src = row * chunks_per_row + c;
  const int64_t dst = (bh * W + slot) * chunks_per_row + c;
  reinterpret_cast<uint4*>(p.k_win)[dst] = reinterpret_cast<const uint4*>(p.k)[src];
  reinterpret_cast<uint4*>(p.v_win)[dst] = reinterpret_cast<const uint4*>(p.v)[src];
}

constexpr int kMaxRanks = 8;  // portable cluster size

struct WinArgs {
  WindowAttentionParams p;
  int32_t slices;
  int64_t chunk;  // slots per cluster rank, a multiple of 16
};

template <typename T, int D, int HG>
__global__ void __launch_bounds__(128) window_tile_kernel(const WinArgs a) {
  using TA = TileAttention<T, D, HG>;
  __shared__ typename TA::Smem sm;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = int(cluster.block_rank());
  const int nranks = int(cluster.num_blocks());
  const WindowAttentionParams& p = a.p;
  const int slice = int(blockIdx.y % a.slices);
  const int64_t bk = blockIdx.y / a.slices;
  const int b = int(bk / p.num_kv_heads), kvh = int(bk % p.num_kv_heads);
  const int G = p.num_q_heads / p.num_kv_heads, h0 = slice * HG;
  const int nh = G - h0 < HG ? G - h0 : HG;
  const int64_t W = p.window, sink = p.sink, local = W - sink;
  const int64_t n = p.seq_lens[b] > 0 ? p.seq_lens[b] : 0;
  const int64_t nsink = n < sink ? n : sink;
  const int64_t nring = std::min<int64_t>(std::max<int64_t>(n - sink, 0), local);

  TA ta;
  ta.init(sm);
  const int64_t s_lo = int64_t(rank) * a.chunk;
  const int64_t s_hi = std::min<int64_t>(W, s_lo + a.chunk);
  const int64_t ntiles = s_hi > s_lo ? ceil_div(s_hi - s_lo, TA::TT) : 0;
  const int64_t kv_base = (int64_t(b) * p.num_kv_heads + kvh) * W * D;
  const T* kw = static_cast<const T*>(p.k_win) + kv_base;
  const T* vw = static_cast<const T*>(p.v_win) + kv_base;
  const uint32_t heads = (1u << nh) - 1u;

  // Valid slots of the tile at slot0: [0, nsink) U [sink, sink + nring), restricted to this rank's range.
  auto tok_mask = [&](int64_t slot0, int rows) {
    uint32_t m = 0u;
    auto add = [&](int64_t lo, int64_t hi) {
      lo = std::max<int64_t>(lo - slot0, 0);
      hi = std::min<int64_t>(hi - slot0, rows);
      if (hi > lo) m |= (hi - lo >= 32 ? 0xffffffffu : ((1u << (hi - lo)) - 1u)) << lo;
    };
    add(0, nsink);
    add(sink, sink + nring);
    return m;
  };
  auto rows_of = [&](int64_t t) { return int(std::min<int64_t>(TA::TT, s_hi - (s_lo + t * TA::TT))); };
  auto issue = [&](int64_t t) {
    if (t < ntiles) {
      const int64_t slot0 = s_lo + t * TA::TT;
      const int rows = rows_of(t);
      if (tok_mask(slot0, rows)) ta.issue(sm, int(t % TA::NST), kw + slot0 * D, vw + slot0 * D, rows);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < TA::NST - 1; ++s) issue(s);
  ta.load_q(sm, static_cast<const T*>(p.q) + (int64_t(b) * p.num_q_heads + int64_t(kvh) * G + h0) * D, nh);
  for (int64_t t = 0; t < ntiles; ++t) {
    cp_async_wait<TA::NST - 2>();
    __syncthreads();
    issue(t + TA::NST - 1);
    const uint32_t m = tok_mask(s_lo + t * TA::TT, rows_of(t));
    if (m) ta.compute(sm, int(t % TA::NST), m, heads, p.scale);
  }
  cp_async_wait<0>();
  ta.finish(sm, &sm.o[0][0], sm.lse, nh);

  cluster.sync();  // every rank's partial state is in its shared memory
  // The ranks share the merge: element i of the slice's [nh, D] output goes to rank i / blockDim.x %
  // nranks; all remote loads of an element are issued together (one DSMEM round trip, not nranks).
  for (int i = rank * int(blockDim.x) + int(threadIdx.x); i < nh * D; i += nranks * int(blockDim.x)) {
    const int h = i / D, d = i % D;
    float l[kMaxRanks], o[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      l[r] = r < nranks ? *cluster.map_shared_rank(&sm.lse[h], r) : -INFINITY;
      o[r] = r < nranks ? *cluster.map_shared_rank(&sm.o[h][d], r) : 0.f;
    }
    float m = -INFINITY;
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) m = fmaxf(m, l[r]);
    const int64_t row = int64_t(b) * p.num_q_heads + int64_t(kvh) * G + h0 + h;
    if (m == -INFINITY) {
      p.out[row * D + d] = 0.f;
      if (d == 0) p.lse[row] = -INFINITY;
      continue;
    }
    float total = 0.f, acc = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const float w = l[r] == -INFINITY ? 0.f : expf(l[r] - m);
      total += w;
      acc += w * o[r];
    }
    p.out[row * D + d] = acc / total;
    if (d == 0) p.lse[row] = m + logf(total);
  }
  cluster.sync();  // keep every rank's shared memory alive until all ranks have read it
}

// ---------------------------------------------------------------------------------------------------------
// mma kernel. Fragment layouts of mma.sync m16n8k16 (g = lane / 4, c = lane % 4; a pair of elements packs the
// lower index in the low half): A (16 x 16) a0 = (row g, cols 2c, 2c+1), a1 = (row g+8, cols 2c, 2c+1),
// a2 = (row g, cols 2c+8, 2c+9), a3 = (row g+8, cols 2c+8, 2c+9); B (16 x 8) b0 = (rows 2c, 2c+1, col g),
// b1 = (rows 2c+8, 2c+9, col g); C (16 x 8) c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g+8, same cols).
//
// Per 16-token tile: S^T = K Q^T with A = K (rows = the tile's 16 keys) and B = Q^T (cols = the slice's <= 8
// heads), then O^T += V^T P^T with A = V^T (rows = 16 dims, cols = the 16 keys) and B = P^T. A dot product
// does not care in which order the dimensions are summed, so for S each lane takes the 16-byte chunks
// 4j + c of its two key rows and its query row (fully coalesced loads, no shuffling), and for O the chunks
// 8j + g of its four V rows; the dims an O^T row stands for follow from that and only matter when the
// result is written out. Pairing two keys' elements for the A operand of V^T is one byte permute per
// register; S^T's C fragment (lane: keys g, g+8 x heads 2c, 2c+1) becomes P^T's B fragment (lane: head g x
// keys 2c.. ) by one 8x8 transpose (movmatrix) per register, and O^T's columns are heads 2c, 2c+1 again, so
// the softmax state of a lane's two heads never moves between lanes.

constexpr int kMmaTile = 16;      // tokens per warp tile
constexpr int kMmaMaxWarps = 12;  // warps per CTA: at D = 128 a thread holds ~166 registers (K, V, q, O)
constexpr size_t kMmaSmemBytes = 48 * 1024;  // without opting in to more

struct MmaArgs {
  WindowAttentionParams p;
  int32_t group, slices;  // Hq / Hkv, ceil(group / 8)
  int32_t tiles_per_rank, tiles_per_warp;
};

// Shared memory (floats): per warp its unnormalised output [nh][D], then per warp max and sum [8] each (log2
// units); with a cluster, then every rank's normalised output [ranks][nh][D] and lse [ranks][8] (log2), which
// the ranks store into rank 0's copy.
constexpr size_t mma_smem_floats(int warps, int nh, int D, int ranks) {
  return size_t(warps) * (size_t(nh) * D + 16) + (ranks > 1 ? size_t(ranks) * (size_t(nh) * D + 8) : 0);
}

// Cluster barrier halves (all threads of every CTA, warp-uniform). arrive.relaxed + wait at the start only
// guarantees that every CTA of the cluster runs (so its shared memory may be written); release / acquire
// order the stores into rank 0 before its reads.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (x, y) -> hi = both rounded to T, lo = T of what rounding left out: hi + lo carries ~16 mantissa bits, so
// the probabilities lose nothing that matters against fp32 (one extra MMA per m-tile; they are not the cost).
template <typename T>
__device__ __forceinline__ void split_pair(float x, float y, uint32_t& hi, uint32_t& lo);
template <>
__device__ __forceinline__ void split_pair<__nv_bfloat16>(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
  memcpy(&hi, &h, 4);
  memcpy(&lo, &l, 4);
}
template <>
__device__ __forceinline__ void split_pair<__half>(float x, float y, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(x, y);
  const float2 hf = __half22float2(h);
  const __half2 l = __floats2half2_rn(x - hf.x, y - hf.y);
  memcpy(&hi, &h, 4);
  memcpy(&lo, &l, 4);
}

// 2^x in one MUFU.EX2 (exp2f compiles to a range-checked sequence with branches); 2^-inf = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 8x8 transpose of 16-bit elements across the warp (lane: row lane / 4, cols 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ void unpack4(const uint4& x, uint32_t* w) {
  w[0] = x.x;
  w[1] = x.y;
  w[2] = x.z;
  w[3] = x.w;
}

// Grid (ranks, Hkv * slices, B); a cluster spans the ranks when there is more than one. Rank r owns tiles
// [r * tiles_per_rank, ...), its warp w the next tiles_per_warp of them (usually one).
template <typename T, int D>
__global__ void __launch_bounds__(kMmaMaxWarps * 32) window_mma_kernel(const MmaArgs a) {
  constexpr int KC = D / 32;  // 16-byte chunks of a K row per lane: chunks 4j + c
  constexpr int VC = D / 64;  // 16-byte chunks of a V row per lane: chunks 8j + g
  constexpr int KS = D / 16;  // k-steps of Q K^T; also the m-tiles (16 dims each) of V^T P^T
  extern __shared__ float4 smem4[];
  const WindowAttentionParams& p = a.p;
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, nw = int(blockDim.x) >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int rank = int(blockIdx.x), nranks = int(gridDim.x);
  const int b = int(blockIdx.z), G = a.group;
  // The K/V addresses wait on these: no integer division in the common case of one slice.
  const int kvh = a.slices == 1 ? int(blockIdx.y) : int(blockIdx.y) / a.slices;
  const int h0 = (int(blockIdx.y) - kvh * a.slices) * 8;
  const int nh = G - h0 < 8 ? G - h0 : 8;
  const int W = int(p.window), sink = int(p.sink);  // the host checks W < 2^31
  const int r_lo = rank * a.tiles_per_rank;
  const int t_lo = r_lo + warp * a.tiles_per_warp;
  const int t_hi = std::min(std::min(int(ceil_div(W, kMmaTile)), r_lo + a.tiles_per_rank), t_lo + a.tiles_per_warp);
  const int64_t kv_base = (int64_t(b) * p.num_kv_heads + kvh) * W * D;
  const T* kw = static_cast<const T*>(p.k_win) + kv_base;
  const T* vw = static_cast<const T*>(p.v_win) + kv_base;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if (nranks > 1) cluster_arrive_relaxed();  // waited on before the first store into rank 0

  // Tile t, this lane: K rows (and scores) = slots 16t + g and 16t + 8 + g; V rows = slots
  // 16t + 8 (k / 2) + 2c + k % 2, k < 4. Slots past the window load as zeros.
  uint32_t kr[2][4 * KC], vr[4][4 * VC];
  auto load_k = [&](int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int slot = t * kMmaTile + 8 * r + g;
      const T* src = kw + int64_t(slot) * D + 8 * c;
#pragma unroll
      for (int j = 0; j < KC; ++j) unpack4(slot < W ? load16_cg(src + 32 * j) : zero, &kr[r][4 * j]);
    }
  };
  auto load_v = [&](int t) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int slot = t * kMmaTile + 8 * (k >> 1) + 2 * c + (k & 1);
      const T* src = vw + int64_t(slot) * D + 8 * g;
#pragma unroll
      for (int j = 0; j < VC; ++j) unpack4(slot < W ? load16_cg(src + 64 * j) : zero, &vr[k][4 * j]);
    }
  };
  // K/V first: nothing they need waits on another load, so their latency overlaps that of q and seq_lens.
  if (t_lo < t_hi) {
    load_k(t_lo);
    load_v(t_lo);
  }
  uint32_t qr[4 * KC];  // col g of the B operand Q^T: head h0 + g (zero past the slice), chunks 4j + c
  {
    const int64_t row = int64_t(b) * p.num_q_heads + int64_t(kvh) * G + h0 + g;
    const T* q = static_cast<const T*>(p.q) + row * D + 8 * c;
#pragma unroll
    for (int j = 0; j < KC; ++j) unpack4(g < nh ? load16_cg(q + 32 * j) : zero, &qr[4 * j]);
  }
  const int n = p.seq_lens[b] > 0 ? p.seq_lens[b] : 0;
  const int nsink = std::min(n, sink);
  const int ring_hi = sink + std::min(std::max(n - sink, 0), W - sink);
  auto valid = [&](int slot) { return slot < nsink || (slot >= sink && slot < ring_hi); };

  const float qscale = p.scale * 1.4426950408889634f;  // scores in log2 units: ex2 below
  // Softmax state of heads 2c + e: running max (the same in all 8 lanes of column c) and this lane's sum.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float acc[KS][4];  // O^T m-tiles: acc[i][e] and acc[i][e + 2] belong to head 2c + e
#pragma unroll
  for (int i = 0; i < KS; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

#pragma unroll 1
  for (int t = t_lo; t < t_hi; ++t) {
    // s2[.][0, 1]: key g, heads 2c, 2c+1; s2[.][2, 3]: key g + 8. Two accumulators halve the MMA chain.
    float s2[2][4] = {};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
      mma16816<T>(s2[ks & 1], kr[0][2 * ks], kr[1][2 * ks], kr[0][2 * ks + 1], kr[1][2 * ks + 1], qr[2 * ks],
                  qr[2 * ks + 1]);
    if (t + 1 < t_hi) load_k(t + 1);  // the next keys are in flight while this tile finishes
    const int slot0 = t * kMmaTile;
    const bool full = slot0 + kMmaTile <= nsink || (slot0 >= sink && slot0 + kMmaTile <= ring_hi);  // warp-uniform
    const bool key_ok[2] = {full || valid(slot0 + g), full || valid(slot0 + 8 + g)};
    float sc[4], alpha[2], pk[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      sc[k] = key_ok[k >> 1] && 2 * c + (k & 1) < nh ? (s2[0][k] + s2[1][k]) * qscale : -INFINITY;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float mx = fmaxf(sc[e], sc[e + 2]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m_run[e], mx);
      const bool none = m_new == -INFINITY;
      alpha[e] = none ? 1.f : ex2(m_run[e] - m_new);
      pk[e] = none ? 0.f : ex2(sc[e] - m_new);
      pk[e + 2] = none ? 0.f : ex2(sc[e + 2] - m_new);
      l_run[e] = l_run[e] * alpha[e] + pk[e] + pk[e + 2];
      m_run[e] = m_new;
    }
    // P^T's B fragment, in a high and a low half: rows = keys 2c, 2c+1 (b0) and 2c+8, 2c+9 (b1), col = head g.
    uint32_t top_hi, top_lo, bot_hi, bot_lo;
    split_pair<T>(pk[0], pk[1], top_hi, top_lo);
    split_pair<T>(pk[2], pk[3], bot_hi, bot_lo);
    const uint32_t b0_hi = transpose8x8(top_hi), b1_hi = transpose8x8(bot_hi);
    const uint32_t b0_lo = transpose8x8(top_lo), b1_lo = transpose8x8(bot_lo);
    if (!full) {  // p == 0 times NaN garbage of an unwritten slot would still be NaN: zero those V rows
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool ok = valid(slot0 + 8 * (k >> 1) + 2 * c + (k & 1));
#pragma unroll
        for (int w = 0; w < 4 * VC; ++w) vr[k][w] = ok ? vr[k][w] : 0u;
      }
    }
#pragma unroll
    for (int i = 0; i < KS; ++i) {
      acc[i][0] *= alpha[0];
      acc[i][1] *= alpha[1];
      acc[i][2] *= alpha[0];
      acc[i][3] *= alpha[1];
      // Word i of the lane's V rows: the dims of A rows g (low halves) and g + 8 (high halves).
      const uint32_t a0 = __byte_perm(vr[0][i], vr[1][i], 0x5410), a1 = __byte_perm(vr[0][i], vr[1][i], 0x7632);
      const uint32_t a2 = __byte_perm(vr[2][i], vr[3][i], 0x5410), a3 = __byte_perm(vr[2][i], vr[3][i], 0x7632);
      mma16816<T>(acc[i], a0, a1, a2, a3, b0_hi, b1_hi);
      mma16816<T>(acc[i], a0, a1, a2, a3, b0_lo, b1_lo);
    }
    if (t + 1 < t_hi) load_v(t + 1);
  }

  // The warp's state -> shared memory. Word i of V chunk j stands for dims 64j + 8g + 2(i % 4) (acc[i][e])
  // and that + 1 (acc[i][e + 2]), i = 4j + i % 4: 8 consecutive dims per (head, j).
  float* const so = reinterpret_cast<float*>(smem4);  // [nw][nh][D]
  float* const sm = so + nw * nh * D;                 // [nw][8]
  float* const sl = sm + nw * 8;                      // [nw][8]
  float* const recv = sl + nw * 8;                    // [nranks][nh][D], then [nranks][8]
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = l_run[e];
    l += __shfl_xor_sync(0xffffffffu, l, 4);
    l += __shfl_xor_sync(0xffffffffu, l, 8);
    l += __shfl_xor_sync(0xffffffffu, l, 16);
    if (2 * c + e < nh) {
      if (g == 0) {
        sm[warp * 8 + 2 * c + e] = m_run[e];
        sl[warp * 8 + 2 * c + e] = l;
      }
      float* dst = so + (warp * nh + 2 * c + e) * D + 8 * g;
#pragma unroll
      for (int j = 0; j < VC; ++j) {
        float4* d4 = reinterpret_cast<float4*>(dst + 64 * j);
        d4[0] = make_float4(acc[4 * j][e], acc[4 * j][e + 2], acc[4 * j + 1][e], acc[4 * j + 1][e + 2]);
        d4[1] = make_float4(acc[4 * j + 2][e], acc[4 * j + 2][e + 2], acc[4 * j + 3][e], acc[4 * j + 3][e + 2]);
      }
    }
  }
  __syncthreads();

  // Merge the warps: element i = (head h, dim d). With one rank the result is final; otherwise every rank
  // stores its normalised output and lse into rank 0's shared memory (no round trip, and only rank 0 has to
  // stay resident for the final merge).
  constexpr float kLn2 = 0.6931471805599453f;
  const int64_t row0 = int64_t(b) * p.num_q_heads + int64_t(kvh) * G + h0;
  cg::cluster_group cluster = cg::this_cluster();
  float* const recv0 = nranks > 1 ? cluster.map_shared_rank(recv, 0) : recv;
  if (nranks > 1) cluster_wait();
  for (int i = int(threadIdx.x); i < nh * D; i += int(blockDim.x)) {
    const int h = i / D, d = i % D;
    float m = -INFINITY;
    for (int w = 0; w < nw; ++w) m = fmaxf(m, sm[w * 8 + h]);
    float l = 0.f, o = 0.f;
    if (m != -INFINITY) {
      for (int w = 0; w < nw; ++w) {
        const float f = ex2(sm[w * 8 + h] - m);
        l += f * sl[w * 8 + h];
        o += f * so[(w * nh + h) * D + d];
      }
      o /= l;
    }
    const float lse2 = m == -INFINITY ? -INFINITY : m + log2f(l);
    if (nranks == 1) {
      p.out[(row0 + h) * D + d] = o;
      if (d == 0) p.lse[row0 + h] = lse2 * kLn2;
    } else {
      recv0[rank * nh * D + i] = o;
      if (d == 0) recv0[nranks * nh * D + rank * 8 + h] = lse2;
    }
  }
  if (nranks == 1) return;
  cluster_arrive_release();
  if (rank != 0) return;  // nothing reads this CTA's shared memory
  cluster_wait();

  // Rank 0: per head, the weight of each rank's output (in `so`: this CTA's warps are done with it), then
  // out = sum of weighted outputs, four dims per thread.
  const float* lse_r = recv + nranks * nh * D;
  float* const wts = so;  // [nranks][8]
  if (int(threadIdx.x) < nh) {
    const int h = int(threadIdx.x);
    float m = -INFINITY;
    for (int r = 0; r < nranks; ++r) m = fmaxf(m, lse_r[r * 8 + h]);
    float total = 0.f;
    if (m != -INFINITY)
      for (int r = 0; r < nranks; ++r) total += ex2(lse_r[r * 8 + h] - m);  // 0 for empty ranks
    for (int r = 0; r < nranks; ++r) wts[r * 8 + h] = m == -INFINITY ? 0.f : ex2(lse_r[r * 8 + h] - m) / total;
    p.lse[row0 + h] = m == -INFINITY ? -INFINITY : (m + log2f(total)) * kLn2;
  }
  __syncthreads();
  const float4* recv4 = reinterpret_cast<const float4*>(recv);
  float4* out4 = reinterpret_cast<float4*>(p.out + row0 * D);
  for (int i = int(threadIdx.x); i < nh * D / 4; i += int(blockDim.x)) {
    const int h = 4 * i / D;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int r = 0; r < nranks; ++r) {
      const float w = wts[r * 8 + h];
      const float4 x = recv4[r * nh * D / 4 + i];
      o.x = fmaf(w, x.x, o.x);
      o.y = fmaf(w, x.y, o.y);
      o.z = fmaf(w, x.z, o.z);
      o.w = fmaf(w, x.w, o.w);
    }
    out4[i] = o;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

template <typename F>
cudaError_t dispatch_td(DType dt, int D, F&& f) {
  if (dt == DType::kBFloat16) {
    if (D == 128) return f(__nv_bfloat16{}, std::integral_constant<int, 128>{});
    if (D == 64) return f(__nv_bfloat16{}, std::integral_constant<int, 64>{});
  } else if (dt == DType::kFloat16) {
    if (D == 128) return f(__half{}, std::integral_constant<int, 128>{});
    if (D == 64) return f(__half{}, std::integral_constant<int, 64>{});
  }
  return cudaErrorInvalidValue;
}

template <typename Args>
cudaError_t launch(void (*kernel)(Args), const Args& args, dim3 grid, dim3 block, size_t smem, bool cluster,
                   cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = grid.x;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args);
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t launch_tile(const WindowAttentionParams& p, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  // All heads of the group share a CTA (up to 8): on H200 at W=320, 2 heads per CTA (twice the CTAs, half
  // the work per tile) measured 8.9 us per call against 8.0 us for 4 (CUDA-graph replay).
  const int hg = heads_per_slice(G);
  const int slices = int(ceil_div(G, hg));
  // Up to 8 ranks (the portable cluster size), at least 32 slots each.
  const int64_t W = std::max<int64_t>(p.window, 1);
  int64_t ranks = std::clamp<int64_t>(ceil_div(W, 32), 1, kMaxRanks);
  const int64_t chunk = round_up(ceil_div(W, ranks), 16);
  ranks = ceil_div(W, chunk);
  const int64_t gy = int64_t(p.batch) * p.num_kv_heads * slices;
  if (gy > 65535) return cudaErrorInvalidValue;
  const WinArgs args{p, slices, chunk};
  return dispatch_td(p.dtype, p.head_dim, [&](auto t, auto d) -> cudaError_t {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    void (*k)(WinArgs) = hg == 1   ? window_tile_kernel<T, D, 1>
                         : hg == 2 ? window_tile_kernel<T, D, 2>
                         : hg == 4 ? window_tile_kernel<T, D, 4>
                                   : window_tile_kernel<T, D, 8>;
    // Always a cluster, even of one CTA: the kernel syncs and maps through it.
    return launch(k, args, dim3(unsigned(ranks), unsigned(gy), 1), dim3(128, 1, 1), 0, true, stream);
  });
}

// ranks_req: 0 = heuristic. A warp gets one tile when kMmaMaxWarps warps (and 48 KiB) allow it, else a few.
cudaError_t launch_mma(const WindowAttentionParams& p, int ranks_req, cudaStream_t stream) {
  const int G = p.num_q_heads / p.num_kv_heads;
  const int slices = int(ceil_div(G, 8)), hs = std::min(G, 8);
  const int64_t units = int64_t(p.batch) * p.num_kv_heads * slices;
  if (p.batch > 65535 || int64_t(p.num_kv_heads) * slices > 65535) return cudaErrorInvalidValue;
  if (p.window > INT32_MAX - kMmaTile) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(p.window, kMmaTile);
  // Heuristic ranks: split each unit until the grid has about one CTA per multiprocessor (a grid that fills
  // the GPU on its own gets no cluster at all).
  const int64_t sms = p.num_sms > 0 ? p.num_sms : 132;
  int64_t ranks = ranks_req > 0 ? ranks_req : (units >= sms ? 1 : ceil_div(sms, units));
  ranks = std::clamp<int64_t>(ranks, 1, std::clamp<int64_t>(tiles, 1, kMaxRanks));
  const int64_t recv = ranks > 1 ? ranks * (int64_t(hs) * p.head_dim + 8) : 0;  // floats, see mma_smem_floats
  const int64_t max_warps = std::min<int64_t>(
      kMmaMaxWarps, (int64_t(kMmaSmemBytes / sizeof(float)) - recv) / (int64_t(hs) * p.head_dim + 16));
  const int64_t per_rank = std::max<int64_t>(ceil_div(tiles, ranks), 1);
  const int64_t per_warp = ceil_div(per_rank, max_warps);
  const int64_t warps = ceil_div(per_rank, per_warp);
  ranks = std::max<int64_t>(ceil_div(tiles, per_rank), 1);
  const MmaArgs args{p, G, slices, int32_t(per_rank), int32_t(per_warp)};
  const size_t smem = mma_smem_floats(int(warps), hs, p.head_dim, int(ranks)) * sizeof(float);
  return dispatch_td(p.dtype, p.head_dim, [&](auto t, auto d) -> cudaError_t {
    return launch(window_mma_kernel<decltype(t), decltype(d)::value>, args,
                  dim3(unsigned(ranks), unsigned(p.num_kv_heads * slices), unsigned(p.batch)),
                  dim3(unsigned(warps) * 32, 1, 1), smem, ranks > 1, stream);
  });
}

// Kernel choice: kind * 16 + ranks (mma only; 0 = heuristic).
enum Kind : int { kAuto = 0, kTile = 1, kMma = 2 };
// What "auto" runs: the kernel measured fastest on the H200 (BENCHMARKS.md, dense window): mma with clusters
// of 2 CTAs per head slice (W 320, 32/8 heads, 20 calls per graph: 6.3 us at batch 1 and 6.6 us at batch 4,
// against SDPA's 6.7 / 6.8 us, the heuristic rank count's 6.8 / 7.4 us and the tile kernel's 8.0 us).
constexpr int kAutoKernel = kMma;
constexpr int kAutoRanks = 2;

bool parse_kernel(const std::string& s, int& out) {
  if (s == "auto") return out = kAuto * 16, true;
  if (s == "tile") return out = kTile * 16, true;
  if (s == "mma") return out = kMma * 16, true;
  if (s.size() == 5 && s.compare(0, 4, "mma:") == 0 && s[4] >= '1' && s[4] <= '0' + kMaxRanks)
    return out = kMma * 16 + (s[4] - '0'), true;
  return false;
}

std::atomic<int>& kernel_setting() {
  static std::atomic<int> setting{[] {
    int v = kAuto * 16;
    const char* env = std::getenv("FLUXION_WINDOW_KERNEL");
    if (env != nullptr && !parse_kernel(env, v)) v = kAuto * 16;
    return v;
  }()};
  return setting;
}

}  // namespace

size_t window_append_workspace_bytes(const WindowAppendParams& p) {
  return p.num_tokens > 1 ? size_t(std::max<int64_t>(int64_t(p.batch) * p.window, 0)) * sizeof(int32_t) : 0;
}

cudaError_t window_append(const WindowAppendParams& p, void* workspace, cudaStream_t stream) {
  const int64_t row_bytes = int64_t(p.head_dim) * p.elem_bytes;
  if (row_bytes % 16 != 0 || p.sink < 0 || p.sink > p.window) return cudaErrorInvalidValue;
  const int64_t rows = int64_t(p.batch) * p.num_kv_heads * p.num_tokens;
  if (rows <= 0 || p.window <= 0 || row_bytes == 0) return cudaSuccess;
  int32_t* winner = nullptr;
  if (p.num_tokens > 1) {
    winner = static_cast<int32_t*>(workspace);
    cudaError_t err = cudaMemsetAsync(winner, 0xff, window_append_workspace_bytes(p), stream);  // -1
    if (err != cudaSuccess) return err;
    const int64_t n = int64_t(p.batch) * p.num_tokens;
    append_winner_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, stream>>>(p.positions, p.batch, p.num_tokens,
                                                                          p.window, p.sink, winner);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const int64_t cpr = row_bytes / 16;
  append_copy_kernel<<<unsigned(ceil_div(rows * cpr, 256)), 256, 0, stream>>>(p, winner, cpr);
  return cudaGetLastError();
}

size_t window_attention_workspace_bytes(const WindowAttentionParams&) { return 0; }

cudaError_t window_attention(const WindowAttentionParams& p, void*, cudaStream_t stream) {
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) return cudaErrorInvalidValue;
  const int G = p.num_q_heads / p.num_kv_heads;
  if (G < 1 || G > 64 || (p.head_dim != 64 && p.head_dim != 128) || p.sink < 0 || p.sink > p.window)
    return cudaErrorInvalidValue;
  if (p.batch <= 0) return cudaSuccess;
  const int k = kernel_setting().load(std::memory_order_relaxed);
  if (k / 16 == kAuto) return kAutoKernel == kTile ? launch_tile(p, stream) : launch_mma(p, kAutoRanks, stream);
  if (k / 16 == kTile) return launch_tile(p, stream);
  return launch_mma(p, k % 16, stream);  // mma: 0 ranks = the heuristic
}

bool set_window_kernel(const std::string& spec) {
  int v = 0;
  if (!parse_kernel(spec, v)) return false;
  kernel_setting().store(v, std::memory_order_relaxed);
  return true;
}

std::string window_kernel() {
  const int v = kernel_setting().load(std::memory_order_relaxed);
  switch (v / 16) {
    case kTile: return "tile";
    case kMma: return v % 16 ? "mma:" + std::to_string(v % 16) : "mma";
    default: return "auto";
  }
}

}  // namespace fluxion::core::cuda
