"""Where a shared decode step's host time goes, per layer: TPOT, the time in SegmentGraphs.step, runtime.decode, _decode_cpp,
the torchbind call and the C++ step (its own timers, and fine_* section timers with run1_fine_timers.patch applied);
then bare host costs of a graph replay, a tiny kernel, an allocation and a conversion copy. Run from the repository root:
PYTHONPATH=. python3 benchmarks/results/2026-11-30-s17/prof_gap.py --context 65536 --batch 1"""
import argparse, collections, sys, time, statistics
import torch
sys.path.insert(0, "benchmarks")
import bench_decode as bd  # noqa: E402
import fluxion  # noqa: E402
from fluxion.runtime import HybridAttentionRuntime  # noqa: E402
from fluxion.graphs import SegmentGraphs  # noqa: E402

acc = collections.defaultdict(float)
def timed(name, fn):
    def w(*a, **k):
        t = time.perf_counter(); r = fn(*a, **k); acc[name] += time.perf_counter() - t; return r
    return w
torch.cuda.CUDAGraph.replay = timed("replay", torch.cuda.CUDAGraph.replay)
HybridAttentionRuntime.decode = timed("decode", HybridAttentionRuntime.decode)
HybridAttentionRuntime._decode_cpp = timed("decode_cpp", HybridAttentionRuntime._decode_cpp)

class Proxy:
    def __init__(self, obj): self._obj = obj; self.step = timed("cpp_call", obj.step)
    def __getattr__(self, n): return getattr(self._obj, n)
SegmentGraphs.step = timed("segstep", SegmentGraphs.step)

p = argparse.ArgumentParser()
p.add_argument("--model", default="llama3-8b"); p.add_argument("--context", type=int, default=131072)
p.add_argument("--batch", type=int, default=1); p.add_argument("--modes", nargs="+", default=["fixed16-0.05", "share16-0.05"])
p.add_argument("--steps", type=int, default=8); p.add_argument("--rounds", type=int, default=2)
a = p.parse_args()
a.backend, a.no_graphs, a.cpu_threads, a.table_seed, a.device = "cpp", False, None, 0, "cuda"
model = bd.build_model(a.model, None, "cuda", torch.bfloat16)
L = model.config.num_hidden_layers
configs = {m: bd.fluxion_config(m, model.config, a) for m in a.modes}
fluxion.enable(model, configs[a.modes[0]])
cache = fluxion.new_cache(model)
ids = torch.randint(0, model.config.vocab_size, (a.batch, a.context), device="cuda")
with torch.no_grad():
    nxt, pre_s, peak = bd.prefill(model, ids, cache, a)
print(f"prefill {pre_s:.1f} s", flush=True)
rt = cache.runtime
rt._cpp = Proxy(rt._cpp)
NAMES = ["checks", "flush+lens", "plan_tasks/rows/queue", "staging", "plan alloc+fill", "upload", "views+window_append",
         "dense", "model_wait", "write setup", "q conv+part fill", "gpu_fn setup", "run_task_queue", "post-queue stats",
         "merge lists", "merge params", "merge empty", "merge kernel", "record_host_use", "merge tail"]
with torch.no_grad():
    for r in range(a.rounds):
        for m in a.modes:
            rt.reconfigure(configs[m])
            for i in range(4):
                nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize(); rt.reset_stats(); acc.clear()
            tt = []
            for i in range(a.steps):
                torch.cuda.synchronize(); t = time.perf_counter()
                nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize(); tt.append(time.perf_counter() - t)
            c = dict(rt._cpp.stats()); n = a.steps
            us = lambda x: x / n / L * 1e6
            print(f"== {m} round {r}: TPOT p50 {statistics.median(tt)*1e3:.2f} ms, mean {statistics.mean(tt)*1e3:.2f}; per layer (us): "
                  f"segstep {us(acc['segstep']):.0f}, decode {us(acc['decode']):.0f}, decode_cpp {us(acc['decode_cpp']):.0f}, cpp call {us(acc['cpp_call']):.0f}, replay {us(acc['replay']):.0f} "
                  f"(n={L+1}/step), C++ step {us(c['step_s']):.0f}, retrieval {us(c['retrieval_s']):.0f}, "
                  f"outside model {us(sum(tt) - acc['segstep']):.0f}")
            if "fine_0" in c:
                print("   fine: " + ", ".join(f"{NAMES[i]} {us(c[f'fine_{i}']):.1f}" for i in range(20)), flush=True)
            print("   " + ", ".join(f"{k} {us(c[k]):.1f}" for k in ("plan_s", "append_s", "model_wait_s", "dense_s", "retrieval_s", "merge_s")), flush=True)
    # bare host costs
    g = SegmentGraphs  # noqa
    graphs = model._fluxion_state["graphs"][a.batch]
    torch.cuda.synchronize()
    for name, fn in [("replay mid graph", lambda: graphs.graphs[1].replay()),
                     ("tiny kernel (add_)", lambda: graphs.attn.add_(0)),
                     ("empty cuda", lambda: torch.empty(1024, device="cuda")),
                     ("copy_ f32->bf16 [B,Hq,D]", lambda: graphs.attn.copy_(torch.zeros(graphs.attn.shape, device="cuda")))]:
        ts = []
        for i in range(50):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        print(f"bare {name}: median {statistics.median(ts)*1e6:.1f} us", flush=True)
fluxion.disable(model)
