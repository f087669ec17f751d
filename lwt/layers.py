"""nn.Modules over lwt.functional: parameters, projections, RoPE and the call into the op, nothing else."""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.utils import _python_dispatch

from kernels._checks import KERNEL_DTYPES, MAX_HEAD_DIM, MAX_ROPE_DIM, autocast_available, check_eps
from kernels.reference import quantize_rows_fp8

from . import functional as F
from .config import ATTN_TYPES, mla_head_dims


def _float_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """module.<name> where it is a floating-point tensor of 16 bits or more, else None: a sub-module swapped
    for another kind (a LoRA wrapper without a `weight`, quantize_dynamic's Linear whose `weight` is a
    method, an int8 or FP8 weight-only Linear, a user's own MLP without `w_down`) is left to take what it
    takes."""
    t = getattr(module, name, None)
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() and t.element_size() > 1 else None


def _unfoldable_linear(module: nn.Module) -> str | None:
    """Why module(x) may differ from x @ module.weightᵀ (what folding its weight into another product
    assumes), or None when it cannot: a bias-free nn.Linear, nn.Linear's own forward (a parametrized one's
    too: its weight is the parametrization's output), no forward hooks of its own, a floating-point
    weight of 16 bits or more. A wrapper that exposes its base layer's weight (a LoRA adapter, as peft's
    do) computes more than that weight's product, and is refused like any other module."""
    if not isinstance(module, nn.Linear):
        return "is not an nn.Linear (a wrapper's forward, a LoRA adapter's say, may add to its weight's product)"
    if type(module).forward is not nn.Linear.forward:
        return "overrides nn.Linear's forward"
    if module.bias is not None:
        return "has a bias"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks, which the fold would skip"
    if _float_tensor(module, "weight") is None:
        return "has no floating-point weight of 16 bits or more"
    return None


