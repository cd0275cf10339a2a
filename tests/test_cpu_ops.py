"""CPU ops against the independent fp32 reference, with the invariants of STYLE.md."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fluxion
from fluxion import reference as R
from conftest import make_kv, make_q

SINK, LOCAL = 64, 256
ATOL, RTOL = 1e-4, 1e-3  # fp32 accumulation of exact bf16/fp16 products: far inside 2x a bf16 PyTorch impl


def build(batch, hq, hkv, lens, d, dtype, seed=0, page_tokens=256):
    nmax = max(lens)
    k, v, direction = make_kv(batch, hkv, nmax, d, dtype, seed=seed)
    store = fluxion.HostKVStore(1, hkv, d, dtype, page_tokens=page_tokens)
    seqs = [store.add_sequence() for _ in range(batch)]
    for b, n in enumerate(lens):
        if n:
            store.append(0, [seqs[b]], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
    q = make_q(batch, hq, d, dtype, direction, seed=seed + 1)
    return store, seqs, q, k, v


def assert_selection_close(got, want, scores):
    """Same selected set, except swaps between blocks whose reference scores tie within float noise."""
    g = set(int(x) for x in got if x >= 0)
    w = set(int(x) for x in want if x >= 0)
    if g == w:
        return
    diff = g ^ w
    thr = min(float(scores[j]) for j in w) if w else 0.0
    for j in diff:
        assert abs(float(scores[j]) - thr) <= 1e-4 * max(1.0, abs(thr)), (sorted(g), sorted(w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_score_blocks_matches_reference(dtype, d, bs, simd):
    lens = [1000, 333, 17]
    store, seqs, q, k, _ = build(3, 8, 2, lens, d, dtype)
    scores = fluxion.score_blocks(q, **store.layer_args(0, seqs), block_size=bs)
    for b, n in enumerate(lens):
        for kvh in range(2):
            ref = R.quest_scores(q[b, kvh * 4:(kvh + 1) * 4], k[b, kvh], n, bs, SINK, LOCAL, num_blocks=scores.shape[-1])
            torch.testing.assert_close(scores[b, kvh * 4:(kvh + 1) * 4], ref, atol=1e-3, rtol=1e-5)


def test_score_blocks_in_chunks_across_pages_matches_reference():
    # The op scores in chunks of 512 blocks spread over the threads: 9000 tokens at block 16 are 2 chunks per group,
    # the first one starting at the sink's block and the second inside a page.
    lens = [9000, 8500]
    store, seqs, q, k, _ = build(2, 8, 2, lens, 128, torch.bfloat16, seed=5)
    scores = fluxion.score_blocks(q, **store.layer_args(0, seqs), block_size=16)
    for b, n in enumerate(lens):
        for kvh in range(2):
            ref = R.quest_scores(q[b, kvh * 4:(kvh + 1) * 4], k[b, kvh], n, 16, SINK, LOCAL, num_blocks=scores.shape[-1])
            torch.testing.assert_close(scores[b, kvh * 4:(kvh + 1) * 4], ref, atol=1e-3, rtol=1e-5)


def test_topk_exact_with_ties_and_padding():
    scores = torch.tensor([[1.0, 5.0, 5.0, float("-inf"), 3.0, 5.0, 0.5],
                           [float("-inf")] * 7,
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    k = torch.tensor([2, 3, 3], dtype=torch.int32)
    out = fluxion.topk_blocks(scores, k, 4)
    assert out.tolist() == [[1, 2, -1, -1], [-1, -1, -1, -1], [0, 1, 2, -1]]
    # k above the finite count and above max_k
    out = fluxion.topk_blocks(scores[:1], torch.tensor([9], dtype=torch.int32), 3)
    assert out.tolist() == [[1, 2, 5]]
    out = fluxion.topk_blocks(scores[:1], torch.tensor([9], dtype=torch.int32), 8)
    assert out.tolist() == [[0, 1, 2, 4, 5, 6, -1, -1]]


@pytest.mark.parametrize("nb", [1, 17, 97, 5000])
def test_topk_random_matches_reference(nb):
    g = torch.Generator().manual_seed(nb)
    scores = torch.randn(6, nb, generator=g).round(decimals=1)  # many ties
    scores[0, ::3] = float("-inf")
    k = torch.randint(0, nb + 2, (6,), generator=g, dtype=torch.int32)
    max_k = int(k.max())
    out = fluxion.topk_blocks(scores, k, max_k)
    for r in range(6):
        assert torch.equal(out[r], R.topk_blocks(scores[r], int(k[r]), max_k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_sparse_attention_matches_reference(dtype, d, group):
    lens = [777, 97, 1]
    hkv = 2
    store, seqs, q, k, v = build(3, hkv * group, hkv, lens, d, dtype)
    bs = 32
    nb = -(-max(lens) // 256) * 256 // bs
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, nb, (3, hkv * group, 5), generator=g, dtype=torch.int32)
    out, lse = fluxion.sparse_attention(q, **store.layer_args(0, seqs), block_idx=idx, block_size=bs)
    ro, rl = R.sparse_attention(q, k, v, torch.tensor(lens), idx, bs, SINK, LOCAL, d ** -0.5)
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8, 20])  # 20: more query heads per KV head than one AMX tile holds
def test_retrieval_attention_matches_reference(dtype, d, group, simd):
    lens = [1500, 333, 97, 1]
    hkv = 2
    hq = hkv * group
    store, seqs, q, k, v = build(4, hq, hkv, lens, d, dtype)
    g = torch.Generator().manual_seed(5)
    budgets = torch.rand(4, hq, generator=g) * 0.2
    budgets[0, 0] = 0.0  # streaming head
    budgets[1, -1] = 1.0  # every block
    block_sizes = torch.tensor([[16, 128], [32, 64], [16, 16], [128, 32]], dtype=torch.int32)
    groups = torch.tensor([0, 1, 2, 3, 5, 6, 7], dtype=torch.int32)  # group 4 (b=2, kvh=0) not run
    out, lse, nbytes = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=budgets,
                                                   block_sizes=block_sizes, groups=groups)
    ro, rl = R.retrieval_attention(q, k, v, torch.tensor(lens), budgets, block_sizes, SINK, LOCAL, d ** -0.5,
                                   groups=groups.tolist())
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)
    assert torch.isinf(lse[2, :group]).all() and (out[2, :group] == 0).all() and (nbytes[2, 0] == 0)
    # bytes_read: candidates' metadata + union of selected blocks, from the reference's own selections
    for gid in groups.tolist():
        b, kvh = divmod(gid, hkv)
        n, bs = lens[b], int(block_sizes[b, kvh])
        cand = R.candidate_blocks(n, SINK, LOCAL, bs)
        scores = R.quest_scores(q[b, kvh * group:(kvh + 1) * group], k[b, kvh], n, bs, SINK, LOCAL)
        union, scored = set(), False
        for i, h in enumerate(range(kvh * group, (kvh + 1) * group)):
            kk = R.num_budget_blocks(float(budgets[b, h]), n, bs, len(cand))
            scored |= 0 < kk < len(cand)  # metadata is read only where some head takes a strict subset
            union |= set(R.topk_blocks(scores[i], kk).tolist()) if kk else set()
        want = (len(cand) * 2 * d * 2 if scored else 0) + len(union) * 2 * bs * d * 2
        assert int(nbytes[b, kvh]) == want, (gid, int(nbytes[b, kvh]), want)


@pytest.mark.parametrize("group", [4, 8])
def test_retrieval_attention_every_block_matches_reference(group, simd):
    """Mode 'full': every head takes every block, so every block is attended by the whole group at once (the
    kernels' multi-head path: V widened once for several heads, q.k of whole units on AMX where present)."""
    lens = [3000, 1234]
    hkv = 2
    hq = hkv * group
    store, seqs, q, k, v = build(2, hq, hkv, lens, 128, torch.bfloat16)
    budgets = torch.ones(2, hq)
    block_sizes = torch.tensor([[16, 32], [64, 128]], dtype=torch.int32)
    out, lse, _ = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=budgets, block_sizes=block_sizes)
    ro, rl = R.retrieval_attention(q, k, v, torch.tensor(lens), budgets, block_sizes, SINK, LOCAL, 128 ** -0.5)
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_tokens", [1024, 128])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_retrieval_window_edges_inside_units_across_pages(page_tokens, bs, simd):
    """Window edges inside a 16-token unit (sink 5, local 7) and sequences crossing page boundaries."""
    lens, hkv, group, d, sink, local = [2500, 1031], 2, 4, 64, 5, 7
    store, seqs, q, k, v = build(2, hkv * group, hkv, lens, d, torch.bfloat16, page_tokens=page_tokens)
    budgets = torch.tensor([[0.05, 0.2, 1.0, 0.01, 0.1, 0.3, 0.02, 0.5]]).repeat(2, 1)
    block_sizes = torch.full((2, hkv), bs, dtype=torch.int32)
    out, lse, _ = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=budgets, block_sizes=block_sizes,
                                              sink=sink, local=local)
    ro, rl = R.retrieval_attention(q, k, v, torch.tensor(lens), budgets, block_sizes, sink, local, d ** -0.5)
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n", [1, 64, 320, 321, 1000, 4099])
@pytest.mark.parametrize("bs", [16, 128])
def test_all_blocks_plus_window_equals_dense(n, bs):
    """Invariant: budget covering the whole context, merged with the dense window, is dense attention."""
    d, hkv, hq = 128, 2, 8
    store, seqs, q, k, v = build(1, hq, hkv, [n], d, torch.bfloat16)
    out, lse, _ = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=torch.ones(1, hq),
                                              block_sizes=torch.full((1, hkv), bs, dtype=torch.int32))
    k_win = torch.zeros(1, hkv, SINK + LOCAL, d, dtype=torch.bfloat16)
    v_win = torch.zeros_like(k_win)
    fluxion.window_append(k_win, v_win, k, v, torch.arange(n, dtype=torch.int32)[None], SINK)
    wo, wl = fluxion.window_attention(q, k_win, v_win, torch.tensor([n], dtype=torch.int32), SINK)
    mo, ml = fluxion.merge_attention_states(torch.stack([out, wo]), torch.stack([lse, wl]))
    fo, fl = R.full_attention(q, k, v, torch.tensor([n]), d ** -0.5)
    torch.testing.assert_close(mo, fo, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ml, fl, atol=ATOL, rtol=RTOL)


