"""CPU retrieval task: bytes touched per second vs the host streaming-read bandwidth of the same run.

Bytes touched = key min/max metadata scanned + K/V of the union of selected blocks (exact, as returned
by the op's bytes_read). Ceiling = a plain SIMD streaming read of 1 GiB on the same number of threads
(fluxion._C.stream_read; the better of it and a float32 torch.sum is printed first, from the start of the run).
The host's speed drifts (the GPU box's 15-thread read ranged 80-135 GB/s within one minute), so the task,
the streaming read and the pattern's reads take turns call by call and each ratio is the median of the
per-round ratios. Pattern = what the task's access pattern allows: a plain read of as many
scattered runs as the task reads (one page's metadata rows, one block's K/V; fluxion._C.scatter_read,
prefetched as the kernels prefetch), timed the same way as the task. One core reads scattered runs slower
than a stream: its hardware prefetchers do not run ahead across them. Llama-3.1-8B head geometry by default (32 query
/ 8 KV heads, D=128, BF16); each call is one layer's decode-step retrieval for all KV-head groups. Each timed
call starts with a cold last-level cache (common.ColdCache); --warm times back-to-back calls rotating over the
layers instead (and the pattern over as many sets of runs), as the decode step makes them: with --layers 16 at 128K
the rotation (~1.9 GB) outgrows the 300 MiB cache, with fewer layers part of it is served from the cache.

  python benchmarks/bench_cpu_task.py                   # full sweep
  python benchmarks/bench_cpu_task.py --quick           # small smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from statistics import median

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ColdCache, build_store, environment, host_read_bandwidth, huge_page_share, llc_bytes,  # noqa: E402
                    write_rows)

import fluxion  # noqa: E402


def time_phases(a, q, args, budget, bs, ctx, threads, ceiling, task_s, task_bytes) -> dict:
    """Scoring and top-k of one layer timed alone (median over the layers' rotation), printed against the task."""
    from fluxion.reference import candidate_blocks, num_budget_blocks

    layers = len(args)
    kw = [dict(args[i], block_size=bs) for i in range(layers)]
    scores = [fluxion.score_blocks(q[i], **kw[i]) for i in range(layers)]
    nb = scores[0].shape[-1]
    ncand = len(candidate_blocks(ctx, 64, 256, bs))
    k = torch.full((scores[0].numel() // nb,), num_budget_blocks(budget, ctx, bs, ncand), dtype=torch.int32)
    flat = [s.reshape(-1, nb) for s in scores]
    state = {"i": 0}

    def score():
        i = state["i"] = (state["i"] + 1) % layers
        fluxion.score_blocks(q[i], **kw[i])

    def topk():
        i = state["i"] = (state["i"] + 1) % layers
        fluxion.topk_blocks(flat[i], k, int(k[0]))

    # Top-k reads scores the task has just written, so it is timed warm in either mode.
    score_s = median(timed_calls(a, {"score": score}, threads)["score"])
    topk_s = Timer("fn()", globals={"fn": topk}, num_threads=threads).blocked_autorange(min_run_time=a.min_run_time).median
    meta_bytes = metadata_bytes(a, ctx, bs)
    rest_s, rest_bytes = task_s - score_s - topk_s, task_bytes - meta_bytes
    print(f"{'':>24}phases alone: scoring {score_s * 1e3:.3f} ms ({meta_bytes / score_s / 1e9 / ceiling:.2f} of the "
          f"ceiling on {meta_bytes / 1e6:.1f} MB of metadata), top-k {topk_s * 1e3:.3f} ms; the rest of the task "
          f"{rest_s * 1e3:.3f} ms ({rest_bytes / max(rest_s, 1e-9) / 1e9 / ceiling:.2f} of the ceiling on "
          f"{rest_bytes / 1e6:.1f} MB of K/V)")
    return {"score_s": score_s, "topk_s": topk_s, "metadata_bytes": meta_bytes}


def metadata_bytes(a, ctx: int, bs: int) -> int:
    """Key min/max metadata one layer's task scans: every candidate block of every KV head (BF16 rows)."""
    from fluxion.reference import candidate_blocks

    return a.batch * a.hkv * len(candidate_blocks(ctx, 64, 256, bs)) * 2 * a.head_dim * 2


def scattered_runs(pages: torch.Tensor, n: int, run_bytes: int, g: torch.Generator) -> torch.Tensor:
    """Byte offsets of n distinct run_bytes-aligned runs of the store's arena, at random, ascending: the shape of
    the task's K/V reads (selected blocks scattered over the frames) for fluxion._C.scatter_read."""
    slots = pages.numel() * pages.element_size() // run_bytes
    return torch.randperm(slots, generator=g)[:max(n, 1)].sort().values * run_bytes


def timed_calls(a, calls: dict, threads: int) -> dict:
    """Seconds of every call of each of `calls` (name -> callable) on `threads` threads. Cold (default): each
    call from a cold cache, the calls taking turns rep by rep (common.ColdCache.interleaved), so rep i of the
    task and rep i of the streaming read saw about the same host. --warm: each timed by torch's Timer in turn."""
    if a.cold is not None:
        return a.cold.interleaved(calls, threads, a.min_run_time * len(calls))
    out = {}
    for name, fn in calls.items():
        m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=a.min_run_time)
        out[name] = list(m.times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.02, 0.05])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2 4 8 ... all-1, all")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=0, help="layers to rotate over (default: enough for ~2 GiB)")
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--quick", action="store_true", help="8K context, block 16, budget 0.05, threads 1 and all")
    p.add_argument("--pin", action="store_true", help="page-lock the store (as on a GPU machine)")
    p.add_argument("--page-tokens", type=int, default=1024, help="tokens per host page")
    p.add_argument("--phases", action="store_true",
                   help="also time the task's first two phases alone through the separate ops: scoring every block "
                        "of the layer (score_blocks; its bytes are the metadata) and top-k of every head "
                        "(topk_blocks); the rest of the task's time is the union and the attention")
    p.add_argument("--warm", action="store_true",
                   help="time a rotation over the layers without evicting the caches between calls")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    ncpu = os.cpu_count() or 1
    if a.quick:
        a.contexts, a.budgets, a.block_sizes, a.min_run_time = [8192], [0.05], [16], 0.1
        a.threads = a.threads or sorted({1, ncpu})
    threads = a.threads or sorted({t for t in (1, 2, 4, 8, ncpu - 1, ncpu) if 1 <= t <= ncpu})
    env = environment()
    print(f"# {env['cpu']} | torch {env['torch']} | SIMD {env['simd']} | git {env['git_sha']} | pinned store: {a.pin}"
          f" | last-level cache {llc_bytes() >> 20} MiB, timing {'warm (rotation)' if a.warm else 'from a cold cache'}")
    a.cold = None if a.warm else ColdCache()
    reads = {t: host_read_bandwidth(t, gib=0.25 if a.quick else 2.0) for t in threads}
    print("# streaming-read ceiling at the start (GB/s) = max(torch.sum, SIMD load loop): " + ", ".join(
        f"{t} thr: {r['ceiling']:.1f} (sum {r['torch_sum']:.1f}, loop "
        f"{'n/a' if r['simd_loop'] is None else format(r['simd_loop'], '.1f')})" for t, r in reads.items()))
    # The streaming read timed with the task: 1 GiB, far past the last-level cache (--quick: 256 MiB).
    stream = torch.ones((2**26 if a.quick else 2**28), dtype=torch.float32)
    rows = []
    hdr = (f"{'ctx':>7} {'budget':>6} {'BS':>4} {'thr':>4} {'median ms':>10} {'MB touched':>10} {'GB/s':>7} "
           f"{'ceiling':>7} {'ratio':>6} | {'runs GB/s':>9} {'pattern':>7} {'ratio':>6}")
    print(hdr)
    g = torch.Generator().manual_seed(1)
    scale = a.head_dim ** -0.5
    for ctx in a.contexts:
        per_layer = ctx * a.hkv * a.batch * a.head_dim * 2 * 2
        layers = a.layers or max(2, min(16, int(2 * 2**30 // per_layer)))
        store, seqs = build_store(ctx, layers, a.hkv, a.head_dim, a.batch, pin=a.pin, page_tokens=a.page_tokens)
        args = [store.layer_args(layer, seqs) for layer in range(layers)]
        share = huge_page_share(store.pages())
        if share is not None:
            print(f"# {ctx} tokens x {layers} layers: {share:.0%} of the store's resident memory on huge pages")
        q = [torch.randn(a.batch, a.hq, a.head_dim, generator=g).to(torch.bfloat16) for _ in range(layers)]
        for budget in a.budgets:
            budgets = torch.full((a.batch, a.hq), budget)
            for bs in a.block_sizes:
                block_sizes = torch.full((a.batch, a.hkv), bs, dtype=torch.int32)
                touched = [int(fluxion.retrieval_attention(q[i], **args[i], budgets=budgets, block_sizes=block_sizes,
                                                           scale=scale)[2].sum()) for i in range(layers)]
                mean_bytes = sum(touched) / layers
                meta_bytes = metadata_bytes(a, ctx, bs)
                state = {"i": 0}

                def step():
                    i = state["i"] = (state["i"] + 1) % layers
                    fluxion.retrieval_attention(q[i], **args[i], budgets=budgets, block_sizes=block_sizes, scale=scale)

                # The task's reads as plain scattered runs: one block's K/V, one page's metadata rows. --warm
                # rotates over as many sets of runs as the task over layers, so neither read is served by the cache.
                run_bytes, meta_run = 2 * bs * a.head_dim * 2, a.page_tokens // bs * 2 * a.head_dim * 2
                sets = layers if a.warm else 1
                runs = [scattered_runs(store.pages(), int(mean_bytes - meta_bytes) // run_bytes, run_bytes, g)
                        for _ in range(sets)]
                meta_runs = [scattered_runs(store.pages(), meta_bytes // meta_run, meta_run, g) for _ in range(sets)]
                turn = {"kv": 0, "meta": 0}

                def scatter(kind, offsets, nbytes):
                    turn[kind] = (turn[kind] + 1) % sets
                    fluxion._C.scatter_read(store.pages(), offsets[turn[kind]], nbytes)

                for t in threads:
                    calls = {
                        "task": step,
                        "kv_runs": lambda: scatter("kv", runs, run_bytes),
                        "meta_runs": lambda: scatter("meta", meta_runs, meta_run),
                        "stream": lambda: fluxion._C.stream_read(stream),
                    }
                    times = timed_calls(a, calls, t)
                    task_gbps = [mean_bytes / x / 1e9 for x in times["task"]]
                    stream_gbps = [stream.numel() * stream.element_size() / x / 1e9 for x in times["stream"]]
                    # What this access pattern allows: its metadata and its K/V read as plain scattered runs.
                    pattern_gbps = [mean_bytes / (m + k) / 1e9 for m, k in zip(times["meta_runs"], times["kv_runs"])]
                    med = median(times["task"])
                    gbs, ceiling, pattern = median(task_gbps), median(stream_gbps), median(pattern_gbps)
                    ratio = median([x / y for x, y in zip(task_gbps, stream_gbps)])
                    ratio_pattern = median([x / y for x, y in zip(task_gbps, pattern_gbps)])
                    runs_gbs = median([runs[0].numel() * run_bytes / x / 1e9 for x in times["kv_runs"]])
                    print(f"{ctx:>7} {budget:>6.2f} {bs:>4} {t:>4} {med * 1e3:>10.3f} {mean_bytes / 1e6:>10.1f} "
                          f"{gbs:>7.1f} {ceiling:>7.1f} {ratio:>6.2f} | {runs_gbs:>9.1f} {pattern:>7.1f} "
                          f"{ratio_pattern:>6.2f}   (streaming read {min(stream_gbps):.1f}-{max(stream_gbps):.1f} "
                          f"over {len(stream_gbps)} reps)")
                    row = {}
                    if a.phases:
                        row = time_phases(a, q, args, budget, bs, ctx, t, ceiling, med, mean_bytes)
                    rows.append({**row, "context": ctx, "budget": budget, "block_size": bs, "threads": t, "median_s": med,
                                 "bytes_touched": mean_bytes, "gbps": gbs, "ceiling_gbps": ceiling, "ratio": ratio,
                                 "scattered_runs_gbps": runs_gbs, "pattern_ceiling_gbps": pattern,
                                 "ratio_to_pattern": ratio_pattern, "times_s": times, "ceiling_at_start": reads[t],
                                 "batch": a.batch, "hq": a.hq, "hkv": a.hkv, "head_dim": a.head_dim, "pinned": a.pin, "page_tokens": a.page_tokens,
                                 "cold_cache": not a.warm, "huge_page_share": share})
        del store, args
    write_rows(a.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
