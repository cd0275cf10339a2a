"""Probe: how much a concurrent PCIe read (H2D copies of page-locked memory) slows the CPU's reads of host memory.

The CPU side of a shared decode step reads scattered 8 KiB runs (one block-16 K/V unit each) while the GPU reads
other blocks over PCIe; both come from one host DRAM. Each round measures, on `--threads` threads:
  - the scattered read alone: fluxion._C.scatter_read over random 8 KiB runs of an 8 GiB page-locked arena, as
    many bytes per call as one 128K layer's CPU task reads (median of 24 calls, a different set of runs each);
  - the scattered read beside H2D copies, and the copies' rate meanwhile (common.combined_read_bandwidth);
  - the streaming read alone and beside the copies (common.host_read_bandwidth / combined_read_bandwidth);
  - the H2D copies alone (common.h2d_bandwidth).
Session 12's numbers are in BENCHMARKS.md (Decode step, run 4).

  python benchmarks/probe_reads_beside_h2d.py [--threads 14] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import combined_read_bandwidth, h2d_bandwidth, host_read_bandwidth  # noqa: E402

from fluxion import _C  # noqa: E402

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
    arena = torch.ones(8 * GiB, dtype=torch.uint8).pin_memory()
    g = torch.Generator().manual_seed(0)
    run_sets = [torch.randperm(arena.numel() // RUN_BYTES, generator=g)[:RUNS_PER_CALL].sort().values * RUN_BYTES
                for _ in range(8)]
    calls = 0

    def scattered() -> int:  # one call over the next set of runs; bytes read
        nonlocal calls
        _C.scatter_read(arena, run_sets[calls % len(run_sets)], RUN_BYTES, a.threads)
        calls += 1
        return RUNS_PER_CALL * RUN_BYTES

    def scattered_alone() -> float:
        rates = []
        for _ in range(24):
            start = time.perf_counter()
            n = scattered()
            rates.append(n / (time.perf_counter() - start) / 1e9)
        return statistics.median(rates)

    print(f"# {torch.cuda.get_device_name()} | {a.threads} CPU threads | scattered runs of {RUN_BYTES} B")
    for r in range(a.rounds):
        alone = scattered_alone()
        beside = combined_read_bandwidth(a.threads, cpu_read=scattered)
        print(f"round {r} scattered 8 KiB runs: CPU alone {alone:6.1f} GB/s | beside H2D copies {beside['cpu']:6.1f} "
              f"GB/s ({beside['cpu'] / alone:.2f}x), the copies {beside['pcie']:.1f} GB/s", flush=True)
        alone = host_read_bandwidth(a.threads)["simd_loop"]
        beside = combined_read_bandwidth(a.threads)
        print(f"round {r} streaming:            CPU alone {alone:6.1f} GB/s | beside H2D copies {beside['cpu']:6.1f} "
              f"GB/s ({beside['cpu'] / alone:.2f}x), the copies {beside['pcie']:.1f} GB/s", flush=True)
        print(f"round {r} H2D copies alone {h2d_bandwidth():.1f} GB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
