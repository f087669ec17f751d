"""RMSNorm kernel (kernels/rmsnorm.py) against the float64 reference: output and every gradient."""
import pytest
import torch

from kernels import reference
from kernels import rmsnorm as rmsnorm_kernels
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# Without a GPU the kernels run through the Triton interpreter; it handles bf16 loads, stores and
# arithmetic (only its tl.dot of bf16 is wrong, triton#11584, and RMSNorm has none), so bf16 runs there too.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]

# (shape, eps). Sizes cover: a single element; non-powers of two; narrow rows packed several to a
# program with a ragged last tile; more row blocks than persistent backward programs; rows whole in
# registers (<= 8192), rows chunked in the backward only (8192 < N <= 16384) and in both passes
# (> 16384, up to 65536); zero rows.
SHAPES = [
    # N = 1: the norm removes the row's only direction, so dx = g·rstd·(1 - ŝ²) = g·rstd·eps/(x²+eps) is
    # computed as a difference that cancels to within x²/eps units of roundoff, in any implementation
    # (the PyTorch reference included). eps = 1 keeps that factor ~10, so dx is a checkable quantity.
    pytest.param((1, 1), 1.0, id="M1-N1"),
    pytest.param((3, 7), 1e-6, id="M3-N7"),
    pytest.param((37, 64), 1e-6, id="M37-N64"),
    pytest.param((2, 5, 123), 1e-5, id="B2-S5-N123"),
    pytest.param((5, 1000), 1e-6, id="M5-N1000"),
    pytest.param((29, 3000), 1e-6, id="M29-N3000"),
    pytest.param((2, 4096), 1e-6, id="M2-N4096"),
    pytest.param((3, 10000), 1e-6, id="M3-N10000"),
    pytest.param((2, 20000), 1e-6, id="M2-N20000"),
    pytest.param((2, 65536), 1e-6, id="M2-N65536"),
    pytest.param((0, 16), 1e-6, id="M0-N16"),
]
# Larger shapes for the compiled kernels: thousands of rows per persistent program, every path.
CUDA_SHAPES = [
    pytest.param((4099, 4096), 1e-6, id="M4099-N4096", marks=pytest.mark.cuda),
    pytest.param((8, 127, 2048), 1e-6, id="B8-S127-N2048", marks=pytest.mark.cuda),
    pytest.param((1000, 12288), 1e-6, id="M1000-N12288", marks=pytest.mark.cuda),
    pytest.param((257, 65536), 1e-6, id="M257-N65536", marks=pytest.mark.cuda),
    pytest.param((3001, 96), 1e-6, id="M3001-N96", marks=pytest.mark.cuda),
]


def _make(shape, dtype, layout, gen, scale=1.0):
    """A random (non-constant) tensor of `shape`; 'strided' gives a slice of a wider buffer, so rows
    are not contiguous with each other and the kernel must honour the row stride."""
    if layout == "strided":
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=gen, dtype=torch.float32) * scale
        return wide.to(dtype=dtype, device=DEVICE)[..., 2:2 + shape[-1]]
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=DEVICE)


