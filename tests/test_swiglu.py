"""Frozen SwiGLU (kernels/swiglu.py) against the float64 reference: y, dx and dW_down, both saving
policies; nothing is computed or stored for the frozen projections."""
import pytest
import torch

import lwt.functional as lwtF
from kernels import reference
from kernels import swiglu
from lwt.layers import FrozenSwiGLU
from tests.helpers import ENTRIES, assert_refused_before_launch, grads
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]
# (x shape, F). The interpreter's tile is 16 tokens × 32 features × 16 of the model dim: D 48 and 16
# are whole K steps, D 33 ends in a partial one (the peeled, masked step); T and F leave ragged tiles.
SHAPES = [
    pytest.param((1, 48), 130, id="T1-D48-F130"),
    pytest.param((37, 48), 130, id="T37-D48-F130"),
    pytest.param((2, 5, 33), 70, id="B2-S5-D33-F70"),
    pytest.param((0, 16), 40, id="T0-D16-F40"),
]
CUDA_SHAPES = [
    pytest.param((1000, 1024), 3584, id="T1000-D1024-F3584", marks=pytest.mark.cuda),
    pytest.param((4, 513, 512), 1400, id="B4-S513-D512-F1400", marks=pytest.mark.cuda),
]


def _weights(D, F, gen, dtype, frozen_dtype=None):
    wg = (torch.randn(F, D, generator=gen) * D ** -0.5).to(DEVICE, frozen_dtype or dtype)
    wu = (torch.randn(F, D, generator=gen) * D ** -0.5).to(DEVICE, frozen_dtype or dtype)
    wd = (torch.randn(D, F, generator=gen) * F ** -0.5).to(DEVICE, dtype)
    return wg, wu, wd


def _check(shape, F, dtype, recompute, frozen_dtype=None, seed=0):
    """frozen_dtype float8_e4m3fn: the weights quantised per output channel, the scales passed along;
    the reference then quantises x per token exactly as the kernel does, so both compute with the same
    FP8 values and the comparison is as tight as for the other dtypes."""
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    fp8 = frozen_dtype == torch.float8_e4m3fn
    wg, wu, wd = _weights(D, F, gen, dtype, None if fp8 else frozen_dtype)
    scales = {}
    if fp8:
        (wg, sg), (wu, su) = reference.quantize_rows_fp8(wg), reference.quantize_rows_fp8(wu)
        scales = dict(w_gate_scale=sg, w_up_scale=su)
    dy = torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    def kernel(x, wd):
        return swiglu.frozen_swiglu(x, wg, wu, wd, recompute, **scales)

    def ref(x, wd):
        upcast = x.dtype == torch.float64 and not fp8  # FP8 weights are upcast by the reference itself
        return reference.frozen_swiglu(x, wg.to(x.dtype) if upcast else wg, wu.to(x.dtype) if upcast else wu, wd,
                                       **scales)

    (y,), (dx, dwd) = grads(kernel, [x, wd], [dy])
    (y64,), (dx64, dwd64) = grads(ref, [x.double(), wd.double()], [dy.double()])
    (y_ref,), (dx_ref, dwd_ref) = grads(ref, [x, wd], [dy])
    tokens = x.numel() // D
    assert_close("y", y, y64, y_ref, reduced_over=F)
    assert_close("dx", dx, dx64, dx_ref, reduced_over=2 * F)
    assert_close("dw_down", dwd, dwd64, dwd_ref, reduced_over=tokens)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,F", SHAPES + CUDA_SHAPES)
def test_frozen_swiglu_matches_float64_reference(shape, F, dtype, recompute):
    _check(shape, F, dtype, recompute)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_frozen_weights_in_lower_precision(recompute):
    """fp16 frozen matrices beside fp32 activations: cast tile by tile in the kernel."""
    _check((9, 40), 72, torch.float32, recompute, frozen_dtype=torch.float16, seed=1)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,F", [SHAPES[1], SHAPES[2], CUDA_SHAPES[0]])
