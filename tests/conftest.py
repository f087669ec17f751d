"""Test setup. Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which
must be switched on before triton is first imported (kernels are wrapped at decoration time). Kernels are
not autotuned (LWT_AUTOTUNE=0, below) unless the environment says otherwise."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The first launch of each kernel for a new key takes the first launch config that fits instead of timing
# them all (kernels._common.autotuning): on a GPU, one compilation per key instead of one per config, and
# no timing runs. Every config is still checked, forced, by test_launch_configs.py, and one test there
# runs the timed path. (On the interpreter each list has one config: nothing changes.)
os.environ.setdefault("LWT_AUTOTUNE", "0")

import pytest  # noqa: E402

import kernels._common  # noqa: E402  (imports triton: after the switch above)

if kernels._common.interpreting():
    from tests import interpreter_speedup  # noqa: E402

    interpreter_speedup.install()  # skips the interpreter's repeated work at each jit-helper call


def pytest_configure(config):
    import numpy

    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if kernels._common.interpreting() and numpy_version >= (2, 4):  # (see setup.py's pin)
        raise pytest.UsageError(f"triton 3.6's interpreter, which runs the kernels on the CPU, fails with numpy "
                                f">= 2.4 (TypeError: only 0-dimensional arrays can be converted to Python "
                                f"scalars); this environment has numpy {numpy.__version__}: pip install 'numpy<2.4'")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped, with the reason, on CPU-only machines")
    # pytest-xdist's own marker, registered here too for runs without xdist (the CPU suite)
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker, in turn "
                                       "(with --dist loadgroup); the GPU-memory-heavy tests are group 'heavy'")


_TEST_LOG = None  # the file LWT_TEST_LOG names, in the process that writes it


def pytest_sessionstart(session):
    # xdist workers report to the controller, which logs their outcomes: only it (or a run without
    # workers) writes LWT_TEST_LOG
    global _TEST_LOG
    _TEST_LOG = None if hasattr(session.config, "workerinput") else os.environ.get("LWT_TEST_LOG")


def _log_outcome(outcome: str, report) -> None:
    with open(_TEST_LOG, "a") as f:
        f.write(f"{outcome} {report.nodeid} ({getattr(report, 'duration', 0.0):.1f} s)\n")
        if report.failed:
            f.write("".join(f"    {line}\n" for line in report.longreprtext.splitlines()[-60:]))


def pytest_runtest_logreport(report):
    """With LWT_TEST_LOG=<file>, each test's outcome is appended to it as soon as it lands, a failure with
    its traceback (benchmarks/device_check.sh sets it: a run cut off by its time limit keeps what it found,
    where pytest's own summary comes only at the end)."""
    if _TEST_LOG is None or (report.when != "call" and not report.failed and not report.skipped):
        return
    if report.failed and report.when != "call":
        outcome = "ERROR"
    elif hasattr(report, "wasxfail"):
        outcome = "XFAIL" if report.skipped else "XPASS"
    else:
        outcome = report.outcome.upper()
    _log_outcome(outcome, report)


def pytest_collectreport(report):
    """A test file that fails to import: an ERROR in LWT_TEST_LOG too (xdist hands these to the controller)."""
    if _TEST_LOG is not None and report.failed:
        _log_outcome("ERROR", report)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs the compiled kernels at GPU-sized shapes)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every buffer a kernel launcher allocates starts as NaN: an element left unwritten fails."""
    monkeypatch.setattr(kernels._common, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    """On a GPU, each test's cached blocks go back to the driver when it ends: pytest-xdist runs several
    test processes on one GPU, and a caching allocator keeps its peak until it is emptied."""
    yield
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Tests choose LWT_BACKEND themselves; a value in the caller's shell must not leak in."""
    monkeypatch.delenv("LWT_BACKEND", raising=False)
