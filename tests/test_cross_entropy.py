"""Linear cross entropy (kernels/cross_entropy.py) against the float64 reference: the loss and the
gradients for hidden, weight and token_weight, each reduction, with token weights and ignored rows."""
import math

import pytest
import torch

import lwt.functional as lwtF
from kernels import cross_entropy as ce
from kernels import reference
from tests.helpers import ENTRIES, HEAVY, assert_refused_before_launch
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]
# (N, D, V). The interpreter's row kernel walks 256 logits per block: V 257 and 1000 end in a ragged
# block, V 1 is a single class (loss 0, gradients 0 up to rounding).
SHAPES = [
    pytest.param(1, 16, 1, id="N1-D16-V1"),
    pytest.param(37, 24, 257, id="N37-D24-V257"),
    pytest.param(0, 16, 10, id="N0-D16-V10"),
]
# N 1536 at V 128000: two chunks of logits in bf16 when every row is kept (three in fp32), and a float64
# reference of 1.5 GiB of logits (heavy). V 50257 (a padded row stride) at N 512: its float64 reference
# peaks near 1 GiB, as its 36 cases may run side by side on the GPU's test workers.
CUDA_SHAPES = [pytest.param(1536, 1024, 128000, id="N1536-D1024-V128000", marks=[pytest.mark.cuda, HEAVY]),
               pytest.param(512, 1024, 50257, id="N512-D1024-V50257", marks=pytest.mark.cuda)]
VARIANTS = ["plain", "weighted", "ignored", "weighted-ignored"]
REDUCTIONS = ["mean", "sum", "none"]


def _inputs(N, D, V, dtype, variant, seed=0, lead=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, N, D, generator=gen).to(DEVICE, dtype)
    # Logits of a few units, as a trained head gives: softmax neither uniform nor one-hot.
    weight = (torch.randn(V, D, generator=gen) * 2 * D ** -0.5).to(DEVICE, dtype)
    target = torch.randint(0, V, (*lead, N), generator=gen)
    if "ignored" in variant and N:
        target.view(-1)[::3] = -100
    token_weight = None
    if "weighted" in variant:
        token_weight = (0.5 + 4 * torch.rand(*lead, N, generator=gen)).to(DEVICE)  # like 1/t for t in [0.2, 1]
    return hidden, weight, target.to(DEVICE), token_weight


def _run(fn, hidden, weight, target, token_weight, reduction, cotangent, **kwargs):
    """Loss and the gradients for hidden, weight (and token_weight when given)."""
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
    tw = None if token_weight is None else token_weight.detach().requires_grad_()
    loss = fn(leaves[0], leaves[1], target, tw, reduction, **kwargs)
    gs = torch.autograd.grad(loss, leaves + ([tw] if tw is not None else []), cotangent.clone())
    return loss.detach(), list(gs)


def _cancelling_terms(hidden, weight, target, token_weight, reduction, cotangent):
    """{result: size of its terms} when V = 1: the softmax of one logit is exactly 1, so each row's loss
    lse − z_t and its dZ = c·(p − 1) vanish, in the fp32 reference too, and with them every gradient. What
    a kernel returns is the roundoff of those differences: lse − z_t cancels terms of size |z|, and
    p = 2^(z·log2 e − lse₂) (lse₂: the kernel's base-2 lse) is off by the roundoff of its exponent (terms
    of size |z|) and of the GPU's approximate exp2 (size 1). Measure each result against the terms that
    cancel in it: |z|, |c|·(1 + |z|)·|w| or |c|·(1 + |z|)·|h| (summed over the rows that add up), as
    test_attention does for S = 1."""
    h, w = hidden.double().reshape(-1, hidden.shape[-1]), weight.double()
    kept = (target.reshape(-1) != -100).double()
    tw = torch.ones_like(kept) if token_weight is None else token_weight.double().reshape(-1)
    r = 1.0 / max(kept.sum().item(), 1.0) if reduction == "mean" else 1.0
    g = cotangent.double().reshape(-1).expand_as(kept).abs()
    z = (h @ w.t()).reshape(-1).abs() * kept  # the one logit of each kept row
    dz = g * tw * r * kept * (1 + z)  # the terms of each row's dZ
    loss = (tw * z).max() if reduction == "none" else (tw * z).sum() * r
    return {"loss": loss.item(), "d_hidden": (dz.max() * w.abs().max()).item(),
            "d_weight": (dz[:, None] * h.abs()).sum(0).max().item(), "d_token_weight": (g * r * z).max().item()}