def _check_x(x, d_model: int, weight: torch.Tensor | None) -> None:
    """An attention layer's input: (B, S, d_model) in its projections' dtype (that of `weight`, the first
    projection's; None: not known, not checked), unless autocast runs them (then any floating dtype:
    autocast casts it). ValueError naming x otherwise, rather than nn.Linear's RuntimeError ("expected m1
    and m2 to have the same dtype")."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected (batch, seq, {d_model}), got {shape}")
    if weight is None:
        return
    if x.dtype != weight.dtype and not (autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x: expected the parameters' dtype ({weight.dtype}), got {x.dtype}; cast the input or the "
                         f"layer (.to(dtype)), or run it under torch.autocast")


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, a drop-in for torch.nn.RMSNorm (same constructor, `weight` key and math)
    that also takes the fused pre-norm residual add.

    Args:
        normalized_shape: size of the normalised (last) dim: an int, or a 1-tuple/list/torch.Size as
            torch.nn.RMSNorm takes (only the last dim can be normalised: one row per kernel program).
            `dim=` is accepted as a keyword alias (the older spelling).
        eps: added to the mean square. 1e-6 by default (unlike torch.nn.RMSNorm, whose default is None,
            kept so that existing `RMSNorm(dim)` calls do not change); None means torch's default, the
            machine epsilon of the fp32 (float64 for float64 inputs) compute type, read at each call.
        elementwise_affine: a learned per-element scale `weight` (initialised to ones); False: no weight
            (no Parameter, no state_dict entry), y = x · rsqrt(mean(x²) + eps).
        device, dtype: of the `weight` Parameter.
    forward(x, residual=None):
        x: (..., dim). Returns y of x's shape and dtype; with `residual` (x's shape), returns (y, s) where
        s = x + residual is the new residual stream and y its normalisation (one fused kernel on CUDA).
    """

    def __init__(self, normalized_shape=None, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None, *, dim=None):
        super().__init__()
        name = "normalized_shape"
        if dim is not None:
            if normalized_shape is not None:
                raise ValueError(f"dim: expected either normalized_shape or dim (the same thing), got both: "
                                 f"{normalized_shape!r}, {dim!r}")
            name, normalized_shape = "dim", dim
        n = normalized_shape
        if isinstance(n, (tuple, list, torch.Size)) and len(n) == 1:
            n = n[0]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {normalized_shape!r} (a tuple must hold "
                             f"one: only the last dim is normalised)")
        if eps is not None:
            check_eps(eps)
        if not isinstance(elementwise_affine, bool):
            raise ValueError(f"elementwise_affine: expected a bool, got {elementwise_affine!r}")
        self.dim = int(n)
        self.normalized_shape = (self.dim,)
        self.eps = None if eps is None else float(eps)
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the weight (if any) to ones, as torch.nn.RMSNorm does."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Args:
            x: (..., dim), float32/float16/bfloat16 (float64 on the reference path).
            residual: optional, x's shape, dtype and device.
        Returns:
            y (..., dim) in x's dtype; with a residual, (y, s) where s = x + residual is what was normalised.
        """
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.dim:
            raise ValueError(f"x: expected a last dim of {self.dim} (RMSNorm({self.dim})), got shape {tuple(x.shape)}")
        eps = self.eps
        if eps is None:
            # torch.nn.RMSNorm's eps=None: the epsilon of the dtype the statistics are computed in (fp32 for
            # 16-bit and fp32 inputs, float64 for float64), not of x's own dtype.
            dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float32
            eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
        return F.rms_norm(x, self.weight, eps, residual)

    def extra_repr(self) -> str:
        affine = "" if self.elementwise_affine else ", elementwise_affine=False"
        return f"{self.dim}, eps={self.eps}{affine}"


def _is_int(value) -> bool:
    """An integer as torch.nn's constructors take one: Python's or NumPy's (numbers.Integral), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value, name: str) -> int:
    """value as a Python int; ValueError naming it unless it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _check_theta(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 1:
        raise ValueError(f"{name}: expected a finite number > 1 (the RoPE frequency base), got {value!r}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al. 2021, arXiv:2104.09864) in the rotate-half layout of
    GPT-NeoX and LLaMA: dims i and i + head_dim/2 form a pair rotated by the angle pos · theta^(-2i/head_dim).

    Args:
        head_dim: even size of the last dim rotated.
        theta: the frequency base, 10000.0 by default; the `theta` attribute may be set later (the cos/sin
            cache is then rebuilt from it).
        device: where the cos/sin cache starts.
    forward(q, k, offset=0):
        q, k: (B, S, heads, head_dim), any float dtype (their head counts may differ). Positions are
        offset .. offset + S - 1. Returns the rotated (q, k) in their dtypes; the rotation runs in fp32
        (float64 for float64 inputs).
    The cos/sin table is computed in fp32 once and grown (doubled) when a longer sequence arrives. It is
    a plain attribute, not a buffer: its shape follows the longest sequence seen, so it stays out of the
    state_dict and out of buffers(), which tools zip across copies or ranks expecting equal shapes
    (AveragedModel(use_buffers=True), DDP's broadcast_buffers). .to()/.cuda()/to_empty() empty it on the
    new device; it is rebuilt there at the next call.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, device=None):
        super().__init__()
        head_dim = _positive_int(head_dim, "head_dim")
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (RoPE rotates pairs of dims), got {head_dim}")
        self.head_dim = head_dim
        self._cos = torch.empty(0, head_dim // 2, device=device)  # plain attributes (see the class docstring)
        self._sin = torch.empty(0, head_dim // 2, device=device)
        self.theta = theta

    @property
    def theta(self) -> float:
        """The frequency base. Setting it (to extend the context, say) checks it and empties the cos/sin
        cache, which is rebuilt from the new base at the next call."""
        return self._theta

    @theta.setter
    def theta(self, value) -> None:
        _check_theta(value, "theta")
        self._theta = float(value)
        device = self._cos.device  # (new empty tensors: an empty view would keep the old table's storage)
        self._cos = torch.empty(0, self.head_dim // 2, device=device)
        self._sin = torch.empty(0, self.head_dim // 2, device=device)

    def __setstate__(self, state) -> None:
        """A module pickled before theta became a property (its value then in the instance's dict)."""
        if "theta" in state:
            state["_theta"] = state.pop("theta")
        super().__setstate__(state)

    def _apply(self, fn, recurse: bool = True):
        """Module.to/.cuda()/.half()/to_empty()/... go through here: the cos/sin cache (a plain attribute,
        which Module's own conversions leave alone) is emptied on the target device and rebuilt at the next
        call, in fp32. It is never converted: a meta one (a module built on meta) cannot be copied out;
        _table rebuilds it on the input's device anyway."""
        super()._apply(fn, recurse)
        device = self._cos.device
        try:
            device = fn(torch.empty(0, device=device)).device
        except NotImplementedError:  # meta -> a real device through .to(): nothing to copy
            pass
        self._cos = torch.empty(0, self.head_dim // 2, device=device)
        self._sin = torch.empty(0, self.head_dim // 2, device=device)
        return self

    def _angles(self, n: int, device) -> torch.Tensor:
        """(n, head_dim/2) float64 angles pos · theta^(-2i/head_dim): fp32 products lose bits at long S."""
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim)
        return torch.arange(n, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]

    def _table(self, length: int, device: torch.device):
        """The fp32 cos/sin table on `device`, covering at least `length` positions. Rebuilt when too short,
        on another device (a module built on meta and loaded with load_state_dict(assign=True) keeps its
        cache there), and when something replaced it with a table that is not fp32 or an inference tensor
        (built under torch.inference_mode, which training could not use)."""
        cos = self._cos
        if (cos.shape[0] < length or cos.dtype != torch.float32 or cos.is_inference()
                or cos.device != device):
            n = max(length, 2 * cos.shape[0], 256)
            with torch.inference_mode(False):
                angles = self._angles(n, device)
                self._cos, self._sin = angles.cos().float(), angles.sin().float()
        return self._cos, self._sin

    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate one tensor.

        Args:
            x: (B, S, heads, head_dim), any float dtype.
            offset: int >= 0, the position of x[:, 0].
        Returns:
            x rotated for positions offset .. offset + S - 1, in x's dtype. The rotation runs in fp32
            (float64 for float64 x, with a table computed for the call).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (batch, seq, heads, {self.head_dim}), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        if not _is_int(offset) or offset < 0:
            raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
        offset = int(offset)
        S = x.shape[1]
        if x.dtype == torch.float64:
            angles = self._angles(offset + S, x.device)[offset:]
            cos, sin = angles.cos(), angles.sin()
        elif (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
              or torch._C._len_torch_dispatch_stack()):
            # Under torch.compile the table is computed for exactly these positions, not read from the
            # cache: the cache check needs Tensor.is_inference(), which Dynamo cannot trace (a graph
            # break), and growing the cache would mutate module state inside the graph (a side effect
            # that retraces whenever the length changes). The values are the cached ones (float64
            # angles rounded to fp32), and the compiler fuses the (S, head_dim/2) cos/sin into the rotation.
            # Inside a torch.func transform (grad, jvp, jacrev, vmap, ...) likewise: a table built there is
            # a functorch wrapper of the transform's level, and kept in the cache it would outlive it
            # (copy.deepcopy, pickle and torch.save of the module then fail: "Cannot access storage of
            # TensorWrapper"). Under a dispatch mode (FakeTensorMode: a table built there is fake, and kept it
            # would make every later eager output a FakeTensor) likewise.
            angles = self._angles(offset + S, x.device)[offset:]
            cos, sin = angles.cos().float(), angles.sin().float()
        else:
            cos, sin = self._table(offset + S, x.device)
            cos, sin = cos[offset:offset + S], sin[offset:offset + S]
        cos, sin = cos[:, None, :], sin[:, None, :]  # (S, 1, D/2): broadcast over batch and heads
        x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        """Args:
            q, k: (B, S, heads, head_dim), any float dtype; their head counts may differ.
            offset: int >= 0, the position of the first token.
        Returns:
            (q, k) rotated (see rotate), each in its own dtype.
        """
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
    attention kernel (K/V heads read by index), the output projection. There is no attention or padding
    mask: every query sees every key (or every earlier one, causal), so batch equal-length sequences.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None = None,
                 causal: bool = False, rope_theta: float = 10000.0, bias: bool = False, device=None, dtype=None):
        super().__init__()
        d_model, n_heads = _positive_int(d_model, "d_model"), _positive_int(n_heads, "n_heads")
        n_kv_heads = _positive_int(n_kv_heads, "n_kv_heads")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads: expected a divisor of d_model={d_model} when head_dim is None, "
                                 f"got {n_heads}; or pass head_dim")
            head_dim = d_model // n_heads
        head_dim = _positive_int(head_dim, "head_dim")
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

    @classmethod
    def from_config(cls, model_cfg, device=None, dtype=None) -> "GQAAttention":
        """The attention layer of the model described by `model_cfg` (lwt.config.ModelConfig), as
        DecoderBlock.from_config builds it: attn_type "gqa" or "standard" (MHA), n_kv_heads None meaning
        n_heads, head_dim d_model // n_heads, and the config's causal and rope_theta.

        Args:
            model_cfg: an lwt.config.ModelConfig with attn_type "gqa" or "standard".
            device, dtype: of the parameters.
        Returns:
            a GQAAttention. ValueError if the config describes MLA or an invalid head layout.
        """
        c = model_cfg
        if c.attn_type not in ("gqa", "standard"):
            raise ValueError(f"attn_type: GQAAttention.from_config expects 'gqa' or 'standard', got "
                             f"{c.attn_type!r}; use MLAAttention.from_config for 'mla'")
        return cls(c.d_model, c.n_heads, _kv_heads(c.attn_type, c.n_heads, c.n_kv_heads), causal=c.causal,
                   rope_theta=c.rope_theta, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, S, d_model), the parameters' dtype (any floating dtype under torch.autocast).
        Returns:
            (B, S, d_model) in x's dtype; under torch.autocast in the output projection's (autocast's).
        """
        _check_x(x, self.d_model, _float_tensor(self.qkv, "weight"))
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


class MLAAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 §2.1): queries and keys/values go
    through low-rank latents, and the RoPE part of every key is one vector per token shared by the heads.

    Args:
        d_model: model width.
        n_heads: attention heads.
        q_rank: rank of the query latent (q = W_uq · RMSNorm(W_dq · x)); 0 for a plain W_q.
        kv_rank: size of the K/V latent c = RMSNorm(W_dkv · x), from which [k_nope, v] = W_ukv · c.
        nope_dim, rope_dim, v_dim: per-head sizes of the position-free q/k part, of the RoPE part and
            of v (DeepSeek-V2: 128, 64, 128). rope_dim even and at most 128; nope_dim and v_dim at most 256
            (the MLA kernel's limits).
        causal, rope_theta: as in GQAAttention.
        norm_eps: eps of the two latent RMSNorms (q_norm, kv_norm).
        device, dtype: of the parameters.
    forward(x, absorb=False): x (B, S, d_model) -> (B, S, d_model). No attention or padding mask, as in
    GQAAttention.
        absorb=False (training): decompress the latent to per-head k_nope and v and run the MLA kernel.
        absorb=True (inference: runs under no_grad, the result carries no gradient; refused with a
            ValueError while the layer trains: train() mode, grad enabled, x or parameters requiring grad):
            never decompress K/V. W_uk is folded into the query (q_nope·k_nope = (W_ukᵀ q_nope)·c) and
            W_uv applied after attending over the latent, so every head attends over the same (c, k_rope)
            per token, MQA-style. The Triton kernel takes latents of up to 256; a wider kv_rank
            (DeepSeek-V2's 512) runs the PyTorch reference, which holds the (B, H, S, S) scores. The fold
            needs kv_up to be a bias-free nn.Linear without forward hooks (a LoRA adapter on it is refused
            by name: folding its base weight would drop the adapter's delta).
    Config keys mla_rq and mla_rkv (config.yaml) are q_rank and kv_rank.
    """

    def __init__(self, d_model: int, n_heads: int, q_rank: int, kv_rank: int, nope_dim: int, rope_dim: int,
                 v_dim: int, causal: bool = False, rope_theta: float = 10000.0, norm_eps: float = 1e-6,
                 device=None, dtype=None):
        super().__init__()
        d_model, n_heads, kv_rank, nope_dim, rope_dim, v_dim = (
            _positive_int(value, name) for name, value in (("d_model", d_model), ("n_heads", n_heads),
                                                          ("kv_rank", kv_rank), ("nope_dim", nope_dim),
                                                          ("rope_dim", rope_dim), ("v_dim", v_dim)))
        if not _is_int(q_rank) or q_rank < 0:
            raise ValueError(f"q_rank: expected an int >= 0 (0: no query latent), got {q_rank!r}")
        q_rank = int(q_rank)
        if nope_dim > MAX_HEAD_DIM or v_dim > MAX_HEAD_DIM:
            raise ValueError(f"nope_dim, v_dim: expected at most {MAX_HEAD_DIM}, got {nope_dim}, {v_dim}")
        if rope_dim % 2 or rope_dim > MAX_ROPE_DIM:
            raise ValueError(f"rope_dim: expected an even number <= {MAX_ROPE_DIM}, got {rope_dim}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal: expected a bool, got {causal!r}")
        _check_theta(rope_theta, "rope_theta")
        self.d_model, self.n_heads, self.q_rank, self.kv_rank = d_model, n_heads, q_rank, kv_rank
        self.nope_dim, self.rope_dim, self.v_dim, self.causal = nope_dim, rope_dim, v_dim, causal
        factory = dict(device=device, dtype=dtype)
        qk_dim = nope_dim + rope_dim
        if q_rank:
            self.q_down = nn.Linear(d_model, q_rank, bias=False, **factory)
            self.q_norm = RMSNorm(q_rank, norm_eps, **factory)
            self.q_up = nn.Linear(q_rank, n_heads * qk_dim, bias=False, **factory)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=False, **factory)
        # W_dkv and W_kr as one projection: the latent, then the shared rope key (as DeepSeek-V2 stores them).
        self.kv_down = nn.Linear(d_model, kv_rank + rope_dim, bias=False, **factory)
        self.kv_norm = RMSNorm(kv_rank, norm_eps, **factory)
        self.kv_up = nn.Linear(kv_rank, n_heads * (nope_dim + v_dim), bias=False, **factory)
        self.out = nn.Linear(n_heads * v_dim, d_model, bias=False, **factory)
        self.rope = RotaryEmbedding(rope_dim, rope_theta, device=device)

    @classmethod
    def from_config(cls, model_cfg, device=None, dtype=None) -> "MLAAttention":
        """The attention layer of the MLA model described by `model_cfg` (lwt.config.ModelConfig), as
        DecoderBlock.from_config builds it: q_rank = mla_rq, kv_rank = mla_rkv, and per-head sizes
        mla_nope_dim, mla_rope_dim, mla_v_dim, where None means d_model // n_heads, half of it, and
        d_model // n_heads.

        Args:
            model_cfg: an lwt.config.ModelConfig with attn_type "mla".
            device, dtype: of the parameters.
        Returns:
            an MLAAttention. ValueError if the config is not MLA or its sizes are invalid.
        """
        c = model_cfg
        if c.attn_type != "mla":
            raise ValueError(f"attn_type: MLAAttention.from_config expects 'mla', got {c.attn_type!r}; use "
                             f"GQAAttention.from_config for 'gqa' or 'standard'")
        nope_dim, rope_dim, v_dim = _mla_head_dims(c.d_model, c.n_heads, c.mla_nope_dim, c.mla_rope_dim, c.mla_v_dim)
        return cls(c.d_model, c.n_heads, q_rank=c.mla_rq, kv_rank=c.mla_rkv, nope_dim=nope_dim, rope_dim=rope_dim,
                   v_dim=v_dim, causal=c.causal, rope_theta=c.rope_theta, norm_eps=c.norm_eps, device=device,
                   dtype=dtype)

    def _queries_and_latent(self, x):
        B, S, _ = x.shape
        H, dn, dr = self.n_heads, self.nope_dim, self.rope_dim
        q = self.q_up(self.q_norm(self.q_down(x))) if self.q_rank else self.q_proj(x)
        q = q.view(B, S, H, dn + dr)
        down = self.kv_down(x)  # (B, S, kv_rank + dr)
        c = self.kv_norm(down[..., :self.kv_rank])  # (B, S, kv_rank)
        q_rope, k_rope = self.rope(q[..., dn:], down[..., None, self.kv_rank:])  # (B, S, H, dr), (B, S, 1, dr)
        return q[..., :dn], q_rope, c, k_rope[:, :, 0]

    def forward(self, x: torch.Tensor, absorb: bool = False) -> torch.Tensor:
        """Args:
            x: (B, S, d_model), the parameters' dtype (any floating dtype under torch.autocast).
            absorb: False (training) decompresses K/V per head; True (inference, no gradient; in eval()
                mode or under torch.no_grad()) attends over the latent directly (see the class docstring).
        Returns:
            (B, S, d_model) in x's dtype; under torch.autocast in the output projection's (autocast's).
        """
        _check_x(x, self.d_model, _float_tensor(self.kv_down, "weight"))
        if not isinstance(absorb, bool):  # (a string such as "False" would be true)
            raise ValueError(f"absorb: expected a bool, got {absorb!r}")
        if absorb:
            unfoldable = _unfoldable_linear(self.kv_up)
            if unfoldable:
                raise ValueError(f"absorb: True folds kv_up's weight into the queries and outputs, which computes what "
                                 f"kv_up computes only for a bias-free nn.Linear (x @ weightᵀ, weight floating-point); "
                                 f"this layer's kv_up ({type(self.kv_up).__name__}) {unfoldable}: use absorb=False")
            if self.training and torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                                      for p in self.parameters())):
                # (its output carries no gradient: in a training step the layer, or what feeds x, would silently
                # learn nothing through it)
                raise ValueError("absorb: True is the inference form, whose output carries no gradient, but the layer "
                                 "is training (train() mode, grad enabled, x or parameters requiring grad): call it "
                                 "in eval() mode or under torch.no_grad(), or train with absorb=False")
            return self._absorbed(x)
        B, S, _ = x.shape
        H, dn, dv = self.n_heads, self.nope_dim, self.v_dim
        q_nope, q_rope, c, k_rope = self._queries_and_latent(x)
        kv = self.kv_up(c).view(B, S, H, dn + dv)  # the decompressed per-head k_nope and v
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, S, H, dn + dr)
        o = F.mla_attention(q, kv[..., :dn], k_rope, kv[..., dn:], causal=self.causal)  # (B, S, H, dv)
        return self.out(o.reshape(B, S, H * dv))

    @torch.no_grad()
    def _absorbed(self, x):
        B, S, _ = x.shape
        H, dn, dv, r = self.n_heads, self.nope_dim, self.v_dim, self.kv_rank
        q_nope, q_rope, c, k_rope = self._queries_and_latent(x)
        w_ukv = self.kv_up.weight.view(H, dn + dv, r)
        w_uk, w_uv = w_ukv[:, :dn], w_ukv[:, dn:]  # (H, dn, r), (H, dv, r)
        q_latent = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # (B, S, H, r): W_ukᵀ q_nope
        o_latent = F.latent_attention(torch.cat([q_latent, q_rope], dim=-1), c, k_rope, causal=self.causal,
                                      softmax_scale=(dn + self.rope_dim) ** -0.5)  # (B, S, H, r)
        o = torch.einsum("bshr,hvr->bshv", o_latent, w_uv)  # (B, S, H, dv)
        return self.out(o.reshape(B, S, H * dv))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, q_rank={self.q_rank}, kv_rank={self.kv_rank}, "
                f"nope_dim={self.nope_dim}, rope_dim={self.rope_dim}, v_dim={self.v_dim}, causal={self.causal}")


