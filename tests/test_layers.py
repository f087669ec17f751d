"""lwt.layers modules: parameters, state_dict compatibility with torch, and the call into the op."""
import copy
import os

import pytest
import torch

from kernels import reference
import lwt.functional as F
from lwt.layers import GQAAttention, MLAAttention, RMSNorm, RotaryEmbedding
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
    (dict(normalized_shape=8, dim=16), r"^dim: expected either normalized_shape or dim \(the same thing\), got both"),
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


def test_layers_take_numpy_sizes_seeds_and_theta():
    """NumPy ints and floats (a sweep's hyperparameters), as torch.nn.Linear and RMSNorm take them: the
    other constructors refused them as not "a positive int". They are stored as Python numbers, and give
    the modules Python ones give."""
    import numpy as np

    from lwt.config import ModelConfig
    from lwt.layers import DecoderBlock, FrozenSwiGLU

    i, theta = np.int64, np.float32(500.0)
    pairs = [
        (lambda: RotaryEmbedding(i(8), theta), lambda: RotaryEmbedding(8, 500.0)),
        (lambda: GQAAttention(i(32), i(4), i(2), head_dim=i(8), rope_theta=theta),
         lambda: GQAAttention(32, 4, 2, head_dim=8, rope_theta=500.0)),
        (lambda: MLAAttention(i(32), i(4), i(8), i(16), i(8), i(4), i(6), rope_theta=theta),
         lambda: MLAAttention(32, 4, 8, 16, 8, 4, 6, rope_theta=500.0)),
        (lambda: FrozenSwiGLU(i(32), i(48), i(3)), lambda: FrozenSwiGLU(32, 48, 3)),
        (lambda: DecoderBlock(i(32), i(4), i(48), n_kv_heads=i(2), frozen_seed=i(3)),
         lambda: DecoderBlock(32, 4, 48, n_kv_heads=2, frozen_seed=3)),
        (lambda: DecoderBlock.from_config(ModelConfig(d_model=32, n_heads=4, d_ff=48), i(2)),
         lambda: DecoderBlock.from_config(ModelConfig(d_model=32, n_heads=4, d_ff=48), 2)),
    ]
    for numpy_made, python_made in pairs:
        torch.manual_seed(0)
        a = numpy_made()
        torch.manual_seed(0)
        b = python_made()
        assert repr(a) == repr(b) and a.state_dict().keys() == b.state_dict().keys()
        for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(t, u), name
        for key, value in vars(a).items():
            assert not isinstance(value, np.generic), (type(a).__name__, key, value)
    x = torch.randn(1, 3, 2, 8)
    torch.testing.assert_close(RotaryEmbedding(8).rotate(x, i(2)), RotaryEmbedding(8).rotate(x, 2), rtol=0, atol=0)
    for bad in (np.int64(0), np.float64(4.0), np.bool_(True)):
        with pytest.raises(ValueError, match=r"^d_model: expected a positive int"):
            GQAAttention(bad, 4, 2)


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


@pytest.mark.parametrize("offset", [0, 5000])
def test_rope_offset_on_the_float64_and_transform_paths(offset):
    """The rotations that do not read the cached table (float64 inputs; inside a torch.func transform,
    as under torch.compile) start at `offset` too."""
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(32, theta=500000.0)
    x = torch.randn(2, 9, 4, 32, generator=gen)
    want = _rope_complex(x, offset, 500000.0)
    torch.testing.assert_close(rope.rotate(x.double(), offset=offset), want, rtol=1e-12, atol=1e-12)
    got = torch.func.vmap(lambda xi: rope.rotate(xi, offset=offset))(x[None])[0]
    assert_close("rope under vmap", got, want, want.float())


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


def test_rope_cache_is_not_a_buffer_so_buffer_averaging_works():
    """The cache's shape follows the longest sequence seen, so it must stay out of buffers(): AveragedModel
    (use_buffers=True) copies and averages buffers pairwise, and DDP's broadcast_buffers broadcasts them
    from rank 0; a copy that has seen shorter sequences failed there with a size mismatch."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    attn = GQAAttention(16, 2, 1)
    ema = AveragedModel(attn, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    attn(torch.randn(1, 300, 16))  # grows attn's table; ema's is still empty
    ema.update_parameters(attn)
    ema.update_parameters(attn)
    assert list(attn.buffers()) == []
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(ema(x), attn(x))



def test_rope_cache_is_not_filled_inside_torch_func_transforms(monkeypatch):
    """A first call under torch.func.grad (the reference path, where the transforms work) used to store
    that transform's wrapper tensors in the cache, after which copy.deepcopy, pickle and torch.save of the
    module failed ("Cannot access storage of TensorWrapper"). The gradients equal autograd's."""
    import io
    import pickle

    monkeypatch.setenv("LWT_BACKEND", "reference")
    attn = GQAAttention(16, 2, 1)
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in attn.named_parameters()}
    g = torch.func.grad(lambda p: torch.func.functional_call(attn, p, (x,)).square().sum())(params)
    copy.deepcopy(attn)
    pickle.dumps(attn)
    torch.save(attn, io.BytesIO())
    attn(x).square().sum().backward()
    for name, p in attn.named_parameters():
        assert torch.equal(g[name], p.grad), name

def test_rope_cache_is_not_filled_under_fake_tensor_mode(monkeypatch):
    """A first call under FakeTensorMode (a memory estimate, non-strict tracing) used to keep fake tables in
    the cache, after which every eager output of the layer was a FakeTensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("LWT_BACKEND", "reference")
    attn, twin = GQAAttention(16, 2, 1), GQAAttention(16, 2, 1)
    twin.load_state_dict(attn.state_dict())
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            attn(mode.from_tensor(x))  # attn's first call
        got, want = attn(x), twin(x)
    assert type(got) is torch.Tensor and torch.equal(got, want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(head_dim=7), r"^head_dim: expected an even number"),
    (dict(head_dim=0), r"^head_dim: expected a positive int"),
    (dict(head_dim=8, theta=1.0), r"^theta: expected a finite number > 1"),
    (dict(head_dim=8, theta=float("inf")), r"^theta: expected a finite number > 1"),
])
def test_rope_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(**kwargs)


def test_rope_theta_set_later_rebuilds_the_table():
    """Setting theta after a call (a larger base to extend the context) rotates with the new base: the
    cached table was kept, and eager calls disagreed with a fresh layer and with torch.compile's own table.
    A bad value is refused as in the constructor."""
    rope = RotaryEmbedding(16)
    x = torch.randn(1, 40, 2, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    rope.rotate(x)  # fills the table from 10000
    rope.theta = 500000
    assert rope.theta == 500000.0 and isinstance(rope.theta, float)
    want = _rope_complex(x, 0, 500000.0)
    assert_close("rope after theta set", rope.rotate(x), want, want.float())
    assert torch.equal(rope.rotate(x), RotaryEmbedding(16, theta=500000.0).to(DEVICE).rotate(x))
    with pytest.raises(ValueError, match=r"^theta: expected a finite number > 1"):
        rope.theta = 0.5
    assert rope.theta == 500000.0


def test_rope_bad_input():
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"^x: expected \(batch, seq, heads, 8\), got \(2, 3, 8\)"):
        rope.rotate(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"^offset: expected an int >= 0, got -1"):
        rope.rotate(torch.randn(1, 3, 1, 8), offset=-1)
    with pytest.raises(ValueError, match=r"^offset: expected an int >= 0, got True"):
        rope.rotate(torch.randn(1, 3, 1, 8), offset=True)  # a bool is not a position


def test_rope_table_grows_by_doubling():
    """The documented growth: at least 256 rows, doubled when a longer sequence arrives (amortised), or
    the length asked when that is longer still."""
    rope = RotaryEmbedding(8)
    for S, rows in ((10, 256), (300, 512), (1200, 1200)):
        rope.rotate(torch.zeros(1, S, 1, 8))
        assert rope._cos.shape[0] == rope._sin.shape[0] == rows, S


def test_rope_table_on_another_device_is_rebuilt_on_the_inputs():
    """A table filled on meta (a shape-only forward of a module built there, which load_state_dict(assign=True)
    leaves in place, the cache being no buffer) is long enough for the next input but on the wrong device:
    rebuilt on the input's."""
    rope = RotaryEmbedding(8, device="meta")
    rope.rotate(torch.empty(1, 5, 1, 8, device="meta"))
    assert rope._cos.is_meta and rope._cos.shape[0] >= 5
    x = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = rope.rotate(x)
    assert got.device == x.device and rope._cos.device == x.device
    assert torch.equal(got, RotaryEmbedding(8).to(DEVICE).rotate(x))


