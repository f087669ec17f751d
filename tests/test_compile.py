"""torch.compile of lwt.layers.DecoderBlock and lwt.model.LWTModel: one graph (fullgraph=True) on the CPU
reference path, forward and backward, and the same output and gradients as eager mode. (The Triton path
under torch.compile: tests/test_library_ops.py on CPU, and the CUDA test at the end here.)

The CPU tests compile with the "aot_eager" backend: Dynamo captures the whole module (fullgraph=True
fails on any graph break) and AOTAutograd traces the joint forward/backward graph, which is everything
torch.compile does before Inductor generates code. Inductor itself, whose C++ compilations take tens of
seconds on a 2-core CI machine, compiles one MLA block here (the default backend, what a user gets); the
CUDA test runs it with the kernels.
"""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import lwt.functional as lwtF
from kernels._checks import autocast_available
from lwt.diffusion import masked_diffusion_loss
from lwt.model import LWTModel
from tests.helpers import block_config, compare, make_block, output_and_grads
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no graphs or recompile counts carried over), on one thread: the
    shapes are tiny and intra-op threads only add OpenMP spin-waiting (see tests/test_model.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


# Inductor (the default backend, generating C++ for the CPU) on MLA only, to keep the suite fast: its shared
# RoPE key, latent norms and projections cover GQA's ops.
@pytest.mark.parametrize("attn_type,backend", [("gqa", "aot_eager"), ("mla", "aot_eager"), ("mla", "inductor")])
def test_decoder_block_compiles_to_one_graph_cpu(attn_type, backend):
    """fullgraph=True raises on any graph break; output, dx and every parameter gradient match eager."""
    block = make_block(attn_type)
    truth = copy.deepcopy(block).double()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    x, dy = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 16, 64, generator=gen)
    got = output_and_grads(compiled, x, dy)
    compare(got, output_and_grads(truth, x.double(), dy.double()), output_and_grads(block, x, dy), 2 * 16)
    assert counter.frame_count == 1


def test_decoder_block_compiles_for_a_dynamic_sequence_length_cpu():
    """With the sequence length dynamic (what Dynamo switches to when a second length arrives), one graph
    serves every length: the RoPE table is built inside the graph for the positions needed (no cache to
    grow). MLA only, to keep the suite fast: its RoPE (a per-head query part and one shared key) covers
    GQA's."""
    block = make_block("mla")
    truth = copy.deepcopy(block).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    for S in (16, 37):
        x, dy = torch.randn(2, S, 64, generator=gen), torch.randn(2, S, 64, generator=gen)
        got = output_and_grads(compiled, x, dy, dynamic_seq=True)
        compare(got, output_and_grads(truth, x.double(), dy.double()), output_and_grads(block, x, dy), 2 * S)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break or a recompile"


def test_decoder_block_compiles_with_dynamic_true_cpu():
    """torch.compile(dynamic=True) makes the float arguments and module attributes symbolic (eps,
    softmax_scale: SymFloat): the argument checks must still trace, in one graph, with eager's results.
    An MLA block (its norms, attention scale, RoPE and MLP); GQA's attention call is in the next test."""
    block = make_block("mla")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    for S in (8, 13):
        x, dy = torch.randn(2, S, 64, generator=gen), torch.randn(2, S, 64, generator=gen)
        got, want = output_and_grads(compiled, x, dy), output_and_grads(block, x, dy)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)
    # one compile: Dynamo may restart its analysis once (the RoPE base, a symbolic float), which calls the
    # backend twice for the same frame, but a length change must not recompile
    assert counter.frame_count <= 2


