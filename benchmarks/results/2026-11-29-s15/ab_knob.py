"""A/B driver for a temporary environment knob (sessions 15–16): bench_decode with modes suffixed @0 (the knob
off: the old behaviour) or @1 (on), timed in turns in one process; each turn sets the knob before the cache is
reconfigured for its mode. The knob itself is a patch applied to the tree (run2_ab_knob.patch: FLUXION_PREWAIT;
../2026-11-30-s16/run1_ab_knob.patch: FLUXION_BG_WRITE).

  PYTHONPATH=. python benchmarks/results/2026-11-29-s15/ab_knob.py FLUXION_BG_WRITE --model llama3-8b \\
      --contexts 65536 --batch 4 --rounds 3 --steps 6 --warmup 4 --modes fixed16-0.05@0 fixed16-0.05@1
"""
import os
import sys

sys.path.insert(0, "benchmarks")
import bench_decode as bd  # noqa: E402
from fluxion.runtime import HybridAttentionRuntime  # noqa: E402

knob, argv = sys.argv[1], sys.argv[2:]
variant = {}
orig_cfg = bd.fluxion_config
orig_reconf = HybridAttentionRuntime.reconfigure


def cfg(mode, c, a):
    base, _, v = mode.partition("@")
    conf = orig_cfg(base, c, a)
    variant[id(conf)] = v or "1"
    return conf


def reconf(self, config):
    os.environ[knob] = variant.get(id(config), "1")
    return orig_reconf(self, config)


bd.fluxion_config = cfg
HybridAttentionRuntime.reconfigure = reconf
sys.exit(bd.main(argv))
