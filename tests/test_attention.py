"""Attention kernel (kernels/attention.py) against the float64 reference: output, LSE, dQ, dK, dV."""
import math

import numpy as np
import pytest
import torch

import lwt.functional as lwtF
from kernels import attention as attn
from kernels import reference
from tests.helpers import ENTRIES, HEAVY, assert_refused_before_launch, force_config, grads
from tests.tolerances import RTOL, assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# The interpreter computes tl.dot of bf16 wrongly (triton#11584), so bf16 runs on a GPU only.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]

# (B, S, H, Hkv, D, softmax_scale). On the interpreter the query tile is 32 rows and the key tile 16 (16
# and 32 in the dK/dV pass), so S = 1, 17, 64, 130 cover a lone token, ragged last tiles, exact tiles and
# several diagonal tiles per block. H/Hkv 4/4, 4/2, 4/1 are MHA, GQA and MQA. D 48 and 8 are padded in
# registers, and so is D 192 (to 256). softmax_scale 0.5 at D 32 gives logits of std ~3: peaked rows, where the
# running max matters.
SHAPES = [
    pytest.param((2, 1, 4, 4, 32, None), id="B2-S1-H4/4-D32"),
    pytest.param((1, 17, 4, 2, 64, None), id="B1-S17-H4/2-D64"),
    pytest.param((2, 64, 4, 1, 32, 0.5), id="B2-S64-H4/1-D32-scale0.5"),
    pytest.param((1, 130, 4, 2, 32, None), id="B1-S130-H4/2-D32"),
    pytest.param((1, 130, 2, 2, 64, None), id="B1-S130-H2/2-D64"),
    pytest.param((1, 47, 4, 1, 64, None), id="B1-S47-H4/1-D64"),
    pytest.param((2, 33, 2, 1, 48, None), id="B2-S33-H2/1-D48"),
    pytest.param((1, 20, 3, 3, 8, 1.0), id="B1-S20-H3/3-D8"),
    pytest.param((1, 19, 2, 1, 192, None), id="B1-S19-H2/1-D192"),
]
# Larger shapes for the compiled kernels (every autotuned block size sees ragged and exact tiles).
CUDA_SHAPES = [
    pytest.param((2, 1000, 8, 2, 128, None), id="B2-S1000-H8/2-D128", marks=pytest.mark.cuda),
    pytest.param((1, 2049, 4, 4, 64, None), id="B1-S2049-H4/4-D64", marks=pytest.mark.cuda),
    pytest.param((2, 511, 8, 1, 256, None), id="B2-S511-H8/1-D256", marks=pytest.mark.cuda),
    pytest.param((1, 777, 6, 3, 96, None), id="B1-S777-H6/3-D96", marks=pytest.mark.cuda),
    pytest.param((3, 4096, 4, 2, 128, None), id="B3-S4096-H4/2-D128", marks=[pytest.mark.cuda, HEAVY]),
]


