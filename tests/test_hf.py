"""HuggingFace integration: tiny random-weight Llama / Qwen2 / Mistral / Qwen3 models built from configs in
memory, run through Fluxion and compared with HF's own (sdpa) attention.

The models keep K/V in fp16 in the host store while HF keeps fp32, so logits are compared with a tolerance
and greedy tokens may only differ after a step where HF itself had a near-tie (top-2 margin < NEAR_TIE).
Contexts exceed sink + local = 320 tokens so the retrieval region is never empty.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fluxion
from fluxion import FluxionConfig, HeadTable
from fluxion import reference as ref
from fluxion.runtime import HybridAttentionRuntime, cuda_kernels_available

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "qwen3"]
ATOL = 2e-2  # logits of magnitude ~4; fp16 K/V and q give ~4e-3
NEAR_TIE = 2e-2


def tiny_model(family: str, seed: int = 0, **over):
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, initializer_range=0.1)
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def tokens(*shape, seed=1):
    return torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_logits(m, ids, nxt, attention_mask=None, cache=None):
    """Prefill `ids` then feed `nxt` [B, S] one token at a time; returns (prefill logits [B, T, V],
    last-position logits [B, S + 1, V]). The cache is whatever the model makes (or `cache`)."""
    am = attention_mask
    out = m(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
    pre, last, pkv = out.logits, [out.logits[:, -1]], out.past_key_values
    for t in range(nxt.shape[1]):
        if am is not None:
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        out = m(input_ids=nxt[:, t:t + 1], attention_mask=am, past_key_values=pkv, use_cache=True)
        last.append(out.logits[:, -1])
        pkv = out.past_key_values
    return pre, torch.stack(last, 1)


@torch.no_grad()
def greedy(m, ids, n, attention_mask=None, **kw):
    out = m.generate(ids, attention_mask=attention_mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def assert_greedy_equal(got, want, want_scores):
    """Tokens must match; a mismatch is allowed only where HF's top-2 margin was a near-tie (after which the
    sequences legitimately diverge)."""
    for b in range(want.shape[0]):
        diff = (got[b] != want[b]).nonzero()
        if diff.numel():
            i = int(diff[0])
            top = want_scores[b, i].topk(2).values
            assert float(top[0] - top[1]) < NEAR_TIE, (
                f"row {b}: greedy token {i} differs ({int(got[b, i])} vs HF {int(want[b, i])}) with HF margin "
                f"{float(top[0] - top[1]):.4f}\nfluxion {got[b].tolist()}\nHF      {want[b].tolist()}")


def left_pad(seqs):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    am = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], am[i, n - len(s):] = s, 1
    return ids, am


# ---------------------------------------------------------------------------------------------- equality
def test_full_mode_matches_hf_logits(model):
    ids, nxt = tokens(1, 700), tokens(1, 33, seed=2)
    want_pre, want = run_logits(model, ids, nxt)
    with fluxion.enabled(model, FluxionConfig(mode="full")):
        got_pre, got = run_logits(model, ids, nxt)
    torch.testing.assert_close(got_pre, want_pre, atol=ATOL, rtol=0)  # prefill is exact SDPA
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_prompt_longer_than_prefill_chunk_matches_hf(model):
    """An unpadded prompt longer than prefill_chunk runs as one fused causal kernel; a padded one in masked
    chunks. Both must give HF's logits."""
    ids, nxt = tokens(2, 300), tokens(2, 8, seed=3)
    want_pre, want = run_logits(model, ids, nxt)
    with fluxion.enabled(model, FluxionConfig(mode="full", prefill_chunk=64)):
        got_pre, got = run_logits(model, ids, nxt)
    torch.testing.assert_close(got_pre, want_pre, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_causal_attention_fused_and_chunked_agree_with_reference():
    from fluxion.runtime import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 200, 32, generator=g) for h in (4, 2, 2))
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.2
    scores = scores.masked_fill(torch.ones(200, 200, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(scores, -1) @ v.repeat_interleave(2, 1)
    fused = causal_attention(q, k, v, 0.2, chunk=64)  # no padding, no past: one fused kernel
    chunked = causal_attention(q, k, v, 0.2, valid=torch.ones(2, 200, dtype=torch.bool), chunk=64)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_budget_one_matches_hf_at_every_block_size(block_size):
    m = tiny_model("llama")
    ids, nxt = tokens(1, 517, seed=3), tokens(1, 32, seed=4)  # 517: not a multiple of any block size
    _, want = run_logits(m, ids, nxt)
    with fluxion.enabled(m, FluxionConfig(mode="fixed", block_size=block_size, budget=1.0)):
        _, got = run_logits(m, ids, nxt)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_fluxion_table_with_mixed_block_sizes_at_full_budget_matches_hf():
    m = tiny_model("qwen3")
    table = HeadTable(torch.ones(2, 4), torch.tensor([[16, 128], [32, 64]], dtype=torch.int32))
    ids, nxt = tokens(2, 600, seed=5), tokens(2, 32, seed=6)
    _, want = run_logits(m, ids, nxt)
    with fluxion.enabled(m, FluxionConfig(mode="fluxion", head_table=table)):
        _, got = run_logits(m, ids, nxt)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_generate_matches_hf_greedy(model):
    ids = tokens(1, 400, seed=7)
    want, scores = greedy(model, ids, 40)
    with fluxion.enabled(model, FluxionConfig(mode="full")):
        got, _ = greedy(model, ids, 40)
    assert_greedy_equal(got, want, scores)


def test_generate_without_cache_matches_hf():
    m = tiny_model("mistral")
    ids = tokens(1, 90, seed=8)
    want, scores = greedy(m, ids, 6, use_cache=False)
    with fluxion.enabled(m, FluxionConfig(mode="full")):
        got, _ = greedy(m, ids, 6, use_cache=False)
    assert_greedy_equal(got, want, scores)


def test_left_padded_batch_equals_sequences_one_at_a_time(model):
    seqs = [tokens(n, seed=10 + i) for i, n in enumerate([700, 451, 333])]
    nxt = tokens(3, 34, seed=20)
    ids, am = left_pad(seqs)
    with fluxion.enabled(model, FluxionConfig(mode="full")):
        _, batched = run_logits(model, ids, nxt, am)
        for i, s in enumerate(seqs):
            pre, single = run_logits(model, s[None], nxt[i:i + 1])
            torch.testing.assert_close(batched[i], single[0], atol=ATOL, rtol=0)
        got, _ = greedy(model, ids, 12, am)
    want, scores = greedy(model, ids, 12, am)  # HF's own batched generate
    assert_greedy_equal(got, want, scores)


def test_fixed_mode_budget_one_close_and_small_budget_differs():
    m = tiny_model("qwen2")
    ids, nxt = tokens(1, 650, seed=30), tokens(1, 32, seed=31)
    _, want = run_logits(m, ids, nxt)
    with fluxion.enabled(m, FluxionConfig(mode="fixed", block_size=16, budget=1.0)):
        _, exact = run_logits(m, ids, nxt)
    with fluxion.enabled(m, FluxionConfig(mode="fixed", block_size=16, budget=0.05)) as mm:
        cache = fluxion.new_cache(mm)
        _, sparse = run_logits(mm, ids, nxt, cache=cache)
        st = cache.stats()
    torch.testing.assert_close(exact, want, atol=ATOL, rtol=0)
    assert torch.isfinite(sparse).all()
    assert (sparse - want).abs().max() > ATOL  # random weights attend broadly: 5% retrieval must show
    assert st["decode_steps"] == 32 and st["tasks_cpu"] == 32 * 2 * 2 and st["tasks_gpu"] == 0
    assert st["bytes_cpu"] > 0 and st["bytes_pcie"] == 0 and st["cpu_busy_s"] > 0
    # The CPU side's phases are inside its busy time.
    assert st["cpu_select_s"] > 0 and st["cpu_attend_s"] > 0
    assert st["cpu_select_s"] + st["cpu_attend_s"] <= st["cpu_busy_s"]
    assert 0 < st["cpu_score_s"] and 0 < st["cpu_topk_s"] and st["cpu_score_s"] + st["cpu_topk_s"] <= st["cpu_select_s"]


def test_enable_disable_restores_hf():
    m = tiny_model("llama")
    ids = tokens(1, 50, seed=40)
    with torch.no_grad():
        before = m(ids).logits
        fluxion.enable(m, FluxionConfig(mode="full"))
        assert m.config._attn_implementation == "fluxion"
        fluxion.disable(m)
        after = m(ids).logits
    assert m.config._attn_implementation == "sdpa" and "forward" not in vars(m)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_crop_and_reset_keep_the_cache_usable():
    m = tiny_model("llama")
    ids, nxt = tokens(1, 500, seed=41), tokens(1, 40, seed=42)
    with fluxion.enabled(m, FluxionConfig(mode="full")):
        cache = fluxion.new_cache(m)
        run_logits(m, ids, nxt, cache=cache)
        assert cache.get_seq_length() == 540
        cache.crop(520)  # keep the prompt and 20 tokens
        assert cache.get_seq_length() == 520 and cache.runtime.seq_lens(1).tolist() == [520]
        _, got = run_logits(m, nxt[:, 20:21], nxt[:, 21:30], cache=cache)
        cache.reset()
        _, again = run_logits(m, ids, nxt[:, :5], cache=cache)
    full = torch.cat([ids, nxt], 1)
    _, want = run_logits(m, full[:, :521], full[:, 521:530])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    _, want2 = run_logits(m, ids, nxt[:, :5])
    torch.testing.assert_close(again, want2, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- runtime
def test_runtime_decode_matches_reference_with_streaming_heads():
    """Hybrid decode over a left-padded batch with a per-head table (streaming heads, mixed block sizes)
    equals the fp32 reference: merge(window, retrieval) over the dense K/V."""
    cfg = FluxionConfig(mode="fluxion", head_table=HeadTable(torch.tensor([[0.0, 0.1, 0.3, 0.0]]),
                                                            torch.tensor([[32, 16]], dtype=torch.int32)))
    rt = HybridAttentionRuntime(cfg, num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64)
    g = torch.Generator().manual_seed(0)
    B, T = 2, 900
    q, k, v = (torch.randn(B, h, T, 64, generator=g) for h in (4, 2, 2))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :371] = False  # 529 valid tokens
    rt.prefill(0, q, k, v, valid)
    assert rt.seq_lens(0).tolist() == [900, 529]
    for _ in range(3):
        q1, k1, v1 = torch.randn(B, 4, 64, generator=g), torch.randn(B, 2, 64, generator=g), torch.randn(B, 2, 64, generator=g)
        out = rt.decode(0, q1, k1, v1)
    lens = rt.seq_lens(0)
    kd = torch.zeros(B, 2, int(lens.max()), 64)
    vd = torch.zeros_like(kd)
    for b, s in enumerate(rt.seq_ids):
        kk, vv = rt.store.gather(0, s)
        kd[b, :, :kk.shape[1]], vd[b, :, :vv.shape[1]] = kk.float(), vv.float()
    qf = q1.half().float()
    budgets = torch.tensor([[0.0, 0.1, 0.3, 0.0]]).expand(B, 4)
    sizes = torch.tensor([[32, 16]]).expand(B, 2)
    wo, wl = ref.window_attention(qf, kd, vd, lens, 64, 256, rt.scale)
    ro, rl = ref.retrieval_attention(qf, kd, vd, lens, budgets, sizes, 64, 256, rt.scale)
    want, _ = ref.merge_states(torch.stack([wo, ro]), torch.stack([wl, rl]))
    torch.testing.assert_close(out, want, atol=2e-3, rtol=0)
    st = rt.stats()
    assert st["decode_steps"] == 3 and st["tasks_cpu"] == 3 * 4 and st["prefill_tokens"] == 900 + 529


def test_runtime_plan_splits_largest_groups_first():
    cfg = FluxionConfig(mode="fluxion", gpu_share=0.5,
                        head_table=HeadTable(torch.tensor([[0.3, 0.3, 0.1, 0.0, 0.0, 0.0, 0.2, 0.0]]),
                                             torch.full((1, 4), 16, dtype=torch.int32)))
    rt = HybridAttentionRuntime(cfg, num_layers=1, num_q_heads=8, num_kv_heads=4, head_dim=64)
    rt.gpu_retrieval = True  # plan only: pretend a GPU is there
    _, _, cpu, gpu = rt.plan(0, torch.tensor([1000, 2000], dtype=torch.int32))
    # volume per group = sum of budgets x (N - 320): group budgets [0.6, 0.1, 0, 0.2]; groups 2, 6 are streaming
    assert gpu.tolist() == [4] and cpu.tolist() == [0, 7, 5, 3, 1]


def test_reconfigure_live_cache_and_probe_table():
    """A live cache switches decode policy (the demo shares one prefill across modes); the prefill probe
    yields per-head window-mass statistics that the demo's heuristic turns into a head table."""
    from fluxion.realmodel import head_table_from_probe

    m = tiny_model("llama")
    ids, nxt = tokens(1, 600, seed=90), tokens(1, 8, seed=91)
    _, want = run_logits(m, ids, nxt)
    with fluxion.enabled(m, FluxionConfig(mode="full")):
        cache = fluxion.new_cache(m)
        cache.runtime.probe_tokens = 16
        run_logits(m, ids, nxt[:, :0], cache=cache)
        cache.runtime.reconfigure(FluxionConfig(mode="fixed", budget=1.0, block_size=64))
        _, got = run_logits(m, nxt[:, :1], nxt[:, 1:], cache=cache)
        with pytest.raises(ValueError, match="cannot change FluxionConfig.local"):
            cache.runtime.reconfigure(FluxionConfig(local=128))
        probe = torch.stack(cache.runtime.window_mass)  # [L, 2, B, Hq]
        table = head_table_from_probe(cache.runtime, streaming_below=float(probe[:, 0].median()))
    torch.testing.assert_close(got, want[:, 1:], atol=ATOL, rtol=0)
    assert probe.shape == (2, 2, 1, 4) and ((probe >= 0) & (probe <= 1)).all() and (probe[:, 0] > 0).all()
    assert (table.budgets == 0).any() and (table.budgets > 0).any()  # some streaming, some retrieval heads
    FluxionConfig(mode="fluxion", head_table=table).validate_for(2, 4, 2, 64)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, match", [
    (dict(mode="sparse"), "FluxionConfig.mode"),
    (dict(budget=1.5), r"FluxionConfig.budget must be a number in \[0, 1\]"),
    (dict(budget=-0.1), "FluxionConfig.budget"),
    (dict(block_size=24), "FluxionConfig.block_size must be one of"),
    (dict(sink=-1), "FluxionConfig.sink"),
    (dict(granularities=(16, 48)), "FluxionConfig.granularities"),
    (dict(error_target=0), "FluxionConfig.error_target"),
    (dict(cpu_threads=0), "FluxionConfig.cpu_threads"),
    (dict(gpu_streams=0), "FluxionConfig.gpu_streams"),
    (dict(gpu_share=2), "FluxionConfig.gpu_share"),
    (dict(host_byte_cap=0), "FluxionConfig.host_byte_cap"),
    (dict(page_tokens=200), "FluxionConfig.page_tokens"),
    (dict(kv_dtype=torch.float32), "FluxionConfig.kv_dtype"),
    (dict(device_policy="tpu"), r"FluxionConfig.device_policy must be one of \('auto', 'shared', 'cpu', 'gpu'\)"),
    (dict(mode="fluxion", head_table=[[0.1, 2.0]]), r"FluxionConfig.head_table must be budgets in \[0, 1\]"),
    (dict(mode="fluxion", head_table=(torch.zeros(2, 4), [[16, 24], [16, 16]])), "block_sizes in"),
    (dict(mode="fixed", head_table=torch.zeros(2, 4)), "head_table must be None unless mode='fluxion'"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        FluxionConfig(**kw)


def test_head_table_shape_checked_against_model():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=r"budgets of shape \[L, Hq\] = \[2, 4\]"):
        fluxion.enable(m, FluxionConfig(mode="fluxion", head_table=torch.zeros(2, 8)))
    with pytest.raises(ValueError, match=r"block_sizes of shape \[L, Hkv\] = \[2, 2\]"):
        fluxion.enable(m, FluxionConfig(mode="fluxion", head_table=(torch.zeros(2, 4), [[16, 16, 16]] * 2)))
    assert m.config._attn_implementation == "sdpa"  # nothing was changed
    fluxion.enable(m, FluxionConfig(mode="fluxion", head_table=[[0.0, 0.1, 0.2, 1.0]] * 2))  # nested lists work
    fluxion.disable(m)


def test_unsupported_models():
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=64, n_head=2,
                                                                 vocab_size=64))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        fluxion.enable(gpt2, FluxionConfig())
    with pytest.raises(ValueError, match="head_dim 64 or 128.*head_dim=32"):
        fluxion.enable(tiny_model("llama", head_dim=32), FluxionConfig())


