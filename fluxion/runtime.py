"""The per-layer hybrid attention step: host KV store + dense window + retrieval on CPU and GPU.

One :class:`HybridAttentionRuntime` serves one batch of sequences of one model (the HF integration makes one
per cache). For each layer it owns

* the layer's K/V of every sequence in the host store (:class:`fluxion.HostKVStore`, page-locked when the
  model is on a GPU, so the CUDA kernels read it in place over PCIe);
* the dense window ``k_win``/``v_win`` [B, Hkv, sink + local, D] on the model's device (sink slots, then a
  ring of the ``local`` newest tokens; written with :func:`fluxion.window_append`).

Shapes: ``B`` batch, ``Hq``/``Hkv`` heads, ``D`` head_dim, ``T`` new tokens, ``N`` stored tokens. Every ``lse``
is the natural-log log-sum-exp in float32. Left padding is never stored: a sequence's store length counts
only its valid tokens, while :attr:`positions` counts the padded positions HF has seen (its cache length).

Decode step of one layer (:meth:`HybridAttentionRuntime.decode`), the body the C++ op will replace:
append the token (host store + window) -> dense window attention on the model's device -> retrieval of the
active KV-head groups, largest data volume first to the GPU up to ``gpu_share`` and the rest to the CPU,
running at the same time (the CUDA op is launched asynchronously before the blocking CPU op) -> exact
log-sum-exp merge of all parts (each part has ``lse = -inf`` for the groups it did not run).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _ops
from .config import FluxionConfig
from .store import CapacityError, HostKVStore



def _sdpa_has_gqa() -> bool:
    try:  # torch >= 2.5; the builtin has no inspectable signature, so ask it directly
        x = torch.zeros(1, 2, 1, 8)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_HAS_GQA = _sdpa_has_gqa()
# Output dtypes the C++ step's merge writes directly (decode(out=...)).
_MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_kernels_available() -> bool:
    """True when Fluxion's CUDA retrieval kernel is registered (a CUDA build); says nothing about a GPU."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fluxion::retrieval_attention", "CUDA")


def _sdpa(q, k, v, mask, scale, is_causal=False):
    """torch SDPA with GQA: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask [B, 1, Tq, Tk] bool or None."""
    if k.shape[1] != q.shape[1]:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal,
                                                  enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal)


def _fused_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal SDPA through a fused kernel only (flash / memory-efficient / cuDNN, never the math backend's T x T
    score matrix); None when no fused kernel takes these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # torch explains with a warning per backend why none took the inputs (fp32 with GQA, say); the caller has a
    # fallback, so those warnings say nothing to the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                return _sdpa(q, k, v, None, scale, is_causal=True)
        except RuntimeError:
            return None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     valid: torch.Tensor | None = None, past_len: torch.Tensor | None = None,
                     chunk: int = 2048) -> torch.Tensor:
    """Causal attention of T new tokens over [past | new] keys, with left padding, in query chunks.

    q [B, Hq, T, D]; k/v [B, Hkv, P + T, D] where the first P columns hold each sequence's past (sequence b
    has past_len[b] <= P valid past tokens, left-aligned); valid [B, T] bool marks real new tokens (None: all).
    A padded query row attends only to itself (a finite row; its output is zeroed). Returns [B, Hq, T, D].
    """
    B, _, T, _ = q.shape
    P = k.shape[2] - T
    dev = q.device
    if valid is None and P == 0:
        if T <= chunk:
            return _sdpa(q, k, v, None, scale, is_causal=T > 1)
        # A whole unpadded prompt: one fused causal kernel never forms the T x T scores, so it needs no chunks
        # (chunks with explicit masks would run a slower masked kernel over every earlier key).
        out = _fused_causal(q, k, v, scale)
        if out is not None:
            return out
    out = torch.empty_like(q)
    new_ok = valid.to(dev, torch.bool) if valid is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    if P:
        cols = torch.arange(P, device=dev)
        past_ok = cols[None, :] < past_len.to(dev)[:, None]  # [B, P]
    for i0 in range(0, T, chunk):
        i1 = min(T, i0 + chunk)
        qi = torch.arange(i0, i1, device=dev)
        kj = torch.arange(i1, device=dev)
        causal = (kj[None, :] <= qi[:, None])[None]  # [1, c, i1]
        m = causal & new_ok[:, None, :i1]
        m = m | (kj[None, :] == qi[:, None])[None]  # padded rows: keep the diagonal so no row is empty
        if P:
            m = torch.cat([past_ok[:, None, :].expand(B, i1 - i0, P), m], dim=2)
        out[:, :, i0:i1] = _sdpa(q[:, :, i0:i1], k[:, :, :P + i1], v[:, :, :P + i1], m[:, None], scale)
    if valid is not None:
        out = out.masked_fill(~new_ok[:, None, :, None], 0)
    return out