def test_fp8_frozen_weights(shape, F, dtype, recompute):
    """float8_e4m3fn frozen weights with per-channel scales, x quantised per token: the FP8 dual GEMM
    (forward, and the recomputing backward) against the reference's FP8 math in float64. The interpreter
    sums the FP8 products in fp32; Hopper's FP8 MMAs sum each K step in a ~14-bit accumulator, below
    fp32's precision, so on a GPU the 16-bit outputs (whose rounding dominates that) are checked."""
    if CUDA and dtype == torch.float32:
        pytest.skip("on a GPU the FP8 MMA's accumulator, not fp32, bounds the error of fp32 outputs")
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    _check(shape, F, dtype, recompute, frozen_dtype=torch.float8_e4m3fn, seed=5)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_backward_in_token_chunks(monkeypatch, recompute):
    """A small CHUNK_ELEMENTS makes both passes walk 37 tokens in chunks of 2 (dW_down summed in fp32, in
    column blocks); D 50 ends each GEMM in a partial K step."""
    monkeypatch.setattr(swiglu, "CHUNK_ELEMENTS", 2 * 130)
    _check((37, 50), 130, torch.float32, recompute, seed=2)
    _check((37, 50), 130, torch.float16, recompute, seed=3)


def _saved(y):
    node = y.grad_fn
    while not isinstance(node, swiglu.FrozenSwiGLUFunction._backward_cls):  # past the reshape
        node = node.next_functions[0][0]
    return node.saved_tensors


def test_saving_policies():
    """recompute=True keeps x alone for the backward; recompute=False keeps the gate and up outputs
    (and not x, which its backward does not read)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 32, generator=gen).to(DEVICE).requires_grad_()
    wg, wu, wd = _weights(32, 48, gen, torch.float32)
    x_saved, _, _, _, g, u, *scales = _saved(swiglu.frozen_swiglu(x, wg, wu, wd, recompute=True))
    assert x_saved.data_ptr() == x.data_ptr() and g is None and u is None and scales == [None, None]
    x_saved, _, _, _, g, u, *_ = _saved(swiglu.frozen_swiglu(x, wg, wu, wd, recompute=False))
    assert x_saved is None and g.shape == (7, 48) and u.shape == (7, 48)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_no_backward_to_come_keeps_nothing(monkeypatch, recompute):
    """Under no_grad (or with nothing requiring grad) no (tokens × F) gate/up buffer is allocated."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(9, 32, generator=gen).to(DEVICE)
    wg, wu, wd = _weights(32, 40, gen, torch.float32)
    shapes = []
    real = swiglu.empty
    monkeypatch.setattr(swiglu, "empty", lambda shape, *a: shapes.append(tuple(shape)) or real(shape, *a))
    with torch.no_grad():
        swiglu.frozen_swiglu(x, wg, wu, wd.requires_grad_(), recompute)
    swiglu.frozen_swiglu(x, wg, wu, wd.detach(), recompute)
    assert shapes.count((9, 40)) == 2, shapes  # h of each call, nothing else of that size


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("wanted", ["x", "w_down"])
def test_one_gradient_and_strided_inputs(monkeypatch, recompute, wanted):
    """Only x or only w_down requiring grad (the other pass is skipped), on transposed / sliced inputs
    and frozen weights, over several token chunks."""
    monkeypatch.setattr(swiglu, "CHUNK_ELEMENTS", 3 * 40)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(50, 11, generator=gen).to(DEVICE).t()[:, :33]  # (11, 33), strides (1, 11)
    wg = torch.randn(33, 40, generator=gen).to(DEVICE).t() / 6  # (40, 33) transposed
    wu = torch.randn(40, 40, generator=gen).to(DEVICE)[:, 3:36] / 6  # sliced
    wd = torch.randn(33, 40, generator=gen).to(DEVICE) / 6
    dy = torch.randn(11, 33, generator=gen).to(DEVICE)
    leaf = [x, wd][wanted == "w_down"]
    other = [wd, x][wanted == "w_down"]

    def run(fn, leaf, other, cast=lambda t: t):
        leaf = cast(leaf).detach().requires_grad_()
        args = (leaf, cast(other)) if wanted == "x" else (cast(other), leaf)
        y = fn(args[0], cast(wg), cast(wu), args[1])
        return torch.autograd.grad(y, [leaf], cast(dy))[0]

    got = run(lambda *a: swiglu.frozen_swiglu(*a, recompute=recompute), leaf, other)
    want = run(reference.frozen_swiglu, leaf, other, cast=lambda t: t.double())
    same = run(reference.frozen_swiglu, leaf, other)
    assert_close(wanted, got, want, same, reduced_over=40 if wanted == "x" else 11)


