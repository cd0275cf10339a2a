"""User-facing configuration of the Fluxion runtime and its HuggingFace integration.

Every field is checked when the config is built (and the shape-dependent ones again against the model in
:meth:`FluxionConfig.validate_for`); a bad value raises ``ValueError`` naming the field, the allowed range
and what was given.

Shape vocabulary: ``L`` layers, ``Hq``/``Hkv`` query/KV heads.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

MODES = ("full", "fixed", "fluxion")
BLOCK_SIZES = (16, 32, 64, 128)
DEVICE_POLICIES = ("auto", "shared", "cpu", "gpu")
DECODE_BACKENDS = ("python", "cpp")
KV_DTYPES = (torch.bfloat16, torch.float16)


def _err(name: str, want: str, got: Any) -> ValueError:
    return ValueError(f"FluxionConfig.{name} must be {want}, got {got!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class HeadTable:
    """Per-head retrieval settings for 'fluxion' mode.

    budgets:     [L, Hq] float32 in [0, 1], fraction of a sequence's tokens each query head retrieves
                 (0 = streaming head: the sink + local window only).
    block_sizes: [L, Hkv] int32 in {16, 32, 64, 128}; heads of one KV group share the group's block size.
    """

    budgets: torch.Tensor
    block_sizes: torch.Tensor

    @classmethod
    def coerce(cls, value, default_block_size: int) -> "HeadTable":
        """Accepts a HeadTable, a dict {'budgets', 'block_sizes'?}, a (budgets, block_sizes) pair, or just
        budgets (tensor or nested lists); missing block sizes become ``default_block_size`` for every group."""
        if isinstance(value, HeadTable):
            budgets, block_sizes = value.budgets, value.block_sizes
        elif isinstance(value, dict):
            unknown = set(value) - {"budgets", "block_sizes"}
            if unknown or "budgets" not in value:
                raise _err("head_table", "a dict with keys 'budgets' and optionally 'block_sizes'", sorted(value))
            budgets, block_sizes = value["budgets"], value.get("block_sizes")
        elif isinstance(value, tuple) and len(value) == 2:
            budgets, block_sizes = value
        else:
            budgets, block_sizes = value, None
        try:
            b = torch.as_tensor(budgets, dtype=torch.float32).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError) as e:
            raise _err("head_table", "budgets as a [L, Hq] tensor or nested list of floats", type(budgets).__name__) from e
        if b.dim() != 2:
            raise _err("head_table", "budgets of shape [L, Hq]", f"shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b < 0).any() or (b > 1).any():
            raise _err("head_table", "budgets in [0, 1] (0 = streaming head)",
                       f"values in [{float(b.min())}, {float(b.max())}]")
        if block_sizes is None:
            s = None
        else:
            try:
                s = torch.as_tensor(block_sizes).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as e:
                raise _err("head_table", "block_sizes as a [L, Hkv] tensor or nested list of ints",
                           type(block_sizes).__name__) from e
            if s.dtype.is_floating_point and not torch.equal(s, s.round()):
                raise _err("head_table", "integer block_sizes", s.tolist())
            s = s.to(torch.int32).clone()
            if s.dim() != 2:
                raise _err("head_table", "block_sizes of shape [L, Hkv]", f"shape {tuple(s.shape)}")
            bad = [int(x) for x in s.unique().tolist() if int(x) not in BLOCK_SIZES]
            if bad:
                raise _err("head_table", f"block_sizes in {BLOCK_SIZES}", f"block size(s) {bad}")
        if s is None:
            s = torch.full((b.shape[0], 1), int(default_block_size), dtype=torch.int32)  # broadcast in validate_for
        return cls(b, s)


@dataclass
class FluxionConfig:
    """How Fluxion runs decode attention.

    mode:           'full'    exact attention over every token (budget 1.0 for every head; quality reference);
                    'fixed'   every head retrieves ``budget`` of the tokens at ``block_size``, all retrieval on
                              the CPU, the GPU only does the dense window (the paper's fixed hybrid baseline);
                    'fluxion' per-head budgets / per-group block sizes from ``head_table`` (when it is None,
                              every head retrieves ``budget`` at ``block_size`` until the predictor exists);
                              retrieval groups are split between the CPU and the GPU.
    block_size:     block granularity of 'fixed' mode and of 'fluxion' groups without a table entry.
    budget:         fraction of a sequence's tokens a retrieval head reads, in [0, 1].
    sink, local:    the dense window: the first ``sink`` and the last ``local`` tokens of every sequence.
    granularities:  block sizes the selector may choose from (subset of 16, 32, 64, 128).
    error_target:   relative output-error target of the budget predictor (> 0; used by the predictor).
    cpu_threads:    threads of the CPU kernels (the calling thread included); None = all cores but two on a GPU:
                    the GPU control thread and the work outside the kernels keep a core each.
                    Applied by :func:`fluxion.enable` when the model is on a GPU, or whenever given explicitly.
    gpu_streams:    CUDA streams for GPU retrieval (>= 1; the current runtime launches on one stream).
    gpu_share:      in 'full'/'fluxion' mode with a GPU, the share of the retrieval data volume handed to the
                    GPU (largest groups first); the rest runs on the CPU at the same time.
    device_policy:  where retrieval runs: 'auto' (on a GPU with Fluxion's CUDA kernels, each layer step either
                    shares the queue between the CPU and the GPU or runs on the CPU alone, whichever has read
                    faster, measured per layer as it runs and re-checked every 32 steps; CPU otherwise), 'shared'
                    (CPU and GPU whenever the model is on a GPU), 'cpu' (CPU only) or 'gpu' (GPU only; needs the
                    CUDA kernels). Both devices read host DRAM and the GPU's reads slow the CPU's, so whether
                    sharing beats the CPU alone depends on the step and the host: it is measured, not assumed.
    host_byte_cap:  bound on the host store's committed bytes (None = physical memory); exceeding it raises
                    :class:`fluxion.CapacityError` and stores nothing.
    page_tokens:    tokens per host page (a positive multiple of 128; 1024 by default, which makes the block-16
                    key metadata of a page one 32 KiB run for the CPU's metadata scan).
    kv_dtype:       dtype of the host store and the dense window (bf16 / fp16). None = the model's dtype when
                    it is bf16/fp16, else float16 (the kernels read 16-bit K/V; fp16 keeps 3 more mantissa
                    bits than bf16 for fp32 models, and an overflow is reported at prefill).
    prefill_chunk:  query tokens per SDPA call during prefill where masks are needed (left padding, a stored
                    past): bounds the score matrix at long prompts. An unpadded prompt with no past runs as one
                    fused causal kernel instead, which never forms the scores.
    decode_backend: 'cpp' (default): the C++ step, ``torch.classes.fluxion.HybridRuntime``: one shared task
                    queue ordered by data volume, CPU workers and a GPU control thread each pulling the next task
                    when free (``gpu_share`` unused). 'python': the same step composed of the ops in Python with a
                    static CPU/GPU split by ``gpu_share`` (a readable twin, tested equal on the CPU).
    cuda_graphs:    run decode steps (one new token per sequence) through CUDA-graph segments: the GPU work
                    between attention calls replays as captured graphs, only the hybrid attention runs eagerly
                    (:class:`fluxion.graphs.SegmentGraphs`); a step whose attention runs on the GPU alone in every
                    layer replays as one whole-step graph. None = on when the model is on a CUDA device;
                    True requires that; False = HF's eager forward for every step.
    head_table:     see :class:`HeadTable`; shapes are checked against the model by :meth:`validate_for`.
    """

    mode: str = "fluxion"
    block_size: int = 16
    budget: float = 0.05
    sink: int = 64
    local: int = 256
    granularities: Sequence[int] = (16, 32, 64, 128)
    error_target: float = 0.05
    cpu_threads: int | None = None
    gpu_streams: int = 1
    gpu_share: float = 0.5
    device_policy: str = "auto"
    host_byte_cap: int | None = None
    page_tokens: int = 1024
    kv_dtype: torch.dtype | None = None
    prefill_chunk: int = 2048
    decode_backend: str = "cpp"
    cuda_graphs: bool | None = None
    head_table: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise _err("mode", f"one of {MODES}", self.mode)
        if not _is_int(self.block_size) or self.block_size not in BLOCK_SIZES:
            raise _err("block_size", f"one of {BLOCK_SIZES}", self.block_size)
        if not _is_real(self.budget) or not 0.0 <= float(self.budget) <= 1.0:
            raise _err("budget", "a number in [0, 1]", self.budget)
        self.budget = float(self.budget)
        if not _is_int(self.sink) or self.sink < 0:
            raise _err("sink", "an int >= 0", self.sink)
        if not _is_int(self.local) or self.local < 0:
            raise _err("local", "an int >= 0", self.local)
        if self.sink + self.local < 1:
            raise _err("local", "such that sink + local >= 1 (the dense window holds the newest token)", self.local)
        try:
            gran = tuple(sorted({int(g) for g in self.granularities}))
        except (TypeError, ValueError) as e:
            raise _err("granularities", f"a non-empty subset of {BLOCK_SIZES}", self.granularities) from e
        if not gran or any(g not in BLOCK_SIZES for g in gran):
            raise _err("granularities", f"a non-empty subset of {BLOCK_SIZES}", self.granularities)
        self.granularities = gran
        if self.mode != "full" and self.block_size not in gran:
            raise _err("block_size", f"one of granularities {gran}", self.block_size)
        if not _is_real(self.error_target) or not float(self.error_target) > 0 or float(self.error_target) == float("inf"):
            raise _err("error_target", "a finite number > 0", self.error_target)
        self.error_target = float(self.error_target)
        if self.cpu_threads is not None and (not _is_int(self.cpu_threads) or self.cpu_threads < 1):
            raise _err("cpu_threads", "None or an int >= 1", self.cpu_threads)
        if not _is_int(self.gpu_streams) or self.gpu_streams < 1:
            raise _err("gpu_streams", "an int >= 1", self.gpu_streams)
        if not _is_real(self.gpu_share) or not 0.0 <= float(self.gpu_share) <= 1.0:
            raise _err("gpu_share", "a number in [0, 1]", self.gpu_share)
        self.gpu_share = float(self.gpu_share)
        if self.decode_backend not in DECODE_BACKENDS:
            raise _err("decode_backend", f"one of {DECODE_BACKENDS}", self.decode_backend)
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise _err("cuda_graphs", "None, True or False", self.cuda_graphs)
        if self.device_policy not in DEVICE_POLICIES:
            raise _err("device_policy", f"one of {DEVICE_POLICIES}", self.device_policy)
        if self.host_byte_cap is not None and (not _is_int(self.host_byte_cap) or self.host_byte_cap <= 0):
            raise _err("host_byte_cap", "None or an int > 0 (bytes)", self.host_byte_cap)
        if not _is_int(self.page_tokens) or self.page_tokens <= 0 or self.page_tokens % 128:
            raise _err("page_tokens", "a positive multiple of 128", self.page_tokens)
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise _err("kv_dtype", "None, torch.bfloat16 or torch.float16", self.kv_dtype)
        if not _is_int(self.prefill_chunk) or self.prefill_chunk < 1:
            raise _err("prefill_chunk", "an int >= 1", self.prefill_chunk)
        if self.head_table is not None:
            if self.mode != "fluxion":
                raise _err("head_table", "None unless mode='fluxion'", f"a table with mode={self.mode!r}")
            self.head_table = HeadTable.coerce(self.head_table, self.block_size)
            bad = [int(x) for x in self.head_table.block_sizes.unique().tolist() if int(x) not in gran]
            if bad:
                raise _err("head_table", f"block_sizes within granularities {gran}", f"block size(s) {bad}")

    def replace(self, **changes) -> "FluxionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def resolved_cpu_threads(self) -> int:
        """cpu_threads, or all cores but two (at least one). Measured on the 16-core H200 box (64K context,
        share16-0.05): 15 threads left the GPU control thread without a core of its own and made the shared
        step slower than 14 (47.7 vs 50.9 ms TPOT); the CPU-only fixed step was no faster with 15."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, n - 2)

    def resolved_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        if self.kv_dtype is not None:
            return self.kv_dtype
        return model_dtype if model_dtype in KV_DTYPES else torch.float16

    def validate_for(self, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> HeadTable:
        """Checks the model geometry against the config and returns the per-head table the runtime uses:
        budgets [L, Hq] and block_sizes [L, Hkv] (for 'full' and 'fixed' the uniform tables of the mode)."""
        if head_dim not in (64, 128):
            raise ValueError(f"Fluxion's kernels support head_dim 64 or 128; this model has head_dim={head_dim}")
        if num_kv_heads < 1 or num_q_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
        if num_q_heads // num_kv_heads > 64:
            raise ValueError(f"at most 64 query heads per KV head are supported, got {num_q_heads // num_kv_heads}")
        if self.mode == "full":
            # Budget 1.0 selects every candidate block at any block size; the largest one scans the fewest rows.
            return HeadTable(torch.ones(num_layers, num_q_heads),
                             torch.full((num_layers, num_kv_heads), max(self.granularities), dtype=torch.int32))
        if self.mode == "fixed" or self.head_table is None:
            return HeadTable(torch.full((num_layers, num_q_heads), self.budget),
                             torch.full((num_layers, num_kv_heads), self.block_size, dtype=torch.int32))
        t = self.head_table
        if tuple(t.budgets.shape) != (num_layers, num_q_heads):
            raise _err("head_table", f"budgets of shape [L, Hq] = [{num_layers}, {num_q_heads}] for this model",
                       f"shape {tuple(t.budgets.shape)}")
        sizes = t.block_sizes
        if tuple(sizes.shape) == (num_layers, 1):  # block sizes were not given: one per layer
            sizes = sizes.expand(num_layers, num_kv_heads).contiguous()
        if tuple(sizes.shape) != (num_layers, num_kv_heads):
            raise _err("head_table", f"block_sizes of shape [L, Hkv] = [{num_layers}, {num_kv_heads}] for this model",
                       f"shape {tuple(sizes.shape)}")
        return HeadTable(t.budgets.clone(), sizes.clone())
