"""A/B in one process: each layer's attention step launches the next CUDA-graph segment itself (decode's
launch_after, SegmentGraphs.chain_segments = True) against Python replaying every segment (False). One prefill,
modes and the two settings in turns. The change was not kept: apply run5_chain_segments.patch (to 4d48634) and build
with CUDA first. Run from the repository root:
PYTHONPATH=. python3 benchmarks/results/2026-11-30-s17/ab_chain.py --context 65536 --batch 1 --rounds 2 --steps 8 --warmup 3"""
import argparse
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_decode as bd  # noqa: E402
import fluxion  # noqa: E402
from fluxion.graphs import SegmentGraphs  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="llama3-8b")
p.add_argument("--context", type=int, default=65536)
p.add_argument("--batch", type=int, default=1)
p.add_argument("--modes", nargs="+", default=["fixed16-0.05", "share16-0.05", "fluxion"])
p.add_argument("--steps", type=int, default=8)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--device", default="cuda")
a = p.parse_args()
a.backend, a.no_graphs, a.cpu_threads, a.table_seed = "cpp", False, None, 0
model = bd.build_model(a.model, None, a.device, torch.bfloat16)
configs = {m: bd.fluxion_config(m, model.config, a) for m in a.modes}
fluxion.enable(model, configs[a.modes[0]])
cache = fluxion.new_cache(model)
ids = torch.randint(0, model.config.vocab_size, (a.batch, a.context), device=a.device)
with torch.no_grad():
    nxt, prefill_s, _ = bd.prefill(model, ids, cache, a)
    rt = cache.runtime
    print(f"# {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'} | {a.model} {a.context} x {a.batch} | prefill {prefill_s:.1f} s", flush=True)

    def step(tok, i):
        return model(input_ids=tok, past_key_values=cache, use_cache=True).logits

    tpot, attn = {}, {}
    for r in range(a.rounds):
        for m in a.modes:
            for chain in (False, True):
                SegmentGraphs.chain_segments = chain
                rt.reconfigure(configs[m])
                rt.reset_stats()
                tpot.setdefault((m, chain), []).extend(bd.time_steps(step, nxt, a, after_warmup=rt.reset_stats))
                per = rt.stats()["per_step"]
                attn.setdefault((m, chain), []).append(per["step_s"] - per["model_wait_s"])
print(f"{'mode':<14} {'replayed TPOT':>14} {'chained TPOT':>13} {'ratio':>6} {'attention':>10} {'chained':>8}   (ms, medians)")
for m in a.modes:
    t0, t1 = statistics.median(tpot[(m, False)]) * 1e3, statistics.median(tpot[(m, True)]) * 1e3
    s0, s1 = statistics.median(attn[(m, False)]) * 1e3, statistics.median(attn[(m, True)]) * 1e3
    print(f"{m:<14} {t0:14.2f} {t1:13.2f} {t0 / t1:6.3f} {s0:10.2f} {s1:8.2f}")
fluxion.disable(model)
