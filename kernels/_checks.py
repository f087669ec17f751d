"""Argument validation shared by every op, run before any kernel launch.

Kept free of Triton imports so `lwt.functional` can validate on machines where Triton is missing and
the reference path runs. Every failure is a `ValueError` that names the argument and what was expected.
"""
from __future__ import annotations

import numbers

import torch

# What the Triton kernels accept; the reference path also takes float64 (the tests' ground truth).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available(device_type), which Dynamo before torch 2.13 cannot trace (torch
    2.11: "Attempted to call function marked as skipped", a graph break, an error under fullgraph=True).
    Marked a constant: while tracing Dynamo calls it once and keeps the result (the device is guarded)."""
    return torch.amp.is_autocast_available(device_type)


# The mark torch.compiler.assume_constant_result sets, set without calling it: the decorator imports
# torch._dynamo, ~2.5 s of a 2-core CPU's time at `import lwt`, for processes that never compile. It only sets
# this attribute (torch/_dynamo/decorators.py, which marks torch's own justknobs_check the same way);
# tests/test_compile.py checks that it still does, and that Dynamo then takes the result as a constant.
autocast_available._dynamo_marked_constant = True


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def check_tensor(t, name: str, *, dtypes=KERNEL_DTYPES, min_ndim: int = 0, ndim: int | None = None) -> None:
    """Raise ValueError unless `t` is a tensor of one of `dtypes` with the required rank."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_same_device(t, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_rms_norm_args(x, weight, residual, eps, *, dtypes=KERNEL_DTYPES) -> None:
    """The contract of `rms_norm(x, weight, eps, residual)`; see kernels/rmsnorm.py."""
    check_tensor(x, "x", dtypes=dtypes, min_ndim=1)
    n = x.shape[-1]
    if n < 1:
        raise ValueError(f"x: expected a last (hidden) dim of at least 1, got shape {tuple(x.shape)}")
    if weight is not None:  # None: no scale
        check_tensor(weight, "weight", dtypes=dtypes)
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight: expected shape ({n},) (the last dim of x), got {tuple(weight.shape)}")
        check_same_device(weight, "weight", x, "x")
    if residual is not None:
        check_tensor(residual, "residual", dtypes=dtypes)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual: expected the dtype of x ({x.dtype}), got {residual.dtype}")
        check_same_device(residual, "residual", x, "x")
    check_eps(eps)


def _is_finite_real(x) -> bool:
    """A Python or NumPy real scalar (not a bool) with a finite float value."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        value = float(x)
    except OverflowError:  # an int too large for a float
        return False
    # value - value is 0 for a finite value, NaN for inf and NaN. Not math.isfinite: under
    # torch.compile(dynamic=True) a float argument or module attribute (eps, softmax_scale) is a SymFloat,
    # which math.isfinite cannot take (a graph break, an error under fullgraph=True).
    return value - value == 0


def check_eps(eps) -> None:
    """eps: a finite real number >= 0."""
    if not (_is_finite_real(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite real number >= 0, got {eps!r}")


def _check_companion(t, name: str, q, dtypes, ndim: int) -> None:
    """t: a tensor of `ndim` dims with q's dtype and device."""
    check_tensor(t, name, dtypes=dtypes, ndim=ndim)
    if t.dtype != q.dtype:
        raise ValueError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
    check_same_device(t, name, q, "q")


# Largest attention head dim: the kernels keep a (BLOCK, D) fp32 accumulator per program in registers.
MAX_HEAD_DIM = 256


