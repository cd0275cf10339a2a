"""Run 2's driver: bench_decode with modes suffixed @tN (FluxionConfig.cpu_threads = N for that mode), timed in
turns in one process: does the shared step read faster with fewer CPU threads (the GPU's PCIe reads and the CPU's
share one DRAM)?"""
import sys

sys.path.insert(0, "benchmarks")
import bench_decode as bd  # noqa: E402

orig_cfg = bd.fluxion_config


def cfg(mode, c, a):
    base, _, variant = mode.partition("@t")
    conf = orig_cfg(base, c, a)
    return conf.replace(cpu_threads=int(variant)) if variant else conf


bd.fluxion_config = cfg
sys.exit(bd.main(sys.argv[1:]))