def _make(B, S, H, Hkv, D, dtype, layout, gen):
    """q (B, S, H, D), k, v (B, S, Hkv, D), random, in one of three layouts:
    contiguous; 'fused': slices of one (B, S, (H + 2·Hkv)·D) projection output (GQAAttention passes v
    so; q and k leave RoPE as new tensors), rows (H + 2·Hkv)·D apart; 'bhsd': transposed views of
    (B, heads, S, D) buffers."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if layout == "fused":
        qkv = randn(B, S, (H + 2 * Hkv) * D)
        return (qkv[..., :H * D].unflatten(-1, (H, D)), qkv[..., H * D:(H + Hkv) * D].unflatten(-1, (Hkv, D)),
                qkv[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D)))
    if layout == "bhsd":
        return randn(B, H, S, D).transpose(1, 2), randn(B, Hkv, S, D).transpose(1, 2), randn(B, Hkv, S, D).transpose(1, 2)
    return randn(B, S, H, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D)


def _cancelling_terms(q, k, v, do, sm_scale):
    """{gradient: size of its terms} for the gradients that vanish when S = 1: dS = P∘(dP − δ) is exactly
    0 (P = 1, O = V, so dP = dO·V = dO·O = δ), hence dQ = scale·dS·K and dK = scale·dSᵀ·Q (summed over the
    group's query heads) are exactly 0, in the fp32 reference too. What a kernel returns is the roundoff of
    that difference (with a GPU's approximate exp2 and division, P and O are off by an ulp or two): measure
    it against max|dO·V|·max|K or Q|·scale (· the group)."""
    group = q.shape[2] // k.shape[2]
    dp = (do.double() * v.double().repeat_interleave(group, dim=2)).sum(-1).abs().max().item()
    return {"dq": dp * k.double().abs().max().item() * sm_scale,
            "dk": dp * q.double().abs().max().item() * sm_scale * group}


def _compare(q, k, v, do, causal, scale=None):
    """The kernel's output and gradients for these inputs and cotangent, in whatever layout, against the
    float64 reference, with the reference in the inputs' dtype as the yardstick."""
    S, H, D, Hkv = q.shape[1], q.shape[2], q.shape[3], k.shape[2]

    def ref(q, k, v, upcast=True):
        return reference.attention_with_lse(q, k, v, causal, scale, upcast)[0]

    (o,), g = grads(lambda *a: attn.attention(*a, causal=causal, softmax_scale=scale), [q, k, v], [do])
    (o64,), g64 = grads(ref, [q.double(), k.double(), v.double()], [do.double()])
    (o_ref,), g_ref = grads(lambda *a: ref(*a, upcast=False), [q, k, v], [do])
    sm_scale = D ** -0.5 if scale is None else scale
    # Each element of o and dq is an fp32 sum over keys, of dk and dv over the queries of the group.
    assert_close("o", o, o64, o_ref, reduced_over=S)
    for name, a, e, r, n in zip(["dq", "dk", "dv"], g, g64, g_ref, [S, S * H // Hkv, S * H // Hkv]):
        assert a.dtype == q.dtype and a.shape == e.shape
        terms = _cancelling_terms(q, k, v, do, sm_scale).get(name) if S == 1 else None
        assert_close(name, a, e, r, reduced_over=n, scale=terms)


def _check(shape, dtype, causal, layout="contiguous", seed=0):
    B, S, H, Hkv, D, scale = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _make(B, S, H, Hkv, D, dtype, layout, gen)
    do = torch.randn(B, S, H, D, generator=gen).to(DEVICE, dtype)
    _compare(q, k, v, do, causal, scale)
    sm_scale = D ** -0.5 if scale is None else scale

    # The saved log-sum-exp, through the launcher (the public op returns o only).
    with torch.no_grad():
        _, lse = attn.attention_fwd(q, k, v, causal, sm_scale)
        _, lse64 = reference.attention_with_lse(q.double(), k.double(), v.double(), causal, scale)
        _, lse_ref = reference.attention_with_lse(q, k, v, causal, scale, upcast=False)
    assert lse.dtype == torch.float32
    assert_close("lse", lse, lse64, lse_ref, reduced_over=S)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_reference_maps_query_heads_to_kv_heads_as_documented(causal):
    """Query head h reads K/V head h // (H / Hkv) (consecutive query heads share one: LLaMA's layout, SDPA's
    enable_gqa). Every kernel test takes the reference's mapping as the truth, so a mistake made in both
    (h % Hkv) passed them all: here the reference is held to the formula written out head by head."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 6, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 9, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    visible = torch.ones(9, 9, dtype=torch.bool).tril() if causal else torch.ones(9, 9, dtype=torch.bool)
    heads = []
    for h in range(6):
        scores = (q[:, :, h] @ k[:, :, h // 3].mT) / math.sqrt(8)  # (B, S, S)
        heads.append(torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v[:, :, h // 3])
    torch.testing.assert_close(reference.attention(q, k, v, causal), torch.stack(heads, 2), rtol=1e-12, atol=1e-12)


def test_fp16_output_accumulates_in_fp32():
    """O's running sum grows with the keys when V's values have a non-zero mean (a bias, or a residual
    stream, gives them one), and 16-bit rounding of it then shows: rounding the sum to fp16 after each key
    tile stayed within the fp16 bound for the zero-mean inputs of the other tests and gives 2.3x the bound
    here (1.4x at S 256); the fp32 sum is at a quarter of it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 512, 1, 32, generator=gen).to(DEVICE, torch.float16) for _ in range(3))
    v = v + 3
    with torch.no_grad():
        o = attn.attention(q, k, v)
    o64 = reference.attention(q.double(), k.double(), v.double())
    o_ref = reference.attention_with_lse(q, k, v, False, None, False)[0]
    assert_close("o", o, o64, o_ref, reduced_over=512)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", SHAPES + CUDA_SHAPES)
def test_attention_matches_float64_reference(shape, causal, dtype):
    _check(shape, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_flattened_dkdv_loops_match_float64_reference(monkeypatch, shape, causal):
    """The dK/dV pass as its FLATTEN configs run it (attention._DKDV_CONFIGS): the loop over the group's
    query heads and each head's query loop as one, causal with every query tile from the key tile's start
    masked. The interpreter's own config nests the loops; this forces the other way, same tiles."""
    force_config(monkeypatch, attn._dkdv, attn.as_config((*attn._INTERPRETER_DKDV[:2], 4, 1, True)))
    _check(shape, torch.float32, causal)
    assert attn._dkdv.autotuned.best_config.kwargs["FLATTEN"]  # the forced config is the one that ran


def _dq_error(monkeypatch, fn, inputs, do, reference_fn, keep_residual):
    """max |dq − float64 dq| of fn, with or without the forward's residual of O (kernels/attention.py,
    Precision), the error of the plain same-dtype reference beside it."""
    with monkeypatch.context() as m:
        if not keep_residual:
            m.setattr(attn, "_keeps_residual", lambda residual, dtype: False)
        _, g = grads(fn, inputs, [do])
    _, g64 = grads(reference_fn, [t.double() for t in inputs], [do.double()])
    return (g[0].double() - g64[0]).abs().max().item()


# (causal, the interpreter's numpy warns of exp2 overflowing to inf for keys the mask then drops)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.skipif(CUDA, reason="the interpreter's products only: compiled, t − LSE₂ is one FMA (attention.py, "
                                 "Precision)")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_saturated_softmax_backward_recomputes_p_exactly(causal):
    """Logits of order 1e5 (softmax_scale 0.1, no power of two) saturate every row's softmax on one key,
    whose P is then exactly 1. The backward recomputes P = 2^(t − LSE₂) from the forward's base-2 LSE as
    it is: through natural-log units and back, LSE₂ came an ulp off in some rows, a factor of 2^ulp on P
    there (dV 1% off at these logits; inf and NaN gradients at softmax_scale 1e30, which the contract
    allows). O, the LSE and dV against the float64 reference; dQ and dK, whose exact
    values nearly cancel (see attention.py, Precision), finite. The interpreter rounds t = qk · scale ·
    log2 e before subtracting, as the forward's max does; a GPU's FMA does not (see attention.py,
    Precision), so this runs on the CPU. q and k hold integers whose every partial dot product is exact
    in fp32, so the forward's Q Kᵀ and the backward's K Qᵀ agree bit for bit whatever order the BLAS
    behind the interpreter's dot sums them in (with real-valued unit vectors they did on one CPU's
    OpenBLAS kernel and not on another's, and this test failed there on the orientation, not the LSE)."""
    gen = torch.Generator().manual_seed(0)
    B, S, H, Hkv, D = 1, 20, 2, 1, 16
    v = torch.randn(B, S, Hkv, D, generator=gen).to(DEVICE)
    do = torch.randn(B, S, H, D, generator=gen).to(DEVICE)
    # |q·k| <= D · 1000² = 1.6e7 < 2^24: every partial sum is an integer fp32 holds exactly
    big, small = ([torch.randint(-bound, bound + 1, (B, S, h, D), generator=gen).float() for h in (H, Hkv)]
                  for bound in (1000, 100))
    for q, k, scale in ((*big, 0.1), (*small, 1e30)):
        # no row's two largest visible logits tie (the float64 reference's LSE loses log 2 to rounding
        # at scale 1e30 and would give two tied keys P = 1 each)
        logits = torch.einsum("bshd,btd->bsht", q, k[:, :, 0]).masked_fill(
            causal & ~torch.ones(S, S, dtype=torch.bool).tril()[None, :, None], -math.inf)
        top2 = logits.topk(2, dim=-1).values
        assert (top2[..., 0] > top2[..., 1]).all()
        q, k = q.to(DEVICE), k.to(DEVICE)
        (o,), (dq, dk, dv) = grads(lambda *a: attn.attention(*a, causal=causal, softmax_scale=scale), [q, k, v], [do])
        ref = lambda *a: reference.attention_with_lse(*a, causal, scale)  # noqa: E731
        (o64, lse64), (_, _, dv64) = grads(ref, [q.double(), k.double(), v.double()], [do.double(), None])
        (o32, lse32), (_, _, dv32) = grads(lambda *a: reference.attention_with_lse(*a, causal, scale, False),
                                           [q, k, v], [do, None])
        # the test's reach: an ulp of the largest LSE₂ is a factor on P far outside dV's tolerance
        lse2_ulp = np.spacing(np.float32(lse64.abs().max().item() * math.log2(math.e)))
        assert lse2_ulp * math.log(2) > 100 * RTOL[torch.float32], lse2_ulp  # 2^ulp − 1 >= ulp · ln 2
        assert_close("o", o, o64, o32, reduced_over=S)
        assert_close("dv", dv, dv64, dv32, reduced_over=S * H // Hkv)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), scale
        with torch.no_grad():
            assert_close("lse", attn.attention_fwd(q, k, v, causal, scale)[1], lse64, lse32, reduced_over=S)


def _assert_residual(o, o_res):
    """launch_fwd's residual of o is what it says: o's shape and dtype, not all zero, below half an ulp of o."""
    assert o_res.shape == o.shape and o_res.dtype == o.dtype and o_res.abs().max() > 0
    ulp = (torch.nextafter(o.abs(), torch.tensor(float("inf"), dtype=o.dtype, device=o.device)) - o.abs()).float()
    assert (o_res.float().abs() <= ulp / 2).all()


def _assert_residual_recovers(o, o_res, o64):
    """O + residual is closer to float64 than O, on average over the elements: with F the fp32 accumulator
    (error a against float64) and O = F + r its rounding, a correct residual is -r and leaves |a|, where O
    has |a + r|, larger on average for an independent r (through the interpreter in fp16, about 0.6 of
    it). A zero residual leaves O's error exactly (_assert_residual refuses it too); a sign-flipped one,
    which passes _assert_residual and an O + residual check at O's tolerance, gives |a + 2r|, larger still."""
    err_o = (o.double() - o64).abs().mean().item()
    err_sum = (o.double() + o_res.double() - o64).abs().mean().item()
    assert err_sum < 0.9 * err_o, f"O + residual: mean error {err_sum:.3e}, not below 0.9 x O's {err_o:.3e}"


def test_delta_reads_o_before_its_rounding(monkeypatch):
    """δ = rowsum(dO ∘ O) from O + R (R = O_fp32 − O, kept by the forward), not from the fp16 O: with
    values and keys that share a large common part (O ≈ every v_j, so dP − δ is small), an error in δ
    reaches dQ times the keys' mean. Without R dQ's error here is about 8 times the plain fp16
    reference's; with it, about 2. The residual is what it says: below half an ulp of O, and not zero."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 32, generator=gen)
    k = 1.0 + 0.3 * torch.randn(1, 64, 1, 32, generator=gen)
    v = 1.5 + 0.2 * torch.randn(1, 64, 1, 32, generator=gen)
    do = torch.randn(1, 64, 2, 32, generator=gen).to(DEVICE, torch.float16)
    inputs = [t.to(DEVICE, torch.float16) for t in (q, k, v)]
    ref = lambda q, k, v: reference.attention(q, k, v)  # noqa: E731
    with_r, without_r = (_dq_error(monkeypatch, attn.attention, inputs, do, ref, keep) for keep in (True, False))
    assert with_r < 0.5 * without_r, (with_r, without_r)

    _assert_residual(*attn.launch_fwd(*inputs[:2], None, inputs[2], False, 32 ** -0.5, residual=True)[::2])
    assert attn.launch_fwd(*inputs[:2], None, inputs[2], False, 1.0, residual=False)[2].numel() == 0
    assert attn.launch_fwd(*(t.float() for t in inputs[:2]), None, inputs[2].float(), False, 1.0,
                           residual=True)[2].numel() == 0  # fp32: O is not rounded


def test_forward_tunes_training_and_inference_launches_apart(monkeypatch):
    """STORE_RES is part of the forward's autotune key: a config tuned for a forward without the residual
    (inference) is not reused for one that stores it (training), whose registers differ (_FWD_CONFIGS)."""
    monkeypatch.setattr(attn._fwd, "best", {})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, h, 16, generator=gen).to(DEVICE, torch.float16) for h in (2, 1, 1))
    for residual in (False, True, False, True):
        attn.launch_fwd(q, k, None, v, False, 0.25, residual=residual)
    assert len(attn._fwd.best) == 2


def _op_and_inputs(op: str, dtype: torch.dtype):
    """attn.attention (GQA 2/1, D 16) or mla.mla_attention (Dn 16, Dr 8, Dv 12) and small inputs for it."""
    from kernels import mla

    gen = torch.Generator().manual_seed(0)
    if op == "attention":
        shapes, fn = [(1, 9, 2, 16), (1, 9, 1, 16), (1, 9, 1, 16)], attn.attention
    else:
        shapes, fn = [(1, 9, 2, 24), (1, 9, 2, 16), (1, 9, 8), (1, 9, 2, 12)], mla.mla_attention
    return fn, [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]


@pytest.mark.parametrize("op", ["attention", "mla_attention"])
def test_a_forward_with_no_backward_to_come_skips_the_residual(monkeypatch, op):
    """Under no_grad (even for leaves that require grad), in inference mode and for inputs that do not
    require grad, the ops call the forward launcher alone, asking it for no O residual; the same output as
    a training forward, which asks for one (bit for bit: with or without the residual is another tuning
    key, so both launch their list's first config, as untimed launches do, even under LWT_AUTOTUNE=1)."""
    monkeypatch.setenv("LWT_AUTOTUNE", "0")
    asked = []
    real = attn.launch_fwd
    monkeypatch.setattr(attn, "launch_fwd", lambda *a, **kw: asked.append(kw.get("residual", False)) or real(*a, **kw))
    fn, inputs = _op_and_inputs(op, torch.float16)
    leaves = [t.clone().requires_grad_() for t in inputs]
    trained = fn(*leaves)
    with torch.no_grad():
        untracked = fn(*leaves)
    with torch.inference_mode():
        inferred = fn(*inputs)
    plain = fn(*inputs)
    assert asked == [True, False, False, False]
    assert trained.requires_grad and not untracked.requires_grad
    for o in (untracked, inferred, plain):
        assert torch.equal(o, trained.detach())


@pytest.mark.parametrize("op", ["attention", "mla_attention"])
def test_vmap_is_refused_as_the_readme_says_without_grad_too(op):
    """README: torch.func transforms run on the reference path only; the Triton path's autograd.Functions
    have no setup_context. Under no_grad (the forward-only path) vmap must raise that too, not hand Triton
    a BatchedTensor."""
    fn, (q, *rest) = _op_and_inputs(op, torch.float32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(lambda q: fn(q, *rest))(torch.stack([q] * 3))


@pytest.mark.parametrize("layout", ["fused", "bhsd"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", [pytest.param((2, 37, 4, 2, 32, None), id="B2-S37-H4/2-D32"),
                                   pytest.param((1, 600, 8, 2, 128, None), id="B1-S600-H8/2-D128",
                                                marks=pytest.mark.cuda)])
def test_strided_layouts(shape, causal, layout):
    """Inputs as a fused QKV projection hands them over, and as transposed (B, H, S, D) buffers: read in
    place through their strides."""
    _check(shape, torch.float16, causal, layout, seed=1)


def test_cotangent_layouts():
    """dO arriving expanded (stride 0, from a broadcast) and transposed."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = _make(1, 19, 2, 1, 32, torch.float32, "contiguous", gen)
    for do in (torch.randn(32, generator=gen).to(DEVICE).expand(1, 19, 2, 32),
               torch.randn(1, 2, 19, 32, generator=gen).to(DEVICE).transpose(1, 2)):
        _compare(q, k, v, do, True)


@pytest.mark.parametrize("layout", ["mixed", "strided-head-dim"])
def test_k_and_v_in_different_layouts_and_a_strided_head_dim(layout):
    """'mixed': q, k and v each in a layout of its own, so that k's and v's strides differ (each pass must
    read v through v's strides, not k's); 'strided-head-dim': q, k, v and dO with a non-unit stride along
    D, which the README allows (copied to unit stride first)."""
    gen = torch.Generator().manual_seed(21)
    B, S, H, Hkv, D = 2, 19, 4, 2, 32

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if layout == "mixed":
        q, k, v = randn(B, S, H, D), randn(B, Hkv, S, D).transpose(1, 2), randn(B, S, Hkv, 3 * D)[..., D:2 * D]
        do = randn(B, S, H, D)
    else:
        q, k, v = (randn(B, S, D, h).transpose(2, 3) for h in (H, Hkv, Hkv))
        do = randn(B, S, D, H).transpose(2, 3)
    assert k.stride() != v.stride() or q.stride(-1) != 1
    _compare(q, k, v, do, True)


@pytest.mark.parametrize("shape", [(0, 5, 2, 1, 16), (2, 0, 2, 2, 16), (1, 4, 0, 1, 16)],
                         ids=["B0", "S0", "H0"])
def test_empty_inputs(shape):
    B, S, H, Hkv, D = shape
    q = torch.randn(B, S, H, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, S, Hkv, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, S, Hkv, D, device=DEVICE, requires_grad=True)
    o = attn.attention(q, k, v)
    assert o.shape == (B, S, H, D)
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and (k.grad == 0).all() and (v.grad == 0).all()


def test_padded_head_dim_reads_only_d():
    """D = 40 is padded to 64 in registers: every input (q, k, v and dO) sits in a wider buffer whose
    extra columns are NaN, which would spread into every result if the forward or backward read them."""
    gen = torch.Generator().manual_seed(3)
    B, S, H, D = 1, 21, 2, 40

    def padded(*shape):
        buf = torch.full((*shape[:-1], shape[-1] + 8), float("nan"), device=DEVICE)
        return buf[..., :D].copy_(torch.randn(*shape, generator=gen))

    q, k, v, do = (padded(B, S, H, D) for _ in range(4))
    _compare(q, k, v, do, True)


def test_rows_past_the_sequence_are_never_read():
    """S = 21 ends in a ragged tile (16-key tiles, 32-query tiles): q, k, v and dO are the first S positions
    of buffers holding 11 more positions of NaN per batch entry, which the tiles past S reach. A masked
    tile that loaded them (V in P·V, or in dO·Vᵀ, with P = 0 there) would turn 0 · NaN into NaN in every
    result of the row: loads past S must be masked, not only the logits."""
    gen = torch.Generator().manual_seed(10)
    B, S, H, Hkv, D = 2, 21, 4, 2, 32

    def padded(heads):
        buf = torch.full((B, S + 11, heads, D), float("nan"), device=DEVICE)
        return buf[:, :S].copy_(torch.randn(B, S, heads, D, generator=gen))

    q, k, v, do = padded(H), padded(Hkv), padded(Hkv), padded(H)
    for causal in (False, True):
        _compare(q, k, v, do, causal)


def test_fp32_inputs_take_ieee_dots_in_every_pass(monkeypatch):
    """fp32 inputs get IEEE fp32 dots, no TF32 (module docstring, Precision), in every pass of attention and
    MLA. The interpreter computes each tl.dot in full precision whatever it is told, so on the CPU only the
    flag the launches pass, and each tl.dot of the kernels' source naming it (triton's default is TF32), can
    show that: both are checked here."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(attn))
    dots = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "dot"]
    assert dots and all(any(kw.arg == "input_precision" for kw in n.keywords) for n in dots), \
        [ast.unparse(n) for n in dots if not any(kw.arg == "input_precision" for kw in n.keywords)]
    from kernels import mla

    seen = []
    for kernel in (attn._fwd, attn._dq, attn._dkdv, mla._dkdv):
        real = kernel.launch
        monkeypatch.setattr(kernel, "launch",
                            lambda *a, _real=real, **kw: seen.append(kw["INPUT_PRECISION"]) or _real(*a, **kw))
    for op in ("attention", "mla_attention"):
        fn, inputs = _op_and_inputs(op, torch.float32)
        leaves = [t.requires_grad_() for t in inputs]
        fn(*leaves).sum().backward()
    assert seen == ["ieee"] * 6, seen  # forward, dQ and dK/dV of each op


def test_widest_fp32_mla_heads_keep_only_the_dq_config_that_fits(monkeypatch):
    """_DQ_CONFIGS["fp32"]: (32, 16, 4, 2) is the only dQ config whose shared memory fits MLA's widest heads
    (q·k 256 + 128, v 256) with 4-byte fp32 elements; pruning drops the other two (an over-permissive size
    estimate, e.g. 2-byte elements for fp32, would keep all three and pass test_gpu_config_lists_are_consistent)."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    meta = {"HEAD_DIM": 256, "ROPE_DIM": 128, "V_DIM": 256, "INPUT_PRECISION": "ieee"}
    kept = [attn.as_entry(c) for c in attn._prune_dq(attn._configs(attn._DQ_CONFIGS, None), meta)]
    assert kept == [(32, 16, 4, 2)]


def test_offsets_of_exactly_2_31_elements_pass_and_one_more_is_refused():
    """A batch entry may span 2^31 elements (offsets up to 2^31 − 1: Limits), not one more. Shapes of
    contiguous outputs still to be allocated, so nothing is allocated here."""
    attn._check_offsets(o=(1, 2, 2**30))  # 2^31 elements
    with pytest.raises(ValueError, match=r"^o: one batch entry spans 2147483649 elements"):
        attn._check_offsets(o=(1, 3, 715827883))  # 2^31 + 1 elements


def test_backward_computes_only_what_is_needed(monkeypatch):
    """Only v (or only k) requires grad: no dQ pass; only q: no dK/dV pass. The gradients asked for still match."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _make(1, 23, 4, 2, 32, torch.float32, "contiguous", gen)
    do = torch.randn(1, 23, 4, 32, generator=gen).to(DEVICE)
    calls = []
    real_dq, real_dkdv = attn.launch_dq, attn._dkdv.launch
    monkeypatch.setattr(attn, "launch_dq", lambda *a: calls.append("dq") or real_dq(*a))
    monkeypatch.setattr(attn._dkdv, "launch", lambda *a, **kw: calls.append("dkdv") or real_dkdv(*a, **kw))
    for wanted, expected_calls in (([False, False, True], ["dkdv"]), ([False, True, False], ["dkdv"]),
                                   ([True, False, False], ["dq"])):
        calls.clear()
        (g,) = _wanted_grads(lambda *a: attn.attention(*a, causal=True), (q, k, v), wanted, do)
        assert calls == expected_calls
        (g64,) = _wanted_grads(lambda *a: reference.attention(*a, True), [t.double() for t in (q, k, v)], wanted,
                               do.double())
        (g_ref,) = _wanted_grads(lambda *a: reference.attention(*a, True), (q, k, v), wanted, do)
        assert_close("grad", g, g64, g_ref, reduced_over=23 * 2)


def _wanted_grads(fn, inputs, wanted, do):
    leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wanted)]
    return torch.autograd.grad(fn(*leaves), [t for t in leaves if t.requires_grad], do)


@pytest.mark.parametrize("loss", ["square_sum", "sum"])
def test_double_backward_raises(loss):
    """The backward is not differentiable: asking for a second derivative is an error, not a silent 0,
    also when the upstream gradient is a constant (a plain .sum(), which once_differentiable misses)."""
    q, k, v = (t.requires_grad_() for t in _make(1, 9, 2, 1, 16, torch.float32, "contiguous",
                                                  torch.Generator().manual_seed(9)))
    o = attn.attention(q, k, v)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (dq,) = torch.autograd.grad(o.square().sum() if loss == "square_sum" else o.sum(), [q], create_graph=True)
        (o.sum() + dq.square().sum()).backward()


def test_kernel_entry_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    import kernels._common as common

    monkeypatch.setattr(common, "interpreting", lambda: False)
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"^q: expected a CUDA tensor for the Triton kernel, got one on cpu"):
        attn.attention(q, q, q)