def _check(N, D, V, dtype, reduction, variant, seed=0, lead=(), **kwargs):
    hidden, weight, target, tw = _inputs(N, D, V, dtype, variant, seed, lead)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = target.shape if reduction == "none" else ()
    cotangent = (torch.rand(shape, generator=gen) + 0.5).to(DEVICE)

    loss, gs = _run(ce.linear_cross_entropy, hidden, weight, target, tw, reduction, cotangent, **kwargs)
    tw64 = None if tw is None else tw.double()
    loss64, gs64 = _run(reference.linear_cross_entropy, hidden.double(), weight.double(), target, tw64, reduction,
                        cotangent.double())
    loss_ref, gs_ref = _run(reference.linear_cross_entropy, hidden, weight, target, tw, reduction, cotangent)
    assert loss.dtype == torch.float32 and loss.shape == shape
    kept = int((target != -100).sum())
    scales = _cancelling_terms(hidden, weight, target, tw, reduction, cotangent) if V == 1 and kept else {}
    # The loss and d_token_weight (the per-row losses) are fp32 but computed from logits rounded to the
    # inputs' dtype, so they are held to that dtype's tolerance (both sides rounded to it).
    as_input = (lambda t: t.to(dtype)) if dtype != torch.float32 else (lambda t: t)
    if reduction == "mean" and kept == 0:
        assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy; the gradients (all zero) are still checked
    else:
        assert_close("loss", as_input(loss), loss64, as_input(loss_ref), reduced_over=max(kept, V),
                     scale=scales.get("loss"))
    names = ["d_hidden", "d_weight", "d_token_weight"]
    reduced = [V, max(kept, 1), V]
    for name, g, g64, g_ref, k in zip(names, gs, gs64, gs_ref, reduced):
        assert g.dtype == g_ref.dtype
        if name == "d_token_weight":
            g, g_ref = as_input(g), as_input(g_ref)
        assert_close(name, g, g64, g_ref, reduced_over=k, scale=scales.get(name))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,V", SHAPES + CUDA_SHAPES)
def test_matches_float64_reference(N, D, V, dtype, reduction, variant):
    _check(N, D, V, dtype, reduction, variant)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_wider_vocabulary(dtype, reduction):
    """V 1000: four row blocks in the interpreter, the last ragged (the interpreter is slow: one variant)."""
    _check(64, 40, 1000, dtype, reduction, "weighted-ignored", seed=2)


@pytest.mark.parametrize("accum_dtype", [torch.float32, None], ids=["fp32-accum", "weight-dtype-accum"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_row_chunks(monkeypatch, dtype, reduction, accum_dtype):
    """Chunks of 5 rows: dW summed over 6 chunks (in fp32 through the Triton accumulation GEMM for
    16-bit inputs, or in the weight's dtype), the row kernel's statistics per chunk, ignored rows dropped
    before chunking. D 40 ends the accumulation GEMM's column tiles raggedly."""
    V = 257
    itemsize = torch.tensor([], dtype=dtype).element_size()
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 5 * 272 * itemsize)  # 5 rows, padded to 272
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)  # the fp32 sum's chunks no larger
    _check(41, 40, V, dtype, reduction, "weighted-ignored", seed=3, accum_dtype=accum_dtype)


def test_fp32_dw_sum_rounds_once_over_many_chunks(monkeypatch):
    """fp16 inputs in 100 chunks of 3 rows: dW's fp32 running sum is rounded to fp16 once, at the end.
    test_many_row_chunks's 6 chunks cannot tell that from a sum rounded to 16 bits after every chunk (3x
    the bound here), nor from accum_dtype=None's."""
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 3 * 48 * 2)  # 3 rows of V 33, padded to 48
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)
    _check(300, 16, 33, torch.float16, "sum", "plain")


