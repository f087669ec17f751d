"""lwt.layers modules: parameters, state_dict compatibility with torch, and the call into the op."""
import pytest
import torch

from kernels import reference
from lwt.layers import RMSNorm
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rmsnorm_layer_matches_reference_and_torch_rmsnorm(monkeypatch, backend, residual):
    """lwt.layers.RMSNorm loads torch.nn.RMSNorm's state_dict and, on either backend, matches the
    float64 reference; torch.nn.RMSNorm in the same dtype is the error yardstick."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    theirs = torch.nn.RMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(96, generator=gen))
    ours = RMSNorm(96, eps=1e-5).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())  # same keys, same shapes
    x = torch.randn(4, 7, 96, generator=gen).to(DEVICE)
    r = torch.randn(4, 7, 96, generator=gen).to(DEVICE) if residual else None
    dy = torch.randn(4, 7, 96, generator=gen).to(DEVICE)

    def run(fn, dtype=None):
        xs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, r) if t is not None]
        y = fn(*xs)
        y = y[0] if isinstance(y, tuple) else y
        return (y, *torch.autograd.grad(y, xs, dy.to(y.dtype)))

    w64 = theirs.weight.detach().double()
    got = run(ours)
    want = run(lambda a, b=None: reference.rms_norm(a, w64, 1e-5, b), torch.float64)
    yardstick = run(lambda a, b=None: theirs(a if b is None else a + b))
    for name, g, e, t in zip(["y", "dx", "dresidual"], got, want, yardstick):
        assert_close(name, g, e, t)
    if residual:
        assert torch.equal(ours(x, r)[1], x + r)


def test_rmsnorm_layer_defaults_and_repr():
    norm = RMSNorm(8)
    assert norm.eps == 1e-6 and list(norm.state_dict()) == ["weight"]
    assert torch.equal(norm.weight, torch.ones(8)) and norm.weight.requires_grad
    assert repr(norm) == "RMSNorm(8, eps=1e-06)"
    assert RMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=0), r"^dim: expected a positive int, got 0"),
    (dict(dim=8.0), r"^dim: expected a positive int, got 8.0"),
    (dict(dim=8, eps=-1.0), r"^eps: expected a finite real number >= 0, got -1.0"),
])
def test_rmsnorm_layer_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMSNorm(**kwargs)


def test_rmsnorm_layer_wrong_width_names_x():
    with pytest.raises(ValueError, match=r"^x: expected a last dim of 8 \(RMSNorm\(8\)\), got shape \(2, 9\)"):
        RMSNorm(8)(torch.randn(2, 9))


def test_rmsnorm_layer_takes_numpy_eps():
    import numpy as np

    assert RMSNorm(8, eps=np.float32(1e-5)).eps == pytest.approx(1e-5)
