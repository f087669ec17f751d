"""The benchmarks' GPU code paths, run on the CPU as a dry run.

Without a GPU a bench only runs its smoke check (tests/test_project.py), so the code that times the
providers, measures memory, works out the goal lines and writes the results file would first run on a
GPU machine, where device time is scarce. Here each bench's main() runs as if a GPU were present, on
tiny shapes of CPU tensors: lwt's ops take their reference path, torch.compile is left out, and the
harness's timers call each step and report 1 ms (the numbers mean nothing; the plumbing is what is
checked)."""
import csv
import glob
import importlib
import math
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per bench: module constants that pick its shapes, made tiny (the goal cases among them).
TINY = {
    "bench_attention": dict(QUICK=[(128, (4, 4), 16), (128, (4, 2), 32), (64, (4, 1), 16)], TOKENS=64,
                            GOAL_SEQ=(16, 32), MLA_QUICK=[(4, 16)], MLA_GOAL=(4, 16), MLA_DIMS=(32, 16, 24),
                            tma_gpu=lambda: True),  # the opt-in TMA forward's row too, as on an H100/H200
    "bench_swiglu": dict(QUICK=[(16, 32, 48)], GOAL=(16, 32, 48)),
    "bench_cross_entropy": dict(QUICK=[(16, 100, 32)], GOAL=(16, 100, 32)),
    "bench_rmsnorm": dict(QUICK=((16, 64),), RESIDUAL_CASES=((16, 64),), GOAL_CASE=(16, 64)),
    "bench_block": dict(QUICK=[(1, 16, 64, 4, 2)], GOAL_CASE="1x16x64"),
}
# What each bench must have measured (every lwt provider, and the baseline its goal lines need) and
# how many summary lines it must print.
EXPECTED = {
    # (2 GQA/MHA goal cases + MLA) x 2 masks
    "bench_attention": ({"lwt", "lwt TMA", "SDPA flash (FA2)", "repeat_interleave+SDPA", "eager"}, 6),
    "bench_swiglu": ({"lwt (keep gate/up)", "lwt (recompute)", "lwt (fp8 frozen, keep)",
                      "lwt (fp8 frozen, recompute)", "eager", "torch.compile(eager)"}, 2),
    "bench_cross_entropy": ({"lwt", "lwt (dW in bf16)", "eager", "torch.compile(eager)"}, 2),
    "bench_rmsnorm": ({"lwt", "F.rms_norm", "F.rms_norm(x + r)", "copy (ceiling)", "eager reference"}, 3),  # +1 info
    "bench_block": ({"lwt", "lwt compiled", "torch", "torch compiled"}, 3),
}