def test_window_attention_matches_reference_with_decode_appends():
    d, hkv, hq = 64, 2, 8
    n = 700
    k, v, direction = make_kv(2, hkv, n, d, torch.float16)
    k_win = torch.zeros(2, hkv, SINK + LOCAL, d, dtype=torch.float16)
    v_win = torch.zeros_like(k_win)
    fluxion.window_append(k_win, v_win, k[:, :, :500], v[:, :, :500],
                          torch.arange(500, dtype=torch.int32).repeat(2, 1), SINK)
    for t in range(500, n):  # decode: one token at a time; second sequence stops at 600 (padding = -1)
        pos = torch.tensor([[t], [t if t < 600 else -1]], dtype=torch.int32)
        fluxion.window_append(k_win, v_win, k[:, :, t:t + 1], v[:, :, t:t + 1], pos, SINK)
    lens = torch.tensor([n, 600], dtype=torch.int32)
    q = make_q(2, hq, d, torch.float16, direction)
    out, lse = fluxion.window_attention(q, k_win, v_win, lens, SINK)
    ro, rl = R.window_attention(q, k, v, lens, SINK, LOCAL, d ** -0.5)
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)


def test_merge_of_parts_equals_union_and_empty_parts():
    d = 64
    k, v, _ = make_kv(1, 1, 300, d, torch.float32, needles=False)
    q = make_q(1, 1, d, torch.float32)
    parts = [(0, 100), (100, 101), (101, 300)]
    outs, lses = [], []
    for lo, hi in parts:
        o, l = R.attention(q[0, 0], k[0, 0, lo:hi], v[0, 0, lo:hi], d ** -0.5)
        outs.append(o)
        lses.append(l)
    outs.append(torch.zeros(d))
    lses.append(torch.tensor(float("-inf")))  # an empty part
    mo, ml = fluxion.merge_attention_states(torch.stack(outs)[:, None], torch.stack(lses)[:, None])
    fo, fl = R.attention(q[0, 0], k[0, 0], v[0, 0], d ** -0.5)
    torch.testing.assert_close(mo[0], fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ml[0], fl, atol=1e-5, rtol=1e-5)
    eo, el = fluxion.merge_attention_states(torch.zeros(3, 2, d), torch.full((3, 2), float("-inf")))
    assert (eo == 0).all() and torch.isinf(el).all() and not torch.isnan(eo).any()


