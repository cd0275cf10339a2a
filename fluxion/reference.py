"""Independent fp32 reference for every Fluxion kernel, in plain PyTorch.

This module shares no code with the kernels or the store: it works on the dense K/V that a test appended,
never on the store's pages, and recomputes block metadata, scores, selections and attention from scratch
in float32 (float64 where a test asks). It is slow on purpose: every loop says what the kernel must do.

Conventions (the same as the kernels'):
  * shapes: ``B`` batch, ``Hq``/``Hkv`` query/KV heads, ``D`` head_dim, ``N`` tokens, ``BS`` block size;
    query head ``h`` reads KV head ``h // (Hq // Hkv)``.
  * ``lse`` is the natural-log log-sum-exp of the scaled scores, float32; an empty set gives
    ``out = 0`` and ``lse = -inf``.
  * retrieval region: tokens ``[sink, N - local)``; candidate blocks hold at least one of them; window
    tokens inside a selected block are masked.
  * top-k: the ``k`` largest scores; ties go to the lower block index; output ascending, ``-1`` padded.
  * budget ``b`` retrieves ``ceil(b * N / BS)`` blocks (at most the candidates); ``b == 0`` retrieves none.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def retrieval_tokens(n: int, sink: int, local: int) -> tuple[int, int]:
    begin = min(sink, n)
    end = max(n - local, begin)
    return begin, end


def candidate_blocks(n: int, sink: int, local: int, block_size: int) -> range:
    begin, end = retrieval_tokens(n, sink, local)
    if end <= begin:
        return range(0)
    return range(begin // block_size, -(-end // block_size))


def num_budget_blocks(budget: float, n: int, block_size: int, num_candidates: int) -> int:
    if budget <= 0:
        return 0
    want = float(torch.tensor(budget, dtype=torch.float32)) * n / block_size
    k = max(1, math.ceil(want - 1e-6))
    return min(k, num_candidates)


def block_minmax(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block elementwise key min and max. k: [N, D] -> ([NB, D], [NB, D]), last block may be partial."""
    n = k.shape[0]
    mins, maxs = [], []
    for start in range(0, n, block_size):
        blk = k[start : start + block_size].float()
        mins.append(blk.min(dim=0).values)
        maxs.append(blk.max(dim=0).values)
    if not mins:
        empty = k.new_zeros((0, k.shape[1]), dtype=torch.float32)
        return empty, empty
    return torch.stack(mins), torch.stack(maxs)