def _harness_module(monkeypatch):
    """benchmarks/_harness, imported as the benches import it (benchmarks/ on sys.path)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    return importlib.import_module("_harness")


@pytest.fixture
def dry_run(monkeypatch):
    """The harness as on a GPU machine, with timers that run each step twice and report 1 ms."""
    H = _harness_module(monkeypatch)
    calls = []

    def run(fn, *args, **kwargs):
        fn()
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(H, "HAS_GPU", True)
    monkeypatch.setattr(H, "gpu_name", lambda: "dry run")
    for name in ("bench_ms", "bench_graph_ms", "peak_extra_mib", "peak_transient_mib"):
        monkeypatch.setattr(H, name, run)  # as the real ones, a step that raises raises through them
    monkeypatch.setattr(H, "copy_ms", lambda t: 1.0)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # Inductor on the CPU: minutes, not the point
    return calls


# bench_attention times lwt's kernels pass by pass: in the dry run they get the bench's bf16 inputs through
# the interpreter, whose bf16 dots are wrong (triton#11584), so their exponents may overflow; the numbers
# mean nothing here either way.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("bench", sorted(TINY))
@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run for CPU machines (bench_attention's pass "
                    "breakdown launches kernels on its CPU tensors through the interpreter); a GPU runs the benches")
def test_bench_gpu_path_runs_end_to_end(bench, dry_run, monkeypatch, tmp_path, capsys):
    module = importlib.import_module(bench)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    for name, value in TINY[bench].items():
        assert hasattr(module, name), f"{bench}.{name}"
        monkeypatch.setattr(module, name, value)

    summary = module.main(["--quick", "--results-dir", str(tmp_path)])

    out = capsys.readouterr().out
    providers, n_lines = EXPECTED[bench]
    op = bench.removeprefix("bench_")
    with open(tmp_path / f"{op}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["gpu"] == "dry run" and r["op"] == op and float(r["ms"]) == 1.0 for r in rows)
    assert providers <= {r["provider"] for r in rows}, out
    assert dry_run, "no provider was timed"
    assert len(summary) == n_lines and all(line.startswith(op) for line in summary), summary
    goals = [line for line in summary if "goal" in line]  # the block bench compares, it has no goal
    assert len(goals) == (0 if bench == "bench_block" else 2 if bench == "bench_rmsnorm" else n_lines), summary
    assert all(line.endswith(("-> met", "-> NOT met", "-> Liger not measured")) for line in goals), summary
    # An lwt provider that could not be measured is a failure here, whatever the baselines did.
    labels = [line.split(": not measured (")[0] for line in out.splitlines() if ": not measured (" in line]
    failed = [label for label in labels if "lwt" in label or "fp8" in label]
    assert not failed, "\n".join(failed)
    assert f"appended {len(rows)} rows to" in out
    if bench == "bench_attention":  # each goal line also printed as soon as its case was measured
        assert all(out.count(line + "\n") == 2 for line in summary), out
        # the GQA/MHA goal lines carry the opt-in TMA forward's ratios (the MLA ones have no such path)
        assert sum("; opt-in lwt TMA vs cuDNN fwd n/a, fwd+bwd n/a, vs lwt fwd 1.00x, fwd+bwd 1.00x -> " in line
                   for line in summary) == 4, summary  # (no cuDNN on the CPU)
        # and lwt's passes of each goal case timed one by one, with the configs their autotuners chose
        # (each line printed three times: indented and plain as measured, plain again under the table)
        passes = [line for line in out.splitlines() if " lwt passes: fwd " in line]
        assert len(passes) == 3 * n_lines and all(line.count(" ms") == 4 and line.count(" w1 s1)") == 3
                                                  for line in passes), out


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("only", ["gqa", "mla"])
def test_bench_attention_only_runs_one_kind_of_case(only, dry_run, monkeypatch, tmp_path, capsys):
    """--only gqa / --only mla (device_check.sh mla): the other kind's cases are not run, and this
    kind's goal lines are all there."""
    module = importlib.import_module("bench_attention")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    for name, value in TINY["bench_attention"].items():
        monkeypatch.setattr(module, name, value)
    summary = module.main(["--quick", "--only", only, "--results-dir", str(tmp_path)])
    with open(tmp_path / "attention.csv") as f:
        cases = {r["case"] for r in csv.DictReader(f)}
    is_mla = ["MLA" in case for case in cases]
    assert cases and (all(is_mla) if only == "mla" else not any(is_mla)), cases
    # the MLA goal case under both masks, or the two GQA/MHA goal cases under both
    assert len(summary) == (2 if only == "mla" else 4) and all("goal" in line for line in summary), summary


@pytest.mark.parametrize("bench", ["bench_cross_entropy", "bench_rmsnorm", "bench_swiglu"])
def test_skipping_the_compiled_baselines_keeps_every_goal(bench, dry_run, monkeypatch, tmp_path, capsys):
    """--skip-compiled-baselines (device_check.sh all): no torch.compile row, and the same goal lines,
    none of them for want of a provider."""
    module = importlib.import_module(bench)
    monkeypatch.setattr(module, "DEVICE", "cpu")
    for name, value in TINY[bench].items():
        monkeypatch.setattr(module, name, value)
    summary = module.main(["--quick", "--skip-compiled-baselines", "--results-dir", str(tmp_path)])
    assert "torch.compile baseline left out (--skip-compiled-baselines)" in capsys.readouterr().out
    with open(tmp_path / f"{bench.removeprefix('bench_')}.csv") as f:
        measured = {r["provider"] for r in csv.DictReader(f)}
    providers, n_lines = EXPECTED[bench]
    assert measured >= providers - {"torch.compile(eager)"} and not any("compile" in p for p in measured)
    goals = [line for line in summary if "goal" in line]
    assert len(summary) == n_lines and goals and not any("not measured" in line and "Liger" not in line
                                                         for line in goals), summary


