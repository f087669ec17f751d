"""Test setup. Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which
must be switched on before triton is first imported (kernels are wrapped at decoration time)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels._common  # noqa: E402  (imports triton: after the switch above)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped, with the reason, on CPU-only machines")
    # pytest-xdist's own marker, registered here too for runs without xdist (the CPU suite)
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker, in turn "
                                       "(with --dist loadgroup); the GPU-memory-heavy tests are group 'heavy'")


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