@pytest.mark.cuda
def test_backward_is_deterministic():
    """No atomics: two backward passes give bit-identical dQ, dK, dV (GQA: dK/dV summed over groups)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = _make(2, 1537, 16, 2, 128, torch.bfloat16, "contiguous", gen)
    do = torch.randn(2, 1537, 16, 128, generator=gen).to(DEVICE, torch.bfloat16)
    for causal in (False, True):
        runs = [grads(lambda a, b, c: attn.attention(a, b, c, causal), [q, k, v], [do])[1] for _ in range(2)]
        for g1, g2 in zip(*runs):
            assert torch.equal(g1, g2)


# ---------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any launch
# ---------------------------------------------------------------------------------------------------

def _ok():
    return (torch.randn(2, 8, 4, 16, device=DEVICE), torch.randn(2, 8, 2, 16, device=DEVICE),
            torch.randn(2, 8, 2, 16, device=DEVICE))


def _bad_cases():
    q, k, v = _ok()
    meta = torch.randn(2, 8, 2, 16, device="meta")
    return [
        ("q", "expected a torch.Tensor", (q.tolist(), k, v), {}),
        ("q", "expected 4 dims", (q[0], k, v), {}),
        ("k", "expected 4 dims", (q, k[0], v), {}),
        ("q", "expected dtype", (q.to(torch.int32), k, v), {}),
        ("k", "expected the dtype of q", (q, k.half(), v), {}),
        ("v", "expected the dtype of q", (q, k, v.half()), {}),
        ("k", "expected a tensor on", (q, meta, v), {}),
        ("k", "expected shape", (q, k[:1], v), {}),
        ("k", "expected shape", (q, k[:, :5], v), {}),
        ("v", "expected shape", (q, k, v[..., :8]), {}),
        ("v", "expected the shape of k", (q, k, v[:, :, :1]), {}),
        ("k", "dividing the 4 query heads", (q, torch.randn(2, 8, 3, 16, device=DEVICE), torch.randn(2, 8, 3, 16, device=DEVICE)), {}),
        ("k", "expected shape", (q, k[:, :, :0], v[:, :, :0]), {}),
        ("q", "head dim", (torch.randn(1, 2, 1, 300, device=DEVICE), torch.randn(1, 2, 1, 300, device=DEVICE),
                           torch.randn(1, 2, 1, 300, device=DEVICE)), {}),
        ("q", "head dim", (q[..., :0], k[..., :0], v[..., :0]), {}),
        ("causal", "expected a bool", (q, k, v), {"causal": 1}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": 0.0}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": -0.1}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": float("nan")}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": True}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": torch.tensor(0.1)}),
        # positive as Python floats, but 0 (masked -inf scores would become NaN) or inf once scaled in fp32
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": 1e-46}),
        ("softmax_scale", "real number > 0 that stays a normal fp32", (q, k, v), {"softmax_scale": 1e39}),
    ]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_a_value_error_before_any_launch(monkeypatch, case, entry):
    name, message, args, kwargs = _bad_cases()[case]
    assert_refused_before_launch(monkeypatch, entry, attn.attention, lwtF.attention,
                                 [(attn, "launch_fwd"), (reference, "attention")], rf"^{name}: .*{message}",
                                 *args, **kwargs)


def test_widest_head_dim_is_accepted():
    """D = MAX_HEAD_DIM (256), the widest head dim the kernels take (300 is refused above), on the CPU
    suite too (its SHAPES stop at D 192; D 256 is otherwise in CUDA_SHAPES only): output and gradients
    match the float64 reference."""
    _check((1, 3, 2, 1, 256, None), torch.float32, True)


def test_functional_dispatch(monkeypatch):
    """auto: the kernel for CUDA tensors, the reference otherwise; both forced paths agree, and the
    reference path alone takes float64."""
    calls = []
    real_fwd, real_ref = attn.launch_fwd, reference.attention
    monkeypatch.setattr(attn, "launch_fwd", lambda *a, **kw: calls.append("kernel") or real_fwd(*a, **kw))
    monkeypatch.setattr(reference, "attention", lambda *a: calls.append("reference") or real_ref(*a))
    q, k, v = _ok()
    lwtF.attention(q, k, v)
    assert calls == ["kernel" if CUDA else "reference"]
    outs = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LWT_BACKEND", backend)
        calls.clear()
        outs[backend] = lwtF.attention(q, k, v, causal=True)
        assert calls == ["kernel" if backend == "triton" else "reference"]
    o64 = real_ref(q.double(), k.double(), v.double(), True)
    assert_close("o", outs["triton"], o64, outs["reference"], reduced_over=8)
    # the reference path is the yardstick above, which a wrong one (causal dropped) only loosens: held to
    # the table on its own
    assert_close("o (reference path)", outs["reference"], o64, outs["reference"], reduced_over=8)
    assert lwtF.attention(q.double(), k.double(), v.double()).dtype == torch.float64
    monkeypatch.setenv("LWT_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"^q: expected dtype float32, float16 or bfloat16, got torch.float64"):
        lwtF.attention(q.double(), k.double(), v.double())



@HEAVY
def test_offsets_past_int32_within_a_batch_entry_are_refused():
    """Offsets inside one batch entry are int32 in the kernels: a layout whose entry spans 2^31 elements
    or more is a ValueError (the buffer is only reserved, never touched)."""
    buf = torch.empty(2**31 + 64, dtype=torch.float16, device=DEVICE)
    q = buf.as_strided((1, 3, 1, 16), (0, 2**30, 16, 1))
    k = torch.randn(1, 3, 1, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^q: one batch entry spans 2147483664 elements"):
        attn.attention(q, k, k)


@pytest.mark.parametrize("precision", ["tf32", "ieee"], ids=["16-bit", "fp32"])
@pytest.mark.parametrize("head_dim,rope_dim,v_dim", [
    (16, 0, 16), (32, 0, 32), (64, 0, 64), (128, 0, 128), (256, 0, 256),
    (128, 64, 128), (64, 32, 64), (128, 64, 256), (256, 128, 256),  # MLA (padded): DeepSeek-V2's, ..., the widest
], ids=lambda d: str(d))
def test_gpu_config_lists_are_consistent(monkeypatch, head_dim, rope_dim, v_dim, precision):
    """The GPU autotune lists: every listed config has the block alignment its mask split relies on
    (otherwise only a tl.static_assert at compile time would say so), and pruning per head dims and
    dtype keeps some of the listed configs (it raises if none fits), in the list's order (untimed
    launches take the first), up to MLA's widest heads (q·k 256 + 128, v 256), where the fp32 dQ list
    once kept none."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    for name, table, prune, aligned in [
        ("fwd", attn._FWD_CONFIGS, attn._prune_fwd, lambda bm, bn: bm % bn == 0),
        ("dkdv", attn._MLA_DKDV_CONFIGS if rope_dim else attn._DKDV_CONFIGS,
         attn._prune_mla_dkdv if rope_dim else attn._prune_dkdv, lambda bm, bn: bn % bm == 0),
        ("dq", attn._DQ_CONFIGS, attn._prune_dq, lambda bm, bn: bm % bn == 0),
    ]:
        listed = table["fp32" if precision == "ieee" else attn._table_key(head_dim + rope_dim, v_dim)]
        for bm, bn, warps, stages, *optional in listed:
            assert aligned(bm, bn) and min(bm, bn) >= 16 and warps in (4, 8) and stages >= 1, (name, bm, bn)
            # dK/dV: FLATTEN, and for MLA's kernel SPLIT too (kernels/mla.py takes both, GQA's FLATTEN alone)
            fields = (1 + bool(rope_dim)) if name == "dkdv" else 0
            assert len(optional) == fields and all(f in (True, False) for f in optional), (name, bm, bn, optional)
        meta = {"HEAD_DIM": head_dim, "ROPE_DIM": rope_dim, "V_DIM": v_dim, "INPUT_PRECISION": precision}
        kept = [attn.as_entry(c) for c in prune(attn._configs(table, None), meta)]
        assert kept and set(kept) <= set(listed), (name, kept)
        assert kept == [e for e in listed if e in kept], (name, kept)  # in the list's order (LWT_AUTOTUNE=0)


