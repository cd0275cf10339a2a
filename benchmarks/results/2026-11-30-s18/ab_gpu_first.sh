#!/usr/bin/env bash
# Runs 1 and 2 (device calls): A/B of the GPU side's early first launch (690c2a3) in one process. The tree gets
# ab_knob_gpu_first.patch: FLUXION_GPU_FIRST=0 restores the old order (the host waits for q, then the GPU launches).
# Modes suffixed @0 / @1 are timed in turns (../2026-11-29-s15/ab_knob.py).
#   bash ab_gpu_first.sh 1: the full GPU suite; fixed, share16 and fluxion each @0 and @1; 3 rounds
#   bash ab_gpu_first.sh 2: runtime, graph, HF and CUDA test files; share16 and fluxion @0 and @1, fixed @1; 4 rounds
# Run 1 itself measured a draft that counted the GPU side's busy time from the end of the host's prelude (see
# BENCHMARKS.md). Run from the repository root on the GPU machine with OUT set, after
# `git rev-parse --short HEAD > .sha`.
RUN=${1:?usage: ab_gpu_first.sh 1|2}
R=benchmarks/results/2026-11-30-s18
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
patch -p1 < $R/ab_knob_gpu_first.patch || exit 1
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
if [ "$RUN" = 1 ]; then
  TESTS=tests; ROUNDS=3; MODES="fixed16-0.05@0 fixed16-0.05@1 share16-0.05@0 share16-0.05@1 fluxion@0 fluxion@1"
else
  TESTS="tests/test_hybrid_runtime.py tests/test_graphs.py tests/test_hf.py tests/test_cuda.py"; ROUNDS=4
  MODES="share16-0.05@0 share16-0.05@1 fluxion@0 fluxion@1 fixed16-0.05@1"
fi
timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt; tail -3 $OUT/gpu_suite.txt
echo "suite $(( $(date +%s) - t0 )) s"
ab() {  # tag args...
  local tag=$1; shift
  PYTHONPATH=. timeout 170 python3 benchmarks/results/2026-11-29-s15/ab_knob.py FLUXION_GPU_FIRST "$@" \
    --steps 8 --warmup 4 --modes $MODES --out $OUT/ab_$tag.json 2>&1 | grep -v "^#\|dense_s="
  echo "$tag $(( $(date +%s) - t0 )) s"
}
ab q32b4 --model qwen2.5-7b --contexts 32768 --batch 4 --rounds $ROUNDS
ab l128b1 --model llama3-8b --contexts 131072 --batch 1 --rounds $ROUNDS
ab l64b4 --model llama3-8b --contexts 65536 --batch 4 --rounds 2