class _PendingDraws:
    """The FrozenSwiGLUs built inside one parallel_frozen_draws() block, waiting for their frozen matrices;
    closed once the block ends (a module built later, in a context copied inside the block, draws at once)."""

    def __init__(self):
        self.modules: list = []
        self._queued: set[int] = set()  # id() of each queued module: one draw each, however often it is queued
        self.closed = False
        self._lock = threading.Lock()  # a module built in another thread (a copied context) vs the block's end

    def add(self, module) -> bool:
        """Queue `module` for the block's draws; False once the block has ended (it draws by itself)."""
        with self._lock:
            if not self.closed and id(module) not in self._queued:
                self._queued.add(id(module))
                self.modules.append(module)
            return not self.closed

    def close(self) -> list:
        """End the block: the queued modules, handed over (a context copied inside the block keeps this
        object, and must not keep them alive)."""
        with self._lock:
            self.closed = True
            modules, self.modules, self._queued = self.modules, [], set()
            return modules


_PENDING_DRAWS: contextvars.ContextVar[_PendingDraws | None] = contextvars.ContextVar("lwt_pending_draws",
                                                                                     default=None)


def _deferrable() -> bool:
    """Inside an open parallel_frozen_draws() block, and not under a TorchDispatchMode such as
    FakeTensorMode (the workers' draws would be real tensors for its fake buffers)."""
    pending = _PENDING_DRAWS.get()
    return pending is not None and not pending.closed and torch._C._len_torch_dispatch_stack() == 0


