"""nn.Modules over lwt.functional: parameters and the call into the op, nothing else."""
from __future__ import annotations

import torch
from torch import nn

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
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps: expected a real number >= 0, got {eps!r}")
        self.dim = dim
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return F.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
