#!/usr/bin/env bash
# One prepared GPU session: build with CUDA, run the GPU tests, then the GPU benchmarks, and
# copy what came out to $OUT (the device tool's output folder; default bench/results).
# Usage on a GPU machine whose python has torch, triton, pytest and pytest-benchmark:
#   bash bench/run_gpu.sh
# Optional: TEST_PATHS (default: tests), BENCH_FILTER (pytest -k for bench/, default: cuda),
# BUILD_SECONDS / TEST_SECONDS / BENCH_SECONDS (time limits of each part).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > "$OUT/gpu-machine.txt" 2>&1
timeout ${BUILD_SECONDS:-200} env ETHER_KERNELS_REQUIRE_EXTENSION=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/gpu-build.log" 2>&1
echo "build exit $?" >> "$OUT/gpu-build.log"
tail -1 "$OUT/gpu-build.log"
python3 -c "import json, ether_kernels; print(json.dumps(ether_kernels.info(), indent=1))" > "$OUT/gpu-info.json" 2>&1
timeout ${TEST_SECONDS:-200} python3 -m pytest ${TEST_PATHS:-tests} -q -m gpu -p no:cacheprovider --maxfail=40 > "$OUT/gpu-tests.log" 2>&1
echo "tests exit $?" >> "$OUT/gpu-tests.log"
tail -3 "$OUT/gpu-tests.log"
timeout ${BENCH_SECONDS:-200} python3 -m pytest bench -q -k "${BENCH_FILTER:-cuda}" --benchmark-enable --benchmark-columns=median -p no:cacheprovider > "$OUT/gpu-bench.log" 2>&1
echo "bench exit $?" >> "$OUT/gpu-bench.log"
cp bench/results/cuda-* "$OUT/" 2>/dev/null
tail -3 "$OUT/gpu-bench.log"
