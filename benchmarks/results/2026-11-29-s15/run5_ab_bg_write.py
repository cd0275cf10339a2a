"""TEMPORARY (untracked): bench_decode with modes suffixed @0 (wait for q first, old order) or @1 (new order),
timed in turns in one process through the FLUXION_BG_WRITE knob."""
import os, sys
sys.path.insert(0, "benchmarks")
import bench_decode as bd
from fluxion.runtime import HybridAttentionRuntime

variant = {}
orig_cfg = bd.fluxion_config


def cfg(mode, c, a):
    base, _, v = mode.partition("@")
    conf = orig_cfg(base, c, a)
    variant[id(conf)] = v or "1"
    return conf


bd.fluxion_config = cfg
orig_reconf = HybridAttentionRuntime.reconfigure


def reconf(self, config):
    os.environ["FLUXION_BG_WRITE"] = variant.get(id(config), "1")
    return orig_reconf(self, config)


HybridAttentionRuntime.reconfigure = reconf
sys.exit(bd.main(sys.argv[1:]))
