"""End-to-end decode benchmark: TPOT and the per-step breakdown of Fluxion's modes against HF's caches.

Model geometry from a config in memory with random weights (speed does not depend on weight values):
Llama-3.1-8B (32 layers, 32 q / 8 kv heads, D=128) or Qwen2.5-7B (28 layers, 28 q / 4 kv heads).
For each context and batch it prefills random tokens once for all Fluxion modes (switching the live cache's
decode policy between them) and once per HF cache, then times `--steps` decode steps per mode (with
`--rounds R`, the Fluxion modes take turns R times, so a drift in the host's speed hits them alike).

Modes (pick with --modes):
  full, fixed16-0.05, fixed16-0.02, fluxion   Fluxion's runtime; on a GPU, decode steps run through CUDA-graph
                                              segments (FluxionConfig.cuda_graphs) so only attention runs eagerly;
                                              'fluxion' uses a synthetic per-head table (--table-seed): 30% of
                                              heads streaming, the rest budget 0.02..0.10, block 16 or 32 per group.
  share16-0.05                                'fluxion' mode with fixed16-0.05's budgets for every head, every step
                                              shared (device_policy 'shared'): the work sharing of the shared queue
                                              alone (CPU + GPU vs CPU only). The other Fluxion modes use 'auto',
                                              which runs a step on the CPU alone where that has read faster.
  hf-offload                                  HF DynamicCache(offloading=True), sdpa, eager forward.
  hf-gpu                                      HF DynamicCache on the GPU, sdpa (only where the cache fits).
  graph-floor                                 the whole decode step of the model with HF's StaticCache captured in
                                              one CUDA graph (the non-attention floor at --floor-context tokens).

  python benchmarks/bench_decode.py --model llama3-8b --contexts 32768 65536 131072 --batch 1 4 --out decode.json
  python benchmarks/bench_decode.py --tiny --device cpu --modes full fixed16-0.05   # smoke test, no GPU
  python benchmarks/bench_decode.py --contexts 131072 --batch 1 --modes fixed16-0.05 share16-0.05 fluxion \\
      --rounds 3 --steps 8 --warmup 4   # modes in turns (the sharing ratio)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (combined_read_bandwidth, environment, h2d_bandwidth, host_read_bandwidth,  # noqa: E402
                    huge_page_share, write_rows)

import fluxion  # noqa: E402

GEOMETRIES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=131072 + 4096),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                       rope_theta=1000000.0, max_position_embeddings=131072 + 4096),
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32 * 2, vocab_size=512,
                 max_position_embeddings=65536),
}


def build_model(name: str, layers: int | None, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    geo = dict(GEOMETRIES[name])
    if layers:
        geo["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(geo.pop("model_type"), **geo)
    with torch.device(device):  # initialise the random weights where they will live
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def synthetic_table(cfg, seed: int) -> fluxion.HeadTable:
    g = torch.Generator().manual_seed(seed)
    L, hq, hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    budgets = 0.02 + 0.08 * torch.rand(L, hq, generator=g)
    budgets[torch.rand(L, hq, generator=g) < 0.3] = 0.0
    sizes = torch.where(torch.rand(L, hkv, generator=g) < 0.5, 16, 32).to(torch.int32)
    return fluxion.HeadTable(budgets, sizes)


def fluxion_config(mode: str, cfg, a) -> fluxion.FluxionConfig:
    common = dict(decode_backend=a.backend, cuda_graphs=False if a.no_graphs else None, cpu_threads=a.cpu_threads)
    if mode == "full":
        return fluxion.FluxionConfig(mode="full", **common)
    if mode.startswith(("fixed", "share")):
        bs, budget = mode[5:].split("-")
        # share: every step shares the queue (device_policy 'shared'), to measure the work sharing itself.
        return fluxion.FluxionConfig(mode="fixed" if mode.startswith("fixed") else "fluxion", block_size=int(bs),
                                     budget=float(budget), **common,
                                     **({} if mode.startswith("fixed") else {"device_policy": "shared"}))
    return fluxion.FluxionConfig(mode="fluxion", head_table=synthetic_table(cfg, a.table_seed), **common)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefill(model, ids, cache, a):
    """Prefill `ids` into `cache`; returns (first next token [B, 1], seconds, peak GPU bytes)."""
    t = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(a.device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else 0
    return out.logits[:, -1:].argmax(-1), seconds, peak


def time_steps(step, nxt, a, after_warmup=lambda: None):
    """Times a.steps greedy decode steps after a.warmup; step(token [B, 1], index) -> logits [B, 1, V]."""
    times = []
    for i in range(a.warmup + a.steps):
        sync(a.device)
        t = time.perf_counter()
        nxt = step(nxt, i)[:, -1:].argmax(-1)
        sync(a.device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
        if i + 1 == a.warmup:
            after_warmup()
    return times


@torch.no_grad()
def run_fluxion_modes(model, modes, ids, a, measure_host):
    """Times the Fluxion `modes` on one Fluxion cache of the prompt: it is prefilled once, and each mode switches
    the live cache's decode policy (runtime.reconfigure), since the stored K/V do not depend on the mode. The modes
    take turns in a.rounds rounds of a.warmup + a.steps steps each: the host's read speed drifts by 20-30% within
    minutes on the H200 box, and rounds let the drift hit every mode alike, so their ratios stay fair.
    measure_host() is called after each mode's turn (the streaming read that mode's roofline uses).
    Returns {mode: (times, prefill s, peak GPU bytes, stats, host read GB/s around its turns)}."""
    configs = {m: fluxion_config(m, model.config, a) for m in modes}
    fluxion.enable(model, configs[modes[0]])
    try:
        cache = fluxion.new_cache(model)
        nxt, prefill_s, peak = prefill(model, ids, cache, a)
        share = huge_page_share(cache.runtime.store.pages())
        if share is not None:
            print(f"# host store after prefill: {share:.0%} of its resident memory on huge pages", flush=True)
        rt = cache.runtime
        rt.timeline = True  # the attention's time on the GPU's clock (attention_step)

        def step(tok, i):  # on a GPU, fluxion.enable runs this through the CUDA-graph segments (cuda_graphs)
            return model(input_ids=tok, past_key_values=cache, use_cache=True).logits

        times = {m: [] for m in modes}
        parts = {m: [] for m in modes}
        host = {m: [] for m in modes}
        host_prev = measure_host()
        for _ in range(a.rounds):
            for m in modes:
                rt.reconfigure(configs[m])
                rt.reset_stats()
                times[m] += time_steps(step, nxt, a, after_warmup=rt.reset_stats)
                parts[m].append(rt.stats())
                host_next = measure_host()
                host[m].append((host_prev + host_next) / 2)
                host_prev = host_next
        if a.profile:
            for m in modes:
                rt.reconfigure(configs[m])
                profile_steps(step, nxt, a, f"{m}-{ids.shape[1]}-b{ids.shape[0]}")
    finally:
        fluxion.disable(model)
    return {m: (times[m], prefill_s, peak, merge_stats(parts[m]), statistics.mean(host[m])) for m in modes}


def merge_stats(parts: list[dict]) -> dict:
    """One mode's runtime stats over its turns (run_fluxion_modes): totals add up, per-step means are taken over
    all its steps, and the GPU idle ratio is weighted by each turn's retrieval time."""
    if len(parts) == 1:
        return parts[0]
    total = {k: sum(p[k] for p in parts) for k, v in parts[0].items()
             if isinstance(v, (int, float)) and k != "gpu_idle_ratio"}
    n = max(total.get("decode_steps", 0), 1)
    per_keys = parts[0]["per_step"].keys()
    out = dict(total, per_step={k: total[k] / n for k in per_keys if k in total}, store=parts[-1].get("store"))
    if "gpu_idle_ratio" in parts[0]:
        weight = [p.get("retrieval_s", 0.0) for p in parts]
        out["gpu_idle_ratio"] = (sum(w * p["gpu_idle_ratio"] for w, p in zip(weight, parts)) / sum(weight)
                                 if sum(weight) > 0 else parts[-1]["gpu_idle_ratio"])
    return out