def test_sliding_window_served_only_inside_the_window():
    m = tiny_model("mistral", sliding_window=400)
    with pytest.warns(UserWarning, match="sliding-window"):
        fluxion.enable(m, FluxionConfig(mode="full"))
    ids = tokens(1, 390, seed=50)
    with torch.no_grad():
        out = m(ids)
        m(tokens(1, 1, seed=51), past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="sliding-window attention"):
            m(tokens(1, 20, seed=52), past_key_values=out.past_key_values)
    fluxion.disable(m)


def test_foreign_cache_with_tokens_is_rejected_and_cache_needs_fluxion_attention():
    m = tiny_model("llama")
    with torch.no_grad():
        pkv = m(tokens(1, 20)).past_key_values  # HF's DynamicCache
        with fluxion.enabled(m, FluxionConfig(mode="full")):
            with pytest.raises(ValueError, match="fluxion.new_cache"):
                m(tokens(1, 1), past_key_values=pkv)
            cache = fluxion.new_cache(m)
        with pytest.raises(RuntimeError, match="attention implementation to be 'fluxion'"):
            m(tokens(1, 5), past_key_values=cache)


def _frame_bytes(model):
    store = fluxion.new_cache(model).runtime.store
    return store.page_elems * store.num_kv_heads * 2


