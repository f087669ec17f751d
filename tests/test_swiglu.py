"""Frozen SwiGLU (kernels/swiglu.py) against the float64 reference: y, dx and dW_down, both saving
policies; nothing is computed or stored for the frozen projections."""
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl

import lwt.functional as lwtF
from kernels import reference
from kernels import swiglu
from lwt.layers import DecoderBlock, FrozenSwiGLU
from tests.helpers import ENTRIES, assert_refused_before_launch, grads
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
FP8_HERE = not CUDA or torch.cuda.get_device_capability() >= (8, 9)  # the interpreter, or FP8 tensor cores
needs_fp8 = pytest.mark.skipif(not FP8_HERE, reason="FP8 needs compute capability 8.9+")

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
    FP8 values and the comparison of y and dW_down is as tight as for the other dtypes. dx, whose
    operands the kernel also rounds to FP8, is checked twice: within the bound of that rounding against
    the reference, and tightly against the FP8 operands the kernel wrote (captured at the dx GEMM)."""
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
    _compare(x, wg, wu, wd, dy, recompute, scales)


def _compare(x, wg, wu, wd, dy, recompute, scales=None):
    """The kernel's y, dx and dW_down for these operands, in whatever layout, against the float64 reference,
    with the reference in x's dtype as the yardstick (scales: FP8 weights' w_gate_scale and w_up_scale,
    see _check)."""
    scales = scales or {}
    fp8 = bool(scales)
    D, F = x.shape[-1], wg.shape[0]

    def kernel(x, wd):
        return swiglu.frozen_swiglu(x, wg, wu, wd, recompute, **scales)

    def ref(x, wd):
        upcast = x.dtype == torch.float64 and not fp8  # FP8 weights are upcast by the reference itself
        return reference.frozen_swiglu(x, wg.to(x.dtype) if upcast else wg, wu.to(x.dtype) if upcast else wu, wd,
                                       **scales)

    operands = []
    launch_dx = swiglu._launch_fp8_dx
    with mock.patch.object(swiglu, "_launch_fp8_dx", lambda *a, **k: operands.append(a[:3]) or launch_dx(*a, **k)):
        (y,), (dx, dwd) = grads(kernel, [x, wd], [dy])
    (y64,), (dx64, dwd64) = grads(ref, [x.double(), wd.double()], [dy.double()])
    (y_ref,), (dx_ref, dwd_ref) = grads(ref, [x, wd], [dy])
    tokens = x.numel() // D
    assert_close("y", y, y64, y_ref, reduced_over=F)
    if fp8:
        _assert_fp8_dx(dx, dx64, dx_ref, x, wg, scales["w_gate_scale"], wu, scales["w_up_scale"], wd, dy)
        _assert_dx_from_fp8_operands(dx.reshape(-1, D), operands)
    else:
        assert_close("dx", dx, dx64, dx_ref, reduced_over=2 * F)
    assert_close("dw_down", dwd, dwd64, dwd_ref, reduced_over=tokens)


# Input precision of each dtype (unit roundoff), for the FP8 dx bound below.
_UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _block_steps(scale: torch.Tensor, n: int) -> torch.Tensor:
    """Per-block FP8 scales (rows, blocks of FP8_GRAD_BLOCK) spread over the n elements of each row, float64."""
    return scale.double().repeat_interleave(swiglu.FP8_GRAD_BLOCK, dim=1)[:, :n]


def _fp8_rounding(t: torch.Tensor, step) -> torch.Tensor:
    """How far FP8 (e4m3) quantisation with scale `step` may move each element of t: half a unit of its
    3-bit mantissa (2^-4 relative) or, below its normal range, half its subnormal step (2^-10 · step)."""
    return 2.0**-4 * t.abs() + 2.0**-10 * step


def _assert_dx_from_fp8_operands(dx, operands):
    """dx against its FP8 operands as the kernel wrote them, one (a8, block scales, transposed weights)
    per token chunk: every byte written (NaN bytes are the poison the buffers start with, and the
    interpreter would read them as 480) and dx = dequantised a8 times wtᵀ to fp32 roundoff."""
    a8 = torch.cat([a for a, _, _ in operands])
    scale = torch.cat([sa for _, sa, _ in operands])
    wt = operands[0][2]
    assert a8.shape[0] == dx.shape[0]
    for name, t in (("a8", a8), ("transposed weights", wt)):  # the padding columns included
        assert not ((t.view(torch.uint8) & 0x7F) == 0x7F).any(), f"{name}: unwritten (NaN-poisoned) bytes"
    deq = a8.double() * _block_steps(scale, a8.shape[1])
    same = (deq.float() @ wt.float().t()).to(dx.dtype)
    assert_close("dx from its FP8 operands", dx, deq @ wt.double().t(), same, reduced_over=a8.shape[1])


def _fp8_dx_operands64(x, wg8, sg, wu8, su, wd, dy, dh=None):
    """In float64, from the same FP8 forward the kernel runs: a_gate = dg·s_gate and a_up = du·s_up, the
    (tokens, F) operands the FP8 backward quantises, whose products with w8_gate, w8_up make dx. dh: the
    (tokens, F) dy·W_down to start from, if not computed here."""
    D = x.shape[-1]
    x8, sx = reference.quantize_rows_fp8(x.reshape(-1, D))
    xq = x8.double() * sx.double()[:, None]
    g = xq @ (wg8.double() * sg.double()[:, None]).t()
    u = xq @ (wu8.double() * su.double()[:, None]).t()
    sig = torch.sigmoid(g)
    dh = dy.reshape(-1, D).double() @ wd.double() if dh is None else dh.double()
    return dh * u * sig * (1 + g * (1 - sig)) * sg.double(), dh * g * sig * su.double()


def _assert_fp8_dx(dx, dx64, dx_ref, x, wg8, sg, wu8, su, wd, dy):
    """With FP8 frozen weights the backward also quantises its dx operands (dg·s_gate, du·s_up) to FP8 in
    blocks of FP8_GRAD_BLOCK features, so dx differs from the reference's (exact through the dequantised
    weights) by that rounding: per operand at most half a unit of e4m3's 3-bit mantissa (2^-4 relative)
    or, below e4m3's normal range, half its subnormal step (2^-10 of the block's scale). Checked element
    by element against that bound carried through |w8| (the block scales taken from the float64
    operands), plus the input rounding the operands carry in x's dtype and the output's own roundoff."""
    a_g, a_u = _fp8_dx_operands64(x, wg8, sg, wu8, su, wd, dy)
    unit = _UNIT[dx.dtype]
    bound = torch.zeros_like(dx64.reshape(a_g.shape[0], -1))
    for a, w8 in ((a_g, wg8), (a_u, wu8)):
        _, scale = reference.quantize_blocks_fp8(a, swiglu.FP8_GRAD_BLOCK)
        bound += (_fp8_rounding(a, _block_steps(scale, a.shape[1])) + 4 * unit * a.abs()) @ w8.double().abs()
    scale = dx64.abs().max().item() or 1.0
    ref_err = (dx_ref.double() - dx64).abs().max().item()
    err = (dx.double() - dx64).reshape(bound.shape).abs()
    allowed = bound + 2 * ref_err + 4 * unit * scale
    worst = (err - allowed).max().item()
    assert worst <= 0, f"dx ({dx.dtype}): an error exceeds the FP8 rounding bound by {worst:.3e} (max|dx| {scale:.3e})"


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,F", SHAPES + CUDA_SHAPES)
def test_frozen_swiglu_matches_float64_reference(shape, F, dtype, recompute):
    _check(shape, F, dtype, recompute)


def test_reference_is_silu_of_the_gate_times_the_up_projection():
    """The reference the kernel is checked against, pinned to the formula written out with torch's own silu:
    y = (silu(x W_gateᵀ) · x W_upᵀ) W_downᵀ (the gate, not the up projection, goes through the silu)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    wg, wu, wd = _weights(16, 24, gen, torch.float64)
    x, wg, wu, wd = x.to(DEVICE), wg.to(DEVICE), wu.to(DEVICE), wd.to(DEVICE)
    expected = (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
    torch.testing.assert_close(reference.frozen_swiglu(x, wg, wu, wd), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_frozen_weights_in_lower_precision(recompute):
    """fp16 frozen matrices beside fp32 activations: cast tile by tile in the kernel."""
    _check((9, 40), 72, torch.float32, recompute, frozen_dtype=torch.float16, seed=1)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,F", [SHAPES[1], SHAPES[2], CUDA_SHAPES[0]])
@needs_fp8
def test_fp8_frozen_weights(shape, F, dtype, recompute):
    """float8_e4m3fn frozen weights with per-channel scales, x quantised per token: the FP8 dual GEMM
    (forward, and the recomputing backward) against the reference's FP8 math in float64; dx, from the
    FP8 dx GEMM, within the rounding of its FP8 operands (_assert_fp8_dx). The interpreter sums the FP8
    products in fp32; Hopper's FP8 MMAs sum each K step in a ~14-bit accumulator, so on a GPU the bf16
    outputs, whose rounding dominates that, are checked (fp16's 11 bits come close to it)."""
    if CUDA and dtype != torch.bfloat16:
        pytest.skip("on a GPU the FP8 MMA's ~14-bit accumulator bounds the error of fp32 and fp16 outputs")
    _check(shape, F, dtype, recompute, frozen_dtype=torch.float8_e4m3fn, seed=5)


@triton.jit
def _rtne_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, swiglu._e4m3_rtne(tl.load(X + offs)))


@pytest.mark.skipif(CUDA, reason="the interpreter's rounding; on a GPU the same helper runs compiled")
def test_fp8_rounding_matches_torch():
    """The FP8 backward rounds in fp32 before its cast (the interpreter's own fp32 -> FP8 cast mis-rounds):
    every finite e4m3 value, every tie between neighbours, and random values over the normal and
    subnormal ranges round as torch's float8_e4m3fn conversion does."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].sort().values
    gen = torch.Generator().manual_seed(15)
    values = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, (torch.rand(2000, generator=gen) - 0.5) * 896,
                        torch.randn(2000, generator=gen) * 0.02, (torch.rand(2000, generator=gen) - 0.5) * 2.0**-5])
    x = torch.zeros(8192)
    x[:values.numel()] = values
    y = torch.empty_like(x)
    _rtne_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y, x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", DTYPES)
@needs_fp8
def test_fp8_row_quantiser_matches_reference(dtype):
    """The forward's per-token FP8 quantisation of x (a Triton kernel) gives the values and scales of
    kernels.reference.quantize_rows_fp8: rows over six decades, an all-zero row, D 300 (more than one
    pass of the interpreter's 256-wide block, the last partial), a strided view."""
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(7, 310, generator=gen) * torch.logspace(-3, 3, 7)[:, None]
    x[5] = 0
    x = x.to(DEVICE, dtype)[:, 5:305]
    x8, scale = swiglu._quantize_rows(x)
    want8, want_scale = reference.quantize_rows_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == (7, 300)
    assert torch.equal(scale, want_scale) and torch.equal(x8.float(), want8.float())  # -0 == +0


@pytest.mark.parametrize("out_dtype", DTYPES)
@needs_fp8
def test_fp8_dx_gemm(out_dtype):
    """The FP8 dx GEMM alone: a8 (FP8, one scale per 128 columns of a row; blocks of very different
    magnitudes, one all zero) times wtᵀ, against float64 on the dequantised operands: exact products
    summed in fp32, so as tight as an fp32 GEMM (on a GPU, bf16 outputs only)."""
    if CUDA and out_dtype != torch.bfloat16:
        pytest.skip("on a GPU the FP8 MMA's ~14-bit accumulator bounds the error of fp32 and fp16 outputs")
    gen = torch.Generator().manual_seed(16)
    T, K, D = 19, 3 * swiglu.FP8_GRAD_BLOCK, 45
    a = torch.randn(T, K, generator=gen) * torch.logspace(-3, 2, K // swiglu.FP8_GRAD_BLOCK).repeat_interleave(
        swiglu.FP8_GRAD_BLOCK)
    a[4, swiglu.FP8_GRAD_BLOCK:2 * swiglu.FP8_GRAD_BLOCK] = 0
    a8, sa = reference.quantize_blocks_fp8(a, swiglu.FP8_GRAD_BLOCK)
    wt = (torch.randn(D, K, generator=gen) / 4).to(torch.float8_e4m3fn)
    a8, sa, wt = a8.to(DEVICE), sa.to(DEVICE), wt.to(DEVICE)
    out = torch.full((T, D), float("nan"), dtype=out_dtype, device=DEVICE)
    swiglu._launch_fp8_dx(a8, sa, wt, out)
    deq = a8.double() * _block_steps(sa, K)
    want = deq @ wt.double().t()
    same = (deq.float() @ wt.float().t()).to(out_dtype)
    assert_close("dx", out, want, same, reduced_over=K)


@pytest.mark.parametrize("stored", [False, True], ids=["recomputed-gate-up", "stored-gate-up"])
@needs_fp8
def test_fp8_backward_epilogue_quantises_blocks(stored):
    """The FP8 backward's epilogue (in the recomputing dual GEMM, or from stored g and u) writes dg·s_gate
    and du·s_up as FP8 blocks: each block's scale is its max|value| / 448 (1 for an all-zero block: a
    token whose dh is zero), each value within FP8's rounding of the float64 operand, and the columns
    past F, up to whole blocks, zero. F 130: two blocks per half, the second mostly padding. The float64
    operands start from the same dh as the kernel; the kernel's own operands carry its roundoff (fp32,
    or on a GPU the recomputed gate/up GEMM's FP8 MMA accumulator, ~14 bits: DeepSeek-V3 §3.3.2)."""
    gen = torch.Generator().manual_seed(17)
    T, D, F = 21, 48, 130
    x = torch.randn(T, D, generator=gen).to(DEVICE)
    wg, wu, wd = _weights(D, F, gen, torch.float32)
    (wg8, sg), (wu8, su) = reference.quantize_rows_fp8(wg), reference.quantize_rows_fp8(wu)
    dy = torch.randn(T, D, generator=gen).to(DEVICE)
    dy[3] = 0
    dh = dy @ wd
    a8, sa, views = swiglu._fp8_dx_operands(T, F, DEVICE)
    if stored:
        x8, sx = reference.quantize_rows_fp8(x)
        xq = x8.float() * sx[:, None]
        g, u = xq @ (wg8.float() * sg[:, None]).t(), xq @ (wu8.float() * su[:, None]).t()
        h, dg, du = swiglu._launch_bwd_elementwise(g, u, dh, w_scales=(sg, su), fp8_out=views)
    else:
        h, dg, du = swiglu._launch_dual_gemm(x, wg8, wu8, 2, dh, w_scales=(sg, su), fp8_out=views)
    assert dg is None and du is None and torch.isfinite(h).all()
    qb = swiglu.FP8_GRAD_BLOCK
    f_pad = swiglu._padded_features(F)
    for part, a64 in enumerate(_fp8_dx_operands64(x, wg8, sg, wu8, su, wd, dy, dh=dh)):
        q = a8[:, part * f_pad:(part + 1) * f_pad].double()
        scale = sa[:, part * f_pad // qb:(part + 1) * f_pad // qb].double()
        assert torch.equal(q[:, F:], torch.zeros_like(q[:, F:])), "padding columns not zero"
        want_scale = torch.nn.functional.pad(a64, (0, f_pad - F)).abs().view(T, -1, qb).amax(-1) / 448
        assert torch.equal(scale[3], torch.ones_like(scale[3])) and torch.equal(q[3], torch.zeros_like(q[3]))
        want_scale[3] = 1
        roundoff = 2.0**-10 if CUDA and not stored else 1e-5  # of an operand before it is rounded to FP8
        torch.testing.assert_close(scale, want_scale, rtol=roundoff, atol=0)
        deq = q[:, :F] * _block_steps(scale, F)
        step = _block_steps(want_scale, F)
        err = (deq - a64).abs() - (_fp8_rounding(a64, step) + roundoff * 448 * step)  # 448 · step: the block max
        assert err.max().item() <= 0, f"part {part}: a value beyond FP8 rounding by {err.max().item():.3e}"


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_columns_past_the_model_dim_are_never_read(recompute):
    """D 33 ends the dual GEMM in a partial K step (16 wide on the interpreter): x and the frozen weights are
    the first D columns of buffers whose 8 further columns are NaN, which that step's tiles reach. Each
    operand's load there must be masked: a NaN times the other operand's masked-out zero is still NaN."""
    gen = torch.Generator().manual_seed(17)
    T, D, F = 10, 33, 70

    def padded(rows, cols, scale):
        buf = torch.full((rows, cols + 8), float("nan"), device=DEVICE)
        return buf[:, :cols].copy_(torch.randn(rows, cols, generator=gen) * scale)

    x, wg, wu = padded(T, D, 1.0), padded(F, D, D ** -0.5), padded(F, D, D ** -0.5)
    wd = (torch.randn(D, F, generator=gen) * F ** -0.5).to(DEVICE)
    dy = torch.randn(T, D, generator=gen).to(DEVICE)

    _compare(x, wg, wu, wd, dy, recompute)


@pytest.mark.parametrize("frozen_dtype", [torch.float32, torch.float16], ids=["fp32-frozen", "fp16-frozen"])
def test_fp32_activations_take_ieee_dots(monkeypatch, frozen_dtype):
    """fp32 activations get IEEE fp32 dots, no TF32 (module docstring), in the forward and the recomputing
    backward, whatever the frozen weights' dtype. The interpreter computes each tl.dot in full precision
    whatever it is told: on the CPU only the flag the launches pass can show a TF32 dot."""
    seen = []
    real = swiglu._dual_gemm.launch
    monkeypatch.setattr(swiglu._dual_gemm, "launch",
                        lambda *a, **kw: seen.append(kw["INPUT_PRECISION"]) or real(*a, **kw))
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(5, 24, generator=gen).to(DEVICE).requires_grad_()
    wg, wu, wd = _weights(24, 40, gen, torch.float32, frozen_dtype)
    swiglu.frozen_swiglu(x, wg, wu, wd, recompute=True).sum().backward()
    assert seen == ["ieee", "ieee"], seen  # the forward, the backward's recomputation


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
def test_backward_in_token_chunks(monkeypatch, recompute):
    """A small CHUNK_ELEMENTS makes both passes walk 37 tokens in chunks of 2: h of DW_GROUP_CHUNKS (4)
    chunks at a time feeds one dW_down GEMM, so 5 groups (the last ragged) summed in fp32, in column
    blocks of CHUNK_ELEMENTS // (2·D) = 2; 7 tokens are one group: one GEMM, no fp32 sum. D 50 ends each
    GEMM in a partial K step. Also with FP8 frozen weights (9 tokens)."""
    monkeypatch.setattr(swiglu, "CHUNK_ELEMENTS", 2 * 130)
    products = []
    real_mm = swiglu._mm_fp32
    monkeypatch.setattr(swiglu, "_mm_fp32", lambda a, b: products.append(a.shape[1]) or real_mm(a, b))
    _check((37, 50), 130, torch.float32, recompute, seed=2)
    assert products == [8] * 4 * 65 + [5] * 65  # tokens per GEMM: 4 whole groups, the ragged one
    _check((37, 50), 130, torch.float16, recompute, seed=3)
    products.clear()
    _check((7, 50), 130, torch.float32, recompute, seed=4)
    assert products == []
    if FP8_HERE:  # FP8: one FP8 dx GEMM per chunk (bf16 on a GPU, as in test_fp8_frozen_weights)
        calls = []
        real = swiglu._launch_fp8_dx
        monkeypatch.setattr(swiglu, "_launch_fp8_dx", lambda *a, **k: calls.append(1) or real(*a, **k))
        dtype = torch.bfloat16 if CUDA else torch.float16
        _check((9, 50), 130, dtype, recompute, frozen_dtype=torch.float8_e4m3fn, seed=14)
        assert len(calls) == 5


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
    and frozen weights, over token chunks of one token: dW_down sums three groups of up to four."""
    monkeypatch.setattr(swiglu, "CHUNK_ELEMENTS", 40)
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
        assert (err <= _fp8_rounding(exact, scale[:, None])).all(), name
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
        ("w_gate", "expected shape \\(F, 16\\) with F >= 1", (x, wg[:0], wu[:0], wd[:, :0]), {}),
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
        ("w_gate", "expected a tensor on", (x, wg.to("meta"), wu, wd), {}),
        ("w_up", "expected a tensor on", (x, wg, wu.to("meta"), wd), {}),
        ("w_up_scale", "expected a tensor on", (x, wg8, wu8, wd), {"w_gate_scale": s8, "w_up_scale": s8.to("meta")}),
        ("w_gate_scale", "expected a frozen tensor", (x, wg8, wu8, wd),
         {"w_gate_scale": s8.clone().requires_grad_(), "w_up_scale": s8}),
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


def test_state_dicts_cross_the_fp8_boundary():
    """A full-precision layer's state_dict loads into an FP8 layer as that layer would have quantised the
    same matrices (per-channel scales included), and an FP8 one loads into a full-precision layer
    dequantised, strictly, inside a DecoderBlock too; the caller's dict is left as it was."""
    full = FrozenSwiGLU(32, 80, seed=7)
    want = FrozenSwiGLU(32, 80, seed=7, frozen_dtype=torch.float8_e4m3fn)
    fp8 = FrozenSwiGLU(32, 80, seed=9, frozen_dtype=torch.float8_e4m3fn)
    given = full.state_dict()
    keys = list(given)
    fp8.load_state_dict(given)
    assert list(given) == keys and given["w_gate"].dtype == torch.float32
    for name in fp8.frozen_buffer_names():
        assert torch.equal(getattr(fp8, name).float(), getattr(want, name).float()), name
    back = FrozenSwiGLU(32, 80, seed=1)
    back.load_state_dict(want.state_dict())
    for name in ("w_gate", "w_up"):
        assert torch.equal(getattr(back, name), getattr(want, name).float() * getattr(want, f"{name}_scale")[:, None])
    block = DecoderBlock(32, 2, 80, frozen_seed=4)
    block8 = DecoderBlock(32, 2, 80, frozen_seed=5, frozen_dtype=torch.float8_e4m3fn)
    block8.load_state_dict(block.state_dict())
    assert torch.equal(block8.mlp.w_up_scale, reference.quantize_rows_fp8(block.mlp.w_up)[1])


def test_quantize_rows_fp8():
    """Per-row FP8 quantisation (shared by the kernel's wrapper and the reference, so checked on its own):
    each row's largest magnitude maps to 448, every element is within FP8's rounding (half a unit of its
    3-bit mantissa, or of its subnormal spacing) of the input, and an all-zero row gets scale 1 and zeros."""
    row_scales = torch.tensor([1e-3, 1.0, 50.0, 1e4, 0.0])[:, None]
    t = torch.randn(5, 300, generator=torch.Generator().manual_seed(14)) * row_scales
    t8, scale = reference.quantize_rows_fp8(t.to(DEVICE))
    assert t8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (5,)
    back = t8.float().cpu() * scale.cpu()[:, None]
    assert (back - t).abs().le(_fp8_rounding(t, scale.cpu()[:, None])).all()
    assert torch.equal(t8.float().abs().amax(dim=1).cpu()[:4], torch.full((4,), 448.0))
    assert scale[4] == 1 and not t8[4].float().any()


def test_quantize_blocks_fp8():
    """FP8 quantisation per block of a row (the reference of the FP8 backward's operands): blocks of 128
    with a partial last one (300 = 2 × 128 + 44), one scale each; a block's largest magnitude maps to
    448, every element is within FP8's rounding of the input, an all-zero block gets scale 1 and zeros;
    and one block per row is quantize_rows_fp8."""
    gen = torch.Generator().manual_seed(18)
    t = torch.randn(3, 300, generator=gen) * torch.tensor([1e-3, 1.0, 1e4])[:, None]
    t[:, 256:] *= 50  # the partial block on another scale than the rest of its row
    t[1, 128:256] = 0
    t8, scale = reference.quantize_blocks_fp8(t.to(DEVICE), 128)
    assert t8.shape == (3, 300) and t8.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    step = _block_steps(scale.cpu(), 300)
    back = t8.double().cpu() * step
    assert (back - t).abs().le(_fp8_rounding(t, step)).all()
    peaks = torch.stack([t8.float().cpu()[:, i:i + 128].abs().amax(dim=1) for i in (0, 128, 256)], dim=1)
    nonzero = torch.ones(3, 3, dtype=torch.bool)
    nonzero[1, 1] = False
    assert torch.equal(peaks[nonzero], torch.full((8,), 448.0)) and scale[1, 1] == 1 and peaks[1, 1] == 0
    rows8, row_scale = reference.quantize_rows_fp8(t.to(DEVICE))
    whole8, whole_scale = reference.quantize_blocks_fp8(t.to(DEVICE), 300)
    assert torch.equal(rows8.view(torch.uint8), whole8.view(torch.uint8)) and torch.equal(row_scale, whole_scale[:, 0])


@pytest.mark.parametrize("scaled,precision,mode,frozen,use", [
    (False, "tf32", 0, torch.bfloat16, "fwd"), (False, "tf32", 2, torch.bfloat16, "bwd"),
    (False, "ieee", 1, torch.float32, "fp32"), (False, "ieee", 2, torch.bfloat16, "fp32_cast"),
    (True, "tf32", 0, torch.float8_e4m3fn, "fp8")])
def test_gpu_gemm_lists_prune_in_their_order(monkeypatch, scaled, precision, mode, frozen, use):
    """The dual GEMM's prune keeps exactly the list for the launch's mode and dtypes, in that list's order
    (LWT_AUTOTUNE=0 launches its first)."""
    monkeypatch.setattr(swiglu, "interpreting", lambda: False)
    configs = swiglu._gemm_configs()  # the merged GPU list (interpreting is off here)
    meta = {"SCALED": scaled, "INPUT_PRECISION": precision, "MODE": mode, "WG": torch.empty(0, dtype=frozen),
            "X": torch.empty(0, dtype=torch.float32 if precision == "ieee" else torch.bfloat16)}
    kept = swiglu._prune_gemm(configs, {}, **meta)
    assert [(*c.kwargs.values(), c.num_warps, c.num_stages) for c in kept] == swiglu._GEMM_CONFIGS[use]


@needs_fp8
def test_fp8_scale_of_an_underflowing_max():
    """A finite row (or block) whose max|.| / 448 underflows fp32 (a subnormal max below 448 x fp32's least
    subnormal) gets scale 1 and zeros, as an all-zero one does, in the reference and the kernel (a zero
    scale made its entries inf / NaN)."""
    t = torch.zeros(2, 4)
    t[0] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    t[1, 0] = 1e-44
    for t8, scale in (reference.quantize_rows_fp8(t), swiglu._quantize_rows(t.to(DEVICE))):
        assert scale[1].item() == 1 and not t8[1].float().any(), (scale, t8)
    b8, bscale = reference.quantize_blocks_fp8(t, 2)
    assert bscale[1].tolist() == [1.0, 1.0] and not b8[1].float().any()


@pytest.mark.parametrize("saved", [False, True], ids=["recompute", "saved-gate-up"])
def test_backward_launcher_returns_the_weights_dtype_over_several_groups(monkeypatch, saved):
    """swiglu_bwd (the op a compiled graph calls, whose fake gives w_down's dtype) sums several dW_down
    groups in fp32 and returns dW_down in w_down's dtype, dx in dy's: autograd would cast a stray fp32
    gradient silently, a traced graph would not."""
    monkeypatch.setattr(swiglu, "CHUNK_ELEMENTS", 2 * 40)  # chunks of 2 tokens, groups of 8: 3 groups
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(19, 24, generator=gen).to(DEVICE, torch.float16)
    wg, wu, wd = _weights(24, 40, gen, torch.float16)
    dy = torch.randn(19, 24, generator=gen).to(DEVICE, torch.float16)
    _, g, u = swiglu.swiglu_fwd(x, wg, wu, wd, True)
    args = (None, g, u) if saved else (x, None, None)
    dx, dw = swiglu.swiglu_bwd(dy, args[0], wg, wu, wd, args[1], args[2])
    assert (dx.dtype, dx.shape, dw.dtype, dw.shape) == (torch.float16, (19, 24), torch.float16, (24, 40))
    h = torch.nn.functional.silu(x.double() @ wg.double().t()) * (x.double() @ wu.double().t())
    assert_close("dW_down", dw, dy.double().t() @ h, (dy.float().t() @ h.float()).half(), reduced_over=19)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-gate-up", "recompute"])
@pytest.mark.parametrize("wanted", ["x", "w_down"])
def test_backward_asks_only_for_the_wanted_gradient(monkeypatch, recompute, wanted):
    """Only x or only w_down requiring grad: the backward launcher is asked for that gradient alone (the
    dx pass, two GEMMs of T·D·F each, is skipped for a frozen prefix's input; dW_down for a frozen w_down)."""
    calls = []
    real = swiglu.swiglu_bwd
    monkeypatch.setattr(swiglu, "swiglu_bwd", lambda *a, **k: calls.append((k["need_dx"], k["need_dw_down"])) or
                        real(*a, **k))
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(5, 32, generator=gen).to(DEVICE)
    wg, wu, wd = _weights(32, 40, gen, torch.float32)
    leaf = (x if wanted == "x" else wd).requires_grad_()
    swiglu.frozen_swiglu(x, wg, wu, wd, recompute).sum().backward()
    assert calls == [(wanted == "x", wanted == "w_down")]
    assert leaf.grad is not None


def test_a_d_ff_past_the_backward_grid_is_refused():
    """The backward's elementwise kernel launches one program per 128 of d_ff on its grid's second dim,
    which CUDA caps at 65535: a wider F is a ValueError before any launch (zero-stride tensors)."""
    f = 65535 * 128 + 1
    x = torch.zeros(2, 16, device=DEVICE)
    w = torch.zeros(1, device=DEVICE).expand(f, 16)
    with pytest.raises(ValueError, match=r"^w_gate: expected a d_ff \(first dim\) of at most 8388480 on the "
                                         r"Triton path .*, got 8388481$"):
        swiglu.frozen_swiglu(x, w, w, torch.zeros(1, device=DEVICE).expand(16, f))
