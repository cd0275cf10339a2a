"""``python -m fluxion info`` prints the build; ``python -m fluxion demo`` runs the demo."""

from __future__ import annotations

import argparse
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info() -> None:
    import torch

    import fluxion

    b = fluxion.build_info()
    print(f"fluxion {fluxion.__version__} (git {b.get('git_sha', '?')})")
    print(f"  built with torch {b.get('torch', '?')}, CUDA kernels compiled: {b.get('with_cuda')}"
          f" (arch {b.get('cuda_arch_list')})")
    print(f"  running torch {b['torch_runtime']}, CUDA kernels registered: {b['cuda_kernels']},"
          f" GPU visible: {torch.cuda.is_available()}")
    print(f"  CPU: {cpu_model()}; SIMD in use: {b['simd']} (supported: {', '.join(b['simd_supported'])})")
    print(f"  threads: {b['threads']} (set with fluxion.set_num_threads or torch.set_num_threads)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fluxion")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the build: torch, CUDA, SIMD level, threads")
    d = sub.add_parser("demo", help="run the demo (see examples/demo.py --help)")
    d.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.cmd == "info":
        info()
        return 0
    from fluxion.demo import main as demo_main

    return demo_main(a.args)


if __name__ == "__main__":
    sys.exit(main())
