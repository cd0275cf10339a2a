"""The CPU retrieval task two ways on one store: the `fluxion.retrieval_attention` op (what bench_cpu_task.py
times) and `HybridRuntime.decode` on the CPU (the decode step's path: plan, window, task, merge), with the
runtime's own timers. Both run back to back over a rotation of layers, so the data comes from memory.

  python benchmarks/bench_cpu_paths.py --threads 15 --layers 6 --context 131072
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

import fluxion  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layers", type=int, default=6, help="layers to rotate over (their K/V must exceed the LLC)")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    hkv, hq, d, L = 8, 32, 128, a.layers
    store = fluxion.HostKVStore(L, hkv, d, torch.bfloat16, pin=torch.cuda.is_available())
    seqs = [store.add_sequence()]
    rt = torch.classes.fluxion.HybridRuntime(store._impl, hq, "cpu", 64, 256, L)
    rt.configure(a.threads, True, 0)
    rt.set_sequences(seqs)
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        k = torch.randn(1, hkv, a.context, d, generator=g).to(torch.bfloat16)
        v = torch.randn(1, hkv, a.context, d, generator=g).to(torch.bfloat16)
        rt.prefill(layer, k, v, torch.ones(1, a.context, dtype=torch.bool))
    qs = [torch.randn(1, hq, d, generator=g).to(torch.bfloat16) for _ in range(L)]
    budgets = torch.full((1, hq), a.budget)
    sizes = torch.full((1, hkv), a.block_size, dtype=torch.int32)
    token = torch.randn(1, hkv, 1, d, generator=g).to(torch.bfloat16)
    print(f"# {a.context} tokens x {L} layers, budget {a.budget}, block {a.block_size}, {a.threads} threads")
    for _ in range(a.rounds):
        rt.reset_stats()
        n = 4 * L
        t = time.perf_counter()
        for i in range(n):
            rt.decode(i % L, qs[i % L], token, token, budgets, sizes, False, d ** -0.5)
        decode_s = (time.perf_counter() - t) / n
        st = rt.stats()
        t = time.perf_counter()
        for i in range(n):
            out = fluxion.retrieval_attention(qs[i % L], **store.layer_args(i % L, seqs), budgets=budgets,
                                              block_sizes=sizes, scale=d ** -0.5)
        op_s = (time.perf_counter() - t) / n
        print(f"decode {decode_s * 1e3:.3f} ms per layer step (task {st['cpu_busy_s'] / n * 1e3:.3f}: select "
              f"{st['cpu_select_s'] / n * 1e3:.3f}, of it scoring {st['cpu_score_s'] / n * 1e3:.3f}; attention + merge "
              f"{st['cpu_attend_s'] / n * 1e3:.3f}; {st['cpu_bytes'] / n / 1e6:.1f} MB) | op {op_s * 1e3:.3f} ms per "
              f"call ({int(out[2].sum()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
