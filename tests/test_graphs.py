"""CUDA-graph segments around Fluxion's attention give the same decode logits as HF's eager forward, and
``fluxion.enable`` runs ``generate()``'s decode steps through them."""

from __future__ import annotations

import pytest
import torch

import fluxion
from fluxion import FluxionConfig, HeadTable
from fluxion.runtime import HybridAttentionRuntime
from conftest import cuda_kernels_available

transformers = pytest.importorskip("transformers")
from test_hf import tiny_model, tokens  # noqa: E402


@pytest.mark.parametrize("local", [256, 0])
@pytest.mark.parametrize("whole_steps", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_segment_graphs_match_eager_decode(family, whole_steps, local):
    """Segments with the attention outside them, and whole-step graphs (attention captured too), give the
    logits of HF's eager forward through Fluxion's attention. Without a local window (local = 0) each new token
    is retrieved at once, before a whole-step graph's deferred host write would land: those steps run outside
    the graphs."""
    if not cuda_kernels_available():
        pytest.skip("needs a GPU and Fluxion's CUDA kernels")
    from fluxion.graphs import SegmentGraphs

    m = tiny_model(family).to("cuda", torch.bfloat16)
    fluxion.enable(m, FluxionConfig(mode="full", local=local))
    ids, nxt = tokens(2, 400).cuda(), tokens(2, 6, seed=3).cuda()
    eager, graphed = [], []
    with torch.no_grad():
        cache = fluxion.new_cache(m)
        m(input_ids=ids, past_key_values=cache, use_cache=True)
        for t in range(nxt.shape[1]):
            out = m(input_ids=nxt[:, t:t + 1], past_key_values=cache, use_cache=True)
            eager.append(out.logits[:, -1].float())
        cache = fluxion.new_cache(m)
        m(input_ids=ids, past_key_values=cache, use_cache=True)
        graphs = SegmentGraphs(m, cache.runtime, batch=2, whole_steps=whole_steps)
        cache.runtime.reset_stats()
        for t in range(nxt.shape[1]):
            pos = torch.full((2, 1), ids.shape[1] + t, dtype=torch.long, device="cuda")
            graphed.append(graphs.step(nxt[:, t:t + 1], pos)[:, -1].float().clone())
        assert cache.runtime.stats()["graph_steps"] == (nxt.shape[1] if whole_steps and local else 0)
    fluxion.disable(m)
    torch.testing.assert_close(torch.stack(graphed), torch.stack(eager), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", ["full", "fluxion"])
def test_whole_step_graphs_recapture_and_store_every_token(mode, monkeypatch):
    """Whole-step graphs over 600 steps give the logits of the segment path (attention run eagerly) and leave
    the host store byte-identical. The prompt starts with an empty retrieval region (300 < sink + local); the
    frame tables outgrow the first capture (page_tokens=128) and the shared path takes five steps in the
    middle: each of these recaptures, and the tokens stored through the page-locked staging slots all land."""
    if not cuda_kernels_available():
        pytest.skip("needs a GPU and Fluxion's CUDA kernels")
    from fluxion.graphs import SegmentGraphs

    captures = []
    capture = SegmentGraphs._capture_whole
    monkeypatch.setattr(SegmentGraphs, "_capture_whole",
                        lambda self, rt, key: (captures.append(key), capture(self, rt, key)))
    table = HeadTable(torch.tensor([[0.0, 0.2, 0.5, 0.1], [0.3, 0.0, 0.05, 1.0]]),
                      torch.tensor([[16, 64], [32, 128]], dtype=torch.int32)) if mode == "fluxion" else None
    cfg = FluxionConfig(mode=mode, head_table=table, page_tokens=128)
    m = tiny_model("llama").to("cuda", torch.bfloat16)
    ids, nxt = tokens(2, 300, seed=5).cuda(), tokens(2, 600, seed=6).cuda()
    runs = []
    with torch.no_grad(), fluxion.enabled(m, cfg):
        for whole in (False, True):
            cache = fluxion.new_cache(m)
            rt = cache.runtime
            m(input_ids=ids, past_key_values=cache, use_cache=True)
            graphs = SegmentGraphs(m, rt, batch=2, whole_steps=whole)
            rt.reset_stats()
            logits = []
            for t in range(nxt.shape[1]):
                if t in (30, 35):  # five steps through the shared queue (CPU + GPU), then back
                    rt.min_shared_volume = 0 if t == 30 else HybridAttentionRuntime.min_shared_volume
                    rt.reconfigure(cfg)
                pos = torch.full((2, 1), ids.shape[1] + t, dtype=torch.long, device="cuda")
                logits.append(graphs.step(nxt[:, t:t + 1], pos)[:, -1].float().clone())
            stored = [rt.store.gather(layer, s) for layer in range(rt.num_layers) for s in rt.seq_ids]
            runs.append((torch.stack(logits), stored, rt.stats()))
    (want, want_kv, _), (got, got_kv, st) = runs
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    for (k0, v0), (k1, v1) in zip(want_kv, got_kv):
        assert k0.shape[1] == 900 and torch.equal(k1, k0) and torch.equal(v1, v0)
    assert st["graph_steps"] == 595 and st["decode_steps"] == 600 and st["bytes_pcie"] > 0
    # first graph step, back from the shared path, past the frame capacity (3 + 4 pages of 128 tokens)
    assert len(captures) == 3 and captures[2][1] > captures[1][1], captures


def test_timeline_splits_each_step_into_attention_and_segments():
    """With runtime.timeline on, the segment path's steps are tiled on the GPU's clock: attention_gpu_s (from
    each layer's q to the next segment) plus segments_gpu_s (the model's work) fill the span between events
    recorded around the steps, up to the host work before the first segment; with it off, neither is kept.
    Whole-step graphs record none."""
    if not cuda_kernels_available():
        pytest.skip("needs a GPU and Fluxion's CUDA kernels")
    from fluxion.graphs import SegmentGraphs

    m = tiny_model("llama").to("cuda", torch.bfloat16)
    ids, nxt = tokens(2, 700, seed=8).cuda(), tokens(2, 12, seed=9).cuda()
    with torch.no_grad(), fluxion.enabled(m, FluxionConfig(mode="full")):
        cache = fluxion.new_cache(m)
        rt = cache.runtime
        m(input_ids=ids, past_key_values=cache, use_cache=True)
        for whole, timeline in ((False, False), (False, True), (True, True)):
            graphs = SegmentGraphs(m, rt, batch=2, whole_steps=whole)
            rt.timeline = timeline
            rt.reset_stats()
            outer = 0.0
            for t in range(nxt.shape[1]):
                pos = torch.full((2, 1), rt.positions[0], dtype=torch.long, device="cuda")
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graphs.step(nxt[:, t:t + 1], pos)
                b.record()
                b.synchronize()
                outer += a.elapsed_time(b) / 1e3
            st = rt.stats()
            if not timeline or whole:
                assert "attention_gpu_s" not in st and "segments_gpu_s" not in st, st
                continue
            attention, segments = st["attention_gpu_s"], st["segments_gpu_s"]
            assert attention > 0 and segments > 0
            assert attention + segments <= outer * 1.001 + 1e-5, (attention, segments, outer)
            assert attention + segments >= 0.5 * outer, (attention, segments, outer)
            assert st["per_step"]["attention_gpu_s"] == pytest.approx(attention / nxt.shape[1])


def _generate(m, ids, mask, graphs: bool, new_tokens=12):
    fluxion.enable(m, FluxionConfig(mode="full", cuda_graphs=graphs))
    try:
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
        captured = sorted(m._fluxion_state["graphs"])
    finally:
        fluxion.disable(m)
    return out.sequences, torch.stack(out.logits, 1).float(), captured


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_generate_runs_decode_steps_through_graphs(family):
    """generate() with the default config captures segments for the batch and gives the tokens and logits of
    HF's eager forward (cuda_graphs=False); the batch is left-padded, so the positions come from generate."""
    if not cuda_kernels_available():
        pytest.skip("needs a GPU and Fluxion's CUDA kernels")
    m = tiny_model(family).to("cuda", torch.bfloat16)
    ids = tokens(2, 300).cuda()
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # the second prompt is shorter
    seq_e, log_e, cap_e = _generate(m, ids, mask, graphs=False)
    seq_g, log_g, cap_g = _generate(m, ids, mask, graphs=None)
    assert cap_e == [] and cap_g == [2]
    torch.testing.assert_close(log_g, log_e, atol=5e-2, rtol=5e-2)
    assert torch.equal(seq_g, seq_e)


def test_cuda_graphs_need_a_gpu_model():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        fluxion.enable(m, FluxionConfig(cuda_graphs=True))
    with pytest.raises(ValueError, match="FluxionConfig.cuda_graphs must be None, True or False"):
        FluxionConfig(cuda_graphs="yes")
    fluxion.enable(m, FluxionConfig())  # auto: off for a CPU model
    assert m._fluxion_state["cuda_graphs"] is False
    fluxion.disable(m)


def test_unsupported_family_is_rejected():
    from fluxion.graphs import SegmentGraphs

    m = tiny_model("llama")
    m.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="CUDA-graph decode supports"):
        SegmentGraphs(m, None, batch=1)