def test_mla_dkdv_lists_put_fused_configs_first_and_split_ones_where_documented():
    """attention._MLA_DKDV_CONFIGS: GQA's dK/dV lists with SPLIT False (then any SPLIT additions), every
    list led by a fused config (LWT_AUTOTUNE=0 launches the first), and SPLIT configs on the lists of
    the heads the comment names (Dv = Dn + Dr on the 256 list, DeepSeek-V2's on "mla"), or the GPU never
    runs that pass there."""
    mla_lists = attn._MLA_DKDV_CONFIGS
    assert set(mla_lists) == set(attn._DKDV_CONFIGS) | {"mla"}
    for key, gqa in attn._DKDV_CONFIGS.items():
        assert mla_lists[key][:len(gqa)] == [(*entry, False) for entry in gqa], key
    for key, listed in mla_lists.items():
        assert len(set(listed)) == len(listed) and listed[0][5] is False, (key, listed)
    for key in (256, "mla"):
        assert any(entry[5] for entry in mla_lists[key]), key


# ---------------------------------------------------------------------------------------------------
# The opt-in TMA forward (LWT_ATTN_TMA=1, attention._attn_fwd_tma_kernel)
# ---------------------------------------------------------------------------------------------------

# SHAPES' head dims the TMA forward takes, but for the two S 130 ones (the slowest through the interpreter;
# B2-S64 has exact and B1-S47 ragged tiles, both with the key mask on), the GPU's, and one with EVEN_S
TMA_SHAPES = [p for p in SHAPES + CUDA_SHAPES if p.values[0][4] in attn._TMA_HEAD_DIMS and "S130" not in p.id] + [
    pytest.param((2, 128, 2, 1, 32, None), id="B2-S128-H2/1-D32")]  # S % 128 == 0: EVEN_S, no key mask
