"""CUDA-graph segments around Fluxion's attention give the same decode logits as HF's eager forward."""

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


def test_unsupported_family_is_rejected():
    from fluxion.graphs import SegmentGraphs

    m = tiny_model("llama")
    m.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="CUDA-graph decode supports"):
        SegmentGraphs(m, None, batch=1)
