#!/usr/bin/env bash
# Run 4 (device call): this tree and, in /tmp/old, HEAD a302eea (run4_merge_into_out.patch reverted); GPU suite, then
# bench_decode at Llama 128K batch 1 and Qwen 32K batch 4, new then old. Run from the repository root with OUT set.
exec > >(tee -a $OUT/log.txt) 2>&1
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++
SHA=$(cat .sha)
date; t0=$(date +%s)
mkdir -p /tmp/old && cp -r . /tmp/old/ && (cd /tmp/old && patch -s -R -p1 < benchmarks/results/2026-11-30-s17/run4_merge_into_out.patch && echo "old tree: HEAD")
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
L="--model llama3-8b --contexts 131072 --batch 1 --rounds 3 --steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion"
Q="--model qwen2.5-7b --contexts 32768 --batch 4 --rounds 2 --steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion"
bench . new_l128b1 $L; bench /tmp/old old_l128b1 $L
bench . new_q32b4 $Q; bench /tmp/old old_q32b4 $Q