def test_a_failing_provider_costs_only_its_own_numbers(dry_run, monkeypatch, tmp_path, capsys):
    """A provider that raises (no kernel for the case, out of memory, a compile error) is noted and the
    rest of the bench still runs, every measured row already in the results file."""
    module = importlib.import_module("bench_cross_entropy")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    for name, value in TINY["bench_cross_entropy"].items():
        monkeypatch.setattr(module, name, value)

    def broken(h, w, t):
        raise RuntimeError("no kernel image is available\nsecond line")

    real = module.providers
    monkeypatch.setattr(module, "providers", lambda: {**real(), "eager": broken})
    summary = module.main(["--quick", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "16x100x32 fwd+bwd eager: not measured (RuntimeError: no kernel image is available)" in out
    with open(tmp_path / "cross_entropy.csv") as f:
        measured = {r["provider"] for r in csv.DictReader(f)}
    assert measured - {"Liger-Kernel"} == {"lwt", "lwt (dW in bf16)", "torch.compile(eager)"}  # Liger: if installed
    assert len(summary) == 2 and all(line.endswith("-> NOT met (eager not measured)") for line in summary), summary


def test_bad_options_stop_before_any_bench_runs(dry_run, capsys):
    """run_all checks its options (those every bench takes) first: one that only some bench takes, or
    none, fails before the first bench spends GPU time; tune_rmsnorm likewise before its sweep."""
    run_all = importlib.import_module("run_all")
    tune = importlib.import_module("tune_rmsnorm")
    for main, argv in ((run_all.main, ["--plot", "x.png"]), (tune.main, ["--quick"]),
                       (tune.main, ["--apply", "--bogus"])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    captured = capsys.readouterr()
    assert "===" not in captured.out and "tune_rmsnorm on" not in captured.out
    assert "unrecognized arguments: --plot x.png" in captured.err


def test_tune_mla_times_each_forced_config(dry_run, monkeypatch, capsys):
    """tune_mla's GPU path on tiny shapes in fp16 (on a CPU through the interpreter), one config per list:
    every forced launch runs, gives the autotuned launch's gradients, and prints its line."""
    tune = importlib.import_module("tune_mla")
    for name, value in dict(DEVICE="cuda" if torch.cuda.is_available() else "cpu", DTYPE=torch.float16, HEADS=2,
                            SEQ=40, D_NOPE=32, D_ROPE=16, D_V=24, E3F8149_DKDV=[(16, 32, 8, 2, False, False)]).items():
        monkeypatch.setattr(tune, name, value)
    A = tune.A
    monkeypatch.setitem(A._MLA_DKDV_CONFIGS, "mla", [(16, 64, 8, 2, True, False), (16, 64, 8, 2, True, True)])
    monkeypatch.setitem(A._DQ_CONFIGS, "mla", [(64, 32, 8, 2)])
    launched, launch = [], tune.Forced.launch

    def recording(self, grid, *args, **meta):
        launched.append(A.as_entry(self.config))
        launch(self, grid, *args, **meta)

    monkeypatch.setattr(tune.Forced, "launch", recording)
    monkeypatch.setattr(tune.M, "_head_chunks", lambda B, S, H, device: 1)  # both heads in one program
    chunks = []
    mla_bwd = tune.M.mla_bwd
    monkeypatch.setattr(tune.M, "mla_bwd", lambda *a, **k: chunks.append(tune.M._head_chunks(1, 1, 2, None))
                        or mla_bwd(*a, **k))
    bench_ms = tune.H.bench_ms  # the dry run's 1 ms, as 1e-9 ms: TFLOP/s = the products counted, in units
    monkeypatch.setattr(tune.H, "bench_ms", lambda fn, *a, **k: bench_ms(fn, *a, **k) * 1e-9)
    tune.main(["--batches", "1"])
    assert set(launched) == {(16, 64, 8, 2, True, False), (16, 64, 8, 2, True, True), (16, 32, 8, 2, False, False),
                             (64, 32, 8, 2)}
    assert set(chunks) == {1, 2} and tune.M._head_chunks(1, 1, 2, None) == 1  # put back after the split run
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "max |diff|" in line]
    # 3 dK/dV configs, the flattened ones (fused and SPLIT) also with 1 head per program, and 1 dQ config;
    # both masks
    assert len(lines) == 12 and "not measured" not in out, out
    assert sum(", 1 head(s) per program:" in line for line in lines) == 4, out
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-2 for line in lines), out
    # products per (query, key, head), times 2 · 40² of them (half under the causal mask): fused dK/dV
    # 2·(2·Dqk + 2·Dv), SPLIT 2·(3·Dqk + 2·Dv) (its dv programs compute the scores again), dQ 2·(2·Dqk + Dv)
    d_qk, d_v = 32 + 16, 24
    for mask, pairs in (("bidirectional", 2 * 40 * 40), ("causal", 40 * 40)):
        tflops = {line.split(": ")[1].split(" 0.000 ms")[0]: int(line.split(" ms, ")[1].split(" TFLOP/s")[0])
                  for line in lines if f"B1 {mask} " in line and "head(s)" not in line}
        assert tflops == {"delta + dK/dV (16, 64, 8, 2, True, False)": 2 * (2 * d_qk + 2 * d_v) * pairs,
                          "delta + dK/dV (16, 64, 8, 2, True, True)": 2 * (3 * d_qk + 2 * d_v) * pairs,
                          "delta + dK/dV (16, 32, 8, 2, False, False)": 2 * (2 * d_qk + 2 * d_v) * pairs,
                          "dQ (64, 32, 8, 2)": 2 * (2 * d_qk + d_v) * pairs}, out
    with pytest.raises(SystemExit):
        tune.main(["--batches", "0"])


def test_tune_mla_helpers_keep_nan_and_put_the_chunking_back(dry_run):
    """_max_diff is NaN where any gradient has a NaN (Python's max() keeps or drops one by its place), and
    _time_with_chunks overrides mla._head_chunks for its timing alone, put back even when that raises."""
    tune = importlib.import_module("tune_mla")
    want = [torch.zeros(3), torch.zeros(0), torch.zeros(2)]
    assert tune._max_diff([torch.tensor([0.0, 0.5, 0.0]), torch.zeros(0), torch.zeros(2)], want) == 0.5
    got = [torch.tensor([0.0, 0.5, 0.0]), torch.zeros(0), torch.tensor([0.0, math.nan])]
    assert math.isnan(tune._max_diff(got, want))
    picks = tune.M._head_chunks
    assert tune._time_with_chunks(5, lambda: tune.M._head_chunks(1, 1, 2, None)) == 5
    assert tune.M._head_chunks is picks
    with pytest.raises(ZeroDivisionError):
        tune._time_with_chunks(3, lambda: 1 / 0)
    assert tune.M._head_chunks is picks


def test_residual_cost_times_both_ways(dry_run, monkeypatch, capsys):
    """residual_cost's GPU path on tiny shapes in fp16 (on a CPU through the interpreter): each pass is
    timed with and without O's residual, and the forward it times keeps the residual only when asked."""
    bench = importlib.import_module("residual_cost")
    for name, value in dict(DEVICE="cuda" if torch.cuda.is_available() else "cpu", DTYPE=torch.float16,
                            GQA=dict(B=1, S=20, H=2, HKV=1, D=16),
                            MLA=dict(B=1, S=20, H=2, DN=16, DR=8, DV=12)).items():
        monkeypatch.setattr(bench, name, value)
    kept, launch = [], bench.A.launch_fwd

    def recording(*args, **kwargs):
        out = launch(*args, **kwargs)
        kept.append(out[2].numel() > 0)
        return out
    monkeypatch.setattr(bench.A, "launch_fwd", recording)
    assert bench.main([]) == 0
    assert bench.A._keeps_residual(True, torch.float16)  # put back after each case
    lines = [line for line in capsys.readouterr().out.splitlines() if "without the residual" in line]
    assert len(lines) == 6 and all(line.endswith("x") for line in lines), lines
    assert True in kept and False in kept


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run for CPU machines; a GPU runs the script itself")
def test_diagnose_rmsnorm_runs_every_section(dry_run, monkeypatch, capsys):
    """diagnose_rmsnorm's GPU path on tiny fp32 CPU tensors, lwt through the interpreter: sections 1-4 measure
    every provider and piece (the CUDA-only calls stubbed), section 5 asks a child process for each capture
    and prints its verdict, or a failed child's last lines. (The children's capture code needs a GPU.)"""
    diag = importlib.import_module("diagnose_rmsnorm")
    monkeypatch.setenv("LWT_BACKEND", "triton")
    for name, value in dict(DEVICE="cpu", DTYPE=torch.float32, SMALL_ROWS=4, BACK_TO_BACK=2, PROFILED_STEPS=2,
                            PIECE_STEPS=2).items():
        monkeypatch.setattr(diag, name, value)
    monkeypatch.setattr(diag, "sync", lambda: None)
    monkeypatch.setattr(diag, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(diag, "profiler_activities", lambda: [torch.profiler.ProfilerActivity.CPU])
    asked = []

    def child(cmd):
        kind = cmd[cmd.index("--capture") + 1]
        asked.append((kind, cmd[cmd.index("--rows") + 1], cmd[cmd.index("--hidden") + 1]))
        if kind == "lwt-bench":
            return 1, "Traceback\n  where\ncapture lwt-bench: FAILED (x)\n"
        if kind == "bench-case":
            return None, "Thread 0x1 (most recent call first):\n  File x\n"  # out of time, stacks dumped
        return 0, f"capture {kind}: ok, 1.000 ms per step replayed\n"
    monkeypatch.setattr(diag, "run_child", child)

    assert diag.main(["--rows", "8", "--hidden", "64"]) == 0

    out = capsys.readouterr().out
    assert "not measured" not in out, out
    timed = [line for line in out.splitlines() if " eager 1.000 | host " in line]
    assert [line.split()[:2] for line in timed] == [["lwt", "leaves"], ["lwt", "bench"], ["F.rms_norm", "leaves"],
                                                    ["F.rms_norm", "bench"]], out
    assert out.count(": 0 synchronizing operation(s)") == 2
    assert "GPU time " in out, out
    section4 = out.split("== 4.")[1].split("== 5.")[0].splitlines()[1:]
    pieces = {line[:46].strip(): float(line[46:].split()[0]) for line in section4}
    assert list(pieces) == ["the whole step", "rms_norm_fwd + rms_norm_bwd (launchers)", "TunedKernel.launch",
                            "triton's InterpretedFunction.run"], out
    assert all(v > 0 for v in pieces.values()), out
    assert asked == [(kind, "8", "64") for kind in diag.CAPTURES]
    assert "capture lwt-leaves: ok, 1.000 ms per step replayed" in out
    assert "capture lwt-bench: FAILED (x)\n  | Traceback\n  |   where\n" in out
    assert "capture bench-case: no answer in time, no verdict\n  | Thread 0x1" in out
    with pytest.raises(SystemExit):
        diag.main(["--rows", "0"])
    for bad in ("0", "6", "1,x", ""):
        with pytest.raises(SystemExit):
            diag.main(["--rows", "8", "--hidden", "64", "--sections", bad])
    capsys.readouterr()
    assert diag.main(["--rows", "8", "--hidden", "64", "--sections", "4,1"]) == 0
    out = capsys.readouterr().out
    assert [line[:5] for line in out.splitlines() if line.startswith("== ")] == ["== 1.", "== 4."], out

    # The children of the kinds that follow bench_rmsnorm's code (the hand-made captures need a GPU).
    monkeypatch.setattr(diag, "CAPTURE_TIMEOUT_S", 900)  # its hang watchdog would end the test process
    monkeypatch.setattr(diag.B, "DEVICE", "cpu")
    for kind in ("lwt-bench", "F.rms_norm-bench", "bench-case"):
        assert diag.main(["--capture", kind, "--rows", "8", "--hidden", "64"]) == 0
    out = capsys.readouterr().out
    assert "capture lwt-bench: ok, 1.000 ms per step replayed (do_bench_cudagraph)" in out, out
    assert "capture F.rms_norm-bench: ok, 1.000 ms per step replayed (do_bench_cudagraph)" in out, out
    assert "capture bench-case: ok, lwt 1.000 ms, F.rms_norm 1.000 ms\n" in out, out


def test_appended_results_do_not_mark_the_tree_dirty(monkeypatch, tmp_path):
    """A bench appending to the tracked benchmarks/results/*.csv leaves the next bench's git sha clean;
    any other change marks it +dirty."""
    import subprocess
    H = _harness_module(monkeypatch)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "op.csv").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git = dict(cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "init", "--allow-empty"], **git)
    subprocess.run(["git", "add", "."], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "files"], **git)
    monkeypatch.setattr(H, "REPO", str(tmp_path))
    monkeypatch.delenv("LWT_GIT_SHA", raising=False)  # device_check.sh sets it for trees copied without .git
    sha = H.git_sha.__wrapped__  # (git_sha caches the first answer for the process)
    (tmp_path / "benchmarks" / "results" / "op.csv").write_text("a\nb\n")
    assert len(sha()) == 12  # no "+dirty"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert sha().endswith("+dirty")


