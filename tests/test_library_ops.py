"""The kernels' launchers as torch.library custom ops (lwt::*), and the Triton path under torch.compile.

Each launcher is registered as a custom op with a fake (shape) implementation and called through it while
torch.compile traces (kernels/_common.Launcher). torch.library.opcheck runs each op on real inputs and
checks that the fake implementation gives the same shapes, dtypes and strides, that the schema matches
what the op does (no input written, no output aliasing an input) and that AOTAutograd can trace it with
static and dynamic shapes. The compile tests then compile lwt's ops and a DecoderBlock with
fullgraph=True on the Triton path (the interpreter on CPU, LWT_BACKEND=triton) and compare with eager
mode and with the float64 reference. CPU tests use the "aot_eager" backend (see tests/test_compile.py),
but for one that checks what Inductor does with the cross entropy's saved gradients.
"""
import copy
import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import lwt.functional as lwtF
from kernels import attention as attn
from kernels import cross_entropy as ce
from kernels import mla
from kernels import rmsnorm
from kernels import swiglu
from kernels._common import Launcher
from kernels.reference import quantize_rows_fp8
from tests.helpers import compare, grads, make_block, output_and_grads

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """The Triton path on every device, each test compiling from scratch."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _rms_norm_cases():
    x, w, r = randn(5, 24), randn(24, seed=1), randn(5, 24, seed=2)
    yield "rms_norm_fwd", rmsnorm.rms_norm_fwd, (x, w, 1e-6, None)
    yield "rms_norm_fwd-residual", rmsnorm.rms_norm_fwd, (x, w, 1e-6, r)
    _, s, rstd = rmsnorm.rms_norm_fwd(x, w, 1e-6, r)
    dy = randn(5, 24, seed=3)
    yield "rms_norm_bwd", rmsnorm.rms_norm_bwd, (dy, s, w, rstd, None, True)
    yield "rms_norm_bwd-ds_out-no-dw", rmsnorm.rms_norm_bwd, (dy, s, w, rstd, randn(5, 24, seed=4), False)
    yield "rms_norm_fwd-no-weight", rmsnorm.rms_norm_fwd, (x, None, 1e-6, r)
    yield "rms_norm_bwd-no-weight", rmsnorm.rms_norm_bwd, (dy, s, None, rstd, None, True)
    yield "rms_norm_bwd-separate-dres", rmsnorm.rms_norm_bwd, (dy, s, w, rstd, randn(5, 24, seed=4), True, True)


def _attention_cases():
    q, k, v = randn(1, 9, 4, 16), randn(1, 9, 2, 16, seed=1), randn(1, 9, 2, 16, seed=2)
    yield "attention_fwd", attn.launch_fwd, (q, k, None, v, True, 0.25, 0)
    o, lse, _ = attn.launch_fwd(q, k, None, v, True, 0.25, 0)
    do = randn(1, 9, 4, 16, seed=3)
    yield "attention_bwd", attn.attention_bwd, (do, q, k, v, o, lse, True, 0.25, True, True)
    yield "attention_bwd-dkdv-only", attn.attention_bwd, (do, q, k, v, o, lse, False, 0.25, False, True)
    # fp16: the forward keeps O's rounding residual, the backward reads it for δ
    qh, kh, vh, doh = (t.half() for t in (q, k, v, do))
    yield "attention_fwd-fp16-residual", attn.launch_fwd, (qh, kh, None, vh, False, 0.25, 0, True)
    o, lse, o_res = attn.launch_fwd(qh, kh, None, vh, False, 0.25, 0, True)
    yield "attention_bwd-fp16-residual", attn.attention_bwd, (doh, qh, kh, vh, o, lse, False, 0.25, True, True, o_res)
    # MLA: a shared rope key of 8, V head dim 12 != QK head dim 16 + 8
    q, kn, kr, v = randn(1, 9, 2, 24, seed=4), randn(1, 9, 2, 16, seed=5), randn(1, 9, 8, seed=6), randn(1, 9, 2, 12)
    yield "attention_fwd-mla", attn.launch_fwd, (q, kn, kr, v, False, 0.2, 8)
    o, lse, _ = attn.launch_fwd(q, kn, kr, v, False, 0.2, 8)
    do = randn(1, 9, 2, 12, seed=7)
    yield "mla_bwd", mla.mla_bwd, (do, q, kn, kr, v, o, lse, False, 0.2, True, True)
    yield "mla_bwd-dq-only", mla.mla_bwd, (do, q, kn, kr, v, o, lse, True, 0.2, True, False)
    qh, knh, krh, vh, doh = (t.half() for t in (q, kn, kr, v, do))
    yield "attention_fwd-mla-fp16-residual", attn.launch_fwd, (qh, knh, krh, vh, True, 0.2, 8, True)
    o, lse, o_res = attn.launch_fwd(qh, knh, krh, vh, True, 0.2, 8, True)
    yield "mla_bwd-fp16-residual", mla.mla_bwd, (doh, qh, knh, krh, vh, o, lse, True, 0.2, True, True, o_res)


def _swiglu_cases():
    x, wg, wu, wd = randn(7, 16), randn(24, 16, seed=1) * 0.25, randn(24, 16, seed=2) * 0.25, randn(16, 24, seed=3)
    yield "frozen_swiglu_fwd", swiglu.swiglu_fwd, (x, wg, wu, wd, False)
    yield "frozen_swiglu_fwd-save", swiglu.swiglu_fwd, (x, wg, wu, wd, True)
    _, g, u = swiglu.swiglu_fwd(x, wg, wu, wd, True)
    dy = randn(7, 16, seed=4)
    yield "frozen_swiglu_bwd-recompute", swiglu.swiglu_bwd, (dy, x, wg, wu, wd, None, None, True, True)
    yield "frozen_swiglu_bwd-saved-dw-only", swiglu.swiglu_bwd, (dy, None, wg, wu, wd, g, u, False, True)
    (wg8, sg), (wu8, su) = quantize_rows_fp8(wg), quantize_rows_fp8(wu)
    yield "frozen_swiglu_fwd-fp8", swiglu.swiglu_fwd, (x, wg8, wu8, wd, True, sg, su)
    yield "frozen_swiglu_bwd-fp8-recompute", swiglu.swiglu_bwd, (dy, x, wg8, wu8, wd, None, None, True, True, sg, su)


def _cross_entropy_cases():
    hidden, weight = randn(9, 16), randn(33, 16, seed=1) * 0.5
    target = torch.randint(0, 33, (9,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    target[::3] = -100
    tw = randn(9, seed=3).abs() + 0.5
    for reduction in ("mean", "sum", "none"):
        yield f"linear_cross_entropy_fwd-{reduction}", ce.ce_forward, (hidden, weight, target, tw, reduction, -100,
                                                                       torch.float32, True, True, True)
    h16, w16 = hidden.half(), weight.half()
    yield "linear_cross_entropy_fwd-fp16-deferred", ce.ce_forward, (h16, w16, target, None, "mean", -100, None,
                                                                    True, True, False)
    lse = ce.ce_forward(hidden, weight, target, tw, "none", -100, torch.float32, True, True, False)[4]
    yield "linear_cross_entropy_bwd-none", ce.ce_backward, (hidden, weight, target, tw, lse, randn(9, seed=4), "none",
                                                            -100, torch.float32, True, True)


_GROUPS = {"rms_norm": _rms_norm_cases, "attention": _attention_cases, "swiglu": _swiglu_cases,
           "cross_entropy": _cross_entropy_cases}


@functools.cache
def _group(group: str) -> dict:
    """{name: (launcher, args)} of one group: built on first use, in a test, not while pytest collects
    (building them runs kernels: on a GPU each of the test workers would compile them all before its first
    test, and a failure would be a collection error taking the whole file down)."""
    return {name: (launcher, args) for name, launcher, args in _GROUPS[group]()}


# The names each group's generator above yields, in order (test_every_launcher_is_checked holds them equal).
CASES = {
    "rms_norm": ["rms_norm_fwd", "rms_norm_fwd-residual", "rms_norm_bwd", "rms_norm_bwd-ds_out-no-dw",
                 "rms_norm_fwd-no-weight", "rms_norm_bwd-no-weight", "rms_norm_bwd-separate-dres"],
    "attention": ["attention_fwd", "attention_bwd", "attention_bwd-dkdv-only", "attention_fwd-fp16-residual",
                  "attention_bwd-fp16-residual", "attention_fwd-mla", "mla_bwd", "mla_bwd-dq-only",
                  "attention_fwd-mla-fp16-residual", "mla_bwd-fp16-residual"],
    "swiglu": ["frozen_swiglu_fwd", "frozen_swiglu_fwd-save", "frozen_swiglu_bwd-recompute",
               "frozen_swiglu_bwd-saved-dw-only", "frozen_swiglu_fwd-fp8", "frozen_swiglu_bwd-fp8-recompute"],
    "cross_entropy": ["linear_cross_entropy_fwd-mean", "linear_cross_entropy_fwd-sum", "linear_cross_entropy_fwd-none",
                      "linear_cross_entropy_fwd-fp16-deferred", "linear_cross_entropy_bwd-none"],
}


def test_every_launcher_is_checked():
    """Each lwt:: op that kernels/ registers has opcheck cases below, each case named in CASES."""
    assert {group: list(_group(group)) for group in _GROUPS} == CASES
    checked = {launcher.op._name for group in _GROUPS for launcher, _ in _group(group).values()}
    assert checked == set(Launcher.registry), f"no opcheck case: {sorted(set(Launcher.registry) - checked)}"


@pytest.mark.parametrize("group,case", [pytest.param(g, c, id=c) for g, names in CASES.items() for c in names])
def test_custom_op_passes_opcheck(group, case):
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides) and AOTAutograd
    tracing with static and dynamic shapes, each against a real run of the op. opcheck's schema test
    compares inputs with arithmetic that CPU FP8 tensors lack; with FP8 inputs the inputs are compared
    here instead, byte for byte, after a run (an op may not write its inputs)."""
    launcher, args = _group(group)[case]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    utils = ["test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"]
    if any(t.dtype == torch.float8_e4m3fn for t in tensors):
        before = [t.clone() for t in tensors]
        launcher.op(*args)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(tensors, before))
    else:
        utils.insert(0, "test_schema")
    torch.library.opcheck(launcher.op, args, test_utils=utils)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """In eager mode a Launcher runs its function directly; only traced calls go through the op."""
    launcher = rmsnorm.rms_norm_fwd

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op was called in eager mode")

    monkeypatch.setattr(launcher, "op", refuse)
    y, _, _ = launcher(randn(3, 8), randn(8, seed=1), 1e-6, None)
    assert y.shape == (3, 8)
    y, _, _ = launcher(x=randn(3, 8), weight=randn(8, seed=1), eps=1e-6, residual=None)  # all by keyword
    assert y.shape == (3, 8)


