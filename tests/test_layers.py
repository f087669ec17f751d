"""lwt.layers modules: parameters, state_dict compatibility with torch, and the call into the op."""
import pytest
import torch

from lwt.layers import RMSNorm
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rmsnorm_layer_matches_torch_rmsnorm(monkeypatch, backend):
    monkeypatch.setenv("LWT_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    ours = RMSNorm(96, eps=1e-5).to(DEVICE)
    theirs = torch.nn.RMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(96, generator=gen))
    theirs.load_state_dict(ours.state_dict())  # same keys, same shapes
    x = torch.randn(4, 7, 96, generator=gen).to(DEVICE)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    dy = torch.randn(4, 7, 96, generator=gen).to(DEVICE)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    assert_close("y", y_ours, y_theirs.double())
    assert_close("dx", x_ours.grad, x_theirs.grad.double())
    assert_close("dweight", ours.weight.grad, theirs.weight.grad.double())


def test_rmsnorm_layer_residual_form():
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(32).to(DEVICE)
    x, r = torch.randn(2, 5, 32, generator=gen).to(DEVICE), torch.randn(2, 5, 32, generator=gen).to(DEVICE)
    y, s = norm(x, r)
    assert torch.allclose(s, x + r)
    assert_close("y", y, norm(x + r).double())


def test_rmsnorm_layer_defaults_and_repr():
    norm = RMSNorm(8)
    assert norm.eps == 1e-6 and list(norm.state_dict()) == ["weight"]
    assert torch.equal(norm.weight, torch.ones(8)) and norm.weight.requires_grad
    assert repr(norm) == "RMSNorm(8, eps=1e-06)"
    assert RMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=0), r"^dim: expected a positive int, got 0"),
    (dict(dim=8.0), r"^dim: expected a positive int, got 8.0"),
    (dict(dim=8, eps=-1.0), r"^eps: expected a real number >= 0, got -1.0"),
])
def test_rmsnorm_layer_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMSNorm(**kwargs)