def test_layer_frozen_buffers_get_no_grad_and_are_seeded():
    torch.manual_seed(0)
    a, b, c = FrozenSwiGLU(32, 80, seed=7), FrozenSwiGLU(32, 80, seed=7), FrozenSwiGLU(32, 80, seed=8)
    assert torch.equal(a.w_gate, b.w_gate) and torch.equal(a.w_up, b.w_up) and not torch.equal(a.w_gate, c.w_gate)
    assert [n for n, _ in a.named_parameters()] == ["w_down"]
    assert set(a.state_dict()) == {"w_gate", "w_up", "w_down"}
    assert abs(a.w_gate.std().item() - 32 ** -0.5) < 0.1 * 32 ** -0.5
    a = a.to(DEVICE)
    y = a(torch.randn(3, 4, 32, device=DEVICE))
    y.square().sum().backward()
    assert a.w_down.grad is not None and not any(t.requires_grad for t in a.buffers())
    low = FrozenSwiGLU(32, 80, seed=7, frozen_dtype=torch.bfloat16)
    assert low.w_gate.dtype == torch.bfloat16 and low.w_down.dtype == torch.float32
    assert torch.equal(low.w_gate, b.w_gate.to(torch.bfloat16))


def test_layer_with_fp8_frozen_weights():
    """frozen_dtype=float8_e4m3fn: the seeded matrices quantised per output channel, within FP8's rounding
    (half a unit of its 3-bit mantissa, or of its subnormal spacing) of the full-precision ones; the
    scales are fp32 buffers in the state_dict that stay fp32 through .to(dtype); the layer computes what
    the functional op computes with them."""
    full = FrozenSwiGLU(32, 80, seed=7)
    fp8 = FrozenSwiGLU(32, 80, seed=7, frozen_dtype=torch.float8_e4m3fn)
    assert list(fp8.state_dict()) == ["w_down", "w_gate", "w_gate_scale", "w_up", "w_up_scale"]
    assert fp8.frozen_buffer_names() == ("w_gate", "w_up", "w_gate_scale", "w_up_scale")
    for name in ("w_gate", "w_up"):
        w8, scale, exact = getattr(fp8, name), getattr(fp8, f"{name}_scale"), getattr(full, name)
        assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (80,)
        err = (w8.float() * scale[:, None] - exact).abs()
        assert (err <= 2.0**-4 * exact.abs() + 2.0**-10 * scale[:, None]).all(), name
    fp8 = fp8.half().to(DEVICE)
    assert fp8.w_gate.dtype == torch.float8_e4m3fn and fp8.w_gate_scale.dtype == torch.float32
    assert fp8.w_down.dtype == torch.float16
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.float16)
    with torch.no_grad():
        want = lwtF.frozen_swiglu(x, fp8.w_gate, fp8.w_up, fp8.w_down, w_gate_scale=fp8.w_gate_scale,
                                  w_up_scale=fp8.w_up_scale)
        assert torch.equal(fp8(x), want)


