"""MLA attention core (kernels/mla.py) against the float64 reference: output, LSE and the gradients of
q, k_nope, k_rope (summed over heads) and v."""
import math

import pytest
import torch

import lwt.functional as lwtF
from kernels import attention as attn
from kernels import mla
from kernels import reference
from tests.helpers import ENTRIES, HEAVY, assert_refused_before_launch, force_config, grads
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]

# (B, S, H, Dn, Dr, Dv, softmax_scale). Interpreter tiles as in test_attention (32/16, 16/32 for dK/dV).
# Dv below, equal to and above Dn + Dr; Dn/Dr/Dv of 24, 8, 40, 48 are padded in registers.
SHAPES = [
    pytest.param((2, 1, 2, 16, 16, 16, None), id="B2-S1-H2-Dn16-Dr16-Dv16"),
    pytest.param((1, 17, 4, 32, 16, 32, None), id="B1-S17-H4-Dn32-Dr16-Dv32"),
    pytest.param((2, 17, 2, 32, 16, 48, None), id="B2-S17-H2-Dn32-Dr16-Dv48"),
    pytest.param((1, 64, 4, 32, 32, 64, 0.4), id="B1-S64-H4-Dn32-Dr32-Dv64-scale0.4"),
    pytest.param((1, 130, 2, 32, 16, 32, None), id="B1-S130-H2-Dn32-Dr16-Dv32"),
    pytest.param((1, 40, 3, 24, 8, 40, None), id="B1-S40-H3-Dn24-Dr8-Dv40"),
    pytest.param((1, 9, 2, 256, 128, 256, None), id="B1-S9-H2-Dn256-Dr128-Dv256"),  # the widest heads taken
]
CUDA_SHAPES = [
    pytest.param((2, 1000, 8, 128, 64, 128, None), id="B2-S1000-H8-Dn128-Dr64-Dv128", marks=pytest.mark.cuda),
    pytest.param((1, 2049, 4, 64, 32, 64, None), id="B1-S2049-H4-Dn64-Dr32-Dv64", marks=pytest.mark.cuda),
    pytest.param((2, 511, 4, 128, 64, 192, None), id="B2-S511-H4-Dn128-Dr64-Dv192", marks=pytest.mark.cuda),
    pytest.param((1, 777, 4, 256, 128, 256, None), id="B1-S777-H4-Dn256-Dr128-Dv256", marks=pytest.mark.cuda),
    pytest.param((1, 4096, 16, 128, 64, 128, None), id="B1-S4096-H16-Dn128-Dr64-Dv128",
                 marks=[pytest.mark.cuda, HEAVY]),
]


def _make(B, S, H, dn, dr, dv, dtype, layout, gen):
    """q, k_nope, k_rope, v, random. 'fused': views into one projection output per token, as
    MLAAttention produces them (q and [k_nope | v] interleaved per head, k_rope a slice of a wider row)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "fused":
        q = randn(B, S, H, dn + dr + 3)[..., :dn + dr]
        kv = randn(B, S, H, dn + dv)
        k_rope = randn(B, S, dr + 5)[..., 2:2 + dr]
        return q, kv[..., :dn], k_rope, kv[..., dn:]
    return randn(B, S, H, dn + dr), randn(B, S, H, dn), randn(B, S, dr), randn(B, S, H, dv)


def _compare(inputs, do, causal, scale=None):
    """The kernel's output and gradients for these inputs (q, k_nope, k_rope, v) and cotangent, in whatever
    layout, against the float64 reference, with the reference in the inputs' dtype as the yardstick."""
    S, H, dq_dim = inputs[0].shape[1], inputs[0].shape[2], inputs[0].shape[3]

    def ref(*a, upcast=True):
        return reference.mla_attention_with_lse(*a, causal, scale, upcast)[0]

    (o,), g = grads(lambda *a: mla.mla_attention(*a, causal=causal, softmax_scale=scale), inputs, [do])
    (o64,), g64 = grads(ref, [t.double() for t in inputs], [do.double()])
    (o_ref,), g_ref = grads(lambda *a: ref(*a, upcast=False), inputs, [do])
    sm_scale = dq_dim ** -0.5 if scale is None else scale
    assert_close("o", o, o64, o_ref, reduced_over=S)
    for name, a, e, r, n in zip(["dq", "dk_nope", "dk_rope", "dv"], g, g64, g_ref, [S, S, S * H, S]):
        assert a.dtype == inputs[0].dtype and a.shape == e.shape
        terms = _cancelling_terms(inputs, do, sm_scale).get(name) if S == 1 else None
        assert_close(name, a, e, r, reduced_over=n, scale=terms)