def test_empty_selection_and_short_sequences():
    store, seqs, q, k, v = build(2, 4, 1, [10, 320], 64, torch.bfloat16)
    out, lse, nbytes = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=torch.ones(2, 4),
                                                   block_sizes=torch.full((2, 1), 16, dtype=torch.int32))
    assert torch.isinf(lse).all() and (out == 0).all() and (nbytes == 0).all()
    scores = fluxion.score_blocks(q, **store.layer_args(0, seqs), block_size=16)
    assert torch.isinf(scores).all()


def test_simd_levels_agree():
    store, seqs, q, k, v = build(2, 8, 2, [2000, 900], 128, torch.bfloat16)
    args = dict(**store.layer_args(0, seqs), budgets=torch.full((2, 8), 0.05),
                block_sizes=torch.tensor([[16, 64], [32, 128]], dtype=torch.int32))
    before = fluxion._C.simd_level()
    results = {}
    try:
        for level in fluxion._C.simd_supported():
            fluxion.set_simd_level(level)
            results[level] = fluxion.retrieval_attention(q, **args)
    finally:
        fluxion.set_simd_level(before)
    base = results["scalar"]
    for level, (o, l, nbytes) in results.items():
        torch.testing.assert_close(o, base[0], atol=ATOL, rtol=RTOL, msg=level)
        torch.testing.assert_close(l, base[1], atol=ATOL, rtol=RTOL, msg=level)


