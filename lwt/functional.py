"""One function per op. Each validates its arguments, then runs the Triton kernel (CUDA tensors) or the
plain PyTorch reference in `kernels.reference` (anything else).

`LWT_BACKEND` overrides the choice, read at every call in eager mode (under torch.compile, when the
graph is traced; see backend_for for when a change retraces): `reference` always runs the reference;
`triton` always runs the kernel and raises if this machine cannot (no Triton, or CPU tensors without
the interpreter, TRITON_INTERPRET=1); `auto` (the default) picks as above.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from kernels import reference
from kernels._checks import (KERNEL_DTYPES, MAX_HEAD_DIM, REFERENCE_DTYPES, autocast_available, check_attention_args,
                             check_latent_args, check_linear_cross_entropy_args, check_mla_args, check_rms_norm_args,
                             check_swiglu_args, count_valid_targets)

_BACKENDS = ("auto", "triton", "reference")


# Whether triton can be imported, found without importing it (a plain constant: Dynamo traces backend_for).
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _backend_choice() -> str:
    """LWT_BACKEND, normalised: "auto", "triton" or "reference"; ValueError for anything else."""
    choice = os.environ.get("LWT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _BACKENDS:
        raise ValueError(f"LWT_BACKEND: expected one of {', '.join(_BACKENDS)}, got {choice!r}")
    return choice


def backend_for(x: torch.Tensor) -> str:
    """The path an op given `x` takes now (see the module docstring).

    Args:
        x: the op's first tensor argument (anything else is allowed: validation rejects it later).
    Returns:
        "triton" or "reference". ValueError for an unknown LWT_BACKEND; RuntimeError if LWT_BACKEND=triton
        and this machine cannot run the kernels for x.
    Under torch.compile the variable is read while the graph is traced. Dynamo (torch 2.13) guards on its
    value when it was set at trace time: changing or unsetting it retraces at the next call, on the new
    path. It puts no guard on its absence: a variable first set after compiling is not seen, and the
    compiled code keeps the path it was traced with. Set LWT_BACKEND before compiling, or call
    torch._dynamo.reset() after changing it.
    """
    choice = _backend_choice()
    if choice == "reference":
        return "reference"
    on_cuda = isinstance(x, torch.Tensor) and x.is_cuda  # a non-tensor fails validation on either path
    if choice == "auto":
        return "triton" if on_cuda and _TRITON_IMPORTABLE else "reference"
    if not _TRITON_IMPORTABLE:
        raise RuntimeError("LWT_BACKEND=triton, but triton cannot be imported on this machine; "
                           "install triton, or unset LWT_BACKEND to run the PyTorch reference")
    from kernels._common import interpreting  # imports triton, which is importable here

    if isinstance(x, torch.Tensor) and not on_cuda and not (x.device.type == "cpu" and interpreting()):
        raise RuntimeError(f"LWT_BACKEND=triton needs CUDA tensors (got a tensor on {x.device}); to run the "
                           "kernels on the CPU set TRITON_INTERPRET=1 before triton is imported, or unset "
                           "LWT_BACKEND to run the PyTorch reference")
    return "triton"


def _values_readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read on the host now: not while torch.compile traces, and not for a tensor
    without data (meta, a FakeTensor) or a torch.func transform's wrapper (vmap's BatchedTensor has no
    storage to read)."""
    return not (torch.compiler.is_compiling() or t.is_meta or is_fake(t)
                or torch._C._functorch.is_functorch_wrapped_tensor(t))