def check_attention_args(q, k, v, causal, softmax_scale, *, dtypes=KERNEL_DTYPES) -> None:
    """The contract of `attention(q, k, v, causal, softmax_scale)`; see kernels/attention.py."""
    check_tensor(q, "q", dtypes=dtypes, ndim=4)
    B, S, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        _check_companion(t, name, q, dtypes, 4)
        Hkv = t.shape[2]
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, S, D) or Hkv < 1:
            raise ValueError(f"{name}: expected shape ({B}, {S}, Hkv, {D}) (batch, seq, K/V heads >= 1, head dim "
                             f"of q {tuple(q.shape)}), got {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"k: expected a number of heads dividing the {H} query heads of q, got {k.shape[2]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim (last dim) in 1..{MAX_HEAD_DIM}, got shape {tuple(q.shape)}")
    _check_causal_and_scale(causal, softmax_scale)


def _check_causal_and_scale(causal, softmax_scale) -> None:
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    if softmax_scale is not None and not (_is_finite_real(softmax_scale)
                                          and _FP32_TINY <= softmax_scale * _LOG2E <= _FP32_MAX):
        raise ValueError(f"softmax_scale: expected None or a real number > 0 that stays a normal fp32 number "
                         f"times log2(e) (about {_FP32_TINY / _LOG2E:.1e} to {_FP32_MAX / _LOG2E:.1e}: the kernels "
                         f"scale scores by it in fp32), got {softmax_scale!r}")


# The kernels multiply scores by softmax_scale · log2(e) in fp32 (exp2-based softmax): a scale that
# rounds to 0 (or a denormal, which GPUs may flush to 0) would turn masked -inf scores into NaN, one that
# overflows would turn every score into ±inf.
_LOG2E = 1.4426950408889634
_FP32_TINY, _FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


# Largest MLA rope dim: its q and k tiles sit in registers beside the Dn-wide ones.
MAX_ROPE_DIM = 128


def check_mla_args(q, k_nope, k_rope, v, causal, softmax_scale, *, dtypes=KERNEL_DTYPES) -> None:
    """The contract of `mla_attention(q, k_nope, k_rope, v, causal, softmax_scale)`; see kernels/mla.py."""
    check_tensor(q, "q", dtypes=dtypes, ndim=4)
    B, S, H, dq = q.shape
    for name, t, ndim in (("k_nope", k_nope, 4), ("k_rope", k_rope, 3), ("v", v, 4)):
        _check_companion(t, name, q, dtypes, ndim)
    if tuple(k_nope.shape[:3]) != (B, S, H):
        raise ValueError(f"k_nope: expected shape ({B}, {S}, {H}, Dn) (batch, seq, heads of q {tuple(q.shape)}), "
                         f"got {tuple(k_nope.shape)}")
    if tuple(k_rope.shape[:2]) != (B, S):
        raise ValueError(f"k_rope: expected shape ({B}, {S}, Dr) (one rope key per token, shared by the heads), "
                         f"got {tuple(k_rope.shape)}")
    if tuple(v.shape[:3]) != (B, S, H):
        raise ValueError(f"v: expected shape ({B}, {S}, {H}, Dv) (batch, seq, heads of q), got {tuple(v.shape)}")
    dn, dr, dv = k_nope.shape[3], k_rope.shape[2], v.shape[3]
    if not 1 <= dn <= MAX_HEAD_DIM:
        raise ValueError(f"k_nope: expected a head dim (Dn, last dim) in 1..{MAX_HEAD_DIM}, got shape {tuple(k_nope.shape)}")
    if not 1 <= dr <= MAX_ROPE_DIM:
        raise ValueError(f"k_rope: expected a rope dim (Dr, last dim) in 1..{MAX_ROPE_DIM}, got shape {tuple(k_rope.shape)}")
    if not 1 <= dv <= MAX_HEAD_DIM:
        raise ValueError(f"v: expected a head dim (Dv, last dim) in 1..{MAX_HEAD_DIM}, got shape {tuple(v.shape)}")
    if dq != dn + dr:
        raise ValueError(f"q: expected a last dim of Dn + Dr = {dn} + {dr} = {dn + dr} (k_nope's and k_rope's), "
                         f"got shape {tuple(q.shape)}")
    _check_causal_and_scale(causal, softmax_scale)


def check_latent_args(q, c, k_rope, causal, softmax_scale, *, dtypes=KERNEL_DTYPES, max_latent=MAX_HEAD_DIM) -> None:
    """The contract of `latent_attention(q, c, k_rope, causal, softmax_scale)`; see kernels/mla.py.
    max_latent: the widest latent accepted (None: any, the reference path)."""
    check_tensor(q, "q", dtypes=dtypes, ndim=4)
    B, S, H, dq = q.shape
    for name, t in (("c", c), ("k_rope", k_rope)):
        _check_companion(t, name, q, dtypes, 3)
        if tuple(t.shape[:2]) != (B, S):
            raise ValueError(f"{name}: expected shape ({B}, {S}, ·) (batch and seq of q), got {tuple(t.shape)}")
    r, dr = c.shape[2], k_rope.shape[2]
    if r < 1 or (max_latent is not None and r > max_latent):
        raise ValueError(f"c: expected a latent size in 1..{max_latent or 'any'}, got shape {tuple(c.shape)}")
    if not 1 <= dr <= MAX_ROPE_DIM:
        raise ValueError(f"k_rope: expected a rope dim in 1..{MAX_ROPE_DIM}, got shape {tuple(k_rope.shape)}")
    if dq != r + dr:
        raise ValueError(f"q: expected a last dim of R + Dr = {r} + {dr} = {r + dr}, got shape {tuple(q.shape)}")
    _check_causal_and_scale(causal, softmax_scale)


def check_swiglu_args(x, w_gate, w_up, w_down, recompute=False, w_gate_scale=None, w_up_scale=None, *,
                      dtypes=KERNEL_DTYPES) -> None:
    """The contract of `frozen_swiglu(x, w_gate, w_up, w_down, recompute, w_gate_scale=, w_up_scale=)`; see
    kernels/swiglu.py. Frozen weights may also be float8_e4m3fn, each with an (F,) fp32 scale."""
    check_tensor(x, "x", dtypes=dtypes, min_ndim=1)
    D = x.shape[-1]
    if D < 1:
        raise ValueError(f"x: expected a last (model) dim of at least 1, got shape {tuple(x.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        check_tensor(w, name, dtypes=dtypes + (torch.float8_e4m3fn,), ndim=2)
        check_same_device(w, name, x, "x")
        if w.requires_grad:
            raise ValueError(f"{name}: expected a frozen tensor (requires_grad=False): no gradient is computed "
                             f"for the gate/up projections; detach it or register it as a buffer")
    F = w_gate.shape[0]
    if F < 1 or tuple(w_gate.shape) != (F, D):
        raise ValueError(f"w_gate: expected shape (F, {D}) with F >= 1 (D: the last dim of x), got {tuple(w_gate.shape)}")
    if tuple(w_up.shape) != (F, D):
        raise ValueError(f"w_up: expected shape ({F}, {D}) (that of w_gate), got {tuple(w_up.shape)}")
    check_tensor(w_down, "w_down", dtypes=dtypes, ndim=2)
    check_same_device(w_down, "w_down", x, "x")
    if tuple(w_down.shape) != (D, F):
        raise ValueError(f"w_down: expected shape ({D}, {F}) (model dim, d_ff), got {tuple(w_down.shape)}")
    if w_down.dtype != x.dtype:
        raise ValueError(f"w_down: expected the dtype of x ({x.dtype}), got {w_down.dtype}")
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute: expected a bool, got {recompute!r}")
    fp8 = w_gate.dtype == torch.float8_e4m3fn
    if (w_up.dtype == torch.float8_e4m3fn) != fp8:
        raise ValueError(f"w_up: expected float8_e4m3fn exactly when w_gate is, got {w_up.dtype} beside {w_gate.dtype}")
    for name, scale in (("w_gate_scale", w_gate_scale), ("w_up_scale", w_up_scale)):
        if not fp8:
            if scale is not None:
                raise ValueError(f"{name}: expected None: scales go with float8_e4m3fn frozen weights, "
                                 f"and w_gate is {w_gate.dtype}")
            continue
        if scale is None:
            raise ValueError(f"{name}: expected an ({F},) float32 tensor of per-output-channel scales with "
                             f"float8_e4m3fn frozen weights, got None")
        check_tensor(scale, name, dtypes=(torch.float32,), ndim=1)
        check_same_device(scale, name, x, "x")
        if tuple(scale.shape) != (F,):
            raise ValueError(f"{name}: expected shape ({F},) (one scale per row of the weight), got "
                             f"{tuple(scale.shape)}")
        if scale.requires_grad:
            raise ValueError(f"{name}: expected a frozen tensor (requires_grad=False), like the weight it scales")


REDUCTIONS = ("mean", "sum", "none")
ACCUM_DTYPES = (torch.float32, None)


def check_linear_cross_entropy_args(hidden, weight, target, token_weight, reduction, ignore_index,
                                    accum_dtype=torch.float32, *, dtypes=KERNEL_DTYPES) -> None:
    """The contract of `linear_cross_entropy(hidden, weight, target, token_weight, reduction, ignore_index)`
    (shapes, dtypes, devices; the target values are checked by `count_valid_targets`)."""
    check_tensor(hidden, "hidden", dtypes=dtypes, min_ndim=1)
    D = hidden.shape[-1]
    if D < 1:
        raise ValueError(f"hidden: expected a last (model) dim of at least 1, got shape {tuple(hidden.shape)}")
    check_tensor(weight, "weight", dtypes=dtypes, ndim=2)
    if weight.shape[0] < 1 or weight.shape[1] != D:
        raise ValueError(f"weight: expected shape (V, {D}) with V >= 1 classes (D: the last dim of hidden), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: expected the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    check_same_device(weight, "weight", hidden, "hidden")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target: expected an int64 or int32 tensor of class indices, got {got}")
    if target.layout != torch.strided:
        raise ValueError(f"target: expected a dense (strided) tensor, got layout {target.layout}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(hidden.shape[:-1])} (the leading dims of hidden), "
                         f"got {tuple(target.shape)}")
    check_same_device(target, "target", hidden, "hidden")
    if token_weight is not None:
        check_tensor(token_weight, "token_weight", dtypes=REFERENCE_DTYPES)
        if token_weight.shape != target.shape:
            raise ValueError(f"token_weight: expected the shape of target {tuple(target.shape)}, "
                             f"got {tuple(token_weight.shape)}")
        check_same_device(token_weight, "token_weight", hidden, "hidden")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:  # compared in target's dtype, it would wrap
        raise ValueError(f"ignore_index: expected an int that a {target.dtype} target can hold "
                         f"({info.min}..{info.max}), got {ignore_index}")
    if accum_dtype not in ACCUM_DTYPES:
        raise ValueError(f"accum_dtype: expected torch.float32 or None (the weight's dtype), got {accum_dtype!r}")


def count_valid_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> int:
    """Number of targets that are not ignore_index; ValueError if any other target is outside
    [0, num_classes). One host synchronisation (both facts come back in one transfer)."""
    ignored = target == ignore_index
    bad = ((target < 0) | (target >= num_classes)) & ~ignored
    n_valid, n_bad = torch.stack([(~ignored).sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(bad.flatten().nonzero()[0, 0])
        raise ValueError(f"target: expected class indices in [0, {num_classes}) or ignore_index ({ignore_index}), "
                         f"got {int(target.flatten()[first])} at flat position {first} ({n_bad} such targets)")
    return int(n_valid)
