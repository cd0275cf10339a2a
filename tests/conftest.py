"""Shared fixtures: CPU always; CUDA only when a GPU is present and the op has a CUDA kernel.
No CUDA call happens at import or collection time."""

from __future__ import annotations

import pytest
import torch

import fluxion


def cuda_kernels_available() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::score_blocks", "CUDA")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not cuda_kernels_available():
        pytest.skip("no GPU or no CUDA kernels in this build")
    return torch.device(request.param)


@pytest.fixture(params=fluxion._C.simd_supported() if fluxion._C else ["scalar"])
def simd(request):
    """Runs a test once per SIMD level this CPU supports, restoring the default afterwards."""
    before = fluxion._C.simd_level()
    fluxion.set_simd_level(request.param)
    yield request.param
    fluxion.set_simd_level(before)


def make_kv(batch, hkv, n, d, dtype, seed=0, needles=True):
    """Random K/V with realistic structure: large-norm sink keys, a few 'needle' keys aligned with a
    direction the queries share, everything else Gaussian. Returns (k, v) [B, Hkv, N, D] and the
    shared query direction [D]."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, hkv, n, d, generator=g)
    v = torch.randn(batch, hkv, n, d, generator=g)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    k[:, :, : min(4, n)] *= 4.0  # sink-like
    if needles and n > 8:
        for b in range(batch):
            pos = torch.randint(0, n, (3,), generator=g)
            k[b, :, pos] += 6.0 * direction
    return k.to(dtype), v.to(dtype), direction


def make_q(batch, hq, d, dtype, direction=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, d, generator=g)
    if direction is not None:
        q += 2.0 * direction
    return q.to(dtype)


def fill_store(store, layer, k, v, chunks=(None,)):
    """Append [B, Hkv, N, D] to fresh sequences, split into chunks of the given sizes (None = rest)."""
    seqs = [store.add_sequence() for _ in range(k.shape[0])]
    start = 0
    n = k.shape[2]
    for c in chunks:
        end = n if c is None else min(n, start + c)
        if end > start:
            store.append(layer, seqs, k[:, :, start:end], v[:, :, start:end])
        start = end
    if start < n:
        store.append(layer, seqs, k[:, :, start:], v[:, :, start:])
    return seqs
