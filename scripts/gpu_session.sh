#!/usr/bin/env bash
# One full session on the GPU machine (device tool): build with CUDA, run every test, run the benchmarks.
# Logs and JSON go to $OUT (default ./gpu_out). Usage: bash scripts/gpu_session.sh [tests|bench|all] [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
what=${1:-all}
quick=${2:-}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node0|L3"
  cat /sys/kernel/mm/transparent_hugepage/enabled
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m fluxion info | tee -a "$OUT/machine.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build/cmake -j 16 >/dev/null \
    && ctest --test-dir build/cmake 2>&1 | tail -3 | tee "$OUT/ctest.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/bench_cpu_task.py $quick --out "$OUT/bench_cpu_task.json" 2>&1 | tee "$OUT/bench_cpu_task.txt"
  python3 benchmarks/bench_gpu.py $quick --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
fi
