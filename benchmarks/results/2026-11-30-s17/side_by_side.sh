#!/usr/bin/env bash
# Runs 3 and 4 (device calls): this tree and, in /tmp/old, the same tree with a67f8b3_merge_into_out.patch reverted
# (the decode step before a67f8b3), built side by side; the GPU suite; then bench_decode on both trees in turns.
#   bash side_by_side.sh 3: Llama 64K batch 1 (old/new twice), Qwen 32K batch 4, then prof_gap.py on this tree
#   bash side_by_side.sh 4: Llama 128K batch 1 (3 rounds), Qwen 32K batch 4
# Runs 3 and 4 themselves measured earlier drafts of a67f8b3 (run4_merge_into_out.patch; run 3's also lacked the
# _decode_cpp trimming in fluxion/runtime.py, and both let GPU-alone steps share the plan slots). Run from the
# repository root on the GPU machine with OUT set, after `git rev-parse --short HEAD > .sha`.
RUN=${1:?usage: side_by_side.sh 3|4}
R=benchmarks/results/2026-11-30-s17
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++
SHA=$(cat .sha)
date; t0=$(date +%s)
mkdir -p /tmp/old && cp -r . /tmp/old/ && (cd /tmp/old && patch -s -R -p1 < $R/a67f8b3_merge_into_out.patch && echo "old tree: before a67f8b3")
(cd /tmp/old && FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/build_old.log 2>&1) &
oldpid=$!
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
wait $oldpid; echo "old build rc $? $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | grep -v "^SKIPPED\|^tests/.* PASSED" | tail -25 > $OUT/gpu_suite.txt; tail -3 $OUT/gpu_suite.txt
echo "suite $(( $(date +%s) - t0 )) s"
bench() {  # tree tag args...
  local tree=$1 tag=$2; shift 2
  (cd $tree && FLUXION_GIT_SHA=$SHA-$tag PYTHONPATH=. timeout 120 python3 benchmarks/bench_decode.py "$@" --out $OUT/$tag.json 2>&1 | grep -v "^#\|dense_s=\|^mode")
  echo "$tag $(( $(date +%s) - t0 )) s"
}
MODES="--steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion"
Q="--model qwen2.5-7b --contexts 32768 --batch 4 --rounds 2 $MODES"
if [ "$RUN" = 3 ]; then
  L="--model llama3-8b --contexts 65536 --batch 1 --rounds 2 $MODES"
  for i in 1 2; do bench /tmp/old old_l64b1_$i $L; bench . new_l64b1_$i $L; done
  bench /tmp/old old_q32b4 $Q; bench . new_q32b4 $Q
  PYTHONPATH=. timeout 70 python3 $R/prof_gap.py --context 65536 --batch 1 --rounds 1
else
  L="--model llama3-8b --contexts 131072 --batch 1 --rounds 3 $MODES"
  bench . new_l128b1 $L; bench /tmp/old old_l128b1 $L
  bench . new_q32b4 $Q; bench /tmp/old old_q32b4 $Q
fi
echo "done $(( $(date +%s) - t0 )) s"
