"""The host-resident block KV store (Python face of the C++ ``HostKVStore``)."""

from __future__ import annotations

from typing import Sequence

import torch


class CapacityError(RuntimeError):
    """An append would exceed the store's byte cap; nothing was stored."""


_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _ids(seq_ids) -> list[int]:
    if isinstance(seq_ids, int):
        return [seq_ids]
    if isinstance(seq_ids, torch.Tensor):
        return [int(s) for s in seq_ids.reshape(-1).tolist()]
    return [int(s) for s in seq_ids]


class HostKVStore:
    """K/V of every layer x sequence x KV head in host memory, with key min/max per block at 16/32/64/128.

    Frames of ``page_tokens`` tokens are allocated as sequences grow (never re-copied). With ``pin=True``
    (default ``None``: pinned when a CUDA build sees a GPU) the arena is page-locked so CUDA kernels read
    it in place; a pinned store commits and pins its next chunk on a thread of its own before appends need it
    (pinning holds the CUDA driver's lock, so a decode step that pinned gigabytes itself would stall for seconds).
    ``byte_cap`` bounds committed memory: an append that would exceed it raises :class:`CapacityError` and stores
    nothing.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 page_tokens: int = 1024, byte_cap: int | None = None, pin: bool | None = None):
        import fluxion  # noqa: F401  (loads the op library)

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        if byte_cap is not None and byte_cap <= 0:
            raise ValueError(f"byte_cap must be positive or None, got {byte_cap}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.page_tokens = dtype, page_tokens
        pin_mode = -1 if pin is None else int(bool(pin))
        self._impl = torch.classes.fluxion.HostKVStore(num_layers, num_kv_heads, head_dim, _DTYPES[dtype], page_tokens,
                                                       int(byte_cap or 0), pin_mode)

    @property
    def pinned(self) -> bool:
        return self._impl.pinned()

    @property
    def page_elems(self) -> int:
        return self._impl.page_elems()

    def frames_available(self) -> int:
        """Frames (page_tokens x all KV heads of one layer and sequence) appends can still obtain under the
        byte cap / reservation; an append needing more raises CapacityError."""
        return self._impl.frames_available()

    def wait_pinned_ahead(self) -> int:
        """A pinned store: waits for the chunk being pinned ahead of need, takes it in, and returns the bytes
        pinned ahead so far (0 for an unpinned store). Appends wait for it only when they need its frames."""
        return self._impl.wait_pinned_ahead()

    def add_sequence(self) -> int:
        return self._impl.add_sequence()

    def free_sequence(self, seq: int) -> None:
        self._impl.free_sequence(seq)

    def sequences(self) -> list[int]:
        return list(self._impl.sequences())

    def append(self, layer: int, seq_ids, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append tokens of one layer. k, v: [B, Hkv, T, D] (any device); valid: [B, T] bool, False = skip."""
        try:
            self._impl.append(layer, _ids(seq_ids), k, v, valid)
        except RuntimeError as e:
            if "[fluxion.CapacityError]" in str(e):
                raise CapacityError(str(e).split("[fluxion.CapacityError] ", 1)[1].split("\n")[0]) from None
            raise

    def seq_len(self, layer: int, seq: int) -> int:
        return self._impl.seq_len(layer, seq)

    def pages(self) -> torch.Tensor:
        """The arena as [F, Hkv, page_elems] (a view: no copy; pinned when the store is)."""
        return self._impl.pages()

    def frame_table(self, layer: int, seq_ids: Sequence[int]) -> torch.Tensor:
        """[B, max_frames] int32 frame ids of each sequence at this layer."""
        return self._impl.frame_table(layer, _ids(seq_ids))

    def seq_lens(self, layer: int, seq_ids: Sequence[int]) -> torch.Tensor:
        return self._impl.seq_lens(layer, _ids(seq_ids))

    def gather(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V, [Hkv, N, D] each (for inspection and tests)."""
        return self._impl.gather(layer, seq)

    def block_metadata(self, layer: int, seq: int, block_size: int) -> torch.Tensor:
        """Copy of the key min/max table, [Hkv, NB, 2, D] (row 0 min, row 1 max)."""
        return self._impl.block_metadata(layer, seq, block_size)

    def stats(self) -> dict[str, int]:
        """Memory accounting: kv_bytes, metadata_bytes, allocated/committed/pinned/reserved bytes, byte_cap, ..."""
        return dict(self._impl.stats())

    def layer_args(self, layer: int, seq_ids, device=None) -> dict:
        """Keyword arguments for the paged ops: pages, frame_table, seq_lens (on `device`), page_tokens."""
        ft, sl = self.frame_table(layer, seq_ids), self.seq_lens(layer, seq_ids)
        if device is not None:
            ft, sl = ft.to(device), sl.to(device)
        return {"pages": self.pages(), "frame_table": ft, "seq_lens": sl, "page_tokens": self.page_tokens}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"HostKVStore(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, page_tokens={self.page_tokens}, pinned={self.pinned}, "
                f"kv={s['kv_bytes'] / 2**20:.1f} MiB, meta={s['metadata_bytes'] / 2**20:.1f} MiB)")