def profile_steps(step, nxt, a, name: str, steps: int = 3):
    """torch.profiler over a few decode steps: host-side op table (self CPU time) and a Chrome trace in
    a.profile, to see where a step's host time goes between the graph segments."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    os.makedirs(a.profile, exist_ok=True)
    with profile(activities=acts) as prof:
        for i in range(steps):
            nxt = step(nxt, i)[:, -1:].argmax(-1)
        sync(a.device)
    prof.export_chrome_trace(os.path.join(a.profile, f"{name}.trace.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(os.path.join(a.profile, f"{name}.ops.txt"), "w") as f:
        f.write(table)
    print(f"profile of {steps} steps ({name}):\n" + "\n".join(table.splitlines()[:25]))


@torch.no_grad()
def run_hf(model, mode, ids, a):
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    cache = DynamicCache(offloading=True) if mode == "hf-offload" else DynamicCache()
    nxt, prefill_s, peak = prefill(model, ids, cache, a)
    times = time_steps(lambda tok, i: model(input_ids=tok, past_key_values=cache, use_cache=True).logits, nxt, a)
    return times, prefill_s, peak, {}


@torch.no_grad()
def graph_floor(model, batch: int, context: int, a):
    """Median time of one whole decode step captured in a CUDA graph (HF StaticCache, sdpa)."""
    from transformers import StaticCache

    model.set_attn_implementation("sdpa")
    dev = a.device
    cache = StaticCache(config=model.config, max_cache_len=context + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    pos = torch.full((1,), context, dtype=torch.long, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
    # transformers 5.x StaticLayer advances its own `cumulative_length` tensor inside the graph: rewind it
    # before each replay so every step writes slot `context` (4.57 indexes by cache_position instead).
    counters = [t for t in (getattr(l, "cumulative_length", None) for l in getattr(cache, "layers", []))
                if isinstance(t, torch.Tensor)]
    times = []
    for _ in range(a.steps + a.warmup):
        for c in counters:
            c.fill_(context)
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[a.warmup:])


def attention_step(mode: str, per: dict, stats: dict, host_bw: float, pcie_bw: float, tpot: float,
                   floor: float | None, both_bw: float | None = None, layers: int = 0) -> dict:
    """The attention step of one decode step (all layers) against the roofline of the devices it uses:
    bytes touched / host-read GB/s for 'fixed' (CPU retrieval only), bytes / (host-read + PCIe GB/s) otherwise,
    the PCIe term weighted by the share of the `layers` layer steps that did not run on the CPU alone
    (device_policy 'auto' leaves the GPU out where that reads faster: per-step cpu_alone_steps).
    Its time, where the steps ran through the CUDA-graph segments, is measured on the GPU's clock
    (runtime.timeline, source 'gpu-clock'): per layer, from the end of the segment that produced q to the start of
    the next one. That is everything the attention costs the step, waits for the host included, and the segments'
    spans (segments_gpu_ms) are the model's own work. The C++ step's host timers give attention_host_ms: step_s
    less model_wait_s (the shared step's wait for q, i.e. for the model's segment). That counts the host work a
    step does before its wait (planning, launches) though the GPU is still running the segment then, and misses
    the host's way back to the next segment's launch after the merge. Without the GPU clock, the attention time
    is attention_host_ms, and for layer steps that ran on the GPU alone (gpu_alone_steps; their host time is
    only the enqueueing) TPOT minus the whole-step graph floor (which holds the non-attention work).
    of_both_ceiling: the same bytes against the rate both devices reached reading host memory at once
    (combined_read_bandwidth), for the modes that use both."""
    nbytes = per.get("bytes_cpu", 0.0) + per.get("bytes_pcie", 0.0)
    alone = min(1.0, per.get("cpu_alone_steps", 0.0) / layers) if layers else 0.0
    ceiling = host_bw if mode.startswith("fixed") or not pcie_bw else host_bw + pcie_bw * (1.0 - alone)
    roofline = nbytes / (ceiling * 1e9)
    host_step = step = per.get("step_s", 0.0) - per.get("model_wait_s", 0.0)
    source = "step_s"
    if per.get("attention_gpu_s", 0.0) > 0 and per.get("graph_steps", 0) == 0:
        step, source = per["attention_gpu_s"], "gpu-clock"
    elif per.get("gpu_alone_steps", 0) > 0 and floor is not None:
        step, source = max(step, tpot - floor), "tpot-floor"
    elif per.get("graph_steps", 0) > 0:
        # Whole-step graphs leave the host timers empty: without a graph-floor row there is nothing to subtract.
        step, source = (tpot - floor, "tpot-floor") if floor is not None else (float("nan"), "n/a")
    shared_ceiling = (host_bw if mode.startswith("fixed") or not both_bw
                      else host_bw + (max(both_bw, host_bw) - host_bw) * (1.0 - alone))
    of_both = nbytes / (shared_ceiling * 1e9) / step if step > 0 else float("nan")
    # Each side's read rate while it ran its batches (bytes / busy time): how far sharing slows the CPU side.
    def side_rate(nbytes_key, busy_key):
        return per.get(nbytes_key, 0.0) / per[busy_key] / 1e9 if per.get(busy_key, 0.0) > 0 else 0.0

    return dict(attention_ms=step * 1e3, attention_from=source, attention_host_ms=host_step * 1e3,
                segments_gpu_ms=per.get("segments_gpu_s", 0.0) * 1e3, mb_per_step=nbytes / 1e6,
                roofline_ms=roofline * 1e3, of_roofline=roofline / step if step > 0 else float("nan"), of_both_ceiling=of_both,
                gpu_idle_ratio=stats.get("gpu_idle_ratio", 1.0), cpu_side_gbps=side_rate("bytes_cpu", "cpu_busy_s"),
                gpu_side_gbps=side_rate("bytes_pcie", "gpu_busy_s"))


# How attention_step measured the attention time, as printed after it.
ATTENTION_SOURCE = {"gpu-clock": " (GPU clock)", "step_s": " (host timers)", "tpot-floor": " (TPOT - floor)",
                    "n/a": " (n/a: whole-step graphs and no graph-floor row)"}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(GEOMETRIES), default="llama3-8b")
    p.add_argument("--tiny", action="store_true", help="the tiny geometry, 2K context, few steps (smoke test)")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (quicker runs)")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--modes", nargs="+",
                   default=["graph-floor", "full", "fixed16-0.05", "fixed16-0.02", "fluxion", "hf-offload", "hf-gpu"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4,
                   help="untimed steps before each mode's timed ones; a mode's configuration restarts 'fluxion' "
                        "mode's adaptive sharing, which tries both options on its first 4 steps: keep it >= 4")
    p.add_argument("--rounds", type=int, default=1,
                   help="Fluxion modes take turns in this many rounds of --warmup + --steps steps each, on one prefill "
                        "(cancels the host's drift out of their ratios); each turn reconfigures the cache")
    p.add_argument("--floor-context", type=int, default=1024)
    p.add_argument("--backend", choices=["python", "cpp"], default="cpp", help="FluxionConfig.decode_backend")
    p.add_argument("--no-graphs", action="store_true", help="Fluxion modes through HF's eager forward")
    p.add_argument("--no-whole-steps", action="store_true",
                   help="keep Fluxion's attention outside the CUDA graphs even where a step runs on the GPU alone")
    p.add_argument("--table-seed", type=int, default=0)
    p.add_argument("--cpu-threads", type=int, default=None, help="FluxionConfig.cpu_threads (default: all cores but two)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing each Fluxion mode, profile 3 steps (torch.profiler): op table + Chrome trace")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    if a.tiny:
        a.model, a.contexts, a.batch, a.steps, a.warmup = "tiny", [2048], [1, 2], 4, 1
    if a.no_whole_steps:
        from fluxion.graphs import SegmentGraphs

        SegmentGraphs.whole_steps_default = False
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    env = environment()
    print(f"# {env['gpu'] or env['cpu']} | torch {env['torch']} | model {a.model} | backend {a.backend} | "
          f"git {env['git_sha']}")
    model = build_model(a.model, a.layers, a.device, dtype)
    # Ceilings of the attention step, measured in this run: host streaming read on the threads fluxion.enable
    # gives the CPU kernels, and page-locked host -> device copies (PCIe).
    threads = (fluxion.FluxionConfig(cpu_threads=a.cpu_threads).resolved_cpu_threads() if a.device.startswith("cuda")
               else torch.get_num_threads())
    host_bw = host_read_bandwidth(threads, gib=1.0 if a.tiny else 2.0, min_run_time=0.3)["ceiling"]
    pcie_bw = h2d_bandwidth() if a.device.startswith("cuda") else 0.0
    both = combined_read_bandwidth(threads) if a.device.startswith("cuda") and fluxion._C is not None else None
    print(f"ceilings: host read {host_bw:.1f} GB/s ({threads} threads), page-locked H2D {pcie_bw:.1f} GB/s"
          + (f"; both at once {both['total']:.1f} GB/s (CPU {both['cpu']:.1f} + PCIe {both['pcie']:.1f}: the "
             "two share host DRAM)" if both else ""))
    env.update(host_read_gbps=host_bw, h2d_gbps=pcie_bw, cpu_threads=threads,
               both_read_gbps=both["total"] if both else None)
    rows = []
    floors = {}
    if "graph-floor" in a.modes and a.device.startswith("cuda"):
        for b in a.batch:
            floors[b] = graph_floor(model, b, a.floor_context, a)
            print(f"graph floor (whole step in one CUDA graph, {a.floor_context} tokens, batch {b}): "
                  f"{floors[b] * 1e3:.2f} ms")
            rows.append(dict(mode="graph-floor", batch=b, context=a.floor_context, tpot_p50_ms=floors[b] * 1e3))
    print(f"{'mode':<14} {'ctx':>7} {'B':>2} {'TPOT p50':>9} {'p99':>8} {'prefill s':>9} {'peak GiB':>8}  breakdown")
    for ctx in a.contexts:
        for b in a.batch:
            ids = torch.randint(0, model.config.vocab_size, (b, ctx), device=a.device)
            fluxion_modes = [m for m in a.modes if m != "graph-floor" and not m.startswith("hf-")]
            hf_modes = [m for m in a.modes if m.startswith("hf-") and (m != "hf-offload" or a.device.startswith("cuda"))]
            results = {}
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                # The host's read speed drifts within minutes: a Fluxion mode's roofline uses the streaming read
                # measured just before and just after its steps (averaged), not the one from the run's start.
                results = run_fluxion_modes(
                    model, fluxion_modes, ids, a,
                    lambda: host_read_bandwidth(threads, gib=1.0, min_run_time=0.2)["ceiling"]) if fluxion_modes else {}
            except torch.OutOfMemoryError:
                results = {m: None for m in fluxion_modes}
            for mode in fluxion_modes + hf_modes:
                if mode.startswith("hf-"):
                    if a.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        results[mode] = run_hf(model, mode, ids, a) + (host_bw,)
                    except torch.OutOfMemoryError:
                        results[mode] = None
                if results[mode] is None:
                    print(f"{mode:<14} {ctx:>7} {b:>2}  out of GPU memory")
                    rows.append(dict(mode=mode, context=ctx, batch=b, oom=True))
                    continue
                times, prefill_s, peak, stats, host_mode = results[mode]
                p50, p99 = statistics.median(times), pct(times, 0.99)
                per = stats.get("per_step", {}) if stats else {}
                brk = " ".join(f"{k}={v * 1e3:.2f}ms" for k, v in per.items() if k.endswith("_s"))
                attn = (attention_step(mode, per, stats, host_mode, pcie_bw, p50, floors.get(b),
                                       both["total"] if both else None, model.config.num_hidden_layers)
                        if per else {})
                if attn:
                    attn["host_read_gbps"] = host_mode
                clock = (f" (host timers {attn['attention_host_ms']:.2f}ms, model segments "
                         f"{attn['segments_gpu_ms']:.2f}ms)") if attn and attn["attention_from"] == "gpu-clock" else ""
                eff = (f"  | attention {attn['attention_ms']:.2f}ms"
                       f"{ATTENTION_SOURCE[attn['attention_from']]}{clock}, {attn['mb_per_step']:.0f} MB, roofline "
                       f"{attn['roofline_ms']:.2f}ms = {attn['of_roofline']:.0%} ({attn['of_both_ceiling']:.0%} of the "
                       f"both-at-once ceiling), GPU idle "
                       f"{attn['gpu_idle_ratio']:.0%}, whole-step graphs {stats.get('graph_steps', 0)}/"
                       f"{stats.get('decode_steps', 0)} steps, CPU-alone layer steps "
                       f"{stats.get('cpu_alone_steps', 0)}, host read {host_mode:.1f} GB/s, sides read CPU "
                       f"{attn['cpu_side_gbps']:.1f} + GPU {attn['gpu_side_gbps']:.1f} GB/s") if attn else ""
                vs_floor = f"  ({p50 / floors[b]:.2f}x the graph floor)" if b in floors else ""
                line = (f"{mode:<14} {ctx:>7} {b:>2} {p50 * 1e3:>8.2f}ms {p99 * 1e3:>7.2f}ms {prefill_s:>9.2f} "
                        f"{peak / 2**30:>8.2f}{eff}{vs_floor}")
                print(f"{line}\n{'':>16}{brk}" if per else line)
                rows.append(dict(mode=mode, context=ctx, batch=b, tpot_p50_ms=p50 * 1e3, tpot_p99_ms=p99 * 1e3,
                                 prefill_s=prefill_s, peak_gpu_bytes=peak, stats=stats, **attn,
                                 ratio_to_floor=(p50 / floors[b]) if b in floors else None))
                write_rows(a.out, rows, env)  # after every row: a run cut short keeps what it measured
    write_rows(a.out, rows, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