@pytest.mark.parametrize("n,budget_rows,expected", [
    (16384, 1024, 1024),  # V 128000 bf16 in 250 MiB: 16 whole chunks
    (16384, 2097, 2048),  # the fp32 sum's 512 MiB: 8 chunks of whole 128-row tiles
    (9000, 1024, 1024),  # 9 chunks either way; the last one the shortest (808 rows)
    (16384, 786, 781),  # 192 MiB: 21 even chunks, not 21 of 768 and a sliver of 256 rows
    (1000, 1024, 1000), (0, 1024, 1), (7, 3, 3),
])
def test_chunk_rows(n, budget_rows, expected):
    """The fewest chunks the budget allows, of even sizes, in whole 128-row tiles where that fits."""
    rows = ce._chunk_rows(n, 128000, 4096, 2, budget_rows * 128000 * 2)
    assert rows == expected
    assert rows <= max(budget_rows, 1) and max(1, -(-n // rows)) == max(1, -(-n // budget_rows))


@pytest.mark.parametrize("V,D", [(16, 4096), (128000, 65536)], ids=["narrow-vocabulary", "wide-hidden"])
def test_chunk_rows_keep_offsets_in_int32(V, D):
    """Fewer than 2^31 elements of hidden and of logits per chunk, whatever the budget: a vocabulary of a
    few words, or an fp32 sum's budget (V·D bytes) at a very wide hidden size."""
    rows = ce._chunk_rows(10**7, V, D, 2, 2**40 if V == 16 else V * D)
    cap = (2**31 - 1) // max(V, D)
    assert rows * max(V, D) < 2**31 and -(-10**7 // rows) == -(-10**7 // cap)


@pytest.mark.parametrize("budget_rows,chunks,wider_sum", [(0, 6, True), (10, 3, True), (27, 1, False)])
def test_fp32_sum_takes_larger_chunks(monkeypatch, budget_rows, chunks, wider_sum):
    """With an fp32 dW sum, chunks may hold logits up to ACCUM_CHUNK_SHARE of that buffer's size; rows that
    then fit in one chunk are one GEMM, rounded once, with no fp32 buffer. fp16 (whose gradients wait for
    the backward), 27 kept rows of V 257 (a padded row of 272), D 40: 5-row chunks without the share. The
    forward, which computes no gradient, walks the chunks the backward will."""
    V, D, row_bytes = 257, 40, 272 * 2
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 5 * row_bytes)
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", (budget_rows * row_bytes + 1) / (V * D * 4))
    stat_chunks, grad_chunks, sums = [], [], []
    rows_kernel, accumulate = ce._launch_rows, ce._accumulate_dw

    def rows(z, target, row_scale, lse, loss, compute_lse, write_grad):
        (grad_chunks if write_grad else stat_chunks).append(z.shape[0])
        rows_kernel(z, target, row_scale, lse, loss, compute_lse, write_grad)

    monkeypatch.setattr(ce, "_launch_rows", rows)
    monkeypatch.setattr(ce, "_accumulate_dw", lambda dw, *a, **k: (sums.append(dw.dtype), accumulate(dw, *a, **k)))
    _check(41, D, V, torch.float16, "mean", "weighted-ignored", seed=3)
    assert len(grad_chunks) == chunks and sum(grad_chunks) == 27  # 41 rows, every third ignored
    assert stat_chunks == grad_chunks  # the backward recomputes the forward's chunks of logits
    assert set(sums) == {torch.float32 if wider_sum else torch.float16}


def test_expanded_upstream_gradient_and_strided_target():
    """"none" summed over (B, S) hands the backward an expanded (stride-0) gradient; a target sliced out of
    a wider tensor has a row stride > 1. Both are read correctly."""
    hidden, weight, target, _ = _inputs(7, 16, 30, torch.float32, "plain", seed=12, lead=(2,))
    wide_target = torch.stack([target, torch.zeros_like(target)], dim=-1)[..., 0]  # (2, 7), stride (14, 2)
    h = hidden.detach().requires_grad_()
    ce.linear_cross_entropy(h, weight, wide_target, reduction="none").sum().backward()
    h64 = hidden.double().requires_grad_()
    reference.linear_cross_entropy(h64, weight.double(), target, reduction="none").sum().backward()
    assert_close("d_hidden", h.grad, h64.grad, h64.grad.float(), reduced_over=30)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp16_under_a_loss_scale(reduction):
    """A GradScaler-sized upstream gradient (2^16) in fp16: fp16 computes its gradients in the backward,
    where the scale multiplies dZ before it is rounded (small probabilities do not flush to zero), and the
    forward writes no gradient."""
    flags = []
    launch = ce._launch_rows

    def recording(z, target, row_scale, lse, loss, compute_lse, write_grad):
        flags.append((compute_lse, write_grad))
        return launch(z, target, row_scale, lse, loss, compute_lse, write_grad)
    hidden, weight, target, _ = _inputs(40, 24, 300, torch.float16, "plain", seed=13)
    shape = target.shape if reduction == "none" else ()
    scale = torch.full(shape, 2.0**16, device=DEVICE) / (40 if reduction == "none" else 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ce, "_launch_rows", recording)
        loss, gs = _run(ce.linear_cross_entropy, hidden, weight, target, None, reduction, scale)
    assert flags == [(True, False), (False, True)]  # statistics in the forward, gradients in the backward
    _, gs64 = _run(reference.linear_cross_entropy, hidden.double(), weight.double(), target, None, reduction,
                   scale.double())
    _, gs_ref = _run(reference.linear_cross_entropy, hidden, weight, target, None, reduction, scale)
    for name, g, g64, g_ref, k in zip(["d_hidden", "d_weight"], gs, gs64, gs_ref, [300, 40]):
        assert_close(name, g, g64, g_ref, reduced_over=k)


@pytest.mark.parametrize("accum_dtype", [torch.float32, None], ids=["fp32-accum", "weight-dtype-accum"])
def test_fp16_without_a_loss_scale_keeps_small_probabilities(monkeypatch, accum_dtype):
    """fp16, mean over 128 rows and an upstream gradient of 2^-7 (no loss scale): c · p is ~4e-8 for the
    typical p ~ 1/V, below fp16's smallest subnormal step, so eager's dZ flushes most of each row to 0 and
    its dH misses the float64 one by 1.1% of its largest entry. The backward writes dZ / α and scales
    the GEMMs' fp32 sums by α (kernels/cross_entropy.py, Precision): 0.08% here. Four chunks: the fp32 dW
    sum applies α at its last store only, the fp16 one in each chunk's GEMM."""
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 32 * 2048 * 2)
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)
    hidden, weight, target, _ = _inputs(128, 32, 2048, torch.float16, "plain")
    g = torch.tensor(2.0**-7, device=DEVICE)
    _, gs = _run(ce.linear_cross_entropy, hidden, weight, target, None, "mean", g, accum_dtype=accum_dtype)
    _, gs64 = _run(reference.linear_cross_entropy, hidden.double(), weight.double(), target, None, "mean",
                   g.double())
    _, gs_ref = _run(reference.linear_cross_entropy, hidden, weight, target, None, "mean", g)
    for name, got, g64, g_ref, k in zip(["d_hidden", "d_weight"], gs, gs64, gs_ref, [2048, 128]):
        assert_close(name, got, g64, g_ref, reduced_over=k)
    err = lambda t: (t.double() - gs64[0]).abs().max().item()  # noqa: E731
    assert err(gs[0]) < err(gs_ref[0]) / 4, (err(gs[0]), err(gs_ref[0]))


