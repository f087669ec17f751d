"""FLOP formulas of the lwt:: ops, for torch.utils.flop_counter.FlopCounterMode.

Conventions are torch's own (torch/utils/flop_counter.py): matmul FLOPs only, 2·m·n·k for an (m, k) by
(k, n) product (no softmax, norm, activation or exp counted; rms_norm_fwd/_bwd have no matmul and no
formula: 0). Attention follows torch's formulas for _scaled_dot_product_flash_attention and its backward:

    forward   2·B·H·S²·Dqk (scores) + 2·B·H·S²·Dv (P·V)
    backward  the scores recomputed, dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q: 5 products, 2.5x the
              forward (the FlashAttention papers' count, which benchmarks/bench_attention.py uses too)

per query head H (GQA's K/V heads are broadcast, as torch counts them), with no causal discount (torch
gives none for SDPA: "We aren't accounting for causal attention here"). The backward counts only the
products its passes compute (need_dq / need_dkdv); this kernel's separate dQ pass recomputes the scores
and dP a second time, which, like torch, is not counted. So a backward counts one S² product more than an
autograd backward of eager attention (which keeps P): the flash recomputation.

The other ops count each GEMM they run, recomputations included, so they match eager PyTorch only
where they do the same work: FrozenSwiGLU with recompute=True recomputes the gate/up GEMM in its backward
(2·2·T·D·F), and the cross entropy's deferred backward (reduction "none", or fp16) recomputes the logits
(2·N·V·D). The cross entropy counts every row, the ignore_index rows too (which the kernel skips): the
formulas read shapes only, never data, so they also count under FakeTensorMode and need no host sync.
FP8 GEMMs (frozen FP8 SwiGLU weights) count as any other, as torch's _scaled_mm formula does.

Each formula takes the launcher's arguments by name (bound to its signature, defaults applied), tensors as
they are (real or fake). Launcher registers FORMULAS[name] for its op when it registers the op.
"""
from __future__ import annotations

import inspect

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula


def mm(m: int, k: int, n: int) -> int:
    """An (m, k) by (k, n) product, as torch's mm_flop counts it."""
    return 2 * m * k * n


def _attention(q, v, forward: bool, need_dq: bool = True, need_dkv: bool = True) -> int:
    """q (B, S, H, Dqk) against keys of Dqk and values v (..., Dv): see the module docstring."""
    B, S, H, d_qk = q.shape
    d_v = v.shape[-1]
    rows = B * H * S  # one row of scores per query head and position, S keys each
    if forward:
        return mm(rows, d_qk, S) + mm(rows, S, d_v)
    if not (need_dq or need_dkv):
        return 0
    flops = mm(rows, d_qk, S) + mm(rows, d_v, S)  # the scores recomputed, dP
    if need_dkv:
        flops += mm(rows, S, d_v) + mm(rows, S, d_qk)  # dV, dK (dk_nope and dk_rope for MLA)
    if need_dq:
        flops += mm(rows, S, d_qk)
    return flops


def attention_fwd(q, k, kr, v, causal, sm_scale, d_rope=0, **_):
    """GQA and MLA (q's last dim is Dn + Dr) and latent attention (v is the latent)."""
    return _attention(q, v, forward=True)


def attention_bwd(do, q, k, v, o, lse, causal, sm_scale, need_dq=True, need_dkdv=True, **_):
    return 0 if k.numel() == 0 else _attention(q, v, False, need_dq, need_dkdv)


def mla_bwd(do, q, k_nope, k_rope, v, o, lse, causal, sm_scale, need_dq=True, need_dkv=True, **_):
    return _attention(q, v, False, need_dq, need_dkv)


def frozen_swiglu_fwd(x, w_gate, w_up, w_down, save_gate_up, **_):
    """gate and up (T, D)·(D, F) each, then h (T, F)·(F, D_out)."""
    T, D = x.shape
    F, D_out = w_gate.shape[0], w_down.shape[0]
    return 2 * mm(T, D, F) + mm(T, F, D_out)


def frozen_swiglu_bwd(dy, x, w_gate, w_up, w_down, g=None, u=None, need_dx=True, need_dw_down=True, **_):
    """dh = dy·W_down, dx = dg·W_gate + du·W_up, dW_down = dyᵀ·h; with x given (recompute: g and u were
    not kept) the gate/up GEMM runs again for dx and for h."""
    T, D = dy.shape
    F = w_gate.shape[0]
    recompute = g is None
    flops = 2 * mm(T, D, F) if recompute and (need_dx or need_dw_down) else 0
    if need_dx:
        flops += mm(T, D, F) + 2 * mm(T, F, D)
    if need_dw_down:
        flops += mm(D, T, F)
    return flops


def linear_cross_entropy_fwd(hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype, need_dh,
                             need_dw, need_dtw, **_):
    """The logits (N, D)·(D, V); for mean/sum in fp32 or bf16 the gradients dH = dZ·W and dW = dZᵀ·H are
    computed here too (kernels/cross_entropy.py: _deferred)."""
    from .cross_entropy import _deferred  # here: kernels._common imports this module before cross_entropy

    N, D = hidden.shape
    V = weight.shape[0]
    now = not _deferred(reduction, hidden.dtype)
    return mm(N, D, V) * (1 + (now and need_dh) + (now and need_dw))


def linear_cross_entropy_bwd(hidden, weight, target, token_weight, lse, grad, reduction, ignore_index, accum_dtype,
                             need_dh, need_dw, **_):
    """The deferred backward: the logits recomputed, then dH and dW."""
    N, D = hidden.shape
    V = weight.shape[0]
    return mm(N, D, V) * (1 + need_dh + need_dw)


FORMULAS = {f.__name__: f for f in (attention_fwd, attention_bwd, mla_bwd, frozen_swiglu_fwd, frozen_swiglu_bwd,
                                     linear_cross_entropy_fwd, linear_cross_entropy_bwd)}


def register(name: str, fn) -> None:
    """Register FORMULAS[name] (if any) for torch.ops.lwt.<name>, whose launcher is `fn`. FlopCounterMode
    passes the op's arguments as the dispatcher hands them to a mode (some by position, some by keyword,
    defaults possibly left out): they are bound to fn's signature first."""
    formula = FORMULAS.get(name)
    if formula is None:
        return
    signature = inspect.signature(fn)

    def count(*args, out_val=None, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return formula(**bound.arguments)

    register_flop_formula(getattr(torch.ops.lwt, name), get_raw=True)(count)


def reach_counters(name: str) -> None:
    """Give op `name`'s formula to every active FlopCounterMode that lacks it. A FlopCounterMode copies
    torch's formula registry when it is made, and lwt.functional imports a kernel module (which registers
    its ops and their formulas) at the op's first call: a counter made before that, around a model's
    first step, would not count the op. Launcher calls this before each op it runs under a mode."""
    packet = getattr(torch.ops.lwt, name)
    formula = flop_registry.get(packet)
    if formula is None:
        return
    for mode in _get_current_dispatch_mode_stack():
        counter = getattr(mode, "counter", mode)  # torch >= 2.4: the mode of a FlopCounterMode is a helper
        if isinstance(counter, FlopCounterMode):
            counter.flop_registry.setdefault(packet, formula)  # a custom_mapping of the user's stays


__all__ = ["FORMULAS", "mm", "reach_counters", "register"]
