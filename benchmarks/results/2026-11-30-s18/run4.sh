#!/usr/bin/env bash
# Session 18 run 4: issue 4's other bars at the session's final runtime (a80c905): the 1K overhead against the
# whole-step graph floor, and `full` against HF's offloaded cache at 128K batch 1 (with fixed, share16 and fluxion).
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
B="timeout 400 python3 benchmarks/bench_decode.py --model llama3-8b --batch 1"
PYTHONPATH=. $B --contexts 1024 --rounds 2 --steps 20 --modes graph-floor fluxion full --out $OUT/l1k.json 2>&1 | grep -v "^#\|dense_s="
echo "1k $(( $(date +%s) - t0 )) s"
PYTHONPATH=. $B --contexts 131072 --rounds 2 --steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion full hf-offload --out $OUT/l128b1.json 2>&1 | grep -v "^#\|dense_s="
echo "done $(( $(date +%s) - t0 )) s"
