"""nn.Modules over lwt.functional: parameters and the call into the op, nothing else."""
from __future__ import annotations

import torch
from torch import nn

from kernels._checks import check_eps

from . import functional as F


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale, like torch.nn.RMSNorm(dim, eps).

    Args:
        dim: size of the normalised (last) dim.
        eps: added to the mean square; 1e-6 by default.
        device, dtype: of the `weight` Parameter (initialised to ones).
    forward(x, residual=None):
        x: (..., dim). Returns y of x's shape and dtype; with `residual` (x's shape), returns (y, s) where
        s = x + residual is the new residual stream and y its normalisation (one fused kernel on CUDA).
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        check_eps(eps)
        self.dim = dim
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a last dim of {self.dim} (RMSNorm({self.dim})), got shape {tuple(x.shape)}")
        return F.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
