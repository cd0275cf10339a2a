"""GPU path: zero-copy retrieval over pinned host KV vs the measured PCIe ceiling, staging alternative,
dense window vs SDPA, and CPU + GPU retrieval running together.

Sections (all in one run, medians of CUDA-event timings after warm-up):
  h2d        pinned host -> device copy bandwidth: the ceiling every GB/s below is compared with
  retrieval  retrieval_attention (zero-copy) at 32K / 128K tokens, budgets 0.02 / 0.05, BS 16..128,
             Llama-3.1-8B geometry (32 q / 8 kv heads, D=128, bf16, one layer); bytes = the op's
             bytes_read (metadata scan + union of selected K/V). Also score+topk and sparse_attention
             timed alone, so one sees where the time goes. L2 is flushed before every timed call and
             layers rotate, so no call is served from a previous call's cache.
  staging    the alternative to zero-copy: gather the selected blocks on the host into a pinned buffer,
             cudaMemcpyAsync it, attend on the GPU (SDPA with a mask); vs zero-copy sparse_attention on
             the same selection
  window     every window_attention kernel (fluxion.set_window_kernel) vs torch SDPA on windows of
             --window-sizes tokens (sink included) at batches --window-batches (32/8 heads, D=128, bf16):
             eager, one-call graph replay, and 20 calls per graph
  tasks      one retrieval_attention call over the first 1, 2, 4, ... groups of a layer at the largest context:
             PCIe GB/s against the size of a GPU batch (what the scheduler's GPU side pulls)
  concurrent CPU retrieval (torch.ops.fluxion.retrieval_attention on CPU tensors, 15 threads) on half the
             groups while the GPU op runs the other half: combined bytes/s vs each alone. The GPU op only
             enqueues kernels, so calling it first and the CPU op right after runs both at once (no thread
             needed, and no reliance on the CPU op releasing the GIL)

  python benchmarks/bench_gpu.py --out gpu.json
  python benchmarks/bench_gpu.py --quick
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # a source checkout built in place (setup.py build_ext --inplace)
from common import build_store, environment, h2d_bandwidth, write_rows  # noqa: E402

import fluxion  # noqa: E402

OPS = torch.ops.fluxion


# ---------------------------------------------------------------------------------------------------------
# timing helpers


class Flusher:
    """Evicts L2 (60 MB on H200) by overwriting a larger device buffer before a timed call."""

    def __init__(self, mib: int = 256):
        self.buf = torch.empty(mib << 18, dtype=torch.float32, device="cuda")

    def __call__(self):
        self.buf.zero_()


def cuda_median_s(fn, reps: int, warmup: int = 3, before=None) -> float:
    """Median seconds of fn() between CUDA events; `before` (not timed) runs ahead of each call."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    events = []
    for _ in range(reps):
        if before:
            before()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def graph_median_s(fn, calls: int = 50, reps: int = 20) -> float:
    """Median seconds per call of `calls` back-to-back calls captured in one CUDA graph (no launch gaps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return cuda_median_s(g.replay, reps, warmup=3) / calls


# ---------------------------------------------------------------------------------------------------------
# data


def layer_args(store, layer, seqs, device):
    return (store.pages(), store.frame_table(layer, seqs).to(device), store.seq_lens(layer, seqs).to(device))


def budget_blocks(budget: float, n: int, bs: int, ncand: int) -> int:
    if budget <= 0:
        return 0
    want = float(torch.tensor(budget, dtype=torch.float32)) * n / bs
    return min(max(1, math.ceil(want - 1e-6)), ncand)


def candidates(n: int, sink: int, local: int, bs: int) -> int:
    lo, hi = min(sink, n), max(n - local, min(sink, n))
    return 0 if hi <= lo else -(-hi // bs) - lo // bs


# ---------------------------------------------------------------------------------------------------------
# sections


def bench_h2d(quick: bool) -> float:
    return h2d_bandwidth((256 if quick else 1024) << 20, reps=10 if quick else 20)


def bench_retrieval(a, ceiling, rows, flush):
    hq, hkv, d, sink, local = a.hq, a.hkv, a.head_dim, a.sink, a.local
    scale = d ** -0.5
    g = torch.Generator().manual_seed(1)
    print(f"\n## zero-copy retrieval (B={a.batch}, {hq}/{hkv} heads, D={d}, bf16); ceiling {ceiling:.1f} GB/s")
    hdr = (f"{'ctx':>7} {'budget':>6} {'BS':>4} {'MB read':>8} {'total ms':>9} {'GB/s':>6} {'% ceil':>6} | "
           f"{'score+topk ms':>13} {'attend ms':>9} {'attend GB/s':>11}")
    print(hdr)
    stores = {}
    for ctx in a.contexts:
        layers = 2  # rotate layers (and flush L2) so no call reuses the previous call's cache
        store, seqs = build_store(ctx, layers, hkv, d, a.batch, pin=True, chunk=16384)
        stores[ctx] = (store, seqs, layers)
        args = [layer_args(store, i, seqs, "cuda") for i in range(layers)]
        qs = [torch.randn(a.batch, hq, d, generator=g).to(torch.bfloat16).cuda() for _ in range(layers)]
        groups = torch.arange(a.batch * hkv, dtype=torch.int32, device="cuda")
        for budget in a.budgets:
            budgets = torch.full((a.batch, hq), budget, device="cuda")
            for bs in a.block_sizes:
                bsz = torch.full((a.batch, hkv), bs, dtype=torch.int32, device="cuda")
                it = [0]

                def run_fused():
                    i = it[0] % layers
                    it[0] += 1
                    return OPS.retrieval_attention(qs[i], *args[i], budgets, bsz, groups, store.page_tokens, sink,
                                                   local, scale)

                nbytes = int(run_fused()[2].sum())
                t_all = cuda_median_s(run_fused, a.reps, before=flush)
                # the same work as separate ops: score + top-k, then attention over the selection
                ncand = candidates(ctx, sink, local, bs)
                kk = budget_blocks(budget, ctx, bs, ncand)
                kvec = torch.full((a.batch * hq,), kk, dtype=torch.int32, device="cuda")
                sels = []
                for i in range(layers):
                    s = OPS.score_blocks(qs[i], *args[i], store.page_tokens, bs, sink, local)
                    sels.append(OPS.topk_blocks(s.view(-1, s.shape[-1]), kvec, max(kk, 1)).view(a.batch, hq, -1))

                def run_select():
                    i = it[0] % layers
                    it[0] += 1
                    s = OPS.score_blocks(qs[i], *args[i], store.page_tokens, bs, sink, local)
                    return OPS.topk_blocks(s.view(-1, s.shape[-1]), kvec, max(kk, 1))

                def run_attend():
                    i = it[0] % layers
                    it[0] += 1
                    return OPS.sparse_attention(qs[i], *args[i], sels[i], store.page_tokens, bs, sink, local, scale)

                t_sel = cuda_median_s(run_select, a.reps, before=flush)
                t_att = cuda_median_s(run_attend, a.reps, before=flush)
                meta = a.batch * hkv * ncand * 2 * d * 2
                kv = nbytes - meta
                gbps = nbytes / t_all / 1e9
                print(f"{ctx:>7} {budget:>6.2f} {bs:>4} {nbytes / 1e6:>8.1f} {t_all * 1e3:>9.3f} {gbps:>6.1f} "
                      f"{100 * gbps / ceiling:>5.0f}% | {t_sel * 1e3:>13.3f} {t_att * 1e3:>9.3f} "
                      f"{kv / t_att / 1e9:>11.1f}")
                rows.append(dict(section="retrieval", ctx=ctx, batch=a.batch, budget=budget, block_size=bs,
                                 bytes_read=nbytes, metadata_bytes=meta, median_ms=t_all * 1e3, gbps=gbps,
                                 ceiling_gbps=ceiling, ratio_to_ceiling=gbps / ceiling, select_ms=t_sel * 1e3,
                                 attend_ms=t_att * 1e3, attend_gbps=kv / t_att / 1e9,
                                 select_gbps=meta / t_sel / 1e9))
    return stores


def bench_tasks(a, ceiling, rows, flush, stores):
    """One retrieval_attention call over the first n groups (tasks) of a layer: how PCIe throughput depends on
    the size of a GPU batch (the scheduler's GPU side pulls a few groups at a time)."""
    ctx = max(stores)
    store, seqs, layers = stores[ctx]
    hq, hkv, d, P = a.hq, a.hkv, a.head_dim, store.page_tokens
    args = [layer_args(store, i, seqs, "cuda") for i in range(layers)]
    g = torch.Generator().manual_seed(2)
    qs = [torch.randn(a.batch, hq, d, generator=g).to(torch.bfloat16).cuda() for _ in range(layers)]
    budget, bs = (0.05 if 0.05 in a.budgets else a.budgets[0]), 16
    budgets = torch.full((a.batch, hq), budget, device="cuda")
    bsz = torch.full((a.batch, hkv), bs, dtype=torch.int32, device="cuda")
    print(f"\n## GPU batch size: retrieval over the first n groups at {ctx} tokens, budget {budget}, BS {bs}")
    print(f"{'groups':>6} {'MB read':>8} {'ms':>8} {'GB/s':>6} {'% ceil':>6}")
    n = 1
    while n <= a.batch * hkv:
        groups = torch.arange(n, dtype=torch.int32, device="cuda")
        it = [0]

        def run():
            i = it[0] % layers
            it[0] += 1
            return OPS.retrieval_attention(qs[i], *args[i], budgets, bsz, groups, P, a.sink, a.local, d ** -0.5)

        nbytes = int(run()[2].sum())
        t = cuda_median_s(run, a.reps, before=flush)
        gbps = nbytes / t / 1e9
        print(f"{n:>6} {nbytes / 1e6:>8.1f} {t * 1e3:>8.3f} {gbps:>6.1f} {100 * gbps / ceiling:>5.0f}%")
        rows.append(dict(section="tasks", ctx=ctx, budget=budget, block_size=bs, groups=n, bytes_read=nbytes,
                         median_ms=t * 1e3, gbps=gbps, ceiling_gbps=ceiling, ratio_to_ceiling=gbps / ceiling))
        n *= 2


def bench_staging(a, ceiling, rows, flush, stores):
    """Zero-copy sparse_attention vs host gather + H2D copy + GPU attention, on the same selection."""
    ctx = max(stores)
    store, seqs, _ = stores[ctx]
    hq, hkv, d, sink, local, P = a.hq, a.hkv, a.head_dim, a.sink, a.local, store.page_tokens
    G = hq // hkv
    scale = d ** -0.5
    budget = 0.05 if 0.05 in a.budgets else a.budgets[0]
    pages, ft, sl = layer_args(store, 0, seqs[:1], "cuda")
    ft_host = store.frame_table(0, seqs[:1])
    rows_per_page = store.page_elems // d
    flat = pages.view(-1, d)  # every page row of D elements: 16-token units (K rows, then V rows), then metadata
    q = torch.randn(1, hq, d).to(torch.bfloat16).cuda()
    torch.set_num_threads(a.cpu_threads)
    print(f"\n## staging vs zero-copy at {ctx} tokens, budget {budget} (B=1; selection already on the host; "
          f"host gather with {a.cpu_threads} threads)")
    print(f"{'BS':>4} {'MB K/V':>7} {'zero-copy ms':>12} | {'gather ms':>9} {'H2D ms':>7} {'attend ms':>9} "
          f"{'serial ms':>9} {'overlap ms':>10} | {'winner':>9}")
    for bs in a.block_sizes:
        ncand = candidates(ctx, sink, local, bs)
        kk = budget_blocks(budget, ctx, bs, ncand)
        s = OPS.score_blocks(q, pages, ft, sl, P, bs, sink, local)
        kvec = torch.full((hq,), kk, dtype=torch.int32, device="cuda")
        sel = OPS.topk_blocks(s.view(hq, -1), kvec, kk).view(1, hq, kk)
        t_zero = cuda_median_s(lambda: OPS.sparse_attention(q, pages, ft, sl, sel, P, bs, sink, local, scale), a.reps,
                               before=flush)
        # Plan (host): per group the union of its heads' blocks, padded to the largest union.
        sel_h = sel.cpu()[0]
        unions = [torch.unique(sel_h[g * G:(g + 1) * G].flatten()) for g in range(hkv)]
        umax = max(int(u.numel()) for u in unions)
        L = umax * bs
        idx = torch.zeros(hkv, 2, L, dtype=torch.int64)
        mask = torch.zeros(hkv, G, 1, L, dtype=torch.bool)
        tok = torch.arange(bs)
        lo_r, hi_r = min(sink, ctx), max(ctx - local, min(sink, ctx))
        for g, u in enumerate(unions):
            t0 = (u[:, None] * bs + tok[None, :]).flatten()  # token ids of the union's blocks
            tp = t0 % P  # K row of token t in its page: unit t // 16 holds K[16] then V[16] (csrc/core/layout.h)
            page_row = (ft_host[0, t0 // P].long() * hkv + g) * rows_per_page + (tp // 16) * 32 + tp % 16
            idx[g, 0, : t0.numel()] = page_row
            idx[g, 1, : t0.numel()] = page_row + 16
            inside = (t0 >= lo_r) & (t0 < hi_r)
            for h in range(G):
                chosen = torch.isin(u, sel_h[g * G + h])
                mask[g, h, 0, : t0.numel()] = chosen.repeat_interleave(bs) & inside
        idx = idx.flatten()
        staging = torch.empty(idx.numel(), d, dtype=torch.bfloat16).pin_memory()
        dev = torch.empty(idx.numel(), d, dtype=torch.bfloat16, device="cuda")
        mask_d = mask.cuda()

        def gather():
            torch.index_select(flat, 0, idx, out=staging)

        gather()
        t_gather = statistics.median(_wall(gather) for _ in range(max(3, a.reps // 2)))
        t_h2d = cuda_median_s(lambda: dev.copy_(staging, non_blocking=True), a.reps)
        qg = q.view(hkv, G, 1, d)

        def attend():
            kvd = dev.view(hkv, 2, L, d)
            return F.scaled_dot_product_attention(qg, kvd[:, 0:1].expand(hkv, G, L, d),
                                                  kvd[:, 1:2].expand(hkv, G, L, d), attn_mask=mask_d, scale=scale)

        t_att = cuda_median_s(attend, a.reps)
        kv_bytes = sum(int(u.numel()) for u in unions) * 2 * bs * d * 2
        serial = t_gather + t_h2d + t_att
        overlap = max(t_gather, t_h2d) + t_att
        # The overlapped figure is a lower bound (gather and copy perfectly pipelined in chunks): staging only
        # "wins" when even that bound beats zero-copy by more than the run-to-run noise (5%).
        ratio = overlap / t_zero
        winner = "zero-copy" if ratio > 1.05 else ("staging" if ratio < 0.95 else "tie")
        print(f"{bs:>4} {kv_bytes / 1e6:>7.1f} {t_zero * 1e3:>12.3f} | {t_gather * 1e3:>9.3f} {t_h2d * 1e3:>7.3f} "
              f"{t_att * 1e3:>9.3f} {serial * 1e3:>9.3f} {overlap * 1e3:>10.3f} | {winner:>9}")
        rows.append(dict(section="staging", ctx=ctx, budget=budget, block_size=bs, kv_bytes=kv_bytes,
                         zero_copy_ms=t_zero * 1e3, zero_copy_gbps=kv_bytes / t_zero / 1e9, gather_ms=t_gather * 1e3,
                         h2d_ms=t_h2d * 1e3, staged_bytes=idx.numel() * d * 2, attend_ms=t_att * 1e3,
                         staging_serial_ms=serial * 1e3, staging_overlapped_ms=overlap * 1e3,
                         ratio_zero_copy_to_staging=overlap / t_zero, ceiling_gbps=ceiling, winner=winner))


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


WINDOW_KERNELS = ("tile", "mma", "mma:1", "mma:2", "mma:4", "mma:8")  # fluxion.set_window_kernel values


def bench_window(a, rows):
    """Every window_attention kernel vs SDPA, per (window, batch): eager (one call between events), graph1
    (a one-call CUDA graph replayed: launch cost included) and graph20 (20 calls in one graph / 20: the
    kernel alone, back to back)."""
    hq, hkv, d, sink = a.hq, a.hkv, a.head_dim, a.sink
    scale = d ** -0.5
    before = fluxion.window_kernel()
    print(f"\n## dense window vs SDPA ({hq}/{hkv} heads, D={d}, bf16, sink {sink}); median us per call; "
          f"ratio = / best SDPA in that column")
    for W in a.window_sizes:
        for B in a.window_batches:
            q = torch.randn(B, hq, d, device="cuda").to(torch.bfloat16)
            kw = torch.randn(B, hkv, W, d, device="cuda").to(torch.bfloat16)
            vw = torch.randn_like(kw)
            sl = torch.full((B,), 100000, dtype=torch.int32, device="cuda")  # every slot valid
            q4 = q.view(B, hq, 1, d)
            kx, vx = kw.repeat_interleave(hq // hkv, 1), vw.repeat_interleave(hq // hkv, 1)
            ref = F.scaled_dot_product_attention(q4.float(), kx.float(), vx.float(), scale=scale).view(B, hq, d)
            ours = [(f"fluxion {k}", k) for k in WINDOW_KERNELS]
            sdpa = {
                "sdpa(enable_gqa)": lambda: F.scaled_dot_product_attention(q4, kw, vw, scale=scale, enable_gqa=True),
                "sdpa(expanded K/V)": lambda: F.scaled_dot_product_attention(q4, kx, vx, scale=scale),
                "sdpa(expand inside)": lambda: F.scaled_dot_product_attention(
                    q4, kw.repeat_interleave(hq // hkv, 1), vw.repeat_interleave(hq // hkv, 1), scale=scale),
            }
            res = {}

            def measure(name, fn):
                try:
                    res[name] = (cuda_median_s(fn, reps=200, warmup=20), graph_median_s(fn, calls=1, reps=50),
                                 graph_median_s(fn, calls=20, reps=20))
                except Exception as e:  # e.g. an SDPA variant this torch does not support
                    print(f"{name:>22} unavailable: {str(e).splitlines()[0][:60]}")

            for name, fn in sdpa.items():
                measure(name, fn)
            errs = {}
            for name, kernel in ours:
                fluxion.set_window_kernel(kernel)  # graphs keep the kernel they captured
                fn = lambda: OPS.window_attention(q, kw, vw, sl, sink, scale)  # noqa: E731
                errs[name] = float((fn()[0] - ref).abs().max())
                measure(name, fn)
            base = [v for k, v in res.items() if k.startswith("sdpa")]
            best = [min(v[i] for v in base) if base else float("nan") for i in range(3)]
            print(f"\nW={W} ({sink} sink + {W - sink} local), B={B}")
            print(f"{'kernel':>22} {'eager':>7} {'graph1':>7} {'graph20':>7} | {'ratio e':>7} {'g1':>5} {'g20':>5} | "
                  f"{'max err':>8}")
            for name, (te, t1, t20) in res.items():
                err = errs.get(name)
                print(f"{name:>22} {te * 1e6:>7.1f} {t1 * 1e6:>7.1f} {t20 * 1e6:>7.1f} | {te / best[0]:>7.2f} "
                      f"{t1 / best[1]:>5.2f} {t20 / best[2]:>5.2f} | {'' if err is None else f'{err:.1e}':>8}")
                rows.append(dict(section="window", kernel=name, window=W, sink=sink, batch=B, hq=hq, hkv=hkv,
                                 head_dim=d, eager_us=te * 1e6, graph1_us=t1 * 1e6, graph20_us=t20 * 1e6,
                                 ratio_to_best_sdpa_eager=te / best[0], ratio_to_best_sdpa_graph1=t1 / best[1],
                                 ratio_to_best_sdpa_graph20=t20 / best[2], max_err_vs_fp32=err))
    fluxion.set_window_kernel(before)


def bench_concurrent(a, ceiling, rows, flush):
    ctx = max(a.contexts)
    batch = 2
    hq, hkv, d, sink, local = a.hq, a.hkv, a.head_dim, a.sink, a.local
    scale = d ** -0.5
    store, seqs = build_store(ctx, 1, hkv, d, batch, pin=True, seed=3, chunk=16384)
    pages, ft, sl = layer_args(store, 0, seqs, "cpu")
    ftd, sld = ft.cuda(), sl.cuda()
    q = torch.randn(batch, hq, d).to(torch.bfloat16)
    qd = q.cuda()
    budget, bs = (0.05 if 0.05 in a.budgets else a.budgets[0]), 16
    budgets = torch.full((batch, hq), budget)
    bsz = torch.full((batch, hkv), bs, dtype=torch.int32)
    budd, bszd = budgets.cuda(), bsz.cuda()
    ngroups = batch * hkv
    cpu_groups = torch.arange(0, ngroups // 2, dtype=torch.int32)
    gpu_groups = torch.arange(ngroups // 2, ngroups, dtype=torch.int32).cuda()
    torch.set_num_threads(a.cpu_threads)

    def cpu_op():
        return OPS.retrieval_attention(q, pages, ft, sl, budgets, bsz, cpu_groups, store.page_tokens, sink, local, scale)

    def gpu_op():
        return OPS.retrieval_attention(qd, pages, ftd, sld, budd, bszd, gpu_groups, store.page_tokens, sink, local,
                                       scale)

    cpu_bytes = int(cpu_op()[2].sum())
    gpu_bytes = int(gpu_op()[2].sum())
    torch.cuda.synchronize()
    t_cpu = statistics.median(_wall(cpu_op) for _ in range(a.reps))

    t_gpu = cuda_median_s(gpu_op, a.reps, before=flush)

    def both():
        """Wall time of both, plus each side's own time while the other runs."""
        flush()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        s.record()
        gpu_op()  # only enqueues kernels (no host sync), so the GPU works while the CPU op runs below
        e.record()
        c0 = time.perf_counter()
        cpu_op()
        c1 = time.perf_counter()
        torch.cuda.synchronize()
        return time.perf_counter() - t, c1 - c0, s.elapsed_time(e) / 1e3

    runs = [both() for _ in range(a.reps)]
    t_both = statistics.median(r[0] for r in runs)
    t_cpu_c = statistics.median(r[1] for r in runs)
    t_gpu_c = statistics.median(r[2] for r in runs)
    alone = cpu_bytes / t_cpu + gpu_bytes / t_gpu
    together = cpu_bytes / t_cpu_c + gpu_bytes / t_gpu_c  # each side's rate while the other one runs
    print(f"\n## CPU ({a.cpu_threads} threads, {ngroups // 2} groups) + GPU ({ngroups - ngroups // 2} groups) at {ctx} "
          f"tokens, B={batch}, budget {budget}, BS {bs}")
    print(f"alone:    CPU {t_cpu * 1e3:7.2f} ms ({cpu_bytes / t_cpu / 1e9:5.1f} GB/s)   GPU {t_gpu * 1e3:7.2f} ms "
          f"({gpu_bytes / t_gpu / 1e9:5.1f} GB/s, {100 * gpu_bytes / t_gpu / 1e9 / ceiling:.0f}% of H2D)")
    print(f"together: CPU {t_cpu_c * 1e3:7.2f} ms ({cpu_bytes / t_cpu_c / 1e9:5.1f} GB/s)   GPU {t_gpu_c * 1e3:7.2f} ms "
          f"({gpu_bytes / t_gpu_c / 1e9:5.1f} GB/s)   wall {t_both * 1e3:.2f} ms")
    print(f"combined rate while both run {together / 1e9:.1f} GB/s vs sum of each alone {alone / 1e9:.1f} GB/s "
          f"({100 * together / alone:.0f}%); the wall time is the slower side's (balance the split by rate)")
    rows.append(dict(section="concurrent", ctx=ctx, batch=batch, budget=budget, block_size=bs,
                     cpu_threads=a.cpu_threads, cpu_bytes=cpu_bytes, gpu_bytes=gpu_bytes, cpu_ms=t_cpu * 1e3,
                     gpu_ms=t_gpu * 1e3, both_wall_ms=t_both * 1e3, cpu_ms_concurrent=t_cpu_c * 1e3,
                     gpu_ms_concurrent=t_gpu_c * 1e3, cpu_gbps=cpu_bytes / t_cpu / 1e9,
                     gpu_gbps=gpu_bytes / t_gpu / 1e9, together_gbps=together / 1e9, sum_alone_gbps=alone / 1e9,
                     ratio_together_to_sum=together / alone))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--local", type=int, default=256)
    p.add_argument("--window-sizes", type=int, nargs="+", default=[320, 1088], help="window section: sink + local")
    p.add_argument("--window-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--sections", nargs="+", default=["h2d", "retrieval", "tasks", "staging", "window", "concurrent"])
    p.add_argument("--quick", action="store_true", help="32K tokens, budget 0.05, BS 16 and 64, fewer repetitions")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::score_blocks",
                                                                                             "CUDA"):
        print("needs a CUDA device and fluxion built with CUDA kernels")
        return 1
    if a.quick:
        a.contexts, a.budgets, a.block_sizes, a.reps = [32768], [0.05], [16, 64], 7
    env = environment()
    env.update(gpu=torch.cuda.get_device_name(), cuda_runtime=torch.version.cuda, cpu_threads=a.cpu_threads)
    print(f"# {env['gpu']} | {env['cpu']} | torch {env['torch']} (CUDA {env['cuda']}) | git {env['git_sha']}")
    rows = []
    flush = Flusher()
    ceiling = bench_h2d(a.quick)
    print(f"pinned H2D (cudaMemcpyAsync via .copy_): {ceiling:.1f} GB/s")
    rows.append(dict(section="h2d", gbps=ceiling))
    stores = {}
    if any(x in a.sections for x in ("retrieval", "staging", "tasks")):
        stores = bench_retrieval(a, ceiling, rows, flush)
    if "tasks" in a.sections:
        bench_tasks(a, ceiling, rows, flush, stores)
    if "staging" in a.sections:
        bench_staging(a, ceiling, rows, flush, stores)
    stores.clear()
    if "window" in a.sections:
        bench_window(a, rows)
    if "concurrent" in a.sections:
        if torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::retrieval_attention", "CPU"):
            bench_concurrent(a, ceiling, rows, flush)
        else:
            print("\n(concurrent: no CPU kernels in this build, skipped)")
    write_rows(a.out, rows, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
