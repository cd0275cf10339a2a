// Dense-window kernels: see window.cuh.
#include <cooperative_groups.h>

#include <algorithm>

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
__global__ void __launch_bounds__(128) window_attention_kernel(const WinArgs a) {
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

template <typename F>
cudaError_t dispatch_window(DType dt, int D, int hg, F&& f) {
  auto with_hg = [&](auto t, auto d) -> cudaError_t {
    switch (hg) {
      case 1: return f(t, d, std::integral_constant<int, 1>{});
      case 2: return f(t, d, std::integral_constant<int, 2>{});
      case 4: return f(t, d, std::integral_constant<int, 4>{});
      case 8: return f(t, d, std::integral_constant<int, 8>{});
      default: return cudaErrorInvalidValue;
    }
  };
  if (dt == DType::kBFloat16) {
    if (D == 128) return with_hg(__nv_bfloat16{}, std::integral_constant<int, 128>{});
    if (D == 64) return with_hg(__nv_bfloat16{}, std::integral_constant<int, 64>{});
  } else if (dt == DType::kFloat16) {
    if (D == 128) return with_hg(__half{}, std::integral_constant<int, 128>{});
    if (D == 64) return with_hg(__half{}, std::integral_constant<int, 64>{});
  }
  return cudaErrorInvalidValue;
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
  WinArgs args{p, slices, chunk};
  return dispatch_window(p.dtype, p.head_dim, hg, [&](auto t, auto d, auto h) -> cudaError_t {
    using T = decltype(t);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(unsigned(ranks), unsigned(gy), 1);
    cfg.blockDim = dim3(128, 1, 1);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = unsigned(ranks);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaError_t err = cudaLaunchKernelEx(&cfg, window_attention_kernel<T, decltype(d)::value, decltype(h)::value>, args);
    if (err != cudaSuccess) return err;
    return cudaGetLastError();
  });
}

}  // namespace fluxion::core::cuda
