"""Plain PyTorch references of every lwt op: the specification the kernels are tested against.

Readable over fast, no Triton. Math runs in at least fp32 (in float64 when given float64, which is how
the tests build their ground truth); outputs have the input's dtype. Gradients come from autograd.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs, the input's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, with the optional fused pre-norm residual add.

    Args:
        x: (..., N).
        weight: (N,).
        eps: added to the mean square before the reciprocal square root.
        residual: optional, shape and dtype of x.
    Returns:
        y = s * rsqrt(mean(s², -1) + eps) * weight with s = x, of x's shape and dtype; with a residual,
        (y, s) where s = x + residual, rounded to x's dtype, is what gets normalised.
    """
    c = _compute_dtype(x.dtype)
    s = x if residual is None else (x.to(c) + residual.to(c)).to(x.dtype)
    sc = s.to(c)
    rstd = torch.rsqrt(sc.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = (sc * rstd * weight.to(c)).to(x.dtype)
    return y if residual is None else (y, s)
