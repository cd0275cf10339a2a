#!/usr/bin/env bash
# Run 5 (device call): builds this tree and, in /tmp/old, the same tree with run5_pin_ahead.patch reverted; GPU tests; bench_store_growth.py on both. Run from the repository root with OUT set.
exec > >(tee -a $OUT/log.txt) 2>&1
export FLUXION_GIT_SHA=$(cat .sha) PYTHONUNBUFFERED=1 CXX=/usr/bin/g++
date; echo $FLUXION_GIT_SHA; t0=$(date +%s)
mkdir -p /tmp/old && cp -r . /tmp/old/ && (cd /tmp/old && patch -s -R -p1 < benchmarks/results/2026-11-30-s16/run5_pin_ahead.patch && echo "old tree: pin-ahead reverted")
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cd /tmp/old && FLUXION_GIT_SHA=$FLUXION_GIT_SHA-reverted FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build_old.log 2>&1) &
oldpid=$!
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests/test_cuda.py tests/test_store.py -x 2>&1 | tail -3
echo "cuda+store tests $(( $(date +%s) - t0 )) s"
wait $oldpid; echo "old build rc $? $(( $(date +%s) - t0 )) s"
timeout 90 python3 benchmarks/bench_store_growth.py --out $OUT/growth_new.json 2>&1
echo "new bench $(( $(date +%s) - t0 )) s"
(cd /tmp/old && FLUXION_GIT_SHA=$FLUXION_GIT_SHA-reverted timeout 90 python3 benchmarks/bench_store_growth.py --out $OUT/growth_old.json 2>&1)
echo "old bench $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:xdist tests --ignore=tests/test_cuda.py --ignore=tests/test_store.py 2>&1 | tail -3
echo "rest of suite $(( $(date +%s) - t0 )) s"; date