def test_float_arguments_trace_when_symbolic():
    """eps and softmax_scale passed into a function compiled with dynamic=True arrive as SymFloats."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 5, 16, generator=gen), torch.rand(16, generator=gen)
    q = torch.randn(1, 5, 4, 8, generator=gen)
    norm = torch.compile(lambda x, w, eps: lwtF.rms_norm(x, w, eps), fullgraph=True, dynamic=True, backend="aot_eager")
    attend = torch.compile(lambda q, s: lwtF.attention(q, q, q, True, s), fullgraph=True, dynamic=True,
                           backend="aot_eager")
    torch.testing.assert_close(norm(x, w, 1e-5), lwtF.rms_norm(x, w, 1e-5), rtol=0, atol=0)
    torch.testing.assert_close(attend(q, 0.3), lwtF.attention(q, q, q, True, 0.3), rtol=0, atol=0)


def test_compiled_block_reads_lwt_backend_when_traced(monkeypatch):
    """Under torch.compile LWT_BACKEND is read while tracing (Dynamo guards a value set then, not an unset
    variable): a value set before compiling is honoured, and torch._dynamo.reset() picks up a new one."""
    block = make_block("gqa")
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
        monkeypatch.setenv("LWT_BACKEND", "bogus")
        with pytest.raises(Exception, match="LWT_BACKEND: expected one of"):
            torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        torch._dynamo.reset()
        monkeypatch.setenv("LWT_BACKEND", "reference")
        got = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert_close("y", got, want.double(), want)


@pytest.mark.parametrize("first,second,retraced", [("reference", "triton", True), ("triton", None, True),
                                                    (None, "triton", False)])
def test_compiled_lwt_backend_guard(monkeypatch, first, second, retraced):
    """What backend_for's docstring says of torch.compile: Dynamo guards LWT_BACKEND's value when it was set
    at trace time (a change retraces, on the new path), not its absence (a value set later is not seen)."""
    from kernels._common import interpreting

    if not interpreting():
        pytest.skip("runs the Triton path on CPU tensors: needs the interpreter (the CPU suite)")
    has_kernel = []

    def record(gm, example_inputs):
        has_kernel.append(any(str(n.target).startswith("lwt.") for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward

    def set_backend(value):
        if value is None:
            monkeypatch.delenv("LWT_BACKEND", raising=False)
        else:
            monkeypatch.setenv("LWT_BACKEND", value)

    torch._dynamo.reset()
    x, w = torch.randn(4, 16), torch.ones(16)
    norm = torch.compile(lambda x, w: lwtF.rms_norm(x, w), backend=record, fullgraph=True)
    set_backend(first)
    norm(x, w)
    set_backend(second)
    norm(x, w)
    assert has_kernel == ([first == "triton", second == "triton"] if retraced else [first == "triton"])


def test_rope_cache_is_left_alone_under_compile():
    """Compiled code computes the cos/sin table for the positions it needs; eager mode still fills and
    grows the fp32 cache as before."""
    block = make_block("gqa")
    rope = block.attn.rope
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        assert rope._cos.shape[0] == 0
        block(x)
    assert rope._cos.shape[0] >= 8 and rope._cos.dtype == torch.float32


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_model_forward_compiles_to_one_graph_cpu(attn_type):
    """LWTModel.forward (embedding, blocks, final norm) in one graph. The mask-diffusion loss stays in
    eager mode: its boolean gather (hidden[mask]) has a data-dependent shape, and the target check syncs
    with the host, so Dynamo breaks the graph there by design."""
    cfg = block_config(attn_type, n_layers=1, d_model=32, d_ff=64, mla_rq=8)
    torch.manual_seed(0)
    model = LWTModel(cfg)
    truth = copy.deepcopy(model).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled_forward = torch.compile(model, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    mask = torch.rand(2, 16, generator=gen) < 0.5
    t = torch.tensor([0.3, 0.8])
    noisy = tokens.masked_fill(mask, model.mask_id)

    def loss_and_grads(forward, m):
        m.zero_grad(set_to_none=True)
        hidden = forward(noisy)
        loss = masked_diffusion_loss(hidden, m.head_weight(), tokens, mask, t)
        loss.backward()
        return hidden.detach(), loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    got = loss_and_grads(compiled_forward, model)
    want = loss_and_grads(truth, truth)
    yardstick = loss_and_grads(model, model)
    assert counter.frame_count == 1
    assert_close("hidden", got[0], want[0], yardstick[0])
    assert_close("loss", got[1], want[1], yardstick[1])
    for name in got[2]:
        assert_close(f"d {name}", got[2][name], want[2][name], yardstick[2][name], reduced_over=tokens.numel())


@pytest.mark.cuda
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_decoder_block_compiled_cuda_bf16(monkeypatch, attn_type):
    """The Triton kernels in bf16 under torch.compile (Inductor) on a GPU, in one graph (the kernels enter
    it as the custom ops lwt::*, see tests/test_library_ops.py), against the same weights in float64 on
    the reference path, with the eager bf16 Triton path as the yardstick."""
    block = make_block(attn_type, device="cuda", dtype=torch.bfloat16)
    truth = copy.deepcopy(block).double()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 128, 64, generator=gen).to("cuda", torch.bfloat16)
    dy = torch.randn(2, 128, 64, generator=gen).to("cuda", torch.bfloat16)
    got = output_and_grads(compiled, x, dy)
    assert counter.frame_count == 1
    yardstick = output_and_grads(block, x, dy)
    monkeypatch.setenv("LWT_BACKEND", "reference")  # the kernels take no float64
    want = output_and_grads(truth, x.double(), dy.double())
    compare(got, want, yardstick, 2 * 128)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_reference_path_compiles_to_one_graph(reduction):
    """On the reference path the up-front target check (a host sync) is skipped while tracing, so the loss
    is one graph; same loss and gradients as eager mode."""
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(9, 16, generator=gen), torch.randn(33, 16, generator=gen)
    target = torch.randint(0, 33, (9,), generator=gen)
    target[::4] = -100

    def loss_and_grads(fn):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        loss = fn(*leaves, target)
        return [loss.detach(), *torch.autograd.grad(loss.sum(), leaves)]

    def loss_fn(h, w, t):
        return lwtF.linear_cross_entropy(h, w, t, reduction=reduction)

    counter = CompileCounterWithBackend("aot_eager")
    got = loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend=counter))
    want = loss_and_grads(loss_fn)
    assert counter.frame_count == 1
    for name, a, b in zip(["loss", "d_hidden", "d_weight"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_autocast_available_carries_what_assume_constant_result_sets():
    """kernels._checks marks autocast_available by hand (the decorator would import Dynamo at import time):
    the decorator must still set that attribute and nothing else."""
    def fn():
        return True
    before = set(vars(fn))
    assert torch.compiler.assume_constant_result(fn) is fn
    added = {name: getattr(fn, name) for name in set(vars(fn)) - before}
    assert added == {"_dynamo_marked_constant": True}
    assert all(getattr(autocast_available, name) == value for name, value in added.items())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_availability_is_not_traced(monkeypatch, backend):
    """torch 2.11's Dynamo (the GPU image's) cannot trace torch.amp.is_autocast_available ("Attempted to
    call function marked as skipped": an error under fullgraph=True); 2.13's can. Here it is made
    untraceable as in 2.11: the ops must only reach it through kernels._checks.autocast_available, which
    Dynamo takes as a constant. A block and its backward (the Triton backwards' autocast switch), inside
    and outside autocast; the Triton path outside it only (autocast would hand the attention kernel bf16
    q/k/v, whose tl.dot the interpreter computes wrongly), its backward traces the switch all the same."""
    from kernels._common import interpreting

    if backend == "triton" and not interpreting():
        pytest.skip("runs the Triton path on CPU tensors: needs the interpreter (the CPU suite)")
    monkeypatch.setenv("LWT_BACKEND", backend)
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    block = make_block("gqa")
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 64, requires_grad=True)
    for autocast in (False, True) if backend == "reference" else (False,):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            got = compiled(x)
            want = block(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.sum().backward()


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_a_triton_block_compiled_under_autocast_is_eager(monkeypatch, attn_type):
    """A Triton-path block (and the tied head's cross entropy after it) compiled under torch.autocast gives
    eager's output and gradients, bit for bit, with backward() outside autocast and inside it. Dynamo, tracing
    the Triton backwards' autocast switch while it traced the forward, carried the switched-off state into
    the rest of the forward's trace: an autocast projection after an lwt op looked fp32 to it, so RoPE's
    cast back to the activations' dtype was dropped, the attention kernel got fp32 q and k beside 16-bit
    v (the forward was 2e-4 off) and its backward raised "Both operands must be same dtype". fp16 here:
    the interpreter computes bf16 tl.dot wrongly."""
    from kernels._common import interpreting

    if not interpreting():
        pytest.skip("runs the Triton path on CPU tensors: needs the interpreter (the CPU suite)")
    monkeypatch.setenv("LWT_BACKEND", "triton")
    block = make_block(attn_type)
    head = torch.randn(40, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(3))

    def loss(x):
        return lwtF.linear_cross_entropy(block(x), head, target)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    for inside in (False, True):
        runs = []
        for fn in (loss, compiled):
            block.zero_grad(set_to_none=True)
            head.grad = None
            leaf = x.clone().requires_grad_()
            with torch.autocast("cpu", torch.float16):
                value = fn(leaf)
                if inside:
                    value.backward()
            if not inside:
                value.backward()
            runs.append([value.detach(), leaf.grad, head.grad] + [p.grad for p in block.parameters()])
        for want, got in zip(*runs):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