@pytest.fixture
def harness(monkeypatch):
    """benchmarks/_harness as imported by the benches, with a fixed GPU name and commit for its tables."""
    H = _harness_module(monkeypatch)
    monkeypatch.setattr(H, "gpu_name", lambda: "dry run")
    monkeypatch.setattr(H, "git_sha", lambda: "abc")
    return H


def test_report_rows_metrics_and_ratios(harness, capsys):
    """Report.add turns bytes or FLOPs and ms into GB/s or TFLOP/s; ms None adds no row; the table's
    'lwt speedup' is the provider's ms over lwt's in the same case and mode; results_dir None saves nothing."""
    report = harness.Report("op", "bfloat16")
    assert report.add("c", "fwd", "lwt", 2.0, "GB/s", 4e9).value == pytest.approx(2000.0)  # 4 GB in 2 ms
    assert report.add("c", "fwd+bwd", "lwt", 3.0, "TFLOP/s", 6e12).value == pytest.approx(2000.0)  # 6 PFLOP in 3 ms
    report.add("c", "fwd", "eager", 4.0, "GB/s", 4e9)
    report.add("c", "fwd+bwd", "eager", 1.5, "TFLOP/s", 6e12)
    assert report.add("c", "fwd", "broken", None, "GB/s", 4e9) is None
    assert [(r.mode, r.provider) for r in report.rows] == [("fwd", "lwt"), ("fwd+bwd", "lwt"), ("fwd", "eager"),
                                                           ("fwd+bwd", "eager")]
    assert report.ms("c", "fwd+bwd", "lwt") == 3.0 and report.ms("c", "fwd", "broken") is None
    capsys.readouterr()
    assert report.finish(["op: summary"]) == ["op: summary"]
    out = capsys.readouterr().out
    ratios = {tuple(line.split()[1:3]): line.split()[-1] for line in out.splitlines() if line.split()[:1] == ["c"]}
    assert ratios == {("fwd", "lwt"): "1.00x", ("fwd+bwd", "lwt"): "1.00x", ("fwd", "eager"): "2.00x",
                      ("fwd+bwd", "eager"): "0.50x"}, out
    assert out.endswith("op: summary\n") and "appended" not in out


