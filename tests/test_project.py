"""The project's promises outside the kernels: CI runs the README's test command, and the benchmarks
run (as a smoke check) on a machine without a GPU."""
import os
import subprocess
import sys
import tarfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, ".ci", "run")) as f:
        commands = [line.strip() for line in f if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert commands and any("pytest" in c for c in commands)
    assert "\n".join(commands) in readme, "README.md must show exactly the commands .ci/run runs"


def test_importing_lwt_does_not_import_dynamo():
    """torch._dynamo takes ~2.5 s of a 2-core CPU to import: a process that never compiles (a trainer's
    ranks, a script, a test's subprocess) must not pay it for importing lwt's layers, trainer and kernels."""
    code = ("import sys; import lwt.layers, lwt.model, lwt.train_layerwise, lwt.generate, lwt.functional; "
            "import kernels.attention, kernels.mla, kernels.rmsnorm, kernels.swiglu, kernels.cross_entropy; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_the_sdist_carries_every_tracked_file_but_the_measurements(tmp_path):
    """`setup.py sdist` (MANIFEST.in) packs the tests with their helpers, pytest.ini, config.yaml, the
    presets, the examples and the benchmarks: an unpacked sdist runs the README's commands and the suite.
    Left out: the measured CSVs and logs under benchmarks/results/, and .gitignore."""
    pytest.importorskip("setuptools")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist, for one): nothing to compare the sdist with")
    built = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "sdist", "-d",
                            str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (archive,) = tmp_path.glob("lwt-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    measured = ("benchmarks/results/",)
    wanted = {path for path in tracked.stdout.split() if path != ".gitignore"
              and not (path.startswith(measured) and not path.endswith("README.md"))}
    assert not wanted - packed, f"missing from the sdist: {sorted(wanted - packed)}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run_all.py times the real shapes; run it directly")
def test_benchmarks_smoke_check_without_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run_all.py"), "--no-save"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for bench in ("bench_attention", "bench_block", "bench_cross_entropy", "bench_rmsnorm", "bench_swiglu"):
        assert f"{bench}: no CUDA GPU here, so no timings; smoke check of a tiny shape through the Triton interpreter ... ok" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it times the real shapes")
@pytest.mark.parametrize("script", ["diagnose_rmsnorm.py", "residual_cost.py", "tune_mla.py", "tune_rmsnorm.py"])
def test_gpu_only_scripts_exit_0_without_gpu(script):
    """The GPU-only timing scripts the README names say so in one line and exit 0 on a CPU (residual_cost
    used to die on torch.Generator(device="cuda") with a CUDA-library traceback)."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines() == [f"{script[:-3]}: no CUDA GPU here; "
                                               f"{'nothing to tune' if script == 'tune_rmsnorm.py' else 'nothing to time'}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU suite (CI) runs it; on a GPU machine every kernel "
                    "compiles and runs for real, and compile_check's 90 s would come out of the GPU run's budget")
def test_kernels_compile_for_hopper():
    """The interpreter runs kernels as Python and accepts code the compiler rejects (it did: a jit
    helper returning different types from two constexpr branches). Compile one config of every kernel
    variant for sm_90 with triton's own ptxas; no GPU needed. The FP8 GEMMs (the gate/up GEMM forward
    and backward, the dx GEMM) must run on Hopper's FP8 wgmma, not on a fallback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_check.py"), "--quick"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0 and "all compiled" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    fp8 = [line for line in out.stdout.splitlines() if "fp8e4nv weights" in line or "FP8 dx GEMM" in line]
    assert len(fp8) == 5 and all(line.endswith("MMA wgmma.f32.e4m3.e4m3") for line in fp8), "\n".join(fp8)
    # the opt-in TMA forward's warp-specialised configs are split into warp groups (setmaxnreg: " WS"),
    # not compiled as plain loops (triton's Hopper pass leaves a loop it cannot partition as it is)
    tma = [line for line in out.stdout.splitlines() if "attention fwd TMA" in line]
    assert len(tma) == 8 and all(line.endswith(" WS") == ("WS=True" in line) for line in tma), "\n".join(tma)


def test_compile_check_takes_only_the_targets_its_configs_are_written_for():
    """--arch 9 (a typo for 90) aborted inside LLVM; any target outside 80, 86, 89, 90 is refused up front."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_check.py"), "--arch", "9"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "argument --arch: invalid choice: 9 (choose from 80, 86, 89, 90)" in out.stderr


@pytest.mark.parametrize("workers", [None, "2"], ids=["one-process", "xdist"])
def test_test_log_keeps_each_outcome_as_it_lands(tmp_path, workers):
    """LWT_TEST_LOG (tests/conftest.py, set by benchmarks/device_check.sh): one line per test, a failure
    or an error with its traceback (a test file that fails to import too, the run going on past it as
    device_check.sh asks), written once even under xdist (its workers report to the controller). The
    inner run has a config file of its own: nothing from the folders above tmp_path applies."""
    if workers is not None:
        pytest.importorskip("xdist")
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'boom'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skip(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('fixture broke')\n"
        "def test_err(broken): pass\n"
        "@pytest.mark.xfail(reason='known')\n"
        "def test_known(): assert False\n")
    (tmp_path / "test_broken.py").write_text("import a_module_that_is_not_there\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    log = tmp_path / "log.txt"
    env = {**os.environ, "LWT_TEST_LOG": str(log), "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", "pytest.ini", "--rootdir", ".", "-p",
                          "tests.conftest", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                          *(["-n", workers] if workers else []),
                          "test_tiny.py", "test_broken.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = log.read_text().splitlines() if log.exists() else []
    outcomes = sorted(line.split(" (")[0] for line in lines if not line.startswith(" "))
    assert outcomes == ["ERROR test_broken.py", "ERROR test_tiny.py::test_err", "FAILED test_tiny.py::test_bad",
                        "PASSED test_tiny.py::test_ok", "SKIPPED test_tiny.py::test_skip",
                        "XFAIL test_tiny.py::test_known"], "\n".join(lines) + out.stdout[-2000:] + out.stderr[-2000:]
    text = "\n".join(lines)
    assert "AssertionError: boom" in text and "RuntimeError: fixture broke" in text
    assert "a_module_that_is_not_there" in text
