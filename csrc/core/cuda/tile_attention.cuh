// Flash-decoding building block shared by the sparse/retrieval attention and the window attention
// kernels: the online-softmax state of HG query heads (one KV head) folded over tiles of 16 tokens staged
// in shared memory, either through registers (load_regs/store_regs: host-mapped memory) or by cp.async
// (issue: device memory, up to NST stages). One CTA of 128 threads. Device-only.
//
// Per tile: (A) scores s[h][t] = scale * q_h . k_t, one dot product per thread group; (B) per head the
// running max / sum update (natural-log domain, expf); (C) acc[h] = acc[h] * alpha + sum_t p[h][t] v_t.
// Masked tokens never touch V (p == 0 is skipped), so garbage or NaN rows in unfilled page slots are
// harmless.
#pragma once
#include "core/cuda/common.cuh"

namespace fluxion::core::cuda {

template <typename T, int D, int HG>
struct TileAttention {
  static constexpr int NT = 128;           // threads per CTA
  static constexpr int TT = 16;            // tokens per tile
  static constexpr int ROW = D + 8;        // smem row stride (elements): +16 B keeps row reads conflict-free
  static constexpr int NST = 4;            // cp.async stages (the register path uses two of them)
  static constexpr int TILE = 2 * TT * ROW;  // K rows then V rows
  static constexpr int CH = D / 8;         // 16-byte chunks per row
  // Phase A: HG*TT dot products, TPD threads each.
  static constexpr int NDOT = HG * TT;
  static constexpr int TPD = NT / NDOT;
  static constexpr int DPT = D / TPD;
  // Phase C: (head, 8-dim chunk) pairs, TPP threads each splitting the tile's tokens.
  static constexpr int NPAIR = HG * CH;
  static constexpr int TPP = NT / NPAIR;
  static_assert(HG == 1 || HG == 2 || HG == 4 || HG == 8, "HG");
  static_assert(D == 64 || D == 128, "D");
  static_assert(NDOT * TPD == NT && DPT % 8 == 0, "phase A mapping");
  static_assert(NPAIR * TPP == NT && TPP <= TT, "phase C mapping");

  struct Smem {
    alignas(16) T tiles[NST][TILE];
    alignas(16) float q[HG][D];
    float s[HG][TT];  // scores, then probabilities
    float m[HG], l[HG], alpha[HG];
    // Final normalised state (window kernel: read by the other ranks of the cluster through DSMEM).
    alignas(16) float o[HG][D];
    float lse[HG];
  };

  float acc[8];

  // Empty state. Call load_q too, after the first tile loads are issued (its global loads then overlap
  // theirs instead of delaying them); both are visible to compute() after the pipeline's first barrier.
  __device__ __forceinline__ void init(Smem& sm) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    if (int(threadIdx.x) < HG) {
      sm.m[threadIdx.x] = -INFINITY;
      sm.l[threadIdx.x] = 0.f;
      sm.alpha[threadIdx.x] = 1.f;
    }
  }

  // q of the slice's nh real heads (q_src: head 0 of the slice, [nh, D]); the other HG slots stay zero and
  // are masked.
  __device__ __forceinline__ void load_q(Smem& sm, const T* q_src, int nh) {
    for (int i = threadIdx.x; i < HG * D; i += NT) {
      const int h = i / D;
      sm.q[h][i % D] = h < nh ? to_float<T>(q_src[i]) : 0.f;
    }
  }

  // 16-byte chunks of one tile (K and V) each thread moves.
  static constexpr int PT = 2 * TT * CH / NT;
  static_assert(PT * NT == 2 * TT * CH, "tile chunks per thread");

  // Register path for host-mapped memory: plain 16-byte loads (LDG.E.128), issued early and kept in
  // registers, reach far higher PCIe throughput than cp.async (LDGSTS) from host memory (measured on
  // H200: about 46 vs 26 GB/s), so the sparse kernel stages tiles through registers.
  // k_src / v_src: TT rows each, row stride D (one 16-token unit of a store page: v_src = k_src + TT * D).
  __device__ __forceinline__ void load_regs(uint4 (&r)[PT], const T* k_src, const T* v_src) const {
    constexpr int PER = TT * CH;
#pragma unroll
    for (int i = 0; i < PT; ++i) {
      const int c = threadIdx.x + i * NT;
      const int kv = c / PER, row = (c / CH) % TT, col = c % CH;
      r[i] = load16_cg((kv ? v_src : k_src) + int64_t(row) * D + col * 8);
    }
  }
  __device__ __forceinline__ void store_regs(Smem& sm, int st, const uint4 (&r)[PT]) const {
    constexpr int PER = TT * CH;
#pragma unroll
    for (int i = 0; i < PT; ++i) {
      const int c = threadIdx.x + i * NT;
      const int kv = c / PER, row = (c / CH) % TT, col = c % CH;
      *reinterpret_cast<uint4*>(&sm.tiles[st][kv * TT * ROW + row * ROW + col * 8]) = r[i];
    }
  }

