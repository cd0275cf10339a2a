#!/usr/bin/env bash
# Session 18 run 2: runtime test files after the GPU-start accounting fix, then A/B of FLUXION_GPU_FIRST (0 = old order) in one process.
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
patch -p1 < benchmarks/results/2026-11-30-s18/run2_ab_knob.patch || exit 1
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_hybrid_runtime.py tests/test_graphs.py tests/test_hf.py tests/test_cuda.py 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt; tail -3 $OUT/gpu_suite.txt
echo "suite $(( $(date +%s) - t0 )) s"
AB="timeout 170 python3 benchmarks/results/2026-11-29-s15/ab_knob.py FLUXION_GPU_FIRST"
M="--steps 8 --warmup 4 --modes share16-0.05@0 share16-0.05@1 fluxion@0 fluxion@1 fixed16-0.05@1"
PYTHONPATH=. $AB --model qwen2.5-7b --contexts 32768 --batch 4 --rounds 4 $M --out $OUT/ab_q32b4.json 2>&1 | grep -v "^#\|dense_s="
echo "q32b4 $(( $(date +%s) - t0 )) s"
PYTHONPATH=. $AB --model llama3-8b --contexts 131072 --batch 1 --rounds 4 $M --out $OUT/ab_l128b1.json 2>&1 | grep -v "^#\|dense_s="
echo "l128b1 $(( $(date +%s) - t0 )) s"
PYTHONPATH=. $AB --model llama3-8b --contexts 65536 --batch 4 --rounds 2 $M --out $OUT/ab_l64b4.json 2>&1 | grep -v "^#\|dense_s="
echo "done $(( $(date +%s) - t0 )) s"
