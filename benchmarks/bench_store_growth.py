"""Decode-time growth of a pinned host store (GPU machine): the step that needs memory beyond what is committed.

A pinned store grows by at least a quarter of what it has committed, and pinning that memory (cudaHostRegister)
faults it in and holds the CUDA driver's lock, ~4 GiB/s on the H200 box: a 70 GiB store grew by 17 GiB in one
decode step, which stalled for seconds. Since session 16 the store pins its next chunk on a thread of its own, in
pieces, before any append needs it (HostKVStore::pin_ahead); this benchmark shows what is left of the stall.

It prefills `--batch` sequences of `--context` tokens per layer (zeros: the values do not matter here), then runs
decode steps of one token per sequence and layer, each ending with a small CUDA kernel and a synchronize (a decode
step's CUDA calls wait for the driver's lock like this one). It runs until the store has grown `--growths` times
after the prefill (each growth of the store, on the appending thread or ahead of it on its own), at most
`--max-steps` steps, and prints the median and slowest steps and every growth.

  python benchmarks/bench_store_growth.py                      # Llama-3.1-8B's KV heads, 32 layers, batch 4, 32K
  python benchmarks/bench_store_growth.py --context 131072 --growths 1
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--context", type=int, default=32768, help="prefilled tokens per sequence and layer")
    p.add_argument("--page-tokens", type=int, default=1024)
    p.add_argument("--growths", type=int, default=2, help="stop after the store has grown this often in decode")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device: only a pinned store (with a GPU) pins as it grows")
    env = environment()
    B, L, H, D = a.batch, a.layers, a.hkv, a.head_dim
    t = time.perf_counter()
    store, seqs = build_store(a.context, L, H, D, B, pin=True, page_tokens=a.page_tokens, random=False)
    prefill_s = time.perf_counter() - t
    wait_ahead = getattr(store, "wait_pinned_ahead", None)  # absent before session 16's store
    if wait_ahead:
        wait_ahead()  # a chunk started during the prefill: decode starts from a settled store
    st = store.stats()
    print(f"# {env['gpu']} | {env['cpu']} | torch {env['torch']} | git {env['git_sha']} | batch {B}, {L} layers, "
          f"{H} KV heads, D={D}, {a.context} tokens prefilled ({prefill_s:.1f} s), pages of {a.page_tokens} tokens")
    print(f"after prefill: {st['committed_bytes'] / 2**30:.2f} GiB committed and pinned, "
          f"{st['frames_committed'] - st['frames_in_use']} frames free ({B * L} per page turn)")

    k1 = torch.zeros(B, H, 1, D, dtype=torch.bfloat16)
    x = torch.zeros(1024, device="cuda")
    times, growths = [], []
    pinned = st["pinned_bytes"]
    for step in range(a.max_steps):
        t = time.perf_counter()
        for layer in range(L):
            store.append(layer, seqs, k1, k1)
        x.add_(1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        now = store.stats()["pinned_bytes"]
        if now != pinned:
            growths.append(dict(step=step, position=a.context + step, grown_bytes=now - pinned, pinned_bytes=now,
                                step_s=times[-1]))
            pinned = now
            if len(growths) >= a.growths:
                break
    median = statistics.median(times)
    slow = sorted(range(len(times)), key=lambda i: -times[i])[:5]
    print(f"{len(times)} decode steps: median {median * 1e3:.2f} ms, p99 "
          f"{statistics.quantiles(times, n=100)[98] * 1e3:.2f} ms, slowest "
          + ", ".join(f"{times[i] * 1e3:.1f} ms (step {i})" for i in slow))
    for g in growths:
        print(f"grew by {g['grown_bytes'] / 2**30:.2f} GiB to {g['pinned_bytes'] / 2**30:.2f} GiB; taken in at step "
              f"{g['step']} (position {g['position']}), which took {g['step_s'] * 1e3:.1f} ms")
    if not growths:
        print(f"the store did not grow within {a.max_steps} steps: raise --max-steps")
    write_rows(a.out, [dict(median_step_s=median, max_step_s=max(times), steps=len(times), prefill_s=prefill_s,
                            batch=B, layers=L, context=a.context, growths=growths,
                            slowest=[dict(step=i, step_s=times[i]) for i in slow])], env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