TMA_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]


@pytest.fixture
def tma_launches(monkeypatch):
    """LWT_ATTN_TMA=1 and a list that counts the TMA forward's launches; skips on a GPU other than sm_90,
    which never takes it."""
    if CUDA and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA forward runs on sm_90 (H100/H200) only")
    monkeypatch.setenv("LWT_ATTN_TMA", "1")
    launches, launch = [], attn._fwd_tma.launch
    monkeypatch.setattr(attn._fwd_tma, "launch", lambda *a, **kw: (launches.append(kw), launch(*a, **kw))[1])
    return launches


@pytest.mark.parametrize("dtype", TMA_DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", TMA_SHAPES)
def test_tma_forward_matches_float64_reference(tma_launches, shape, causal, dtype):
    """O, the LSE and, through the backward it feeds (LSE and O's residual), dQ, dK, dV, as the pointer
    forward's test checks them; the TMA kernel ran (once for o, once for the LSE check)."""
    _check(shape, dtype, causal)
    assert len(tma_launches) == 2 and [kw["STORE_RES"] for kw in tma_launches] == [True, False]


@pytest.mark.parametrize("layout", ["fused", "first-rows"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_tma_forward_reads_strided_views(tma_launches, causal, layout):
    """q, k, v as slices of one (B, S, (H + 2·Hkv)·D) projection output (rows wider than their heads), as
    GQAAttention hands v over, or as the first 37 positions of 50-long sequences (a batch stride of 50
    rows): the descriptors take both strides, so the TMA path applies, and reads only these rows. Its
    O residual (which the backward's δ reads, and a zero one would hardly show there) is O's own."""
    B, S, H, Hkv, D = 2, 37, 4, 2, 32
    gen = torch.Generator().manual_seed(1)
    if layout == "fused":
        q, k, v = _make(B, S, H, Hkv, D, torch.float16, "fused", gen)
    else:
        q, k, v = (t[:, :S] for t in _make(B, 50, H, Hkv, D, torch.float16, "contiguous", gen))
    _compare(q, k, v, torch.randn(q.shape, generator=gen).to(DEVICE, torch.float16), causal)
    with torch.no_grad():
        _assert_residual(*attn.launch_fwd(q, k, None, v, causal, D ** -0.5, residual=True)[::2])
    assert len(tma_launches) == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the second entry's NaN rows (interpreter)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_tma_forward_keeps_batch_entries_apart(tma_launches, causal):
    """A tile past the sequence end reads zeros, not the next batch entry's rows (the batch entry is a
    dimension of the descriptors; with (B·S, heads·D) ones it was the next entry's): with that entry's
    queries NaN and its keys and values inf, the first entry's output is still its own, finite and
    right (S 20: a ragged last tile of 16-key tiles on the interpreter, of every GPU tile)."""
    B, S, H, Hkv, D = 2, 20, 2, 1, 32
    gen = torch.Generator().manual_seed(2)
    q, k, v = _make(B, S, H, Hkv, D, torch.float16, "contiguous", gen)
    q[1], k[1], v[1] = float("nan"), float("inf"), float("inf")
    with torch.no_grad():
        o = attn.attention(q, k, v, causal)
        first = [t[:1] for t in (q, k, v)]
        o64 = reference.attention(*(t.double() for t in first), causal)
        o_ref = reference.attention_with_lse(*first, causal, None, False)[0]
    assert len(tma_launches) == 1
    assert_close("o", o[:1], o64, o_ref, reduced_over=S)


def _every_listed_tma_config(monkeypatch, tma_launches, D, causal, dtype, seq_lens):
    """Each config of the head dim's TMA list forced in turn (the suite's LWT_AUTOTUNE=0 launches the
    first alone; an autotuned run may pick any), as a training forward launches it (O's residual
    stored): O, O + residual and the LSE against float64, the residual O's own (not zero, below half an
    ulp of O: the O + residual check alone passes a zero one), at each S with two batch entries."""
    for S in seq_lens:
        gen = torch.Generator().manual_seed(S)
        q, k, v = _make(2, S, 8, 2, D, dtype, "contiguous", gen)
        with torch.no_grad():
            o64, lse64 = reference.attention_with_lse(q.double(), k.double(), v.double(), causal)
            o_ref, lse_ref = reference.attention_with_lse(q, k, v, causal, None, False)
            for entry in attn._TMA_FWD_CONFIGS[D]:
                force_config(monkeypatch, attn._fwd_tma, attn.as_config(entry, attn._TMA_FIELDS))
                o, lse2, o_res = attn.launch_fwd(q, k, None, v, causal, D ** -0.5, residual=True)
                assert_close("o", o, o64, o_ref, reduced_over=S)
                assert_close("o + residual", o.double() + o_res.double(), o64, o_ref, reduced_over=S, dtype=dtype)
                _assert_residual(o, o_res)
                _assert_residual_recovers(o, o_res, o64)
                assert_close("lse", lse2 * math.log(2), lse64, lse_ref, reduced_over=S)
    assert len(tma_launches) == len(seq_lens) * len(attn._TMA_FWD_CONFIGS[D])
    assert all(kw["STORE_RES"] for kw in tma_launches)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("D", attn._TMA_HEAD_DIMS)
def test_tma_forward_every_listed_config(monkeypatch, tma_launches, D, causal):
    """Every listed config in bf16 at a ragged S (EVEN_S off) and at S 1024 (on)."""
    _every_listed_tma_config(monkeypatch, tma_launches, D, causal, torch.bfloat16, (1000, 1024))


@pytest.mark.skipif(CUDA, reason="the interpreter's copy of test_tma_forward_every_listed_config")
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_tma_forward_every_listed_config_interpreted(monkeypatch, tma_launches, causal):
    """The GPU test's checks at D 32 in fp16 (the interpreter computes bf16 dots wrongly), S 100 (ragged)
    and 128, so that the test itself runs before a GPU does: its O + residual check, a float64 tensor,
    looked its tolerance up under float64 (a KeyError on the GPU at 957c197)."""
    _every_listed_tma_config(monkeypatch, tma_launches, 32, causal, torch.float16, (100, 128))


def test_tma_forward_applies_where_its_descriptors_can_read(monkeypatch):
    """attention._tma_forward: off unless LWT_ATTN_TMA=1; then 16-bit q, k, v of one head dim in 32, 64,
    128, each a (B, S, heads·D) tensor (heads D apart) with batch and row strides of whole 16-byte units
    and a 16-byte aligned start. Everything else keeps the pointer kernel (the attention tests cover
    those layouts)."""
    def make(dtype=torch.float16, D=32, layout="contiguous"):
        return _make(2, 24, 4, 2, D, dtype, layout, torch.Generator().manual_seed(0))

    def first_rows():  # the first 17 positions of longer sequences: the batch stride is not S rows
        return tuple(t[:, :17] for t in make())

    def unaligned():  # rows 16-byte aligned, the start 2 bytes off
        q, k, v = make()
        buf = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)
        return buf[1:].view(q.shape).copy_(q), k, v

    monkeypatch.delenv("LWT_ATTN_TMA", raising=False)
    assert not attn._tma_forward(*make())
    monkeypatch.setenv("LWT_ATTN_TMA", "0")
    assert not attn._tma_forward(*make())
    monkeypatch.setenv("LWT_ATTN_TMA", "1")
    here = not CUDA or torch.cuda.get_device_capability()[0] == 9  # the interpreter, or an sm_90 GPU
    assert attn._tma_forward(*make()) == here and attn._tma_forward(*make(layout="fused")) == here
    assert attn._tma_forward(*make(D=64)) == here and attn._tma_forward(*first_rows()) == here
    for inputs in (make(torch.float32), make(D=48), make(D=16), make(layout="bhsd"), unaligned()):
        assert not attn._tma_forward(*inputs)
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    assert not attn._tma_forward(*(t.cpu() for t in make()))  # CPU tensors without the interpreter
    monkeypatch.setenv("LWT_ATTN_TMA", "yes")
    with pytest.raises(ValueError, match=r"^LWT_ATTN_TMA: expected 1 .* or 0, got 'yes'"):
        attn.tma_requested()


def test_tma_config_lists_are_consistent(monkeypatch):
    """Every TMA config: BLOCK_N divides BLOCK_M and 128 (EVEN_S is S % 128 == 0), 128-row query tiles,
    warp-specialised ones at 4 warps (triton's Hopper pass splits them into 3 warp groups; at 8 it leaves
    the loop unspecialised); the prune keeps a head dim's list in its order (LWT_AUTOTUNE=0 takes
    the first, a warp-specialised one)."""
    monkeypatch.setattr(attn, "interpreting", lambda: False)
    configs = attn._configs(attn._TMA_FWD_CONFIGS, None, attn._TMA_FIELDS)
    for d, listed in attn._TMA_FWD_CONFIGS.items():
        for bm, bn, warps, stages, ws in listed:
            assert bm == 128 and bm % bn == 0 and 128 % bn == 0 and stages >= 1, (d, bm, bn)
            assert warps == 4 if ws else warps == 8, (d, bm, bn, warps, ws)
        assert listed[0][4] is True, d
        kept = [attn.as_entry(c, attn._TMA_FIELDS) for c in attn._prune_tma_fwd(configs, {}, D=d)]
        assert kept == listed, d