def test_leading_dims_and_strided_hidden():
    """hidden (B, S, D) as a slice of a wider buffer (row stride > D): read in place; "none" keeps (B, S)."""
    hidden, weight, target, tw = _inputs(7, 24, 100, torch.float32, "weighted-ignored", seed=4, lead=(2,))
    wide = torch.randn(2, 7, 40, device=DEVICE)
    wide[..., :24] = hidden
    loss = ce.linear_cross_entropy(wide[..., :24], weight, target, tw, "none")
    expected = reference.linear_cross_entropy(hidden.double(), weight.double(), target, tw.double(), "none")
    assert loss.shape == (2, 7)
    assert_close("loss", loss, expected.float(), reference.linear_cross_entropy(hidden, weight, target, tw, "none"))


def test_chunks_bound_offsets_by_the_row_stride(monkeypatch):
    """With no row ignored a strided hidden reaches the kernels in place: its row stride (40), not D (24),
    bounds the dW kernel's int32 offsets into it."""
    hidden, weight, target, tw = _inputs(7, 24, 100, torch.float32, "weighted", seed=4)
    wide = torch.randn(7, 40, device=DEVICE)
    wide[:, :24] = hidden
    widths, chunk_rows = [], ce._chunk_rows
    monkeypatch.setattr(ce, "_chunk_rows", lambda n, V, D, *a: (widths.append(D), chunk_rows(n, V, D, *a))[1])
    loss = ce.linear_cross_entropy(wide[:, :24], weight, target, tw, "sum")
    assert widths == [40]
    assert_close("loss", loss, reference.linear_cross_entropy(hidden.double(), weight.double(), target, tw.double(),
                                                              "sum").float(),
                 reference.linear_cross_entropy(hidden, weight, target, tw, "sum"))


def test_ignored_rows_cost_nothing(monkeypatch):
    """The logits chunks hold only the kept rows: ignored rows never reach a matmul."""
    rows_seen = []
    launch = ce._launch_rows

    def counting(z, *args):
        rows_seen.append(z.shape[0])
        return launch(z, *args)

    monkeypatch.setattr(ce, "_launch_rows", counting)
    hidden, weight, target, _ = _inputs(30, 16, 50, torch.float32, "ignored", seed=5)
    ce.linear_cross_entropy(hidden.requires_grad_(), weight, target).backward()
    assert sum(rows_seen) == int((target != -100).sum()) == 20


@pytest.mark.parametrize("V,stride", [(50, 64), (48, 48), (1, 16)])
def test_logit_rows_padded_to_16_elements(monkeypatch, V, stride):
    """Each chunk's logits are a (C, V) view of a buffer whose rows are padded to a multiple of 16
    elements (what Triton specialises on for vector loads). The padding is never read: the float64
    comparisons run V 1, 257 (and on a GPU 50257, GPT-2's vocabulary) through it."""
    layouts = []
    launch = ce._launch_rows

    def recording(z, *args):
        layouts.append((z.shape[1], z.stride()))
        return launch(z, *args)

    monkeypatch.setattr(ce, "_launch_rows", recording)
    hidden, weight, target, _ = _inputs(9, 16, V, torch.float32, "plain", seed=19)
    ce.linear_cross_entropy(hidden.requires_grad_(), weight, target).backward()
    assert layouts == [(V, (stride, 1))]


def test_no_weight_gradient_when_weight_is_frozen(monkeypatch):
    """weight without requires_grad: no dW buffer, no dW matmul; d_hidden still right."""
    def fail(*args, **kwargs):
        raise AssertionError("dW was computed for a frozen weight")

    monkeypatch.setattr(ce, "_accumulate_dw", fail)
    hidden, weight, target, _ = _inputs(9, 16, 33, torch.float32, "plain", seed=6)
    h = hidden.detach().requires_grad_()
    ce.linear_cross_entropy(h, weight, target, reduction="sum").backward()
    h64 = hidden.double().requires_grad_()
    reference.linear_cross_entropy(h64, weight.double(), target, reduction="sum").backward()
    assert_close("d_hidden", h.grad, h64.grad.float(), h64.grad.float(), reduced_over=33)


