#!/usr/bin/env bash
# Nsight Compute on the DTW kernels (one launch each): throughput, warp stalls, occupancy.
# Usage on a GPU machine with ncu: bash bench/ncu_dtw.sh > ncu.txt
set -uo pipefail
cd "$(dirname "$0")/.."
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "ncu not found"; exit 0; fi
"$NCU" -k regex:"dtw" --launch-skip 6 --launch-count 3 \
  --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
  python3 bench/profile_dtw.py 256 512 1
