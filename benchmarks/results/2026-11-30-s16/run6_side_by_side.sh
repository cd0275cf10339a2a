#!/usr/bin/env bash
# Run 6 (device call): this tree and, in /tmp/old, the same tree with run6_pin_ahead.patch reverted (the store before pinning ahead); bench_store_growth.py on both, twice. Run from the repository root with OUT set.
exec > >(tee -a $OUT/log.txt) 2>&1
export FLUXION_GIT_SHA=$(cat .sha) PYTHONUNBUFFERED=1 CXX=/usr/bin/g++
date; echo $FLUXION_GIT_SHA; t0=$(date +%s)
mkdir -p /tmp/old && cp -r . /tmp/old/ && (cd /tmp/old && patch -s -R -p1 < benchmarks/results/2026-11-30-s16/run6_pin_ahead.patch && echo "old tree: pin-ahead reverted")
(cd /tmp/old && FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build_old.log 2>&1) &
oldpid=$!
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 40 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_store.py tests/test_cuda.py -k "pinned or store or grow" 2>&1 | tail -2
wait $oldpid; echo "old build rc $? $(( $(date +%s) - t0 )) s"
for i in 1 2; do
timeout 45 python3 benchmarks/bench_store_growth.py --growths 1 --out $OUT/growth_new_$i.json 2>&1
(cd /tmp/old && FLUXION_GIT_SHA=$FLUXION_GIT_SHA-reverted timeout 35 python3 benchmarks/bench_store_growth.py --growths 1 --out $OUT/growth_old_$i.json 2>&1)
echo "round $i $(( $(date +%s) - t0 )) s"
done; date