def _reference_autocast_off(x):
    """The references run with autocast off on x's device: they are the fp32-compute specification (and the
    Triton kernels, which autocast never reaches, compute in their inputs' dtype). Under an enclosing
    torch.autocast the reference's own upcasts (x.to(fp32) @ w.to(fp32), the fp32 scores) would
    otherwise be cast back down to the autocast dtype."""
    if isinstance(x, torch.Tensor) and autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, with the optional fused pre-norm residual add.

    Args:
        x: (..., N), float32/float16/bfloat16 (float64 too on the reference path).
        weight: (N,), on x's device; None: no scale (as torch.nn.RMSNorm(elementwise_affine=False)).
        eps: float >= 0, added to the mean square of the normalised input (x, or x + residual).
        residual: optional, x's shape, dtype and device.
    Returns:
        y (..., N) in x's dtype; with a residual, (y, s) where s = x + residual is what was normalised.
        Statistics are computed in fp32 (float64 for float64 x); gradients flow to x, weight and residual.
    """
    if backend_for(x) == "triton":
        from kernels.rmsnorm import rms_norm as rms_norm_triton  # validates before launching
        return rms_norm_triton(x, weight, eps, residual)
    check_rms_norm_args(x, weight, residual, eps, dtypes=REFERENCE_DTYPES)
    with _reference_autocast_off(x):
        return reference.rms_norm(x, weight, float(eps), residual)  # (as the kernel: see _float_or_none)


def _float_or_none(scale):
    """A validated softmax_scale as a Python float, as the kernels' wrappers pass it: the checks accept any
    finite real (a Fraction, an int too big for int64, a NumPy scalar), which torch arithmetic may not."""
    return None if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Softmax attention for MHA, GQA and MQA in the (batch, seq, heads, head_dim) layout.

    Args:
        q: (B, S, H, D), float32/float16/bfloat16 (float64 too on the reference path), D in 1..256.
        k, v: (B, S, Hkv, D), q's dtype and device, H % Hkv == 0; query head h reads K/V head
            h // (H / Hkv), and K/V are never copied per query head on the Triton path.
        causal: query i attends keys j <= i only; False (default) attends every key.
        softmax_scale: > 0, D ** -0.5 when None.
    Returns:
        (B, S, H, D) in q's dtype; softmax in fp32 (float64 for float64 inputs); gradients flow to q, k and v.
    """
    if backend_for(q) == "triton":
        from kernels.attention import attention as attention_triton  # validates before launching
        return attention_triton(q, k, v, causal, softmax_scale)
    check_attention_args(q, k, v, causal, softmax_scale, dtypes=REFERENCE_DTYPES)
    with _reference_autocast_off(q):
        return reference.attention(q, k, v, causal, _float_or_none(softmax_scale))


