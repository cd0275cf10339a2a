"""Probe: how much a concurrent PCIe read (H2D copies of page-locked memory) slows the CPU's reads of host memory.

The CPU side of a shared decode step reads scattered 8 KiB runs (one block-16 K/V unit each) while the GPU reads
other blocks over PCIe; both come from one host DRAM. This times, in turns, on `--threads` threads:
  - a scattered read (fluxion._C.scatter_read over random 8 KiB runs of an 8 GiB page-locked arena, as many
    bytes as one 128K layer's CPU task reads) and a streaming read (fluxion._C.stream_read of 256 MiB slices),
    each alone and while a side stream copies 2 GiB page-locked buffers to the GPU;
  - the H2D copies alone, and while the CPU reads scattered runs without pause.
Each CPU figure is the median of 24 calls; a different set of runs (or slice) each call, so no call is served
from the last one's cache. Session 12's numbers are in BENCHMARKS.md (Decode step, run 4).

  python benchmarks/probe_reads_beside_h2d.py [--threads 14] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fluxion  # noqa: F401  (loads the extension)
from fluxion import _C

GiB = 1 << 30
RUN_BYTES = 8192  # one block-16 unit: K[16, 128] + V[16, 128] in BF16
RUNS_PER_CALL = 10600  # ~87 MB: the K/V one 128K Llama layer's CPU task reads at budget 0.05


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=14)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device (it times H2D copies)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    arena = torch.empty(8 * GiB, dtype=torch.uint8).pin_memory()
    arena.fill_(1)
    src = torch.empty(2 * GiB, dtype=torch.uint8).pin_memory()
    src.fill_(2)
    dst = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")
    g = torch.Generator().manual_seed(0)
    run_sets = [torch.randperm(arena.numel() // RUN_BYTES, generator=g)[:RUNS_PER_CALL].sort().values * RUN_BYTES
                for _ in range(8)]
    slices = [arena[i * 256 * (1 << 20):(i + 1) * 256 * (1 << 20)] for i in range(8, 24)]
    side = torch.cuda.Stream()

    def scattered(i: int) -> float:
        t = time.perf_counter()
        _C.scatter_read(arena, run_sets[i % len(run_sets)], RUN_BYTES, a.threads)
        return RUNS_PER_CALL * RUN_BYTES / (time.perf_counter() - t) / 1e9

    def streaming(i: int) -> float:
        s = slices[i % len(slices)]
        t = time.perf_counter()
        _C.stream_read(s, a.threads)
        return s.numel() / (time.perf_counter() - t) / 1e9

    def copies(n: int) -> None:
        with torch.cuda.stream(side):
            for _ in range(n):
                dst.copy_(src, non_blocking=True)

    def cpu_rate(fn, beside_copies: bool) -> float:
        if beside_copies:
            copies(30)  # ~1.2 s of copies: longer than the 24 calls below
            time.sleep(0.05)
        rate = statistics.median(fn(i) for i in range(24))
        side.synchronize()
        return rate

    def h2d_alone() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        copies(10)
        side.synchronize()
        return 10 * src.numel() / (time.perf_counter() - t) / 1e9

    print(f"# {torch.cuda.get_device_name()} | {a.threads} CPU threads | scattered runs of {RUN_BYTES} B")
    for r in range(a.rounds):
        for name, fn in (("scattered 8 KiB runs", scattered), ("streaming", streaming)):
            alone, beside = cpu_rate(fn, False), cpu_rate(fn, True)
            print(f"round {r} {name:20s} CPU alone {alone:6.1f} GB/s | beside H2D copies {beside:6.1f} GB/s "
                  f"({beside / alone:.2f}x)", flush=True)
        print(f"round {r} H2D copies alone {h2d_alone():.1f} GB/s", flush=True)
    # The copies' rate while the CPU reads scattered runs without pause.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(side)
    copies(20)
    end.record(side)
    rates = []
    while not end.query():
        rates.append(scattered(len(rates)))
    end.synchronize()
    print(f"H2D copies beside scattered CPU reads: {20 * src.numel() / start.elapsed_time(end) / 1e6:.1f} GB/s; "
          f"CPU scattered {statistics.median(rates):.1f} GB/s over {len(rates)} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
