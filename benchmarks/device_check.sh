#!/usr/bin/env bash
# One prepared GPU session, run from the repository root. Each call fits the device tool's 10-minute
# limit: every step runs under `timeout`, within BUDGET seconds for the whole call (default 540). Give
# the call ~60 s more than BUDGET (timeout_s 600 for 540): the last step may overrun by its 10 s kill
# grace, and the results are packed after it.
#   bash benchmarks/device_check.sh bench   # bench_attention, bench_swiglu, bench_cross_entropy,
#                                           # bench_rmsnorm (TUNE=1: its launch-constant sweep first), bench_block
#   bash benchmarks/device_check.sh test [pytest -k expr]   # the test suite on the GPU (xdist, WORKERS=12)
#   bash benchmarks/device_check.sh all     # bench (no torch.compile baselines but bench_block's), then
#                                           # the tests with the time left
#   bash benchmarks/device_check.sh train   # the trainer on the GPU: default config, then the 4k-width
#                                           # preset (2 layers, dummy tokens), both with --end_to_end
#   bash benchmarks/device_check.sh layers  # what issues #7-#9 ask of a GPU, in ~6 minutes: the CUDA tests
#                                           # of the model, torch.compile and the trainer (-m cuda), then
#                                           # train, then bench_block (compiled vs eager DecoderBlock step)
#   bash benchmarks/device_check.sh mla [pytest -k expr]  # MLA in ~9 minutes: its CUDA tests (-k mla),
#                                           # bench_attention --only mla, then benchmarks/tune_mla.py
#                                           # --batches ${MLA_BATCHES:-8}: MLA's passes, each launch config
#                                           # forced (its output comes back as tune_mla.log)
#   bash benchmarks/device_check.sh tma [pytest -k expr]  # the opt-in TMA attention forward
#                                           # (LWT_ATTN_TMA), in ~8 minutes: its CUDA tests (-k test_tma),
#                                           # then bench_attention --only gqa, which times it as "lwt TMA"
#   bash benchmarks/device_check.sh diag [pytest -k expr]  # RMSNorm's host time, in ~7 minutes:
#                                           # benchmarks/diagnose_rmsnorm.py (DIAG_SECTIONS, default 1,4:
#                                           # the step times and the host time's pieces; its output comes
#                                           # back as diagnose_rmsnorm.log), bench_rmsnorm --quick, then the
#                                           # kernels' and layers' CUDA tests with the time left
# Benches run their quick grids unless FULL=1; ONLY="attention swiglu" runs just those benches (bench,
# all). Liger-Kernel is installed from .whl/ when a wheel is there (git-ignored: the device tool must
# carry it, carry [".whl"]; see README "Benchmarks").
# Everything is written under WORK (default /tmp/lwt-device, kept across calls on one machine): a log per
# step, the results CSVs (a row is appended as soon as it is measured), the trainer's out_dirs,
# steps.txt (each step's exit code and seconds; 124 or 137: cut by its timeout) and the attention plot
# (with matplotlib). The device tool brings back at most 8 files from $OUT, so after every step $OUT
# gets three: results.tar.gz (WORK without checkpoints and activation caches), steps.txt and
# summary.txt (the goal lines, lwt's attention passes timed apart, the trainer's tables, the tests' counts).
# Outside a git checkout set LWT_GIT_SHA, or the results say "unknown" for the commit. The exit code is 1 if a step failed or was cut.
set -uo pipefail
OUT=${OUT:-device-out}; WORK=${WORK:-/tmp/lwt-device}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # the GPU image promises python3 (the one with torch), not a `python`
what=${1:-bench}
case $what in bench|test|all|train|layers|mla|tma|diag) ;; *) echo "usage: $0 bench|test|all|train|layers|mla|tma|diag [pytest -k expr]" >&2; exit 2 ;; esac
mkdir -p "$OUT" "$WORK"  # (after the usage check: a mistyped group leaves no empty device-out/ behind)
start=$SECONDS
budget=${BUDGET:-540}
failed=0
echo "== $what, $(date -u +%FT%TZ), budget $budget s" >> "$WORK/steps.txt"
stamp=$WORK/.this-call; touch "$stamp"  # summary.txt: only what this call wrote (WORK outlives calls)

# What comes back: the goal lines of the bench logs (and the attention passes' breakdown), the trainer's
# tables, WORK packed, steps.txt.
pack() {
  local logs=() f
  for f in "$WORK"/bench_*.log; do [ "$f" -nt "$stamp" ] && logs+=("$f"); done
  { grep -h "goal\|^block \|for information\| lwt passes: " /dev/null "${logs[@]}" 2>/dev/null | grep -v "^ " |
      awk '!seen[$0]++'
    for table in "$WORK"/run-*/table.txt; do [ "$table" -nt "$stamp" ] && { echo "--- $table"; cat "$table"; }; done
    if [ "$WORK/tests.txt" -nt "$stamp" ]; then  # written as each test lands: complete even when pytest was cut
      echo "--- tests so far: $(grep -v '^ ' "$WORK/tests.txt" | cut -d' ' -f1 | sort | uniq -c | xargs)"
      grep -E "^(FAILED|ERROR) " "$WORK/tests.txt"
    fi
  } > "$OUT/summary.txt"
  tar czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='cache' --exclude='*.tmp*' . 2>/dev/null
  cp "$WORK/steps.txt" "$OUT/steps.txt"
}

