"""RMSNorm kernel (kernels/rmsnorm.py) against the float64 reference: output and every gradient."""
import pytest
import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._common import _ROW_WARPS, prune_row_configs
from kernels import rmsnorm as rmsnorm_kernels
from tests.helpers import HEAVY
from tests.helpers import grads as _grads
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
# (> 16384, up to 65536); zero rows. Inputs are N(0, 1), so mean(x²) ~ 1: the larger eps values make
# eps a visible part of rstd (the chunked paths included), the small ones test the usual setting.
SHAPES = [
    # N = 1: the norm removes the row's only direction, so dx = g·rstd·(1 - ŝ²) = g·rstd·eps/(s²+eps) is
    # computed as a difference that loses ~s²/eps units of roundoff, in any implementation of the
    # general formula. With s² up to ~20 (x + a residual of scale 2), eps = 10 keeps that factor near 2.
    pytest.param((1, 1), 10.0, id="M1-N1"),
    pytest.param((3, 7), 1e-6, id="M3-N7"),
    pytest.param((37, 64), 0.3, id="M37-N64"),
    pytest.param((2, 5, 123), 1e-5, id="B2-S5-N123"),
    pytest.param((5, 1000), 1e-6, id="M5-N1000"),
    pytest.param((29, 3000), 0.1, id="M29-N3000"),
    pytest.param((2, 4096), 1e-6, id="M2-N4096"),
    pytest.param((3, 10000), 0.5, id="M3-N10000"),
    pytest.param((2, 20000), 0.5, id="M2-N20000"),
    pytest.param((2, 65536), 1e-6, id="M2-N65536"),
    pytest.param((0, 16), 1e-6, id="M0-N16"),
]
# Larger shapes for the compiled kernels: tens of row blocks per persistent program, every path.
CUDA_SHAPES = [
    pytest.param((4099, 4096), 1e-6, id="M4099-N4096", marks=pytest.mark.cuda),
    pytest.param((8, 127, 2048), 1e-6, id="B8-S127-N2048", marks=pytest.mark.cuda),
    pytest.param((1000, 12288), 0.5, id="M1000-N12288", marks=pytest.mark.cuda),
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


def _compare(eps, inputs, cotangents, weighted=True):
    """Kernel vs float64 reference vs the PyTorch reference in the inputs' dtype, outputs and every
    gradient. inputs: [x, weight] or [x, weight, residual]; without `weighted`, [x] or [x, residual] and
    weight=None. cotangents: for y, and for s or None."""
    def split(a):
        return (a[0], a[1], a[2:]) if weighted else (a[0], None, a[1:])

    def kernel(*a):
        x, w, rest = split(a)
        return rmsnorm_kernels.rms_norm(x, w, eps, *rest)

    def ref(*a):
        x, w, rest = split(a)
        return reference.rms_norm(x, w, eps, *rest)

    outs, grads = _grads(kernel, inputs, cotangents)
    outs64, grads64 = _grads(ref, [t.double() for t in inputs], [c.double() if c is not None else None for c in cotangents])
    outs_ref, grads_ref = _grads(ref, inputs, cotangents)
    for name, a, e, r, like in zip(["y", "s"], outs, outs64, outs_ref, [inputs[0], inputs[0]]):
        assert a.dtype == like.dtype
        assert_close(name, a, e, r)
    rows = inputs[0].numel() // inputs[0].shape[-1]
    names = ["dx", "dweight", "dresidual"] if weighted else ["dx", "dresidual"]
    for name, a, e, r, like in zip(names, grads, grads64, grads_ref, inputs):
        assert a.dtype == like.dtype
        assert_close(name, a, e, r, reduced_over=rows if name == "dweight" else 1)


def _cotangent(x, layout, gen):
    """dy partly aligned with x: then mean(g·ŝ), the backward's row reduction, is O(1) instead of
    O(1/√N) as for an independent dy, so an error in it cannot hide (layout kept: it is updated in place)."""
    dy = _make(x.shape, x.dtype, layout, gen)
    return dy.mul_(0.6).add_(x, alpha=0.8)


def _check_against_reference(shape, eps, dtype, residual, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = _make(shape, dtype, layout, gen)
    w = _make(shape[-1:], dtype, "contiguous", gen) + 1.0  # a scale around 1, with both signs possible
    inputs = [x, w]
    if residual is not None:
        inputs.append(_make(shape, dtype, layout, gen, scale=2.0))
    cots = [_cotangent(x, layout, gen)]
    if residual is not None:
        # "y_and_s": the returned residual stream s is used downstream too, so a gradient reaches it.
        cots.append(_make(shape, dtype, layout, gen) if residual == "y_and_s" else None)
    _compare(eps, inputs, cots)


def _reference_grid():
    """Every shape x residual mode x layout x dtype, but for the widest CPU row: through the interpreter
    its 16 column chunks take seconds a case (over half of this grid's time for 18 of its ~200 cases),
    and its path is the one M2-N20000 takes through every combination (both passes chunked; 20000 also
    ends in a ragged chunk). On the CPU it meets each residual mode, layout and dtype once; on a GPU it
    runs them all."""
    widest_on_cpu = {("y_and_s", "strided", "fp32"), ("y_only", "contiguous", "fp16"), (None, "strided", "bf16")}
    for shape in SHAPES + CUDA_SHAPES:
        for residual in [None, "y_only", "y_and_s"]:
            for layout in ["contiguous", "strided"]:
                for dtype in DTYPES:
                    if shape.id == "M2-N65536" and not CUDA and (residual, layout, dtype.id) not in widest_on_cpu:
                        continue
                    yield pytest.param(*shape.values, residual, layout, *dtype.values,
                                       marks=[*shape.marks, *dtype.marks], id=f"{shape.id}-{residual}-{layout}-{dtype.id}")


@pytest.mark.parametrize("shape,eps,residual,layout,dtype", _reference_grid())
def test_rms_norm_matches_float64_reference(shape, eps, residual, layout, dtype):
    _check_against_reference(shape, eps, dtype, residual, layout)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("residual", [False, True], ids=["y_only", "y_and_s"])
@pytest.mark.parametrize("shape,eps", [pytest.param((3, 7), 1e-6, id="M3-N7"),
                                       pytest.param((2, 5, 123), 1e-5, id="B2-S5-N123"),
                                       pytest.param((3, 10000), 0.5, id="M3-N10000"),
                                       pytest.param((2, 20000), 0.5, id="M2-N20000"),
                                       pytest.param((1000, 12288), 0.5, id="M1000-N12288", marks=pytest.mark.cuda)])
def test_without_weight_matches_float64_reference(shape, eps, residual, dtype):
    """weight=None (torch.nn.RMSNorm(elementwise_affine=False)): no scale, no weight read, no dweight;
    y, s and every gradient against the float64 reference, through each path (rows whole, the backward
    chunked, both passes chunked)."""
    gen = torch.Generator().manual_seed(8)
    x = _make(shape, dtype, "strided", gen)
    inputs = [x] + ([_make(shape, dtype, "contiguous", gen, scale=2.0)] if residual else [])
    cots = [_cotangent(x, "strided", gen)] + ([_make(shape, dtype, "contiguous", gen)] if residual else [])
    _compare(eps, inputs, cots, weighted=False)


@pytest.mark.parametrize("shape", [pytest.param((300, 48), id="M300-N48"), pytest.param((40, 10000), id="M40-N10000"),
                                   pytest.param((24, 20000), id="M24-N20000")])
def test_many_persistent_programs(monkeypatch, shape):
    """With the interpreter's default 3 'multiprocessors' a chunked backward (3+ column blocks) gets a
    single row program; pretend to have 16 so several programs each loop over several row blocks and
    the dw partial rows of all of them are summed, on every path."""
    monkeypatch.setattr(rmsnorm_kernels, "num_sms", lambda device: 16)
    gen = torch.Generator().manual_seed(5)
    x, r = _make(shape, torch.float32, "strided", gen), _make(shape, torch.float32, "strided", gen)
    w = _make(shape[-1:], torch.float32, "contiguous", gen)
    _compare(0.1, [x, w, r], [_cotangent(x, "strided", gen), _make(shape, torch.float32, "strided", gen)])


@HEAVY
def test_row_offsets_past_2_31_elements():
    """Row offsets are computed in int64: rows 2^30 elements apart in one (lazily allocated) buffer."""
    stride, n = 2**30, 64
    buf = torch.empty(2 * stride + n, dtype=torch.float16, device=DEVICE)
    x = buf.as_strided((3, n), (stride, 1))
    gen = torch.Generator().manual_seed(6)
    for i in range(3):
        x[i].copy_(torch.randn(n, generator=gen))
    w = torch.randn(n, generator=gen).to(DEVICE, torch.float16)
    _compare(1e-6, [x, w], [torch.randn(3, n, generator=gen).to(DEVICE, torch.float16)])


def test_transposed_and_unmergeable_inputs():
    """A last dim with non-unit stride and leading dims that cannot merge into one row stride are
    copied to rows first; results still match."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=gen).to(DEVICE).t()  # (6, 48), stride (1, 6)
    w = torch.randn(48, generator=gen).to(DEVICE)
    _compare(1e-6, [x, w], [torch.randn(6, 48, generator=gen).to(DEVICE)])
    x3 = torch.randn(4, 9, 32, generator=gen).to(DEVICE)[:, ::3, :]  # rows at two strides
    r3 = torch.randn(4, 9, 32, generator=gen).to(DEVICE)[:, 1::3, :]
    w3 = torch.randn(32, generator=gen).to(DEVICE)
    _compare(1e-6, [x3, w3, r3], [torch.randn(4, 3, 32, generator=gen).to(DEVICE)] * 2)


def test_gradient_of_expanded_and_transposed_cotangents():
    """dy arriving with stride 0 along rows (from a broadcast) and with a transposed layout."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=gen).to(DEVICE)
    w = torch.randn(40, generator=gen).to(DEVICE)
    for dy in (torch.randn(40, generator=gen).to(DEVICE).expand(6, 40), torch.randn(40, 6, generator=gen).to(DEVICE).t()):
        assert dy.stride(-1) != 1 or dy.stride(0) == 0
        _compare(1e-6, [x, w], [dy])


def test_weight_in_fp32_with_fp16_activations():
    """fp32 master weights under fp16 activations: y follows x's dtype, dweight the weight's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 200, generator=gen).to(DEVICE, torch.float16)
    w = torch.randn(200, generator=gen).to(DEVICE)
    _compare(1e-6, [x, w], [torch.randn(9, 200, generator=gen).to(DEVICE, torch.float16)])


def test_weight_without_grad_skips_dweight(monkeypatch):
    """A frozen weight: the backward is asked for no dw, allocates no partial sums, returns an empty one."""
    calls = []
    real = rmsnorm_kernels.rms_norm_bwd

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs["compute_dw"], out[1].numel()))
        return out

    monkeypatch.setattr(rmsnorm_kernels, "rms_norm_bwd", spy)
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE)
    y = rmsnorm_kernels.rms_norm(x, w)
    (dx,) = torch.autograd.grad(y, [x], torch.randn_like(y))
    assert calls == [(False, 0)] and torch.isfinite(dx).all()


@pytest.mark.parametrize("residual", [False, True], ids=["y_only", "residual"])
def test_no_backward_to_come_skips_autograd(monkeypatch, residual):
    """With no input requiring grad, or under no_grad, the launcher runs without the autograd.Function
    (no graph, less host time per call): the same outputs, bit for bit, as with a backward to come."""
    gen = torch.Generator().manual_seed(6)
    x, r = (torch.randn(2, 5, 48, generator=gen).to(DEVICE) for _ in range(2))
    w = torch.randn(48, generator=gen).to(DEVICE)
    res = r if residual else None
    want = rmsnorm_kernels.rms_norm(x.clone().requires_grad_(), w, 1e-5, res)
    monkeypatch.setattr(rmsnorm_kernels.RMSNormFunction, "apply", None)  # calling it would raise
    got = [rmsnorm_kernels.rms_norm(x, w, 1e-5, res)]
    with torch.no_grad():
        got.append(rmsnorm_kernels.rms_norm(x.clone().requires_grad_(), w, 1e-5, res))
    for outs in got:
        for a, b in zip(outs if residual else [outs], want if residual else [want]):
            assert a.grad_fn is None and a.shape == x.shape and torch.equal(a, b.detach())


@pytest.mark.parametrize("leaf", ["weight", "residual"])
def test_backward_to_come_for_weight_or_residual_alone(leaf):
    """x not requiring grad while the weight (or the residual) does: the autograd path, whose gradient
    for that input matches the float64 reference. The returned s = x + residual is then differentiable
    (through the residual): a gradient reaching s too reaches the residual."""
    gen = torch.Generator().manual_seed(7)
    x, r, dy, ds = (torch.randn(6, 40, generator=gen).to(DEVICE) for _ in range(4))
    w = torch.randn(40, generator=gen).to(DEVICE)

    def only(op, cast=lambda t: t):  # op with `leaf` as its one argument; x and the other input constants
        def fn(t):
            args = {"weight": cast(w), "residual": cast(r), leaf: t}
            return op(cast(x), args["weight"], 1e-6, args["residual"])
        return fn

    t = {"weight": w, "residual": r}[leaf]
    ds = ds if leaf == "residual" else None  # (s does not depend on the weight)
    _, (got,) = _grads(only(rmsnorm_kernels.rms_norm), [t], [dy, ds])
    _, (want,) = _grads(only(reference.rms_norm, torch.Tensor.double), [t.double()],
                        [dy.double(), None if ds is None else ds.double()])
    _, (same,) = _grads(only(reference.rms_norm), [t], [dy, ds])
    assert_close(f"d {leaf}", got, want, same, reduced_over=6 if leaf == "weight" else 1)


def test_forward_mode_ad_is_refused_not_dropped():
    """A dual x (forward-mode AD) does not require grad, yet its tangent must not be silently dropped:
    the op raises, as the autograd.Function (no jvp) does."""
    import torch.autograd.forward_ad as fwAD
    x, w = torch.randn(3, 16).to(DEVICE), torch.randn(16).to(DEVICE)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError):
            rmsnorm_kernels.rms_norm(fwAD.make_dual(x, torch.ones_like(x)), w)


def test_vmap_is_refused_as_the_readme_says_without_grad_too():
    """README: torch.func transforms run on the reference path only (the autograd.Function has no
    setup_context). Without a backward to come (no_grad, the launcher-only path) vmap raises that too,
    rather than handing Triton a BatchedTensor."""
    x, w = torch.randn(3, 4, 16).to(DEVICE), torch.randn(16).to(DEVICE)
    with torch.no_grad(), pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(lambda x: rmsnorm_kernels.rms_norm(x, w))(x)


def _leaf_pairs():
    def make(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)
    a, b = make(4, 32), make(4, 32)
    yield "leaves", a, b, a, b
    a, b = make(2, 2, 32), make(2, 2, 32)
    yield "3-D leaves", a, b, a, b
    a, b = make(4, 32), make(128)
    yield "leaf and a view of a leaf", a, b.view(4, 32), a, b
    a, b = make(128), make(4, 4, 8)
    yield "views of leaves", a.view(4, 32), b.view(4, 32), a, b


@pytest.mark.parametrize("case", range(4), ids=["leaves", "3d-leaves", "leaf-and-view", "views"])
def test_residual_and_input_grads_do_not_alias(case):
    """x and residual share one gradient tensor inside the backward; when both gradients become some
    leaf's .grad they must not share storage, or an in-place update of one would change the other."""
    name, x, r, x_leaf, r_leaf = list(_leaf_pairs())[case]
    w = torch.randn(x.shape[-1], device=DEVICE, requires_grad=True)
    y, s = rmsnorm_kernels.rms_norm(x, w, 1e-6, r)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.equal(x_leaf.grad.reshape(-1), r_leaf.grad.reshape(-1)), name
    x_leaf.grad.mul_(2.0)
    assert not torch.equal(x_leaf.grad.reshape(-1), r_leaf.grad.reshape(-1)), f"{name}: .grad tensors alias"


@triton.jit
def _bf16_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, rmsnorm_kernels._to_bf16_rtne(tl.load(X + offs)))


def test_bf16_rounding_of_dw_matches_torch():
    """dW's fp32 -> bf16 rounding (in integer arithmetic: the interpreter's own cast truncates) rounds as
    torch's conversion does, bit for bit, on the interpreter and compiled: every tie between neighbouring
    bf16 values (to even), values just off a tie, the largest finite values (to inf past the last tie),
    subnormals, signed zeros and infinities; NaN stays NaN."""
    gen = torch.Generator().manual_seed(3)
    grid = torch.randint(0, 2 ** 15, (512,), generator=gen, dtype=torch.int32)  # random bf16 bit patterns
    grid = torch.cat([grid, torch.tensor([0x7F7F, 0x7F7E, 0x0001, 0x0080, 0x3F80])])  # max, subnormal, 1
    below = ((grid << 16) | 0x8000).view(torch.float32)  # halfway to the next bf16 up: ties
    ties = torch.cat([below, -below])
    near = torch.cat([((grid << 16) | 0x8001).view(torch.float32), ((grid << 16) | 0x7FFF).view(torch.float32)])
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 1e-40])
    x = torch.cat([ties, near, specials, torch.randn(1000, generator=gen) * 1e3])
    x = x[torch.isfinite(x) | torch.isinf(x)]  # (a random pattern may be NaN: checked apart below)
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.full((n - x.numel(),), float("nan"))]).to(DEVICE)
    y = torch.full((n,), 7.0, dtype=torch.bfloat16, device=DEVICE)  # poisoned: unwritten elements show
    _bf16_kernel[(1,)](x, y, n)
    want = x.to(torch.bfloat16)
    finite = ~torch.isnan(x)
    assert torch.equal(y[finite].view(torch.int16), want[finite].view(torch.int16))
    assert torch.isnan(y[~finite]).all() and (~finite).any()


