"""The C++ hybrid decode step (torch.classes.fluxion.HybridRuntime) against the fp32 reference."""

from __future__ import annotations

import pytest
import torch

import fluxion
from fluxion import reference as R
from conftest import make_kv, make_q


def _run(device, use_gpu, budgets_value, block=16, steps=4, seed=0, min_shared_volume=None, adaptive=False,
         local=256):
    """`steps` decode steps of layer 1 after a prefill. min_shared_volume: 0 makes every GPU step share the
    queue with the CPU, a huge value makes it run on the GPU alone (no host sync; deferred store writes).
    adaptive: device_policy 'auto''s choice between sharing a step and running it on the CPU alone."""
    L, hkv, hq, d = 2, 2, 8, 64
    dev = torch.device(device)
    store = fluxion.HostKVStore(L, hkv, d, torch.bfloat16, pin=dev.type == "cuda")
    seqs = [store.add_sequence() for _ in range(2)]
    rt = torch.classes.fluxion.HybridRuntime(store._impl, hq, str(dev), 64, local, 2)
    if min_shared_volume is not None:
        rt.configure(2, True, min_shared_volume)
    rt.set_adaptive_sharing(adaptive)
    rt.set_sequences(seqs)
    n0 = 1100
    k, v, direction = make_kv(2, hkv, n0 + steps, d, torch.bfloat16, seed=seed)
    valid = torch.ones(2, n0, dtype=torch.bool)
    valid[1, :400] = False  # left padding: the second sequence is shorter
    for layer in range(L):
        rt.prefill(layer, k[:, :, :n0].to(dev), v[:, :, :n0].to(dev), valid.to(dev))
    hist_k = [k[0, :, :n0], k[1, :, 400:n0]]
    hist_v = [v[0, :, :n0], v[1, :, 400:n0]]
    outs, refs = [], []
    for step in range(steps):
        q = make_q(2, hq, d, torch.bfloat16, direction, seed=100 + step)
        kn, vn = k[:, :, n0 + step:n0 + step + 1], v[:, :, n0 + step:n0 + step + 1]
        budgets = torch.full((2, hq), budgets_value)
        sizes = torch.full((2, hkv), block, dtype=torch.int32)
        out = rt.decode(1, q.to(dev), kn.to(dev), vn.to(dev), budgets, sizes, use_gpu, d ** -0.5)
        for b in range(2):
            hist_k[b] = torch.cat([hist_k[b], kn[b]], 1)
            hist_v[b] = torch.cat([hist_v[b], vn[b]], 1)
        outs.append(out.cpu())
        refs.append((q, [x.clone() for x in hist_k], [x.clone() for x in hist_v]))
    # Every token reached the host store (GPU-alone steps write theirs once the async copy lands).
    for b, s in enumerate(seqs):
        sk, sv = store.gather(1, s)
        assert torch.equal(sk, hist_k[b]) and torch.equal(sv, hist_v[b])
    return outs, refs, rt.stats()


@pytest.mark.parametrize("path", ["shared", "gpu-alone"])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_full_budget_equals_dense_attention(device, use_gpu, path):
    outs, refs, stats = _run(device, use_gpu, 1.0, min_shared_volume=0 if path == "shared" else 1 << 40)
    for out, (q, ks, vs) in zip(outs, refs):
        for b in range(2):
            fo, _ = R.full_attention(q[b:b + 1], ks[b][None], vs[b][None], torch.tensor([ks[b].shape[1]]), 64 ** -0.5)
            torch.testing.assert_close(out[b], fo[0], atol=1e-4, rtol=1e-3)
    assert stats["steps"] == 4 and stats["cpu_tasks"] + stats["gpu_tasks"] == 4 * 4
    if device.type == "cpu" or not use_gpu:
        assert stats["gpu_tasks"] == 0 and stats["gpu_alone_steps"] == 0
    else:
        assert stats["gpu_alone_steps"] == (4 if path == "gpu-alone" else 0) and stats["gpu_bytes"] > 0