def test_forward_only_writes_no_gradients(monkeypatch):
    """Under no_grad (and for inputs that need none) the row kernel only computes statistics."""
    flags = []
    launch = ce._launch_rows

    def recording(z, target, row_scale, lse, loss, compute_lse, write_grad):
        flags.append(write_grad)
        return launch(z, target, row_scale, lse, loss, compute_lse, write_grad)

    monkeypatch.setattr(ce, "_launch_rows", recording)
    hidden, weight, target, _ = _inputs(9, 16, 33, torch.float32, "plain", seed=7)
    with torch.no_grad():
        ce.linear_cross_entropy(hidden.requires_grad_(), weight, target)
    ce.linear_cross_entropy(hidden.detach(), weight, target)
    assert flags == [False, False]


def test_ignore_index_inside_the_class_range():
    """ignore_index may be a real class id: rows with that target are skipped, others count."""
    hidden, weight, target, _ = _inputs(12, 16, 20, torch.float32, "plain", seed=8)
    target[:4] = 3
    loss = ce.linear_cross_entropy(hidden, weight, target, ignore_index=3)
    kept = target != 3
    expected = torch.nn.functional.cross_entropy(hidden[kept].double() @ weight.double().t(), target[kept])
    assert_close("loss", loss, expected.float(), expected.float())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_ignore_index_and_token_weights_match_torch(monkeypatch, entry, reduction):
    """Every path (the kernel, and lwt.functional's reference path, which the CPU trainer runs) against
    torch's own F.cross_entropy: ignore_index a real class id (rows with that target drop out, all others
    count), each kept row's loss times its token weight, mean = Σ over kept rows / number of kept rows."""
    hidden, weight, target, tw = _inputs(12, 16, 20, torch.float32, "weighted", seed=8)
    target[:4] = 3
    target[7] = 0
    if entry == "kernel":
        fn = ce.linear_cross_entropy
    else:
        monkeypatch.setenv("LWT_BACKEND", entry.split("-")[1])
        fn = lwtF.linear_cross_entropy
    loss = fn(hidden, weight, target, tw, reduction, ignore_index=3)
    rows = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), target, ignore_index=3,
                                             reduction="none") * tw.double()
    kept = target != 3
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_float64_token_weights_with_fp32_hidden():
    """token_weight is "an optional float tensor" of any float dtype (the checks take float64 too, beside
    16/32-bit hidden states): the kernel accepts it, matches the reference, and returns its gradient in
    float64."""
    hidden, weight, target, tw = _inputs(9, 16, 12, torch.float32, "weighted-ignored", seed=13)
    tw = tw.double().requires_grad_()
    loss = ce.linear_cross_entropy(hidden, weight, target, tw, "sum")
    (dtw,) = torch.autograd.grad(loss, tw)
    tw64 = tw.detach().requires_grad_()
    expected = reference.linear_cross_entropy(hidden.double(), weight.double(), target, tw64, "sum")
    (dtw64,) = torch.autograd.grad(expected, tw64)
    assert dtw.dtype == torch.float64
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dtw, dtw64, rtol=1e-5, atol=1e-5)


