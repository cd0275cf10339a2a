#!/usr/bin/env bash
# Session 19 device calls: the attention step on the GPU's clock (runtime.timeline) beside the host timers.
# Run from the repository root on the GPU machine with OUT set, after `git rev-parse --short HEAD > .sha`.
#   bash gpu_clock.sh 1: build, the full GPU suite and the Catch2 core tests (v3 headers there), then the graph
#                        floor, fixed, share16 and fluxion at Qwen 32K batch 4, Llama 128K batch 1 and 64K batch 4
#   bash gpu_clock.sh 2: the same four modes at Llama 128K batch 4
#   bash gpu_clock.sh 3: the 1K overhead against the whole-step graph floor; `full` against HF's offloaded cache at
#                        Llama 128K batch 1
#   bash gpu_clock.sh 4: a second sample, in another call, of run 1's Qwen 32K batch 4 and run 3's 128K pairing
RUN=${1:?usage: gpu_clock.sh 1|2|3|4}
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
M="graph-floor fixed16-0.05 share16-0.05 fluxion"
bench() {  # tag timeout args...
  local tag=$1 limit=$2; shift 2
  PYTHONPATH=. timeout $limit python3 benchmarks/bench_decode.py --steps 8 --warmup 4 --modes $M "$@" \
    --out $OUT/$tag.json 2>&1 | grep -v "^#\|dense_s="
  echo "$tag $(( $(date +%s) - t0 )) s"
}
if [ "$RUN" = 1 ]; then
  (cmake -S . -B /tmp/cm -DCMAKE_BUILD_TYPE=Release > /tmp/cm.log 2>&1 && cmake --build /tmp/cm -j 8 >> /tmp/cm.log 2>&1 \
    && ctest --test-dir /tmp/cm 2>&1 | tail -3) || tail -20 /tmp/cm.log &
  cm=$!
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt
  tail -3 $OUT/gpu_suite.txt
  wait $cm
  echo "suite $(( $(date +%s) - t0 )) s"
  bench q32b4 120 --model qwen2.5-7b --contexts 32768 --batch 4 --rounds 3
  bench l128b1 140 --model llama3-8b --contexts 131072 --batch 1 --rounds 3
  bench l64b4 150 --model llama3-8b --contexts 65536 --batch 4 --rounds 2
elif [ "$RUN" = 2 ]; then
  bench l128b4 480 --model llama3-8b --contexts 131072 --batch 4 --rounds 2
elif [ "$RUN" = 4 ]; then
  bench q32b4 120 --model qwen2.5-7b --contexts 32768 --batch 4 --rounds 3
  M="full hf-offload" bench l128b1full 300 --model llama3-8b --contexts 131072 --batch 1 --rounds 1
else
  M="graph-floor fluxion full" bench l1k 150 --model llama3-8b --contexts 1024 --batch 1 --rounds 3 --steps 20
  M="full hf-offload" bench l128b1full 300 --model llama3-8b --contexts 131072 --batch 1 --rounds 1
fi
echo "done $(( $(date +%s) - t0 )) s"
