"""Host KV store: layout round trip, incremental metadata, growth, accounting, byte cap, bad input."""

from __future__ import annotations

import pytest
import torch

import fluxion
from fluxion import reference as R
from conftest import fill_store, make_kv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("chunks", [(None,), (1, 1, 15, 17, 100, 1, 300), (333,)])
def test_round_trip_and_incremental_metadata(dtype, d, chunks):
    n = 1000
    k, v, _ = make_kv(2, 2, n, d, dtype)
    store = fluxion.HostKVStore(2, 2, d, dtype)
    seqs = fill_store(store, 1, k, v, chunks)
    for b, s in enumerate(seqs):
        kk, vv = store.gather(1, s)
        assert torch.equal(kk, k[b]) and torch.equal(vv, v[b])
        assert store.seq_len(1, s) == n and store.seq_len(0, s) == 0
        for bs in (16, 32, 64, 128):
            meta = store.block_metadata(1, s, bs)
            for h in range(2):
                mn, mx = R.block_minmax(k[b, h], bs)
                assert torch.equal(meta[h, :, 0].float(), mn), (bs, h)
                assert torch.equal(meta[h, :, 1].float(), mx), (bs, h)


@pytest.mark.parametrize("page_tokens", [1024, 256])
@pytest.mark.parametrize("n, chunks", [(2500, (1, 15, 17, 1000, 1, 700)), (1025, (None,)), (3071, (1023, 1, 1, 33))])
def test_round_trip_across_pages(page_tokens, n, chunks):
    """K/V read back equal what was appended for odd lengths and odd chunks crossing page boundaries."""
    k, v, _ = make_kv(1, 2, n, 64, torch.bfloat16)
    store = fluxion.HostKVStore(1, 2, 64, torch.bfloat16, page_tokens=page_tokens)
    s = fill_store(store, 0, k, v, chunks)[0]
    kk, vv = store.gather(0, s)
    assert torch.equal(kk, k[0]) and torch.equal(vv, v[0])
    assert store.frame_table(0, [s]).shape[1] == -(-n // page_tokens)
    for bs in (16, 128):
        meta = store.block_metadata(0, s, bs)
        mn, mx = R.block_minmax(k[0, 1], bs)
        assert torch.equal(meta[1, :, 0].float(), mn) and torch.equal(meta[1, :, 1].float(), mx)


def test_page_layout_block_is_one_contiguous_run():
    """Pins csrc/core/layout.h: a page is P/16 units K[16, D] | V[16, D], then the min/max tables at 16, 32,
    64, 128; a BS-aligned block of BS tokens is one contiguous run of 2*BS*D elements. Default P = 1024."""
    d, hkv, n = 64, 2, 2100
    store = fluxion.HostKVStore(1, hkv, d, torch.bfloat16)
    P = store.page_tokens
    assert P == 1024
    assert store.page_elems == 2 * P * d + sum(P // g for g in (16, 32, 64, 128)) * 2 * d
    k, v, _ = make_kv(1, hkv, n, d, torch.bfloat16)
    s = fill_store(store, 0, k, v, (700, 1000))[0]
    pages, ft = store.pages(), store.frame_table(0, [s])[0].tolist()
    for h in range(hkv):
        for bs in (16, 32, 64, 128):
            for t0 in range(0, n // bs * bs, bs):
                page = pages[ft[t0 // P], h]
                off = (t0 % P) * 2 * d  # block_offset: t0 / 16 units of 32 * D elements
                run = page[off:off + 2 * bs * d].view(bs // 16, 2, 16, d)
                assert torch.equal(run[:, 0].reshape(bs, d), k[0, h, t0:t0 + bs]), (h, bs, t0)
                assert torch.equal(run[:, 1].reshape(bs, d), v[0, h, t0:t0 + bs]), (h, bs, t0)
        meta = store.block_metadata(0, s, 16)[h]
        for f in range(len(ft)):
            table = pages[ft[f], h, 2 * P * d:2 * P * d + (P // 16) * 2 * d].view(P // 16, 2, d)
            rows = meta[f * (P // 16):(f + 1) * (P // 16)]
            assert torch.equal(table[:rows.shape[0]], rows)


def test_decode_appends_one_token_at_a_time_match_prefill():
    k, v, _ = make_kv(1, 2, 300, 64, torch.bfloat16)
    a = fluxion.HostKVStore(1, 2, 64, torch.bfloat16)
    b = fluxion.HostKVStore(1, 2, 64, torch.bfloat16)
    sa = fill_store(a, 0, k, v)[0]
    sb = b.add_sequence()
    for t in range(300):
        b.append(0, [sb], k[:, :, t:t + 1], v[:, :, t:t + 1])
    for bs in (16, 32, 64, 128):
        assert torch.equal(a.block_metadata(0, sa, bs), b.block_metadata(0, sb, bs))
    assert torch.equal(a.gather(0, sa)[0], b.gather(0, sb)[0])


def test_mixed_lengths_and_valid_mask():
    k, v, _ = make_kv(3, 2, 50, 64, torch.float16)
    valid = torch.ones(3, 50, dtype=torch.bool)
    valid[0, :20] = False  # left padding
    valid[2, 10:] = False
    store = fluxion.HostKVStore(1, 2, 64, torch.float16)
    seqs = [store.add_sequence() for _ in range(3)]
    store.append(0, seqs, k, v, valid)
    assert store.seq_lens(0, seqs).tolist() == [30, 50, 10]
    assert torch.equal(store.gather(0, seqs[0])[0], k[0, :, 20:])
    assert torch.equal(store.gather(0, seqs[2])[1], v[2, :, :10])


def test_frames_are_reused_and_accounting():
    d, hkv = 128, 4
    # pin=False: the default pins the store wherever a CUDA device is visible (see test_cuda for pinned stores)
    store = fluxion.HostKVStore(2, hkv, d, torch.bfloat16, page_tokens=256, pin=False)
    k, v, _ = make_kv(1, hkv, 600, d, torch.bfloat16)
    s = fill_store(store, 0, k, v)[0]
    st = store.stats()
    assert st["kv_bytes"] == 600 * hkv * 2 * d * 2
    blocks = sum(-(-600 // g) for g in (16, 32, 64, 128))
    assert st["metadata_bytes"] == blocks * hkv * 2 * d * 2
    assert st["frames_in_use"] == 3  # ceil(600 / 256)
    assert st["pinned_bytes"] == 0 and not store.pinned
    assert store.wait_pinned_ahead() == 0  # pinning ahead is for pinned stores only
    assert st["committed_bytes"] >= st["allocated_bytes"] > st["kv_bytes"]
    store.free_sequence(s)
    committed = store.stats()["committed_bytes"]
    s2 = fill_store(store, 1, k, v)[0]
    assert store.stats()["committed_bytes"] == committed  # freed frames reused, nothing new committed
    assert torch.equal(store.gather(1, s2)[0], k[0])


def test_growth_keeps_earlier_pages_and_views_valid():
    store = fluxion.HostKVStore(1, 8, 128, torch.bfloat16)
    k, v, _ = make_kv(1, 8, 4096, 128, torch.bfloat16)
    s = store.add_sequence()
    store.append(0, [s], k[:, :, :100], v[:, :, :100])
    early_pages = store.pages()
    store.append(0, [s], k[:, :, 100:], v[:, :, 100:])  # commits more memory (64 MiB chunks)
    assert early_pages.shape[0] <= store.pages().shape[0]
    assert torch.equal(store.gather(0, s)[0], k[0])


def test_byte_cap_fails_before_storing_anything():
    d, hkv = 64, 2
    frame_bytes = hkv * fluxion.HostKVStore(1, hkv, d, page_tokens=256).page_elems * 2
    store = fluxion.HostKVStore(1, hkv, d, torch.bfloat16, page_tokens=256, byte_cap=5 * frame_bytes + 8192)
    k, v, _ = make_kv(2, hkv, 800, d, torch.bfloat16)
    seqs = [store.add_sequence() for _ in range(2)]
    store.append(0, seqs, k[:, :, :300], v[:, :, :300])  # 2 sequences x 2 frames: fits in 5
    before = [store.gather(0, s) for s in seqs]
    meta_before = [store.block_metadata(0, s, 16) for s in seqs]
    stats_before = store.stats()
    with pytest.raises(fluxion.CapacityError, match="byte_cap"):
        store.append(0, seqs, k[:, :, 300:], v[:, :, 300:])
    assert store.stats() == stats_before
    for s, (kk, vv), m in zip(seqs, before, meta_before):
        assert torch.equal(store.gather(0, s)[0], kk) and torch.equal(store.gather(0, s)[1], vv)
        assert torch.equal(store.block_metadata(0, s, 16), m)
    # still usable: a smaller append that fits succeeds
    store.append(0, seqs[:1], k[:1, :, 300:301], v[:1, :, 300:301])
    assert store.seq_len(0, seqs[0]) == 301


def test_cap_smaller_than_one_frame():
    store = fluxion.HostKVStore(1, 1, 64, torch.bfloat16, byte_cap=4096)
    s = store.add_sequence()
    k = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(fluxion.CapacityError):
        store.append(0, [s], k, k)
    assert store.seq_len(0, s) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=96), "head_dim must be 64 or 128"),
        (dict(page_tokens=100), "page_tokens must be a positive multiple of 128"),
        (dict(num_layers=0), "num_layers must be positive"),
        (dict(dtype=torch.float32), "dtype must be"),
        (dict(byte_cap=-5), "byte_cap"),
    ],
)
def test_bad_construction(kwargs, match):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    args.update(kwargs)
    with pytest.raises((RuntimeError, ValueError), match=match):
        fluxion.HostKVStore(**args)


def test_pin_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="pin=True needs"):
        fluxion.HostKVStore(1, 1, 64, pin=True)


def test_bad_append_leaves_store_unchanged():
    store = fluxion.HostKVStore(2, 2, 64, torch.bfloat16)
    k, v, _ = make_kv(1, 2, 40, 64, torch.bfloat16)
    s = fill_store(store, 0, k, v)[0]
    snap = store.gather(0, s)
    bad = [
        (dict(k=k.float(), v=v.float()), "k must have the store's dtype"),
        (dict(k=k[:, :1], v=v[:, :1]), r"k.size\(1\) must be num_kv_heads"),
        (dict(k=k, v=v[:, :, :3]), "v must have k's shape"),
        (dict(k=k[0], v=v[0]), "k must be 4-D"),
        (dict(k=torch.zeros(1, 2, 4, 128, dtype=torch.bfloat16), v=torch.zeros(1, 2, 4, 128, dtype=torch.bfloat16)),
         r"k.size\(3\) must be head_dim"),
    ]
    for kw, match in bad:
        with pytest.raises(RuntimeError, match=match):
            store.append(0, [s], **kw)
    with pytest.raises(RuntimeError, match="layer must be in"):
        store.append(5, [s], k, v)
    with pytest.raises(RuntimeError, match="unknown sequence id"):
        store.append(0, [s + 7], k, v)
    with pytest.raises(RuntimeError, match="k has 1 rows but seq_ids has 2"):
        store.append(0, [s, s], k, v)
    with pytest.raises(RuntimeError, match="valid must be"):
        store.append(0, [s], k, v, torch.ones(1, 3, dtype=torch.bool))
    kk, vv = store.gather(0, s)
    assert torch.equal(kk, snap[0]) and torch.equal(vv, snap[1]) and store.seq_len(0, s) == 40
