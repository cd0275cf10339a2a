"""CUDA-graph segments around Fluxion's attention for the decode step of supported HF decoders.

HF's eager decode step spends most of its time in Python and kernel launches (≈77 ms/token for a
Llama-3.1-8B shape at 1K context on the H200, against ≈8 ms for the same step captured as one graph).
:class:`SegmentGraphs` captures the GPU work *between* attention calls — embedding, norms, QKV
projections, RoPE, output projection, MLP, final norm, LM head — as one CUDA graph per layer boundary,
and runs only the hybrid attention (:meth:`HybridAttentionRuntime.decode`, host store + CPU/GPU
retrieval) outside them:

    g_embed:  ids -> embeddings -> RoPE cos/sin -> layer 0 (norm, q/k/v, RoPE)          -> q0, k0, v0
    g_i:      attention output of layer i -> o_proj, residual, MLP -> layer i+1 (norm, q/k/v, RoPE)
    g_last:   attention output of the last layer -> o_proj, residual, MLP -> final norm -> logits

When every layer's attention of a step runs on the GPU alone (short contexts and small budgets, see
:meth:`HybridAttentionRuntime.graph_begin`), the whole step — segments and attention — is one CUDA graph per
runtime, captured on the first such step and again when the store's frame tables outgrow it: the host then
only writes the step's plan and replays, so the step's time no longer depends on how fast the host enqueues.

Supported: Llama, Mistral, Qwen2/2.5 and Qwen3 (same decoder-layer structure; Qwen3 adds per-head q/k
RMSNorm). Every mode of the runtime ('full', 'fixed', 'fluxion') uses the same segments, so comparisons
between modes stay fair.
"""

from __future__ import annotations