@pytest.mark.parametrize("current", [0, 1])
def test_eager_calls_launch_on_the_inputs_gpu(monkeypatch, current):
    """Triton launches on the current CUDA device: a Launcher makes its inputs' GPU current for the
    call when another one is (here GPU 1's inputs with `current` the current device; no GPU is needed,
    the device calls are stubbed)."""
    launcher = rmsnorm.rms_norm_fwd
    seen, guards = [], []

    class OnGpu1:
        def get_device(self):
            return 1

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            guards.append(self.index)

        def __exit__(self, *exc):
            guards.append("exit")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(launcher, "fn", lambda *args: seen.append(list(guards)) or "y")
    assert launcher(OnGpu1(), None, 1e-6, None) == "y"
    assert seen == ([[1]] if current == 0 else [[]])
    assert guards == ([1, "exit"] if current == 0 else [])


def test_decoder_block_triton_path_compiles_to_one_graph(monkeypatch):
    """A GQA DecoderBlock on the Triton path (RMSNorm with the residual add, attention, the frozen SwiGLU)
    in one graph: output, dx and every parameter gradient against float64, with the eager Triton path as
    the yardstick. (MLA: the dynamic-length test below.)"""
    block = make_block("gqa", device=DEVICE)
    truth = copy.deepcopy(block).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    x, dy = randn(2, 16, 64, seed=1), randn(2, 16, 64, seed=2)
    got = output_and_grads(compiled, x, dy)
    yardstick = output_and_grads(block, x, dy)
    assert counter.frame_count == 1
    monkeypatch.setenv("LWT_BACKEND", "reference")  # the kernels take no float64
    compare(got, output_and_grads(truth, x.double(), dy.double()), yardstick, 2 * 16)


