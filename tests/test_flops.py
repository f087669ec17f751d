"""The Triton path under TorchDispatchModes: FlopCounterMode counts the lwt:: ops (kernels/flops.py),
FakeTensorMode runs them through their fakes, a selective checkpointing policy can save their outputs.

Eager Launchers call the registered op (not the launch function) while a mode is active, so a mode sees
each kernel as one op. The FLOP counts of the Triton path (interpreter, fp32, tiny shapes) are compared
with the reference path's (LWT_BACKEND=reference, the same math in torch ops): equal where both do the
same matmuls, otherwise equal to the reference's count plus the products the kernels recompute, computed
here from the shapes:
  - attention's backward recomputes the scores (torch's SDPA backward formula counts them too): one more
    2·B·H·S²·Dqk than autograd through eager attention, which keeps the probabilities;
  - FrozenSwiGLU(recompute=True) recomputes the gate/up GEMM in its backward: 2·2·T·D·F;
  - the cross entropy's deferred backward (reduction "none") recomputes the logits: 2·N·V·D.
"""
import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

import lwt.functional as lwtF
from kernels import attention, cross_entropy, flops, mla, rmsnorm, swiglu  # noqa: F401  (every lwt:: op registered)
from kernels._common import Launcher, interpreting
from lwt.layers import DecoderBlock, FrozenSwiGLU, GQAAttention, MLAAttention
from tests.helpers import block_config

# The Triton path on CPU tensors (the counts depend on shapes only, not on where the kernels run).
pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the Triton path on CPU tensors: needs the "
                                "interpreter (the CPU suite)")

B, S, D_MODEL, HEADS, KV_HEADS, D_FF = 2, 8, 32, 4, 2, 64
T = B * S  # tokens


