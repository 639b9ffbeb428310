#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): its JSON and its log go to $OUT (the
# device tool's return folder) or, without one, to the current folder. Extra flags pass through.
#   bash benchmarks/gpu_check.sh                 # one GPU, about 7 minutes, no network
#   bash benchmarks/gpu_check.sh --dry-run       # the same steps on a CPU at tiny sizes
set -o pipefail
out="$(cd "${OUT:-.}" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
