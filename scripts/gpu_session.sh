#!/usr/bin/env bash
# A session on the GPU machine (device tool): build with CUDA, run the GPU tests, run the benchmarks.
# Logs and JSON go to $OUT (default ./gpu_out), also packed into $OUT/results.tgz.
#   bash scripts/gpu_session.sh full     # every test and the full sweeps (> 1 h: longer than one device call)
#   bash scripts/gpu_session.sh short    # GPU tests + the reduced sweeps recorded in BENCHMARKS.md (~8 min)
# Set FLUXION_GIT_SHA to the commit being measured: the device's copy of the tree may carry a stale .git, and the
# build info and every result file record this value.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
what=${1:-short}
export PYTHONUNBUFFERED=1
export FLUXION_GIT_SHA=${FLUXION_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# The image's default g++ (/opt/gcc) builds an extension whose C++ exceptions crash the process instead of
# raising; the system compiler does not.
export CXX=${CXX:-/usr/bin/g++}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  lscpu | grep -E "Model name|^CPU\(s\)|L3"
  cat /sys/kernel/mm/transparent_hugepage/enabled
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace \
  > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m fluxion info | tee -a "$OUT/machine.txt"
D="python3 benchmarks/bench_decode.py"
if [ "$what" = full ]; then
  python3 -m pytest -q tests -p no:cacheprovider -p no:xdist 2>&1 | tee "$OUT/pytest.log" | tail -15
  python3 benchmarks/bench_cpu_task.py --pin --out "$OUT/bench_cpu_task.json" 2>&1 | tee "$OUT/bench_cpu_task.txt"
  python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
  $D --model llama3-8b --contexts 1024 --batch 1 4 --modes graph-floor fluxion full fixed16-0.05 \
    --out "$OUT/bench_decode_llama_1k.json" 2>&1 | tee "$OUT/bench_decode_llama_1k.txt"
  $D --model llama3-8b --out "$OUT/bench_decode_llama.json" 2>&1 | tee "$OUT/bench_decode_llama.txt"
  $D --model qwen2.5-7b --batch 4 --out "$OUT/bench_decode_qwen.json" 2>&1 | tee "$OUT/bench_decode_qwen.txt"
else
  # The reduced sweeps of BENCHMARKS.md's 2026-11-29 tables (~8 min).
  timeout 200 python3 -X faulthandler -m pytest -q -p no:cacheprovider -p no:xdist tests/test_cuda.py \
    tests/test_hybrid_runtime.py tests/test_graphs.py tests/test_opcheck.py tests/test_hf.py 2>&1 | tee "$OUT/pytest.log" | tail -5
  timeout 90 python3 benchmarks/bench_cpu_task.py --contexts 131072 --budgets 0.05 --block-sizes 16 \
    --threads 1 14 15 --layers 3 --min-run-time 0.15 --pin --out "$OUT/bench_cpu_task.json" 2>&1 | tee "$OUT/bench_cpu_task.txt"
  timeout 120 python3 benchmarks/bench_cpu_paths.py --threads 15 --layers 6 2>&1 | tee "$OUT/bench_cpu_paths.txt"
  timeout 150 python3 benchmarks/bench_gpu.py --sections h2d retrieval tasks window concurrent \
    --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
  timeout 100 $D --model llama3-8b --contexts 1024 --batch 1 --modes graph-floor fluxion full \
    --out "$OUT/bench_decode_llama_1k.json" 2>&1 | tee "$OUT/bench_decode_llama_1k.txt"
  timeout 300 $D --model llama3-8b --contexts 32768 131072 --batch 1 \
    --modes full fixed16-0.05 share16-0.05 fluxion hf-offload --out "$OUT/bench_decode_llama.json" 2>&1 \
    | tee "$OUT/bench_decode_llama.txt"
fi
# The device tool returns a handful of files: everything also goes back as one archive.
tar czf "$OUT/results.tgz" -C "$OUT" --exclude results.tgz .
