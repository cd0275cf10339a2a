"""Shared benchmark helpers: environment metadata, bandwidth ceilings, result writing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

# Run from a checkout without installing: the repository root (which holds the built fluxion/_C) first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fluxion.__main__ import cpu_model  # noqa: E402


def git_sha() -> str:
    """The commit measured: $FLUXION_GIT_SHA when set (copies of the tree without .git), else git's HEAD."""
    if os.environ.get("FLUXION_GIT_SHA"):
        return os.environ["FLUXION_GIT_SHA"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    import fluxion

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "git_sha": git_sha(),
        "simd": fluxion.build_info()["simd"],
    }
    return env


def build_store(ctx: int, layers: int, hkv: int, d: int, batch: int = 1, pin: bool = False, seed: int = 0,
                chunk: int = 8192, page_tokens: int = 1024, random: bool = True):
    """A HostKVStore with `layers` layers of `batch` sequences of `ctx` BF16 tokens each: random, or zeros when
    the values do not matter (no generator time)."""
    import fluxion

    store = fluxion.HostKVStore(layers, hkv, d, torch.bfloat16, page_tokens=page_tokens, pin=pin)
    seqs = [store.add_sequence() for _ in range(batch)]
    g = torch.Generator().manual_seed(seed)
    zeros = None if random else torch.zeros(batch, hkv, min(chunk, ctx), d, dtype=torch.bfloat16)
    for layer in range(layers):
        for start in range(0, ctx, chunk):
            t = min(chunk, ctx - start)
            if random:
                k = torch.randn(batch, hkv, t, d, generator=g).to(torch.bfloat16)
                v = torch.randn(batch, hkv, t, d, generator=g).to(torch.bfloat16)
            else:
                k = v = zeros[:, :, :t]
            store.append(layer, seqs, k, v)
    return store, seqs


def llc_bytes() -> int:
    """Size of the largest CPU cache (the last level) in bytes, from sysfs; 64 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in (os.listdir(base) if os.path.isdir(base) else []):
        try:
            text = open(os.path.join(base, entry, "size")).read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return best or 64 << 20


class ColdCache:
    """Times calls that start with none of their data in the CPU caches, as in a real decode step, where the
    model's whole KV (gigabytes) passes between two uses of a layer. Before each timed call a buffer of twice the
    last-level cache is read on every thread, which evicts what the previous calls left there. (A rotation over a
    few layers is not enough: this host's L3 of 300 MiB holds several 128K layers' metadata and selected blocks.)"""

    def __init__(self):
        self.buf = torch.ones(2 * llc_bytes() // 4, dtype=torch.float32)
        self.threads = os.cpu_count() or 1

    def flush(self, threads: int) -> None:
        """Evicts the caches (reads the buffer on every core), then leaves `threads` threads set for the call."""
        torch.set_num_threads(self.threads)
        self.buf.sum()
        torch.set_num_threads(threads)

    def interleaved(self, fns: dict, threads: int, min_run_time: float, min_reps: int = 15,
                    max_reps: int = 400) -> dict:
        """Seconds of each call of fns (name -> callable), each from a cold cache, the calls taking turns rep by
        rep: on a host whose speed drifts, rep i of every fn saw about the same host, so per-rep ratios between
        them hold where ratios of medians taken minutes apart do not. Returns name -> list of seconds."""
        times: dict = {name: [] for name in fns}
        while True:
            reps = len(next(iter(times.values())))
            if reps >= max_reps or (reps >= min_reps and sum(sum(v) for v in times.values()) >= min_run_time):
                return times
            for name, fn in fns.items():
                self.flush(threads)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)


def huge_page_share(tensor: torch.Tensor) -> float | None:
    """Fraction of the memory under `tensor` (e.g. the store's arena) that the kernel maps with transparent huge
    pages, from /proc/self/smaps; None where that file is missing. Scattered 4 KiB block reads miss the TLB on
    every block without them."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    lo, hi = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    rss = huge = 0
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and b > lo
        elif inside and head in ("Rss:", "AnonHugePages:"):
            kb = int(line.split()[1])
            rss, huge = (rss + kb, huge) if head == "Rss:" else (rss, huge + kb)
    return huge / rss if rss else None


def host_read_bandwidth(threads: int, gib: float = 2.0, min_run_time: float = 0.5) -> dict:
    """Streaming-read ceiling in GB/s on `threads` threads of ATen's pool (the pool the CPU kernels use), over
    a buffer far larger than the last-level cache, measured two ways: a float32 ``torch.sum`` and Fluxion's
    plain SIMD load loop (``fluxion._C.stream_read``: widest loads summed into four accumulators, one
    contiguous slice per thread). The ceiling is the better of the two: the best plain read we can measure.
    Returns {"torch_sum": GB/s, "simd_loop": GB/s or None when the extension lacks it, "ceiling": max}."""
    from torch.utils.benchmark import Timer

    import fluxion

    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)

    def gbps(stmt, globs):
        t = Timer(stmt, globals=globs, num_threads=threads).blocked_autorange(min_run_time=min_run_time)
        return buf.numel() * 4 / t.median / 1e9

    out = {"torch_sum": gbps("buf.sum()", {"buf": buf}), "simd_loop": None}
    if fluxion._C is not None and hasattr(fluxion._C, "stream_read"):
        out["simd_loop"] = gbps("read(buf, 0)", {"buf": buf, "read": fluxion._C.stream_read})
    out["ceiling"] = max(v for v in (out["torch_sum"], out["simd_loop"]) if v is not None)
    return out


def h2d_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Page-locked host -> device copy bandwidth in GB/s (median of `reps` copies of `nbytes`)."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[1:])
    return nbytes / times[len(times) // 2] / 1e9


def combined_read_bandwidth(threads: int, gib: float = 2.0, copies: int = 48, copy_mib: int = 512,
                            cpu_read=None) -> dict:
    """Both readers of host memory at once: `threads` CPU threads streaming-read one buffer (Fluxion's SIMD
    loop) while the GPU copies another page-locked buffer to the device. The shared decode step has both
    devices read host DRAM like this, so their sum — not host-read + PCIe measured apart — is what it can
    reach where DRAM is the limit. The copies are enqueued first; the CPU reads while they run, and the GPU
    rate counts only copies that ended within the CPU's reading time. cpu_read: another CPU read to run
    beside the copies instead of the streaming read (a callable that reads once and returns the bytes read).
    Returns {"cpu": GB/s, "pcie": GB/s, "total": GB/s} (needs a GPU and the CPU extension)."""
    import fluxion

    if cpu_read is None:
        buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)

        def cpu_read():
            fluxion._C.stream_read(buf, threads)
            return buf.numel() * 4

    host = torch.empty(copy_mib << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    cpu_read()  # warm: pages touched, threads up
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(copies)]
    start.record()
    for e in ends:
        dev.copy_(host, non_blocking=True)
        e.record()
    t0, reads, nbytes = time.perf_counter(), 0, 0
    while reads < 3 or (time.perf_counter() - t0 < 0.5 and not ends[-1].query()):
        nbytes += cpu_read()
        reads += 1
    cpu_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    done = [start.elapsed_time(e) / 1e3 for e in ends]
    within = [t for t in done if t <= cpu_s] or done[:1]
    pcie = len(within) * host.numel() / within[-1] / 1e9
    cpu = nbytes / cpu_s / 1e9
    return {"cpu": cpu, "pcie": pcie, "total": cpu + pcie}


def write_rows(path: str | None, rows: list[dict], env: dict) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