def _check(shape, dtype, causal, layout="contiguous", seed=0):
    B, S, H, dn, dr, dv, scale = shape
    gen = torch.Generator().manual_seed(seed)
    inputs = _make(B, S, H, dn, dr, dv, dtype, layout, gen)
    do = torch.randn(B, S, H, dv, generator=gen).to(DEVICE, dtype)
    _compare(inputs, do, causal, scale)
    sm_scale = (dn + dr) ** -0.5 if scale is None else scale
    with torch.no_grad():
        _, lse2, _ = attn.launch_fwd(*(attn._unit_last(t) for t in inputs[:2]), attn._unit_last(inputs[2]),
                                  attn._unit_last(inputs[3]), causal, sm_scale, d_rope=dr)
        lse = lse2 * math.log(2)  # (the launcher's is in base 2)
        _, lse64 = reference.mla_attention_with_lse(*(t.double() for t in inputs), causal, scale)
        _, lse_ref = reference.mla_attention_with_lse(*inputs, causal, scale, upcast=False)
    assert_close("lse", lse, lse64, lse_ref, reduced_over=S)


def _cancelling_terms(inputs, do, sm_scale):
    """{gradient: size of its terms} for the gradients that vanish when S = 1 (see
    test_attention._cancelling_terms): dQ = scale·dS·[K_nope, k_rope], dK_nope = scale·dS·Q_nope per head,
    dk_rope = scale·Σ_heads dS·Q_rope."""
    q, k_nope, k_rope, v = (t.double() for t in inputs)
    dn = k_nope.shape[-1]
    dp = (do.double() * v).sum(-1).abs().max().item() * sm_scale
    return {"dq": dp * max(k_nope.abs().max().item(), k_rope.abs().max().item()),
            "dk_nope": dp * q[..., :dn].abs().max().item(),
            "dk_rope": dp * q[..., dn:].abs().max().item() * q.shape[2]}


def _skip_slow_fp32_compiles(shape, causal):
    """On a GPU, fp32 (IEEE dots) at q·k width 384 compiles for about a minute a kernel (sm_90, triton
    3.6), three kernels a case: only the S 9 bidirectional case runs there. The CPU suite runs every such
    case through the interpreter."""
    if CUDA and shape[3] + shape[4] > 256 and (causal or shape[1] != 9):
        pytest.skip("fp32 at the widest heads compiles for about a minute a kernel: on a GPU only "
                    "test_mla_matches_float64_reference's S 9 bidirectional case runs it")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", SHAPES + CUDA_SHAPES)