def test_rope_copied_under_inference_mode_still_trains():
    """A RotaryEmbedding deep-copied under torch.inference_mode (it has no parameters: the copy is whole)
    carries an inference-tensor table, which autograd cannot save: the table is rebuilt, and gradients flow."""
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = rope.rotate(x)  # fills the table
    with torch.inference_mode():
        twin = copy.deepcopy(rope)
    assert twin._cos.is_inference()
    leaf = x.clone().requires_grad_()
    got = twin.rotate(leaf)
    got.square().sum().backward()
    assert torch.equal(got.detach(), want) and leaf.grad is not None and not twin._cos.is_inference()


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
    assert biased.out.bias is not None and set(biased.state_dict()) == {"qkv.weight", "qkv.bias", "out.weight",
                                                                         "out.bias"}  # bias: both projections
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


# ---------------------------------------------------------------------------------------------------
# MLAAttention
# ---------------------------------------------------------------------------------------------------

def _mla_layer(q_rank, causal, seed=5):
    torch.manual_seed(seed)
    return MLAAttention(48, 3, q_rank, 32, 16, 8, 24, causal=causal).to(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("q_rank", [0, 24], ids=["plain-Wq", "q-latent"])
def test_mla_layer_matches_float64(monkeypatch, q_rank, causal):
    """Training path on the Triton kernels (interpreter on CPU): output and the gradients of x and of every
    parameter against the same module in float64 on the reference path; fp32 reference as yardstick."""
    layer = _mla_layer(q_rank, causal)
    layer64 = _mla_layer(q_rank, causal).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 13, 48, generator=gen).to(DEVICE)
    dy = torch.randn(2, 13, 48, generator=gen).to(DEVICE)
    names = [n for n, _ in layer.named_parameters()]

    def run(module, backend, x):
        monkeypatch.setenv("LWT_BACKEND", backend)
        params = [p for _, p in module.named_parameters()]
        leaves = [x.detach().requires_grad_()] + params
        y = module(leaves[0])
        return y.detach(), torch.autograd.grad(y, leaves, dy.to(y.dtype))

    y, g = run(layer, "triton", x)
    y_ref, g_ref = run(layer, "reference", x)
    y64, g64 = run(layer64, "reference", x.double())
    assert_close("y", y, y64, y_ref, reduced_over=13)
    for name, a, e, r in zip(["dx"] + names, g, g64, g_ref):
        assert_close(name, a, e, r, reduced_over=2 * 13 * 3)