class _Recorder:
    """A generate() streamer that keeps every token it is given (prompt first)."""

    def __init__(self):
        self.tokens = []

    def put(self, value):
        self.tokens += value.reshape(-1).tolist()

    def end(self):
        pass


def test_byte_cap_exceeded_mid_generation_then_cache_still_usable():
    m = tiny_model("llama")
    cfg = FluxionConfig(mode="full", page_tokens=256)  # small pages keep the prompts short
    with fluxion.enabled(m, cfg):
        fb = _frame_bytes(m)
    # 2 layers x 2 pages of 256 tokens fit; position 513 needs a third page per layer.
    cfg = cfg.replace(host_byte_cap=4 * fb + 4096)
    ids = tokens(1, 400, seed=60)
    rec = _Recorder()
    with fluxion.enabled(m, cfg):
        cache = fluxion.new_cache(m)
        with pytest.raises(fluxion.CapacityError, match="host_byte_cap") as err, torch.no_grad():
            m.generate(ids, past_key_values=cache, max_new_tokens=150, min_new_tokens=150, do_sample=False,
                       streamer=rec)
        assert "nothing was stored" in str(err.value)
        assert cache.get_seq_length() == 512  # every layer stopped at the same length
        assert cache.runtime.seq_lens(0).tolist() == cache.runtime.seq_lens(1).tolist() == [512]
        c2 = fluxion.new_cache(m)
        with pytest.raises(fluxion.CapacityError):  # a prompt that cannot fit stores nothing either
            run_logits(m, tokens(1, 1100, seed=61), tokens(1, 0), cache=c2)
        assert c2.get_seq_length() == 0 and c2.runtime.seq_lens(0).tolist() == [0]
        # Usable again after shortening: continue from 450 positions and match HF on the same tokens.
        cache.crop(450)
        nxt = tokens(1, 10, seed=62)
        _, got = run_logits(m, nxt[:, :1], nxt[:, 1:], cache=cache)
        assert cache.runtime.store.gather(0, cache.runtime.seq_ids[0])[0].shape[1] == 460
    kept = torch.tensor([rec.tokens[:450]])  # prompt + the first 50 generated tokens
    assert torch.equal(kept[:, :400], ids)
    _, want = run_logits(m, torch.cat([kept, nxt[:, :1]], 1), nxt[:, 1:])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_kernels_available()),
                         reason="needs a GPU and Fluxion's CUDA kernels")