def test_mla_matches_float64_reference(shape, causal, dtype):
    if dtype == torch.float32:
        _skip_slow_fp32_compiles(shape, causal)
    _check(shape, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flattened_dkdv_loops_match_float64_reference(monkeypatch, shape, causal):
    """The dK/dV pass as DeepSeek-V2's configs run it (FLATTEN: the loop over the chunk's heads and each
    head's query loop as one, causal with every query tile from the key tile's start masked), all heads in
    one chunk so that the loop spans them. The interpreter's own config nests the loops."""
    _skip_slow_fp32_compiles(shape, True)  # its forced dK/dV config would be one more fp32 compile
    force_config(monkeypatch, mla._dkdv, attn.as_config((*attn._INTERPRETER_DKDV[:2], 4, 1, True, False)))
    monkeypatch.setattr(mla, "_head_chunks", lambda B, S, H, device: 1)
    _check(shape, torch.float32, causal)
    assert mla._dkdv.autotuned.best_config.kwargs["FLATTEN"]  # the forced config is the one that ran


# S 1, a ragged last key tile (17, 130), two heads per chunk (H 4), Dv above Dn + Dr, padded head dims, an
# odd head count (one chunk)
SPLIT_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[4], SHAPES[5]]


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
def test_split_dkdv_pass_matches_float64_reference(monkeypatch, shape, causal, flatten):
    """The dK/dV pass as its SPLIT configs run it (attention._MLA_DKDV_CONFIGS): the launch's first
    programs compute dk_nope and dk_rope, the rest dv, one head each. The heads are in two chunks where
    their count allows, so that the dv programs come after several chunks' dk programs."""
    force_config(monkeypatch, mla._dkdv, attn.as_config((*attn._INTERPRETER_DKDV[:2], 4, 1, flatten, True)))
    monkeypatch.setattr(mla, "_head_chunks", lambda B, S, H, device: 2 if H % 2 == 0 else 1)
    _check(shape, torch.float32, causal)
    assert mla._dkdv.autotuned.best_config.kwargs["SPLIT"]  # the forced config is the one that ran


def test_split_dkdv_pass_in_half_precision(monkeypatch):
    """SPLIT in 16-bit inputs (fp16 on the CPU, bf16 on a GPU), the dv programs' P rounded for their dot."""
    force_config(monkeypatch, mla._dkdv, attn.as_config((*attn._INTERPRETER_DKDV[:2], 4, 1, True, True)))
    _check((2, 37, 4, 32, 16, 24, None), torch.bfloat16 if CUDA else torch.float16, True, seed=3)
    assert mla._dkdv.autotuned.best_config.kwargs["SPLIT"]


@pytest.mark.skipif(CUDA, reason="reorders the interpreter's programs (a GPU keeps no order of its own)")
def test_split_dkdv_pass_in_reverse_program_order(monkeypatch):
    """A GPU runs a launch's programs in no set order: SPLIT's dv programs may finish before its dk programs.
    The interpreter runs them in pid order, dk programs first (a dv program's store over dk_nope or a dk_rope
    partial shows there); here last, so that a dk program's store over dv shows too. (Patches triton 3.6's
    interpreter_builder.set_grid_idx.)"""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_idx = builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_idx(builder.grid_dim[0] - 1 - x, y, z))
    force_config(monkeypatch, mla._dkdv, attn.as_config((*attn._INTERPRETER_DKDV[:2], 4, 1, False, True)))
    monkeypatch.setattr(mla, "_head_chunks", lambda B, S, H, device: 2)
    _check(SHAPES[1].values[0], torch.float32, True)
    assert mla._dkdv.autotuned.best_config.kwargs["SPLIT"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_mla_strided_layouts(causal):
    _check((2, 37, 3, 32, 16, 32, None), torch.float16, causal, layout="fused", seed=1)


def test_delta_reads_o_before_its_rounding(monkeypatch):
    """As test_attention's test of that name, through MLAFunction (it keeps O's residual and hands it to
    the backward): values and keys with a large common part, fp16. Without the residual dQ's error here
    is about 8 times the plain fp16 reference's; with it, about 2."""
    from tests.test_attention import _dq_error
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 48, generator=gen)
    k_nope = 1.0 + 0.3 * torch.randn(1, 64, 2, 32, generator=gen)
    k_rope = 1.0 + 0.3 * torch.randn(1, 64, 16, generator=gen)
    v = 1.5 + 0.2 * torch.randn(1, 64, 2, 24, generator=gen)
    do = torch.randn(1, 64, 2, 24, generator=gen).to(DEVICE, torch.float16)
    inputs = [t.to(DEVICE, torch.float16) for t in (q, k_nope, k_rope, v)]
    ref = lambda *a: reference.mla_attention(*a)  # noqa: E731
    with_r, without_r = (_dq_error(monkeypatch, mla.mla_attention, inputs, do, ref, keep) for keep in (True, False))
    assert with_r < 0.5 * without_r, (with_r, without_r)


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_dk_rope_over_head_chunks(monkeypatch, chunks):
    """dk_rope sums every head: all 4 heads in one program, two per program, or one program per head,
    with the per-chunk partials summed after."""
    monkeypatch.setattr(mla, "_head_chunks", lambda B, S, H, device: chunks)
    _check((1, 40, 4, 32, 16, 32, None), torch.float32, True, seed=2)