def test_second_backward_raises():
    """mean/sum compute the gradients in the forward; a second backward over the graph is refused."""
    hidden, weight, target, _ = _inputs(5, 16, 9, torch.float32, "plain", seed=9)
    loss = ce.linear_cross_entropy(hidden.requires_grad_(), weight, target)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_target_refilled_before_backward():
    """fp32 mean/sum without a token_weight gradient: the gradients were computed in the forward, so the
    backward never reads target, and a loader may refill its buffer before backward() (as on the reference
    path): the gradients are those of the forward's targets. Where the backward does read it (a token_weight
    gradient), the refill is torch's version-counter error, not a gradient of other targets."""
    hidden, weight, target, token_weight = _inputs(6, 16, 9, torch.float32, "weighted", seed=3)
    _, want = _run(ce.linear_cross_entropy, hidden, weight, target, None, "mean", torch.tensor(1.0))
    buffer = target.clone()
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = ce.linear_cross_entropy(h, w, buffer)
    buffer.copy_(torch.flip(target, (0,)))
    loss.backward()
    assert torch.equal(h.grad, want[0]) and torch.equal(w.grad, want[1]), "the refilled targets' gradients"
    buffer = target.clone()
    loss = ce.linear_cross_entropy(h, w, buffer, token_weight.detach().requires_grad_())
    buffer.copy_(torch.flip(target, (0,)))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_functional_dispatch_runs_the_kernel(monkeypatch):
    """LWT_BACKEND=triton routes lwt.functional to the kernel (the interpreter on CPU)."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    calls = []
    chunks = ce.ce_chunks
    monkeypatch.setattr(ce, "ce_chunks", lambda *a, **k: calls.append(1) or chunks(*a, **k))
    hidden, weight, target, tw = _inputs(6, 16, 12, torch.float32, "weighted", seed=10)
    loss = lwtF.linear_cross_entropy(hidden, weight, target, tw, reduction="sum")
    assert calls
    assert_close("loss", loss, reference.linear_cross_entropy(hidden.double(), weight.double(), target, tw.double(),
                                                              "sum"),
                 reference.linear_cross_entropy(hidden, weight, target, tw, "sum"), reduced_over=12)


def _valid():
    hidden, weight, target, tw = _inputs(6, 8, 10, torch.float32, "weighted", seed=11)
    return dict(hidden=hidden, weight=weight, target=target, token_weight=tw)


BAD = [
    pytest.param(dict(weight=torch.randn(10, 7)), r"weight: expected shape \(V, 8\)", id="weight-D"),
    pytest.param(dict(weight=torch.randn(0, 8)), r"weight: expected shape \(V, 8\) with V >= 1", id="weight-V0"),
    pytest.param(dict(weight=torch.randn(10, 8, dtype=torch.float16)), "weight: expected the dtype of hidden",
                 id="weight-dtype"),
    pytest.param(dict(hidden=torch.randint(0, 3, (6, 8))), "hidden: expected dtype", id="hidden-int"),
    pytest.param(dict(target=torch.zeros(6)), "target: expected an int64 or int32 tensor", id="target-float"),
    pytest.param(dict(target=torch.zeros(5, dtype=torch.long)), r"target: expected shape \(6,\)", id="target-shape"),
    pytest.param(dict(target=torch.tensor([0, 1, 10, 2, 3, 4])), r"target: expected class indices in \[0, 10\)",
                 id="target-too-large"),
    pytest.param(dict(target=torch.tensor([0, 1, -1, 2, 3, 4])), r"got -1 at flat position 2", id="target-negative"),
    pytest.param(dict(token_weight=torch.ones(5)), r"token_weight: expected the shape of target", id="tw-shape"),
    pytest.param(dict(token_weight=torch.ones(6, dtype=torch.long)), "token_weight: expected dtype", id="tw-int"),
    pytest.param(dict(reduction="avg"), "reduction: expected one of", id="reduction"),
    pytest.param(dict(ignore_index=1.5), "ignore_index: expected an int", id="ignore-index"),
    # an int32 target compared with 2**32 would wrap it to 0: class 0 silently ignored
    pytest.param(dict(target=torch.tensor([0, 1, 0, 2, 3, 4], dtype=torch.int32), ignore_index=2**32),
                 r"ignore_index: expected an int that a torch.int32 target can hold", id="ignore-index-wraps"),
    pytest.param(dict(ignore_index=-2**70), r"ignore_index: expected an int that a torch.int64 target can hold",
                 id="ignore-index-int64"),
    pytest.param(dict(target=torch.tensor([0, 1, 2, 2, 3, 4]).to_sparse()), r"target: expected a dense",
                 id="target-sparse"),
    pytest.param(dict(accum_dtype=torch.float16), "accum_dtype: expected torch.float32 or None", id="accum-dtype"),
    # meta: a second device on every machine (the CPU suite included)
    pytest.param(dict(weight=torch.randn(10, 8, device="meta")), "weight: expected a tensor on", id="weight-device"),
    pytest.param(dict(target=torch.zeros(6, dtype=torch.long, device="meta")), "target: expected a tensor on",
                 id="target-device"),
    pytest.param(dict(token_weight=torch.ones(6, device="meta")), "token_weight: expected a tensor on",
                 id="tw-device"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("change,match", BAD)
def test_bad_input_raises_before_any_launch(monkeypatch, entry, change, match):
    args = {**_valid(), **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and not v.is_meta else v)
                           for k, v in change.items()}}
    blocked = [(ce, "ce_chunks"), (reference, "linear_cross_entropy")]
    assert_refused_before_launch(monkeypatch, entry, ce.linear_cross_entropy, lwtF.linear_cross_entropy, blocked,
                                 match, **args)


def test_device_mismatch_raises():
    if not CUDA:
        pytest.skip("needs a second device")
    args = _valid()
    with pytest.raises(ValueError, match="weight: expected a tensor on"):
        ce.linear_cross_entropy(args["hidden"], args["weight"].cpu(), args["target"])


def test_ignored_rows_get_zero_token_weight_gradient_whatever_their_upstream_gradient():
    """reduction "none": an ignored row's loss is 0 and does not depend on its token weight, so its
    gradient is 0 even where the upstream gradient is inf (a sqrt or log applied to the losses), as in
    the reference; the kept rows are unaffected."""
    hidden, weight, target, tw = _inputs(9, 16, 33, torch.float32, "weighted-ignored", seed=11)
    cotangent = torch.rand(9, generator=torch.Generator().manual_seed(12)).to(DEVICE) + 0.5
    cotangent[target == -100] = float("inf")
    _, gs = _run(ce.linear_cross_entropy, hidden, weight, target, tw, "none", cotangent)
    _, gs64 = _run(reference.linear_cross_entropy, hidden.double(), weight.double(), target, tw.double(), "none",
                   cotangent.double())
    d_tw, d_tw64 = gs[2], gs64[2]
    assert (d_tw[target == -100] == 0).all()
    assert_close("d_token_weight", d_tw, d_tw64, d_tw64.float(), reduced_over=33)


def test_scale_kernel_multiplies_in_fp32():
    """The in-place scaling of 16-bit gradients (bf16 gradients computed in the forward; bf16 runs only on
    a GPU otherwise): every element, a ragged last block included, is x · g in fp32 rounded once, so a
    GradScaler's 2^16 reaches fp16 values that g rounded to fp16 (inf) would destroy."""
    t = (torch.randn(1025, generator=torch.Generator().manual_seed(13)) * 1e-3).to(DEVICE, torch.float16)
    # 0-dim, as the backward passes it: there torch's own t.mul_(g) would round g to fp16
    g = torch.tensor(2.0**16, device=DEVICE)
    want = (t.float() * g).half()
    ce._scale_(t, g)
    assert torch.equal(t, want)


