#!/usr/bin/env bash
# Run 5 (device call): the shared step returning before its GPU batches finish (the merge enqueued behind them),
# A/B in one process. The tree gets ab_knob_tail.patch: FLUXION_TAIL=0 restores the old end of the step (the host
# waits for the GPU's batches, then enqueues the merge). Modes suffixed @0 / @1 are timed in turns
# (../2026-11-29-s15/ab_knob.py); fixed16-0.05 has no GPU side, so it runs once, for the sharing ratio.
# Also: the full GPU suite and the Catch2 core tests (run 5; `ab_tail.sh 6` skips them: a second sample in another
# call). Run from the repository root on the GPU machine with OUT set, after `git rev-parse --short HEAD > .sha`.
RUN=${1:-5}
R=benchmarks/results/2026-11-30-s19
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
patch -p1 < $R/ab_knob_tail.patch || exit 1
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
if [ "$RUN" = 5 ]; then
(cmake -S . -B /tmp/cm -DCMAKE_BUILD_TYPE=Release > /tmp/cm.log 2>&1 && cmake --build /tmp/cm -j 8 >> /tmp/cm.log 2>&1 \
  && ctest --test-dir /tmp/cm --timeout 120 2>&1 | tail -3) || tail -20 /tmp/cm.log &
cm=$!
timeout 240 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt
tail -3 $OUT/gpu_suite.txt
wait $cm
echo "suite $(( $(date +%s) - t0 )) s"
fi
MODES="share16-0.05@0 share16-0.05@1 fluxion@0 fluxion@1 fixed16-0.05@1"
ab() {  # tag timeout args...
  local tag=$1 limit=$2; shift 2
  PYTHONPATH=. timeout $limit python3 benchmarks/results/2026-11-29-s15/ab_knob.py FLUXION_TAIL \
    --steps 8 --warmup 4 --modes $MODES "$@" --out $OUT/ab_$tag.json 2>&1 | grep -v "^#\|dense_s="
  echo "$tag $(( $(date +%s) - t0 )) s"
}
ab q32b4 110 --model qwen2.5-7b --contexts 32768 --batch 4 --rounds 3
ab l128b1 120 --model llama3-8b --contexts 131072 --batch 1 --rounds 3
ab l64b4 140 --model llama3-8b --contexts 65536 --batch 4 --rounds 2
echo "done $(( $(date +%s) - t0 )) s"
