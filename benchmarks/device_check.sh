#!/usr/bin/env bash
# One prepared GPU session: CUDA tests, then the benchmarks, logs under $OUT (or ./device-out).
# Run from the repository root on a GPU machine:  bash benchmarks/device_check.sh [--tune] [--quick]
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# xdist spreads the many first-call compilations and autotunings over the CPU cores.
python -m pytest -q -p no:warnings -n 8 --timeout 300 2>&1 | tee "$OUT/pytest.log" | tail -n 25
tune=0; bench_args=()
for a in "$@"; do if [ "$a" = --tune ]; then tune=1; else bench_args+=("$a"); fi; done
if [ $tune = 1 ]; then python benchmarks/tune_rmsnorm.py 2>&1 | tee "$OUT/tune.log"; fi
python benchmarks/run_all.py --results-dir "$OUT" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