def test_head_chunks_fill_the_gpu():
    """The fewest chunks (a divisor of H) giving two programs per multiprocessor, at most H."""
    sms = mla.num_sms(torch.device(DEVICE))
    for B, S, H in [(1, 40, 4), (8, 2048, 32), (1, 64, 128), (1, 100000, 6)]:
        chunks = mla._head_chunks(B, S, H, torch.device(DEVICE))
        programs = -(-S // mla._CHUNK_SIZING_BLOCK_N) * B
        assert H % chunks == 0
        assert programs * chunks >= 2 * sms or chunks == H
        assert chunks == 1 or programs * max(c for c in range(1, chunks) if H % c == 0) < 2 * sms


@pytest.mark.parametrize("shape", [(0, 5, 2), (2, 0, 2), (1, 4, 0)], ids=["B0", "S0", "H0"])
def test_mla_empty_inputs(shape):
    B, S, H = shape
    q = torch.randn(B, S, H, 48, device=DEVICE, requires_grad=True)
    kn = torch.randn(B, S, H, 32, device=DEVICE, requires_grad=True)
    kr = torch.randn(B, S, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(B, S, H, 24, device=DEVICE, requires_grad=True)
    o = mla.mla_attention(q, kn, kr, v)
    assert o.shape == (B, S, H, 24)
    o.sum().backward()
    assert kr.grad.shape == kr.shape and (kr.grad == 0).all() and (v.grad == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["untuned-config", "first-SPLIT-config"])
def test_mla_backward_is_deterministic(monkeypatch, split):
    if split:  # DeepSeek-V2's heads: the "mla" list
        entry = next(e for e in attn._MLA_DKDV_CONFIGS["mla"] if e[5])
        force_config(monkeypatch, mla._dkdv, attn.as_config(entry))
    gen = torch.Generator().manual_seed(4)
    inputs = _make(2, 1537, 16, 128, 64, 128, torch.bfloat16, "contiguous", gen)
    do = torch.randn(2, 1537, 16, 128, generator=gen).to(DEVICE, torch.bfloat16)
    for causal in (False, True):
        runs = [grads(lambda *a: mla.mla_attention(*a, causal=causal), inputs, [do])[1] for _ in range(2)]
        for g1, g2 in zip(*runs):
            assert torch.equal(g1, g2)


def _ok():
    return (torch.randn(2, 8, 4, 48, device=DEVICE), torch.randn(2, 8, 4, 32, device=DEVICE),
            torch.randn(2, 8, 16, device=DEVICE), torch.randn(2, 8, 4, 24, device=DEVICE))


def _bad_cases():
    q, kn, kr, v = _ok()
    return [
        ("q", "expected 4 dims", (q[0], kn, kr, v), {}),
        ("k_rope", "expected 3 dims", (q, kn, kr[..., None], v), {}),
        ("k_nope", "expected dtype", (q, kn.int(), kr, v), {}),
        ("k_rope", "expected the dtype of q", (q, kn, kr.half(), v), {}),
        ("v", "expected a tensor on", (q, kn, kr, v.to("meta")), {}),
        ("k_nope", "expected shape", (q, kn[:, :, :2], kr, v), {}),
        ("k_rope", "expected shape", (q, kn, kr[:, :5], v), {}),
        ("v", "expected shape", (q, kn, kr, v[:1]), {}),
        ("q", "expected a last dim of Dn \\+ Dr", (q[..., :40], kn, kr, v), {}),
        ("k_rope", "rope dim", (torch.randn(1, 2, 1, 32 + 200, device=DEVICE), torch.randn(1, 2, 1, 32, device=DEVICE),
                                torch.randn(1, 2, 200, device=DEVICE), torch.randn(1, 2, 1, 8, device=DEVICE)), {}),
        ("v", "head dim", (q, kn, kr, v[..., :0]), {}),
        # each head dim's upper bound, and Dn's lower one (Dn + Dr = dq holds, so only the bound can refuse)
        ("k_nope", "head dim", (torch.randn(1, 2, 1, 300 + 16, device=DEVICE), torch.randn(1, 2, 1, 300, device=DEVICE),
                                torch.randn(1, 2, 16, device=DEVICE), torch.randn(1, 2, 1, 8, device=DEVICE)), {}),
        ("k_nope", "head dim", (q[..., :16], kn[..., :0], kr, v), {}),
        ("v", "head dim", (q, kn, kr, torch.randn(2, 8, 4, 300, device=DEVICE)), {}),
        ("q", "expected a last dim of Dn \\+ Dr", (torch.cat([q, q[..., :1]], dim=-1), kn, kr, v), {}),
        ("causal", "expected a bool", (q, kn, kr, v), {"causal": None}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, kn, kr, v), {"softmax_scale": float("inf")}),
    ]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_mla_bad_input_is_a_value_error_before_any_launch(monkeypatch, case, entry):
    name, message, args, kwargs = _bad_cases()[case]
    assert_refused_before_launch(monkeypatch, entry, mla.mla_attention, lwtF.mla_attention,
                                 [(attn, "launch_fwd"), (reference, "mla_attention")], rf"^{name}: .*{message}",
                                 *args, **kwargs)


def _latent_bad_cases():
    """(argument, message, args) per case, built when a test runs (nothing is built while collecting)."""
    q, c, kr = (torch.randn(*shape, device=DEVICE) for shape in ((1, 5, 2, 40), (1, 5, 32), (1, 5, 8)))
    return [
        ("q", r"expected a last dim of R \+ Dr = 32 \+ 8 = 40", (torch.randn(1, 5, 2, 43, device=DEVICE), c, kr)),
        ("c", r"expected shape \(1, 5, ·\) \(batch and seq of q\)", (q, c[:, :4], kr)),
        ("k_rope", r"expected shape \(1, 5, ·\)", (q, c, kr[:, :4])),
        ("k_rope", "expected the dtype of q", (q, c, kr.half())),
        ("c", "expected a tensor on", (q, c.to("meta"), kr)),
        ("k_rope", "expected a rope dim in 1..128", (torch.randn(1, 5, 2, 32 + 130, device=DEVICE), c,
                                                     torch.randn(1, 5, 130, device=DEVICE))),
        ("c", r"expected a latent size in 1..256", (torch.randn(1, 5, 2, 308, device=DEVICE),
                                                   torch.randn(1, 5, 300, device=DEVICE), kr)),
    ]


# The entries refusing each case: the last, a latent wider than the kernel, only the kernel's
# (lwt.functional runs the reference for it).
_LATENT_BAD_ENTRIES = [ENTRIES] * 6 + [["kernel"]]


@pytest.mark.parametrize("case,entry", [(i, e) for i, entries in enumerate(_LATENT_BAD_ENTRIES) for e in entries])
def test_latent_bad_input_is_a_value_error_before_any_launch(monkeypatch, case, entry):
    cases = _latent_bad_cases()
    assert len(cases) == len(_LATENT_BAD_ENTRIES)
    name, message, args = cases[case]
    with torch.no_grad():
        assert_refused_before_launch(monkeypatch, entry, mla.latent_attention, lwtF.latent_attention,
                                     [(attn, "launch_fwd"), (reference, "latent_attention")], rf"^{name}: .*{message}",
                                     *args)


def test_widest_latent_runs_the_kernel():
    """R = MAX_HEAD_DIM (256) is the widest latent the kernel takes (the 300 above is refused): accepted by
    the kernel entry, and its output matches the float64 reference."""
    g = torch.Generator().manual_seed(6)
    # fp16 on a GPU: an fp32 (IEEE-dot) forward at this width is one more slow compile (_skip_slow_fp32_compiles)
    dtype = torch.float16 if CUDA else torch.float32
    q, c, kr = (torch.randn(*shape, generator=g).to(DEVICE, dtype)
                for shape in ((1, 3, 2, 256 + 4), (1, 3, 256), (1, 3, 4)))
    with torch.no_grad():
        o = mla.latent_attention(q, c, kr, causal=True)
    assert_close("o", o, reference.latent_attention(q.double(), c.double(), kr.double(), True),
                 reference.latent_attention(q, c, kr, True), reduced_over=3)


def test_mla_functional_dispatch(monkeypatch):
    q, kn, kr, v = _ok()
    outs = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LWT_BACKEND", backend)
        outs[backend] = lwtF.mla_attention(q, kn, kr, v, causal=True)
    o64 = reference.mla_attention(q.double(), kn.double(), kr.double(), v.double(), True)
    assert_close("o", outs["triton"], o64, outs["reference"], reduced_over=8)
    monkeypatch.setenv("LWT_BACKEND", "reference")
    assert lwtF.mla_attention(q.double(), kn.double(), kr.double(), v.double()).dtype == torch.float64


@pytest.mark.parametrize("loss", ["square_sum", "sum"])
def test_mla_double_backward_raises(loss):
    inputs = [t.requires_grad_() for t in _make(1, 9, 2, 16, 16, 16, torch.float32, "contiguous",
                                                 torch.Generator().manual_seed(3))]
    o = mla.mla_attention(*inputs)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (dq,) = torch.autograd.grad(o.square().sum() if loss == "square_sum" else o.sum(), inputs[:1],
                                    create_graph=True)
        (o.sum() + dq.square().sum()).backward()


def test_mla_backward_computes_only_what_is_needed(monkeypatch):
    """Only q requires grad: no dK/dV pass; only k_rope, only k_nope or only v: no dQ pass. The gradients
    asked for match."""
    gen = torch.Generator().manual_seed(11)
    inputs = _make(1, 21, 3, 16, 16, 24, torch.float32, "contiguous", gen)
    do = torch.randn(1, 21, 3, 24, generator=gen).to(DEVICE)
    calls = []
    real_dq, real_dkdv = attn.launch_dq, mla._dkdv.launch
    monkeypatch.setattr(attn, "launch_dq", lambda *a: calls.append("dq") or real_dq(*a))
    monkeypatch.setattr(mla._dkdv, "launch", lambda *a, **kw: calls.append("dkdv") or real_dkdv(*a, **kw))
    for wanted, expected in (([True, False, False, False], ["dq"]), ([False, False, True, False], ["dkdv"]),
                             ([False, True, False, False], ["dkdv"]), ([False, False, False, True], ["dkdv"])):
        calls.clear()
        leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
        (g,) = torch.autograd.grad(mla.mla_attention(*leaves, causal=True), [t for t in leaves if t.requires_grad], do)
        assert calls == expected
        leaves64 = [t.detach().double().requires_grad_(w) for t, w in zip(inputs, wanted)]
        (g64,) = torch.autograd.grad(reference.mla_attention(*leaves64, True), [t for t in leaves64 if t.requires_grad],
                                     do.double())
        leaves_ref = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
        (g_ref,) = torch.autograd.grad(reference.mla_attention(*leaves_ref, True),
                                       [t for t in leaves_ref if t.requires_grad], do)
        assert_close("grad", g, g64, g_ref, reduced_over=21 * 3)


@pytest.mark.parametrize("dual", ["q", "c", "k_rope"])
def test_latent_attention_refuses_forward_mode_tangents(dual):
    """The forward-only kernel has no jvp: a dual input is refused by name, not its tangent dropped."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(6)
    args = {"q": torch.randn(1, 4, 2, 12, generator=gen), "c": torch.randn(1, 4, 8, generator=gen),
            "k_rope": torch.randn(1, 4, 4, generator=gen)}
    args = {k: v.to(DEVICE) for k, v in args.items()}
    with fwAD.dual_level():
        args[dual] = fwAD.make_dual(args[dual], torch.randn_like(args[dual]))
        with pytest.raises(ValueError, match=rf"^{dual}: has a forward-mode tangent"):
            mla.latent_attention(args["q"], args["c"], args["k_rope"])


@pytest.mark.parametrize("batched", ["q", "c", "k_rope"])
def test_latent_attention_refuses_a_vmapped_input(batched):
    """Under torch.func.vmap the kernel would be handed a BatchedTensor, whose memory it cannot read: the
    batched input is refused by name (the reference runs under vmap)."""
    gen = torch.Generator().manual_seed(6)
    args = {"q": torch.randn(1, 4, 2, 12, generator=gen), "c": torch.randn(1, 4, 8, generator=gen),
            "k_rope": torch.randn(1, 4, 4, generator=gen)}
    args = {k: v.to(DEVICE) for k, v in args.items()}
    stacked = torch.stack([args[batched]] * 3)

    def call(t):
        return mla.latent_attention(*(t if k == batched else v for k, v in args.items()))

    with torch.no_grad(), pytest.raises(ValueError, match=rf"^{batched}: a torch.func transform's tensor"):
        torch.func.vmap(call)(stacked)


@HEAVY
def test_offsets_past_int32_within_a_batch_entry_name_the_argument():
    """The per-entry int32 offset limit (kernels/attention.py, Limits) names mla_attention's own argument, k_nope,
    and latent_attention's c (the buffer is only reserved, never touched)."""
    buf = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    wide = buf.as_strided((1, 3, 1, 16), (0, 2**30, 16, 1))
    q = torch.randn(1, 3, 1, 32, device=DEVICE, dtype=torch.float16)
    small = torch.randn(1, 3, 1, 16, device=DEVICE, dtype=torch.float16)
    k_rope = torch.randn(1, 3, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^k_nope: one batch entry spans 2147483664 elements"):
        mla.mla_attention(q, wide, k_rope, small)
    with pytest.raises(ValueError, match=r"^k_nope: one batch entry spans 2147483664 elements"):
        mla.mla_attention(q, wide, k_rope, wide)  # one tensor as k_nope and v (Dn == Dv): not latent_attention's c
    with torch.no_grad(), pytest.raises(ValueError, match=r"^c: one batch entry spans 2147483664 elements"):
        mla.latent_attention(q, wide[:, :, 0], k_rope)


def test_mla_cotangent_and_head_dim_layouts():
    """dO arriving transposed (a (B, H, S, Dv) buffer: strides unlike o's), with a non-unit stride along
    Dv, and expanded (stride 0, from a broadcast); then q, k_nope, k_rope, v each with a non-unit stride
    along its last dim (the README: any strides, a non-unit one along the last dim costs a copy)."""
    gen = torch.Generator().manual_seed(9)
    B, S, H, dn, dr, dv = 1, 19, 2, 32, 16, 24

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    contiguous = _make(B, S, H, dn, dr, dv, torch.float32, "contiguous", gen)
    strided = (randn(B, S, dn + dr, H).transpose(2, 3), randn(B, S, dn, H).transpose(2, 3),
               randn(B, dr, S).transpose(1, 2), randn(B, S, dv, H).transpose(2, 3))
    cases = [(contiguous, randn(B, H, S, dv).transpose(1, 2)), (contiguous, randn(B, S, dv, H).transpose(2, 3)),
             (contiguous, randn(dv).expand(B, S, H, dv)), (strided, randn(B, S, H, dv))]
    for inputs, do in cases:
        _compare(inputs, do, True)
