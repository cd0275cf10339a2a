"""Fluxion: hybrid CPU-GPU block-sparse attention over a host-resident KV cache for long-context decoding."""

from __future__ import annotations

import json
import os
import warnings

import torch

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (registers torch.ops.fluxion.* and torch.classes.fluxion.*)
except ImportError as e:  # a source checkout that was never built
    _C = None
    warnings.warn(f"fluxion's compiled library is missing ({e}); run `pip install --no-build-isolation -e .`",
                  stacklevel=2)

if _C is not None:
    from . import _ops  # noqa: F401,E402  (fake kernels)
    from ._ops import (  # noqa: E402
        merge_attention_states,
        retrieval_attention,
        score_blocks,
        sparse_attention,
        topk_blocks,
        window_append,
        window_attention,
    )
from .store import CapacityError, HostKVStore  # noqa: E402


def build_info() -> dict:
    """How this copy was built (recorded by setup.py) plus what the running process sees."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    info["torch_runtime"] = torch.__version__
    info["cuda_kernels"] = bool(_C) and torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::score_blocks", "CUDA")
    info["simd"] = _C.simd_level() if _C else None
    info["simd_supported"] = _C.simd_supported() if _C else []
    info["threads"] = torch.get_num_threads()
    return info


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (ATen's intra-op pool)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def set_simd_level(level: str) -> None:
    """Force the CPU kernels' SIMD level: 'scalar', 'avx2', 'avx512', 'avx512_bf16' or 'avx512_amx' (must be supported
    by this CPU; fluxion._C.simd_supported() lists those that are)."""
    _C.set_simd_level(level)


def set_window_kernel(kernel: str) -> None:
    """CUDA kernel of window_attention, process-wide: 'auto' (default: 'mma:2', fastest on the H200), 'tile', 'mma' or 'mma:R' (R = 1..8
    CTAs per (sequence, KV head, head slice); 1 = no cluster). Initial value: $FLUXION_WINDOW_KERNEL. A CUDA
    graph keeps the kernel it captured."""
    _C.set_window_kernel(kernel)


def window_kernel() -> str:
    """The kernel window_attention launches on CUDA now (see set_window_kernel)."""
    return _C.window_kernel()


# HuggingFace integration. transformers is imported on first use only (PEP 562), so `import fluxion` stays light.
from .config import FluxionConfig, HeadTable  # noqa: E402

_LAZY = {"enable": "hf", "disable": "hf", "enabled": "hf", "new_cache": "hf", "last_cache": "hf",
         "FluxionCache": "hf", "HybridAttentionRuntime": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fluxion' has no attribute {name!r}")