@pytest.mark.parametrize("entry", ["kernel", "reference"])
def test_non_finite_values_in_ignored_rows_reach_nothing(entry):
    """Ignored rows are dropped: NaN in their hidden state (padding) or an inf token weight reaches neither
    the loss nor any gradient, on the kernel and on the reference path alike."""
    hidden, weight, target, tw = _inputs(9, 16, 33, torch.float32, "weighted-ignored", seed=14)
    ignored = target == -100
    hidden[ignored] = float("nan")
    tw[ignored] = float("inf")
    fn = ce.linear_cross_entropy if entry == "kernel" else reference.linear_cross_entropy
    loss, gs = _run(fn, hidden, weight, target, tw, "sum", torch.tensor(1.0, device=DEVICE))
    kept = ~ignored
    loss64, gs64 = _run(reference.linear_cross_entropy, hidden[kept].double(), weight.double(), target[kept],
                        tw[kept].double(), "sum", torch.tensor(1.0, dtype=torch.float64, device=DEVICE))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gs)
    assert (gs[0][ignored] == 0).all() and (gs[2][ignored] == 0).all()
    assert_close("loss", loss, loss64, loss64.float(), reduced_over=33)
    assert_close("d_weight", gs[1], gs64[1], gs64[1].float(), reduced_over=6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf · 0, as meant
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_rows_get_zero_hidden_gradient_whatever_the_upstream_gradient(reduction, dtype):
    """mean/sum: an ignored row's dH is 0 even for an inf or NaN upstream gradient, as in the reference
    (whose where passes it none); fp32/bf16 scale the forward's gradients, fp16 computes them later."""
    hidden, weight, target, _ = _inputs(9, 16, 33, dtype, "weighted-ignored", seed=15)
    ignored = target == -100
    for g in (float("inf"), float("nan")):
        _, gs = _run(ce.linear_cross_entropy, hidden, weight, target, None, reduction, torch.tensor(g, device=DEVICE))
        assert (gs[0][ignored] == 0).all()


def test_fp16_grad_scale_never_shrinks_a_row_below_eager(monkeypatch):
    """masked_diffusion_loss's form in fp16 (reduction "sum" with token weights 1/t, then / (B·S)) with one
    sequence drawn at a small t: its rows have c_n = 1/(t·B·S) > 1 while every other row has c_n ~ 1/(B·S).
    α = max|c_n| rounded up to a power of two (32 here) would write those rows' dZ as c_n · p / 32, 32 times
    deeper into fp16's subnormals than eager's c_n · p: their dH missed float64 by 5.8 times eager's error
    (0.55% of a row's largest entry; eager 0.095%). α above 1 only where dZ would overflow fp16: no row's
    dZ is ever smaller than eager's."""
    from lwt.diffusion import masked_diffusion_loss

    monkeypatch.setenv("LWT_BACKEND", "triton")
    B, S, D, V = 4, 16, 32, 4096
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, D, generator=gen).to(DEVICE, torch.float16)
    head = (torch.randn(V, D, generator=gen) * 2 * D ** -0.5).to(DEVICE, torch.float16)
    tokens = torch.randint(0, V, (B, S), generator=gen).to(DEVICE)
    mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    t = torch.tensor([5e-4, 1.0, 1.0, 1.0], device=DEVICE)

    def dh(h, w, backend):
        monkeypatch.setenv("LWT_BACKEND", backend)
        h = h.detach().requires_grad_()
        (g,) = torch.autograd.grad(masked_diffusion_loss(h, w, tokens, mask, t), [h])
        return g[1:].double()  # the sequences drawn at t = 1

    want = dh(hidden.double(), head.double(), "reference")
    err = lambda g: ((g - want).abs().amax(-1) / want.abs().amax(-1)).max().item()  # noqa: E731
    got, eager = err(dh(hidden, head, "triton")), err(dh(hidden, head, "reference"))
    assert got <= 1.5 * eager, (got, eager)


