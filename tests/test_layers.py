"""lwt.layers modules: parameters, state_dict compatibility with torch, and the call into the op."""
import pytest
import torch

from kernels import reference
from lwt.layers import GQAAttention, RMSNorm, RotaryEmbedding
from tests.helpers import grads
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


# ---------------------------------------------------------------------------------------------------
# RotaryEmbedding
# ---------------------------------------------------------------------------------------------------

def _rope_complex(x, offset, theta):
    """RoPE written independently of the module: dims (i, i + D/2) as one complex number, multiplied by
    exp(i · position · theta^(-2i/D)), in float64."""
    B, S, H, D = x.shape
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.arange(offset, offset + S, dtype=torch.float64)
    rot = torch.polar(torch.ones(S, D // 2, dtype=torch.float64), pos[:, None] * freqs[None, :])  # (S, D/2)
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * rot[None, :, None, :].to(x.device)
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("offset", [0, 5000])
def test_rope_matches_complex_rotation(offset):
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(32, theta=500000.0).to(DEVICE)
    q, k = torch.randn(2, 9, 4, 32, generator=gen).to(DEVICE), torch.randn(2, 9, 1, 32, generator=gen).to(DEVICE)
    rq, rk = rope(q, k, offset=offset)
    for got, x in ((rq, q), (rk, k)):
        want = _rope_complex(x, offset, 500000.0)
        assert got.dtype == x.dtype
        assert_close("rope", got, want, want.float())


def test_rope_scores_depend_on_relative_position_only():
    gen = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(16).to(DEVICE)
    q, k = torch.randn(1, 1, 1, 16, generator=gen).to(DEVICE), torch.randn(1, 1, 1, 16, generator=gen).to(DEVICE)
    s1 = (rope.rotate(q, offset=7) * rope.rotate(k, offset=3)).sum()
    s2 = (rope.rotate(q, offset=107) * rope.rotate(k, offset=103)).sum()
    assert abs(s1.item() - s2.item()) < 1e-4 * abs(s1.item()) + 1e-5


def test_rope_cache_grows_and_stays_out_of_state_dict():
    gen = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(8).to(DEVICE)
    x = torch.randn(1, 600, 2, 8, generator=gen).to(DEVICE)
    short = rope.rotate(x[:, :10])
    long = rope.rotate(x)  # grows the table past its first 256 rows
    assert torch.equal(long[:, :10], short)
    assert list(rope.state_dict()) == [] and rope._cos.shape[0] >= 600
    assert rope.rotate(x.half()).dtype == torch.float16


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=7), r"^head_dim: expected an even number"),
    (dict(head_dim=0), r"^head_dim: expected a positive int"),
    (dict(head_dim=8, theta=1.0), r"^theta: expected a finite number > 1"),
    (dict(head_dim=8, theta=float("inf")), r"^theta: expected a finite number > 1"),
])
def test_rope_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(**kwargs)


def test_rope_bad_input():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"^x: expected \(batch, seq, heads, 8\), got \(2, 3, 8\)"):
        rope.rotate(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"^offset: expected an int >= 0, got -1"):
        rope.rotate(torch.randn(1, 3, 1, 8), offset=-1)


# ---------------------------------------------------------------------------------------------------
# GQAAttention
# ---------------------------------------------------------------------------------------------------

def _gqa_by_hand(x, w_qkv, w_out, H, Hkv, D, causal, theta):
    """GQAAttention spelled out in float64 with the reference attention and the complex-number RoPE."""
    B, S, _ = x.shape
    qkv = x @ w_qkv.T
    q = qkv[..., :H * D].reshape(B, S, H, D)
    k = qkv[..., H * D:(H + Hkv) * D].reshape(B, S, Hkv, D)
    v = qkv[..., (H + Hkv) * D:].reshape(B, S, Hkv, D)
    o = reference.attention(_rope_complex(q, 0, theta), _rope_complex(k, 0, theta), v, causal)
    return o.reshape(B, S, H * D) @ w_out.T


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("dims", [pytest.param((64, 4, 2, None), id="d64-H4/2"),
                                  pytest.param((40, 3, 1, 24), id="d40-H3/1-D24")])