def _grads(fn, inputs, cotangents):
    """Output(s) of fn(*inputs) and the gradients of Σ out·cotangent w.r.t. every input; each
    cotangent is cloned, so a backward that writes into its gradient cannot affect another call."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, c.clone()) for o, c in zip(outs, cotangents) if c is not None]
    grads = torch.autograd.grad([o for o, _ in used], leaves, [c for _, c in used], allow_unused=False)
    return [o.detach() for o in outs], list(grads)


def _check_against_reference(shape, eps, dtype, residual, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, gen)
    w = _make(shape[-1:], dtype, "contiguous", gen) + 1.0  # a scale around 1, with both signs possible
    inputs = [x, w]
    if residual is not None:
        inputs.append(_make(shape, dtype, layout, gen, scale=2.0))
    dy = _make(shape, dtype, layout, gen)
    # "y_and_s": the returned residual stream s is used downstream too, so a gradient reaches it.
    cots = [dy] + ([_make(shape, dtype, layout, gen)] if residual == "y_and_s" else [None] * (residual is not None))

    def kernel(x, w, r=None):
        return rmsnorm_kernels.rms_norm(x, w, eps, r)

    def ref(x, w, r=None):
        return reference.rms_norm(x, w, eps, r)

    outs, grads = _grads(kernel, inputs, cots)
    outs64, grads64 = _grads(ref, [t.double() for t in inputs], [c.double() if c is not None else None for c in cots])
    outs_ref, grads_ref = _grads(ref, inputs, cots)  # PyTorch in the same dtype: the 16-bit error yardstick
    names = ["y", "s"][:len(outs)]
    for name, a, e, r in zip(names, outs, outs64, outs_ref):
        assert a.dtype == dtype
        assert_close(name, a, e, r)
    for name, a, e, r in zip(["dx", "dweight", "dresidual"], grads, grads64, grads_ref):
        assert a.dtype == dtype
        assert_close(name, a, e, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("residual", [None, "y_only", "y_and_s"])
@pytest.mark.parametrize("shape,eps", SHAPES + CUDA_SHAPES)
def test_rms_norm_matches_float64_reference(shape, eps, residual, layout, dtype):
    _check_against_reference(shape, eps, dtype, residual, layout)


def test_transposed_and_unmergeable_inputs():
    """A last dim with non-unit stride and leading dims that cannot merge into one row stride are
    copied to rows first; results still match."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(48, 6, generator=gen).to(DEVICE)
    x = base.t()  # (6, 48), stride (1, 6)
    w = torch.randn(48, generator=gen).to(DEVICE)
    assert_close("y", rmsnorm_kernels.rms_norm(x, w), reference.rms_norm(x.double(), w.double()))
    x3 = torch.randn(4, 9, 32, generator=gen).to(DEVICE)[:, ::3, :]  # rows at two strides
    r3 = torch.randn(4, 9, 32, generator=gen).to(DEVICE)[:, 1::3, :]
    w3 = torch.randn(32, generator=gen).to(DEVICE)
    y, s = rmsnorm_kernels.rms_norm(x3, w3, 1e-6, r3)
    y64, s64 = reference.rms_norm(x3.double(), w3.double(), 1e-6, r3.double())
    assert_close("y", y, y64)
    assert_close("s", s, s64)


def test_gradient_of_expanded_and_transposed_cotangents():
    """dy arriving with stride 0 along rows (from a broadcast) and with a transposed layout."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(40, generator=gen).to(DEVICE).requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    for dy in (torch.randn(40, generator=gen).to(DEVICE).expand(6, 40), torch.randn(40, 6, generator=gen).to(DEVICE).t()):
        dx, dw = torch.autograd.grad(rmsnorm_kernels.rms_norm(x, w), [x, w], dy)
        dx64, dw64 = torch.autograd.grad(reference.rms_norm(x64, w64), [x64, w64], dy.double())
        assert_close("dx", dx, dx64)
        assert_close("dweight", dw, dw64)


def test_weight_in_fp32_with_fp16_activations():
    """fp32 master weights under fp16 activations: y follows x's dtype, dweight the weight's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 200, generator=gen).to(DEVICE, torch.float16)
    w = torch.randn(200, generator=gen).to(DEVICE)
    dy = torch.randn(9, 200, generator=gen).to(DEVICE, torch.float16)
    (y,), (dx, dw) = _grads(lambda a, b: rmsnorm_kernels.rms_norm(a, b), [x, w], [dy])
    (y64,), (dx64, dw64) = _grads(lambda a, b: reference.rms_norm(a, b), [x.double(), w.double()], [dy.double()])
    (yr,), (dxr, dwr) = _grads(lambda a, b: reference.rms_norm(a, b), [x, w], [dy])
    assert y.dtype == dx.dtype == torch.float16 and dw.dtype == torch.float32
    assert_close("y", y, y64, yr)
    assert_close("dx", dx, dx64, dxr)
    assert_close("dweight", dw, dw64, dwr)


def test_weight_without_grad_skips_dweight():
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE)
    y = rmsnorm_kernels.rms_norm(x, w)
    (dx,) = torch.autograd.grad(y, [x], torch.randn_like(y))
    assert torch.isfinite(dx).all() and w.grad is None


def test_residual_and_input_grads_do_not_alias():
    """x and residual share one gradient tensor inside the backward; as leaves they must still get
    separate .grad tensors, or an in-place update of one would change the other."""
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    y, s = rmsnorm_kernels.rms_norm(x, w, 1e-6, r)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()


def test_backward_is_deterministic():
    """No atomics: two backward passes give bit-identical gradients (dweight sums thousands of rows)."""
    gen = torch.Generator().manual_seed(4)
    rows = 4099 if CUDA else 300
    x, r, dy = (torch.randn(rows, 1536, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    w = torch.randn(1536, generator=gen).to(DEVICE, torch.float16)
    runs = [_grads(lambda a, b, c: rmsnorm_kernels.rms_norm(a, b, 1e-6, c), [x, w, r], [dy, None])[1] for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)
