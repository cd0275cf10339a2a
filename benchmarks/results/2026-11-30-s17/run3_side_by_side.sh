#!/usr/bin/env bash
# Run 3 (device call): this tree and, in /tmp/old, HEAD a302eea (the patch reverted); GPU suite, then bench_decode at Llama 64K
# batch 1 (twice, old and new in turns) and Qwen 32K batch 4, then prof_gap.py. Run 3's patch was run 4's without the
# _decode_cpp trimming in fluxion/runtime.py (dtype checks instead of .to, unsqueeze instead of indexing).
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
  (cd $tree && FLUXION_GIT_SHA=$SHA-$tag PYTHONPATH=. timeout 100 python3 benchmarks/bench_decode.py "$@" --out $OUT/$tag.json 2>&1 | grep -v "^#\|dense_s=\|^mode")
  echo "$tag $(( $(date +%s) - t0 )) s"
}
L="--model llama3-8b --contexts 65536 --batch 1 --rounds 2 --steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion"
Q="--model qwen2.5-7b --contexts 32768 --batch 4 --rounds 2 --steps 8 --warmup 4 --modes fixed16-0.05 share16-0.05 fluxion"
for i in 1 2; do bench /tmp/old old_l64b1_$i $L; bench . new_l64b1_$i $L; done
bench /tmp/old old_q32b4 $Q; bench . new_q32b4 $Q
PYTHONPATH=. timeout 70 python3 benchmarks/results/2026-11-30-s17/prof_gap.py --context 65536 --batch 1 --rounds 1
echo "prof $(( $(date +%s) - t0 )) s"