@pytest.mark.parametrize("scales,alpha", [
    ([0.3, -0.1], 0.5),  # every |c_n| below 1: the largest rounded up to a power of two, so |dZ / α| <= 1
    ([2.0**-7], 2.0**-7),  # a power of two already: itself
    ([1.0, 0.2], 1.0), ([3.0], 1.0), ([2.0**15], 1.0),  # from 1 up: eager's dZ (α = 1) ...
    ([3 * 2.0**15], 4.0),  # ... until it would overflow fp16: just enough that |dZ / α| <= 2^15
    ([], 1.0), ([0.0], 1.0), ([float("inf"), 0.5], 1.0), ([float("nan")], 1.0),
])
def test_fp16_grad_scale(scales, alpha):
    """α of the fp16 backward (kernels/cross_entropy.py, Precision) as documented: below 1, max|c_n| rounded
    up to a power of two; 1 from 1 up (no row written smaller or larger than eager's dZ); above 2^15 just
    what keeps dZ / α finite; 1 without a finite, nonzero c_n."""
    assert ce._fp16_grad_scale(torch.tensor(scales, dtype=torch.float32)) == alpha


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("accum_dtype", [torch.float32, None], ids=["fp32-accum", "weight-dtype-accum"])
def test_fp16_hidden_layouts_over_many_chunks(monkeypatch, accum_dtype, layout):
    """fp16 hidden with every row kept (so it reaches the kernels as the caller's view), in 5-row chunks
    and a shorter last one: 'sliced', a slice of a wider buffer (row stride 40 > D 24), which the fp32 dW
    sum's Triton GEMM reads through its row stride; 'transposed', a non-unit stride along D, copied to
    rows first. accum_dtype=None sums the chunks in the weight's dtype: no fp32 buffer."""
    V, D, N = 100, 24, 23
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 5 * 112 * 2)  # 5 rows of V 100, padded to 112
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)
    sums, accumulate = [], ce._accumulate_dw
    monkeypatch.setattr(ce, "_accumulate_dw", lambda dw, *a, **k: (sums.append(dw.dtype), accumulate(dw, *a, **k)))
    hidden, weight, target, _ = _inputs(N, D, V, torch.float16, "plain", seed=8)
    if layout == "sliced":
        h = torch.zeros(N, 40, dtype=torch.float16, device=DEVICE)
        h[:, 8:8 + D] = hidden
        h = h[:, 8:8 + D]
    else:
        h = hidden.t().contiguous().t()
    assert h.stride() == ((40, 1) if layout == "sliced" else (1, N))
    g = torch.tensor(0.75, device=DEVICE)
    _, gs = _run(ce.linear_cross_entropy, h, weight, target, None, "sum", g, accum_dtype=accum_dtype)
    _, gs64 = _run(reference.linear_cross_entropy, hidden.double(), weight.double(), target, None, "sum", g.double())
    _, gs_ref = _run(reference.linear_cross_entropy, hidden, weight, target, None, "sum", g)
    for name, got, g64, g_ref, k in zip(["d_hidden", "d_weight"], gs, gs64, gs_ref, [V, N]):
        assert got.dtype == torch.float16
        assert_close(name, got, g64, g_ref, reduced_over=k)
    assert len(sums) == 5 and set(sums) == {torch.float32 if accum_dtype else torch.float16}


def test_reference_path_runs_under_vmap_fake_tensors_and_meta(monkeypatch):
    """The reference path (the CPU default) under torch.func.vmap (per-sample gradients), FakeTensorMode and
    on meta: the up-front range check of the targets has no values to read there (vmap's BatchedTensor has
    no storage), so it is left to gather's, as under torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setenv("LWT_BACKEND", "reference")
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 6, 8, generator=g), torch.randn(10, 8, generator=g)
    t = torch.randint(0, 10, (4, 6), generator=g)
    t[1, 2] = -100
    loss = lambda w_, h_, t_: lwtF.linear_cross_entropy(h_, w_, t_)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, h, t)
    for i in range(4):
        torch.testing.assert_close(per_sample[i], torch.func.grad(loss)(w, h[i], t[i]))
    assert lwtF.linear_cross_entropy(h.to("meta"), w.to("meta"), t.to("meta")).is_meta
    with FakeTensorMode():
        hf = torch.randn(6, 8, requires_grad=True)
        lwtF.linear_cross_entropy(hf, torch.randn(10, 8), torch.randint(0, 10, (6,))).backward()
        assert hf.grad.shape == (6, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_confident_rows_loss_keeps_its_relative_precision(dtype):
    """Logits (a, a − gap), target the top one: the loss is log(1 + e^−gap), 2.3e-6 at (30, 17). Computed
    as lse − z_t with lse rounded to fp32 first it is ulps of 30 off (17% there, 36% at (5000, 4991.7));
    F.cross_entropy (log_softmax: z − max − log Σ) keeps it to what fp32's log Σ = log(1 + e^−gap) allows
    (0.2% at (30, 17)), and so must the kernel (the same logits in fp16, where z is exact, too)."""
    for a, gap in [(30.0, 13.0), (300.0, 10.0), (5000.0, 8.25)]:
        if dtype == torch.float16 and a > 2000:
            continue  # 5000 - 8.25 is not an fp16 number
        hidden = torch.tensor([[a, a - gap]], dtype=dtype, device=DEVICE)
        weight = torch.eye(2, dtype=dtype, device=DEVICE)
        target = torch.tensor([0], device=DEVICE)
        loss = ce.linear_cross_entropy(hidden, weight, target, reduction="none")
        exact = math.log1p(math.exp(-float(hidden[0, 0] - hidden[0, 1])))
        assert abs(loss.item() - exact) <= 1e-2 * exact, (a, gap, loss.item(), exact)