def _rms(x, w, eps=1e-6):
    """torch's own RMSNorm, not kernels/reference.py's: the layer's reference path runs that one."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)


def _mla_by_hand(layer, x, causal, theta=10000.0):
    """MLAAttention spelled out in float64 from its parameters (DeepSeek-V2 §2.1): q from a plain W_q or
    W_uq · RMSNorm(W_dq x); c = RMSNorm(W_dkv x); [k_nope, v] = W_ukv c; RoPE (the complex-number form) on
    q's rope part per head and on the one shared rope key W_kr x; the reference MLA core; W_o."""
    p = {n: w.detach().double() for n, w in layer.named_parameters()}
    B, S, _ = x.shape
    H, dn, dr, dv, r = layer.n_heads, layer.nope_dim, layer.rope_dim, layer.v_dim, layer.kv_rank
    if layer.q_rank:
        q = _rms(x @ p["q_down.weight"].T, p["q_norm.weight"]) @ p["q_up.weight"].T
    else:
        q = x @ p["q_proj.weight"].T
    q = q.reshape(B, S, H, dn + dr)
    down = x @ p["kv_down.weight"].T
    c = _rms(down[..., :r], p["kv_norm.weight"])
    k_rope = _rope_complex(down[..., None, r:], 0, theta)[:, :, 0]  # (B, S, dr): one per token
    kv = (c @ p["kv_up.weight"].T).reshape(B, S, H, dn + dv)
    q = torch.cat([q[..., :dn], _rope_complex(q[..., dn:], 0, theta)], dim=-1)
    o = reference.mla_attention(q, kv[..., :dn], k_rope, kv[..., dn:], causal)
    return o.reshape(B, S, H * dv) @ p["out.weight"].T


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("q_rank", [0, 24], ids=["plain-Wq", "q-latent"])
def test_mla_layer_matches_hand_written_float64(monkeypatch, q_rank, causal):
    """The layer (float64, reference path, training and absorbed forms) against the computation written
    out from its parameters: test_mla_layer_matches_float64 compares the module with itself in another
    dtype, which a mistake in the module (a missing RoPE or norm) passes."""
    monkeypatch.setenv("LWT_BACKEND", "reference")
    layer = _mla_layer(q_rank, causal).double()
    with torch.no_grad():  # latent norm scales away from 1
        for name, w in layer.named_parameters():
            if "_norm." in name:
                w.uniform_(0.5, 1.5)
    x = torch.randn(2, 13, 48, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(DEVICE)
    want = _mla_by_hand(layer, x, causal)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer(x, absorb=True), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_mla_absorbed_inference_matches_training_path(monkeypatch, backend, causal):
    """absorb=True never decompresses K/V (W_uk folded into the query, W_uv applied after attending
    over the latent) and gives the training path's output to fp32 accuracy."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    layer = _mla_layer(24, causal)
    layer64 = _mla_layer(24, causal).double()
    x = torch.randn(2, 13, 48, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    monkeypatch.setenv("LWT_BACKEND", "reference")
    with torch.no_grad():
        y64 = layer64(x.double())
        y_ref = layer(x)
    monkeypatch.setenv("LWT_BACKEND", backend)
    calls = []
    real = layer.kv_up.forward
    layer.kv_up.forward = lambda c: calls.append(c.shape) or real(c)
    layer.eval()  # (grad mode stays on: the form itself carries no gradient)
    y = layer(x, absorb=True)
    assert not calls, "the absorbed path decompressed the latent through kv_up"
    assert not y.requires_grad
    assert_close("y", y, y64, y_ref, reduced_over=13 * 32)


def test_mla_absorbed_form_is_refused_while_training():
    """absorb=True in a training step (train() mode, grad enabled, parameters requiring grad) returned an
    output without a gradient: in a residual block the loss still backpropagated and the attention silently
    learned nothing. Refused by name; in eval() mode, under no_grad, or with frozen parameters it runs."""
    layer = _mla_layer(24, False)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with pytest.raises(ValueError, match=r"^absorb: True is the inference form, whose output carries no gradient, "
                                         r"but the layer is training"):
        layer(x, absorb=True)
    with torch.no_grad():
        want = layer(x, absorb=True)
    assert torch.equal(layer.eval()(x, absorb=True), want)
    layer.train().requires_grad_(False)
    assert torch.equal(layer(x, absorb=True), want)
    with pytest.raises(ValueError, match=r"^absorb: True is the inference form"):  # a frozen layer in a model
        layer(x.clone().requires_grad_(), absorb=True)  # that trains what feeds it: cut there too


def test_rope_pickled_before_theta_became_a_property_loads():
    """A whole module pickled before theta was a property holds it in its instance dict: it loads, with its
    base. Setting theta leaves no view of the old table behind (a zero-row view kept its whole storage,
    which pickles and copies carried)."""
    import pickle

    rope = RotaryEmbedding(8, theta=500.0)
    state = rope.__dict__.copy()
    state["theta"] = state.pop("_theta")  # the old layout
    old = RotaryEmbedding.__new__(RotaryEmbedding)
    old.__setstate__(state)
    x = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(6))
    assert old.theta == 500.0 and torch.equal(old.rotate(x), rope.rotate(x))
    assert torch.equal(pickle.loads(pickle.dumps(old)).rotate(x), rope.rotate(x))
    rope.theta = 600.0
    assert rope._cos.untyped_storage().nbytes() == rope._sin.untyped_storage().nbytes() == 0


def test_latent_attention_is_forward_only(monkeypatch):
    monkeypatch.setenv("LWT_BACKEND", "triton")
    q = torch.randn(1, 5, 2, 40, device=DEVICE, requires_grad=True)
    c, kr = torch.randn(1, 5, 32, device=DEVICE), torch.randn(1, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^q: requires grad, but latent_attention is forward-only"):
        F.latent_attention(q, c, kr)
    with pytest.raises(ValueError, match=r"^c: requires grad, but latent_attention is forward-only"):
        F.latent_attention(q.detach(), c.clone().requires_grad_(), kr)
    with torch.no_grad():
        o = F.latent_attention(q, c, kr, causal=True)
    assert_close("o", o, reference.latent_attention(q.double(), c.double(), kr.double(), True),
                 reference.latent_attention(q, c, kr, True), reduced_over=5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_rank=-1), r"^q_rank: expected an int >= 0"),
    (dict(q_rank=True), r"^q_rank: expected an int >= 0 \(0: no query latent\), got True"),
    (dict(kv_rank=0), r"^kv_rank: expected a positive int"),
    (dict(rope_dim=7), r"^rope_dim: expected an even number <= 128"),
    (dict(nope_dim=512), r"^nope_dim, v_dim: expected at most 256"),
    (dict(v_dim=258), r"^nope_dim, v_dim: expected at most 256, got 16, 258"),
    (dict(rope_dim=130), r"^rope_dim: expected an even number <= 128, got 130"),
    (dict(causal=1), r"^causal: expected a bool"),
    (dict(rope_theta=-5.0), r"^rope_theta: expected a finite number > 1"),
])
def test_mla_layer_bad_arguments(kwargs, message):
    args = dict(d_model=48, n_heads=3, q_rank=0, kv_rank=32, nope_dim=16, rope_dim=8, v_dim=24) | kwargs
    with pytest.raises(ValueError, match=message):
        MLAAttention(**args)


def test_attention_layers_take_the_kernels_widest_heads(monkeypatch):
    """The documented limits are inclusive: a GQA head of 256, MLA's nope_dim and v_dim of 256 and rope_dim
    of 128 (the model.* limits lwt.config accepts) build and run."""
    monkeypatch.setenv("LWT_BACKEND", "reference")
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    gqa = GQAAttention(16, 1, 1, head_dim=256)
    mla = MLAAttention(16, 1, 0, 8, nope_dim=256, rope_dim=128, v_dim=256)
    assert (gqa.head_dim, mla.nope_dim, mla.rope_dim, mla.v_dim) == (256, 256, 128, 256)
    with torch.no_grad():
        assert gqa(x).shape == mla(x).shape == mla(x, absorb=True).shape == (1, 3, 16)


def test_mla_layer_shapes_and_bad_input():
    layer = MLAAttention(48, 3, 0, 32, 16, 8, 24)
    assert set(layer.state_dict()) == {"q_proj.weight", "kv_down.weight", "kv_norm.weight", "kv_up.weight",
                                       "out.weight"}
    assert tuple(layer.kv_down.weight.shape) == (32 + 8, 48) and tuple(layer.kv_up.weight.shape) == (3 * 40, 32)
    with pytest.raises(ValueError, match=r"^x: expected \(batch, seq, 48\), got \(2, 5, 40\)"):
        layer(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match=r"^absorb: expected a bool, got 'False'"):  # (a true string)
        layer(torch.randn(2, 5, 48), absorb="False")


def test_rope_table_stays_fp32_and_usable_for_training():
    """module.half() casts float buffers: the table is rebuilt in fp32. A table first built under
    torch.inference_mode is rebuilt as a normal tensor when training needs it. float64 inputs are
    rotated in float64."""
    rope = RotaryEmbedding(16).to(DEVICE)
    x = torch.randn(1, 6, 2, 16, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    with torch.inference_mode():
        rope.rotate(x)
    leaf = x.clone().requires_grad_()
    rope.rotate(leaf).sum().backward()
    assert leaf.grad is not None and not rope._cos.is_inference()
    rope.half()
    want = _rope_complex(x, 0, 10000.0)
    assert_close("rope fp32 after .half()", rope.rotate(x), want, want.float())
    assert rope._cos.dtype == torch.float32
    assert (rope.rotate(x.double()) - want).abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------------
# RMSNorm as a drop-in for torch.nn.RMSNorm; FrozenSwiGLU dtype conversions; from_config
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [None, 1e-5], ids=["eps-None", "eps-1e-5"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rmsnorm_swaps_in_for_torch_rmsnorm(eps, affine, dtype):
    """A module holding a torch.nn.RMSNorm gets lwt's, built with the same arguments; the module's
    state_dict loads unchanged and the outputs match (eps=None: torch's eps of the compute dtype)."""
    gen = torch.Generator().manual_seed(11)
    theirs = torch.nn.Sequential(torch.nn.Linear(24, 24, dtype=dtype),
                                 torch.nn.RMSNorm([24], eps=eps, elementwise_affine=affine, dtype=dtype))
    with torch.no_grad():
        theirs[0].bias.zero_()  # else the bias, not x, sets the scale of the normalised input
        if affine:
            theirs[1].weight.copy_(torch.rand(24, generator=gen) + 0.5)
    ours = copy.deepcopy(theirs)
    t = theirs[1]
    ours[1] = RMSNorm(t.normalized_shape, eps=t.eps, elementwise_affine=t.elementwise_affine, dtype=dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    # tiny inputs, where eps dominates the mean square: a wrong eps would show
    x = (torch.randn(3, 5, 24, generator=gen) * (1e-4 if eps is None else 1.0)).to(dtype)
    want64 = reference.rms_norm(theirs[0](x).double(), torch.ones(24, dtype=torch.float64) if not affine else
                                theirs[1].weight.double(), torch.finfo(torch.promote_types(dtype, torch.float32)).eps
                                if eps is None else eps)
    if dtype == torch.float64:
        torch.testing.assert_close(ours(x), theirs(x))
    else:
        assert_close("y", ours(x), want64, theirs(x))


def test_rmsnorm_torch_constructor_forms():
    norm = RMSNorm((8,), None, False)
    assert norm.weight is None and list(norm.state_dict()) == [] and norm.normalized_shape == (8,)
    assert repr(norm) == "RMSNorm(8, eps=None, elementwise_affine=False)"
    assert RMSNorm(torch.Size([8])).dim == 8 and RMSNorm(dim=8).dim == 8 and RMSNorm(8).eps == 1e-6
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(12))
    y, s = norm(x, residual=x)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(2 * x, (8,)))
    with pytest.raises(ValueError, match=r"^normalized_shape: expected a positive int, got \(3, 8\)"):
        RMSNorm((3, 8))
    with pytest.raises(ValueError, match=r"^elementwise_affine: expected a bool"):
        RMSNorm(8, elementwise_affine=1)


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.bfloat16(),
                                     lambda m: m.to("cpu", torch.float64), lambda m: m.double().float()],
                         ids=["to-fp16", "half", "bfloat16", "to-cpu-fp64", "double-float"])
def test_frozen_swiglu_keeps_frozen_dtype_through_conversions(convert):
    """Casting the module (or a model holding it) moves W_down to the new dtype but leaves the frozen
    matrices in the frozen_dtype they were given, bit for bit; without frozen_dtype they follow."""
    from lwt.layers import FrozenSwiGLU

    pinned = FrozenSwiGLU(32, 80, seed=7, frozen_dtype=torch.bfloat16)
    gate, up = pinned.w_gate.clone(), pinned.w_up.clone()
    outer = convert(torch.nn.Sequential(pinned))
    assert outer[0] is pinned and pinned.w_down.dtype == convert(torch.nn.Linear(1, 1)).weight.dtype
    assert torch.equal(pinned.w_gate, gate) and pinned.w_gate.dtype == torch.bfloat16
    assert torch.equal(pinned.w_up, up) and pinned.w_up.dtype == torch.bfloat16
    assert list(pinned.state_dict()) == list(FrozenSwiGLU(32, 80, seed=7).state_dict())
    free = convert(FrozenSwiGLU(32, 80, seed=7))
    assert free.w_gate.dtype == free.w_up.dtype == free.w_down.dtype


def test_frozen_swiglu_frozen_dtype_follows_device_moves():
    from lwt.layers import FrozenSwiGLU

    pinned = FrozenSwiGLU(16, 24, seed=1, frozen_dtype=torch.float16).to("meta", torch.float32)
    assert pinned.w_gate.is_meta and pinned.w_gate.dtype == torch.float16 and pinned.w_down.dtype == torch.float32
    pinned.to_empty(device="cpu")
    assert pinned.w_up.device.type == "cpu" and pinned.w_up.dtype == torch.float16


def test_frozen_swiglu_draws_gate_then_up_from_its_seed():
    """The documented draw: W_gate, then W_up, N(0, 1/d_model) from one CPU generator seeded with `seed`
    (a checkpoint's frozen_checksum pins these values; a change would refuse every saved checkpoint)."""
    from lwt.layers import FrozenSwiGLU

    gen = torch.Generator().manual_seed(9)
    gate, up = ((torch.randn(24, 16, generator=gen, dtype=torch.float64) * 16 ** -0.5).float() for _ in range(2))
    mlp = FrozenSwiGLU(16, 24, seed=9)
    assert torch.equal(mlp.w_gate, gate) and torch.equal(mlp.w_up, up)