@gpu
@pytest.mark.parametrize("path", ["shared", "gpu-alone"])
@pytest.mark.parametrize("mode", ["full", "fluxion"])
def test_gpu_path_matches_cpu_only(mode, path, monkeypatch):
    # The tiny model's steps read far less than the threshold for sharing with the CPU: 0 forces the shared
    # queue, a huge value the GPU-alone step (no host sync, deferred store writes).
    from fluxion.runtime import HybridAttentionRuntime

    monkeypatch.setattr(HybridAttentionRuntime, "min_shared_volume", 0 if path == "shared" else 1 << 40)
    ids, nxt = tokens(2, 700, seed=70), tokens(2, 33, seed=71)
    table = HeadTable(torch.tensor([[0.0, 0.2, 0.5, 0.1], [0.3, 0.0, 0.05, 1.0]]),
                      torch.tensor([[16, 64], [32, 128]], dtype=torch.int32)) if mode == "fluxion" else None
    cfg = FluxionConfig(mode=mode, head_table=table, gpu_share=0.5)
    m = tiny_model("qwen2")
    with fluxion.enabled(m, cfg):
        cache_cpu = fluxion.new_cache(m)
        _, on_cpu = run_logits(m, ids, nxt, cache=cache_cpu)
    m = m.cuda()
    with fluxion.enabled(m, cfg):
        cache = fluxion.new_cache(m)
        _, on_gpu = run_logits(m, ids.cuda(), nxt.cuda(), cache=cache)
        st = cache.stats()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=ATOL, rtol=0)
    assert st["tasks_gpu"] > 0 and st["bytes_pcie"] > 0
    assert st["gpu_busy_s"] > 0 if path == "shared" else st["gpu_alone_steps"] > 0
    assert cache.runtime.store.pinned


@gpu
def test_gpu_memory_does_not_grow_with_context():
    m = tiny_model("llama").cuda()
    peaks = []
    with fluxion.enabled(m, FluxionConfig(mode="full")):
        for n in (1000, 6000):
            cache = fluxion.new_cache(m)
            with torch.no_grad():
                out = m(tokens(1, n, seed=80).cuda(), past_key_values=cache)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                for t in range(8):
                    out = m(out.logits[:, -1:].argmax(-1), past_key_values=cache)
                torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del cache, out
    # 5000 more tokens of fp32 K/V would be 2 layers x 2 x 2 heads x 64 x 4 B x 5000 = 10 MB per layer pair.
    assert peaks[1] - peaks[0] < 256 * 1024, peaks


def test_import_touches_no_cuda():
    code = "import torch, fluxion, fluxion.hf; fluxion.FluxionConfig(); assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)
