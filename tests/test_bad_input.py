"""Every public op entry rejects bad input with a message naming the argument."""

from __future__ import annotations

import pytest
import torch

import fluxion
from conftest import make_kv, make_q


@pytest.fixture(scope="module")
def setup():
    k, v, direction = make_kv(1, 2, 600, 64, torch.bfloat16)
    store = fluxion.HostKVStore(1, 2, 64, torch.bfloat16)
    s = store.add_sequence()
    store.append(0, [s], k, v)
    q = make_q(1, 8, 64, torch.bfloat16, direction)
    return store, [s], q


def _retrieval(store, seqs, q, **over):
    a = store.layer_args(0, seqs)
    kw = dict(q=q, pages=a["pages"], frame_table=a["frame_table"], seq_lens=a["seq_lens"],
              budgets=torch.full((1, 8), 0.1), block_sizes=torch.full((1, 2), 16, dtype=torch.int32),
              groups=torch.arange(2, dtype=torch.int32), page_tokens=a["page_tokens"], sink=64, local=256, scale=0.1)
    kw.update(over)
    return torch.ops.fluxion.retrieval_attention(**kw)


@pytest.mark.parametrize("over, match", [
    (dict(budgets=torch.full((1, 8), 1.5)), r"budgets must be in \[0, 1\]"),
    (dict(budgets=torch.full((1, 8), -0.1)), r"budgets must be in \[0, 1\]"),
    (dict(budgets=torch.full((1, 4), 0.1)), "budgets must be"),
    (dict(budgets=torch.full((1, 8), 0.1, dtype=torch.float64)), "budgets must be Float"),
    (dict(block_sizes=torch.full((1, 2), 24, dtype=torch.int32)), "block_size must be one of"),
    (dict(block_sizes=torch.full((1, 3), 16, dtype=torch.int32)), "block_sizes must be"),
    (dict(groups=torch.tensor([0, 0], dtype=torch.int32)), "twice"),
    (dict(groups=torch.tensor([2], dtype=torch.int32)), "outside"),
    (dict(page_tokens=200), "page_tokens must be"),
    (dict(page_tokens=512), r"pages.size\(2\)"),
    (dict(sink=-1), "sink must be"),
])
def test_retrieval_bad_args(setup, over, match):
    store, seqs, q = setup
    with pytest.raises(RuntimeError, match=match):
        _retrieval(store, seqs, q, **over)


def test_q_checks(setup):
    store, seqs, q = setup
    with pytest.raises(RuntimeError, match="q must be 3-D"):
        _retrieval(store, seqs, q[0])
    with pytest.raises(RuntimeError, match="q must be bfloat16 or float16"):
        _retrieval(store, seqs, q.float())
    with pytest.raises(RuntimeError, match="pages must have q's dtype"):
        _retrieval(store, seqs, q.half())
    with pytest.raises(RuntimeError, match="head_dim"):
        _retrieval(store, seqs, torch.zeros(1, 8, 96, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="multiple of the store's 2 KV heads"):
        _retrieval(store, seqs, q[:, :7], budgets=torch.full((1, 7), 0.1))


def test_frame_table_checks(setup):
    store, seqs, q = setup
    a = store.layer_args(0, seqs)
    bad = a["frame_table"].clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="outside pages"):
        _retrieval(store, seqs, q, frame_table=bad)
    with pytest.raises(RuntimeError, match="frame_table must be Int"):
        _retrieval(store, seqs, q, frame_table=a["frame_table"].long())
    with pytest.raises(RuntimeError, match="needs more frames"):
        _retrieval(store, seqs, q, seq_lens=torch.tensor([100_000], dtype=torch.int32))


def test_other_ops_bad_args(setup):
    store, seqs, q = setup
    a = store.layer_args(0, seqs)
    with pytest.raises(RuntimeError, match="block_size must be one of"):
        fluxion.score_blocks(q, **a, block_size=48)
    with pytest.raises(RuntimeError, match="block_idx must be"):
        fluxion.sparse_attention(q, **a, block_idx=torch.zeros(1, 8, 2, dtype=torch.int32)[:, :4], block_size=16)
    with pytest.raises(RuntimeError, match="block_idx holds"):
        fluxion.sparse_attention(q, **a, block_idx=torch.full((1, 8, 2), 999, dtype=torch.int32), block_size=16)
    with pytest.raises(RuntimeError, match="k must have shape"):
        fluxion.topk_blocks(torch.zeros(3, 10), torch.zeros(2, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="scores must be Float"):
        fluxion.topk_blocks(torch.zeros(3, 10, dtype=torch.float64), torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="max_k must be"):
        fluxion.topk_blocks(torch.zeros(3, 10), torch.zeros(3, dtype=torch.int32), -1)
    with pytest.raises(RuntimeError, match="lses must have shape"):
        fluxion.merge_attention_states(torch.zeros(2, 3, 64), torch.zeros(2, 4))
    kw = torch.zeros(1, 2, 320, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="v_win must match k_win"):
        fluxion.window_attention(q, kw, kw[:, :, :100].contiguous(), torch.tensor([5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="q must have the window's dtype"):
        fluxion.window_attention(q.half(), kw, kw, torch.tensor([5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="positions must be"):
        fluxion.window_append(kw, kw.clone(), kw[:, :, :1], kw[:, :, :1], torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="sink must be in"):
        fluxion.window_attention(q, kw, kw, torch.tensor([5], dtype=torch.int32), sink=400)


def test_store_still_intact_after_errors(setup):
    store, seqs, q = setup
    k, _ = store.gather(0, seqs[0])
    assert k.shape == (2, 600, 64)
