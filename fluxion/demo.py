"""Demo: a long synthetic KV cache with realistic structure, FULL vs block-sparse attention on the CPU.

The cache has attention sinks (large keys at the start), a recent window, and a few "needle" spans that
the queries look for, in noise. For each configuration it prints the output error against FULL attention
(per head, relative to the largest head-output norm of the layer), the bytes the attention touched and
the time per decode step (one layer).

    python -m fluxion demo                 # 32K tokens, Llama-3.1-8B head geometry
    python -m fluxion demo --context 131072 --threads 8
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fluxion

SINK, LOCAL = 64, 256


def synthetic_cache(n: int, hkv: int, hq: int, d: int, needles: int, seed: int = 0):
    """K/V [1, Hkv, N, D] bf16 and queries [1, Hq, D]: Gaussian keys, strong sinks, needles aligned with
    the query of their head group, a recent window correlated with the query."""
    g = torch.Generator().manual_seed(seed)
    k = 0.3 * torch.randn(1, hkv, n, d, generator=g)
    v = torch.randn(1, hkv, n, d, generator=g)
    q = torch.randn(1, hq, d, generator=g)
    group = hq // hkv
    for h in range(hkv):
        direction = q[0, h * group:(h + 1) * group].mean(0)
        direction /= direction.norm()
        k[0, h, :4] += 16.0 * direction  # sinks: large scores, small values
        v[0, h, :4] *= 0.1
        for start in torch.randint(SINK, max(SINK + 1, n - LOCAL - 16), (needles,), generator=g).tolist():
            k[0, h, start:start + 16] += 20.0 * direction  # needles: short spans far from the window
        k[0, h, -LOCAL:] += 3.0 * direction  # the recent window is relevant too
    return k.to(torch.bfloat16), v.to(torch.bfloat16), q.to(torch.bfloat16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--needles", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.threads:
        fluxion.set_num_threads(a.threads)
    info = fluxion.build_info()
    print(f"Fluxion demo: {a.context} tokens, {a.q_heads} query / {a.kv_heads} KV heads, D={a.head_dim}, bf16; "
          f"CPU kernels: {info['simd']}, {info['threads']} threads")

    k, v, q = synthetic_cache(a.context, a.kv_heads, a.q_heads, a.head_dim, a.needles)
    store = fluxion.HostKVStore(1, a.kv_heads, a.head_dim, torch.bfloat16)
    seq = store.add_sequence()
    t0 = time.perf_counter()
    for start in range(0, a.context, 8192):  # prefill in chunks, metadata built on the way
        store.append(0, [seq], k[:, :, start:start + 8192], v[:, :, start:start + 8192])
    print(f"host store filled in {time.perf_counter() - t0:.2f} s: {store}")

    args = store.layer_args(0, [seq])
    k_win = torch.zeros(1, a.kv_heads, SINK + LOCAL, a.head_dim, dtype=torch.bfloat16)
    v_win = torch.zeros_like(k_win)
    fluxion.window_append(k_win, v_win, k, v, torch.arange(a.context, dtype=torch.int32)[None], SINK)
    lens = torch.tensor([a.context], dtype=torch.int32)

    def step(budget: float, block: int):
        budgets = torch.full((1, a.q_heads), budget)
        sizes = torch.full((1, a.kv_heads), block, dtype=torch.int32)
        wo, wl = fluxion.window_attention(q, k_win, v_win, lens, SINK)
        ro, rl, nbytes = fluxion.retrieval_attention(q, **args, budgets=budgets, block_sizes=sizes)
        out, _ = fluxion.merge_attention_states(torch.stack([wo, ro]), torch.stack([wl, rl]))
        window_bytes = 2 * a.kv_heads * min(a.context, SINK + LOCAL) * a.head_dim * 2
        return out, int(nbytes.sum()) + window_bytes

    def timed(fn):
        fn()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        return result, sorted(times)[len(times) // 2]

    (full, full_bytes), full_t = timed(lambda: step(1.0, 16))
    dense = torch.softmax((q[0].float().unsqueeze(1) @ k[0].float().repeat_interleave(a.q_heads // a.kv_heads, 0)
                           .transpose(1, 2)).squeeze(1) * a.head_dim ** -0.5, -1)
    dense_out = (dense.unsqueeze(1) @ v[0].float().repeat_interleave(a.q_heads // a.kv_heads, 0)).squeeze(1)
    check = ((full[0] - dense_out).norm(dim=-1) / dense_out.norm(dim=-1)).max()
    print(f"FULL through the kernels vs torch dense attention: max relative error {check:.2e}")
    print(f"{'mode':<22} {'error mean':>15} {'max':>9} {'MB touched':>11} {'of FULL':>8} {'ms/layer':>9}")
    print(f"{'FULL':<22} {0.0:>15.4f} {0.0:>9.4f} {full_bytes / 1e6:>11.1f} {1.0:>8.1%} {full_t * 1e3:>9.2f}")
    for block, budget in ((16, 0.05), (16, 0.02), (32, 0.05), (32, 0.02), (64, 0.05)):
        (out, nbytes), t = timed(lambda: step(budget, block))
        # Error per head normalised by the largest head-output norm of the layer (near-silent heads
        # would otherwise dominate a per-head relative error).
        err = (out[0] - full[0]).norm(dim=-1) / full[0].norm(dim=-1).max()
        print(f"{f'sparse ({block}, {budget})':<22} {err.mean():>15.4f} {err.max():>9.4f} {nbytes / 1e6:>11.1f} "
              f"{nbytes / full_bytes:>8.1%} {t * 1e3:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