@pytest.mark.parametrize("op", ["attention", "mla_attention"])
def test_compiled_16_bit_attention_keeps_the_rounding_residual(monkeypatch, op):
    """In fp16 the compiled graph's forward stores O's rounding residual and hands it to the backward's δ
    (kernels/attention.py, Precision), as eager mode does: gradients bit-identical to eager. Values and
    keys share a large common part, where δ read from the rounded O alone moves dQ (tests/test_attention.py,
    test_delta_reads_o_before_its_rounding): eager without the residual differs, so a graph that dropped
    it would fail here."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 2, 48 if op == "mla_attention" else 32, generator=gen)
    k = 1.0 + 0.3 * torch.randn(1, 40, 1 if op == "attention" else 2, 32, generator=gen)
    v = 1.5 + 0.2 * torch.randn(1, 40, 1 if op == "attention" else 2, 24 if op == "mla_attention" else 32,
                                generator=gen)
    inputs = [k, v] if op == "attention" else [k, 1.0 + 0.3 * torch.randn(1, 40, 16, generator=gen), v]
    inputs = [t.to(DEVICE, torch.float16) for t in [q, *inputs]]
    do = randn(1, 40, 2, v.shape[-1], dtype=torch.float16, seed=5)
    fn = getattr(lwtF, op)
    counter = CompileCounterWithBackend("aot_eager")
    _, got = grads(torch.compile(fn, fullgraph=True, backend=counter), inputs, [do])
    _, want = grads(fn, inputs, [do])
    assert counter.frame_count == 1
    for name, a, b in zip(["dq", "dk", "dv"] if op == "attention" else ["dq", "dk_nope", "dk_rope", "dv"], got, want):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"
    monkeypatch.setattr(attn, "_keeps_residual", lambda residual, dtype: False)
    assert not torch.equal(grads(fn, inputs, [do])[1][0], want[0]), "the residual changes nothing: cannot fail"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_compiles_to_one_graph(reduction, dtype):
    """The loss in one graph, both schedules (fp32 mean: gradients computed in the forward, scaled in the
    backward, here out of place; "none" and fp16: computed in the backward), with ignored rows and token
    weights: bit-identical to eager mode, which runs the same kernels."""
    hidden, weight = randn(9, 16, dtype=dtype), randn(33, 16, dtype=dtype, seed=1) * 0.5
    target = torch.randint(0, 33, (9,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    target[::3] = -100
    tw = randn(9, seed=3).abs() + 0.5
    cotangent = randn(9, seed=4) if reduction == "none" else randn(1, seed=4).reshape(())

    def loss_and_grads(fn):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight, tw)]
        loss = fn(leaves[0], leaves[1], target, leaves[2])
        return [loss.detach(), *torch.autograd.grad(loss, leaves, cotangent)]

    def loss_fn(h, w, t, token_weight):
        return lwtF.linear_cross_entropy(h, w, t, token_weight, reduction)

    counter = CompileCounterWithBackend("aot_eager")
    got = loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend=counter))
    want = loss_and_grads(loss_fn)
    assert counter.frame_count == 1
    for name, a, b in zip(["loss", "d_hidden", "d_weight", "d_token_weight"], got, want):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"


def test_linear_cross_entropy_inductor_scales_the_forwards_gradients_in_place(monkeypatch):
    """Under Inductor (the default backend) the traced backward's out-of-place scaling of the gradients
    the forward computed writes into those very buffers: AOTAutograd donates the saved dh and dw to the
    backward graph (torch._functorch.config.donated_buffer) and Inductor reuses them, so at V 128000 x D
    4096 the 1 GiB dW is not held twice. The gradients returned are the forward's buffers, and equal to
    eager mode's. Inductor's caches are off: its FX graph cache does not key on which buffers are donated,
    so a warm cache could replay an in-place backward compiled by another run. (Inductor's first C++
    compilation here: about 12 s on the 2-core CPU.)"""
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    made = {}
    real_chunks = ce.ce_chunks

    def spy(*args, **kwargs):
        lse, loss_rows, dh, dw = real_chunks(*args, **kwargs)
        made.update(dh=dh.data_ptr(), dw=dw.data_ptr())
        return lse, loss_rows, dh, dw

    monkeypatch.setattr(ce, "ce_chunks", spy)
    hidden, weight = randn(9, 16), randn(33, 16, seed=1) * 0.5
    target = torch.randint(0, 33, (9,), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def loss_and_grads(fn):
        leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
        return [*torch.autograd.grad(fn(leaves[0], leaves[1], target) * 3.0, leaves)]

    def loss_fn(h, w, t):
        return lwtF.linear_cross_entropy(h, w, t)

    got = loss_and_grads(torch.compile(loss_fn, fullgraph=True))
    assert (got[0].data_ptr(), got[1].data_ptr()) == (made["dh"], made["dw"]), "compiled: gradients copied"
    want = loss_and_grads(loss_fn)
    for name, a, b in zip(["d_hidden", "d_weight"], got, want):
        assert torch.equal(a, b), f"{name}: compiled differs from eager"


def test_linear_cross_entropy_compiled_still_checks_targets():
    """A target outside [0, V) is a ValueError from inside the compiled graph, as in eager mode."""
    target = torch.tensor([1, 40, 2]).to(DEVICE)
    loss_fn = torch.compile(lambda h, w, t: lwtF.linear_cross_entropy(h, w, t), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 33\)"):
        loss_fn(randn(3, 16), randn(33, 16, seed=1), target)


@pytest.mark.parametrize("case", ["attention(q, kv, kv)", "attention(q, q, q)", "mla_attention(q, kv, k_rope, kv)",
                                  "frozen_swiglu(x, wg8, wu8, wd, scale, scale)"])
def test_one_tensor_passed_twice_compiles_to_one_graph(case):
    """One tensor as two inputs (K and V from one projection; self-similarity q = k = v; one FP8 scale for
    both frozen matrices) reaches the autograd.Function as two objects (Dynamo refuses an apply with a
    duplicate tensor input): one graph, and the same output and summed gradients as eager mode."""
    q, kv, qm, kr = randn(1, 9, 2, 16), randn(1, 9, 2, 16, seed=1), randn(1, 9, 2, 24, seed=2), randn(1, 9, 8, seed=3)
    cotangent = randn(1, 9, 2, 16, seed=4)
    (wg8, scale), (wu8, _) = quantize_rows_fp8(randn(24, 16, seed=5)), quantize_rows_fp8(randn(24, 16, seed=6))
    fn, inputs = {"attention(q, kv, kv)": (lambda a, b: lwtF.attention(a, b, b, causal=True), (q, kv)),
                  "attention(q, q, q)": (lambda a: lwtF.attention(a, a, a, causal=True), (q,)),
                  "mla_attention(q, kv, k_rope, kv)": (lambda a, b, c: lwtF.mla_attention(a, b, c, b, causal=True),
                                                       (qm, kv, kr)),
                  "frozen_swiglu(x, wg8, wu8, wd, scale, scale)": (
                      lambda x, wd: lwtF.frozen_swiglu(x, wg8, wu8, wd, True, w_gate_scale=scale, w_up_scale=scale),
                      (q, randn(16, 24, seed=7)))}[case]

    def output_and_grads_of(f):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = f(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, cotangent)]

    counter = CompileCounterWithBackend("aot_eager")
    got = output_and_grads_of(torch.compile(fn, fullgraph=True, backend=counter))
    want = output_and_grads_of(fn)
    assert counter.frame_count == 1
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{'output' if i == 0 else f'gradient {i}'}: compiled differs from eager"


def test_latent_attention_compiles_to_one_graph():
    """MLA's absorbed (inference) form, forward only, in one graph: the same result as eager mode."""
    q, c, kr = randn(1, 9, 2, 24), randn(1, 9, 16, seed=1), randn(1, 9, 8, seed=2)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda *a: lwtF.latent_attention(*a, causal=True), fullgraph=True, backend=counter)
    with torch.no_grad():
        assert torch.equal(fn(q, c, kr), lwtF.latent_attention(q, c, kr, causal=True))
    assert counter.frame_count == 1