def test_threads_do_not_change_results():
    store, seqs, q, k, v = build(1, 32, 8, [5000], 128, torch.bfloat16)
    args = dict(**store.layer_args(0, seqs), budgets=torch.full((1, 32), 0.05),
                block_sizes=torch.full((1, 8), 16, dtype=torch.int32))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fluxion.retrieval_attention(q, **args)
        torch.set_num_threads(max(2, n))
        many = fluxion.retrieval_attention(q, **args)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_oversubscribed_threads_match_reference():
    """A layer's scoring, top-k, union, attention and merges share one parallel phase in which a top-k waits for
    its task's last score chunk, a union for its task's last top-k and an attention item for its task's union.
    With more threads than cores (waiting threads yield to working ones) and tasks of very different sizes, every
    run must still equal the reference, bit for bit between runs."""
    lens = [3000, 700, 1, 1900]
    store, seqs, q, k, v = build(4, 16, 2, lens, 64, torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    budgets = torch.rand(4, 16, generator=g) * 0.3
    budgets[0, :8] = 1.0  # one task whose heads take every block: no scores, its top-k does not wait
    budgets[3, 8:] = 0.0  # one task with nothing to select
    block_sizes = torch.tensor([[16, 32], [16, 128], [64, 16], [32, 16]], dtype=torch.int32)
    args = dict(**store.layer_args(0, seqs), budgets=budgets, block_sizes=block_sizes)
    ro, rl = R.retrieval_attention(q, k, v, torch.tensor(lens), budgets, block_sizes, SINK, LOCAL, 64 ** -0.5)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        runs = [fluxion.retrieval_attention(q, **args) for _ in range(6)]
    finally:
        torch.set_num_threads(n)
    for out, lse, nbytes in runs:
        torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1]) and torch.equal(nbytes, runs[0][2])
    assert torch.isinf(runs[0][1][3, 8:]).all() and int(runs[0][2][3, 1]) == 0


# The tuning knobs at their extremes: scoring items of one page (40 rounds up to 64 blocks), attention items of
# 32 KiB, no software prefetch, AMX q.k for runs of a single head.
_EXTREME_KNOBS = {"FLUXION_SCORE_ITEM_BLOCKS": "40", "FLUXION_ATTEND_ITEM_BYTES": "32768",
                  "FLUXION_PREFETCH_BYTES": "0", "FLUXION_AMX_MIN_HEADS": "1"}
_KNOB_CASE = """
import sys, torch, fluxion
sys.path.insert(0, sys.argv[1])
from test_cpu_ops import knob_case
torch.set_num_threads(2)
store, seqs, q, _, _, _, args = knob_case()
torch.save(fluxion.retrieval_attention(q, **store.layer_args(0, seqs), **args), sys.argv[2])
"""


def knob_case():
    lens = [4100, 1300]
    store, seqs, q, k, v = build(2, 16, 4, lens, 128, torch.bfloat16, seed=11, page_tokens=1024)
    budgets = torch.rand(2, 16, generator=torch.Generator().manual_seed(12)) * 0.3
    block_sizes = torch.tensor([[16, 32, 64, 128], [16, 16, 32, 128]], dtype=torch.int32)
    return store, seqs, q, k, v, lens, dict(budgets=budgets, block_sizes=block_sizes)