def _draw_threads() -> int:
    """CPU threads for the frozen draws: the CPUs this process may run on (its affinity, not the machine's
    count), shared with the other local ranks of a torchrun launch (each draws the same matrices), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every platform)
        cpus = os.cpu_count() or 1
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, min(8, cpus // max(1, int(local_ranks) if local_ranks.isdecimal() else 1)))


@contextlib.contextmanager
def parallel_frozen_draws(max_workers: int | None = None):
    """FrozenSwiGLUs built inside this block (or reset there: reset_parameters(), after to_empty() from
    meta, say) draw their frozen matrices when it ends, several at once on a thread pool (torch's CPU randn
    runs on one core, 1.3 to 1.6 s per 14336 x 4096 matrix in float64 on a 2-core x86 CPU, and releases the
    GIL). Each module draws from its own seeded generator, so the values are the ones it draws alone, bit
    for bit. The workers only draw, on the CPU, one matrix at a time (its float64 draw and fp32 rounding, 12
    bytes an entry, at the peak); the thread that leaves the block copies each into its buffer as it comes,
    under that thread's inference mode and CUDA stream. max_workers: threads, default: the CPUs this process
    may use, divided among torchrun's local ranks, at most 8 and at most one a module. Modules built on meta
    draw nothing, as always, and modules built under a TorchDispatchMode (FakeTensorMode) draw at once, as
    without the block. Nested blocks draw at the end of the outermost; a block left by an exception draws
    nothing. Until its draw a module's frozen buffers hold no values: its forward() and state_dict() (and
    LWTModel.frozen_checksum()) draw them first, at once, on the calling thread (inside the block, or after
    a block left by an exception; under torch.compile outside the graph, which fullgraph=True refuses);
    other reads of the buffers (.w_gate, named_buffers()) see no values until then. A copy of such a module
    (deepcopy, pickle) made inside the block is drawn with the others (made outside one, at once); frozen
    buffers that load_state_dict() loads inside the block, or that are replaced by other tensors there, are
    kept (the block draws the others). LWTModel builds its blocks inside one."""
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                    or max_workers < 1):
        raise ValueError(f"max_workers: expected a positive int or None, got {max_workers!r}")
    outer = _PENDING_DRAWS.get()
    if outer is not None and not outer.closed:
        yield
        return
    pending = _PendingDraws()
    token = _PENDING_DRAWS.set(pending)
    try:
        yield
    finally:
        _PENDING_DRAWS.reset(token)
        modules = pending.close()
    # What each module still waits for: neither loaded nor drawn for a use; a frozen buffer replaced by
    # another tensor inside the block is the replacement's to keep. A module stays pending until all of it
    # is drawn (a failed draw leaves the rest to each module's first use).
    targets = {id(module): module._drop_replaced_pending() for module in modules}
    modules = [module for module in modules if targets[id(module)]]
    workers = min(max_workers or _draw_threads(), len(modules))
    if workers <= 1:
        for module in modules:
            module._fill_frozen(targets[id(module)])
        return
    # (module, buffer name, CPU tensor); (module, None, None): that module's draws are over
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()  # a draw or a copy failed: the workers stop after their current matrix

    def draw(module):
        try:
            if stop.is_set():
                return
            for name, w in module._frozen_draws():
                if stop.is_set():
                    return
                arrived.put((module, name, w))
                del w  # (the queue's reference is the only one)
        except BaseException:
            stop.set()
            raise
        finally:
            arrived.put((module, None, None))

    copied = {id(module): set() for module in modules}
    with ThreadPoolExecutor(workers, thread_name_prefix="lwt-frozen-draw") as pool:
        futures = [pool.submit(draw, module) for module in modules]
        try:
            with torch.no_grad():
                over = 0
                while over < len(futures):
                    module, name, w = arrived.get()
                    if name is None:
                        over += 1
                        if copied[id(module)] >= targets[id(module)]:
                            module._frozen_pending = {}
                    elif name in targets[id(module)]:
                        module._copy_frozen(name, w)
                        copied[id(module)].add(name)
                    del module, w
        except BaseException:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        for future in futures:
            future.result()  # a worker's exception


class FrozenSwiGLU(nn.Module):
    """SwiGLU MLP whose gate and up projections are fixed random matrices: y = (silu(x W_gateᵀ) ·
    (x W_upᵀ)) W_downᵀ, with W_down trained.

    Args:
        d_model: model width; d_ff: hidden width F.
        seed: W_gate and W_up are drawn, in that order, from a CPU torch.Generator seeded with it, as
            N(0, 1/d_model) entries (drawn in float64, rounded to fp32): the same seed gives the same
            matrices on every machine and rank, whatever its CPU's vector unit or torch's default dtype.
        recompute: the backward recomputes gate/up from x (True) instead of keeping them (False). The
            Triton path's policy: on the reference path (CPU tensors, LWT_BACKEND=reference) it changes
            nothing (see lwt.functional.frozen_swiglu).
        frozen_dtype: dtype of the frozen matrices (default: `dtype`), e.g. bf16 beside fp32 activations,
            or torch.float8_e4m3fn: each matrix stored in FP8 with a per-output-channel fp32 scale (buffers
            w_gate_scale, w_up_scale of shape (d_ff,)), x quantised to FP8 per token for the gate/up GEMM,
            and the dx GEMM on FP8 operands too (see lwt.functional.frozen_swiglu). A state_dict with
            full-precision matrices loads into an FP8 layer quantised, and the reverse dequantised.
        device, dtype: of W_down (and of the frozen matrices unless frozen_dtype is given).
    W_gate, W_up (d_ff, d_model) are buffers, not Parameters: optimizers, DDP and FSDP never see them and
    they never get a .grad. They are saved in the state_dict; `seed` stays the constructor's, so after
    load_state_dict of another seed's matrices, reset_parameters() draws this seed's again.
    forward(x): x (..., d_model), W_down's dtype.
    """

    # The frozen buffers still waiting for a parallel_frozen_draws() block to draw them, {name: the buffer
    # tensor that is to receive the values} (empty: every frozen buffer holds its values). An instance
    # attribute once set, replaced, never changed in place; a copy (deepcopy, pickle) carries it, its
    # tensors the copy's own buffers (the copy keeps shared references shared).
    _frozen_pending: dict = {}

    def __init__(self, d_model: int, d_ff: int, seed: int, recompute: bool = False, frozen_dtype=None,
                 device=None, dtype=None):
        super().__init__()
        d_model, d_ff = _positive_int(d_model, "d_model"), _positive_int(d_ff, "d_ff")
        if not _is_int(seed) or not 0 <= seed < 2**64:
            raise ValueError(f"seed: expected an int in [0, 2**64) (a torch.Generator seed), got {seed!r}")
        seed = int(seed)
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute: expected a bool, got {recompute!r}")
        if frozen_dtype is not None and frozen_dtype not in KERNEL_DTYPES + (torch.float8_e4m3fn,):
            raise ValueError(f"frozen_dtype: expected float32, float16, bfloat16 or float8_e4m3fn (what the kernel "
                             f"reads) or None, got {frozen_dtype!r}")
        self.d_model, self.d_ff, self.seed, self.recompute = d_model, d_ff, seed, recompute
        self.frozen_dtype = frozen_dtype
        matrix_dtype = frozen_dtype or dtype or torch.get_default_dtype()
        # where W_down goes: `device`, else the default device (a `with torch.device(...)` block's)
        device = torch.get_default_device() if device is None else torch.device(device)
        pending = _PENDING_DRAWS.get()  # inside parallel_frozen_draws(): drawn when it ends
        defer = device.type != "meta" and _deferrable()
        drawn = self._frozen_shapes() if device.type == "meta" or defer else dict(self._frozen_draws())
        for name, w in drawn.items():
            dtype_w = w.dtype if name.endswith("_scale") else matrix_dtype  # FP8 scales stay fp32
            self.register_buffer(name, torch.empty(w.shape, device=device, dtype=dtype_w) if defer
                                 else w.to(device=device, dtype=dtype_w))
        del drawn
        if defer:
            self._pend(self.frozen_buffer_names())
            if not pending.add(self):  # the block ended meanwhile (another thread): draw now
                self._fill_frozen()
        self.w_down = nn.Parameter(torch.empty(d_model, d_ff, device=device, dtype=dtype))
        self._reset_w_down()  # reset_parameters() without drawing the frozen matrices a second time

    def _reset_w_down(self) -> None:
        nn.init.kaiming_uniform_(self.w_down, a=math.sqrt(5))  # as nn.Linear(d_ff, d_model) initialises it

    def _frozen_shapes(self) -> dict[str, torch.Tensor]:
        """Meta tensors of the frozen buffers' shapes (the scales' in their fp32 dtype): nothing drawn."""
        out = {}
        for name in ("w_gate", "w_up"):
            out[name] = torch.empty(self.d_ff, self.d_model, device="meta")
            if self.frozen_dtype == torch.float8_e4m3fn:
                out[f"{name}_scale"] = torch.empty(self.d_ff, device="meta", dtype=torch.float32)
        return out

    def _frozen_draws(self):
        """Yield (buffer name, CPU tensor): W_gate then W_up (with FP8, each followed by its scale), drawn one
        at a time from a generator seeded with `seed`."""
        gen = torch.Generator().manual_seed(self.seed)
        for name in ("w_gate", "w_up"):  # drawn in this order from the one generator
            # Drawn in float64 and rounded once to fp32: torch's fp32 randn on the CPU takes a vectorised
            # path on x86 CPUs with AVX2 and a scalar one elsewhere (aarch64, ATEN_CPU_CAPABILITY=default),
            # whose values differ in the last bits; its float64 draw is the same on both. The dtype is
            # explicit (under another default dtype randn would draw other values), and so is the device:
            # the generator's, also inside a `with torch.device("cuda")` block.
            w = torch.randn(self.d_ff, self.d_model, generator=gen, dtype=torch.float64,
                            device="cpu").mul_(self.d_model ** -0.5).float()
            if self.frozen_dtype == torch.float8_e4m3fn:
                w, scale = quantize_rows_fp8(w)
                yield name, w
                yield f"{name}_scale", scale
            else:
                yield name, w
            del w  # before the next draw: one matrix at a time

    def reset_parameters(self) -> None:
        """Re-draw W_down as nn.Linear(d_ff, d_model) initialises its weight, and the frozen matrices from
        `seed` (the same values as at construction, in the buffers' dtype and device): a module built on
        the meta device and materialised with to_empty() gets its frozen matrices back from here. Inside
        parallel_frozen_draws() the frozen matrices are drawn when the block ends, with the others'."""
        self._reset_w_down()
        if any(self._buffers[name].is_meta for name in self.frozen_buffer_names()):
            return  # nothing to hold the values yet (to_empty() comes first)
        self._defer_or_fill(self.frozen_buffer_names())

    def _pend(self, names) -> None:
        """Mark the frozen buffers `names` (with those pending in place) as waiting for the block's draw."""
        names = set(names) | self._own_pending()
        self._frozen_pending = {name: self._buffers[name] for name in self.frozen_buffer_names()
                                if name in names and isinstance(self._buffers.get(name), torch.Tensor)}

    def _own_pending(self) -> frozenset:
        """The pending frozen buffers still in place: not swapped for another tensor (torch.func.functional_call
        swaps the caller's in for a call, a user may assign one)."""
        return frozenset(name for name, t in self._frozen_pending.items() if self._buffers.get(name) is t)

    def _drop_replaced_pending(self) -> frozenset:
        """Forget the pending buffers that another tensor has replaced (theirs to keep); return those left."""
        own = self._own_pending()
        self._frozen_pending = {name: t for name, t in self._frozen_pending.items() if name in own}
        return own

    def _defer_or_fill(self, names) -> None:
        """Queue the frozen buffers `names` (and those pending in place) for the open parallel_frozen_draws()
        block, or draw them now."""
        names = frozenset(names) | self._own_pending()
        if _deferrable():
            self._pend(names)
            if _PENDING_DRAWS.get().add(self):
                return
        self._fill_frozen(names)

    def _fill_frozen(self, names=None) -> None:
        """Draw the frozen matrices (all, or the buffers `names`) into their buffers (in the buffers' dtype:
        copy_ rounds as .to() does); those are no longer pending."""
        with torch.no_grad():
            for name, w in self._frozen_draws():
                if names is None or name in names:
                    self._copy_frozen(name, w)
                del w  # before the next draw
        self._frozen_pending = {} if names is None else {
            name: t for name, t in self._frozen_pending.items() if name not in names}

    def _draw_pending(self) -> None:
        """Used (forward, state_dict, LWTModel.frozen_checksum) while waiting for its block's draw: draw the
        pending buffers now (the block then skips them)."""
        if self._frozen_pending and self._own_pending():
            if torch.compiler.is_compiling():
                # Eager, under torch.compile: a generator's draw has no graph. The torch.compiler.disable()d
                # draw lives in lwt/_eager_draw.py, which Dynamo imports when it traces this line: decorating
                # _draw_pending_now here would import Dynamo (seconds) into every `import lwt`.
                from ._eager_draw import draw_pending_now
                draw_pending_now(self)
            else:
                self._draw_pending_now()

    def _draw_pending_now(self) -> None:
        """_draw_pending's draw: real values into the real buffers under a TorchDispatchMode too
        (FakeTensorMode: deferral is refused under one, so these were built without it), never into the
        tensors torch.func.functional_call swapped in (those buffers stay pending), nor into a tensor that
        replaced a frozen buffer (it stays listed, inert, until a conversion or the block's end drops it)."""
        # (and outside torch.func transforms: vmap refuses a random draw, grad an in-place copy)
        with _python_dispatch._disable_current_modes(), torch._C._DisableFuncTorch():
            self._fill_frozen(self._own_pending())

    def __setstate__(self, state) -> None:
        """A copy (deepcopy, pickle) of a module waiting for its draw: queued for the open block's draw as
        the original is, or drawn at once outside one (it is in no block's list)."""
        super().__setstate__(state)
        if self._frozen_pending:
            own = self._drop_replaced_pending()  # (a buffer replaced, or swapped by functional_call, is not drawn into)
            if own:
                self._defer_or_fill(own)

    def _copy_frozen(self, name: str, w: torch.Tensor) -> None:
        """One drawn matrix (or FP8 scale) into its buffer, rounded to the buffer's dtype as .to() rounds; a
        buffer made under torch.inference_mode() is written in it (inference tensors refuse in-place updates
        outside it)."""
        buffer = self._buffers[name]
        with torch.inference_mode(buffer.is_inference()):
            buffer.copy_(w)

    def _apply(self, fn, recurse: bool = True):
        """Module.to/.half()/.bfloat16()/.cuda()/... go through here. With a frozen_dtype the frozen
        matrices keep it: a conversion that would change their dtype only moves them to the device it
        targets, from the original values (re-casting afterwards would keep the rounding of, e.g., .half()).
        Conversions that keep the dtype (device moves, to_empty, share_memory_) apply as to any buffer."""
        own = self._own_pending()
        try:  # (a conversion that fails midway leaves the pending buffers pending where they are then)
            if self.frozen_dtype is None:
                return super()._apply(fn, recurse)
            frozen = {name: self._buffers.pop(name) for name in self.frozen_buffer_names()}
            try:
                super()._apply(fn, recurse)
            finally:
                for name, before in frozen.items():
                    self._buffers[name] = before
            for name, before in frozen.items():
                after = fn(before)
                if after.dtype != before.dtype:
                    # a meta tensor holds no values to move: take the converted one, back in frozen_dtype
                    after = after.to(before.dtype) if before.is_meta else before.to(device=after.device)
                self._buffers[name] = after
            return self
        finally:
            self._repend(own)

    def _repend(self, own) -> None:
        """After a conversion replaced the buffers (.to(), .half(), to_empty(), ...): the buffers that were
        pending in place (`own`) are pending in their new tensors (one replaced before is the replacement's)."""
        if self._frozen_pending:
            self._frozen_pending = {name: self._buffers[name] for name in own}

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._draw_pending()  # (inside parallel_frozen_draws(): values, not an empty buffer's)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Frozen matrices cross the FP8 boundary with their scales: a full-precision W_gate/W_up loaded
        into an FP8 layer is quantised per output channel (as the constructor does), and an FP8 one with
        its scale (or one cast from FP8 to a wider dtype, the scale kept) loaded into a full-precision
        layer is dequantised. A plain cast would drop the scale, silently under strict=False. Frozen
        buffers loaded while a parallel_frozen_draws() block waits to draw them are no longer drawn there.
        (load_state_dict hands each module its own copy of the dict.)"""
        fp8 = torch.float8_e4m3fn
        for name in ("w_gate", "w_up"):
            key, scale_key = prefix + name, prefix + name + "_scale"
            w = state_dict.get(key)
            if w is None:
                continue
            if self.frozen_dtype == fp8 and w.dtype != fp8 and scale_key not in state_dict:
                state_dict[key], state_dict[scale_key] = quantize_rows_fp8(w)
            elif self.frozen_dtype != fp8 and scale_key in state_dict:
                # FP8 values with their scale, as FP8 or cast to a wider dtype on the way (the values are
                # still the unscaled FP8 ones): dequantise either way, never drop the scale
                state_dict[key] = w.float() * state_dict.pop(scale_key).float()[:, None]
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._frozen_pending and len(error_msgs) == errors:
            self._frozen_pending = {name: t for name, t in self._frozen_pending.items()
                                    if prefix + name not in state_dict}

    def frozen_buffer_names(self) -> tuple[str, ...]:
        """Names of the frozen buffers: the two matrices, and with FP8 their scales. Returns: a tuple of str.
        With a frozen_dtype, these keep their dtype through .to(dtype)."""
        fp8 = self.frozen_dtype == torch.float8_e4m3fn
        return ("w_gate", "w_up") + (("w_gate_scale", "w_up_scale") if fp8 else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (..., d_model), W_down's dtype.
        Returns:
            (..., d_model) in x's dtype; gradients flow to x and W_down only.
        """
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected a last dim of {self.d_model} (d_model), got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.w_down.dtype:
            # the layer's own argument is x: lwt.functional would blame w_down, which the caller never passed
            raise ValueError(f"x: expected w_down's dtype ({self.w_down.dtype}), got {x.dtype}; cast it first, "
                             f"e.g. mlp(h.to(mlp.w_down.dtype)) after an autocast projection")
        self._draw_pending()
        scales = {}
        if self.frozen_dtype == torch.float8_e4m3fn:
            scales = dict(w_gate_scale=self.w_gate_scale, w_up_scale=self.w_up_scale)
        return F.frozen_swiglu(x, self.w_gate, self.w_up, self.w_down, self.recompute, **scales)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, seed={self.seed}, recompute={self.recompute}, "
                f"frozen_dtype={self.frozen_dtype}")