def test_no_save_appends_nothing(dry_run, monkeypatch, tmp_path, capsys):
    """--no-save: the bench prints its rows but writes no results file, even with --results-dir given."""
    module = importlib.import_module("bench_swiglu")
    monkeypatch.setattr(module, "DEVICE", "cpu")
    for name, value in TINY["bench_swiglu"].items():
        monkeypatch.setattr(module, name, value)
    assert len(module.main(["--quick", "--no-save", "--results-dir", str(tmp_path)])) == 2
    assert list(tmp_path.iterdir()) == [] and "appended" not in capsys.readouterr().out


def test_attempt_isolates_any_exception(harness, capsys):
    """attempt() returns None and notes one line for any Exception a provider raises (a Triton compile
    error is no RuntimeError; an AssertionError may have no message); report None: the line is printed."""
    report = harness.Report("op", "bfloat16")
    assert harness.attempt(report, "ok", lambda: 5) == 5

    def raising(e):
        def thunk():
            raise e
        return thunk

    assert harness.attempt(report, "c lwt", raising(AssertionError())) is None
    assert harness.attempt(report, "c eager", raising(KeyError("BLOCK_M"))) is None
    assert report.notes == ["c lwt: not measured (AssertionError: )", "c eager: not measured (KeyError: 'BLOCK_M')"]
    assert harness.attempt(None, "c torch", raising(ValueError("bad shape\nsecond line"))) is None
    assert "  c torch: not measured (ValueError: bad shape)\n" in capsys.readouterr().out