def test_backward_is_deterministic():
    """No atomics: two backward passes give bit-identical gradients (dweight sums every row; on a GPU
    4099 rows over many concurrently running programs)."""
    gen = torch.Generator().manual_seed(4)
    rows = 4099 if CUDA else 300
    x, r, dy = (torch.randn(rows, 1536, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    w = torch.randn(1536, generator=gen).to(DEVICE, torch.float16)
    runs = [_grads(lambda a, b, c: rmsnorm_kernels.rms_norm(a, b, 1e-6, c), [x, w, r], [dy, None])[1] for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("block_m,block_n,warps", [(2, 4096, [16, 8, 32]), (1, 4096, [8, 4, 16, 32]),
                                                   (1, 16384, [32, 16]), (1, 16, [1]), (64, 8192, [32])])
def test_row_prune_puts_sixteen_elements_per_thread_first(block_m, block_n, warps):
    """The GPU warp list pruned to 4..32 tile elements per thread (fewest or most warps past that range),
    the config with 16 a thread first: the one LWT_AUTOTUNE=0 launches (32 a thread spill in the backward
    on sm_90, benchmarks/compile_check.py)."""
    configs = [triton.Config({}, num_warps=w, num_stages=1) for w in _ROW_WARPS]
    kept = prune_row_configs(configs, {}, BLOCK_M=block_m, BLOCK_N=block_n)
    assert [c.num_warps for c in kept] == warps


def test_kernel_entry_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    import kernels._common as common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^x: expected a CUDA tensor for the Triton kernel, got one on cpu"):
        rmsnorm_kernels.rms_norm(x, torch.ones(8))


def test_a_hidden_size_past_the_backward_grid_is_refused(monkeypatch):
    """The backward launches one program per 4096 features on its grid's second dim, which CUDA caps at
    65535: a wider row is a ValueError before any launch (zero-stride tensors: no memory behind them)."""
    n = 65535 * 4096 + 1
    x, w = torch.zeros(1, device=DEVICE).expand(2, n), torch.ones(1, device=DEVICE).expand(n)
    monkeypatch.setattr(rmsnorm_kernels, "rms_norm_fwd", lambda *a: pytest.fail("launched"))
    with pytest.raises(ValueError, match=r"^x: expected a hidden size \(last dim\) of at most 268431360 on the "
                                         r"Triton path .*, got 268431361$"):
        rmsnorm_kernels.rms_norm(x, w)


@pytest.mark.parametrize("shape", [(37, 64), (3, 10000), (2, 20000)], ids=["M37-N64", "M3-N10000", "M2-N20000"])
def test_residual_output_normalises_the_returned_sum(shape):
    """With a residual, y is the norm of the returned s = x + residual rounded to x's dtype (not of the
    fp32 sum): the same bits as the op run on s alone, on each path (rows whole, chunked)."""
    gen = torch.Generator().manual_seed(9)
    x, r = (torch.randn(*shape, generator=gen).to(DEVICE, torch.float16) for _ in range(2))
    w = torch.randn(shape[-1], generator=gen).to(DEVICE, torch.float16)
    y, s = rmsnorm_kernels.rms_norm(x, w, 1e-6, r)
    assert torch.equal(s, x + r)
    assert torch.equal(y, rmsnorm_kernels.rms_norm(s, w, 1e-6))


@pytest.mark.parametrize("through", ["clone", "add", "cat"])
def test_residual_and_x_gradients_never_alias_through_pass_through_ops(through):
    """x reaching a leaf through an op whose backward passes the gradient on unchanged (clone, a same-shape
    add, cat) must not let that leaf's .grad share storage with the residual's: gradient accumulation over
    two micro-batches (in-place +=) would otherwise add each step twice."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 16, generator=gen).to(DEVICE).requires_grad_()
    r = torch.randn(3, 16, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(16, generator=gen).to(DEVICE)
    make = {"clone": lambda: a.clone(), "add": lambda: a + torch.zeros(3, 16, device=DEVICE),
            "cat": lambda: torch.cat([a, a.detach()])[:3]}[through]
    cots = [torch.randn(3, 16, generator=gen).to(DEVICE) for _ in range(2)]
    got, want = [], []
    for fn, out in ((rmsnorm_kernels.rms_norm, got), (reference.rms_norm, want)):
        a.grad = r.grad = None
        for c in cots:
            y, _ = fn(make(), w, 1e-6, r)
            (y * c).sum().backward()
        out += [a.grad.clone(), r.grad.clone()]
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["backward", "no-grad"])
def test_each_operand_read_through_its_own_strides(grad):
    """x, residual, dy and the gradient reaching s each with a row stride of its own, and a weight that
    is a strided view (stride 2): each is read through its own layout (the weight made contiguous first)."""
    gen = torch.Generator().manual_seed(7)
    M, N = 13, 40
    x = torch.randn(M, N, generator=gen).to(DEVICE)
    r = (torch.randn(M, N + 9, generator=gen) * 2).to(DEVICE)[:, 3:3 + N]
    w = (torch.randn(2 * N, generator=gen) + 1.0).to(DEVICE)[::2]
    dy = torch.randn(M, N + 3, generator=gen).to(DEVICE)[:, :N]
    ds = torch.randn(M, 2 * N, generator=gen).to(DEVICE)[:, N:]
    assert len({t.stride(0) for t in (x, r, dy, ds)}) == 4 and w.stride(0) == 2
    if grad:
        _compare(0.1, [x, w, r], [dy, ds])
        return
    # without a backward to come (the launcher alone), also a residual with a non-unit stride along N
    for res in (r, torch.randn(N, M, generator=gen).to(DEVICE).t()):
        with torch.no_grad():
            y, s = rmsnorm_kernels.rms_norm(x, w, 0.1, res)
            y64, s64 = reference.rms_norm(x.double(), w.double(), 0.1, res.double())
            y_ref, s_ref = reference.rms_norm(x, w, 0.1, res)
        assert_close("y", y, y64, y_ref)
        assert_close("s", s, s64, s_ref)


@pytest.mark.parametrize("n,backward", [(8192, True), (16384, False)], ids=["backward", "forward"])
def test_rows_as_wide_as_the_register_limit_are_read_once(n, backward):
    """Docstring, Limits: rows of up to 16384 elements (forward) / 8192 (backward) are held in registers and
    read once: N at the limit takes the single-pass tile the launcher uses, one more element the chunked path."""
    assert rmsnorm_kernels.launch_tile(n, 4, backward)[1:] == (n, True)
    assert rmsnorm_kernels.launch_tile(n + 1, 4, backward)[1:] == (rmsnorm_kernels.CHUNK_N, False)


@pytest.mark.parametrize("through", ["leaves", "clone"])
def test_only_the_residual_stream_reaching_the_loss(through):
    """y unused, s = x + residual used (a block whose norm output is dropped, or an ablation): x and the
    residual get s's gradient unchanged, in separate tensors, and the weight no gradient at all, None as on
    the reference path and in torch (the kernel wrote a zero dW, which AdamW's momentum and weight decay
    would still apply)."""
    gen = torch.Generator().manual_seed(11)
    a, r = (torch.randn(3, 5, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    cot = torch.randn(3, 5, 16, generator=gen).to(DEVICE)
    for fn in (rmsnorm_kernels.rms_norm, reference.rms_norm):
        w = torch.randn(16, generator=gen).to(DEVICE).requires_grad_()
        a.grad = r.grad = None
        _, s = fn(a.clone() if through == "clone" else a, w, 1e-6, r)
        (s * cot).sum().backward()
        assert w.grad is None, fn.__module__
        assert torch.equal(a.grad, cot) and torch.equal(r.grad, cot), fn.__module__
        a.grad.mul_(2.0)
        assert torch.equal(r.grad, cot), f"{fn.__module__}: .grad tensors alias"
    x = torch.randn(4, 16, generator=gen).to(DEVICE).requires_grad_()  # residual constant: x's gradient alone
    _, s = rmsnorm_kernels.rms_norm(x, torch.ones(16, device=DEVICE, requires_grad=True), 1e-6, torch.randn_like(x))
    s.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_neither_output_reaching_the_loss():
    """Both outputs' gradients undefined (an op after the norm that returns None for them, beside another
    path to the loss): no gradient for any input, as on the reference path (ds_out.clone() raised)."""
    class Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y, s):
            return y.sum() * 0

        @staticmethod
        def backward(ctx, g):
            return None, None

    gen = torch.Generator().manual_seed(12)
    x, r = (torch.randn(3, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    z = torch.randn(3, generator=gen).to(DEVICE).requires_grad_()
    for fn in (rmsnorm_kernels.rms_norm, reference.rms_norm):
        w = torch.randn(16, generator=gen).to(DEVICE).requires_grad_()
        x.grad = r.grad = None
        (Drop.apply(*fn(x, w, 1e-6, r)) + z.sum()).backward()
        assert x.grad is None and r.grad is None and w.grad is None, fn.__module__
