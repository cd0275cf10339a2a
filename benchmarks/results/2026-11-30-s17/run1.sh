#!/usr/bin/env bash
# Run 1 (device call): a checkout of a302eea with run1_fine_timers.patch applied (per-section host timers inside the C++ step,
# reported as fine_* stats); prof_gap.py at Llama 128K batch 1 and Qwen 32K batch 4. Run from the repository root with OUT set,
# after `git apply benchmarks/results/2026-11-30-s17/run1_fine_timers.patch`.
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export FLUXION_GIT_SHA=$(cat .sha)
date; nproc
t=$(date +%s)
CXX=/usr/bin/g++ FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
echo "build $(( $(date +%s) - t )) s"
PYTHONPATH=. python3 benchmarks/results/2026-11-30-s17/prof_gap.py --context 131072 --batch 1
echo "llama done $(( $(date +%s) - t )) s"
PYTHONPATH=. python3 benchmarks/results/2026-11-30-s17/prof_gap.py --model qwen2.5-7b --context 32768 --batch 4
echo "qwen done $(( $(date +%s) - t )) s"
