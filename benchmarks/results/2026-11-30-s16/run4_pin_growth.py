"""Run 4's probe (H200): (A) how long a pinned HostKVStore's growth takes (commit + cudaHostRegister of the new
chunk) as the store grows; (B) whether a cudaHostRegister on another thread stalls this thread's CUDA calls
(kernel launches + synchronize), i.e. whether pinning ahead on a background thread would keep decode steps free
of the stall."""
import ctypes
import mmap
import statistics
import sys
import threading
import time

import torch

import fluxion


def part_a(layers=32, hkv=8, d=128, batch=2, ctx=131072, chunk=8192):
    store = fluxion.HostKVStore(layers, hkv, d, torch.bfloat16, pin=True)
    seqs = [store.add_sequence() for _ in range(batch)]
    k = torch.zeros(batch, hkv, chunk, d, dtype=torch.bfloat16)
    grown = []
    t_all = time.perf_counter()
    for start in range(0, ctx, chunk):
        for layer in range(layers):
            before = store.stats()["pinned_bytes"]
            t = time.perf_counter()
            store.append(layer, seqs, k, k)
            dt = time.perf_counter() - t
            after = store.stats()["pinned_bytes"]
            if after != before:
                grown.append((before / 2**30, (after - before) / 2**30, dt))
    print(f"A: filled {batch} x {ctx} tokens x {layers} layers in {time.perf_counter() - t_all:.1f} s; growths:")
    for b, g, dt in grown:
        print(f"   at {b:6.2f} GiB pinned: +{g:6.2f} GiB in {dt * 1e3:8.1f} ms ({g / dt:.1f} GiB/s incl. the append)")
    del store


def part_b(gib=4):
    cuda = ctypes.CDLL("libcuda.so.1")
    n = gib << 30
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    for off in range(0, n, 1 << 21):  # fault it in (as the store's commit + prefault would)
        buf[off] = 1
    ptr = ctypes.c_void_p.from_buffer(buf)
    addr = ctypes.addressof(ptr)
    x = torch.zeros(1024, device="cuda")
    torch.cuda.synchronize()
    ctx = ctypes.c_void_p()
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
    done = threading.Event()
    reg = {}

    def register():
        assert cuda.cuCtxSetCurrent(ctx) == 0
        t = time.perf_counter()
        rc = cuda.cuMemHostRegister_v2(ctypes.c_void_p(addr), ctypes.c_size_t(n), 0x1 | 0x2)  # portable | mapped
        reg["s"], reg["rc"] = time.perf_counter() - t, rc
        done.set()

    def loop(until):
        lat = []
        while not until():
            t = time.perf_counter()
            x.add_(1)
            torch.cuda.synchronize()
            lat.append(time.perf_counter() - t)
        return lat

    t0 = time.perf_counter()
    base = loop(lambda: time.perf_counter() - t0 > 0.5)
    th = threading.Thread(target=register)
    th.start()
    during = loop(done.is_set)
    th.join()
    print(f"B: cuMemHostRegister of {gib} GiB on another thread: {reg['s'] * 1e3:.1f} ms (rc {reg['rc']}); "
          f"this thread's launch+sync: {len(base)} alone, median {statistics.median(base) * 1e6:.1f} us, max "
          f"{max(base) * 1e6:.1f} us; {len(during)} during, median {statistics.median(during) * 1e6:.1f} us, max "
          f"{max(during) * 1e6:.1f} us")
    t = time.perf_counter()
    cuda.cuMemHostUnregister(ctypes.c_void_p(addr))
    print(f"   unregister {(time.perf_counter() - t) * 1e3:.1f} ms")
    del ptr


if __name__ == "__main__":
    part_b(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    part_a()