import sys
import weakref

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class SegmentGraphs:
    """Decode steps of `model` (batch `batch`, one token per sequence) with graph-captured segments.

    `runtime.decode(layer, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D], out=[B, Hq, D])` is called between
    segments. ``fluxion.enable`` runs ``generate()``'s decode steps through this class (FluxionConfig.cuda_graphs). Call :meth:`step` with input ids [B, 1] and position ids [B, 1]; it returns logits [B, 1, V]
    (a static buffer: copy it if you keep it past the next step).
    """

    # Whether steps that qualify run as one whole-step graph (None in the constructor takes this default).
    whole_steps_default = True

    def __init__(self, model, runtime, batch: int, warmup: int = 2, whole_steps: bool | None = None):
        cfg = getattr(model.config, "text_config", model.config)
        if cfg.model_type not in SUPPORTED:
            raise NotImplementedError(f"CUDA-graph decode supports {', '.join(SUPPORTED)}; got {cfg.model_type!r}")
        self.model, self.runtime, self.batch = model, runtime, batch
        self.base = model.model
        self.layers = list(self.base.layers)
        attn0 = self.layers[0].self_attn
        self.apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.head_dim = attn0.head_dim
        self.hq = cfg.num_attention_heads
        self.hkv = cfg.num_key_value_heads
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            raise ValueError("CUDA-graph segments need the model on a CUDA device")
        self.device = dev
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        dtype = next(model.parameters()).dtype
        self.attn = torch.zeros(batch, self.hq, self.head_dim, dtype=dtype, device=dev)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []
        # runtime -> (key, graph, logits) of its whole-step graph (see HybridAttentionRuntime.graph_begin)
        self.whole_steps = self.whole_steps_default if whole_steps is None else whole_steps
        self._whole: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._capture(warmup)

    # --------------------------------------------------------------------------- segment bodies
    def _qkv(self, layer, h, cos, sin):
        B, D = self.batch, self.head_dim
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(B, 1, self.hq, D)
        k = attn.k_proj(x).view(B, 1, self.hkv, D)
        v = attn.v_proj(x).view(B, 1, self.hkv, D)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q[:, :, 0].contiguous(), k[:, :, 0].contiguous(), v[:, 0].contiguous()

    def _mlp(self, layer, h, attn):
        h = h + layer.self_attn.o_proj(attn.reshape(self.batch, 1, self.hq * self.head_dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _seg_embed(self):
        h = self.base.embed_tokens(self.ids)
        cos, sin = self.base.rotary_emb(h, self.pos)
        return (h, cos, sin, *self._qkv(self.layers[0], h, cos, sin))

    def _seg_mid(self, i, h, cos, sin):
        h = self._mlp(self.layers[i], h, self.attn)
        return (h, *self._qkv(self.layers[i + 1], h, cos, sin))

    def _seg_last(self, h):
        h = self._mlp(self.layers[-1], h, self.attn)
        return self.model.lm_head(self.base.norm(h))

    # --------------------------------------------------------------------------- capture and replay
    def _capture(self, warmup: int) -> None:
        self.outs = []
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, autotuning)
                for _ in range(warmup):
                    h, cos, sin, *_ = self._seg_embed()
                    for i in range(len(self.layers) - 1):
                        h, *_ = self._seg_mid(i, h, cos, sin)
                    self._seg_last(h)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                emb = self._seg_embed()
            self.graphs.append(g)
            self.outs.append(emb)
            h, cos, sin = emb[0], emb[1], emb[2]
            for i in range(len(self.layers) - 1):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    out = self._seg_mid(i, h, cos, sin)
                self.graphs.append(g)
                self.outs.append(out)
                h = out[0]
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits = self._seg_last(h)
            self.graphs.append(g)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, runtime=None) -> torch.Tensor:
        """One decode step: input_ids, position_ids [B, 1] -> logits [B, 1, V] (static buffer). `runtime`
        overrides the one given at construction (the segments hold no cache state, so one capture serves
        every cache of this batch size)."""
        rt = runtime if runtime is not None else self.runtime
        self.ids.copy_(input_ids)
        self.pos.copy_(position_ids)
        key = rt.graph_begin() if self.whole_steps else None
        if key is not None:
            whole = self._whole.get(rt)
            if whole is not None and whole[0] == key:
                whole[1].replay()
                rt.graph_end()
                return whole[2]
            # This step runs eagerly through the capturable attention path (which also warms it up); the
            # whole-step graph is captured after it, for the next steps.
            self._whole.pop(rt, None)
        attend = rt.graph_decode if key is not None else rt.decode
        mark = _TimelineMarks(rt) if getattr(rt, "timeline", False) and key is None else None
        if mark:
            mark.segment_starts()
        self.graphs[0].replay()
        for i in range(len(self.layers)):
            q, k, v = self.outs[i][-3:]
            if mark:
                mark.attention_starts()
            attend(i, q, k, v, out=self.attn)
            if mark:
                mark.segment_starts()
            self.graphs[i + 1].replay()
        if mark:
            mark.close()
        if key is not None:
            self._capture_whole(rt, key)  # inside the open step: graph_decode checks that one is open
            rt.graph_end()
        return self.logits

    def _capture_whole(self, rt, key) -> None:
        """Captures segments and `rt`'s graph attention as one graph (own memory pool: it is dropped whole when
        a later key replaces it). Capturing enqueues nothing, so the step just run is unaffected."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=torch.cuda.graph_pool_handle()):
            h, cos, sin, q, k, v = self._seg_embed()
            for i in range(len(self.layers)):
                rt.graph_decode(i, q, k, v, out=self.attn)
                if i + 1 < len(self.layers):
                    h, q, k, v = self._seg_mid(i, h, cos, sin)
            logits = self._seg_last(h)
        self._whole[rt] = (key, g, logits)


class _TimelineMarks:
    """A step's segment boundaries on the GPU's clock (HybridAttentionRuntime.timeline): an event recorded after
    each enqueue completes when the GPU reaches it, so the span from one segment's end to the next one's start is
    everything a layer's attention costs the step: its kernels, the CPU side, and any wait for the host (planning
    late, syncs, launches, Python). The model's own work is the segments' spans. Both go to the runtime's stats
    (`attention_gpu_s`, `segments_gpu_s`), resolved lazily like its other GPU timers."""

    __slots__ = ("stats", "last", "running")

    def __init__(self, rt):
        self.stats, self.last, self.running = rt._stats, None, None

    def _record(self, starts):
        """Ends the running interval and starts `starts` (a stats key, or None)."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        if self.last is not None:
            self.stats.add_event(self.running, self.last, ev)
        self.last, self.running = ev, starts

    def segment_starts(self):
        self._record("segments_gpu_s")

    def attention_starts(self):
        self._record("attention_gpu_s")

    def close(self):
        self._record(None)

