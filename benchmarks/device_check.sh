#!/usr/bin/env bash
# One prepared GPU session, run from the repository root, in two calls that each fit the 10-minute limit:
#   bash benchmarks/device_check.sh bench   # bench_attention, bench_swiglu, bench_cross_entropy, RMSNorm
#                                           # sweep + bench_rmsnorm, bench_block
#   bash benchmarks/device_check.sh test [pytest -k expr]   # the CUDA tests (xdist over 8 workers)
#   bash benchmarks/device_check.sh train   # the trainer on the GPU: default config, then the 4k-width
#                                           # preset (2 layers, dummy tokens), both with --end_to_end
# Benches run their quick grids unless FULL=1; TUNE=0 skips the RMSNorm sweep. Logs, the results CSVs
# and the attention plot (when matplotlib is there) go to $OUT; the goal lines are printed last.
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-bench}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$what" = test ]; then
  # xdist spreads the many first-call compilations and autotunings over the CPU cores; loadgroup (xdist
  # 2.5+) keeps the GPU-memory-heavy tests (xdist_group "heavy") on one worker, one at a time.
  dist=(); python -m pytest --help 2>/dev/null | grep -q loadgroup && dist=(--dist loadgroup)
  python -m pytest -q -p no:warnings -n 8 "${dist[@]}" --timeout 300 ${2:+-k "$2"} 2>&1 | tee "$OUT/pytest.log" | tail -n 12
  exit 0
fi
if [ "$what" = train ]; then
  # A few steps per phase with the Triton kernels: tokens/s and peak memory per stage beside end-to-end.
  python -m lwt.train_layerwise --config config.yaml --end_to_end --set train.out_dir="$OUT/run-default" \
    --set train.max_steps=40 --set train.joint_steps=20 --set train.warmup_steps=5 2>&1 | tee "$OUT/train_default.log" | tail -n 14
  python -m lwt.train_layerwise --config configs/llama-4k-gqa.yaml --end_to_end --dummy True \
    --set model.n_layers=2 --set train.out_dir="$OUT/run-4k" --set train.max_steps=10 --set train.joint_steps=5 \
    --set train.warmup_steps=2 --set train.cache_sequences=64 --set objective.eval_batches=2 --set data.val_fraction=0.1 \
    2>&1 | tee "$OUT/train_4k.log" | tail -n 12
  exit 0
fi
quick=(--quick); [ "${FULL:-0}" = 1 ] && quick=()
plot=(); python -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/attention.png")
python benchmarks/bench_attention.py "${quick[@]}" "${plot[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_attention.log"
python benchmarks/bench_swiglu.py "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_swiglu.log"
python benchmarks/bench_cross_entropy.py "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_cross_entropy.log"
if [ "${TUNE:-1}" = 1 ]; then
  python benchmarks/tune_rmsnorm.py --apply "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_rmsnorm.log"
else
  python benchmarks/bench_rmsnorm.py "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_rmsnorm.log"
fi
# Last: its two Inductor compilations take the longest, and a call cut short keeps every log above.
python benchmarks/bench_block.py "${quick[@]}" --results-dir "$OUT" 2>&1 | tee "$OUT/bench_block.log"
grep -h "goal\|^block " "$OUT"/bench_*.log | grep -v "^ " | tail -n 40