def test_time_and_memory_measures_the_asked_peak_of_timed_providers_only(harness, monkeypatch):
    """transient=True measures peak_transient_mib, else peak_extra_mib; a provider whose timing failed
    is not run again for its memory (it would fail again, or cost device time for nothing)."""
    measured = []
    monkeypatch.setattr(harness, "bench_ms", lambda step: step() or 1.0)
    monkeypatch.setattr(harness, "peak_extra_mib", lambda step: measured.append("extra") or 10.0)
    monkeypatch.setattr(harness, "peak_transient_mib", lambda step: measured.append("transient") or 20.0)
    report, memory = harness.Report("op", "bfloat16"), {}
    harness.time_and_memory(report, "c", "a", lambda: None, 1e12, memory)
    harness.time_and_memory(report, "c", "b", lambda: None, 1e12, memory, transient=True)
    assert memory == {("c", "a"): 10.0, ("c", "b"): 20.0} and measured == ["extra", "transient"]

    def broken():
        raise RuntimeError("CUDA out of memory")

    harness.time_and_memory(report, "c", "broken", broken, 1e12, memory, transient=True)
    assert measured == ["extra", "transient"] and ("c", "broken") not in memory and len(report.rows) == 2
    assert report.notes == ["c fwd+bwd broken: not measured (RuntimeError: CUDA out of memory)"]


