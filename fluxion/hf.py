"""HuggingFace ``transformers`` integration: ``fluxion.enable(model, config)``.

How it plugs in (tested with transformers 4.57 and 5.x):

* an attention function registered as ``"fluxion"`` with ``transformers.AttentionInterface`` and a mask
  function under the same name with ``AttentionMaskInterface`` (without one, 5.x builds no mask at all for a
  custom name). The mask function returns only what Fluxion needs: ``valid`` [B, T] bool for the new tokens
  (False = left padding), or None when nothing is padded;
* :class:`FluxionCache`, a ``transformers.Cache`` made of one :class:`FluxionLayer` per decoder layer. A layer's
  ``update`` stores nothing and returns the new K/V unchanged (light tensors: only this step's tokens); it
  hands them to the attention function, which finds its layer through ``module.layer_idx`` and calls the
  layer's :class:`~fluxion.runtime.HybridAttentionRuntime` (prefill or decode). The full cache lives in host
  memory and never exists on the GPU;
* the instance's ``forward`` is wrapped so that a missing or empty non-Fluxion cache (what ``generate()``
  creates) is replaced by a new :class:`FluxionCache`; ``fluxion.new_cache(model)`` gives one for hand-written
  decode loops.

Supported families: Llama, Qwen2/2.5, Mistral, Qwen3 (``config.model_type``). Sliding-window layers (Mistral's
``sliding_window``, Qwen's ``use_sliding_window``) are served only while every sequence fits in the window:
past it the attention function raises ``ValueError``. Beam search / batch reordering is not supported.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
import weakref

import torch

from .config import FluxionConfig
from .runtime import HybridAttentionRuntime, causal_attention

try:
    from transformers import AttentionInterface
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - the module is only imported by enable()
    raise ImportError(f"fluxion.hf needs transformers >= 4.57 ({e})") from e

ATTN_NAME = "fluxion"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")

# The cache layer that just ran `update` hands (runtime, layer, key) to the attention function that follows
# in the same module forward. Thread-local so that several models can decode in different threads.
_STATE = threading.local()


# ---------------------------------------------------------------------------------------------- model checks
def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def geometry(model) -> dict:
    """The attention geometry Fluxion needs, read from the model config (and checked): num_layers, num_q_heads,
    num_kv_heads, head_dim, sliding_window (None when every layer is full attention)."""
    cfg = _text_config(model)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Fluxion does not support model_type={mtype!r} ({type(model).__name__}); supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    layer_types = list(getattr(cfg, "layer_types", None) or [])
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(f"Fluxion does not support {mtype} models with {other} layers (layer_types)")
    sliding = None
    if "sliding_attention" in layer_types or (mtype == "mistral" and getattr(cfg, "sliding_window", None)):
        sliding = int(cfg.sliding_window)
    return dict(num_layers=cfg.num_hidden_layers, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                sliding_window=sliding, model_type=mtype)


def _attention_modules(model) -> list:
    mods = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if idx is not None and hasattr(m, "q_proj") and idx not in mods:
            mods[idx] = m
    return [mods[i] for i in sorted(mods)]


# ---------------------------------------------------------------------------------------------- the cache
class _NoBatchReordering:
    """Beam search and batch expansion would reorder host-store sequences; not supported (cache and layers)."""

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("FluxionCache does not support beam search (num_beams > 1)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("FluxionCache does not support batch_repeat_interleave (num_return_sequences)")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("FluxionCache does not support batch_select_indices")


class FluxionLayer(_NoBatchReordering, CacheLayerMixin):
    """One decoder layer's view of the runtime. ``update`` returns the new K/V as they are ([B, Hkv, T, D]) and
    leaves them to the attention function; the layer's length is the number of positions HF has seen."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, runtime: HybridAttentionRuntime, layer_idx: int, model_config=None):
        super().__init__()
        self.runtime, self.layer_idx, self.model_config = runtime, layer_idx, model_config
        self.is_initialized = True  # nothing is allocated lazily on the model's device

    def lazy_initialization(self, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Any other attention function would silently attend to this step's tokens only.
        impl = getattr(self.model_config, "_attn_implementation", ATTN_NAME)
        if impl != ATTN_NAME:
            raise RuntimeError(f"a FluxionCache needs the model's attention implementation to be {ATTN_NAME!r}, "
                               f"got {impl!r}; call fluxion.enable(model, config) first")
        _STATE.pending = (self.runtime, self.layer_idx, key_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.runtime.positions[self.layer_idx]

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # 5.x passes the query length, 4.57 the cache_position tensor.
        q_len = query if isinstance(query, int) else int(query.shape[0])
        return self.get_seq_length() + q_len, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    @property
    def max_batch_size(self) -> int:
        return self.runtime.batch

    @property
    def max_cache_len(self) -> int:
        return -1

    def offload(self):  # the cache is in host memory already
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        raise NotImplementedError("reset the whole FluxionCache (cache.reset())")

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError("crop the whole FluxionCache (cache.crop(n))")



class FluxionCache(_NoBatchReordering, Cache):
    """A transformers ``Cache`` whose K/V live in Fluxion's host store (``cache.runtime``).

    Works as ``past_key_values`` for ``generate()`` and for hand-written decode loops. ``get_seq_length()`` counts
    positions as HF does (left padding included). ``crop(n)`` (n >= 0: keep n positions; n < 0: drop -n) and
    ``reset()`` free host memory, e.g. after a :class:`fluxion.CapacityError`. ``stats()`` gives the runtime's
    per-step statistics.
    """

    def __init__(self, runtime: HybridAttentionRuntime, model_config=None):
        super().__init__(layers=[FluxionLayer(runtime, i, model_config) for i in range(runtime.num_layers)])
        self.runtime = runtime

    def __repr__(self) -> str:
        return f"FluxionCache({self.runtime!r})"

    def reset(self) -> None:
        self.runtime.reset()

    def crop(self, max_length: int) -> None:
        n = self.get_seq_length()
        drop = -max_length if max_length < 0 else max(0, n - max_length)
        self.runtime.drop_last(min(drop, n))


    def stats(self) -> dict:
        return self.runtime.stats()

    def reset_stats(self) -> None:
        self.runtime.reset_stats()


# ---------------------------------------------------------------------------------------------- attention
def _valid_new_tokens(mask, batch: int, q_len: int) -> torch.Tensor | None:
    """[B, T] bool validity of the new tokens from the mask a layer received (ours, or a 4D one a caller
    built), None when all are valid."""
    if mask is None:
        return None
    if mask.dim() == 2:
        valid = mask.to(torch.bool)
    elif mask.dim() == 4:  # the diagonal: token t attends to itself iff it is not padding
        kv_len = mask.shape[-1]
        t = torch.arange(q_len, device=mask.device)
        diag = mask[:, 0, t, kv_len - q_len + t]
        valid = diag if diag.dtype == torch.bool else diag == 0
        valid = valid.expand(batch, q_len)
    else:
        raise ValueError(f"Fluxion attention got an attention mask of shape {tuple(mask.shape)}")
    return None if bool(valid.all()) else valid


def fluxion_mask(batch_size, cache_position=None, kv_length=None, kv_offset=0, mask_function=None,
                 attention_mask=None, q_length=None, **kwargs):
    """Mask function registered with ``AttentionMaskInterface``: returns valid [B, T] bool (the new tokens'
    columns of the 2D padding mask; positions the mask does not cover count as valid) or None."""
    if attention_mask is None:
        return None
    if q_length is None:
        q_length = int(cache_position.shape[0])
    am = attention_mask.to(torch.bool)
    if am.dim() != 2:
        return am
    end = kv_offset + kv_length
    if am.shape[-1] < end:
        am = torch.nn.functional.pad(am, (0, end - am.shape[-1]), value=True)
    valid = am[:, end - q_length:end]
    return None if bool(valid.all()) else valid


def fluxion_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function registered as ``"fluxion"``.

    query [B, Hq, T, D]; key/value [B, Hkv, T, D] (the new tokens, as FluxionLayer.update returned them);
    attention_mask: what :func:`fluxion_mask` returned. Returns ([B, T, Hq, D], None).
    """
    layer = module.layer_idx
    B, _, T, _ = query.shape
    pending = getattr(_STATE, "pending", None)
    valid = _valid_new_tokens(attention_mask, B, T)
    if pending is None or pending[1] != layer or pending[2] is not key:
        # No FluxionCache (use_cache=False): plain causal attention over the tokens of this call.
        if key.shape[2] != T:
            raise RuntimeError(
                f"a Fluxion-enabled model got {key.shape[2]} keys for {T} queries at layer {layer}: the cache is "
                "not a FluxionCache. Pass past_key_values=fluxion.new_cache(model) or call fluxion.disable(model)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return causal_attention(query, key, value, scale, valid).transpose(1, 2), None
    _STATE.pending = None
    rt: HybridAttentionRuntime = pending[0]
    sw = kwargs.get("sliding_window")
    if sw is not None and rt.positions[layer] + T > sw:
        raise ValueError(f"layer {layer} uses sliding-window attention (window {sw}); Fluxion serves it only "
                         f"while sequences fit in the window, and this step reaches {rt.positions[layer] + T} "
                         "positions")
    if T == 1 and valid is None and rt.batch:
        out = rt.decode(layer, query[:, :, 0], key[:, :, 0], value[:, :, 0])[:, None]
    else:
        out = rt.prefill(layer, query, key, value, valid).transpose(1, 2)
    return out, None


_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, fluxion_attention)
        AttentionMaskInterface.register(ATTN_NAME, fluxion_mask)
        _registered = True


# ---------------------------------------------------------------------------------------------- enable
def new_cache(model, config: FluxionConfig | None = None) -> FluxionCache:
    """A fresh :class:`FluxionCache` for `model` (enabled with :func:`enable`; `config` overrides its config)."""
    config = config or getattr(model, "_fluxion_config", None)
    if config is None:
        raise ValueError("call fluxion.enable(model, config) first (or pass a FluxionConfig)")
    geo = geometry(model)
    mods = _attention_modules(model)
    if len(mods) != geo["num_layers"]:
        raise ValueError(f"found {len(mods)} attention modules with a layer_idx, expected {geo['num_layers']}")
    devices = {m.q_proj.weight.device for m in mods}
    if len(devices) != 1:
        raise NotImplementedError(f"Fluxion needs every attention layer on one device, got {sorted(map(str, devices))}")
    w = mods[0].q_proj.weight
    scale = getattr(mods[0], "scaling", None)
    rt = HybridAttentionRuntime(config, geo["num_layers"], geo["num_q_heads"], geo["num_kv_heads"], geo["head_dim"],
                                device=w.device, dtype=w.dtype, scale=scale)
    return FluxionCache(rt, _text_config(model))


# Arguments under which a decode step must take HF's own forward (the graph segments compute logits only).
_EAGER_ONLY_ARGS = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")


def _graph_decode(model, cache: FluxionCache, arg):
    """Runs a decode step (one new token per sequence after a prefill) through CUDA-graph segments, capturing
    them on first use for this batch size; returns None when the call is not such a step, so that HF's forward
    serves it. `arg(name)` reads a forward argument, positional or keyword."""
    state = model._fluxion_state
    ids, rt = arg("input_ids"), cache.runtime
    if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_cuda or rt.batch != ids.shape[0]:
        return None
    if any(arg(n) not in (None, False) for n in _EAGER_ONLY_ARGS) or arg("return_dict") is False:
        return None
    sw = state["sliding_window"]
    if sw is not None and rt.positions[0] + 1 > sw:
        return None  # the eager path raises the sliding-window error
    mask = arg("attention_mask")
    if mask is not None and (mask.dim() != 2 or not bool(mask[:, -1].all())):
        return None  # a padded new token: the eager path handles it
    B = ids.shape[0]
    pos = arg("position_ids")
    if pos is None:  # as HF's forward: cache_position, else the cache's length
        cp = arg("cache_position")
        pos = cp[-1:] if cp is not None else torch.tensor([cache.get_seq_length()])
    rows = pos.shape[0] if pos.dim() > 1 else 1  # position_ids [B or 1, T]; cache_position [T]
    pos = pos.to(ids.device, torch.long).reshape(rows, -1)[:, -1:].expand(B, 1)
    graphs = state["graphs"].get(B)
    if graphs is None:
        from .graphs import SegmentGraphs

        graphs = state["graphs"][B] = SegmentGraphs(model, None, batch=B)
    logits = graphs.step(ids, pos, runtime=rt).clone()  # the graphs' output buffer is reused next step
    return CausalLMOutputWithPast(logits=logits, past_key_values=cache)


def _wrap_forward(model):
    orig = model.forward
    names = list(inspect.signature(orig).parameters)
    pos = names.index("past_key_values") if "past_key_values" in names else None

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        args = list(args)

        def arg(name):
            i = names.index(name) if name in names else None
            return args[i] if i is not None and len(args) > i else kwargs.get(name)

        in_args = pos is not None and len(args) > pos
        pkv = args[pos] if in_args else kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(_text_config(model), "use_cache", True)
        if not isinstance(pkv, FluxionCache) and use_cache:
            if pkv is not None and (not isinstance(pkv, Cache) or pkv.get_seq_length() > 0):
                raise ValueError(f"a Fluxion-enabled model got past_key_values of type {type(pkv).__name__} "
                                 "holding tokens; use fluxion.new_cache(model) or call fluxion.disable(model)")
            pkv = new_cache(model)
            model._fluxion_last_cache = weakref.ref(pkv)
            if in_args:
                args[pos] = pkv
            else:
                kwargs["past_key_values"] = pkv
        if isinstance(pkv, FluxionCache) and model._fluxion_state["cuda_graphs"]:
            out = _graph_decode(model, pkv, arg)
            if out is not None:
                return out
        return orig(*args, **kwargs)

    forward._fluxion_wrapped = True
    return forward


def enable(model, config: FluxionConfig | None = None):
    """Switches `model` (Llama, Qwen2/2.5, Mistral, Qwen3) to Fluxion attention with a host-resident KV cache.

    Registers the "fluxion" attention and mask functions, sets the model's attention implementation to them,
    and wraps the instance's forward so that ``generate()`` and plain calls get a :class:`FluxionCache`. Sets the
    CPU kernels' thread count when the model is on a GPU (or ``config.cpu_threads`` is given). On a GPU, decode
    steps (one new token per sequence) run through CUDA-graph segments with only the hybrid attention eager
    (``config.cuda_graphs``; captured on the first decode step of each batch size). Returns the model.
    """
    config = config if config is not None else FluxionConfig()
    if not isinstance(config, FluxionConfig):
        raise TypeError(f"config must be a FluxionConfig, got {type(config).__name__}")
    geo = geometry(model)
    config.validate_for(geo["num_layers"], geo["num_q_heads"], geo["num_kv_heads"], geo["head_dim"])
    if geo["sliding_window"] is not None:
        warnings.warn(f"{geo['model_type']} uses sliding-window attention (window {geo['sliding_window']}); Fluxion "
                      "computes full attention, identical only while sequences fit in the window, and raises "
                      "ValueError past it", stacklevel=2)
    on_gpu = any(p.is_cuda for p in model.parameters())
    if config.cuda_graphs and not on_gpu:
        raise ValueError("FluxionConfig.cuda_graphs=True needs the model on a CUDA device (None picks automatically)")
    if getattr(model, "_fluxion_config", None) is not None:
        disable(model)
    _register()
    prev_impl = _text_config(model)._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:  # pragma: no cover - older versions
        model.config._attn_implementation = ATTN_NAME
    prev_threads = None
    if on_gpu or config.cpu_threads is not None:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(config.resolved_cpu_threads())
    graphs = on_gpu if config.cuda_graphs is None else config.cuda_graphs
    model._fluxion_state = dict(prev_impl=prev_impl, prev_threads=prev_threads, cuda_graphs=graphs, graphs={},
                                sliding_window=geo["sliding_window"])
    model._fluxion_config = config
    model.forward = _wrap_forward(model)
    return model


def disable(model):
    """Undoes :func:`enable`: the original forward, attention implementation and thread count. Existing
    FluxionCaches must not be used with the model afterwards."""
    state = getattr(model, "_fluxion_state", None)
    if state is None:
        return model
    if getattr(model.forward, "_fluxion_wrapped", False):
        del model.forward  # the class's forward shows through again
    impl = state["prev_impl"] or "sdpa"
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover
        model.config._attn_implementation = impl
    if state["prev_threads"] is not None:
        torch.set_num_threads(state["prev_threads"])
    for attr in ("_fluxion_state", "_fluxion_config", "_fluxion_last_cache"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def enabled(model, config: FluxionConfig | None = None):
    """``with fluxion.enabled(model, config): model.generate(...)`` — enable, then disable on exit."""
    enable(model, config)
    try:
        yield model
    finally:
        disable(model)


def last_cache(model) -> FluxionCache | None:
    """The FluxionCache the wrapped forward created last (while something still holds it), e.g. for stats."""
    ref = getattr(model, "_fluxion_last_cache", None)
    return ref() if ref is not None else None
