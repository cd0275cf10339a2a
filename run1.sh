set -uo pipefail
export PYTHONUNBUFFERED=1 CXX=/usr/bin/g++
export FLUXION_GIT_SHA=$(cat .sha 2>/dev/null || echo unknown)
t0=$(date +%s)
FLUXION_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1 || { tail -40 $OUT/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
python3 -m fluxion info | tee $OUT/info.txt
timeout 200 python3 -X faulthandler -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_hybrid_runtime.py tests/test_graphs.py tests/test_opcheck.py tests/test_hf.py 2>&1 | tail -8 | tee $OUT/pytest.log
echo "tests done $(( $(date +%s) - t0 )) s"
timeout 60 python3 benchmarks/bench_cpu_task.py --contexts 131072 --budgets 0.05 --block-sizes 16 32 64 --threads 1 15 --layers 3 --min-run-time 0.15 --pin --out $OUT/cpu_task.json 2>&1 | tee $OUT/cpu_task.txt
timeout 120 python3 benchmarks/bench_gpu.py --sections h2d retrieval concurrent --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.txt
echo "gpu bench done $(( $(date +%s) - t0 )) s"
timeout 150 python3 benchmarks/bench_decode.py --model llama3-8b --contexts 1024 --batch 1 --modes graph-floor fluxion full fixed16-0.05 --profile $OUT/prof --out $OUT/dec1k.json 2>&1 | grep -v USDT | tee $OUT/dec1k.txt
echo "1k done $(( $(date +%s) - t0 )) s"
timeout 200 python3 benchmarks/bench_decode.py --model llama3-8b --contexts 131072 --batch 1 --modes full fixed16-0.05 share16-0.05 fluxion --out $OUT/dec128k.json 2>&1 | grep -v USDT | tee $OUT/dec128k.txt
echo "all done $(( $(date +%s) - t0 )) s"