def _bad_cases():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=gen).to(DEVICE)
    wg, wu, wd = _weights(16, 24, gen, torch.float32)
    (wg8, s8), (wu8, _) = reference.quantize_rows_fp8(wg), reference.quantize_rows_fp8(wu)
    return [
        ("w_gate", "expected a frozen tensor", (x, wg.clone().requires_grad_(), wu, wd), {}),
        ("w_up", "expected a frozen tensor", (x, wg, wu.clone().requires_grad_(), wd), {}),
        ("w_gate", "expected shape \\(F, 16\\)", (x, wg[:, :8], wu, wd), {}),
        ("w_up", "expected shape \\(24, 16\\)", (x, wg, wu[:20], wd), {}),
        ("w_down", "expected shape \\(16, 24\\)", (x, wg, wu, wd.t()), {}),
        ("w_down", "expected the dtype of x", (x, wg, wu, wd.half()), {}),
        ("x", "expected dtype", (x.int(), wg, wu, wd), {}),
        ("w_gate", "expected 2 dims", (x, wg[None], wu, wd), {}),
        ("w_down", "expected a tensor on", (x, wg, wu, wd.to("meta")), {}),
        ("recompute", "expected a bool", (x, wg, wu, wd), {"recompute": "yes"}),
        # FP8 frozen weights and their scales
        ("w_gate_scale", "expected an \\(24,\\) float32 tensor", (x, wg8, wu8, wd), {"w_up_scale": s8}),
        ("w_up_scale", "expected shape \\(24,\\)", (x, wg8, wu8, wd), {"w_gate_scale": s8, "w_up_scale": s8[:5]}),
        ("w_gate_scale", "expected dtype", (x, wg8, wu8, wd), {"w_gate_scale": s8.half(), "w_up_scale": s8}),
        ("w_up", "expected float8_e4m3fn exactly when w_gate is", (x, wg8, wu, wd), {}),
        ("w_gate_scale", "expected None", (x, wg, wu, wd), {"w_gate_scale": s8}),
    ]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_a_value_error_before_any_launch(monkeypatch, case, entry):
    name, message, args, kwargs = _bad_cases()[case]
    assert_refused_before_launch(monkeypatch, entry, swiglu.frozen_swiglu, lwtF.frozen_swiglu,
                                 [(swiglu, "_launch_dual_gemm"), (reference, "frozen_swiglu")],
                                 rf"^{name}: .*{message}", *args, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=0), r"^d_model: expected a positive int"),
    (dict(seed=1.5), r"^seed: expected an int"),
    (dict(recompute=1), r"^recompute: expected a bool"),
    (dict(frozen_dtype=torch.int8), r"^frozen_dtype: expected float32, float16, bfloat16 or float8_e4m3fn"),
    (dict(frozen_dtype=torch.float64), r"^frozen_dtype: expected float32, float16, bfloat16 or float8_e4m3fn"),
])
def test_layer_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrozenSwiGLU(**(dict(d_model=16, d_ff=24, seed=0) | kwargs))


def test_quantize_rows_fp8():
    """Per-row FP8 quantisation (shared by the kernel's wrapper and the reference, so checked on its own):
    each row's largest magnitude maps to 448, every element is within FP8's rounding (half a unit of its
    3-bit mantissa, or of its subnormal spacing) of the input, and an all-zero row gets scale 1 and zeros."""
    row_scales = torch.tensor([1e-3, 1.0, 50.0, 1e4, 0.0])[:, None]
    t = torch.randn(5, 300, generator=torch.Generator().manual_seed(14)) * row_scales
    t8, scale = reference.quantize_rows_fp8(t.to(DEVICE))
    assert t8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (5,)
    back = t8.float().cpu() * scale.cpu()[:, None]
    assert (back - t).abs().le(2.0**-4 * t.abs() + 2.0**-10 * scale.cpu()[:, None]).all()
    assert torch.equal(t8.float().abs().amax(dim=1).cpu()[:4], torch.full((4,), 448.0))
    assert scale[4] == 1 and not t8[4].float().any()
