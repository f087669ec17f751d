#!/usr/bin/env bash
# One prepared GPU session, run from the repository root:  bash benchmarks/device_check.sh [pytest -k expr]
# The RMSNorm tuning sweep, then bench_rmsnorm with the fastest constants (the full grid unless
# QUICK=1), then the CUDA tests (optionally a -k selection). Logs and the results CSV go to $OUT.
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
quick=(); [ "${QUICK:-0}" = 1 ] && quick=(--quick)
python benchmarks/tune_rmsnorm.py --apply "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
# xdist spreads the many first-call compilations and autotunings over the CPU cores.
python -m pytest -q -p no:warnings -n 8 --timeout 300 ${1:+-k "$1"} 2>&1 | tee "$OUT/pytest.log" | tail -n 8
