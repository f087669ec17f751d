"""One DecoderBlock training step (forward + backward, bf16): lwt eager vs torch.compile of it, against the
same block built from PyTorch's own ops, eager and compiled.

    python benchmarks/bench_block.py [--quick]

Providers, one block's weights for all of them:
    lwt                  the block as users get it: lwt's Triton kernels, eager mode
    lwt compiled         torch.compile(block, fullgraph=True): the kernels are custom ops (lwt::*) inside
                         one graph; Inductor fuses what lies between them (RoPE, residual adds, casts)
    torch                the same block with lwt.functional's ops swapped for PyTorch's: F.rms_norm (after
                         an eager residual add), SDPA (enable_gqa) and the eager frozen SwiGLU
    torch compiled       torch.compile of that

Cases: bidirectional GQA blocks (what the mask-diffusion trainer runs), batch x sequence x d_model with
16 or 32 query heads of 128 over 4 or 8 K/V heads and d_ff 3.5 x d_model. FLOPs counted per step, for T
tokens, model dim D, H heads and Hkv K/V heads of head dim d, MLP width F: projections 2·T·D·d·(2H + 2Hkv)
forward (QKV and output), x3 for forward + backward; attention 4·B·S²·H·d forward, x3.5 for forward +
backward (bench_attention.py's convention); MLP 6·T·D·F forward + 8·T·D·F backward (no gate/up weight
gradients; see bench_swiglu.py).
"""
from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

import _harness as H  # first: sets up the interpreter on CPU-only machines  # isort: skip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lwt.functional as lwtF
from lwt.layers import DecoderBlock

# (batch, seq, d_model, heads, kv heads)
CASES = [(4, 2048, 2048, 16, 4), (2, 4096, 4096, 32, 8), (1, 8192, 4096, 32, 8)]
QUICK = [(2, 4096, 4096, 32, 8)]  # each compiled provider costs a compilation of its own
GOAL_CASE = "2x4096x4096"
DEVICE = "cuda"  # a module constant only so that a dry run can point the cases at the CPU


def _torch_rms_norm(x, weight, eps=1e-6, residual=None):
    if residual is None:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    s = x + residual
    return torch.nn.functional.rms_norm(s, (s.shape[-1],), weight, eps), s


def _torch_attention(q, k, v, causal=False, softmax_scale=None):
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return o.transpose(1, 2)


def _torch_swiglu(x, w_gate, w_up, w_down, recompute=False):
    return torch.nn.functional.linear(torch.nn.functional.silu(x @ w_gate.t()) * (x @ w_up.t()), w_down)


@contextlib.contextmanager
def torch_ops():
    """lwt.functional's rms_norm, attention and frozen_swiglu replaced by PyTorch's, while inside."""
    saved = {name: getattr(lwtF, name) for name in ("rms_norm", "attention", "frozen_swiglu")}
    lwtF.rms_norm, lwtF.attention, lwtF.frozen_swiglu = _torch_rms_norm, _torch_attention, _torch_swiglu
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(lwtF, name, fn)


def step_flops(B, S, D, Hq, Hkv, F) -> float:
    T, d = B * S, D // Hq
    return 3 * 2 * T * D * d * (2 * Hq + 2 * Hkv) + 3.5 * 4 * B * S * S * Hq * d + 14 * T * D * F


def run_case(report, B, S, D, Hq, Hkv):
    torch._dynamo.reset()
    F = D * 7 // 2
    torch.manual_seed(0)
    block = DecoderBlock(D, Hq, F, n_kv_heads=Hkv, device=DEVICE, dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(B, S, D, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(B, S, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    params = [x, *(p for p in block.parameters() if p.requires_grad)]
    case, flops = f"{B}x{S}x{D}", step_flops(B, S, D, Hq, Hkv, F)

    def timed(name, module):
        """One provider; a failure (an Inductor error, say) is noted and the others still run."""
        def step():
            return torch.autograd.grad(module(x), params, dy)
        ms = H.attempt(report, f"{case} fwd+bwd {name}", lambda: H.bench_ms(step, rep_ms=1000))
        report.add(case, "fwd+bwd", name, ms, "TFLOP/s", flops)

    timed("lwt", block)
    timed("lwt compiled", torch.compile(block, fullgraph=True))
    # PyTorch's ops; SDPA limited to its fused backends, so that a silent fallback to the math backend
    # cannot make the baseline look slow. Compiled code keeps the functions it was traced with (the reset
    # drops the lwt graph; the warm-up call traces the new one inside the patch).
    torch._dynamo.reset()
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with torch_ops(), sdpa_kernel(fused):
        timed("torch", block)
        timed("torch compiled", torch.compile(block, fullgraph=True))
    return case


def smoke():
    """CPU: a tiny block on the Triton path (interpreter), compiled into one graph (AOTAutograd, no
    Inductor), against eager mode."""
    with mock.patch.dict(os.environ, LWT_BACKEND="triton"):  # CPU tensors take the reference path otherwise
        torch.manual_seed(0)
        block = DecoderBlock(64, 4, 96, n_kv_heads=2)
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        x, dy = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
        got, want = [], []
        for module, out in ((compiled, got), (block, want)):
            leaf = x.clone().requires_grad_()
            y = module(leaf)
            out += [y.detach(), *torch.autograd.grad(y, [leaf, *block.parameters()], dy)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def main(argv=None) -> list[str]:
    """Runs the benchmark; returns the summary lines (run_all prints them last)."""
    args, report = H.start("block", __doc__, smoke, argv)
    if report is None:
        return H.smoke_only("block")
    for B, S, D, Hq, Hkv in (QUICK if args.quick else CASES):
        run_case(report, B, S, D, Hq, Hkv)
    summary = []
    lwt_ms = report.ms(GOAL_CASE, "fwd+bwd", "lwt")
    for name in ("lwt compiled", "torch", "torch compiled"):
        ms = report.ms(GOAL_CASE, "fwd+bwd", name)
        if ms and lwt_ms:
            summary.append(f"block {GOAL_CASE} fwd+bwd: {name} {ms:.3f} ms, lwt eager {lwt_ms:.3f} ms "
                           f"(lwt eager is {ms / lwt_ms:.2f}x as fast)")
    return report.finish(summary)


if __name__ == "__main__":
    main()
    sys.exit(0)