@pytest.mark.parametrize("path", ["shared", "gpu-alone"])
def test_without_a_local_window_each_step_retrieves_its_own_token(device, path):
    # local = 0: the new token lies in the retrieval range at once, so the step must write it to the host store
    # before any retrieval reads the store (a GPU step otherwise defers that write until its copy lands).
    outs, refs, stats = _run(device, True, 1.0, min_shared_volume=0 if path == "shared" else 1 << 40, local=0)
    for out, (q, ks, vs) in zip(outs, refs):
        for b in range(2):
            fo, _ = R.full_attention(q[b:b + 1], ks[b][None], vs[b][None], torch.tensor([ks[b].shape[1]]), 64 ** -0.5)
            torch.testing.assert_close(out[b], fo[0], atol=1e-4, rtol=1e-3)
    assert stats["gpu_alone_steps"] == 0  # never deferred


def _check_against_reference(outs, refs, budget, block=32):
    """Each step of _run equals the fp32 reference: retrieval at `budget` / `block` merged with the window."""
    for out, (q, ks, vs) in zip(outs, refs):
        for b in range(2):
            n = ks[b].shape[1]
            ro, rl = R.retrieval_attention(q[b:b + 1], ks[b][None], vs[b][None], torch.tensor([n]),
                                           torch.full((1, 8), budget), torch.full((1, 2), block, dtype=torch.int32),
                                           64, 256, 64 ** -0.5)
            wo, wl = R.window_attention(q[b:b + 1], ks[b][None], vs[b][None], torch.tensor([n]), 64, 256, 64 ** -0.5)
            mo, _ = R.merge_states(torch.stack([ro, wo]), torch.stack([rl, wl]))
            torch.testing.assert_close(out[b], mo[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("path", ["shared", "gpu-alone"])
def test_sparse_budget_matches_reference_task(device, path):
    outs, refs, _ = _run(device, True, 0.05, block=32, min_shared_volume=0 if path == "shared" else 1 << 40)
    _check_against_reference(outs, refs, 0.05)


def test_bad_input_is_rejected():
    store = fluxion.HostKVStore(1, 2, 64)
    with pytest.raises(RuntimeError, match="num_q_heads must be a positive multiple"):
        torch.classes.fluxion.HybridRuntime(store._impl, 7, "cpu", 64, 256, 1)
    rt = torch.classes.fluxion.HybridRuntime(store._impl, 8, "cpu", 64, 256, 1)
    with pytest.raises(RuntimeError, match="set_sequences"):
        rt.decode(0, torch.zeros(1, 8, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16),
                  torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16), torch.ones(1, 8),
                  torch.full((1, 2), 16, dtype=torch.int32), False, 0.125)
    with pytest.raises(RuntimeError, match="call set_sequences before window"):
        rt.window(0)
    rt_seq = store.add_sequence()
    rt.set_sequences([rt_seq])
    z = torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"budgets must be in \[0, 1\]"):
        rt.decode(0, torch.zeros(1, 8, 64, dtype=torch.bfloat16), z, z, torch.full((1, 8), 2.0),
                  torch.full((1, 2), 16, dtype=torch.int32), False, 0.125)
    with pytest.raises(RuntimeError, match="block_size must be one of"):
        rt.decode(0, torch.zeros(1, 8, 64, dtype=torch.bfloat16), z, z, torch.ones(1, 8),
                  torch.full((1, 2), 8, dtype=torch.int32), False, 0.125)
    # K/V of the wrong shape or dtype: rejected before anything is staged or stored.
    q8, ones, sizes = torch.zeros(1, 8, 64, dtype=torch.bfloat16), torch.ones(1, 8), torch.full((1, 2), 16, dtype=torch.int32)
    for bad_k, bad_v, message in [(torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16), z, r"k must be \[B, Hkv, 1, D\]"),
                                  (torch.zeros(1, 2, 1, 32, dtype=torch.bfloat16), z, r"k must be \[B, Hkv, 1, D\]"),
                                  (z, torch.zeros(1, 2, 1, 32, dtype=torch.bfloat16), "v must have k's shape"),
                                  (z.int(), z.int(), "k and v must be bfloat16, float16 or float32")]:
        with pytest.raises(RuntimeError, match=message):
            rt.decode(0, q8, bad_k, bad_v, ones, sizes, False, 0.125)
    kw, vw = rt.window(0)
    for bad_out in [torch.zeros(1, 8, 32), torch.zeros(1, 8, 64, dtype=torch.int32), torch.zeros(1, 64, 8).mT]:
        with pytest.raises(RuntimeError, match=r"out must be a contiguous float32, bfloat16 or float16 \[B, Hq, D\]"):
            rt.step(0, [rt_seq], kw, vw, q8, z, z, ones, sizes, False, 0.125, bad_out)
    assert store.seq_len(0, rt_seq) == 0


