"""Decode steps that cross a host-store page boundary, CPU only: the step that starts a new page for every
(sequence, layer) against the median step.

A frame (one page of every KV head, ~4.7 MiB for Llama's 8 KV heads at D=128 and 1024 tokens per page) is faulted
in on its first write. Unpinned stores (no GPU) fault the next never-used frames in ahead of need on a background
thread (HostKVStore::prefault_ahead); this benchmark shows what is left of the first-write cost at a boundary.
Pinned stores (with a GPU) are faulted in when they are pinned and are not measured here.

  python benchmarks/bench_page_boundary.py                  # batch 4, 4 layers, 8K tokens, two boundaries
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build_store, environment, write_rows  # noqa: E402

import fluxion  # noqa: E402,F401  (registers torch.classes.fluxion)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=8192, help="the first boundary; the prefill stops 3 tokens short")
    p.add_argument("--boundaries", type=int, default=2)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--page-tokens", type=int, default=1024, help="tokens per host page")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    page = a.page_tokens
    if a.context % page:
        p.error(f"--context must be a multiple of --page-tokens {page} (a page boundary), got {a.context}")
    env = environment()
    B, L, d = a.batch, a.layers, a.head_dim
    store, seqs = build_store(a.context - 3, L, a.hkv, d, B, page_tokens=page)
    rt = torch.classes.fluxion.HybridRuntime(store._impl, a.hq, "cpu", 64, 256, 0)
    rt.set_sequences(seqs)  # the windows come from the store
    g = torch.Generator().manual_seed(1)
    budgets = torch.full((B, a.hq), a.budget)
    sizes = torch.full((B, a.hkv), 16, dtype=torch.int32)
    q = torch.randn(B, a.hq, d, generator=g).to(torch.bfloat16)
    kn = torch.randn(B, a.hkv, 1, d, generator=g).to(torch.bfloat16)
    steps = 3 + (a.boundaries - 1) * page + 8
    times, appends = [], []
    for _ in range(steps):
        rt.reset_stats()
        t = time.perf_counter()
        for layer in range(L):
            rt.decode(layer, q, kn, kn, budgets, sizes, False, d ** -0.5)
        times.append(time.perf_counter() - t)
        appends.append(dict(rt.stats())["append_s"])
    median = statistics.median(times)
    print(f"# {env['cpu']} | torch {env['torch']} | git {env['git_sha']} | batch {B}, {L} layers, "
          f"{a.hkv} KV heads, D={d}, pages of {page} tokens")
    print(f"median step {median * 1e3:.2f} ms (append {statistics.median(appends) * 1e3 / L:.3f} ms per layer)")
    rows = []
    for i in range(a.boundaries):
        s = 3 + i * page  # the step that writes position context + i * page
        worst = max(times[s:s + 8])
        print(f"boundary at {a.context + i * page}: step {times[s] * 1e3:.2f} ms ({times[s] / median:.1f}x the median), "
              f"append {appends[s] * 1e3 / L:.3f} ms per layer; slowest of the 8 steps from it {worst * 1e3:.2f} ms")
        rows.append(dict(position=a.context + i * page, step_s=times[s], append_s=appends[s], median_step_s=median,
                         slowest_after_s=worst, batch=B, layers=L))
    write_rows(a.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