def test_tuning_knobs_change_the_split_not_the_result(tmp_path):
    """The env knobs (read once per process, hence a child process) only size work items and prefetches: at their
    extremes the task still equals the reference and reads the same bytes."""
    path = tmp_path / "out.pt"
    env = {**os.environ, **_EXTREME_KNOBS}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _KNOB_CASE, tests_dir, str(path)], env=env, check=True, timeout=300)
    out, lse, nbytes = torch.load(path)
    store, seqs, q, k, v, lens, args = knob_case()
    ro, rl = R.retrieval_attention(q, k, v, torch.tensor(lens), args["budgets"], args["block_sizes"], SINK, LOCAL,
                                   128 ** -0.5)
    torch.testing.assert_close(out, ro, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, rl, atol=ATOL, rtol=RTOL)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _, _, default_bytes = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), **args)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(nbytes, default_bytes)


def test_error_vs_same_dtype_torch_attention():
    """flash-attention's rule: our error vs fp32 <= 2x the error of a bf16 PyTorch implementation."""
    d, n = 128, 2048
    store, seqs, q, k, v = build(1, 4, 1, [n], d, torch.bfloat16)
    out, lse, _ = fluxion.retrieval_attention(q, **store.layer_args(0, seqs), budgets=torch.ones(1, 4),
                                              block_sizes=torch.full((1, 1), 16, dtype=torch.int32), sink=0, local=0)
    ref, _ = R.full_attention(q, k, v, torch.tensor([n]), d ** -0.5)
    s = (q[0].float() @ k[0, 0].float().T * d ** -0.5).to(torch.bfloat16)
    torch_bf16 = (torch.softmax(s, dim=-1) @ v[0, 0]).float()
    ours = (out[0] - ref[0]).abs().max()
    theirs = (torch_bf16 - ref[0]).abs().max()
    assert ours <= 2 * theirs + 1e-6, (ours, theirs)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_stream_read_checksum(threads, simd):
    """The streaming-read probe of the benchmarks reads every byte once: its checksum is the int64 sum mod 2^64."""
    g = torch.Generator().manual_seed(7)
    buf = torch.randint(-2**62, 2**62, (3 * 2**16 + 8,), generator=g, dtype=torch.int64)  # not a multiple of 256 B
    want = int(buf.sum()) % 2**64  # int64 sums wrap like the probe's uint64 lanes
    n = torch.get_num_threads()
    assert fluxion._C.stream_read(buf, threads) == want
    assert torch.get_num_threads() == n  # the thread count is restored
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        fluxion._C.stream_read(buf.view(-1, 8)[:, :4], threads)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fluxion._C.stream_read(b"x" * 64, threads)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_scatter_read_checksum(threads, simd):
    """The scattered-read probe reads each listed run once (runs far enough apart that some are prefetched ahead,
    some listed twice): its checksum is the int64 sum of those runs, mod 2^64."""
    g = torch.Generator().manual_seed(8)
    buf = torch.randint(-2**62, 2**62, (2**17,), generator=g, dtype=torch.int64)
    run = 1024  # bytes: 128 int64
    offsets = torch.tensor([0, 3072, 3072, 8192, 65536, 1048576 - run, 20480, 40960], dtype=torch.int64)
    want = sum(int(buf[o // 8:(o + run) // 8].sum()) for o in offsets.tolist()) % 2**64
    n = torch.get_num_threads()
    assert fluxion._C.scatter_read(buf, offsets, run, threads) == want
    assert torch.get_num_threads() == n
    assert fluxion._C.scatter_read(buf, offsets[:0], run, threads) == 0
    with pytest.raises(ValueError, match=r"offsets\[1\] = 1048064 is not a 64-byte aligned run start"):
        fluxion._C.scatter_read(buf, torch.tensor([0, 1048576 - 512]), run, threads)
    with pytest.raises(ValueError, match="offsets\\[0\\] = 8 is not a 64-byte aligned"):
        fluxion._C.scatter_read(buf, torch.tensor([8]), run, threads)
    with pytest.raises(ValueError, match="run_bytes must be a positive multiple of 256, got 100"):
        fluxion._C.scatter_read(buf, offsets, 100, threads)
    with pytest.raises(ValueError, match="offsets must be a contiguous 1-D int64 CPU tensor"):
        fluxion._C.scatter_read(buf, offsets.int(), run, threads)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        fluxion._C.scatter_read(buf.view(-1, 8)[:, :4], offsets, run, threads)


def test_set_simd_level_rejects_unknown_names():
    before = fluxion._C.simd_level()
    with pytest.raises(ValueError, match=r"simd level must be one of scalar, avx2, avx512, avx512_bf16, avx512_amx, got 'sse'"):
        fluxion.set_simd_level("sse")
    assert fluxion._C.simd_level() == before  # nothing changed
