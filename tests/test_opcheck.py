"""torch.library.opcheck over every fluxion op, with samples on each available device, and a guard
that fails when an op has no samples."""

from __future__ import annotations

import torch

import fluxion
from conftest import make_kv, make_q


def _store_args(device, dtype=torch.bfloat16, d=64, lens=(700, 97), hkv=2):
    k, v, direction = make_kv(len(lens), hkv, max(lens), d, dtype)
    pin = device.type == "cuda"
    store = fluxion.HostKVStore(1, hkv, d, dtype, pin=pin)
    seqs = [store.add_sequence() for _ in lens]
    for b, n in enumerate(lens):
        store.append(0, [seqs[b]], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
    a = store.layer_args(0, seqs, device=device)
    if device.type == "cuda":
        # opcheck runs the op on copies of its inputs, and a copy of page-locked memory is pageable, which the
        # zero-copy kernels reject; the CUDA ops also accept the arena as a device tensor (read from HBM).
        a["pages"] = a["pages"].to(device)
    q = make_q(len(lens), hkv * 4, d, dtype, direction).to(device)
    return store, a, q, k, v


def samples(device):
    """(op, args) pairs; the store objects are kept alive by the returned list."""
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        store, a, q, k, v = _store_args(device, dtype)
        B, Hq = q.shape[:2]
        hkv = a["pages"].shape[1]
        base = (q, a["pages"], a["frame_table"], a["seq_lens"])
        out.append((store, torch.ops.fluxion.score_blocks.default, (*base, a["page_tokens"], 32, 64, 256)))
        idx = torch.randint(-1, 20, (B, Hq, 3), dtype=torch.int32).to(device)
        out.append((store, torch.ops.fluxion.sparse_attention.default,
                    (*base, idx, a["page_tokens"], 32, 64, 256, 0.125)))
        budgets = torch.full((B, Hq), 0.1, device=device)
        bsz = torch.full((B, hkv), 16, dtype=torch.int32, device=device)
        groups = torch.arange(B * hkv, dtype=torch.int32, device=device)
        out.append((store, torch.ops.fluxion.retrieval_attention.default,
                    (*base, budgets, bsz, groups, a["page_tokens"], 64, 256, 0.125)))
        k_win = torch.randn(B, hkv, 320, 64).to(dtype).to(device)
        v_win = torch.randn(B, hkv, 320, 64).to(dtype).to(device)
        lens = torch.tensor([700, 97], dtype=torch.int32, device=device)
        out.append((None, torch.ops.fluxion.window_attention.default, (q, k_win, v_win, lens, 64, 0.125)))
        pos = torch.tensor([[699], [96]], dtype=torch.int32, device=device)
        out.append((None, torch.ops.fluxion.window_append.default,
                    (k_win.clone(), v_win.clone(), k[:, :, :1].to(device), v[:, :, :1].to(device), pos, 64)))
    scores = torch.randn(5, 40, device=device)
    out.append((None, torch.ops.fluxion.topk_blocks.default,
                (scores, torch.tensor([3, 0, 40, 7, 1], dtype=torch.int32, device=device), 8)))
    outs = torch.randn(3, 2, 4, 64, device=device)
    lses = torch.randn(3, 2, 4, device=device)
    lses[1, 0] = float("-inf")
    out.append((None, torch.ops.fluxion.merge_attention_states.default, (outs, lses)))
    return out


def test_every_op_has_samples():
    ops = {name for name in dir(torch.ops.fluxion) if not name.startswith("_")}
    registered = {n for n in ops if hasattr(getattr(torch.ops.fluxion, n), "default")}
    sampled = {op.__name__.split(".")[0] for _, op, _ in samples(torch.device("cpu"))}
    missing = registered - sampled
    assert not missing, f"ops without opcheck samples: {sorted(missing)}"


def test_opcheck(device):
    for _, op, args in samples(device):
        torch.library.opcheck(op, args)


def test_compile_with_fake_kernels():
    """The fake kernels let torch.compile trace the ops (no graph breaks) on CPU."""
    store, a, q, _, _ = _store_args(torch.device("cpu"))
    hkv = a["pages"].shape[1]
    budgets = torch.full(q.shape[:2], 0.1)
    bsz = torch.full((q.shape[0], hkv), 16, dtype=torch.int32)

    def step(q):
        out, lse, _ = fluxion.retrieval_attention(q, **a, budgets=budgets, block_sizes=bsz)
        return out * 2, lse

    eager = step(q)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(eager, compiled)
