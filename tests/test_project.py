"""The project's promises outside the kernels: CI runs the README's test command, and the benchmarks
run (as a smoke check) on a machine without a GPU."""
import os
import subprocess
import sys

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run_all.py times the real shapes; run it directly")
def test_benchmarks_smoke_check_without_gpu():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run_all.py"), "--no-save"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for bench in ("bench_attention", "bench_block", "bench_cross_entropy", "bench_rmsnorm", "bench_swiglu"):
        assert f"{bench}: no CUDA GPU here, so no timings; smoke check of a tiny shape through the Triton interpreter ... ok" in out.stdout


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