def _kv_heads(attn_type: str, n_heads: int, n_kv_heads: int | None) -> int:
    """K/V heads of a gqa/standard layer: n_heads when None; "standard" (MHA) allows no other value."""
    if n_kv_heads is None:
        return n_heads
    if attn_type == "standard" and n_kv_heads != n_heads:
        raise ValueError(f"n_kv_heads: attn_type 'standard' (MHA) needs n_kv_heads == n_heads={n_heads} "
                         f"or None, got {n_kv_heads!r}; use attn_type 'gqa'")
    return n_kv_heads


def _mla_head_dims(d_model: int, n_heads: int, nope_dim: int | None, rope_dim: int | None, v_dim: int | None):
    """(nope_dim, rope_dim, v_dim) of an MLA layer; None: d_model // n_heads, half of it, d_model // n_heads."""
    if d_model % n_heads and None in (nope_dim, rope_dim, v_dim):
        raise ValueError(f"n_heads: expected a divisor of d_model={d_model} when an MLA head size is None "
                         f"(the default is derived from d_model // n_heads), got {n_heads}")
    dims = mla_head_dims(d_model, n_heads, nope_dim, rope_dim, v_dim)
    if rope_dim is None and (dims[1] < 2 or dims[1] % 2):
        raise ValueError(f"mla_rope_dim: None derives (d_model // n_heads) // 2 = {dims[1]}, not an even number >= 2 "
                         f"(RoPE rotates pairs of dims); pass mla_rope_dim")
    return dims


