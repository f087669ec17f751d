"""nn.Modules over lwt.functional: parameters, projections, RoPE and the call into the op, nothing else."""
from __future__ import annotations

import math

import torch
from torch import nn

from kernels._checks import MAX_HEAD_DIM, check_eps

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


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_theta(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"{name}: expected a finite number > 1 (the RoPE frequency base), got {value!r}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al. 2021, arXiv:2104.09864) in the rotate-half layout of
    GPT-NeoX and LLaMA: dims i and i + head_dim/2 form a pair rotated by the angle pos · theta^(-2i/head_dim).

    Args:
        head_dim: even size of the last dim rotated.
        theta: the frequency base, 10000.0 by default.
        device: where the cos/sin cache starts.
    forward(q, k, offset=0):
        q, k: (B, S, heads, head_dim), any float dtype (their head counts may differ). Positions are
        offset .. offset + S - 1. Returns the rotated (q, k) in their dtypes; the rotation runs in fp32.
    The cos/sin table is computed in fp32 once and grown (doubled) when a longer sequence arrives; it is
    a non-persistent buffer, so it follows .to(device) and stays out of the state_dict.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, device=None):
        super().__init__()
        _positive_int(head_dim, "head_dim")
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs of dims), got {head_dim}")
        _check_theta(theta, "theta")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.register_buffer("_cos", torch.empty(0, head_dim // 2, device=device), persistent=False)
        self.register_buffer("_sin", torch.empty(0, head_dim // 2, device=device), persistent=False)

    def _table(self, length: int):
        if self._cos.shape[0] < length:
            n = max(length, 2 * self._cos.shape[0], 256)
            device = self._cos.device
            inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim)
            angles = torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (n, D/2)
            # Angles in float64, then one rounding: fp32 positions times frequencies lose bits at long S.
            self._cos = angles.cos().float()
            self._sin = angles.sin().float()
        return self._cos, self._sin

    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, S, heads, head_dim) rotated for positions offset .. offset + S - 1."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (batch, seq, heads, {self.head_dim}), got {shape}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
        S = x.shape[1]
        cos, sin = self._table(offset + S)
        cos = cos[offset:offset + S, None, :]  # (S, 1, D/2): broadcast over batch and heads
        sin = sin[offset:offset + S, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        return self.rotate(q, offset), self.rotate(k, offset)

    def extra_repr(self) -> str:
        return f"{self.head_dim}, theta={self.theta}"


class GQAAttention(nn.Module):
    """Multi-head attention with grouped K/V heads (GQA; MHA when n_kv_heads == n_heads, MQA at 1).

    Args:
        d_model: model width, the size of the input's last dim and of the output's.
        n_heads: query heads; n_kv_heads: K/V heads, dividing n_heads.
        head_dim: per-head size; d_model // n_heads when None (d_model must then divide evenly). Even
            (for RoPE) and at most 256.
        causal: mask future keys; False (the default, what the mask-diffusion objective uses) attends all.
        rope_theta: RoPE base frequency.
        bias: biases on the QKV and output projections.
        device, dtype: of the parameters.
    forward(x): x (B, S, d_model) -> (B, S, d_model). One fused QKV projection, RoPE on q and k, the
    attention kernel (K/V heads read by index), the output projection.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
                 causal: bool = False, rope_theta: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        _positive_int(d_model, "d_model")
        _positive_int(n_heads, "n_heads")
        _positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads: expected a divisor of d_model={d_model} when head_dim is None, "
                                 f"got {n_heads}; or pass head_dim")
            head_dim = d_model // n_heads
        _positive_int(head_dim, "head_dim")
        if head_dim % 2 or head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head_dim: expected an even number <= {MAX_HEAD_DIM} (RoPE pairs dims; the kernels "
                             f"hold a head in registers), got {head_dim}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal: expected a bool, got {causal!r}")
        if not isinstance(bias, bool):
            raise ValueError(f"bias: expected a bool, got {bias!r}")
        _check_theta(rope_theta, "rope_theta")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal = causal
        factory = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias, **factory)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)
        self.rope = RotaryEmbedding(head_dim, rope_theta, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (batch, seq, {self.d_model}), got {shape}")
        B, S, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)  # (B, S, (H + 2·Hkv)·D)
        q = qkv[..., :H * D].unflatten(-1, (H, D))  # (B, S, H, D), views of qkv
        k = qkv[..., H * D:(H + Hkv) * D].unflatten(-1, (Hkv, D))  # (B, S, Hkv, D)
        v = qkv[..., (H + Hkv) * D:].unflatten(-1, (Hkv, D))  # (B, S, Hkv, D): strided, read in place
        q, k = self.rope(q, k)
        o = F.attention(q, k, v, causal=self.causal)  # (B, S, H, D)
        return self.out(o.reshape(B, S, H * D))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}")