def test_frozen_swiglu_state_dicts_cross_the_fp8_boundary():
    """A full-precision layer's state_dict loads into an FP8 one quantised per output channel (the FP8
    constructor's buffers, scales included), and an FP8 one with its scales into a full-precision layer
    dequantised (W = w8 · scale): not a plain cast, which drops the scale."""
    from lwt.layers import FrozenSwiGLU

    fp8 = torch.float8_e4m3fn
    full, quant = FrozenSwiGLU(16, 24, seed=4), FrozenSwiGLU(16, 24, seed=4, frozen_dtype=fp8)
    into_fp8 = FrozenSwiGLU(16, 24, seed=5, frozen_dtype=fp8)
    into_fp8.load_state_dict(full.state_dict())
    into_full = FrozenSwiGLU(16, 24, seed=5)
    into_full.load_state_dict(quant.state_dict())
    for name in ("w_gate", "w_up"):
        assert torch.equal(getattr(into_fp8, name).view(torch.uint8), getattr(quant, name).view(torch.uint8))
        assert torch.equal(getattr(into_fp8, f"{name}_scale"), getattr(quant, f"{name}_scale"))
        want = getattr(quant, name).float() * getattr(quant, f"{name}_scale")[:, None]
        assert torch.equal(getattr(into_full, name), want)
        torch.testing.assert_close(getattr(into_full, name), getattr(full, name), rtol=0.07, atol=1e-3)


def test_frozen_swiglu_frozen_dtype_beside_dtype():
    """frozen_dtype wins for the frozen matrices, dtype for W_down (bf16 frozen beside fp64 parameters):
    the draw rounded once to frozen_dtype, not held in dtype."""
    from lwt.layers import FrozenSwiGLU

    mlp = FrozenSwiGLU(16, 24, seed=3, frozen_dtype=torch.bfloat16, dtype=torch.float64)
    assert mlp.w_gate.dtype == mlp.w_up.dtype == torch.bfloat16 and mlp.w_down.dtype == torch.float64
    assert torch.equal(mlp.w_gate, FrozenSwiGLU(16, 24, seed=3).w_gate.bfloat16())


def test_frozen_swiglu_wrong_width_names_x():
    """An input of another width than d_model: the layer names x and d_model (lwt.functional would blame
    w_gate's shape, a buffer the caller never passed)."""
    from lwt.layers import FrozenSwiGLU

    with pytest.raises(ValueError, match=r"^x: expected a last dim of 16 \(d_model\), got shape \(2, 3, 24\)"):
        FrozenSwiGLU(16, 24, seed=0)(torch.randn(2, 3, 24))


def test_frozen_swiglu_reset_parameters_redraws_w_down():
    """reset_parameters() re-initialises the trained W_down as nn.Linear(d_ff, d_model) does (the same
    draw under the same torch seed), besides restoring the frozen matrices from `seed`."""
    from lwt.layers import FrozenSwiGLU

    torch.manual_seed(0)
    want = FrozenSwiGLU(16, 24, seed=2).w_down.detach().clone()
    mlp = FrozenSwiGLU(16, 24, seed=2)
    with torch.no_grad():
        mlp.w_down.zero_()
        mlp.w_gate.zero_()
    torch.manual_seed(0)
    mlp.reset_parameters()
    assert torch.equal(mlp.w_down, want) and torch.equal(mlp.w_gate, FrozenSwiGLU(16, 24, seed=2).w_gate)


def test_fp8_state_dict_cast_to_float_loads_back():
    """An FP8 layer's state_dict with every tensor cast to fp32 (a format without FP8) still carries the
    scales: it loads back into an FP8 layer bit for bit, the stored matrices taken as FP8 values beside their
    scales, not quantised afresh (which would drop the scales they go with)."""
    from lwt.layers import FrozenSwiGLU

    fp8 = torch.float8_e4m3fn
    src = FrozenSwiGLU(16, 24, seed=4, frozen_dtype=fp8)
    dst = FrozenSwiGLU(16, 24, seed=5, frozen_dtype=fp8)
    dst.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    for name in ("w_gate", "w_up"):
        assert torch.equal(getattr(dst, name).view(torch.uint8), getattr(src, name).view(torch.uint8))
        assert torch.equal(getattr(dst, f"{name}_scale"), getattr(src, f"{name}_scale"))


def test_fp8_layer_on_the_reference_path_applies_each_scale_to_its_matrix(monkeypatch):
    """An FP8 FrozenSwiGLU on the CPU (the reference path): W_gate and W_up each dequantised with its own
    per-channel scale, x quantised per token, written out by hand (test_swiglu's FP8 checks need a GPU)."""
    from lwt.layers import FrozenSwiGLU

    monkeypatch.setenv("LWT_BACKEND", "reference")
    layer = FrozenSwiGLU(16, 24, seed=6, frozen_dtype=torch.float8_e4m3fn)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(6))
    x8, sx = reference.quantize_rows_fp8(x)
    xq = x8.float() * sx[:, None]
    wg = layer.w_gate.float() * layer.w_gate_scale[:, None]
    wu = layer.w_up.float() * layer.w_up_scale[:, None]
    want = (torch.nn.functional.silu(xq @ wg.T) * (xq @ wu.T)) @ layer.w_down.detach().T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