# step NAME CAP CMD...: CMD under `timeout` for CAP seconds or what is left of the budget, if less;
# its output to WORK/NAME.log and the terminal; skipped when under 20 s are left.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    echo "$name: skipped, $left s of the budget left" | tee -a "$WORK/steps.txt"
    failed=1
    pack  # $OUT/steps.txt says so too
    return
  fi
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed=1
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $cap s)" | tee -a "$WORK/steps.txt"
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 \
  | tee "$WORK/gpu.txt"
if [ -z "${LWT_GIT_SHA:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "note: no git checkout and LWT_GIT_SHA unset: the results' commit column says 'unknown'"
fi

# Liger-Kernel, a baseline of the benches and of diagnose_rmsnorm, from a carried wheel (no network there)
shopt -s nullglob
wheels=(.whl/liger_kernel-*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ] && ! "$PY" -c "import liger_kernel" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/lwt-site "${wheels[@]}" \
    && export PYTHONPATH=$PYTHONPATH:/tmp/lwt-site
fi

run_tests() {  # run_tests [-k expr] [test files, then pytest options; default: every file, kernels first]
  # xdist spreads the many first-call compilations over the CPU cores (one config per kernel and key:
  # tests/conftest.py sets LWT_AUTOTUNE=0); loadgroup (xdist 2.5+) keeps the GPU-memory-heavy tests
  # (xdist_group "heavy") on one worker, one at a time.
  local opts=(-q -p no:warnings --continue-on-collection-errors)  # one broken file must not stop the rest
  if "$PY" -c "import xdist" 2>/dev/null; then
    opts+=(-n "${WORKERS:-12}")
    # not grep -q: it would exit at the first match, and under pipefail pytest's broken pipe failed the test
    "$PY" -m pytest --help 2>/dev/null | grep loadgroup >/dev/null && opts+=(--dist loadgroup)
  else
    opts+=(-o addopts=-ra)  # pytest.ini's -n 2 needs xdist
  fi
  "$PY" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout 300)
  # The kernels' own tests first (xdist hands tests out roughly in order): a run cut by its limit has
  # covered them. Each outcome lands in WORK/tests.txt at once, a failure with its traceback.
  local first=(tests/test_rmsnorm.py tests/test_attention.py tests/test_mla.py tests/test_swiglu.py
               tests/test_cross_entropy.py tests/test_launch_configs.py tests/test_layers.py tests/test_model.py
               tests/test_compile.py)
  local files=("${first[@]}") f expr=${1:-}
  shift || true
  if [ $# -gt 0 ]; then files=("$@"); else
    for f in tests/test_*.py; do [[ " ${first[*]} " == *" $f "* ]] || files+=("$f"); done
  fi
  rm -f "$WORK/tests.txt"
  # One Inductor compile worker per test process: 12 processes each spawning a pool of 16 would share
  # the 16 cores with Triton's compilations.
  TORCHINDUCTOR_COMPILE_THREADS=1 LWT_TEST_LOG="$WORK/tests.txt" step pytest "${test_cap:-600}" "$PY" -m pytest "${opts[@]}" ${expr:+-k "$expr"} "${files[@]}"
  tail -n 12 "$WORK/pytest.log"
}

if [ "$what" = test ]; then
  run_tests "${2:-}"
  exit $failed
fi
if [ "$what" = mla ]; then
  # MLA's CUDA tests (-k mla: test_mla.py, and test_launch_configs.py's MLA configs forced one by one),
  # the MLA cases of the attention bench, then each config of each pass timed (every config and
  # head-chunk variant compiles its own kernels)
  test_cap=150 run_tests "${2:-mla}" tests/test_mla.py tests/test_launch_configs.py
  step bench_attention 150 "$PY" benchmarks/bench_attention.py --quick --only mla --results-dir "$WORK"
  step tune_mla 500 "$PY" benchmarks/tune_mla.py --batches "${MLA_BATCHES:-8}"
  cp "$WORK/tune_mla.log" "$OUT/tune_mla.log"
  exit $failed
fi
if [ "$what" = tma ]; then
  # The opt-in TMA forward's CUDA tests (each listed config forced, the float64 checks through the
  # backward, the batch entries kept apart; -k test_tma: a bare "tma" also matches "softmax"), then the
  # GQA/MHA cases of the attention bench with its "lwt TMA" row beside lwt's default forward and SDPA
  test_cap=200 run_tests "${2:-test_tma}" tests/test_attention.py
  step bench_attention 300 "$PY" benchmarks/bench_attention.py --quick --only gqa --results-dir "$WORK"
  exit $failed
fi
if [ "$what" = diag ]; then
  step diagnose_rmsnorm 150 "$PY" benchmarks/diagnose_rmsnorm.py --sections "${DIAG_SECTIONS:-1,4}"
  cp "$WORK/diagnose_rmsnorm.log" "$OUT/diagnose_rmsnorm.log"
  step bench_rmsnorm 120 "$PY" benchmarks/bench_rmsnorm.py --quick --skip-compiled-baselines --results-dir "$WORK"
  # (every kernel's launches go through TunedKernel: the tests of all of them, RMSNorm's first)
  test_cap=$((budget - (SECONDS - start))) run_tests "${2:-}" tests/test_rmsnorm.py tests/test_attention.py \
    tests/test_mla.py tests/test_swiglu.py tests/test_cross_entropy.py tests/test_launch_configs.py \
    tests/test_layers.py tests/test_model.py
  cat "$WORK/steps.txt" "$OUT/summary.txt"
  exit $failed
fi
train_caps=(300 300)
if [ "$what" = layers ]; then
  # Issue #7's CUDA layer test, #9's CUDA compile test and #8's trainer test, then what #8 and #9 ask to
  # report: the trainer's tokens/s and peak memory per stage (train, below) and bench_block's step times.
  # Untimed launch configs throughout (one compilation per kernel and key), to fit one call: the
  # trainer's tokens/s and bench_block's times are then those of each list's first config that fits.
  export LWT_AUTOTUNE=0
  echo "layers: LWT_AUTOTUNE=0 (untimed launch configs)" >> "$WORK/steps.txt"
  test_cap=150 run_tests "${2:-}" tests/test_model.py tests/test_compile.py tests/test_train_layerwise.py -m cuda
  train_caps=(100 180)
fi
if [ "$what" = train ] || [ "$what" = layers ]; then
  # A few steps per phase with the Triton kernels: tokens/s and peak memory per stage beside end-to-end.
  # No checkpoint in between (ckpt_every 0); the out_dirs stay in WORK (checkpoints are GBs at 4k width).
  rm -rf "$WORK/run-default" "$WORK/run-4k"
  step train_default "${train_caps[0]}" "$PY" -m lwt.train_layerwise --config config.yaml --end_to_end \
    --set train.out_dir="$WORK/run-default" --set train.max_steps=40 --set train.joint_steps=20 \
    --set train.warmup_steps=5 --set train.ckpt_every=0
  step train_4k "${train_caps[1]}" "$PY" -m lwt.train_layerwise --config configs/llama-4k-gqa.yaml --end_to_end --dummy True \
    --set model.n_layers=2 --set train.out_dir="$WORK/run-4k" --set train.max_steps=10 --set train.joint_steps=5 \
    --set train.warmup_steps=2 --set train.cache_sequences=64 --set objective.eval_batches=2 \
    --set data.val_fraction=0.1 --set train.ckpt_every=0
  if [ "$what" = layers ]; then
    step bench_block 120 "$PY" benchmarks/bench_block.py --quick --results-dir "$WORK"
  fi
  cat "$OUT/summary.txt"
  exit $failed
fi

# bench, and all: there each bench gets 60% of its own limit, and the tests the time left after them;
# the torch.compile baselines that no goal is judged on are left out (their Inductor compilations are
# most of a quick run; ../shared/anchors-h200.md has their numbers)
scale=100; lean=(); [ "$what" = all ] && { scale=60; lean=(--skip-compiled-baselines); }
bench() {
  local name=$1 cap=$2; shift 2
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" ${name#bench_} "* ]] && return
  step "$name" $((cap * scale / 100)) "$@"
}
quick=(--quick); [ "${FULL:-0}" = 1 ] && quick=()
plot=(); "$PY" -c "import matplotlib" 2>/dev/null && plot=(--plot "$WORK/attention.png")
# 360: in `all` (60%) 216 s; at 871b73f on a fresh H200 its GQA cases alone took about 150 s (autotuning
# compiles) and its MLA cases about 45 s more: they were cut at 156 s
bench bench_attention 360 "$PY" benchmarks/bench_attention.py "${quick[@]}" "${plot[@]}" --results-dir "$WORK"
bench bench_swiglu 120 "$PY" benchmarks/bench_swiglu.py "${quick[@]}" "${lean[@]}" --results-dir "$WORK"
bench bench_cross_entropy 120 "$PY" benchmarks/bench_cross_entropy.py "${quick[@]}" "${lean[@]}" --results-dir "$WORK"
if [ "${TUNE:-0}" = 1 ]; then
  bench bench_rmsnorm 150 "$PY" benchmarks/tune_rmsnorm.py --apply "${quick[@]}" "${lean[@]}" --results-dir "$WORK"
else
  bench bench_rmsnorm 90 "$PY" benchmarks/bench_rmsnorm.py "${quick[@]}" "${lean[@]}" --results-dir "$WORK"
fi
# Last among the benches: its two Inductor compilations take the longest.
bench bench_block 150 "$PY" benchmarks/bench_block.py "${quick[@]}" --results-dir "$WORK"
[ "$what" = all ] && run_tests "${2:-}"
cat "$WORK/steps.txt" "$OUT/summary.txt"
exit $failed
