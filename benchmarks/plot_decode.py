"""TPOT against context length from bench_decode.py's JSON output (one line per mode; needs matplotlib).

  python benchmarks/plot_decode.py decode.json [more.json ...] --batch 1 --label Llama-3.1-8B --out benchmarks/decode_tpot.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="decode_tpot.png")
    p.add_argument("--label", default="", help="what the title names first, e.g. the model geometry")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, floor, title = defaultdict(dict), None, ""
    for path in a.inputs:
        data = json.load(open(path))
        env = data["env"]
        title = f"{env.get('gpu') or env.get('cpu')}, commit {env.get('git_sha')}"
        for r in data["rows"]:
            if r.get("batch") != a.batch or "tpot_p50_ms" not in r:
                continue
            if r["mode"] == "graph-floor":
                floor = r["tpot_p50_ms"]
            else:
                series[r["mode"]][r["context"]] = r["tpot_p50_ms"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=mode)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label="whole-step CUDA graph, 1K")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("TPOT p50 (ms)")
    ax.set_title(f"{a.label + ' ' if a.label else ''}decode TPOT, batch {a.batch} ({title})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
