"""CUDA-graph segments around Fluxion's attention give the same decode logits as HF's eager forward, and
``fluxion.enable`` runs ``generate()``'s decode steps through them."""

from __future__ import annotations

import pytest
import torch

import fluxion
from fluxion import FluxionConfig
from conftest import cuda_kernels_available

transformers = pytest.importorskip("transformers")
from test_hf import tiny_model, tokens  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_segment_graphs_match_eager_decode(family):
    if not cuda_kernels_available():
        pytest.skip("needs a GPU and Fluxion's CUDA kernels")
    from fluxion.graphs import SegmentGraphs

    m = tiny_model(family).to("cuda", torch.bfloat16)
    fluxion.enable(m, FluxionConfig(mode="full"))
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
        graphs = SegmentGraphs(m, cache.runtime, batch=2)
        for t in range(nxt.shape[1]):
            pos = torch.full((2, 1), ids.shape[1] + t, dtype=torch.long, device="cuda")
            graphed.append(graphs.step(nxt[:, t:t + 1], pos)[:, -1].float().clone())
    fluxion.disable(m)
    torch.testing.assert_close(torch.stack(graphed), torch.stack(eager), atol=5e-2, rtol=5e-2)


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