def test_gqa_attention_matches_hand_written_float64(monkeypatch, dims, causal):
    """On the Triton path (interpreter on CPU): output and the gradients of x and both projections
    against the same computation written out in float64; the reference backend is the yardstick."""
    d_model, H, Hkv, head_dim = dims
    gen = torch.Generator().manual_seed(3)
    layer = GQAAttention(d_model, H, Hkv, head_dim=head_dim, causal=causal).to(DEVICE)
    D = layer.head_dim
    x = torch.randn(2, 13, d_model, generator=gen).to(DEVICE)
    dy = torch.randn(2, 13, d_model, generator=gen).to(DEVICE)
    w_qkv, w_out = layer.qkv.weight.detach(), layer.out.weight.detach()

    def module(x, wq, wo):
        return torch.func.functional_call(layer, {"qkv.weight": wq, "out.weight": wo}, (x,))

    monkeypatch.setenv("LWT_BACKEND", "triton")
    (y,), g = grads(module, [x, w_qkv, w_out], [dy])
    monkeypatch.setenv("LWT_BACKEND", "reference")
    (y_ref,), g_ref = grads(module, [x, w_qkv, w_out], [dy])
    (y64,), g64 = grads(lambda a, b, c: _gqa_by_hand(a, b, c, H, Hkv, D, causal, 10000.0),
                        [x.double(), w_qkv.double(), w_out.double()], [dy.double()])
    assert_close("y", y, y64, y_ref, reduced_over=13)
    for name, a, e, r in zip(["dx", "dw_qkv", "dw_out"], g, g64, g_ref):
        assert_close(name, a, e, r, reduced_over=2 * 13)


def test_gqa_attention_shapes_and_defaults():
    layer = GQAAttention(64, 8, 2)
    assert layer.head_dim == 8 and not layer.causal
    assert tuple(layer.qkv.weight.shape) == ((8 + 2 * 2) * 8, 64) and layer.qkv.bias is None
    assert tuple(layer.out.weight.shape) == (64, 64)
    assert set(layer.state_dict()) == {"qkv.weight", "out.weight"}
    biased = GQAAttention(32, 2, 2, head_dim=32, bias=True, causal=True)
    assert biased.qkv.bias is not None and tuple(biased.out.weight.shape) == (32, 64)
    y = biased(torch.randn(1, 5, 32))
    assert y.shape == (1, 5, 32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=64, n_heads=6, n_kv_heads=4), r"^n_kv_heads: expected a divisor of n_heads=6, got 4"),
    (dict(d_model=64, n_heads=6, n_kv_heads=3), r"^n_heads: expected a divisor of d_model=64 when head_dim is None"),
    (dict(d_model=64, n_heads=4, n_kv_heads=0), r"^n_kv_heads: expected a positive int, got 0"),
    (dict(d_model=0, n_heads=4, n_kv_heads=4), r"^d_model: expected a positive int, got 0"),
    (dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=15), r"^head_dim: expected an even number <= 256"),
    (dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=512), r"^head_dim: expected an even number <= 256"),
    (dict(d_model=64, n_heads=4, n_kv_heads=2, causal="yes"), r"^causal: expected a bool, got 'yes'"),
    (dict(d_model=64, n_heads=4, n_kv_heads=2, rope_theta=0.5), r"^rope_theta: expected a finite number > 1"),
])
def test_gqa_attention_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GQAAttention(**kwargs)


def test_gqa_attention_bad_input_names_x():
    layer = GQAAttention(32, 4, 2)
    with pytest.raises(ValueError, match=r"^x: expected \(batch, seq, 32\), got \(2, 5, 16\)"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"^x: expected \(batch, seq, 32\), got \(5, 32\)"):
        layer(torch.randn(5, 32))