def test_no_gpu_smoke_runs_its_check(harness, capsys):
    """Without a GPU a bench's smoke check really runs: 'ok' after it passes, its error when it fails."""
    ran = []
    assert harness.no_gpu_smoke("bench_x", lambda: ran.append(1)) == 0 and ran == [1]
    assert capsys.readouterr().out.endswith("through the Triton interpreter ... ok\n")

    def mismatch():
        raise AssertionError("Tensor-likes are not close!")

    with pytest.raises(AssertionError, match="not close"):
        harness.no_gpu_smoke("bench_x", mismatch)
    assert not capsys.readouterr().out.endswith("ok\n")


def test_run_all_runs_every_bench_and_reports_the_failures(harness, monkeypatch, tmp_path, capsys):
    """run_all runs the benches in name order with its own options, a bench that raises or calls
    sys.exit costs only its own summary, and the exit code is 1 when one failed."""
    import types
    run_all = importlib.import_module("run_all")
    benches = {"bench_a": "import sys\ndef main(argv):\n    sys.exit(3)\n",
               "bench_b": "def main(argv):\n    return [f'b: {argv}']\n",
               "bench_c": "def main(argv):\n    raise RuntimeError('no kernel image')\n",
               "bench_d": "def main(argv):\n    return ['d: ok']\n"}
    for name, code in benches.items():
        (tmp_path / f"{name}.py").write_text(code)
    paths = [str(tmp_path / f"{name}.py") for name in reversed(benches)]
    monkeypatch.setattr(run_all, "glob", types.SimpleNamespace(glob=lambda pattern: list(paths), escape=glob.escape))
    assert run_all.main(["--quick", "--no-save"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("=== bench")] == [f"=== {n} ===" for n in benches]
    assert out.split("=== summary ===\n")[1].splitlines() == [
        "b: ['--quick', '--no-save']", "d: ok",
        "bench_a: FAILED (traceback above)", "bench_c: FAILED (traceback above)"]
    paths[:] = [str(tmp_path / "bench_d.py")]
    assert run_all.main([]) == 0


@pytest.mark.parametrize("factor,verdict", [(2.0, "met"), (0.5, "NOT met")])
def test_goal_lines_read_the_ratios_the_right_way_round(factor, verdict, dry_run, monkeypatch, tmp_path):
    """The dry run times every provider at 1 ms, so every ratio is 1. Here the baselines (eager, Liger,
    F.rms_norm, the copy, SDPA) take `factor` ms against lwt's 1 ms: at 2 lwt is twice as fast (every
    goal met), at 0.5 twice as slow (none met)."""
    H = _harness_module(monkeypatch)
    add = H.Report.add
    baselines = ("eager", "Liger-Kernel", "F.rms_norm", "copy (ceiling)")

    def scaled(self, case, mode, provider, ms, *rest):
        return add(self, case, mode, provider, ms if ms is None or provider not in baselines else ms * factor, *rest)

    monkeypatch.setattr(H.Report, "add", scaled)
    for bench in ("bench_cross_entropy", "bench_rmsnorm"):
        module = importlib.import_module(bench)
        monkeypatch.setattr(module, "DEVICE", "cpu")
        for name, value in TINY[bench].items():
            monkeypatch.setattr(module, name, value)
        goals = [line for line in module.main(["--quick", "--no-save"]) if "goal" in line]
        assert len(goals) == 2, goals
        if verdict == "met":  # Liger, when not installed, leaves the cross-entropy goal unjudged
            assert all(line.endswith(("-> met", "-> Liger not measured")) for line in goals), goals
        else:
            assert all(line.endswith("-> NOT met") for line in goals), goals
    attention = importlib.import_module("bench_attention")
    report = H.Report("attention", "bfloat16")
    for mode in ("fwd", "fwd+bwd"):
        report.add("c", mode, "lwt", 1.0, "TFLOP/s", 1e9)
        for provider in ("SDPA cuDNN", "SDPA flash (FA2)"):
            report.add("c", mode, provider, factor, "TFLOP/s", 1e9)
    lines = attention.summarize(report, ["c"]) + attention.summarize_mla(report, [("c", {"lwt": 1, "SDPA cuDNN": 2})])
    assert all(line.endswith(f"-> {verdict}") for line in lines) and f"fwd {factor:.2f}x (goal 1.0)" in lines[0], lines


def test_bench_attention_labels_the_configs_it_ran(dry_run):
    """bench_attention's pass lines name each kernel's last config: tiles, flattened loops, MLA's split
    dK/dV pass (only GPU lists have SPLIT configs: the dry run never shows one), warps, stages."""
    import triton

    module = importlib.import_module("bench_attention")

    class Ran:
        def __init__(self, **kwargs):
            self.last = triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, **kwargs}, num_warps=8, num_stages=2)

    assert module._config(Ran(FLATTEN=True, SPLIT=True)) == "16x128 flat split w8 s2"
    assert module._config(Ran(FLATTEN=False, SPLIT=True)) == "16x128 split w8 s2"
    assert module._config(Ran(FLATTEN=True, SPLIT=False)) == "16x128 flat w8 s2"
    assert module._config(Ran()) == "16x128 w8 s2"
    none = Ran()
    none.last = None
    assert module._config(none) == "-"


