#!/usr/bin/env bash
# Session 18 run 3: the committed tree (no knob): full GPU suite, Catch2 core tests (v3 headers), then the headline
# modes at Llama 128K batch 4.
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(cmake -S . -B /tmp/cm -DCMAKE_BUILD_TYPE=Release > /tmp/cm.log 2>&1 && cmake --build /tmp/cm -j 8 >> /tmp/cm.log 2>&1 && ctest --test-dir /tmp/cm 2>&1 | tail -3) || tail -20 /tmp/cm.log &
cm=$!
timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt; tail -3 $OUT/gpu_suite.txt
wait $cm
echo "suite $(( $(date +%s) - t0 )) s"
PYTHONPATH=. timeout 330 python3 benchmarks/bench_decode.py --model llama3-8b --contexts 131072 --batch 4 --rounds 2 --steps 6 --warmup 3 --modes fixed16-0.05 share16-0.05 fluxion --out $OUT/l128b4.json 2>&1 | grep -v "^#\|dense_s="
echo "done $(( $(date +%s) - t0 )) s"