class _Stats:
    """Accumulates per-step timings and traffic; GPU intervals are CUDA events resolved lazily."""

    KEYS = ("dense_s", "retrieval_cpu_s", "retrieval_gpu_s", "merge_s", "append_s")

    def __init__(self):
        self.reset()

    def reset(self):
        self.t = dict.fromkeys(self.KEYS, 0.0)
        self.decode_steps = 0
        self.prefill_calls = 0
        self.prefill_tokens = 0
        self.prefill_s = 0.0
        self.bytes_cpu = 0
        self.bytes_pcie_host = 0
        self.bytes_pcie_dev = None  # device tensor, summed without a sync
        self.tasks_cpu = 0
        self.tasks_gpu = 0
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def add_event(self, key: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        """A GPU interval for `key`, resolved lazily; the pending list stays bounded (old events are long done)."""
        self.events.append((key, start, end))
        if len(self.events) > 4096:
            self.resolve()

    def resolve(self):
        for key, a, b in self.events:
            b.synchronize()
            self.t[key] = self.t.get(key, 0.0) + a.elapsed_time(b) / 1e3
        self.events.clear()
        if self.bytes_pcie_dev is not None:
            self.bytes_pcie_host += int(self.bytes_pcie_dev.item())
            self.bytes_pcie_dev = None


class HybridAttentionRuntime:
    """Host-resident KV cache and hybrid sparse decode attention for every layer of one model and one batch.

    Args:
        config:        :class:`FluxionConfig`.
        num_layers, num_q_heads, num_kv_heads, head_dim: the model's attention geometry (Hq % Hkv == 0).
        device:        the model's device; the dense window and the merge live there. On the CPU everything
                       (window included) runs with the CPU ops.
        dtype:         the model's dtype (outputs are returned in it).
        scale:         softmax scale (default 1 / sqrt(D)).
        timing:        record per-part timings (CUDA events on a GPU); traffic and task counts are always kept.

    Set ``timeline = True`` to have CUDA-graph decode steps (fluxion/graphs.py) record an event at every segment
    boundary: :meth:`stats` then adds ``attention_gpu_s`` (on the GPU's clock, from each layer's q being ready to
    the next segment starting: everything attention costs the step, waits for the host included) and
    ``segments_gpu_s`` (the model's own work). Off by default: it costs ~2 events per layer of host time.
    Whole-step graphs are not covered.
    """

    # On a GPU, a layer's decode step whose retrieval reads fewer bytes than this runs on the GPU alone and the
    # host never waits for the device (short contexts); sharing with the CPU needs q on the host (a sync) and
    # ~0.15 ms of fixed work per layer. Measured on the H200 box (session 13, budget 0.05, batch 1, TPOT of
    # `fluxion` mode, GPU alone vs shared): Llama-3.1-8B shape at 32K (30 MB per layer) 26.4 vs 23.4 ms, at 16K
    # (15 MB) 18.9 vs 18.6, at 8K (7.5 MB) 14.3 vs 15.5; Qwen2.5-7B at 32K (18 MB) 19.8 vs 20.2.
    min_shared_volume = 24 << 20

    def __init__(self, config: FluxionConfig, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, scale: float | None = None,
                 timing: bool = True):
        config.validate_for(num_layers, num_q_heads, num_kv_heads, head_dim)
        self.config = config
        self.num_layers, self.hq, self.hkv, self.d = num_layers, num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.kv_dtype = config.resolved_kv_dtype(dtype)
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.sink, self.local = config.sink, config.local
        self.on_gpu = self.device.type == "cuda"
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"Fluxion runs models on CPU or CUDA devices, got {self.device}")
        if self.on_gpu and not cuda_kernels_available():
            raise RuntimeError("the model is on a GPU but this Fluxion build has no CUDA kernels; rebuild with "
                               "FLUXION_CUDA=1 (pip install --no-build-isolation -e .) or run the model on the CPU")
        if config.device_policy == "gpu" and not self.on_gpu:
            raise ValueError("FluxionConfig.device_policy='gpu' needs the model on a CUDA device with Fluxion's "
                             f"CUDA kernels; the model is on {self.device}")
        self.store = HostKVStore(num_layers, num_kv_heads, head_dim, self.kv_dtype, config.page_tokens,
                                 config.host_byte_cap, pin=self.on_gpu)
        # The C++ decode step (decode_backend='cpp') works on this runtime's store and windows.
        self._cpp = torch.classes.fluxion.HybridRuntime(self.store._impl, num_q_heads, str(self.device), self.sink,
                                                        self.local, config.cpu_threads or 0)
        self._set_plan_constants(config)
        self.timing = timing
        self.timeline = False
        self._stats = _Stats()
        self.seq_ids: list[int] | None = None
        self.positions = [0] * num_layers
        self.k_win: list[torch.Tensor] = []
        self.v_win: list[torch.Tensor] = []
        # Prefill probe (off by default): attention mass of the last `probe_tokens` queries outside the window.
        self.probe_tokens = 0
        self.window_mass: list[torch.Tensor | None] = [None] * num_layers

    def _set_plan_constants(self, config: FluxionConfig) -> None:
        self.config = config
        self.table = config.validate_for(self.num_layers, self.hq, self.hkv, self.d)
        # Where retrieval may run: 'fixed' is the CPU-only baseline by definition.
        self.gpu_retrieval = self.on_gpu and config.mode != "fixed" and config.device_policy != "cpu"
        self.cpu_retrieval = not (self.gpu_retrieval and config.device_policy == "gpu")
        # Per-layer constants of the plan: budgets [L, Hq] and block sizes [L, Hkv] (CPU).
        self._budgets = self.table.budgets.float().contiguous()
        self._sizes = self.table.block_sizes.to(torch.int32).contiguous()
        self._group_budget = self._budgets.view(self.num_layers, self.hkv, self.group).sum(-1)  # [L, Hkv]
        self._cpp_plans: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, B) -> tables
        self._graph_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # B -> [L, B, Hq], [L, B, Hkv]
        self.graph_epoch = getattr(self, "graph_epoch", -1) + 1  # captured whole-step graphs of older epochs are stale
        self._cpp.configure(config.cpu_threads or 0, self.cpu_retrieval, self.min_shared_volume)
        self._cpp.set_adaptive_sharing(config.device_policy == "auto")

    def reconfigure(self, config: FluxionConfig) -> None:
        """Switches the decode policy (mode, budgets, block sizes, head table, device split) of a live cache.
        Fields that shape the stored data (sink, local, page_tokens, kv_dtype, host_byte_cap) must not change."""
        for name in ("sink", "local", "page_tokens", "host_byte_cap"):
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(f"reconfigure cannot change FluxionConfig.{name} of a live cache "
                                 f"({getattr(self.config, name)!r} -> {getattr(config, name)!r})")
        if config.resolved_kv_dtype(self.dtype) != self.kv_dtype:
            raise ValueError("reconfigure cannot change FluxionConfig.kv_dtype of a live cache")
        if config.device_policy == "gpu" and not self.on_gpu:
            raise ValueError("FluxionConfig.device_policy='gpu' needs the model on a CUDA device")
        self._set_plan_constants(config)

    # ------------------------------------------------------------------ sequences
    @property
    def batch(self) -> int:
        return 0 if self.seq_ids is None else len(self.seq_ids)

    def _open(self, batch: int) -> None:
        self.graph_epoch += 1  # new windows and sequences
        self.seq_ids = [self.store.add_sequence() for _ in range(batch)]
        shape = (batch, self.hkv, self.sink + self.local, self.d)
        self.k_win = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_win = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(self.num_layers)]

    def seq_lens(self, layer: int) -> torch.Tensor:
        """[B] int32 (CPU): tokens stored per sequence at `layer` (padding excluded)."""
        return self.store.seq_lens(layer, self.seq_ids)

    def reset(self) -> None:
        """Frees every sequence; the runtime can then take a new batch (host memory stays committed for reuse)."""
        if self.seq_ids is not None:
            for s in self.seq_ids:
                self.store.free_sequence(s)
        self.seq_ids = None
        self.positions = [0] * self.num_layers
        self.k_win, self.v_win = [], []

    def drop_last(self, n: int) -> None:
        """Removes the newest `n` positions of every sequence (HF's `crop`): the kept K/V are copied into fresh
        sequences (the store has no truncation) and the windows are rebuilt. Never needs more memory."""
        if n <= 0 or self.seq_ids is None:
            return
        keep_pos = max(0, self.positions[0] - n)
        kept = []
        for layer in range(self.num_layers):
            lens = self.seq_lens(layer).tolist()
            per_seq = []
            for b, s in enumerate(self.seq_ids):
                k, v = self.store.gather(layer, s)  # [Hkv, N, D]
                m = max(0, lens[b] - n)
                per_seq.append((k[:, :m], v[:, :m]))
            kept.append(per_seq)
        batch = self.batch
        self.reset()
        self._open(batch)
        for layer in range(self.num_layers):
            for b, s in enumerate(self.seq_ids):
                k, v = kept[layer][b]
                if k.shape[1]:
                    self._append(layer, k[None].to(self.device), v[None].to(self.device), rows=[b])
            self.positions[layer] = keep_pos

    # ------------------------------------------------------------------ capacity and appends
    def _frames_available(self) -> int:
        """Frames that can still be handed out under the byte cap (the store's own count)."""
        return self.store.frames_available()

    def _begin_step(self, new_tokens: Sequence[int]) -> None:
        """Checks, before layer 0 stores anything, that every layer of this step fits under the byte cap: a
        failure then leaves all layers at the same length (the store itself is all-or-nothing per layer)."""
        P = self.config.page_tokens
        lens = self.seq_lens(0).tolist()
        need = self.num_layers * sum(-(-(n + t) // P) - -(-n // P) for n, t in zip(lens, new_tokens))
        if need:
            avail = self._frames_available()
            if need > avail:
                fb = self.store.page_elems * self.hkv * 2
                cap = self.config.host_byte_cap
                raise CapacityError(
                    f"the host KV store needs {need} more page(s) of {fb / 2**20:.2f} MiB for this step "
                    f"({self.num_layers} layers x {self.batch} sequence(s)), but only {max(avail, 0)} fit under "
                    f"{'host_byte_cap=' + str(cap) + ' bytes' if cap else 'the host memory reservation'}; nothing "
                    f"was stored and the cache still holds {self.positions[0]} positions. Free it (cache.reset()), "
                    f"shorten it (cache.crop(n)) or raise FluxionConfig.host_byte_cap.")

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
                rows: Sequence[int] | None = None) -> None:
        """Stores tokens in the host store and the window. k/v [B', Hkv, T, D] (any dtype, on the model's
        device) for the sequences `rows` (default all); valid [B', T] bool (CPU) or None."""
        seqs = self.seq_ids if rows is None else [self.seq_ids[r] for r in rows]
        kh, vh = k.to(self.kv_dtype), v.to(self.kv_dtype)
        lens = self.store.seq_lens(layer, seqs)  # before the append
        self.store.append(layer, seqs, kh, vh, valid)
        # Window slots: token at position p survives in the window iff p < sink or p >= N_final - local.
        T = k.shape[2]
        ok = torch.ones(len(seqs), T, dtype=torch.bool) if valid is None else valid
        pos = lens[:, None].to(torch.int64) + ok.to(torch.int64).cumsum(1) - 1
        final = lens.to(torch.int64) + ok.sum(1)
        keep = ok & ((pos < self.sink) | (pos >= (final - self.local)[:, None]))
        pos = torch.where(keep, pos, torch.full_like(pos, -1)).to(torch.int32).to(self.device)
        if rows is None:
            _ops.window_append(self.k_win[layer], self.v_win[layer], kh, vh, pos, self.sink)
        else:
            idx = torch.tensor(list(rows), device=self.device)
            kw, vw = self.k_win[layer][idx].contiguous(), self.v_win[layer][idx].contiguous()
            _ops.window_append(kw, vw, kh, vh, pos, self.sink)
            self.k_win[layer][idx], self.v_win[layer][idx] = kw, vw

    # ------------------------------------------------------------------ prefill
    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Exact causal attention of T new tokens (over each sequence's stored past and the new tokens), then
        stores the valid new tokens.

        q [B, Hq, T, D], k/v [B, Hkv, T, D] on the model's device in the model's dtype; valid [B, T] bool
        (False = left padding, not stored; None = all valid). Returns [B, Hq, T, D] in q's dtype; rows of
        padded tokens are zero. Only this layer's K/V (past included) is ever on the model's device.
        """
        t0 = time.perf_counter()
        B, _, T, _ = q.shape
        if self.seq_ids is None:
            self._open(B)
        elif B != self.batch:
            raise ValueError(f"this cache holds a batch of {self.batch} sequences; got a batch of {B}")
        valid_cpu = None
        if valid is not None:
            valid_cpu = valid.to("cpu", torch.bool)
            if bool(valid_cpu.all()):
                valid_cpu = None
        counts = [T] * B if valid_cpu is None else valid_cpu.sum(1).tolist()
        if layer == 0:
            self._begin_step(counts)
        past = self.seq_lens(layer)
        P = int(past.max()) if B else 0
        if P:
            # Past tokens of this layer only, padded to the longest, in the model's dtype on its device.
            kp = torch.zeros(B, self.hkv, P, self.d, dtype=q.dtype, device=q.device)
            vp = torch.zeros_like(kp)
            for b, s in enumerate(self.seq_ids):
                n = int(past[b])
                if n:
                    pk, pv = self.store.gather(layer, s)
                    kp[b, :, :n], vp[b, :, :n] = pk.to(q.device, q.dtype), pv.to(q.device, q.dtype)
            kk, vv = torch.cat([kp, k.to(q.dtype)], 2), torch.cat([vp, v.to(q.dtype)], 2)
        else:
            kk, vv = k.to(q.dtype), v.to(q.dtype)
        out = causal_attention(q, kk, vv, self.scale, valid_cpu, past, self.config.prefill_chunk)
        if self.probe_tokens > 0:
            self._probe(layer, q, kk, valid_cpu, past)
        del kk, vv
        if self.kv_dtype == torch.float16 and k.dtype not in (torch.float16,):
            for name, t in (("keys", k), ("values", v)):
                if bool((t.abs() > torch.finfo(torch.float16).max).any()):
                    raise ValueError(f"layer {layer} {name} exceed float16's range; use "
                                     "FluxionConfig(kv_dtype=torch.bfloat16)")
        self._append(layer, k, v, valid_cpu)
        self.positions[layer] += T
        if layer == 0:
            self._stats.prefill_calls += 1
            self._stats.prefill_tokens += sum(counts)
        self._stats.prefill_s += time.perf_counter() - t0
        return out

    def _probe(self, layer: int, q: torch.Tensor, kk: torch.Tensor, valid: torch.Tensor | None,
               past: torch.Tensor, coverage: float = 0.9) -> None:
        """Prefill statistics for budget heuristics (kept in ``window_mass[layer]``, CPU float32 [2, B, Hq]):
        row 0: attention mass that the last ``probe_tokens`` queries put on the retrieval region
        [sink, N - local) (averaged over those queries); row 1: the smallest fraction of the sequence's
        tokens whose averaged probabilities cover ``coverage`` of that mass (a token-level budget estimate).
        q [B, Hq, T, D]; kk [B, Hkv, P + T, D] (past | new keys)."""
        B, _, T, D = q.shape
        m, P = min(self.probe_tokens, T), kk.shape[2] - T
        dev = q.device
        ok_new = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
        pos_new = past[:, None].long() + ok_new.long().cumsum(1) - 1
        pos = torch.cat([torch.arange(P).expand(B, P), pos_new], 1)  # [B, P + T] position of every key column
        ok = torch.cat([torch.arange(P)[None, :] < past[:, None], ok_new], 1)
        n = past.long() + ok_new.sum(1)  # final lengths
        region = ok & (pos >= self.sink) & (pos < (n - self.local)[:, None])
        qs = q[:, :, T - m:].float().reshape(B, self.hkv, self.group * m, D)
        s = (qs @ kk.float().transpose(-1, -2)) * self.scale  # [B, Hkv, G*m, P+T]
        cols = torch.arange(P + T, device=dev)
        causal = cols[None, :] <= (P + T - m + torch.arange(m, device=dev))[:, None]  # [m, P+T]
        mask = ok.to(dev)[:, None, None, :] & causal.repeat(self.group, 1)[None, None]
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).view(B, self.hq, m, P + T).mean(2)
        p = p * region.to(dev)[:, None, :]
        mass = p.sum(-1)  # [B, Hq]
        srt = p.sort(-1, descending=True).values.cumsum(-1)
        need = (srt < coverage * mass[..., None]).sum(-1) + 1
        frac = torch.where(mass > 0, need.float() / n.to(dev)[:, None].float(), torch.zeros_like(mass))
        self.window_mass[layer] = torch.stack([mass, frac]).cpu()

    # ------------------------------------------------------------------ decode
    def plan(self, layer: int, lens: torch.Tensor):
        """Retrieval plan of one layer for sequences of `lens` [B] int32 (CPU) tokens.

        Returns (budgets [B, Hq] float32, block_sizes [B, Hkv] int32, cpu_groups [Tc] int32, gpu_groups [Tg]
        int32), all on the CPU; groups g = b * Hkv + kv_head. Groups with no retrieval work (streaming heads
        only, or no tokens outside the window) are dropped. The GPU takes the largest groups (data volume =
        sum of the group's budgets x retrieval-region tokens) while each brings it closer to `gpu_share` of
        the volume; the CPU gets the rest, largest first.
        """
        B = lens.shape[0]
        budgets = self._budgets[layer].expand(B, self.hq)
        sizes = self._sizes[layer].expand(B, self.hkv)
        region = (lens.to(torch.float32) - self.sink - self.local).clamp_min(0)
        volume = (region[:, None] * self._group_budget[layer][None, :]).flatten()  # [B * Hkv]
        order = torch.argsort(volume, descending=True, stable=True)
        order = order[volume[order] > 0]
        if not self.gpu_retrieval or order.numel() == 0:
            return budgets, sizes, order.to(torch.int32), order[:0].to(torch.int32)
        if not self.cpu_retrieval:
            return budgets, sizes, order[:0].to(torch.int32), order.to(torch.int32)
        vol = volume[order]
        # Take the next-largest group while that brings the GPU's volume closer to its share (its midpoint
        # stays under the target): prefix of the sorted list, so the GPU gets the largest groups.
        mid = vol.cumsum(0) - vol / 2
        n_gpu = int((mid < self.config.gpu_share * float(vol.sum())).sum())
        return budgets, sizes, order[n_gpu:].to(torch.int32), order[:n_gpu].to(torch.int32)

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per sequence: store it, then attention over everything stored.

        q [B, Hq, D], k/v [B, Hkv, D] on the model's device (model dtype). Returns [B, Hq, D] in q's dtype:
        merge(window_attention, retrieval on the GPU, retrieval on the CPU), written into `out` when given.
        """
        if layer == 0:
            self._begin_step([1] * q.shape[0])
            self._stats.decode_steps += 1
        st, dev = self._stats, self.device
        if self.config.decode_backend == "cpp":
            return self._decode_cpp(layer, q, k, v, out)
        with self._timed("append_s", gpu=False):
            self._append(layer, k[:, :, None], v[:, :, None])
        lens = self.seq_lens(layer)
        budgets, sizes, cpu_groups, gpu_groups = self.plan(layer, lens)
        qh = q.to(self.kv_dtype)
        pages, ft = self.store.pages(), self.store.frame_table(layer, self.seq_ids)
        common = dict(page_tokens=self.config.page_tokens, sink=self.sink, local=self.local, scale=self.scale)
        q_cpu = qh.cpu() if (self.on_gpu and cpu_groups.numel()) else qh  # the only sync before the CPU task
        # Small plan tensors go up with non_blocking copies (staged, no wait on the device queue) so nothing
        # below stalls the host before the CPU task starts.
        to_dev = (lambda t: t.contiguous().to(dev, non_blocking=True)) if self.on_gpu else (lambda t: t)
        lens_dev = to_dev(lens)
        outs, lses = [], []
        with self._timed("dense_s"):
            o, l = _ops.window_attention(qh, self.k_win[layer], self.v_win[layer], lens_dev, self.sink, self.scale)
        outs.append(o), lses.append(l)
        if gpu_groups.numel():  # launched asynchronously: runs while the CPU works below
            args = [to_dev(t) for t in (ft, budgets, sizes, gpu_groups)]
            with self._timed("retrieval_gpu_s"):
                o, l, nb = _ops.retrieval_attention(qh, pages, args[0], lens_dev, *args[1:], **common)
            outs.append(o), lses.append(l)
            st.bytes_pcie_dev = nb.sum() if st.bytes_pcie_dev is None else st.bytes_pcie_dev + nb.sum()
            st.tasks_gpu += gpu_groups.numel()
        if cpu_groups.numel():
            with self._timed("retrieval_cpu_s", gpu=False):
                o, l, nb = _ops.retrieval_attention(q_cpu, pages, ft, lens, budgets.contiguous(), sizes.contiguous(),
                                                    cpu_groups, **common)
            outs.append(o.to(dev, non_blocking=True)), lses.append(l.to(dev, non_blocking=True))
            st.bytes_cpu += int(nb.sum())
            st.tasks_cpu += cpu_groups.numel()
        with self._timed("merge_s"):
            res = outs[0] if len(outs) == 1 else _ops.merge_attention_states(torch.stack(outs), torch.stack(lses))[0]
        self.positions[layer] += 1
        return out.copy_(res) if out is not None else res.to(q.dtype)

    def _decode_cpp(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor | None) -> torch.Tensor:
        """decode() through the C++ step: append, window attention, shared-queue retrieval, merge (written into
        `out` in its dtype when `out` is a contiguous float32/bfloat16/float16 tensor on the device)."""
        B = q.shape[0]
        tables = self._cpp_plans.get((layer, B))
        if tables is None:  # the C++ step takes the per-head tables and plans the queue itself
            tables = self._cpp_plans[(layer, B)] = (self._budgets[layer].expand(B, self.hq).contiguous(),
                                                    self._sizes[layer].expand(B, self.hkv).contiguous())
        into = (out if out is not None and out.dtype in _MERGE_DTYPES and out.shape == q.shape
                and out.device == self.device and out.is_contiguous() else None)
        # Each tensor op here costs a few microseconds of host time per layer, between the GPU's segments.
        kv = self.kv_dtype
        qh = q if q.dtype == kv else q.to(kv)
        kh = (k if k.dtype == kv else k.to(kv)).unsqueeze(2)
        vh = (v if v.dtype == kv else v.to(kv)).unsqueeze(2)
        res = self._cpp.step(layer, self.seq_ids, self.k_win[layer], self.v_win[layer], qh, kh, vh, *tables,
                             self.gpu_retrieval, self.scale, into)
        self.positions[layer] += 1
        if into is not None:
            return into
        return out.copy_(res) if out is not None else res.to(q.dtype)

    # ------------------------------------------------------------------ whole-step CUDA graphs
    def graph_begin(self):
        """Starts a decode step whose attention runs inside a captured CUDA graph (fluxion/graphs.py): every
        layer's step must be a GPU-alone step (model on a GPU, decode_backend 'cpp', GPU retrieval allowed,
        ``local`` > 0, and each layer's retrieval reading less than :attr:`min_shared_volume`, or device_policy
        'gpu').

        Returns None when this step does not qualify (nothing changed: run :meth:`decode` per layer). Otherwise
        the new token's store positions are reserved in every layer, each layer's plan is written to a
        page-locked buffer, and the return value is a key: a graph captured under an equal key replays this
        step correctly. Then call :meth:`graph_decode` for layers 0..L-1 (captured or eagerly) and
        :meth:`graph_end` once that work is enqueued."""
        if not (self.on_gpu and self.gpu_retrieval and self.config.decode_backend == "cpp" and self.batch):
            return None
        B = self.batch
        self._begin_step([1] * B)  # a capacity error leaves everything as it was
        tables = self._graph_tables.get(B)
        if tables is None:
            tables = self._graph_tables[B] = (
                self._budgets[:, None, :].expand(self.num_layers, B, self.hq).contiguous(),
                self._sizes[:, None, :].expand(self.num_layers, B, self.hkv).contiguous())
        capacity, committed, signature = self._cpp.graph_begin(self.seq_ids, *tables)
        if capacity == 0:
            return None
        self._stats.decode_steps += 1
        self.positions = [p + 1 for p in self.positions]
        return self.graph_epoch, capacity, committed, signature

    def graph_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """The attention of `layer` in a step opened by :meth:`graph_begin`, written into `out` [B, Hq, D]:
        enqueued work only (no host sync, no step-dependent host work), so it can be captured in a CUDA graph.
        q [B, Hq, D], k/v [B, Hkv, D] on the model's device."""
        res = self._cpp.graph_step(layer, self.k_win[layer], self.v_win[layer], q.to(self.kv_dtype),
                                   k.to(self.kv_dtype).contiguous(), v.to(self.kv_dtype).contiguous(), self.scale)
        out.copy_(res)

    def graph_end(self) -> None:
        """Closes a step opened by :meth:`graph_begin`, after its work was enqueued (the step's tokens reach the
        host store once that work has finished)."""
        self._cpp.graph_end()

    # ------------------------------------------------------------------ statistics
    def _timed(self, key: str, gpu: bool = True):
        return _Timer(self, key, gpu and self.on_gpu)

    def stats(self) -> dict:
        """Totals since the last :meth:`reset_stats` and per-decode-step means.

        Keys: decode_steps; prefill_calls, prefill_tokens, prefill_s; dense_s, retrieval_cpu_s,
        retrieval_gpu_s, merge_s, append_s (seconds; GPU parts measured with CUDA events, which this call
        waits for); bytes_cpu (read by the CPU retrieval op) and bytes_pcie (read by the CUDA retrieval op
        from host memory), both from the ops' bytes_read; tasks_cpu / tasks_gpu (retrieval groups run on
        each device); per_step: the same per decode step; store: the host store's memory accounting.
        With decode_backend='cpp' (the default) retrieval_cpu_s / retrieval_gpu_s give way to the C++ step's
        retrieval_s (the retrieval phase, until the later side was done: a step that shares the queue with the GPU
        returns once the GPU has its last batch, with the merge enqueued behind it, so step_s leaves out the end of
        the GPU's batches and retrieval_s and gpu_busy_s count it), cpu_busy_s (the CPU side's batches, wall time; split
        at the moments the last item of a phase ended, since a task's next phase starts as soon as its own
        previous one is done: cpu_select_s = until the last union (scoring + top-k + union), of which cpu_score_s
        until the last score chunk and cpu_topk_s from then until the last top-k; cpu_attend_s = the attention and
        merges left after the last union), gpu_busy_s (GPU batches of shared steps from launch, or from the moment the
        host saw q if later, to completion), step_s, model_wait_s (the part of step_s a shared step spent waiting for
        its q on the host, i.e. for the model's own GPU work before the layer's attention; in append_s too when the
        token is written before the retrieval (local < 128), else beside retrieval_s, which excludes it),
        plan_s (planning each layer step, uploading its plan, launching the window append),
        gpu_alone_steps (layer steps small
        enough to run on the GPU alone without a host sync, see min_shared_volume), cpu_alone_steps (layer steps
        device_policy='auto' ran on the CPU alone because that had been reading faster), graph_steps (decode steps
        whose attention ran inside a whole-step CUDA graph, see graph_begin; the host timers do not cover them)
        and gpu_idle_ratio: the
        share of the retrieval phase during which the GPU waited (no batch of a shared step running; GPU-alone
        steps count as busy). With :attr:`timeline` on: attention_gpu_s and segments_gpu_s (see the class).
        """
        st = self._stats
        st.resolve()
        total = dict(st.t, bytes_cpu=st.bytes_cpu, bytes_pcie=st.bytes_pcie_host, tasks_cpu=st.tasks_cpu,
                     tasks_gpu=st.tasks_gpu)
        if self.config.decode_backend == "cpp":
            # Decode steps ran in C++: its host-side timers (seconds), traffic and task counts; gpu_idle_ratio is
            # the share of the retrieval phase during which no GPU batch was running.
            c = dict(self._cpp.stats())
            total.update(append_s=total.get("append_s", 0.0) + c["append_s"], dense_s=c["dense_s"],
                         retrieval_s=c["retrieval_s"], cpu_busy_s=c["cpu_busy_s"], gpu_busy_s=c["gpu_busy_s"],
                         cpu_select_s=c["cpu_select_s"], cpu_score_s=c["cpu_score_s"], cpu_topk_s=c["cpu_topk_s"],
                         cpu_attend_s=c["cpu_attend_s"],
                         merge_s=c["merge_s"], step_s=c["step_s"], model_wait_s=c["model_wait_s"],
                         plan_s=c["plan_s"], bytes_cpu=int(c["cpu_bytes"]),
                         bytes_pcie=int(c["gpu_bytes"]), tasks_cpu=int(c["cpu_tasks"]), tasks_gpu=int(c["gpu_tasks"]),
                         gpu_alone_steps=int(c["gpu_alone_steps"]), cpu_alone_steps=int(c["cpu_alone_steps"]),
                         graph_steps=int(c["graph_steps"]))
            total.pop("retrieval_cpu_s", None)
            total.pop("retrieval_gpu_s", None)
        n = max(st.decode_steps, 1)
        out = dict(total, decode_steps=st.decode_steps, prefill_calls=st.prefill_calls,
                   prefill_tokens=st.prefill_tokens, prefill_s=st.prefill_s,
                   per_step={k: v / n for k, v in total.items()}, store=self.store.stats())
        if self.config.decode_backend == "cpp":
            out["gpu_idle_ratio"] = dict(self._cpp.stats())["gpu_idle_ratio"]
        return out

    def reset_stats(self) -> None:
        self._stats.resolve()
        self._stats.reset()
        self._cpp.reset_stats()

    def __repr__(self) -> str:
        return (f"HybridAttentionRuntime(mode={self.config.mode!r}, layers={self.num_layers}, Hq={self.hq}, "
                f"Hkv={self.hkv}, D={self.d}, device={self.device}, kv_dtype={self.kv_dtype}, batch={self.batch}, "
                f"positions={self.positions[0]}, gpu_retrieval={self.gpu_retrieval})")


class _Timer:
    """Adds the elapsed time of a block to a stats key: CUDA events on the GPU, perf_counter on the CPU."""

    __slots__ = ("rt", "key", "gpu", "t0", "ev")

    def __init__(self, rt: HybridAttentionRuntime, key: str, gpu: bool):
        self.rt, self.key, self.gpu = rt, key, gpu

    def __enter__(self):
        if not self.rt.timing:
            return self
        if self.gpu:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if not self.rt.timing or exc[0] is not None:
            return False
        st = self.rt._stats
        if self.gpu:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            st.add_event(self.key, self.ev, end)
        else:
            st.t[self.key] += time.perf_counter() - self.t0
        return False
