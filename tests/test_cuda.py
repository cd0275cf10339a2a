"""CUDA kernels of every fluxion op against the fp32 reference (fluxion.reference) and the CPU twin.

Skipped unless a GPU is present and the build has CUDA kernels; nothing touches CUDA at import or
collection time. The store's arena stays in page-locked host memory and the kernels read it over PCIe.

Accuracy rule (flash-attention's): |kernel - ref| <= 2 * |same-dtype PyTorch - ref| + atol, with the
reference computed in float64 on the same bf16/fp16 inputs. Selections are compared exactly on "grid"
data (small multiples of powers of two) whose Quest scores are exact in fp32 whatever the summation
order, so CPU, GPU and reference pick the same blocks (ties included: they go to the lower index).
"""

from __future__ import annotations

import math

import pytest
import torch

import fluxion
from fluxion import reference as R

OPS = torch.ops.fluxion
NEG_INF = float("-inf")
OP_NAMES = ("score_blocks", "topk_blocks", "sparse_attention", "retrieval_attention", "merge_attention_states",
            "window_append", "window_attention")


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::score_blocks", "CUDA")


def _cpu_twin(name: str = "score_blocks") -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fluxion::{name}", "CPU")


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not _cuda_ready():
        pytest.skip("needs a CUDA device and fluxion built with CUDA kernels")
    yield


# window_attention's kernels (fluxion.set_window_kernel): both designs, the mma one with its heuristic split,
# without a cluster, and with an odd cluster size.
WINDOW_KERNELS = ("tile", "mma", "mma:1", "mma:3")


@pytest.fixture(params=WINDOW_KERNELS)
def window_kernel(request):
    """Runs a test once per window_attention kernel, restoring the previous one afterwards."""
    before = fluxion.window_kernel()
    fluxion.set_window_kernel(request.param)
    yield request.param
    fluxion.set_window_kernel(before)


# ---------------------------------------------------------------------------------------------------------
# Data


class Case:
    """Sequences of the given lengths in a pinned one-layer store, plus the dense K/V the reference uses.

    grid=True draws q and k from small multiples of 1/4 and 1/8: Quest scores are then exact in fp32."""

    def __init__(self, lens, hkv, G, D, dtype=torch.bfloat16, page_tokens=128, seed=0, grid=False, chunks=2):
        g = torch.Generator().manual_seed(seed)
        self.lens = list(lens)
        self.B, self.hkv, self.G, self.D, self.dtype, self.P = len(lens), hkv, G, D, dtype, page_tokens
        self.hq = hkv * G
        nmax = max(max(self.lens), 1)
        if grid:
            k = torch.randint(-32, 33, (self.B, hkv, nmax, D), generator=g) / 8.0
            q = torch.randint(-8, 9, (self.B, self.hq, D), generator=g) / 4.0
        else:
            k = torch.randn(self.B, hkv, nmax, D, generator=g)
            k[:, :, :4] *= 4.0  # sink-like keys
            q = torch.randn(self.B, self.hq, D, generator=g)
        v = torch.randn(self.B, hkv, nmax, D, generator=g)
        self.k, self.v, self.q = k.to(dtype), v.to(dtype), q.to(dtype)
        self.store = fluxion.HostKVStore(1, hkv, D, dtype, page_tokens=page_tokens, pin=True)
        self.seqs = [self.store.add_sequence() for _ in self.lens]
        for b, n in enumerate(self.lens):
            cut = n // chunks if chunks > 1 else n  # two appends: exercises incremental metadata
            for lo, hi in ((0, cut), (cut, n)):
                if hi > lo:
                    self.store.append(0, [self.seqs[b]], self.k[b:b + 1, :, lo:hi], self.v[b:b + 1, :, lo:hi])
        self.scale = 1.0 / math.sqrt(D)

    def paged(self, device):
        """(pages, frame_table, seq_lens) for the op; pages always stays in pinned host memory."""
        pages = self.store.pages()
        return (pages, self.store.frame_table(0, self.seqs).to(device), self.store.seq_lens(0, self.seqs).to(device))

    def nb(self, bs):
        return self.store.frame_table(0, self.seqs).shape[1] * self.P // bs


def lowp_attention(q, k, v, mask, scale):
    """Same-dtype PyTorch attention (the accuracy baseline): everything in q's dtype on the GPU.
    q [B, Hq, D], k/v [B, Hkv, N, D], mask [B, Hq, N] bool -> out [B, Hq, D] float32 (CPU)."""
    G = q.shape[1] // k.shape[1]
    kk = k.cuda().repeat_interleave(G, dim=1)
    vv = v.cuda().repeat_interleave(G, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q.cuda(), kk) * scale
    s = s.masked_fill(~mask.cuda(), NEG_INF)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.einsum("bhn,bhnd->bhd", p, vv).float().cpu()


def block_mask(n, nmax, blocks, bs, sink, local):
    """Tokens of `blocks` inside the retrieval region [sink, n - local): [nmax] bool."""
    lo_r, hi_r = R.retrieval_tokens(n, sink, local)
    m = torch.zeros(nmax, dtype=torch.bool)
    for j in blocks:
        lo, hi = max(int(j) * bs, lo_r), min((int(j) + 1) * bs, hi_r)
        if hi > lo:
            m[lo:hi] = True
    return m


def assert_attention_close(out, lse, ref_out, ref_lse, lowp_out=None, atol=1e-4, what=""):
    out, lse = out.float().cpu(), lse.float().cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), what
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), f"{what}: empty heads differ"
    assert torch.all(lse[empty] < 0) and torch.all(out[empty] == 0), f"{what}: empty heads must be (0, -inf)"
    bound = atol
    if lowp_out is not None:
        bound += 2.0 * float((lowp_out - ref_out).abs().max())
    err = float((out - ref_out).abs().max()) if out.numel() else 0.0
    assert err <= bound, f"{what}: max |out - ref| = {err:.3g} > {bound:.3g}"
    fin = ~empty
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), rtol=1e-5, atol=1e-4, msg=what)