def quest_scores(q: torch.Tensor, k: torch.Tensor, n: int, block_size: int, sink: int, local: int,
                 num_blocks: int | None = None) -> torch.Tensor:
    """Quest upper bound per block.

    q: [G, D] query heads of one KV head; k: [>=n, D] its keys (first n valid).
    Returns [G, NB] float32 with -inf for non-candidate blocks; NB = num_blocks or ceil(n / BS).
    score_j = sum_i max(q_i * min_ij, q_i * max_ij)
    """
    nb = num_blocks if num_blocks is not None else -(-n // block_size)
    scores = torch.full((q.shape[0], nb), NEG_INF, dtype=torch.float32)
    mn, mx = block_minmax(k[:n], block_size)
    qf = q.float()
    for j in candidate_blocks(n, sink, local, block_size):
        scores[:, j] = torch.maximum(qf * mn[j], qf * mx[j]).sum(dim=-1)
    return scores


def topk_blocks(scores: torch.Tensor, k: int, max_k: int | None = None) -> torch.Tensor:
    """Select from one row of scores [NB]. Returns int32 [max_k] ascending, -1 padded."""
    max_k = k if max_k is None else max_k
    finite = [(float(s), j) for j, s in enumerate(scores.tolist()) if s != NEG_INF]
    finite.sort(key=lambda sj: (-sj[0], sj[1]))
    chosen = sorted(j for _, j in finite[: min(k, max_k)])
    out = torch.full((max_k,), -1, dtype=torch.int32)
    out[: len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one query vector. q: [D], k/v: [N, D], mask: [N] bool (True = attend).

    Returns (out [D] float32, lse scalar float32); empty -> (0, -inf).
    """
    s = (k.double() @ q.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    if s.numel() == 0 or bool(torch.isinf(s).all()):
        return torch.zeros(q.shape[-1], dtype=torch.float32), torch.tensor(NEG_INF)
    lse = torch.logsumexp(s, dim=0)
    p = torch.exp(s - lse)
    return (p @ v.double()).float(), lse.float()


def _block_token_mask(n: int, block_idx, block_size: int, sink: int, local: int) -> torch.Tensor:
    begin, end = retrieval_tokens(n, sink, local)
    mask = torch.zeros(n, dtype=torch.bool)
    for j in block_idx:
        j = int(j)
        if j < 0:
            continue
        lo, hi = max(j * block_size, begin), min((j + 1) * block_size, end)
        if hi > lo:
            mask[lo:hi] = True
    return mask


def sparse_attention(q, k, v, seq_lens, block_idx, block_size, sink, local, scale):
    """q: [B, Hq, D]; k/v: [B, Hkv, Nmax, D]; seq_lens: [B]; block_idx: [B, Hq, K] (-1 = none).

    Returns (out [B, Hq, D] float32, lse [B, Hq] float32).
    """
    bsz, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(bsz, hq, d)
    lse = torch.full((bsz, hq), NEG_INF)
    for b in range(bsz):
        n = int(seq_lens[b])
        for h in range(hq):
            mask = _block_token_mask(n, block_idx[b, h].tolist(), block_size, sink, local)
            out[b, h], lse[b, h] = attention(q[b, h], k[b, h // group, :n], v[b, h // group, :n], scale, mask)
    return out, lse


def retrieval_attention(q, k, v, seq_lens, budgets, block_sizes, sink, local, scale, groups=None):
    """The retrieval task: per KV-head group, Quest scores -> per-head top-k by budget -> attention.

    q: [B, Hq, D]; k/v: [B, Hkv, Nmax, D]; seq_lens: [B]; budgets: [B, Hq] in [0, 1];
    block_sizes: [B, Hkv]; groups: iterable of g = b * Hkv + kv_head to run (default all); heads of
    groups not run get out 0, lse -inf.
    """
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.zeros(bsz, hq, d)
    lse = torch.full((bsz, hq), NEG_INF)
    run = range(bsz * hkv) if groups is None else [int(g) for g in groups]
    for g in run:
        b, kvh = divmod(g, hkv)
        n = int(seq_lens[b])
        bs = int(block_sizes[b, kvh])
        heads = range(kvh * group, (kvh + 1) * group)
        scores = quest_scores(q[b, kvh * group:(kvh + 1) * group], k[b, kvh], n, bs, sink, local)
        ncand = len(candidate_blocks(n, sink, local, bs))
        for i, h in enumerate(heads):
            kk = num_budget_blocks(float(budgets[b, h]), n, bs, ncand)
            sel = topk_blocks(scores[i], kk).tolist() if kk > 0 else []
            mask = _block_token_mask(n, sel, bs, sink, local)
            out[b, h], lse[b, h] = attention(q[b, h], k[b, kvh, :n], v[b, kvh, :n], scale, mask)
    return out, lse


def window_attention(q, k, v, seq_lens, sink, local, scale):
    """Dense attention over the default window [0, sink) U [N - local, N) of each sequence.

    q: [B, Hq, D]; k/v: [B, Hkv, Nmax, D] (full sequences, the reference picks the window itself).
    """
    bsz, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(bsz, hq, d)
    lse = torch.full((bsz, hq), NEG_INF)
    for b in range(bsz):
        n = int(seq_lens[b])
        mask = torch.zeros(n, dtype=torch.bool)
        mask[: min(sink, n)] = True
        mask[max(n - local, 0):] = True
        for h in range(hq):
            out[b, h], lse[b, h] = attention(q[b, h], k[b, h // group, :n], v[b, h // group, :n], scale, mask)
    return out, lse


def full_attention(q, k, v, seq_lens, scale):
    """Dense attention over all N tokens. Shapes as in window_attention."""
    bsz, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(bsz, hq, d)
    lse = torch.full((bsz, hq), NEG_INF)
    for b in range(bsz):
        n = int(seq_lens[b])
        for h in range(hq):
            out[b, h], lse[b, h] = attention(q[b, h], k[b, h // group, :n], v[b, h // group, :n], scale)
    return out, lse


def merge_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial states. outs: [S, ..., D], lses: [S, ...] -> ([..., D], [...]).

    lse = log(sum_s exp(lse_s)); out = sum_s exp(lse_s - lse) * out_s. All -inf -> (0, -inf).
    """
    lse64 = lses.double()
    total = torch.logsumexp(lse64, dim=0)
    weights = torch.exp(lse64 - total.unsqueeze(0))
    weights = torch.nan_to_num(weights, nan=0.0)
    out = (weights.unsqueeze(-1) * outs.double()).sum(dim=0)
    return out.float(), total.float()