@contextlib.contextmanager
def _caller_names(**names):
    """A sub-layer's ValueError under the names its caller took the arguments by: raised as "eps: ..." inside
    RMSNorm, it reads "norm_eps: ..." from DecoderBlock (and "nope_dim, v_dim: ..." reads "mla_nope_dim,
    mla_v_dim: ...")."""
    try:
        yield
    except ValueError as e:
        name, sep, rest = str(e).partition(": ")
        parts = name.split(", ")
        if sep and any(part in names for part in parts):
            raise ValueError(f"{', '.join(names.get(part, part) for part in parts)}: {rest}") from None
        raise


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: attention, then the frozen SwiGLU MLP, each behind an RMSNorm.

        a = attn(norm1(x))
        y, s = norm2(a, residual=x)    # s = x + a, the residual stream; y = RMSNorm(s), one fused op
        out = s + mlp(y)

    Args:
        d_model: model width; n_heads: query heads (head_dim = d_model // n_heads for gqa/standard);
        d_ff: hidden width of the SwiGLU MLP.
        n_kv_heads: K/V heads of gqa, dividing n_heads; None: n_heads. "standard" (MHA) requires
            n_kv_heads None or == n_heads; mla ignores it.
        attn_type: "standard" | "gqa" (GQAAttention) | "mla" (MLAAttention).
        causal: mask future keys (False: bidirectional, what the mask-diffusion objective uses).
        rope_theta: RoPE frequency base.
        frozen_seed: seed of the MLP's frozen gate/up matrices (see FrozenSwiGLU).
        norm_eps: eps of every RMSNorm: the block's two, and MLA's latent norms.
        mla_rq, mla_rkv: MLA query and K/V latent ranks (MLAAttention's q_rank, kv_rank).
        mla_nope_dim, mla_rope_dim, mla_v_dim: MLA per-head sizes; None: d_model // n_heads,
            (d_model // n_heads) // 2 and d_model // n_heads.
        recompute: the MLP's backward recomputes gate/up from its input instead of keeping them (Triton
            path only, see FrozenSwiGLU).
        frozen_dtype: dtype of the frozen gate/up buffers (default: dtype).
        device, dtype: of the parameters.
    forward(x): x (B, S, d_model) -> (B, S, d_model), x's dtype.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, n_kv_heads: int | None = None,
                 attn_type: str = "gqa", causal: bool = False, rope_theta: float = 10000.0, frozen_seed: int = 0,
                 norm_eps: float = 1e-6, mla_rq: int = 0, mla_rkv: int = 64, mla_nope_dim: int | None = None,
                 mla_rope_dim: int | None = None, mla_v_dim: int | None = None, recompute: bool = False,
                 frozen_dtype=None, device=None, dtype=None):
        super().__init__()
        d_model, n_heads = _positive_int(d_model, "d_model"), _positive_int(n_heads, "n_heads")
        if attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type: expected one of {', '.join(map(repr, ATTN_TYPES))}, got {attn_type!r}")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.attn_type = d_model, attn_type
        with _caller_names(eps="norm_eps", seed="frozen_seed", q_rank="mla_rq", kv_rank="mla_rkv",
                           nope_dim="mla_nope_dim", rope_dim="mla_rope_dim", v_dim="mla_v_dim",
                           head_dim="head_dim (d_model // n_heads)"):
            self.norm1 = RMSNorm(d_model, norm_eps, **factory)
            if attn_type == "mla":
                nope_dim, rope_dim, v_dim = _mla_head_dims(d_model, n_heads, mla_nope_dim, mla_rope_dim, mla_v_dim)
                self.attn = MLAAttention(d_model, n_heads, q_rank=mla_rq, kv_rank=mla_rkv, nope_dim=nope_dim,
                                         rope_dim=rope_dim, v_dim=v_dim, causal=causal, rope_theta=rope_theta,
                                         norm_eps=norm_eps, **factory)
            else:
                if d_model % n_heads:  # (GQAAttention's own message would offer a head_dim argument the block lacks)
                    raise ValueError(f"n_heads: expected a divisor of d_model={d_model} (head_dim is d_model // "
                                     f"n_heads), got {n_heads}")
                self.attn = GQAAttention(d_model, n_heads, _kv_heads(attn_type, n_heads, n_kv_heads), causal=causal,
                                         rope_theta=rope_theta, **factory)
            self.norm2 = RMSNorm(d_model, norm_eps, **factory)
            self.mlp = FrozenSwiGLU(d_model, d_ff, seed=frozen_seed, recompute=recompute, frozen_dtype=frozen_dtype,
                                    **factory)

    @classmethod
    def from_config(cls, model_cfg, layer_idx: int, device=None, dtype=None, *, recompute: bool = False,
                    frozen_dtype=None) -> "DecoderBlock":
        """Block `layer_idx` of the model described by `model_cfg`. Its frozen MLP matrices are drawn
        from seed frozen_seed + layer_idx, so every layer has its own.

        Args:
            model_cfg: an lwt.config.ModelConfig.
            layer_idx: int >= 0, the block's index in the stack.
            device, dtype: of the parameters.
            recompute, frozen_dtype: as in the constructor.
        Returns:
            a DecoderBlock.
        """
        if not _is_int(layer_idx) or layer_idx < 0:
            raise ValueError(f"layer_idx: expected an int >= 0, got {layer_idx!r}")
        layer_idx = int(layer_idx)  # (a NumPy int would wrap in frozen_seed + layer_idx)
        c = model_cfg
        return cls(c.d_model, c.n_heads, c.d_ff, n_kv_heads=c.n_kv_heads, attn_type=c.attn_type, causal=c.causal,
                   rope_theta=c.rope_theta, frozen_seed=c.frozen_seed + layer_idx, norm_eps=c.norm_eps,
                   mla_rq=c.mla_rq, mla_rkv=c.mla_rkv, mla_nope_dim=c.mla_nope_dim, mla_rope_dim=c.mla_rope_dim,
                   mla_v_dim=c.mla_v_dim, recompute=recompute, frozen_dtype=frozen_dtype, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: (B, S, d_model), the parameters' dtype, under torch.autocast too.
        Returns:
            (B, S, d_model) in x's dtype: s + mlp(norm2(s)) with s = x + attn(norm1(x)).
        """
        w_down = _float_tensor(self.mlp, "w_down")  # (None: the MLP swapped for another kind)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and w_down is not None and x.dtype != w_down.dtype:
            # the residual stream and the MLP (whose kernel autocast does not reach) run in the parameters'
            # dtype, under autocast too
            raise ValueError(f"x: expected the parameters' dtype ({w_down.dtype}), got {x.dtype}; cast the "
                             f"input or the block (.to(dtype)); under torch.autocast too, x stays in that dtype")
        a = self.attn(self.norm1(x))  # (B, S, D)
        # Under torch.autocast the projections return 16-bit a beside an fp32 stream: add in x's dtype, as
        # x + a would promote.
        y, s = self.norm2(a.to(x.dtype), residual=x)  # s = x + a (the residual stream), y = RMSNorm(s)
        return s + self.mlp(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, attn_type={self.attn_type!r}"


# The layers (and parallel_frozen_draws) only: `from lwt.layers import *` must not hand out this module's
# imports (its `F` is lwt.functional, and would replace the usual `import torch.nn.functional as F`).
__all__ = ["RMSNorm", "RotaryEmbedding", "GQAAttention", "MLAAttention", "FrozenSwiGLU", "DecoderBlock",
           "parallel_frozen_draws"]