def score_tolerance(q, k, n, bs):
    """Per-block bound on fp32 summation-order error of a Quest score: 1e-5 * sum_i |q_i| max|k_i|."""
    nb = -(-n // bs)
    ka = torch.zeros(nb * bs, k.shape[-1])
    ka[:n] = k[:n].float().abs()
    kmax = ka.view(nb, bs, -1).amax(1)
    return 1e-5 * (q.float().abs() @ kmax.T) + 1e-6


# ---------------------------------------------------------------------------------------------------------
# score_blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("bs", [16, 128])
def test_score_blocks(dtype, D, G, bs):
    case = Case([17, 97, 333, 1000, 0], hkv=2, G=G, D=D, dtype=dtype, seed=G + D)
    for sink, local in ((4, 8), (64, 256)):
        pages, ft, sl = case.paged("cuda")
        got = OPS.score_blocks(case.q.cuda(), pages, ft, sl, case.P, bs, sink, local).cpu()
        nb = case.nb(bs)
        assert got.shape == (case.B, case.hq, nb) and got.dtype == torch.float32
        for b, n in enumerate(case.lens):
            for kvh in range(case.hkv):
                hs = slice(kvh * G, (kvh + 1) * G)
                ref = R.quest_scores(case.q[b, hs], case.k[b, kvh], n, bs, sink, local, num_blocks=nb)
                fin = torch.isfinite(ref)
                assert torch.equal(torch.isfinite(got[b, hs]), fin), (b, kvh, n)
                assert torch.all(got[b, hs][~fin] == NEG_INF)
                if fin.any():
                    tol = score_tolerance(case.q[b, hs], case.k[b, kvh], n, bs)
                    nbn = tol.shape[1]
                    diff = (got[b, hs, :nbn] - ref[:, :nbn]).abs()
                    assert torch.all(diff[fin[:, :nbn]] <= tol[fin[:, :nbn]]), (b, kvh, n)
        if _cpu_twin():
            cpu = OPS.score_blocks(case.q, pages, ft.cpu(), sl.cpu(), case.P, bs, sink, local)
            assert torch.equal(torch.isfinite(cpu), torch.isfinite(got))
            torch.testing.assert_close(got[torch.isfinite(got)], cpu[torch.isfinite(cpu)], rtol=1e-5, atol=1e-3)


def test_score_blocks_grid_data_is_exact():
    case = Case([1000, 333], hkv=2, G=4, D=128, grid=True)
    pages, ft, sl = case.paged("cuda")
    got = OPS.score_blocks(case.q.cuda(), pages, ft, sl, case.P, 32, 64, 256).cpu()
    for b, n in enumerate(case.lens):
        for kvh in range(2):
            ref = R.quest_scores(case.q[b, kvh * 4:(kvh + 1) * 4], case.k[b, kvh], n, 32, 64, 256, num_blocks=got.shape[2])
            assert torch.equal(got[b, kvh * 4:(kvh + 1) * 4], ref)


# ---------------------------------------------------------------------------------------------------------
# topk_blocks


def _special_rows(nb, rows, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randint(-20, 20, (rows, nb), generator=g) / 4.0)  # many exact ties
    s[torch.rand(rows, nb, generator=g) < 0.1] = NEG_INF
    if nb >= 8:
        s[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
        s[0, 3:6] = 0.0
        s[1 % rows, :] = NEG_INF  # nothing selectable
    return s


@pytest.mark.parametrize("nb", [1, 17, 333, 4096, 65536])
def test_topk_blocks_exact(nb):
    rows = 6
    s = _special_rows(nb, rows, nb)
    ks = torch.tensor([0, 1, 5, nb // 3 + 1, nb, -3], dtype=torch.int32)[:rows]
    for max_k in (1, 7, nb + 3):
        got = OPS.topk_blocks(s.cuda(), ks.cuda(), max_k).cpu()
        assert got.shape == (rows, max_k) and got.dtype == torch.int32
        if _cpu_twin("topk_blocks"):
            assert torch.equal(got, OPS.topk_blocks(s, ks, max_k)), (nb, max_k)
        no_nan = torch.nan_to_num(s, nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)  # NaN is never selected
        if nb <= 4096:
            for r in range(rows):
                want = R.topk_blocks(no_nan[r], max(int(ks[r]), 0), max_k)
                assert torch.equal(got[r], want), (nb, max_k, r)
        else:  # the reference's Python sort is slow here: check the invariants instead
            for r in range(rows):
                sel = got[r][got[r] >= 0]
                k = min(max(int(ks[r]), 0), max_k, int((s[r] > NEG_INF).sum()))
                assert sel.numel() == k and torch.all(sel[1:] > sel[:-1])
                assert torch.all(got[r][k:] == -1)
                if k:
                    chosen = no_nan[r][sel.long()]
                    rest = no_nan[r].clone()
                    rest[sel.long()] = NEG_INF
                    assert float(chosen.min()) >= float(rest.max())


def test_topk_blocks_leading_dims_and_empty():
    s = torch.randn(2, 3, 50)
    k = torch.tensor([[1, 2, 3], [50, 0, 7]], dtype=torch.int32)
    got = OPS.topk_blocks(s.cuda(), k.cuda(), 8).cpu()
    assert got.shape == (2, 3, 8)
    for i in range(2):
        for j in range(3):
            assert torch.equal(got[i, j], R.topk_blocks(s[i, j], int(k[i, j]), 8))
    assert OPS.topk_blocks(s.cuda(), k.cuda(), 0).shape == (2, 3, 0)
    e = OPS.topk_blocks(torch.empty(4, 0, device="cuda"), torch.full((4,), 3, dtype=torch.int32, device="cuda"), 3)
    assert torch.equal(e.cpu(), torch.full((4, 3), -1, dtype=torch.int32))


def assert_same_selection(sel_a, sel_b, scores, rel=1e-4):
    """Selections may differ only in blocks whose score is within `rel` of the row's k-th threshold."""
    for r in range(sel_a.shape[0]):
        a = set(int(x) for x in sel_a[r] if x >= 0)
        b = set(int(x) for x in sel_b[r] if x >= 0)
        assert len(a) == len(b), r
        if a == b:
            continue
        thr = float(min(scores[r, list(a | b)]))
        for j in a ^ b:
            assert abs(float(scores[r, j]) - thr) <= rel * max(abs(thr), 1.0), (r, j)


def test_score_then_topk_matches_cpu_pipeline():
    if not _cpu_twin():
        pytest.skip("CPU kernels not built")
    case = Case([3000, 1111], hkv=2, G=4, D=128, seed=7)
    pages, ft, sl = case.paged("cuda")
    for bs in (16, 64):
        sg = OPS.score_blocks(case.q.cuda(), pages, ft, sl, case.P, bs, 64, 256)
        sc = OPS.score_blocks(case.q, pages, ft.cpu(), sl.cpu(), case.P, bs, 64, 256)
        nb = sg.shape[-1]
        k = torch.full((case.B, case.hq), max(1, nb // 20), dtype=torch.int32)
        tg = OPS.topk_blocks(sg, k.cuda(), nb // 20 + 1).cpu()
        tc = OPS.topk_blocks(sc, k, nb // 20 + 1)
        assert_same_selection(tg.view(-1, tg.shape[-1]), tc.view(-1, tc.shape[-1]), sc.view(-1, nb))


# ---------------------------------------------------------------------------------------------------------
# sparse_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8, 12])
@pytest.mark.parametrize("bs", [16, 64])
def test_sparse_attention(dtype, D, G, bs):
    case = Case([17, 333, 1000], hkv=2, G=G, D=D, dtype=dtype, seed=3 * G + bs)
    sink, local = 16, 32
    nb = case.nb(bs)
    g = torch.Generator().manual_seed(11)
    K = 12
    idx = torch.randint(0, nb, (case.B, case.hq, K), generator=g, dtype=torch.int32)
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    idx[:, :, -1] = idx[:, :, 0]  # duplicates count once
    idx[0, 0] = -1  # an empty selection
    pages, ft, sl = case.paged("cuda")
    out, lse = OPS.sparse_attention(case.q.cuda(), pages, ft, sl, idx.cuda(), case.P, bs, sink, local, case.scale)
    ref_out, ref_lse = R.sparse_attention(case.q, case.k, case.v, case.lens, idx, bs, sink, local, case.scale)
    nmax = case.k.shape[2]
    mask = torch.stack([torch.stack([block_mask(n, nmax, idx[b, h].tolist(), bs, sink, local)
                                     for h in range(case.hq)]) for b, n in enumerate(case.lens)])
    lowp = lowp_attention(case.q, case.k, case.v, mask, case.scale)
    assert_attention_close(out, lse, ref_out, ref_lse, lowp, what="sparse vs reference")
    if _cpu_twin("sparse_attention"):
        co, cl = OPS.sparse_attention(case.q, pages, ft.cpu(), sl.cpu(), idx, case.P, bs, sink, local, case.scale)
        assert_attention_close(out, lse, co, cl, lowp, what="sparse vs CPU")


# ---------------------------------------------------------------------------------------------------------
# retrieval_attention


def reference_retrieval(case, budgets, block_sizes, sink, local, groups):
    """Per-head selections (as token masks) and bytes_read of the reference semantics."""
    D, G, nmax = case.D, case.G, case.k.shape[2]
    mask = torch.zeros(case.B, case.hq, nmax, dtype=torch.bool)
    nbytes = torch.zeros(case.B, case.hkv, dtype=torch.int64)
    for grp in groups:
        b, kvh = divmod(int(grp), case.hkv)
        n, bs = case.lens[b], int(block_sizes[b, kvh])
        scores = R.quest_scores(case.q[b, kvh * G:(kvh + 1) * G], case.k[b, kvh], n, bs, sink, local)
        ncand = len(R.candidate_blocks(n, sink, local, bs))
        union, scored = set(), False
        for i in range(G):
            h = kvh * G + i
            kk = R.num_budget_blocks(float(budgets[b, h]), n, bs, ncand)
            if kk == 0:
                continue
            scored |= kk < ncand  # metadata is read only where some head takes a strict subset
            sel = [j for j in R.topk_blocks(scores[i], kk).tolist() if j >= 0]
            union |= set(sel)
            mask[b, h] = block_mask(n, nmax, sel, bs, sink, local)
        nbytes[b, kvh] = (ncand * 2 * D * 2 if scored else 0) + len(union) * 2 * bs * D * 2
    return mask, nbytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8, 12])
def test_retrieval_attention(dtype, D, G):
    case = Case([17, 97, 333, 1000, 2500], hkv=2, G=G, D=D, dtype=dtype, grid=True, seed=G * 7 + D)
    sink, local = 16, 64
    g = torch.Generator().manual_seed(G)
    choices = torch.tensor([0.0, 1e-6, 0.02, 0.05, 0.3, 1.0])
    budgets = choices[torch.randint(0, len(choices), (case.B, case.hq), generator=g)]
    block_sizes = torch.tensor([16, 32, 64, 128], dtype=torch.int32)[torch.randint(0, 4, (case.B, case.hkv), generator=g)]
    all_groups = torch.randperm(case.B * case.hkv, generator=g).to(torch.int32)
    for groups in (all_groups, all_groups[: len(all_groups) // 2], all_groups[:0]):
        pages, ft, sl = case.paged("cuda")
        out, lse, nbytes = OPS.retrieval_attention(case.q.cuda(), pages, ft, sl, budgets.cuda(), block_sizes.cuda(),
                                                   groups.cuda(), case.P, sink, local, case.scale)
        assert nbytes.dtype == torch.int64 and nbytes.shape == (case.B, case.hkv)
        ref_out, ref_lse = R.retrieval_attention(case.q, case.k, case.v, case.lens, budgets, block_sizes, sink, local,
                                                 case.scale, groups=groups.tolist())
        mask, ref_bytes = reference_retrieval(case, budgets, block_sizes, sink, local, groups.tolist())
        assert torch.equal(nbytes.cpu(), ref_bytes)
        lowp = lowp_attention(case.q, case.k, case.v, mask, case.scale)
        assert_attention_close(out, lse, ref_out, ref_lse, lowp, what=f"retrieval vs reference, {len(groups)} groups")
        if _cpu_twin("retrieval_attention"):
            co, cl, cb = OPS.retrieval_attention(case.q, pages, ft.cpu(), sl.cpu(), budgets, block_sizes, groups, case.P,
                                                 sink, local, case.scale)
            assert torch.equal(nbytes.cpu(), cb)
            assert_attention_close(out, lse, co, cl, lowp, what="retrieval vs CPU")


@pytest.mark.parametrize("G", [1, 4, 8])
def test_retrieval_long_context_matches_cpu(G):
    if not _cpu_twin("retrieval_attention"):
        pytest.skip("CPU kernels not built")
    case = Case([20000, 7777], hkv=2, G=G, D=128, grid=True, page_tokens=1024, seed=G)  # the default page size
    budgets = torch.full((case.B, case.hq), 0.05)
    budgets[:, 0] = 0.0  # a streaming head
    pages, ft, sl = case.paged("cuda")
    for bs in (16, 128):
        block_sizes = torch.full((case.B, case.hkv), bs, dtype=torch.int32)
        groups = torch.arange(case.B * case.hkv, dtype=torch.int32)
        out, lse, nb = OPS.retrieval_attention(case.q.cuda(), pages, ft, sl, budgets.cuda(), block_sizes.cuda(),
                                               groups.cuda(), case.P, 64, 256, case.scale)
        co, cl, cb = OPS.retrieval_attention(case.q, pages, ft.cpu(), sl.cpu(), budgets, block_sizes, groups, case.P, 64,
                                             256, case.scale)
        assert torch.equal(nb.cpu(), cb)
        assert_attention_close(out, lse, co, cl, atol=1e-4, what=f"bs={bs}")


def test_store_pinned_ahead_is_read_by_the_kernels():
    """A pinned store grows on a thread of its own before appends need the memory (HostKVStore::pin_ahead); the
    kernels read the chunks pinned there as they read the rest."""
    if not _cpu_twin("retrieval_attention"):
        pytest.skip("CPU kernels not built")
    hkv, G, D, P, n = 8, 4, 128, 1024, 12 * 1024  # 24 frames of ~4.5 MiB: the first 64 MiB commit holds 14
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2, hkv, n, D, generator=g).to(torch.bfloat16)
    v = torch.randn(2, hkv, n, D, generator=g).to(torch.bfloat16)
    store = fluxion.HostKVStore(1, hkv, D, torch.bfloat16, page_tokens=P, pin=True)
    seqs = [store.add_sequence(), store.add_sequence()]
    for lo in range(0, n, P):
        for b in range(2):
            store.append(0, [seqs[b]], k[b:b + 1, :, lo:lo + P], v[b:b + 1, :, lo:lo + P])
    assert store.wait_pinned_ahead() > 0
    st = store.stats()
    assert st["pinned_bytes"] == st["committed_bytes"] >= st["allocated_bytes"]
    q = torch.randn(2, hkv * G, D, generator=g).to(torch.bfloat16)
    pages, ft, sl = store.pages(), store.frame_table(0, seqs), store.seq_lens(0, seqs)
    budgets = torch.ones(2, hkv * G)  # every block: the whole store is read
    sizes = torch.full((2, hkv), 16, dtype=torch.int32)
    groups = torch.arange(2 * hkv, dtype=torch.int32)
    out, lse, nb = OPS.retrieval_attention(q.cuda(), pages, ft.cuda(), sl.cuda(), budgets.cuda(), sizes.cuda(),
                                           groups.cuda(), P, 64, 256, D ** -0.5)
    co, cl, cb = OPS.retrieval_attention(q, pages, ft, sl, budgets, sizes, groups, P, 64, 256, D ** -0.5)
    assert torch.equal(nb.cpu(), cb)
    assert_attention_close(out, lse, co, cl, atol=1e-4, what="store pinned ahead")


def test_retrieval_budget_edges():
    case = Case([1000, 300], hkv=2, G=4, D=64, grid=True)  # 300 <= sink + local: no candidates
    sink, local = 64, 256
    pages, ft, sl = case.paged("cuda")
    groups = torch.arange(4, dtype=torch.int32, device="cuda")
    bsz = torch.full((2, 2), 16, dtype=torch.int32, device="cuda")

    def run(budget):
        bud = torch.full((2, case.hq), float(budget), device="cuda")
        return OPS.retrieval_attention(case.q.cuda(), pages, ft, sl, bud, bsz, groups, case.P, sink, local, case.scale)

    o0, l0, b0 = run(0.0)  # streaming heads: nothing read at all
    assert torch.all(o0 == 0) and torch.all(l0 == NEG_INF) and torch.all(b0 == 0)
    o1, l1, b1 = run(1e-6)  # one block per head
    assert torch.all(torch.isfinite(l1[0])) and torch.all(l1[1] == NEG_INF) and torch.all(b1[1] == 0)
    ncand = len(R.candidate_blocks(1000, sink, local, 16))
    assert torch.all(b1[0] >= ncand * 2 * 64 * 2 + 2 * 16 * 64 * 2)
    assert torch.all(b1[0] <= ncand * 2 * 64 * 2 + 4 * 2 * 16 * 64 * 2)
    # Out-of-range budgets cannot be checked on the device without a sync: they clamp (the CPU op raises).
    oa, la, ba = run(1.0)
    ob, lb, bb = run(1.5)
    assert torch.equal(oa, ob) and torch.equal(la, lb) and torch.equal(ba, bb)
    on, ln, bn = run(-0.5)
    assert torch.equal(on, o0) and torch.equal(ln, l0) and torch.equal(bn, b0)
    if _cpu_twin("retrieval_attention"):
        with pytest.raises(RuntimeError, match="budgets"):
            OPS.retrieval_attention(case.q, pages, ft.cpu(), sl.cpu(), torch.full((2, case.hq), 1.5), bsz.cpu(),
                                    groups.cpu(), case.P, sink, local, case.scale)


@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_blocks_plus_window_equals_full_attention(G, dtype):
    """budget 1 retrieves every candidate block; merged with the dense window it is full attention."""
    case = Case([17, 97, 333, 1000, 1500], hkv=2, G=G, D=128, dtype=dtype, seed=5)
    sink, local = 64, 256
    pages, ft, sl = case.paged("cuda")
    budgets = torch.ones(case.B, case.hq, device="cuda")
    for bs in (16, 128):
        bsz = torch.full((case.B, case.hkv), bs, dtype=torch.int32, device="cuda")
        groups = torch.arange(case.B * case.hkv, dtype=torch.int32, device="cuda")
        ro, rl, _ = OPS.retrieval_attention(case.q.cuda(), pages, ft, sl, budgets, bsz, groups, case.P, sink, local,
                                            case.scale)
        W = sink + local
        k_win = torch.zeros(case.B, case.hkv, W, case.D, dtype=dtype, device="cuda")
        v_win = torch.zeros_like(k_win)
        nmax = case.k.shape[2]
        pos = torch.arange(nmax, dtype=torch.int32).repeat(case.B, 1)
        for b, n in enumerate(case.lens):
            pos[b, n:] = -1
        OPS.window_append(k_win, v_win, case.k.cuda(), case.v.cuda(), pos.cuda(), sink)
        wo, wl = OPS.window_attention(case.q.cuda(), k_win, v_win, sl, sink, case.scale)
        mo, ml = OPS.merge_attention_states(torch.stack([ro, wo]), torch.stack([rl, wl]))
        fo, fl = R.full_attention(case.q, case.k, case.v, case.lens, case.scale)
        lowp = lowp_attention(case.q, case.k, case.v,
                              torch.arange(nmax)[None, None, :] < torch.tensor(case.lens)[:, None, None].expand(
                                  case.B, case.hq, 1), case.scale)
        assert_attention_close(mo, ml, fo, fl, lowp, what=f"bs={bs}")


# ---------------------------------------------------------------------------------------------------------
# merge_attention_states


@pytest.mark.parametrize("S", [1, 2, 5])
@pytest.mark.parametrize("D", [64, 128, 17])
def test_merge_attention_states(S, D):
    g = torch.Generator().manual_seed(S * D)
    outs = torch.randn(S, 3, 5, D, generator=g)
    lses = torch.randn(S, 3, 5, generator=g) * 4
    lses[torch.rand(S, 3, 5, generator=g) < 0.3] = NEG_INF
    lses[:, 0, 0] = NEG_INF  # all parts empty
    outs[lses == NEG_INF] = float("nan")  # an empty part's out must never be read
    out, lse = OPS.merge_attention_states(outs.cuda(), lses.cuda())
    ref_out, ref_lse = R.merge_states(torch.nan_to_num(outs), lses)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[0, 0].cpu() == 0) and lse[0, 0].item() == NEG_INF
    torch.testing.assert_close(out.cpu(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-5, atol=1e-5)
    if _cpu_twin("merge_attention_states"):
        co, cl = OPS.merge_attention_states(outs, lses)
        torch.testing.assert_close(out.cpu(), co, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.cpu(), cl, rtol=1e-5, atol=1e-5)


def test_merge_of_two_parts_equals_attention_over_union():
    case = Case([1000], hkv=1, G=4, D=128, seed=3)
    pages, ft, sl = case.paged("cuda")
    nb = case.nb(16)
    a = torch.arange(4, 30, dtype=torch.int32).repeat(1, 4, 1)
    b = torch.arange(30, 50, dtype=torch.int32).repeat(1, 4, 1)
    q = case.q.cuda()
    oa, la = OPS.sparse_attention(q, pages, ft, sl, a.cuda(), case.P, 16, 64, 256, case.scale)
    ob, lb = OPS.sparse_attention(q, pages, ft, sl, b.cuda(), case.P, 16, 64, 256, case.scale)
    ou, lu = OPS.sparse_attention(q, pages, ft, sl, torch.cat([a, b], -1).cuda(), case.P, 16, 64, 256, case.scale)
    mo, ml = OPS.merge_attention_states(torch.stack([oa, ob]), torch.stack([la, lb]))
    torch.testing.assert_close(mo, ou, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ml, lu, rtol=1e-5, atol=1e-5)
    assert nb > 50


# ---------------------------------------------------------------------------------------------------------
# window_append / window_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_append_matches_cpu_and_semantics(dtype):
    B, H, D, sink, local = 3, 2, 64, 4, 12
    W = sink + local
    g = torch.Generator().manual_seed(0)
    T = 50
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    v = torch.randn(B, H, T, D, generator=g).to(dtype)
    pos = torch.arange(T, dtype=torch.int32).repeat(B, 1)
    pos[1, 20:] = -1  # a shorter sequence
    pos[2, ::3] = -1  # holes
    kw = torch.zeros(B, H, W, D, dtype=dtype, device="cuda")
    vw = torch.zeros_like(kw)
    OPS.window_append(kw, vw, k.cuda(), v.cuda(), pos.cuda(), sink)  # prefill: the ring wraps several times
    want_k = torch.zeros(B, H, W, D, dtype=dtype)
    want_v = torch.zeros_like(want_k)
    for b in range(B):
        for t in range(T):
            p = int(pos[b, t])
            if p < 0:
                continue
            slot = p if p < sink else sink + (p - sink) % local
            want_k[b, :, slot], want_v[b, :, slot] = k[b, :, t], v[b, :, t]
    assert torch.equal(kw.cpu(), want_k) and torch.equal(vw.cpu(), want_v)
    for step in range(5):  # decode: one token at a time
        k1 = torch.randn(B, H, 1, D, generator=g).to(dtype)
        v1 = torch.randn(B, H, 1, D, generator=g).to(dtype)
        p1 = torch.tensor([[T + step], [-1], [T + 2 * step]], dtype=torch.int32)
        OPS.window_append(kw, vw, k1.cuda(), v1.cuda(), p1.cuda(), sink)
        if _cpu_twin("window_append"):
            OPS.window_append(want_k, want_v, k1, v1, p1, sink)
            assert torch.equal(kw.cpu(), want_k) and torch.equal(vw.cpu(), want_v)
    # local == 0: tokens past the sink are dropped
    kz = torch.zeros(1, H, sink, D, dtype=dtype, device="cuda")
    OPS.window_append(kz, kz.clone(), k[:1].cuda(), v[:1].cuda(), pos[:1].cuda(), sink)
    assert torch.equal(kz.cpu()[0], k[0, :, :sink])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 4, 8, 12])
def test_window_attention(dtype, D, G, window_kernel):
    sink, local = 64, 256
    W = sink + local
    lens = [0, 1, 17, 64, 97, 320, 333, 1000]
    B, H = len(lens), 2
    g = torch.Generator().manual_seed(G + D)
    nmax = max(lens)
    k = torch.randn(B, H, nmax, D, generator=g).to(dtype)
    v = torch.randn(B, H, nmax, D, generator=g).to(dtype)
    q = torch.randn(B, H * G, D, generator=g).to(dtype)
    pos = torch.arange(nmax, dtype=torch.int32).repeat(B, 1)
    for b, n in enumerate(lens):
        pos[b, n:] = -1
    kw = torch.full((B, H, W, D), float("nan"), dtype=dtype, device="cuda")  # never-written slots hold NaN
    vw = torch.full_like(kw, float("nan"))
    OPS.window_append(kw, vw, k.cuda(), v.cuda(), pos.cuda(), sink)
    sl = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    out, lse = OPS.window_attention(q.cuda(), kw, vw, sl.cuda(), sink, scale)
    ref_out, ref_lse = R.window_attention(q, k, v, sl, sink, local, scale)
    mask = torch.zeros(B, H * G, nmax, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, :, : min(sink, n)] = True
        mask[b, :, max(n - local, 0):n] = True
    lowp = lowp_attention(q, k, v, mask, scale)
    assert_attention_close(out, lse, ref_out, ref_lse, lowp, what="window vs reference")
    if _cpu_twin("window_attention"):
        co, cl = OPS.window_attention(q, torch.nan_to_num(kw.cpu()), torch.nan_to_num(vw.cpu()), sl, sink, scale)
        assert_attention_close(out, lse, co, cl, lowp, what="window vs CPU")


def test_window_attention_small_and_odd_windows(window_kernel):
    for sink, W in ((0, 16), (4, 4), (3, 45), (16, 1000)):
        B, H, G, D = 2, 1, 4, 128
        g = torch.Generator().manual_seed(W)
        kw = torch.randn(B, H, W, D, generator=g).to(torch.bfloat16)
        vw = torch.randn(B, H, W, D, generator=g).to(torch.bfloat16)
        q = torch.randn(B, H * G, D, generator=g).to(torch.bfloat16)
        sl = torch.tensor([W + 5, max(W // 2, 1)], dtype=torch.int32)
        out, lse = OPS.window_attention(q.cuda(), kw.cuda(), vw.cuda(), sl.cuda(), sink, 0.1)
        local = W - sink
        for b in range(B):
            n = int(sl[b])
            valid = [s for s in range(W) if s < min(n, sink) or (s >= sink and s - sink < min(max(n - sink, 0), local))]
            for h in range(H * G):
                ro, rl = R.attention(q[b, h], kw[b, 0, valid], vw[b, 0, valid], 0.1)
                torch.testing.assert_close(out[b, h].cpu(), ro, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(lse[b, h].cpu(), rl, rtol=1e-5, atol=1e-4)


def test_window_attention_graph_replay_matches_eager(window_kernel):
    B, H, G, D, sink, W = 2, 2, 4, 128, 64, 320
    g = torch.Generator().manual_seed(7)
    kw = torch.randn(B, H, W, D, generator=g).to(torch.bfloat16).cuda()
    vw = torch.randn(B, H, W, D, generator=g).to(torch.bfloat16).cuda()
    q = torch.randn(B, H * G, D, generator=g).to(torch.bfloat16).cuda()
    sl = torch.tensor([1000, 150], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.window_attention(q, kw, vw, sl, sink, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = OPS.window_attention(q, kw, vw, sl, sink, 0.1)
    q.copy_(torch.randn(q.shape, generator=g).to(q.dtype))
    sl.copy_(torch.tensor([97, 333], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = OPS.window_attention(q, kw, vw, sl, sink, 0.1)
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


def test_set_window_kernel():
    before = fluxion.window_kernel()
    try:
        for k in ("tile", "mma", "mma:8", "auto"):
            fluxion.set_window_kernel(k)
            assert fluxion.window_kernel() == k
        for bad in ("", "mma:0", "mma:9", "cluster", "mma:12"):
            with pytest.raises(ValueError, match="window kernel"):
                fluxion.set_window_kernel(bad)
        assert fluxion.window_kernel() == "auto"
    finally:
        fluxion.set_window_kernel(before)


# ---------------------------------------------------------------------------------------------------------
# opcheck, CUDA graphs


def _opcheck_samples():
    """One CUDA sample per op. opcheck clones every tensor argument, and a clone of pinned host memory is
    pageable, so `pages` is given as a CUDA copy of the arena here (the kernels accept a device-resident
    arena too); every other test reads the pinned arena in place."""
    case = Case([333, 97], hkv=2, G=4, D=64, grid=True)
    pages, ft, sl = case.paged("cuda")
    pages = pages.cuda()
    q = case.q.cuda()
    nb = case.nb(16)
    scores = OPS.score_blocks(q, pages, ft, sl, case.P, 16, 16, 32)
    k = torch.full((case.B, case.hq), 3, dtype=torch.int32, device="cuda")
    idx = OPS.topk_blocks(scores, k, 4)
    budgets = torch.full((case.B, case.hq), 0.1, device="cuda")
    bsz = torch.full((case.B, case.hkv), 32, dtype=torch.int32, device="cuda")
    groups = torch.arange(case.B * case.hkv, dtype=torch.int32, device="cuda")
    kw = torch.randn(case.B, case.hkv, 48, case.D, device="cuda").to(case.dtype)
    vw = torch.randn_like(kw)
    pos = torch.tensor([[400, 401], [98, -1]], dtype=torch.int32, device="cuda")
    knew = torch.randn(case.B, case.hkv, 2, case.D, device="cuda").to(case.dtype)
    assert nb == scores.shape[-1]
    return {
        "score_blocks": (q, pages, ft, sl, case.P, 16, 16, 32),
        "topk_blocks": (scores, k, 4),
        "sparse_attention": (q, pages, ft, sl, idx, case.P, 16, 16, 32, case.scale),
        "retrieval_attention": (q, pages, ft, sl, budgets, bsz, groups, case.P, 16, 32, case.scale),
        "merge_attention_states": (torch.randn(3, 2, 8, 64, device="cuda"), torch.randn(3, 2, 8, device="cuda")),
        "window_append": (kw.clone(), vw.clone(), knew, knew.clone(), pos, 16),
        "window_attention": (q, kw, vw, sl, 16, case.scale),
    }


def test_every_op_has_a_cuda_kernel_and_an_opcheck_sample():
    samples = _opcheck_samples()
    assert set(samples) == set(OP_NAMES)
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fluxion::{name}", "CUDA"), name


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    torch.library.opcheck(getattr(OPS, name).default, _opcheck_samples()[name])


def test_cuda_graph_capture_and_replay():
    case = Case([1000, 700], hkv=2, G=4, D=128, grid=True)
    sink, local, bs = 16, 64, 16
    pages, ft, sl = case.paged("cuda")
    q = case.q.cuda().clone()
    nb = case.nb(bs)
    kk = torch.full((case.B * case.hq,), 5, dtype=torch.int32, device="cuda")
    budgets = torch.full((case.B, case.hq), 0.05, device="cuda")
    bsz = torch.tensor([[16, 64], [32, 128]], dtype=torch.int32, device="cuda")
    groups = torch.tensor([3, 0, 1], dtype=torch.int32, device="cuda")
    W = sink + local
    kw = torch.randn(case.B, case.hkv, W, case.D, device="cuda").to(case.dtype)
    vw = torch.randn_like(kw)
    knew = torch.randn(case.B, case.hkv, 1, case.D, device="cuda").to(case.dtype)
    pos = sl.view(-1, 1).clone()
    kw_g, vw_g = kw.clone(), vw.clone()

    def step(kwin, vwin):
        s = OPS.score_blocks(q, pages, ft, sl, case.P, bs, sink, local)
        sel = OPS.topk_blocks(s.view(-1, nb), kk, 6)
        o1, l1 = OPS.sparse_attention(q, pages, ft, sl, sel.view(case.B, case.hq, 6), case.P, bs, sink, local, case.scale)
        o2, l2, nbytes = OPS.retrieval_attention(q, pages, ft, sl, budgets, bsz, groups, case.P, sink, local, case.scale)
        OPS.window_append(kwin, vwin, knew, knew, pos, sink)
        o3, l3 = OPS.window_attention(q, kwin, vwin, sl, sink, case.scale)
        o4, l4 = OPS.merge_attention_states(torch.stack([o2, o3]), torch.stack([l2, l3]))
        return [s, sel, o1, l1, o2, l2, nbytes, o3, l3, o4, l4]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(kw.clone(), vw.clone())  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(kw_g, vw_g)
    q.copy_(torch.randint(-8, 9, q.shape, device="cuda").to(q.dtype) / 4)  # a new query, in place
    kw_g.copy_(kw)
    vw_g.copy_(vw)
    graph.replay()
    torch.cuda.synchronize()
    eager = step(kw, vw)
    for i, (c, e) in enumerate(zip(captured, eager)):
        assert torch.equal(c, e), f"output {i} differs between graph replay and eager"
    assert torch.equal(kw_g, kw) and torch.equal(vw_g, vw)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, nothing written


def test_bad_input_paged_ops():
    case = Case([500], hkv=2, G=4, D=128)
    pages, ft, sl = case.paged("cuda")
    q = case.q.cuda()
    P = case.P
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        OPS.score_blocks(case.q, pages, ft, sl, P, 16, 64, 256)
    plain = torch.empty(pages.shape, dtype=pages.dtype)  # pageable memory of the right shape
    assert not plain.is_pinned()
    with pytest.raises(RuntimeError, match="pages must be page-locked host memory"):
        OPS.score_blocks(q, plain, ft, sl, P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="q must be bfloat16 or float16"):
        OPS.score_blocks(q.float(), pages, ft, sl, P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="pages must have q's dtype"):
        OPS.score_blocks(q.half(), pages, ft, sl, P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="head_dim"):
        OPS.score_blocks(torch.zeros(1, 8, 96, dtype=q.dtype, device="cuda"), pages, ft, sl, P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="seq_lens must be a CUDA tensor"):
        OPS.score_blocks(q, pages, ft, sl.cpu(), P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="frame_table must be a CUDA tensor"):
        OPS.score_blocks(q, pages, ft.cpu(), sl, P, 16, 64, 256)
    with pytest.raises(RuntimeError, match="block_size"):
        OPS.score_blocks(q, pages, ft, sl, P, 24, 64, 256)
    with pytest.raises(RuntimeError, match="page_tokens"):
        OPS.score_blocks(q, pages, ft, sl, 100, 16, 64, 256)
    idx = torch.zeros(1, case.hq, 3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_idx must be a CUDA tensor"):
        OPS.sparse_attention(q, pages, ft, sl, idx, P, 16, 64, 256, 0.1)
    with pytest.raises(RuntimeError, match=r"block_idx must be \[B, Hq, K\]"):
        OPS.sparse_attention(q, pages, ft, sl, idx[:, :3].cuda(), P, 16, 64, 256, 0.1)
    budgets = torch.full((1, case.hq), 0.1, device="cuda")
    bsz = torch.full((1, 2), 16, dtype=torch.int32, device="cuda")
    groups = torch.arange(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="budgets must be Float"):
        OPS.retrieval_attention(q, pages, ft, sl, budgets.double(), bsz, groups, P, 64, 256, 0.1)
    with pytest.raises(RuntimeError, match="budgets must be a CUDA tensor"):
        OPS.retrieval_attention(q, pages, ft, sl, budgets.cpu(), bsz, groups, P, 64, 256, 0.1)
    with pytest.raises(RuntimeError, match=r"block_sizes must be \[B, Hkv\]"):
        OPS.retrieval_attention(q, pages, ft, sl, budgets, bsz[:, :1], groups, P, 64, 256, 0.1)
    with pytest.raises(RuntimeError, match="groups must be a CUDA tensor"):
        OPS.retrieval_attention(q, pages, ft, sl, budgets, bsz, groups.cpu(), P, 64, 256, 0.1)
    with pytest.raises(RuntimeError, match="sink"):
        OPS.retrieval_attention(q, pages, ft, sl, budgets, bsz, groups, P, -1, 256, 0.1)


def test_bad_input_other_ops():
    s = torch.randn(4, 10, device="cuda")
    k = torch.ones(4, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="k must be Int"):
        OPS.topk_blocks(s, k.long(), 3)
    with pytest.raises(RuntimeError, match="k must be a CUDA tensor"):
        OPS.topk_blocks(s, k.cpu(), 3)
    with pytest.raises(RuntimeError, match="scores must be a CUDA tensor"):
        OPS.topk_blocks(s.cpu(), k, 3)
    with pytest.raises(RuntimeError, match="max_k"):
        OPS.topk_blocks(s, k, -1)
    with pytest.raises(RuntimeError, match="lses must have shape"):
        OPS.merge_attention_states(torch.zeros(2, 3, 8, device="cuda"), torch.zeros(2, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="lses must be a CUDA tensor"):
        OPS.merge_attention_states(torch.zeros(2, 3, 8, device="cuda"), torch.zeros(2, 3))
    kw = torch.randn(1, 2, 32, 64, device="cuda").to(torch.bfloat16)
    vw = torch.randn_like(kw)
    before = (kw.clone(), vw.clone())
    knew = torch.randn(1, 2, 1, 64, device="cuda").to(torch.bfloat16)
    pos = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="positions must be a CUDA tensor"):
        OPS.window_append(kw, vw, knew, knew, pos.cpu(), 8)
    with pytest.raises(RuntimeError, match="k and v must have the window's dtype"):
        OPS.window_append(kw, vw, knew.half(), knew.half(), pos, 8)
    with pytest.raises(RuntimeError, match="sink must be in"):
        OPS.window_append(kw, vw, knew, knew, pos, 33)
    assert torch.equal(kw, before[0]) and torch.equal(vw, before[1])  # nothing written by failing calls
    q = torch.randn(1, 8, 64, device="cuda").to(torch.bfloat16)
    sl = torch.tensor([40], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="k_win must be bfloat16 or float16"):
        OPS.window_attention(q, kw.float(), vw.float(), sl, 8, 0.1)
    with pytest.raises(RuntimeError, match="q must have the window's dtype"):
        OPS.window_attention(q.half(), kw, vw, sl, 8, 0.1)
    with pytest.raises(RuntimeError, match="seq_lens must be a CUDA tensor"):
        OPS.window_attention(q, kw, vw, sl.cpu(), 8, 0.1)
    with pytest.raises(RuntimeError, match="head_dim"):
        OPS.window_attention(q, kw[..., :48].contiguous(), vw[..., :48].contiguous(), sl, 8, 0.1)