def randn(*shape, seed=0, requires_grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def counted(fn, *args):
    """FLOPs FlopCounterMode counts for fn(*args) (fn runs the forward and backward), in all and by op."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops(), {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def on_both_paths(monkeypatch, fn, *args):
    """(Triton path's FLOPs, reference path's FLOPs, the Triton path's count by op) of fn(*args)."""
    monkeypatch.setenv("LWT_BACKEND", "reference")
    reference, _ = counted(fn, *args)
    monkeypatch.setenv("LWT_BACKEND", "triton")
    total, by_op = counted(fn, *args)
    return total, reference, by_op


def fwd_bwd(module, x):
    module.zero_grad(set_to_none=True)
    module(x).backward(randn(*x.shape[:-1], module.d_model, seed=9))


def score_recompute(heads: int, d_qk: int) -> int:
    """The flash backward's recomputed scores, B·heads·S rows of S dot products of length d_qk."""
    return 2 * B * heads * S * S * d_qk


def test_every_matmul_op_has_a_formula():
    """Each lwt:: op that runs a matmul has a FLOP formula (RMSNorm's have none: they count 0)."""
    assert set(flops.FORMULAS) == set(Launcher.registry) - {"rms_norm_fwd", "rms_norm_bwd"}


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_decoder_block_flops_match_the_reference(monkeypatch, attn_type, recompute):
    torch.manual_seed(0)
    cfg = block_config(attn_type, d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, d_ff=D_FF)
    block = DecoderBlock.from_config(cfg, 0, recompute=recompute)
    total, reference, by_op = on_both_paths(monkeypatch, fwd_bwd, block, randn(B, S, D_MODEL, requires_grad=True))
    d_qk = block.attn.head_dim if attn_type == "gqa" else block.attn.nope_dim + block.attn.rope_dim
    extra = score_recompute(HEADS, d_qk) + (2 * 2 * T * D_MODEL * D_FF if recompute else 0)
    assert total == reference + extra
    attention_bwd = "lwt.attention_bwd" if attn_type == "gqa" else "lwt.mla_bwd"
    assert {"lwt.attention_fwd", attention_bwd, "lwt.frozen_swiglu_fwd", "lwt.frozen_swiglu_bwd"} <= set(by_op)


@pytest.mark.parametrize("grads", ["q-k-v", "k-v", "q"])
def test_gqa_attention_flops_match_the_reference(monkeypatch, grads):
    """The layer (its projections are torch GEMMs on both paths), and the op alone with gradients for some
    inputs only: the backward counts only the passes it runs (dQ; dK and dV), each beside the recomputed
    scores and dP."""
    torch.manual_seed(0)
    layer = GQAAttention(D_MODEL, HEADS, KV_HEADS)
    total, reference, _ = on_both_paths(monkeypatch, fwd_bwd, layer, randn(B, S, D_MODEL, requires_grad=True))
    assert total == reference + score_recompute(HEADS, D_MODEL // HEADS)

    D = 8
    q, k, v = (randn(B, S, h, D, seed=i, requires_grad=name in grads)
               for i, (name, h) in enumerate((("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))))
    dy = randn(B, S, HEADS, D, seed=5)
    total, reference, _ = on_both_paths(monkeypatch, lambda: lwtF.attention(q, k, v, causal=True).backward(dy))
    assert total == reference + score_recompute(HEADS, D)


def test_mla_attention_flops_match_the_reference(monkeypatch):
    """The layer's training form (mla_bwd), then its absorbed inference form (latent attention: the
    forward kernel with the latent as the one K/V head)."""
    torch.manual_seed(0)
    layer = MLAAttention(D_MODEL, HEADS, q_rank=16, kv_rank=16, nope_dim=8, rope_dim=4, v_dim=8)
    total, reference, _ = on_both_paths(monkeypatch, fwd_bwd, layer, randn(B, S, D_MODEL, requires_grad=True))
    assert total == reference + score_recompute(HEADS, 8 + 4)
    with torch.no_grad():
        total, reference, by_op = on_both_paths(monkeypatch, layer, randn(B, S, D_MODEL), True)
    assert total == reference and "lwt.attention_fwd" in by_op


@pytest.mark.parametrize("grads", ["q-k-v", "k-v", "q"])
def test_mla_op_flops_with_some_gradients_match_the_reference(monkeypatch, grads):
    """The MLA op alone with gradients for some inputs only (frozen keys, or a frozen query): mla_bwd counts
    only the passes it runs (dQ; dK_nope, dK_rope and dV), each beside the recomputed scores and dP."""
    Dn, Dr, Dv = 8, 4, 6
    q, kn, kr, v = (randn(*shape, seed=i, requires_grad=name in grads) for i, (name, shape) in enumerate(
        (("q", (B, S, HEADS, Dn + Dr)), ("k", (B, S, HEADS, Dn)), ("k", (B, S, Dr)), ("v", (B, S, HEADS, Dv)))))
    dy = randn(B, S, HEADS, Dv, seed=5)
    total, reference, by_op = on_both_paths(
        monkeypatch, lambda: lwtF.mla_attention(q, kn, kr, v, causal=True).backward(dy))
    assert total == reference + score_recompute(HEADS, Dn + Dr)
    assert "lwt.mla_bwd" in by_op


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_frozen_swiglu_flops_match_the_reference(monkeypatch, recompute):
    """Gate, up and down GEMMs forward; dh, dx (two) and dW_down backward, on both paths (the frozen
    weights get no gradient); recompute adds the gate/up GEMM again."""
    torch.manual_seed(0)
    mlp = FrozenSwiGLU(D_MODEL, D_FF, seed=3, recompute=recompute)
    total, reference, by_op = on_both_paths(monkeypatch, fwd_bwd, mlp, randn(B, S, D_MODEL, requires_grad=True))
    assert reference == 7 * 2 * T * D_MODEL * D_FF
    assert total == reference + (2 * 2 * T * D_MODEL * D_FF if recompute else 0)
    assert set(by_op) == {"lwt.frozen_swiglu_fwd", "lwt.frozen_swiglu_bwd"}  # the torch GEMMs inside are the op's


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_flops_match_the_reference(monkeypatch, reduction):
    """Logits, dH and dW: computed in the forward for fp32 "mean", in the backward (the logits again) for
    "none". Rows whose target is ignore_index count as the reference counts them, though the kernel skips
    them: the formulas read shapes, never data."""
    N, D, V = 12, 16, 40
    hidden, weight = randn(N, D, requires_grad=True), randn(V, D, seed=1, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    target[::3] = -100

    def loss_backward():
        loss = lwtF.linear_cross_entropy(hidden, weight, target, reduction=reduction)
        (loss if reduction == "mean" else loss.sum()).backward()

    total, reference, by_op = on_both_paths(monkeypatch, loss_backward)
    assert reference == 3 * 2 * N * D * V
    assert total == reference + (2 * N * D * V if reduction == "none" else 0)
    assert "lwt.linear_cross_entropy_fwd" in by_op



def test_linear_cross_entropy_scales_in_place_under_a_mode(monkeypatch):
    """fp32 "mean" computes dH and dW in the forward; under a mode its backward scales them in place with
    torch ops (not its Triton kernel, which a mode cannot see), in blocks of rows (here of 3 rows, to
    take several): the same bits as the kernel, in the forward's buffers, and a second backward is refused
    as in eager mode."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    monkeypatch.setattr(cross_entropy, "_MODE_SCALE_ELEMENTS", 3 * 16)
    N, D, V = 12, 16, 40
    hidden, weight = randn(N, D, requires_grad=True), randn(V, D, seed=1, requires_grad=True)
    target = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    target[::3] = -100
    made, chunks = [], cross_entropy.ce_chunks

    def spy(*args, **kwargs):
        out = chunks(*args, **kwargs)
        made.append((out[2].data_ptr(), out[3].data_ptr()))
        return out

    monkeypatch.setattr(cross_entropy, "ce_chunks", spy)
    grads = []
    for mode in (False, True):
        loss = lwtF.linear_cross_entropy(hidden, weight, target) * 3.0
        with FlopCounterMode(display=False) if mode else torch.enable_grad():
            grads.append(torch.autograd.grad(loss, (hidden, weight), retain_graph=True))
        with pytest.raises(RuntimeError, match="backward ran twice"):
            torch.autograd.grad(loss, (hidden, weight))
    assert grads[1][1].data_ptr() == made[1][1], "dW copied"  # (dH is scattered to every row afterwards)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_a_counter_made_before_the_kernels_were_imported_counts_them(monkeypatch):
    """A FlopCounterMode copies torch's formula registry when made; lwt.functional imports a kernel
    module at its first call, so a counter made before that lacks its formulas (simulated here by
    taking one out): the Launcher hands them over."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    counter = FlopCounterMode(display=False)
    del counter.flop_registry[torch.ops.lwt.frozen_swiglu_fwd]
    w = randn(D_MODEL, D_FF, seed=1)
    with counter, torch.no_grad():
        lwtF.frozen_swiglu(randn(T, D_MODEL), randn(D_FF, D_MODEL, seed=2), randn(D_FF, D_MODEL, seed=3), w)
    assert counter.get_total_flops() == 3 * 2 * T * D_MODEL * D_FF


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fake_tensor_mode_runs_the_linear_cross_entropy(monkeypatch, reduction):
    """Both schedules, forward and backward ("mean" scales the forward's gradients with torch ops under a
    mode, not with its in-place kernel, which fake tensors could not feed)."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    with FakeTensorMode():
        hidden, weight = torch.randn(12, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
        loss = lwtF.linear_cross_entropy(hidden, weight, torch.randint(0, 40, (12,)), reduction=reduction)
        (loss if reduction == "mean" else loss.sum()).backward()
        assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_fake_tensor_mode_runs_the_triton_path(monkeypatch, attn_type):
    """A DecoderBlock made and run under FakeTensorMode (no data, no kernel launched): the forward and
    backward give fake tensors of the right shapes, and FlopCounterMode counts what a real run does."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    cfg = block_config(attn_type, d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS, d_ff=D_FF)
    torch.manual_seed(0)
    real, _ = counted(fwd_bwd, DecoderBlock.from_config(cfg, 0), randn(B, S, D_MODEL, requires_grad=True))
    with FakeTensorMode():
        block = DecoderBlock.from_config(cfg, 0)
        x = torch.randn(B, S, D_MODEL, requires_grad=True)
        y = block(x)
        assert y.shape == (B, S, D_MODEL) and y.dtype == torch.float32
        y.sum().backward()
        assert x.grad.shape == x.shape and block.attn.out.weight.grad is not None
        fake, _ = counted(fwd_bwd, block, x)
    assert fake == real


class _CountLwtOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lwt":
            self.calls[func.__name__] = self.calls.get(func.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_saves_the_kernels_outputs(monkeypatch):
    """A policy saving every lwt:: op's outputs: the recomputation in the backward reruns only the torch
    ops (without it every forward kernel runs twice), with the same gradients."""
    monkeypatch.setenv("LWT_BACKEND", "triton")
    torch.manual_seed(0)
    block = DecoderBlock.from_config(block_config("gqa", d_model=D_MODEL, n_heads=HEADS, n_kv_heads=KV_HEADS,
                                                  d_ff=D_FF), 0)
    x = randn(B, S, D_MODEL, requires_grad=True)
    block(x).sum().backward()
    expected = x.grad
    save_lwt = functools.partial(create_selective_checkpoint_contexts, lambda ctx, op, *args, **kwargs: (
        CheckpointPolicy.MUST_SAVE if op.namespace == "lwt" else CheckpointPolicy.PREFER_RECOMPUTE))
    for context_fn, forward_runs in ((save_lwt, 1), (None, 2)):
        x.grad = None
        with _CountLwtOps() as seen:
            checkpoint(block, x, use_reentrant=False, **({} if context_fn is None else {"context_fn": context_fn})
                       ).sum().backward()
        assert seen.calls["attention_fwd.default"] == seen.calls["frozen_swiglu_fwd.default"] == forward_runs
        torch.testing.assert_close(x.grad, expected)
