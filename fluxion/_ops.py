"""Thin wrappers over ``torch.ops.fluxion.*`` and their fake (meta) kernels for torch.compile / export.

Conventions: ``B`` batch, ``Hq``/``Hkv`` heads, ``D`` head_dim, ``N`` tokens. Every ``lse`` is the
natural-log log-sum-exp in float32 (never base 2); ``out`` of a partial attention is float32.
"""

from __future__ import annotations

import math

import torch

_lib = "fluxion"


def _fake(name):
    return torch.library.register_fake(f"{_lib}::{name}")


@_fake("score_blocks")
def _score_blocks_fake(q, pages, frame_table, seq_lens, page_tokens, block_size, sink, local):
    nb = frame_table.shape[1] * page_tokens // block_size
    return q.new_empty((q.shape[0], q.shape[1], nb), dtype=torch.float32)


@_fake("topk_blocks")
def _topk_blocks_fake(scores, k, max_k):
    return scores.new_empty((*k.shape, max_k), dtype=torch.int32)


@_fake("sparse_attention")
def _sparse_attention_fake(q, pages, frame_table, seq_lens, block_idx, page_tokens, block_size, sink, local, scale):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


@_fake("retrieval_attention")
def _retrieval_attention_fake(q, pages, frame_table, seq_lens, budgets, block_sizes, groups, page_tokens, sink, local,
                              scale):
    return (q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32),
            q.new_empty((q.shape[0], pages.shape[1]), dtype=torch.int64))


@_fake("merge_attention_states")
def _merge_fake(outs, lses):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


@_fake("window_append")
def _window_append_fake(k_win, v_win, k, v, positions, sink):
    return None


@_fake("window_attention")
def _window_attention_fake(q, k_win, v_win, seq_lens, sink, scale):
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:2], dtype=torch.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def score_blocks(q, pages, frame_table, seq_lens, *, page_tokens, block_size, sink=64, local=256):
    """Quest upper bound of every block. q: [B, Hq, D] -> [B, Hq, max_frames*page_tokens/block_size] float32
    (-inf outside the retrieval region [sink, N - local))."""
    return torch.ops.fluxion.score_blocks(q, pages, frame_table, seq_lens, page_tokens, block_size, sink, local)


def topk_blocks(scores, k, max_k):
    """Per row, the min(k, max_k, #finite) highest scores; ties to the lower index; ascending, -1 padded.
    scores: [R, NB] float32, k: [R] int32 -> [R, max_k] int32."""
    return torch.ops.fluxion.topk_blocks(scores, k, max_k)


def sparse_attention(q, pages, frame_table, seq_lens, block_idx, *, page_tokens, block_size, sink=64, local=256,
                     scale=None):
    """Attention over the tokens of each head's selected blocks (window tokens masked).
    block_idx: [B, Hq, K] int32 (-1 unused) -> (out [B, Hq, D] float32, lse [B, Hq] float32)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return torch.ops.fluxion.sparse_attention(q, pages, frame_table, seq_lens, block_idx, page_tokens, block_size, sink,
                                              local, scale)


def retrieval_attention(q, pages, frame_table, seq_lens, budgets, block_sizes, groups=None, *, page_tokens, sink=64,
                        local=256, scale=None):
    """The retrieval task over KV-head groups (all when groups is None).
    Returns (out [B, Hq, D] float32, lse [B, Hq] float32, bytes_read [B, Hkv] int64)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if groups is None:
        groups = torch.arange(q.shape[0] * pages.shape[1], dtype=torch.int32, device=budgets.device)
    return torch.ops.fluxion.retrieval_attention(q, pages, frame_table, seq_lens, budgets, block_sizes, groups,
                                                 page_tokens, sink, local, scale)


def merge_attention_states(outs, lses):
    """Merge S partial states: outs [S, ..., D], lses [S, ...] -> (out, lse); empty parts (-inf) are no-ops."""
    return torch.ops.fluxion.merge_attention_states(outs, lses)


def window_append(k_win, v_win, k, v, positions, sink=64):
    """Write tokens into the dense window in place (slot p < sink, else sink + (p - sink) % local)."""
    torch.ops.fluxion.window_append(k_win, v_win, k, v, positions, sink)


def window_attention(q, k_win, v_win, seq_lens, sink=64, scale=None):
    """Attention over each sequence's dense window -> (out [B, Hq, D] float32, lse [B, Hq] float32)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return torch.ops.fluxion.window_attention(q, k_win, v_win, seq_lens, sink, scale)