@pytest.mark.parametrize("path", ["fixed", "shared", "gpu-alone"])
def test_decode_writes_out_in_its_dtype(device, path):
    """decode(out=...) writes the merged result into `out` in out's dtype (on a GPU the merge kernel writes it
    directly, with no conversion after): the float32 result rounded once, the same as without `out`; and the
    float32 result equals the fp32 reference. A shared step's split between the CPU and the GPU depends on timing,
    and their kernels round differently, so there runtimes agree within tolerance rather than bit for bit."""
    L, hq, hkv, d, B, n0 = 1, 8, 2, 64, 2, 1500
    mode = dict(mode="fixed") if path == "fixed" else dict(mode="fluxion", device_policy="shared")
    cfg = fluxion.FluxionConfig(block_size=16, budget=0.1, **mode)
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(B, hkv, n0, d, generator=g), torch.randn(B, hkv, n0, d, generator=g)
    runtimes = []
    for _ in range(5):  # float32 / bfloat16 / float16 `out`, no `out`, no `out` in a float32 model
        rt = fluxion.HybridAttentionRuntime(cfg, L, hq, hkv, d, device=device, dtype=torch.bfloat16)
        rt.min_shared_volume = 0 if path == "shared" else 1 << 40
        rt.reconfigure(cfg)
        rt.prefill(0, torch.zeros(B, hq, n0, d).to(device), k.to(device), v.to(device))
        runtimes.append(rt)
    for step in range(3):
        q, kn, vn = (torch.randn(B, h, d, generator=g).to(device) for h in (hq, hkv, hkv))
        bufs = [torch.full((B, hq, d), float("nan"), dtype=dt, device=device)
                for dt in (torch.float32, torch.bfloat16, torch.float16)]
        q16, kn16, vn16 = q.bfloat16(), kn.bfloat16(), vn.bfloat16()
        got = [rt.decode(0, q16, kn16, vn16, out=buf) for rt, buf in zip(runtimes, bufs)]
        assert all(x is buf for x, buf in zip(got, bufs))
        plain = runtimes[3].decode(0, q16, kn16, vn16)
        f32 = runtimes[4].decode(0, q16.float(), kn16, vn16)  # a float32 q: the result comes back in float32
        assert plain.dtype == torch.bfloat16 and f32.dtype == torch.float32
        if path == "shared" and torch.device(device).type == "cuda":
            torch.testing.assert_close(bufs[0], f32, atol=1e-4, rtol=0)
            for buf in bufs[1:] + [plain]:  # one rounding step of bfloat16 / float16 apart at most
                torch.testing.assert_close(buf.float(), bufs[0], atol=1e-2, rtol=1e-2)
        else:
            torch.testing.assert_close(bufs[0], f32, atol=0, rtol=0)
            for buf in bufs[1:]:
                assert torch.equal(buf, bufs[0].to(buf.dtype))
            assert torch.equal(plain, bufs[1])
    # The last step against the fp32 reference (merge of window and retrieval over the stored K/V).
    rt = runtimes[0]
    lens = rt.seq_lens(0)
    kd = torch.stack([rt.store.gather(0, s)[0].float() for s in rt.seq_ids])
    vd = torch.stack([rt.store.gather(0, s)[1].float() for s in rt.seq_ids])
    qf = q16.float().cpu()
    wo, wl = R.window_attention(qf, kd, vd, lens, 64, 256, rt.scale)
    ro, rl = R.retrieval_attention(qf, kd, vd, lens, torch.full((B, hq), 0.1), torch.full((B, hkv), 16), 64, 256,
                                   rt.scale)
    want, _ = R.merge_states(torch.stack([wo, ro]), torch.stack([wl, rl]))
    torch.testing.assert_close(bufs[0].cpu(), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("mode", ["full", "fixed", "fluxion"])
def test_cpp_decode_backend_matches_python_backend(device, mode):
    """FluxionConfig(decode_backend='cpp') runs HF decode steps through the C++ step with the same result."""
    pytest.importorskip("transformers")
    from test_hf import run_logits, tiny_model, tokens

    m = tiny_model("llama").to(device)
    ids, nxt = tokens(2, 600).to(device), tokens(2, 5, seed=4).to(device)
    results = []
    for backend in ("python", "cpp"):
        fluxion.enable(m, fluxion.FluxionConfig(mode=mode, block_size=32, budget=0.1, decode_backend=backend))
        results.append(run_logits(m, ids, nxt, cache=fluxion.new_cache(m))[1])
        fluxion.disable(m)
    torch.testing.assert_close(results[1], results[0], atol=2e-3, rtol=2e-3)


def test_decode_backend_is_validated():
    with pytest.raises(ValueError, match="decode_backend"):
        fluxion.FluxionConfig(decode_backend="rust")


def test_graph_steps_reject_bad_input_and_leave_the_store_alone():
    """The whole-step graph API (graph_begin / graph_step / graph_end): a CPU runtime refuses it with a clear
    error (the Python runtime simply does not offer it), and on a GPU bad tables and a step left open are
    rejected before anything is stored."""
    store = fluxion.HostKVStore(2, 2, 64)
    rt = torch.classes.fluxion.HybridRuntime(store._impl, 8, "cpu", 64, 256, 1)
    seq = store.add_sequence()
    rt.set_sequences([seq])
    budgets, sizes = torch.full((2, 1, 8), 0.1), torch.full((2, 1, 2), 16, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="graph steps need"):
        rt.graph_begin([seq], budgets, sizes)
    cpu_rt = fluxion.HybridAttentionRuntime(fluxion.FluxionConfig(), 2, 8, 2, 64)
    assert cpu_rt.graph_begin() is None
    from fluxion.runtime import cuda_kernels_available

    if not (torch.cuda.is_available() and cuda_kernels_available()):
        return
    store = fluxion.HostKVStore(2, 2, 64, torch.bfloat16, pin=True)
    rt = torch.classes.fluxion.HybridRuntime(store._impl, 8, "cuda", 64, 256, 1)
    seq = store.add_sequence()
    rt.set_sequences([seq])
    k = torch.randn(1, 2, 500, 64, dtype=torch.bfloat16, device="cuda")
    for layer in range(2):
        rt.prefill(layer, k, k, None)
    with pytest.raises(RuntimeError, match=r"budgets must be a CPU \[L, B, Hq\]"):
        rt.graph_begin([seq], torch.full((1, 1, 8), 0.1), sizes)
    with pytest.raises(RuntimeError, match=r"budgets must be in \[0, 1\]"):
        rt.graph_begin([seq], torch.full((2, 1, 8), 1.5), sizes)
    with pytest.raises(RuntimeError, match="block_size must be one of"):
        rt.graph_begin([seq], budgets, torch.full((2, 1, 2), 24, dtype=torch.int32))
    assert [int(n) for n in store.seq_lens(0, [seq])] == [500]
    with pytest.raises(RuntimeError, match="graph_step must come between graph_begin and graph_end"):
        q = torch.zeros(1, 8, 64, dtype=torch.bfloat16, device="cuda")
        rt.graph_step(0, *rt.window(0), q, k[:, :, 0], k[:, :, 0], 0.125)
    capacity, _, _ = rt.graph_begin([seq], budgets, sizes)
    assert capacity > 0 and [int(n) for n in store.seq_lens(1, [seq])] == [501]
    with pytest.raises(RuntimeError, match="previous graph step was not closed"):
        rt.graph_begin([seq], budgets, sizes)
    rt.graph_end()



def _run_split(device, budgets, parts, steps=3, seed=3):
    """Decode steps of layer 0 over 2 sequences (one left-padded) on a store of 128-token pages, with the dense
    groups split into `parts` token ranges (1: never). Every GPU step shares the queue with the CPU. Returns the
    outputs, the stats and, per step, (q, K, V of each sequence)."""
    hkv, hq, d, n0 = 2, 8, 64, 1500
    dev = torch.device(device)
    store = fluxion.HostKVStore(1, hkv, d, torch.bfloat16, page_tokens=128, pin=dev.type == "cuda")
    seqs = [store.add_sequence() for _ in range(2)]
    rt = torch.classes.fluxion.HybridRuntime(store._impl, hq, str(dev), 64, 256, 2)
    rt.configure(2, True, 0)
    rt.set_dense_parts(parts)
    rt.set_sequences(seqs)
    k, v, direction = make_kv(2, hkv, n0 + steps, d, torch.bfloat16, seed=seed)
    valid = torch.ones(2, n0, dtype=torch.bool)
    valid[1, :300] = False
    rt.prefill(0, k[:, :, :n0].to(dev), v[:, :, :n0].to(dev), valid.to(dev))
    sizes = torch.tensor([[16, 128], [32, 64]], dtype=torch.int32)
    outs, refs = [], []
    for step in range(steps):
        q = make_q(2, hq, d, torch.bfloat16, direction, seed=200 + step)
        kn, vn = k[:, :, n0 + step:n0 + step + 1], v[:, :, n0 + step:n0 + step + 1]
        outs.append(rt.decode(0, q.to(dev), kn.to(dev), vn.to(dev), budgets, sizes, True, d ** -0.5).cpu())
        refs.append((q, [k[b, :, first:n0 + step + 1] for b, first in ((0, 0), (1, 300))],
                     [v[b, :, first:n0 + step + 1] for b, first in ((0, 0), (1, 300))]))
    return outs, rt.stats(), refs


@pytest.mark.parametrize("table", ["full", "mixed"])
def test_dense_groups_split_into_token_ranges_give_the_same_attention(device, table):
    # Mixed: group 0 of each row is dense (heads at 1, or 0 for a streaming head), group 1 retrieves a fraction.
    budgets = (torch.ones(2, 8) if table == "full" else
               torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.3, 0.1, 0.0, 0.5], [0.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.6, 0.05]]))
    whole, st1, _ = _run_split(device, budgets, 1)
    split, st3, refs = _run_split(device, budgets, 3)
    # Each dense group (4 in the full table, 2 in the mixed one) became 3 tasks, in each of the 3 steps.
    tasks = lambda st: st["cpu_tasks"] + st["gpu_tasks"]
    assert tasks(st3) == tasks(st1) + 2 * (4 if table == "full" else 2) * 3
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    if table == "full":  # both equal exact attention over everything stored
        for out, (q, ks, vs) in zip(split, refs):
            for b in range(2):
                fo, _ = R.full_attention(q[b:b + 1], ks[b][None], vs[b][None], torch.tensor([ks[b].shape[1]]),
                                         64 ** -0.5)
                torch.testing.assert_close(out[b], fo[0], atol=1e-4, rtol=1e-3)


def test_dense_parts_is_checked():
    store = fluxion.HostKVStore(1, 2, 64, torch.bfloat16)
    rt = torch.classes.fluxion.HybridRuntime(store._impl, 8, "cpu", 64, 256, 1)
    with pytest.raises(RuntimeError, match="dense_parts must be in"):
        rt.set_dense_parts(17)


@pytest.mark.skipif(not torch.cuda.is_available() or not fluxion.build_info()["cuda_kernels"],
                    reason="needs a GPU and Fluxion's CUDA kernels")
def test_adaptive_sharing_tries_both_devices_and_stays_exact():
    """device_policy 'auto': the first steps alternate between sharing with the GPU and the CPU alone (then the
    faster one runs); either way every step equals the reference."""
    outs, refs, stats = _run("cuda", True, 0.3, block=32, steps=10, min_shared_volume=0, adaptive=True)
    assert 0 < stats["cpu_alone_steps"] < 10 and stats["gpu_tasks"] > 0
    _check_against_reference(outs, refs, 0.3)