def test_decoder_block_triton_path_compiles_for_a_dynamic_sequence_length(monkeypatch):
    """With the sequence length dynamic, one graph serves every length: the fake implementations
    propagate symbolic shapes and each call launches with the real ones. MLA (its RoPE covers GQA's)."""
    block = make_block("mla", device=DEVICE)
    truth = copy.deepcopy(block).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    for S in (8, 19):  # short: the interpreter runs every program of every kernel in Python
        x, dy = randn(2, S, 64, seed=S), randn(2, S, 64, seed=S + 1)
        got = output_and_grads(compiled, x, dy, dynamic_seq=True)
        yardstick = output_and_grads(block, x, dy)
        monkeypatch.setenv("LWT_BACKEND", "reference")
        compare(got, output_and_grads(truth, x.double(), dy.double()), yardstick, 2 * S)
        monkeypatch.setenv("LWT_BACKEND", "triton")
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"


def test_host_syncing_ops_are_kept_out_of_cuda_graphs():
    """The cross entropy ops read a count back from the GPU: tagged cudagraph_unsafe (where this torch has
    the tag), so torch.compile(mode="reduce-overhead") does not capture them in a CUDA graph."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for name, launcher in Launcher.registry.items():
        assert (tag in launcher.op._opoverload.tags) == name.startswith("linear_cross_entropy"), name


def test_decoder_block_exports_with_the_custom_ops():
    """torch.export of a block on the Triton path: the kernels appear as lwt:: ops in the exported graph,
    which computes what the module computes."""
    block = make_block("gqa", device=DEVICE)
    x = randn(2, 16, 64)
    exported = torch.export.export(block, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if str(node.target).startswith("lwt.")}
    assert ops == {"lwt.rms_norm_fwd.default", "lwt.attention_fwd.default", "lwt.frozen_swiglu_fwd.default"}, ops
    with torch.no_grad():
        assert torch.equal(exported.module()(x), block(x))