  // Stage `rows` (<= TT) consecutive K and V rows (row stride D in the source) into stage `st` (cp.async:
  // used for device memory, where it is the better path).
  __device__ __forceinline__ void issue(Smem& sm, int st, const T* k_src, const T* v_src, int rows) {
    constexpr int PER = TT * CH;  // chunks per K (or V) tile
    for (int c = threadIdx.x; c < 2 * PER; c += NT) {
      const int kv = c / PER, r = (c / CH) % TT, col = c % CH;
      if (r < rows) {
        const T* src = (kv ? v_src : k_src) + int64_t(r) * D + col * 8;
        cp_async16(&sm.tiles[st][kv * TT * ROW + r * ROW + col * 8], src);
      }
    }
  }

  // Folds stage `st` into the state. tok_mask: bit t = token t attendable; head_mask: bit h = head h
  // attends this tile. Contains two __syncthreads: call uniformly.
  __device__ __forceinline__ void compute(Smem& sm, int st, uint32_t tok_mask, uint32_t head_mask, float scale) {
    const int tid = threadIdx.x;
    const T* kt = sm.tiles[st];
    const T* vt = sm.tiles[st] + TT * ROW;
    {  // (A) scores
      const int dot = tid / TPD, part = tid % TPD;
      const int h = dot / TT, t = dot % TT;
      const T* krow = kt + t * ROW + part * DPT;
      const float* qh = &sm.q[h][part * DPT];
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < DPT / 8; ++c) {
        float kf[8];
        to_float8<T>(*reinterpret_cast<const uint4*>(krow + c * 8), kf);
        const float4 q0 = *reinterpret_cast<const float4*>(qh + c * 8);
        const float4 q1 = *reinterpret_cast<const float4*>(qh + c * 8 + 4);
        sum = fmaf(q0.x, kf[0], sum);
        sum = fmaf(q0.y, kf[1], sum);
        sum = fmaf(q0.z, kf[2], sum);
        sum = fmaf(q0.w, kf[3], sum);
        sum = fmaf(q1.x, kf[4], sum);
        sum = fmaf(q1.y, kf[5], sum);
        sum = fmaf(q1.z, kf[6], sum);
        sum = fmaf(q1.w, kf[7], sum);
      }
      sum = group_sum<TPD>(sum);
      const bool valid = ((tok_mask >> t) & 1u) && ((head_mask >> h) & 1u);
      if (part == 0) sm.s[h][t] = valid ? sum * scale : -INFINITY;
    }
    __syncthreads();
    {  // (B) online softmax: warp w handles heads w (lanes 0-15) and w + 4 (lanes 16-31), token = lane % 16
      const int lane = tid & 31, w = tid >> 5;
      const int h = w + 4 * (lane >> 4), t = lane & 15;
      const bool active = h < HG;
      const float sv = active ? sm.s[h][t] : -INFINITY;
      const float m_old = active ? sm.m[h] : -INFINITY;
      const float m_new = fmaxf(m_old, group_max<16>(sv));
      const bool empty = m_new == -INFINITY;
      const float p = empty ? 0.f : expf(sv - m_new);
      const float alpha = empty ? 1.f : expf(m_old - m_new);
      const float psum = group_sum<16>(p);
      if (active) {
        sm.s[h][t] = p;
        if (t == 0) {
          sm.m[h] = m_new;
          sm.l[h] = sm.l[h] * alpha + psum;
          sm.alpha[h] = alpha;
        }
      }
    }
    __syncthreads();
    {  // (C) acc = acc * alpha + P V
      const int pair = tid / TPP, part = tid % TPP;
      const int h = pair / CH, c = pair % CH;
      const float a = sm.alpha[h];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] *= a;
#pragma unroll
      for (int t = part; t < TT; t += TPP) {
        const float p = sm.s[h][t];
        if (p != 0.f) {
          float vf[8];
          to_float8<T>(*reinterpret_cast<const uint4*>(vt + t * ROW + c * 8), vf);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
        }
      }
    }
  }

  // Normalises the state into out[h * D + d] (h < nh) and lse[h]: out = acc / l, lse = m + log(l); heads
  // that attended nothing get 0 and -inf. out/lse may be global or shared memory.
  __device__ __forceinline__ void finish(Smem& sm, float* out, float* lse, int nh) {
    __syncthreads();
    const int tid = threadIdx.x;
    const int pair = tid / TPP, part = tid % TPP;
    const int h = pair / CH, c = pair % CH;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = group_sum<TPP>(acc[i]);
    if (part == 0 && h < nh) {
      const float m = sm.m[h], l = sm.l[h];
      const bool empty = m == -INFINITY || !(l > 0.f);
      const float inv = empty ? 0.f : 1.f / l;
      float4 o0, o1;
      o0.x = acc[0] * inv; o0.y = acc[1] * inv; o0.z = acc[2] * inv; o0.w = acc[3] * inv;
      o1.x = acc[4] * inv; o1.y = acc[5] * inv; o1.z = acc[6] * inv; o1.w = acc[7] * inv;
      float4* dst = reinterpret_cast<float4*>(out + int64_t(h) * D + c * 8);
      dst[0] = o0;
      dst[1] = o1;
      if (c == 0) lse[h] = empty ? -INFINITY : m + logf(l);
    }
  }
};

}  // namespace fluxion::core::cuda