def test_frozen_swiglu_forwards_recompute(monkeypatch):
    """recompute (constructor, DecoderBlock) reaches the op: the Triton path's memory policy."""
    from lwt.layers import DecoderBlock, FrozenSwiGLU

    seen, real = [], F.frozen_swiglu
    monkeypatch.setattr(F, "frozen_swiglu", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    x = torch.randn(1, 3, 32)
    for recompute in (False, True):
        FrozenSwiGLU(32, 48, 0, recompute=recompute)(x)
        DecoderBlock(32, 4, 48, recompute=recompute)(x)
    assert seen == [False, False, True, True]


def _model_config(**overrides):
    from lwt.config import ModelConfig

    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, mla_rkv=16)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides,cls", [
    pytest.param(dict(attn_type="gqa"), GQAAttention, id="gqa"),
    pytest.param(dict(attn_type="gqa", rope_theta=500.0), GQAAttention, id="gqa-theta"),
    pytest.param(dict(attn_type="mla", causal=True), MLAAttention, id="mla-causal"),
    pytest.param(dict(attn_type="standard", n_kv_heads=None, causal=True), GQAAttention, id="standard-causal"),
    pytest.param(dict(attn_type="mla", mla_rq=8, rope_theta=500.0, norm_eps=1e-3), MLAAttention, id="mla-rq8"),
    pytest.param(dict(attn_type="mla", mla_nope_dim=6, mla_rope_dim=2, mla_v_dim=10), MLAAttention, id="mla-dims"),
])
def test_attention_from_config_matches_decoder_block(overrides, cls):
    """X.from_config(cfg) builds the layer DecoderBlock.from_config(cfg, i).attn is: same class, sizes,
    settings and parameter shapes; every RMSNorm of the block (MLA's latent norms too) takes norm_eps."""
    from lwt.layers import DecoderBlock, RMSNorm

    cfg = _model_config(**overrides)
    layer = cls.from_config(cfg, dtype=torch.float64)
    block = DecoderBlock.from_config(cfg, 0)
    block_attn = block.attn
    norms = [m for m in block.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 + (cls is MLAAttention) + bool(cfg.mla_rq and cls is MLAAttention)
    assert all(m.eps == cfg.norm_eps for m in norms)
    assert type(block_attn) is cls and repr(layer) == repr(block_attn)
    assert layer.rope.theta == cfg.rope_theta and layer.causal == cfg.causal
    assert {n: p.shape for n, p in layer.named_parameters()} == {n: p.shape for n, p in block_attn.named_parameters()}
    assert all(p.dtype == torch.float64 for p in layer.parameters())


def test_attention_from_config_wrong_attn_type():
    with pytest.raises(ValueError, match=r"^attn_type: GQAAttention.from_config expects 'gqa' or 'standard'"):
        GQAAttention.from_config(_model_config(attn_type="mla"))
    with pytest.raises(ValueError, match=r"^attn_type: MLAAttention.from_config expects 'mla', got 'gqa'"):
        MLAAttention.from_config(_model_config(attn_type="gqa"))
    with pytest.raises(ValueError, match=r"^n_kv_heads: attn_type 'standard' \(MHA\) needs"):
        GQAAttention.from_config(_model_config(attn_type="standard"))


# ---------------------------------------------------------------------------------------------------
# Review mends: 16-bit MLA on the reference path, deferred (meta) initialisation, autocast, seeds
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mla_reference_keeps_16_bit_dtypes(dtype):
    """The reference MLA core returns q's dtype (it returned its fp32 compute dtype, so a 16-bit MLA block
    failed in its output projection on the CPU)."""
    from lwt.layers import DecoderBlock
    g = torch.Generator().manual_seed(3)
    shapes = ((1, 5, 2, 12), (1, 5, 2, 8), (1, 5, 4), (1, 5, 2, 6))
    q, kn, kr, v = (torch.randn(*s, generator=g).to(dtype) for s in shapes)
    assert reference.mla_attention(q, kn, kr, v).dtype == dtype
    block = DecoderBlock(32, 4, 64, attn_type="mla", mla_rkv=16, dtype=dtype)
    x = torch.randn(2, 5, 32, generator=g).to(dtype)
    assert block(x).dtype == dtype


def test_meta_built_model_materialises_like_a_fresh_one():
    """FSDP2-style deferred initialisation: built on the meta device, to_empty(), then reset_parameters()
    on every module that has one: the frozen SwiGLU matrices come back from their seeds (frozen_checksum
    equal), and the RoPE caches, emptied by to_empty(), are rebuilt (the same outputs once the trainable
    weights are loaded)."""
    from lwt.model import LWTModel
    cfg = _model_config(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=2)
    torch.manual_seed(0)
    fresh = LWTModel(cfg)
    meta = LWTModel(cfg, device="meta")
    tokens = torch.randint(0, 40, (2, 6))
    meta(tokens.to("meta"))  # a meta forward grows the RoPE caches to meta tables
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert meta.frozen_checksum() == fresh.frozen_checksum()
    # the embedding (the tied head) is drawn N(0, 0.02) as in the constructor, not nn.Embedding's N(0, 1)
    assert 0.01 < meta.embed.weight.std().item() < 0.03
    meta.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(meta(tokens), fresh(tokens), rtol=0, atol=0)


def test_meta_built_model_loads_with_assign():
    """Built on meta, then load_state_dict(assign=True) (the weights replace the meta tensors; the RoPE
    caches, not in the state_dict, stay on meta): .to() and forward work, the tables rebuilt on the
    input's device."""
    from lwt.model import LWTModel
    cfg = _model_config(vocab_size=40, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, n_layers=2)
    fresh = LWTModel(cfg)
    tokens = torch.randint(0, 40, (2, 6))
    with torch.device("meta"):
        meta = LWTModel(cfg)
    meta.load_state_dict(fresh.state_dict(), assign=True)
    torch.testing.assert_close(meta(tokens), fresh(tokens), rtol=0, atol=0)
    meta.to("cpu")
    torch.testing.assert_close(meta(tokens), fresh(tokens), rtol=0, atol=0)


def test_lwt_model_frozen_dtype():
    from lwt.model import LWTModel
    model = LWTModel(_model_config(vocab_size=40, d_model=32, n_heads=4, d_ff=48, n_layers=2),
                     frozen_dtype=torch.bfloat16)
    assert {b.mlp.w_gate.dtype for b in model.blocks} == {torch.bfloat16}
    assert model.embed.weight.dtype == torch.float32
    assert "frozen_dtype=torch.bfloat16" in repr(model.blocks[0].mlp)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_decoder_block_under_autocast(attn_type):
    """torch.autocast hands the residual add a 16-bit attention output beside the fp32 stream: added in
    the stream's dtype, as x + a would promote."""
    from lwt.layers import DecoderBlock
    block = DecoderBlock(32, 4, 48, attn_type=attn_type, mla_rkv=16)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, block(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("layer", ["gqa", "mla", "block", "swiglu"])
def test_layers_name_x_for_an_input_of_another_dtype(layer):
    """x in another dtype than the layer's parameters: a ValueError naming x, before any projection (not
    nn.Linear's "expected m1 and m2 to have the same dtype"), and for FrozenSwiGLU naming x, not the w_down
    the caller never passed. Under autocast (which casts the projections' inputs) the attention layers
    take it; the block's residual stream and MLP stay in its parameters' dtype (README)."""
    from lwt.layers import DecoderBlock, FrozenSwiGLU
    module = {"gqa": lambda: GQAAttention(32, 4, 2), "mla": lambda: MLAAttention(32, 4, 0, 16, 8, 4, 8),
              "block": lambda: DecoderBlock(32, 4, 48, attn_type="gqa"),
              "swiglu": lambda: FrozenSwiGLU(32, 48, 0)}[layer]()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)).half()
    expected = "w_down's dtype" if layer == "swiglu" else "the parameters' dtype"
    with pytest.raises(ValueError, match=rf"^x: expected {expected} \(torch.float32\), got torch.float16"):
        module(x)
    with torch.autocast("cpu", torch.bfloat16):
        if layer in ("gqa", "mla"):
            assert module(x.bfloat16()).shape == (2, 5, 32)
        else:  # autocast stops at lwt's ops: FrozenSwiGLU takes x in w_down's dtype (README)
            with pytest.raises(ValueError, match=rf"^x: expected {expected} \(torch.float32\), got torch.bfloat16"):
                module(x.bfloat16())


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_blocks_take_projections_whose_weight_is_no_tensor(attn_type):
    """Projections swapped for modules whose `weight` is not a tensor (torch.ao's quantize_dynamic makes
    it a method): the attention layers' input check leaves x to them (it read weight.dtype: an
    AttributeError) and the block computes as before; MLA's absorbed form, which needs kv_up's weight
    tensor, refuses by name (an AttributeError too)."""
    from lwt.layers import DecoderBlock

    class Wrapped(torch.nn.Module):  # a quantized Linear's interface: weight() a method
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def weight(self):
            return self.linear.weight

        def forward(self, x):
            return self.linear(x)

    block = DecoderBlock(32, 4, 64, n_kv_heads=2, attn_type=attn_type, mla_rq=16, mla_rkv=16)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    want = block(x)
    for name, child in list(block.attn.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(block.attn, name, Wrapped(child))
    assert torch.equal(block(x), want)
    if attn_type == "mla":  # the absorbed form folds kv_up's weight tensor into the queries: named refusal
        with pytest.raises(ValueError, match=r"^absorb: True folds kv_up's weight .* \(Wrapped\) is not an nn.Linear"):
            block.attn(x, absorb=True)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_blocks_take_swapped_projections_and_mlp(attn_type):
    """Sub-modules swapped the way researchers do (a LoRA wrapper, which has no `weight`; a weight-only int8
    Linear, whose `weight` is int8; a trainable MLP of one's own in place of FrozenSwiGLU): the layers'
    input checks read those sub-modules' attributes and raised AttributeError, or refused x for not being
    int8. Such a sub-module now takes what it takes, and the block computes."""
    from lwt.layers import DecoderBlock

    class LoRA(torch.nn.Module):  # no `weight` attribute
        def __init__(self, base, rank=2):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(torch.zeros(rank, base.in_features))
            self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + x @ self.a.t() @ self.b.t()

    class Int8Linear(torch.nn.Module):  # weight-only int8 with a per-row scale
        def __init__(self, base):
            super().__init__()
            scale = base.weight.detach().abs().amax(1, keepdim=True) / 127
            self.register_buffer("weight", (base.weight.detach() / scale).round().to(torch.int8))
            self.register_buffer("scale", scale)

        def forward(self, x):
            return x @ (self.weight.to(x.dtype) * self.scale.to(x.dtype)).t()

    class SwiGLU(torch.nn.Module):  # trainable: no w_down
        def __init__(self, d, f):
            super().__init__()
            self.up, self.down = torch.nn.Linear(d, 2 * f, bias=False), torch.nn.Linear(f, d, bias=False)

        def forward(self, x):
            g, u = self.up(x).chunk(2, -1)
            return self.down(torch.nn.functional.silu(g) * u)

    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    for wrap in (LoRA, Int8Linear):
        block = DecoderBlock(32, 4, 64, n_kv_heads=2, attn_type=attn_type, mla_rq=16, mla_rkv=16)
        first = "qkv" if attn_type == "gqa" else "kv_down"
        setattr(block.attn, first, wrap(getattr(block.attn, first)))
        block.mlp = SwiGLU(32, 64)
        y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all(), wrap.__name__
        y.square().mean().backward()
        assert block.mlp.down.weight.grad is not None
        if attn_type == "mla" and wrap is LoRA:  # kv_down swapped; kv_up's weight tensor still folds
            with torch.no_grad():
                torch.testing.assert_close(block.attn(x, absorb=True), block.attn(x), rtol=1e-5, atol=1e-5)
    block = DecoderBlock(32, 4, 64, n_kv_heads=2, attn_type=attn_type, mla_rq=16, mla_rkv=16)
    first = "qkv" if attn_type == "gqa" else "kv_down"  # weight-only FP8: not a dtype x can take either
    fp8 = Int8Linear(getattr(block.attn, first))
    fp8.weight = fp8.weight.float().to(torch.float8_e4m3fn)
    setattr(block.attn, first, fp8)
    assert torch.isfinite(block(x)).all()
    if attn_type == "mla":  # kv_up's weight int8: no floating-point weight to fold, named refusal
        block.attn.kv_up = Int8Linear(block.attn.kv_up)
        with torch.no_grad(), pytest.raises(ValueError, match=r"^absorb: True folds kv_up's weight .* \(Int8Linear\) is not an nn.Linear"):
            block.attn(x, absorb=True)


def test_mla_absorbed_form_refuses_a_kv_up_it_cannot_fold():
    """absorb=True folds kv_up.weight and never calls kv_up. A LoRA adapter exposing its base layer's
    weight (as peft's do), a bias, a forward of a subclass's own or a forward hook made the absorbed output
    silently differ from the training form's (by the adapter's delta, say); each is now refused by name.
    A parametrized nn.Linear (its weight the parametrization's output) still folds, and matches."""
    from torch.nn.utils import parametrize

    from lwt.layers import MLAAttention

    class PeftStyleLoRA(torch.nn.Module):
        def __init__(self, base, rank=2):
            super().__init__()
            self.base_layer = base
            self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)

        @property
        def weight(self):  # the base layer's, as peft's BaseTunerLayer.weight
            return self.base_layer.weight

        def forward(self, x):
            return self.base_layer(x) + self.lora_b(self.lora_a(x))

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)

    def layer():
        return MLAAttention(32, 4, 0, 16, 8, 4, 8, dtype=torch.float64).eval()

    def biased(base):
        lin = torch.nn.Linear(base.in_features, base.out_features, dtype=torch.float64)
        lin.weight.data.copy_(base.weight.data)
        return lin

    def scaled(base):
        lin = Scaled(base.in_features, base.out_features, bias=False, dtype=torch.float64)
        lin.weight.data.copy_(base.weight.data)
        return lin

    def hooked(base):
        base.register_forward_hook(lambda module, args, out: 2 * out)
        return base

    for swap, reason in ((lambda base: PeftStyleLoRA(base).double(), r"\(PeftStyleLoRA\) is not an nn.Linear"),
                         (biased, r"\(Linear\) has a bias"), (scaled, r"\(Scaled\) overrides nn.Linear's forward"),
                         (hooked, r"\(Linear\) has forward hooks")):
        mla = layer()
        mla.kv_up = swap(mla.kv_up)
        with torch.no_grad():
            plain = mla(x)
            assert torch.isfinite(plain).all()
            with pytest.raises(ValueError, match=r"^absorb: True folds kv_up's weight .* " + reason + r".*: use absorb=False$"):
                mla(x, absorb=True)
    mla = layer()
    parametrize.register_parametrization(mla.kv_up, "weight", Double())
    with torch.no_grad():
        torch.testing.assert_close(mla(x, absorb=True), mla(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [-1, 2**64, True, 1.0])
def test_frozen_swiglu_seed_range(seed):
    from lwt.layers import FrozenSwiGLU
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[0, 2\*\*64\)"):
        FrozenSwiGLU(8, 16, seed)


def test_mla_derived_rope_dim_names_the_argument_to_set():
    from lwt.layers import DecoderBlock
    with pytest.raises(ValueError, match=r"^mla_rope_dim: None derives \(d_model // n_heads\) // 2 = 3"):
        DecoderBlock(24, 4, 48, attn_type="mla")


def test_rope_refuses_integer_tensors():
    with pytest.raises(ValueError, match=r"^x: expected a floating-point tensor, got torch.int64"):
        RotaryEmbedding(8).rotate(torch.ones(1, 2, 1, 8, dtype=torch.long))


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_fp8_scales_built_on_meta_stay_fp32(default):
    """The FP8 scales are fp32 whatever the default dtype, built on meta as on a device."""
    from lwt.layers import FrozenSwiGLU
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        layer = FrozenSwiGLU(8, 16, seed=1, frozen_dtype=torch.float8_e4m3fn, device="meta")
    finally:
        torch.set_default_dtype(previous)
    assert layer.w_gate_scale.dtype == layer.w_up_scale.dtype == torch.float32
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    fresh = FrozenSwiGLU(8, 16, seed=1, frozen_dtype=torch.float8_e4m3fn)
    assert torch.equal(layer.w_gate_scale, fresh.w_gate_scale)


def test_star_import_exports_only_the_layers():
    """`from lwt.layers import *` beside `import torch.nn.functional as F` keeps torch's F."""
    ns = {}
    exec("import torch.nn.functional as F\nfrom lwt.layers import *", ns)
    assert ns["F"] is torch.nn.functional
    assert {"RMSNorm", "RotaryEmbedding", "GQAAttention", "MLAAttention", "FrozenSwiGLU", "DecoderBlock"} <= set(ns)


def test_reference_ops_ignore_an_enclosing_autocast():
    """The references compute as the kernels do, which autocast never reaches: an enclosing torch.autocast
    must not round their fp32 matmuls (the attention and MLA scores, the gate/up GEMM, the cross
    entropy's logits) to 16 bits."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(1, 64, 2, 32, generator=g).bfloat16() for _ in range(3))
    x, wg, wu, wd = (torch.randn(*shape, generator=g) for shape in ((8, 16), (32, 16), (32, 16), (16, 32)))
    # fp32 inputs to the MLA cores and the cross entropy: autocast would run their matmuls in bf16
    mq, kn, kr, mv = (3 * torch.randn(*s, generator=g)
                      for s in ((1, 16, 2, 24), (1, 16, 2, 16), (1, 16, 8), (1, 16, 2, 8)))
    lq, c = 3 * torch.randn(1, 16, 2, 40, generator=g), torch.randn(1, 16, 32, generator=g)
    h, w = torch.randn(12, 16, generator=g), torch.randn(10, 16, generator=g)
    t = torch.randint(0, 10, (12,), generator=g)

    def ops():
        return (F.attention(q, k, v), F.frozen_swiglu(x, wg, wu, wd), F.mla_attention(mq, kn, kr, mv),
                F.latent_attention(lq, c, kr), F.linear_cross_entropy(h, w, t))

    plain = ops()
    with torch.autocast("cpu", torch.bfloat16):
        auto = ops()
    for a, b in zip(auto, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_kernel_backward_ignores_an_enclosing_autocast(recompute):
    """backward() called inside an autocast region: the Triton backwards compute as they do outside it
    (SwiGLU's dh and dW_down are torch GEMMs, which autocast would round to 16 bits)."""
    from kernels.swiglu import frozen_swiglu
    g = torch.Generator().manual_seed(1)
    x, wg, wu, wd, dy = (torch.randn(*shape, generator=g).to(DEVICE)
                         for shape in ((8, 16), (32, 16), (32, 16), (16, 32), (8, 16)))
    x.requires_grad_(), wd.requires_grad_()
    grads = []
    for autocast in (False, True):
        with torch.autocast(DEVICE, torch.bfloat16, enabled=autocast):
            y = frozen_swiglu(x, wg, wu, wd, recompute=recompute)
            grads.append(torch.autograd.grad(y, (x, wd), dy))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_frozen_swiglu_draw_ignores_the_default_dtype(default):
    """The frozen matrices are the seed's whatever torch's default dtype: randn draws other values in
    float64 than in fp32, so a process that set another default (a float64 check, say) would build, and
    reset_parameters() would restore, another model (and another frozen_checksum)."""
    from lwt.layers import FrozenSwiGLU
    want = FrozenSwiGLU(16, 24, seed=3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        explicit = FrozenSwiGLU(16, 24, seed=3, dtype=torch.float32)
        implicit = FrozenSwiGLU(16, 24, seed=3)
        explicit.w_gate.zero_()
        explicit.reset_parameters()
    finally:
        torch.set_default_dtype(previous)
    for name in ("w_gate", "w_up"):
        assert torch.equal(getattr(explicit, name), getattr(want, name))
        assert torch.equal(getattr(implicit, name), getattr(want, name).to(default))


def test_frozen_swiglu_draw_is_the_same_on_every_cpu():
    """torch's fp32 randn takes a vectorised path on AVX2 CPUs and a scalar one elsewhere (aarch64 hosts such
    as a GH200's), with other last bits: the frozen matrices (and every frozen_checksum) must not depend on
    which, or a checkpoint trained on one machine is refused on the other. ATEN_CPU_CAPABILITY=default
    forces the scalar path in a subprocess."""
    import subprocess
    import sys
    code = ("import hashlib, torch; from lwt.layers import FrozenSwiGLU; m = FrozenSwiGLU(32, 96, seed=5); "
            "print(hashlib.sha256(m.w_gate.numpy().tobytes() + m.w_up.numpy().tobytes()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for capability in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        digests.add(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                   text=True).stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("frozen_dtype", [None, torch.float8_e4m3fn], ids=["full", "fp8"])
@pytest.mark.parametrize("where", ["meta", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_layers_built_under_a_default_device(where, frozen_dtype):
    """Built inside `with torch.device(where)` (deferred init on meta, or straight on the GPU), a block's
    frozen matrices (and FP8 scales) go where its parameters go and hold the seed's values: they are drawn
    on the CPU, as their generator is (randn on the default device refused the CPU generator on CUDA)."""
    from lwt.layers import DecoderBlock
    torch.manual_seed(0)
    want = DecoderBlock(32, 4, 48, attn_type="mla", mla_rkv=16, frozen_dtype=frozen_dtype)
    torch.manual_seed(0)
    with torch.device(where):
        block = DecoderBlock(32, 4, 48, attn_type="mla", mla_rkv=16, frozen_dtype=frozen_dtype)
    assert {t.device.type for t in [*block.parameters(), *block.buffers()]} == {where}
    if where == "meta":
        block = block.to_empty(device="cpu")
        for module in block.modules():
            if hasattr(module, "reset_parameters") and module is not block:
                module.reset_parameters()
    for name, w in want.mlp.named_buffers():
        got = getattr(block.mlp, name).cpu()
        assert got.dtype == w.dtype and torch.equal(got.view(torch.uint8), w.view(torch.uint8)), name


def _count_frozen_draws(monkeypatch):
    """Counts FrozenSwiGLU._frozen_draws calls (each draws one module's frozen matrices)."""
    from lwt.layers import FrozenSwiGLU

    calls = []
    draws = FrozenSwiGLU._frozen_draws

    def counted(self):
        calls.append(self.seed)
        return draws(self)
    monkeypatch.setattr(FrozenSwiGLU, "_frozen_draws", counted)
    return calls


@pytest.mark.parametrize("frozen_dtype", [None, torch.bfloat16, torch.float8_e4m3fn], ids=["fp32", "bf16", "fp8"])
def test_parallel_frozen_draws_are_the_sequential_ones(monkeypatch, frozen_dtype):
    """Modules built inside parallel_frozen_draws() get their frozen matrices (and FP8 scales) when it ends,
    drawn on a thread pool: bit for bit what each draws alone, on the default device; a module built on
    meta inside it stays meta and draws nothing; W_down's draw from the global RNG is unchanged."""
    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws

    seeds = [3, 11, 3, 2**63]
    torch.manual_seed(0)
    alone = [FrozenSwiGLU(24, 40, seed=s, frozen_dtype=frozen_dtype, device=DEVICE) for s in seeds]
    calls = _count_frozen_draws(monkeypatch)
    torch.manual_seed(0)
    with parallel_frozen_draws(max_workers=3):
        pooled = [FrozenSwiGLU(24, 40, seed=s, frozen_dtype=frozen_dtype, device=DEVICE) for s in seeds]
        on_meta = FrozenSwiGLU(24, 40, seed=5, frozen_dtype=frozen_dtype, device="meta")
        assert calls == []  # nothing drawn yet
    assert sorted(calls) == sorted(seeds)  # each pooled module once, the meta one never
    assert on_meta.w_gate.is_meta
    for m, a in zip(pooled, alone):
        assert torch.equal(m.w_down, a.w_down)
        for name, w in a.named_buffers():
            got = getattr(m, name)
            assert got.dtype == w.dtype and got.device == w.device
            assert torch.equal(got.view(torch.uint8), w.view(torch.uint8)), name


def test_parallel_frozen_draws_nest_fail_and_check_max_workers(monkeypatch):
    """Nested blocks draw at the end of the outermost; a block left by an exception draws nothing and
    leaves no pending state behind (a module built after it draws at once), nor does a worker's exception;
    max_workers is checked."""
    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws

    want = FrozenSwiGLU(16, 24, seed=4).w_up
    calls = _count_frozen_draws(monkeypatch)
    with parallel_frozen_draws():
        with parallel_frozen_draws():
            inner = FrozenSwiGLU(16, 24, seed=4)
        assert calls == []  # not yet: the outer block draws
    assert calls == [4] and torch.equal(inner.w_up, want)
    with pytest.raises(RuntimeError, match="boom"):
        with parallel_frozen_draws():
            FrozenSwiGLU(16, 24, seed=4)
            raise RuntimeError("boom")
    assert calls == [4]
    assert torch.equal(FrozenSwiGLU(16, 24, seed=4).w_up, want) and calls == [4, 4]
    monkeypatch.setattr(FrozenSwiGLU, "_frozen_draws", lambda self: iter([("w_gate", 1 / 0)]))
    with pytest.raises(ZeroDivisionError):
        with parallel_frozen_draws(max_workers=2):
            FrozenSwiGLU(16, 24, seed=1), FrozenSwiGLU(16, 24, seed=2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_workers"):
            with parallel_frozen_draws(max_workers=bad):
                pass


def test_a_pending_draw_under_torch_compile_runs_eagerly_outside_the_graph():
    """A module whose draw is pending, first called under torch.compile: the draw runs outside the graph
    (lwt/_eager_draw.py, imported only then) and gives the values it draws alone; fullgraph=True refuses it."""
    import torch._dynamo

    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws

    x = torch.randn(3, 16)
    alone = FrozenSwiGLU(16, 24, seed=4)
    for fullgraph in (False, True):
        torch._dynamo.reset()
        with parallel_frozen_draws():
            mlp = FrozenSwiGLU(16, 24, seed=4)
            mlp.w_down.data.copy_(alone.w_down)
            assert set(mlp._frozen_pending) == {"w_gate", "w_up"}
            compiled = torch.compile(mlp, backend="eager", fullgraph=fullgraph)
            if fullgraph:
                with pytest.raises(Exception, match=r"torch\.compiler\.disable"):
                    compiled(x)
                continue
            got = compiled(x)
            assert mlp._frozen_pending == {}
            assert torch.equal(mlp.w_gate, alone.w_gate) and torch.equal(mlp.w_up, alone.w_up)
            torch.testing.assert_close(got, alone(x), rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_frozen_draws_under_inference_mode_fake_tensors_and_a_copied_context(monkeypatch, threads):
    """The matrices are copied into their buffers by the thread that leaves the block (one draw thread, or
    a pool of three), so a model built under torch.inference_mode() works as without the pool (worker
    threads are outside inference mode, and inference tensors refuse in-place updates there), and so does
    a module built under inference mode in a block left outside it; under FakeTensorMode (memory estimates)
    a module draws at once, as without the block; a module built in a context copied inside the block,
    after it ended, draws at once instead of waiting for a block that will not draw it."""
    import contextvars

    from torch._subclasses.fake_tensor import FakeTensorMode

    import lwt.layers
    from lwt.config import ModelConfig
    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws
    from lwt.model import LWTModel

    monkeypatch.setattr(lwt.layers, "_draw_threads", lambda: threads)
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=3, n_heads=2, d_ff=24)
    want = LWTModel(cfg).frozen_checksum()
    with torch.inference_mode():
        assert LWTModel(cfg).frozen_checksum() == want
    want_up = FrozenSwiGLU(16, 24, seed=4).w_up
    with parallel_frozen_draws():
        with torch.inference_mode():
            inside = [FrozenSwiGLU(16, 24, seed=4) for _ in range(2)]
    assert all(m.w_up.is_inference() and torch.equal(m.w_up, want_up) for m in inside)
    with FakeTensorMode():
        fake = LWTModel(cfg)
    assert all(type(b).__name__ == "FakeTensor" for b in fake.buffers())
    with parallel_frozen_draws():
        copied = contextvars.copy_context()
    late = copied.run(FrozenSwiGLU, 16, 24, 4)
    assert torch.equal(late.w_up, want_up)


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_frozen_draws_with_modules_used_copied_or_loaded_inside(monkeypatch, workers):
    """Inside the block a module waiting for its draw is never read empty: forward() and state_dict()
    draw it first (and the block does not draw it again), a deepcopy or pickle of it is drawn with the
    others, matrices load_state_dict() loads stay (the block draws only what was not loaded, FP8 scales
    with their matrices), and after a block left by an exception a module draws at its first use."""
    import pickle

    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws

    fp8 = torch.float8_e4m3fn
    want = {s: FrozenSwiGLU(16, 24, seed=s).state_dict() for s in (0, 1, 2, 3, 9)}
    want_fp8 = {s: FrozenSwiGLU(16, 24, seed=s, frozen_dtype=fp8).state_dict() for s in (0, 9)}
    x = torch.randn(3, 16)
    calls = _count_frozen_draws(monkeypatch)

    def same_frozen(m, ref, names=None):
        return all(torch.equal(m.state_dict()[k].view(torch.uint8), ref[k].view(torch.uint8))
                   for k in names or m.frozen_buffer_names())

    with parallel_frozen_draws(max_workers=workers):
        used, saved, copied, loaded, partly = (FrozenSwiGLU(16, 24, seed=s) for s in (1, 2, 3, 0, 0))
        partly_fp8 = FrozenSwiGLU(16, 24, seed=0, frozen_dtype=fp8)
        y = used(x)
        assert calls == [1]  # drawn for its forward, at once
        assert torch.equal(saved.state_dict()["w_up"], want[2]["w_up"]) and calls == [1, 2]
        deep, pickled = copy.deepcopy(copied), pickle.loads(pickle.dumps(copied))
        loaded.load_state_dict(want[9])
        partly.load_state_dict({"w_gate": want[9]["w_gate"]}, strict=False)
        partly_fp8.load_state_dict({k: v for k, v in want_fp8[9].items() if k.startswith("w_up")}, strict=False)
        assert calls == [1, 2]
    assert sorted(calls) == [0, 0, 1, 2, 3, 3, 3]  # the partly loaded ones once each; used and saved not again
    assert torch.equal(y, used(x)) and same_frozen(used, want[1]) and same_frozen(saved, want[2])
    assert same_frozen(copied, want[3]) and same_frozen(deep, want[3]) and same_frozen(pickled, want[3])
    assert same_frozen(loaded, want[9])
    assert same_frozen(partly, want[9], ["w_gate"]) and same_frozen(partly, want[0], ["w_up"])
    assert same_frozen(partly_fp8, want_fp8[9], ["w_up", "w_up_scale"])
    assert same_frozen(partly_fp8, want_fp8[0], ["w_gate", "w_gate_scale"])
    with pytest.raises(RuntimeError, match="boom"):
        with parallel_frozen_draws(max_workers=workers):
            failed = FrozenSwiGLU(16, 24, seed=1)
            raise RuntimeError("boom")
    late_copy = copy.deepcopy(failed)  # a copy made outside any block draws at once
    assert same_frozen(late_copy, want[1])
    with torch.no_grad():
        used.w_down.copy_(failed.w_down)
    assert torch.equal(failed(x), used(x)) and same_frozen(failed, want[1])  # drawn for its forward


def test_parallel_frozen_draws_with_modules_faked_swapped_converted_or_hashed_inside():
    """Inside the block: a forward under FakeTensorMode (a memory estimate) draws real values into the
    real buffers; torch.func.functional_call's tensors are never drawn into (the module's own are drawn by
    the block); a frozen buffer replaced by another tensor is kept; a conversion (.double()) moves what is
    pending to the new buffers; LWTModel.frozen_checksum() hashes drawn values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lwt.config import ModelConfig
    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws
    from lwt.model import LWTModel

    want = FrozenSwiGLU(16, 24, seed=1).state_dict()
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, d_ff=24)
    checksum = LWTModel(cfg).frozen_checksum()
    x = torch.randn(3, 16)
    mine = {"w_gate": torch.zeros(24, 16), "w_up": torch.zeros(24, 16)}
    with parallel_frozen_draws(max_workers=2):
        faked, swapped, replaced, converted = (FrozenSwiGLU(16, 24, seed=1) for _ in range(4))
        with FakeTensorMode(allow_non_fake_inputs=True):
            faked(torch.empty(3, 16))
        assert not faked._frozen_pending and torch.equal(faked.w_gate, want["w_gate"])
        torch.func.functional_call(swapped, mine, (x,))
        assert not mine["w_gate"].any() and set(swapped._frozen_pending) == {"w_gate", "w_up"}
        replaced.w_up = torch.ones(24, 16)
        replaced.double().float()  # (conversions keep the replacement the replacement's)
        converted.double()
        assert LWTModel(cfg).frozen_checksum() == checksum
    assert torch.equal(swapped.w_gate, want["w_gate"]) and not mine["w_up"].any()
    assert torch.equal(replaced.w_gate, want["w_gate"]) and torch.equal(replaced.w_up, torch.ones(24, 16))
    assert converted.w_up.dtype == torch.float64 and torch.equal(converted.w_up, want["w_up"].double())


def test_parallel_frozen_draws_with_modules_replaced_transformed_or_failing_inside(monkeypatch):
    """Inside the block: a copy of a module whose buffer was replaced keeps the replacement, as the module
    does; a forward under torch.func.vmap draws outside the transform (vmap refuses a random draw); a
    conversion that fails midway leaves what it converted pending where it is. A worker's failure leaves
    the modules drawn whole not pending, the others pending until their first use. A context copied
    inside the block does not keep its modules alive."""
    import contextvars
    import gc
    import threading
    import weakref

    from lwt.layers import FrozenSwiGLU, parallel_frozen_draws

    want = {s: FrozenSwiGLU(16, 24, seed=s).state_dict() for s in range(5)}
    with parallel_frozen_draws(max_workers=2):
        replaced, mapped, converted = (FrozenSwiGLU(16, 24, seed=s) for s in (0, 1, 2))
        replaced.w_up = torch.ones(24, 16)
        copied = copy.deepcopy(replaced)
        torch.func.vmap(mapped)(torch.randn(4, 3, 16))
        assert not mapped._frozen_pending

        def fails_third(t, seen=[]):
            seen.append(t)
            if len(seen) == 3:  # w_down and w_gate converted, then w_up fails
                raise MemoryError("simulated")
            return t.double()
        with pytest.raises(MemoryError):
            converted._apply(fails_third)
        assert converted.w_gate.dtype == torch.float64 and set(converted._frozen_pending) == {"w_gate", "w_up"}
        late = contextvars.copy_context().run(lambda: weakref.ref(FrozenSwiGLU(16, 24, seed=3)))
    gc.collect()
    assert late() is None
    for m in (replaced, copied):
        assert torch.equal(m.w_gate, want[0]["w_gate"]) and torch.equal(m.w_up, torch.ones(24, 16))
    assert torch.equal(mapped.w_up, want[1]["w_up"])
    assert torch.equal(converted.w_gate, want[2]["w_gate"].double()) and torch.equal(converted.w_up, want[2]["w_up"])

    drawn, draws, seed_0_drawn = [], FrozenSwiGLU._frozen_draws, threading.Event()

    def fail_seed_1(self):  # seed 1 fails on its second matrix, once seed 0 has drawn both of its own
        for name, w in draws(self):
            if self.seed == 1 and name == "w_up":
                seed_0_drawn.wait(timeout=60)
                raise RuntimeError("boom")
            drawn.append(self.seed)
            yield name, w
        if self.seed == 0:
            seed_0_drawn.set()
    monkeypatch.setattr(FrozenSwiGLU, "_frozen_draws", fail_seed_1)
    with pytest.raises(RuntimeError, match="boom"):
        with parallel_frozen_draws(max_workers=2):
            modules = [FrozenSwiGLU(16, 24, seed=s) for s in range(5)]
    assert not modules[0]._frozen_pending and torch.equal(modules[0].w_up, want[0]["w_up"])
    assert modules[1]._frozen_pending and all(m._frozen_pending for m in modules if drawn.count(m.seed) < 2)
    monkeypatch.setattr(FrozenSwiGLU, "_frozen_draws", draws)
    x = torch.randn(3, 16)
    for m in modules:
        m(x)
        assert torch.equal(m.w_gate, want[m.seed]["w_gate"]) and not m._frozen_pending


def test_parallel_frozen_draws_defer_reset_parameters_after_to_empty(monkeypatch):
    """A model built on meta, materialised with to_empty() and reset module by module inside the block gets
    its frozen matrices when the block ends, drawn together: the checksum of the model built directly."""
    import lwt.layers
    from lwt.config import ModelConfig
    from lwt.layers import parallel_frozen_draws
    from lwt.model import LWTModel

    monkeypatch.setattr(lwt.layers, "_draw_threads", lambda: 3)
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=3, n_heads=2, d_ff=24)
    want = LWTModel(cfg).frozen_checksum()
    model = LWTModel(cfg, device="meta").to_empty(device="cpu")
    calls = _count_frozen_draws(monkeypatch)
    with parallel_frozen_draws():
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        assert calls == []
    assert sorted(calls) == [cfg.frozen_seed + i for i in range(3)]
    assert model.frozen_checksum() == want
