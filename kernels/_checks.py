"""Argument validation shared by every op, run before any kernel launch.

Kept free of Triton imports so `lwt.functional` can validate on machines where Triton is missing and
the reference path runs. Every failure is a `ValueError` that names the argument and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

# What the Triton kernels accept; the reference path also takes float64 (the tests' ground truth).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


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


def check_eps(eps) -> None:
    """eps: a finite real number >= 0 (a Python or NumPy scalar)."""
    ok = not isinstance(eps, bool) and isinstance(eps, numbers.Real)
    try:
        ok = ok and math.isfinite(float(eps)) and eps >= 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise ValueError(f"eps: expected a finite real number >= 0, got {eps!r}")