def test_tune_mla_sweeps_the_head_chunks_of_flattened_configs_at_the_largest_batch(dry_run, monkeypatch):
    """Which (config, head chunks) runs tune_mla times, no kernel launched: every config of the "mla" list
    and the e3f8149 baselines at the chunk count mla._head_chunks picks; at the largest batch the flattened
    ones also at 4 heads per program and at 1 (chunk counts above the pick that divide the heads)."""
    tune = importlib.import_module("tune_mla")
    monkeypatch.setattr(tune, "HEADS", 8)
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    for name, value in dict(SEQ=4, D_NOPE=4, D_ROPE=2, D_V=4, DTYPE=torch.float32).items():
        monkeypatch.setattr(tune, name, value)
    monkeypatch.setattr(tune.A, "launch_fwd", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(tune.A, "launch_delta", lambda *a, **k: None)
    monkeypatch.setattr(tune.A, "launch_dq", lambda *a, **k: None)
    monkeypatch.setattr(tune.M, "mla_bwd", lambda *a, **k: (None,) * 4)
    monkeypatch.setattr(tune.M, "_head_chunks", lambda B, S, H, device: 1)
    monkeypatch.setitem(tune.A._MLA_DKDV_CONFIGS, "mla", [(32, 64, 8, 2, True, False), (32, 128, 8, 2, True, True),
                                                           (32, 128, 8, 2, False, True)])
    monkeypatch.setattr(tune, "_time_forced", lambda module, name, entry, run: None)  # (nothing timed, nothing printed)
    timed = []
    monkeypatch.setattr(tune, "_time_with_chunks", lambda n, timing: timed.append(n) or timing())
    flat, nested = [1, 2, 8], [1]  # 8 heads: all in one program (the pick), then 4 per program, and 1
    tune.run_case(1, False, dq_too=True)
    assert timed == flat + flat + nested + nested + nested, timed  # 2 flattened, 1 nested, 2 e3f8149 nested
    timed.clear()
    tune.run_case(1, False, dq_too=False)
    assert timed == [1] * 5, timed