def mla_attention(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
                  causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """The MLA attention core (DeepSeek-V2) with a RoPE key shared by all heads.

    Args:
        q: (B, S, H, Dn + Dr), float32/float16/bfloat16 (float64 too on the reference path).
        k_nope: (B, S, H, Dn); k_rope: (B, S, Dr), one key per token, never broadcast over heads on the
            Triton path; v: (B, S, H, Dv), Dv may differ from Dn + Dr. Dn, Dv in 1..256, Dr in 1..128.
        causal: query i attends keys j <= i only; False (default) attends every key.
        softmax_scale: > 0, (Dn + Dr) ** -0.5 when None.
    Returns:
        (B, S, H, Dv) in q's dtype, softmax(scale · (q_nope·k_nopeᵀ + q_rope·k_ropeᵀ)) v per head;
        gradients flow to q, k_nope, k_rope and v.
    """
    if backend_for(q) == "triton":
        from kernels.mla import mla_attention as mla_triton  # validates before launching
        return mla_triton(q, k_nope, k_rope, v, causal, softmax_scale)
    check_mla_args(q, k_nope, k_rope, v, causal, softmax_scale, dtypes=REFERENCE_DTYPES)
    with _reference_autocast_off(q):
        return reference.mla_attention(q, k_nope, k_rope, v, causal, _float_or_none(softmax_scale))


def latent_attention(q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, causal: bool = False,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """MLA's absorbed inference form, forward only: H query heads attend over one latent per token.

    Args:
        q: (B, S, H, R + Dr): W_ukᵀ q_nope (the query moved into the latent space), then q_rope.
        c: (B, S, R), the K/V latent, key and value at once; k_rope: (B, S, Dr), the shared rope key.
        causal, softmax_scale: as in mla_attention (pass the scale of the decompressed heads).
    Returns:
        (B, S, H, R) in q's dtype: softmax(scale · (q[..., :R]·cᵀ + q[..., R:]·k_ropeᵀ)) c per head.
    The Triton path (R <= 256) has no backward: call it under torch.no_grad(). Wider latents (DeepSeek-V2's
    R is 512) run the reference, which holds the (B, H, S, S) scores.
    """
    kernel_width = isinstance(c, torch.Tensor) and c.dim() == 3 and c.shape[-1] <= MAX_HEAD_DIM
    if kernel_width and backend_for(q) == "triton":  # a wider latent has no kernel: the reference, whatever the backend
        from kernels.mla import latent_attention as latent_triton  # validates before launching
        return latent_triton(q, c, k_rope, causal, softmax_scale)
    if not kernel_width:
        _backend_choice()  # a bad LWT_BACKEND is an error here too, as for every op
    check_latent_args(q, c, k_rope, causal, softmax_scale, dtypes=REFERENCE_DTYPES, max_latent=None)
    with _reference_autocast_off(q):
        return reference.latent_attention(q, c, k_rope, causal, _float_or_none(softmax_scale))


def frozen_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  recompute: bool = False, *, w_gate_scale: torch.Tensor | None = None,
                  w_up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU MLP with frozen gate/up projections: y = (silu(x W_gateᵀ) · (x W_upᵀ)) W_downᵀ.

    Args:
        x: (..., D), float32/float16/bfloat16 (float64 too on the reference path).
        w_gate, w_up: (F, D), frozen (must not require grad; no gradient is computed for them), any of
            those dtypes (the Triton path's gate/up GEMM casts them to x's dtype tile by tile; its
            backward's dx GEMMs take a transient (F, D) copy of each in x's dtype), or both float8_e4m3fn
            with w_gate_scale and w_up_scale.
        w_down: (D, F), x's dtype, trained.
        recompute: on the Triton path, True keeps only x for the backward (the gate/up GEMM runs again
            there); False (default) keeps the (tokens × F) gate and up outputs instead (not x). The
            reference path ignores it: autograd keeps its own (tokens × F) intermediates either way.
        w_gate_scale, w_up_scale: keyword-only, (F,) fp32, with float8_e4m3fn frozen weights only:
            W = w · scale[:, None] per output channel. x is then quantised to FP8 per token
            (kernels.reference.quantize_rows_fp8) and the gate/up GEMM runs on FP8 operands (the
            reference computes the same rounding in fp32); the gradient of x passes that rounding
            straight through. The Triton path also runs the dx GEMM on FP8 operands (dg and du scaled,
            then quantised per token per 128 features), a rounding the reference leaves out.
    Returns:
        y (..., D) in x's dtype; gradients flow to x and w_down.
    """
    if backend_for(x) == "triton":
        from kernels.swiglu import frozen_swiglu as swiglu_triton  # validates before launching
        return swiglu_triton(x, w_gate, w_up, w_down, recompute, w_gate_scale=w_gate_scale, w_up_scale=w_up_scale)
    check_swiglu_args(x, w_gate, w_up, w_down, recompute, w_gate_scale, w_up_scale, dtypes=REFERENCE_DTYPES)
    with _reference_autocast_off(x):
        return reference.frozen_swiglu(x, w_gate, w_up, w_down, recompute, w_gate_scale, w_up_scale)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         token_weight: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                         *, accum_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Cross entropy of the logits hidden @ weightᵀ (weight: e.g. the tied embedding) without ever holding
    all of them: the kernel walks the rows in chunks of a bounded logits slice, and rows whose target is
    ignore_index are dropped before any matmul.

    Args:
        hidden: (..., D), float32/float16/bfloat16 (float64 too on the reference path).
        weight: (V, D), hidden's dtype and device.
        target: (...) int64/int32 class indices in [0, V), or ignore_index (those rows get a zero gradient,
            and on the Triton path cost nothing). Any other value is a ValueError, not a wrong loss (on the
            reference path under torch.compile, where the up-front check would sync, and under
            torch.func.vmap, it is gather's RuntimeError instead; under FakeTensorMode or on meta there are
            no values, and nothing is checked).
        token_weight: optional (...) float tensor multiplying each row's loss (the 1/t of the
            mask-diffusion NELBO); it gets a gradient if it requires one.
        reduction: "mean": sum of the (weighted) row losses over the number of non-ignored rows (NaN if
            there are none, as F.cross_entropy); "sum"; "none": per-row losses, target's shape, 0 where
            ignored.
        ignore_index: target value marking rows to skip (-100 by default, as F.cross_entropy).
        accum_dtype: keyword-only; the dtype the weight gradient is summed in across row chunks.
            torch.float32 (default) holds a (V, D) fp32 buffer during the call; None sums in weight's
            dtype (no such buffer: one rounding per chunk, Liger-Kernel's default). Same thing for an
            fp32 weight, and when all rows fit one chunk.
    Returns:
        the loss in fp32 (float64 for float64 inputs), a scalar or target's shape. Gradients flow to
        hidden, weight and token_weight. The Triton path syncs with the host once in the forward (to count
        the kept rows and check the targets); with reduction "mean"/"sum" and fp32/bf16 inputs it computes
        the gradients during the forward (one matmul fewer) and the backward only scales them (fp16 and
        "none" compute them in the backward, where a loss scale reaches them before they are rounded, and
        count the kept rows again there).
    """
    if backend_for(hidden) == "triton":
        from kernels.cross_entropy import linear_cross_entropy as ce_triton  # validates before launching
        return ce_triton(hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype=accum_dtype)
    check_linear_cross_entropy_args(hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype,
                                    dtypes=REFERENCE_DTYPES)
    if _values_readable(target):  # the range check syncs with the host; where it cannot, gather's own check
        count_valid_targets(target, weight.shape[0], ignore_index)
    with _reference_autocast_off(hidden):
        return reference.linear_cross_entropy(hidden, weight, target, token_weight, reduction, ignore_index)


__all__ = ["rms_norm", "attention", "mla_attention", "latent_attention", "frozen_swiglu", "linear_cross_entropy",
           "backend_for", "KERNEL_DTYPES"]
