#!/usr/bin/env bash
# Runs 3 and 4 (device calls) on the committed tree, no knob. Run from the repository root on the GPU machine with
# OUT set, after `git rev-parse --short HEAD > .sha`.
#   bash bars.sh 3: the full GPU suite and the Catch2 core tests (Catch2 v3 headers there), then fixed, share16
#                   and fluxion at Llama 128K batch 4 (690c2a3)
#   bash bars.sh 4: the 1K overhead against the whole-step graph floor, then fixed, share16, fluxion, full and HF's
#                   offloaded cache at Llama 128K batch 1 (a80c905)
RUN=${1:?usage: bars.sh 3|4}
set -u
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++ FLUXION_GIT_SHA=$(cat .sha)
date; t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
D="python3 benchmarks/bench_decode.py --model llama3-8b"
if [ "$RUN" = 3 ]; then
  (cmake -S . -B /tmp/cm -DCMAKE_BUILD_TYPE=Release > /tmp/cm.log 2>&1 && cmake --build /tmp/cm -j 8 >> /tmp/cm.log 2>&1 \
    && ctest --test-dir /tmp/cm 2>&1 | tail -3) || tail -20 /tmp/cm.log &
  cm=$!
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt
  tail -3 $OUT/gpu_suite.txt
  wait $cm
  echo "suite $(( $(date +%s) - t0 )) s"
  PYTHONPATH=. timeout 330 $D --contexts 131072 --batch 4 --rounds 2 --steps 6 --warmup 3 \
    --modes fixed16-0.05 share16-0.05 fluxion --out $OUT/l128b4.json 2>&1 | grep -v "^#\|dense_s="
else
  PYTHONPATH=. timeout 400 $D --batch 1 --contexts 1024 --rounds 2 --steps 20 --modes graph-floor fluxion full \
    --out $OUT/l1k.json 2>&1 | grep -v "^#\|dense_s="
  echo "1k $(( $(date +%s) - t0 )) s"
  PYTHONPATH=. timeout 400 $D --batch 1 --contexts 131072 --rounds 2 --steps 8 --warmup 4 \
    --modes fixed16-0.05 share16-0.05 fluxion full hf-offload --out $OUT/l128b1.json 2>&1 | grep -v "^#\|dense_s="
fi
echo "done $(( $(date +%s) - t0 )) s"
