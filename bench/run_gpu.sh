#!/usr/bin/env bash
# One prepared GPU session: build with CUDA, run the GPU tests, the GPU benchmarks and the
# stage profiles, and leave what came out in $OUT (the device tool's output folder; default
# bench/results/gpu-run) as at most 8 files (the device tool returns no more).
# Usage on a GPU machine whose python3 has torch, triton, pytest and pytest-benchmark:
#   bash bench/run_gpu.sh
# Options (environment):
#   SKIP_BUILD=1     no C++/CUDA build: the reference and Triton paths only (enough after a
#                    change to the Triton kernels alone)
#   ETHER_KERNELS_BASELINE_ONLY  default 1 here: the CPU kernels for the x86-64 baseline
#                    alone (the GPU work does not need their AVX2 / AVX-512 copies)
#   SKIP_TESTS=1     no tests (a second call on the still-warm machine, after the build)
#   TEST_PATHS       default: tests;  TEST_FILTER: pytest -k for the tests (default: none)
#   BENCH_FILES      default: bench;  BENCH_FILTER: pytest -k for bench/ (default: cuda)
#   PROFILE_PARTS    default: both stage profiles ("amss", "dtw", "dtw-soft", ...)
#   NCU_SECONDS      > 0: Nsight Compute on the soft-DTW kernels (per-SASS-line stalls)
#   BUILD_SECONDS / TEST_SECONDS / BENCH_SECONDS / PROFILE_SECONDS: time limits of each part
# Measured on an H100 machine: start ~35 s; build 76 s with ETHER_KERNELS_BASELINE_ONLY=1
# (2026-11-27; the full build, its three instruction sets then compiled one after another,
# ran past 200 s); the gpu-marked tests of tests/test_dtw_cuda.py alone take over 80 s (145
# of them in 80 s), every gpu-marked test ~110 s on the Triton paths alone (2026-11-26);
# DTW + AMSS benchmarks ~40 s, both profiles ~25 s. A machine goes back 30 s after a call,
# and a pip editable build keeps nothing between calls: plan one call, e.g.
#   TEST_SECONDS=200 BENCH_FILES="bench/bench_dtw.py bench/bench_amss.py" bash bench/run_gpu.sh
# Lessons of earlier sessions: keep --maxfail (not -x: one failure must not hide the rest),
# run a whole bench file (a filtered run rewrites that family's results with only its
# rows), and put the measurement that matters most first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export ETHER_KERNELS_BASELINE_ONLY=${ETHER_KERNELS_BASELINE_ONLY:-1}
start=$(date +%s)
stamp() { echo "$1 at $(( $(date +%s) - start )) s"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout "${BUILD_SECONDS:-240}" env ETHER_KERNELS_REQUIRE_EXTENSION=1 \
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  stamp "build exit $?" | tee -a "$OUT/build.log"
fi
python3 -c "import json, ether_kernels; print(json.dumps(ether_kernels.info()))" >> "$OUT/machine.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_SECONDS:-200}" python3 -m pytest ${TEST_PATHS:-tests} -q -m gpu \
    ${TEST_FILTER:+-k "$TEST_FILTER"} -p no:cacheprovider --maxfail=40 -rf > "$OUT/tests.log" 2>&1
  stamp "tests exit $?" | tee -a "$OUT/tests.log"
  grep -E "^FAILED|passed|failed" "$OUT/tests.log" | tail -20
fi
timeout "${BENCH_SECONDS:-200}" python3 -m pytest ${BENCH_FILES:-bench} -q -k "${BENCH_FILTER:-cuda}" \
  --benchmark-enable --benchmark-columns=median -p no:cacheprovider > "$OUT/bench.log" 2>&1
stamp "bench exit $?" | tee -a "$OUT/bench.log"
timeout "${PROFILE_SECONDS:-90}" python3 bench/profile_gpu_stages.py ${PROFILE_PARTS:-} > "$OUT/profile.log" 2>&1
stamp "profile exit $?" | tee -a "$OUT/profile.log"
# Nsight Compute, per-SASS-line stalls of the soft kernels
if [ "${NCU_SECONDS:-0}" -gt 0 ]; then
  mkdir -p bench/results/ncu
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    timeout "$NCU_SECONDS" "$NCU" -f -o bench/results/ncu/soft \
      -k regex:"dtw_forward_kernel|soft_dtw_backward" --launch-skip 6 --launch-count 2 \
      --section SpeedOfLight --section WarpStateStats --section SourceCounters \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --import-source yes \
      python3 bench/profile_dtw.py 256 512 4 \
      > bench/results/ncu/run.log 2>&1
    "$NCU" -i bench/results/ncu/soft.ncu-rep > bench/results/ncu/details.txt 2>&1
    "$NCU" -i bench/results/ncu/soft.ncu-rep --page source --print-source sass --csv \
      > bench/results/ncu/source.csv 2>&1
  fi
  CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
  [ -n "$CUOBJDUMP" ] && "$CUOBJDUMP" -sass ether_kernels/_C*.so > bench/results/ncu/sass.txt 2>&1
  stamp "ncu done"
fi
tar czf "$OUT/results.tgz" bench/results/cuda-* bench/results/ncu 2>/dev/null
grep -E "G cells/s|us wall|kernels per step" "$OUT/profile.log"
