"""Plain PyTorch references of every lwt op: the specification the kernels are tested against.

Readable over fast, no Triton. Math runs in at least fp32 (in float64 when given float64, which is how
the tests build their ground truth); outputs have the input's dtype. Gradients come from autograd.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit inputs, the input's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, with the optional fused pre-norm residual add.

    Args:
        x: (..., N).
        weight: (N,), or None (no scale).
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
    y = sc * rstd
    y = (y if weight is None else y * weight.to(c)).to(x.dtype)
    return y if residual is None else (y, s)


def _contiguous_as(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """o contiguous in `dtype`, in one copy: the kernels' (B, S, H, D) layout, where einsum hands back a
    permuted (B, H, S, D) buffer (.to(dtype) alone keeps its strides, and does not copy to the same dtype)."""
    return o.contiguous() if o.dtype == dtype else o.to(dtype, memory_format=torch.contiguous_format)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                       softmax_scale: float | None = None, upcast: bool = True):
    """Softmax attention with its log-sum-exp, K/V heads expanded explicitly to the query heads.

    Args:
        q: (B, S, H, D); k, v: (B, S, Hkv, D) with H % Hkv == 0 (query head h uses K/V head h // (H/Hkv)).
        causal: query i attends keys j <= i only.
        softmax_scale: D ** -0.5 when None.
        upcast: True (the specification): everything in fp32 (float64 for float64 inputs), rounded once
            at the end. False: plain PyTorch attention in the input dtype, as a user would write it for
            16-bit tensors: both matmuls take the input dtype (so the probabilities are rounded to it
            before P·V, and autograd rounds dS likewise), the softmax runs in fp32. The tests use it as
            the "same dtype" baseline of their error bound, as flash-attention's tests do.
    Returns:
        o (B, S, H, D) in q's dtype, o = softmax(scale · q kᵀ) v per head; lse (B, H, S) in the compute
        dtype (fp32, or float64 for float64 inputs): the natural-log normaliser log Σ_j exp(scale · q·k_j).
    """
    c = _compute_dtype(q.dtype)
    mm = c if upcast else q.dtype  # the dtype the matmuls take
    B, S, H, D = q.shape
    group = H // k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    k = k.to(mm).repeat_interleave(group, dim=2)  # (B, S, H, D)
    v = v.to(mm).repeat_interleave(group, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q.to(mm), k).to(c) * scale  # (B, H, S, S)
    if causal:
        above = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S)
    p = torch.exp(scores - lse[..., None])
    o = torch.einsum("bhst,bthd->bshd", p.to(mm), v)
    return _contiguous_as(o, q.dtype), lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Softmax attention, (B, S, H, D) in q's dtype: see attention_with_lse."""
    return attention_with_lse(q, k, v, causal, softmax_scale)[0]


def mla_attention_with_lse(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
                           causal: bool = False, softmax_scale: float | None = None, upcast: bool = True):
    """The MLA attention core (DeepSeek-V2) with its log-sum-exp; the shared rope key broadcast over heads.

    Args:
        q: (B, S, H, Dn + Dr); k_nope: (B, S, H, Dn); k_rope: (B, S, Dr), one key per token for all
            heads; v: (B, S, H, Dv).
        causal, upcast: as in attention_with_lse. softmax_scale: (Dn + Dr) ** -0.5 when None.
    Returns:
        o (B, S, H, Dv) in q's dtype, o = softmax(scale · (q_nope·k_nopeᵀ + q_rope·k_ropeᵀ)) v per head;
        lse (B, H, S) in the compute dtype.
    """
    c = _compute_dtype(q.dtype)
    mm = c if upcast else q.dtype
    S, out_dtype = q.shape[1], q.dtype
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    q = q.to(mm)
    k_rope = k_rope.to(mm)[:, :, None, :].expand(-1, -1, q.shape[2], -1)  # (B, S, H, Dr)
    k = torch.cat([k_nope.to(mm), k_rope], dim=-1)  # (B, S, H, Dn + Dr): q·k = q_nope·k_nope + q_rope·k_rope
    scores = torch.einsum("bshd,bthd->bhst", q, k).to(c) * scale  # (B, H, S, S)
    if causal:
        above = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S)
    p = torch.exp(scores - lse[..., None])
    o = torch.einsum("bhst,bthd->bshd", p.to(mm), v.to(mm))
    return _contiguous_as(o, out_dtype), lse


def mla_attention(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
                  causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """The MLA attention core, (B, S, H, Dv) in q's dtype: see mla_attention_with_lse."""
    return mla_attention_with_lse(q, k_nope, k_rope, v, causal, softmax_scale)[0]


def latent_attention(q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, causal: bool = False,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of H query heads over one latent per token (MLA's absorbed inference form, MQA-style):
    the latent c is both the key (with the shared rope key beside it) and the value.

    Args:
        q: (B, S, H, R + Dr), the query already multiplied into the latent space, then its rope part;
        c: (B, S, R); k_rope: (B, S, Dr). softmax_scale: (R + Dr) ** -0.5 when None.
    Returns:
        (B, S, H, R) in q's dtype: softmax(scale · (q[..., :R]·cᵀ + q[..., R:]·k_ropeᵀ)) c per head.
    """
    cd = _compute_dtype(q.dtype)
    S, R = q.shape[1], c.shape[-1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out_dtype = q.dtype
    q, c, k_rope = q.to(cd), c.to(cd), k_rope.to(cd)
    scores = (torch.einsum("bshr,btr->bhst", q[..., :R], c)
              + torch.einsum("bshd,btd->bhst", q[..., R:], k_rope)) * scale  # (B, H, S, S)
    if causal:
        above = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.einsum("bhst,btr->bshr", torch.softmax(scores, dim=-1), c).to(out_dtype)


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_blocks_fp8(t: torch.Tensor, block: int):
    """FP8 quantisation with one scale per `block` consecutive entries of a row, computed in fp32 whatever
    t's dtype: (t8, scale) with t[r, c] ≈ t8[r, c] · scale[r, c // block].

    Args:
        t: (rows, n), any float dtype; block: entries per scale (the last block of a row may be partial).
    Returns:
        t8 (rows, n) float8_e4m3fn and scale (rows, ceil(n / block)) fp32 = max|block| / 448 (the block's
        largest entry maps to FP8's largest finite value; a block whose max / 448 is 0 (all zeros, or
        an fp32 underflow) gets scale 1 and zeros).
    """
    rows, n = t.shape
    blocks = -(-n // block)
    tf = t.float()
    if blocks * block != n:
        tf = torch.nn.functional.pad(tf, (0, blocks * block - n))
    tf = tf.view(rows, blocks, block)
    amax = tf.abs().amax(dim=-1)
    # Divided by a tensor: CUDA turns division by a Python scalar into a product with its reciprocal,
    # one rounding off; the kernels divide exactly (div_rn).
    scale = amax / torch.full_like(amax, FP8_MAX)
    # 1 where the quotient is 0: an all-zero block, or one whose max is so small (< 448 x fp32's least
    # subnormal) that the division underflows; a zero scale would make its entries inf / NaN
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t8 = (tf / scale[..., None]).to(FP8).view(rows, blocks * block)
    return (t8 if blocks * block == n else t8[:, :n].contiguous()), scale


def quantize_rows_fp8(t: torch.Tensor):
    """Per-row FP8 quantisation (quantize_blocks_fp8 with a row as the block): (t8, scale) with
    t ≈ t8 · scale[:, None], scale (rows,) fp32 = max|row| / 448 (1 where that is 0: an all-zero,
    underflowing or empty row)."""
    rows, n = t.shape
    if n == 0:
        return t.to(FP8), torch.ones(rows, dtype=torch.float32, device=t.device)
    t8, scale = quantize_blocks_fp8(t, n)
    return t8, scale[:, 0]


def frozen_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  recompute: bool = False, w_gate_scale: torch.Tensor | None = None,
                  w_up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU MLP: y = (silu(x W_gateᵀ) · (x W_upᵀ)) W_downᵀ, in the compute dtype, y in x's dtype.

    Args:
        x: (..., D); w_gate, w_up: (F, D), frozen (any float dtype, used in x's compute dtype);
        w_down: (D, F). recompute: accepted for the kernel's signature; autograd here keeps what it keeps.
        w_gate_scale, w_up_scale: (F,) fp32, with float8_e4m3fn frozen weights only: W = w · scale[:, None]
            (per output channel). Then x is quantised to FP8 per token (quantize_rows_fp8) before the
            gate/up products, as the kernel does; its gradient passes the rounding straight through.
    """
    c = _compute_dtype(x.dtype)
    xc = x.to(c)
    wg, wu = w_gate.to(c), w_up.to(c)
    if w_gate.dtype == FP8:
        wg, wu = wg * w_gate_scale.to(c)[:, None], wu * w_up_scale.to(c)[:, None]
        x8, sx = quantize_rows_fp8(x.detach().reshape(-1, x.shape[-1]))
        xq = (x8.to(c) * sx.to(c)[:, None]).reshape(x.shape)
        xc = xc + (xq - xc).detach()  # the value of xq, the gradient of x
    h = torch.nn.functional.silu(xc @ wg.t()) * (xc @ wu.t())  # (..., F)
    return (h @ w_down.to(c).t()).to(x.dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         token_weight: torch.Tensor | None = None, reduction: str = "mean",
                         ignore_index: int = -100) -> torch.Tensor:
    """Cross entropy of the logits z = hidden @ weightᵀ, materialised here (the kernel never does).

    Args:
        hidden: (..., D); weight: (V, D); target: (...) class indices, or ignore_index.
        token_weight: optional (...): each row's loss is multiplied by it.
        reduction: "mean" (sum of the weighted losses over the number of non-ignored rows, NaN when
            there are none, as F.cross_entropy), "sum", or "none" (target's shape, 0 at ignored rows).
    Returns:
        the loss in fp32 (float64 for float64 inputs): a reduction over many rows, kept out of 16 bits.
    """
    c = _compute_dtype(hidden.dtype)
    t = target.reshape(-1)
    valid = t != ignore_index
    # Ignored rows are zeroed before the matmul (where, not a product: its backward passes them no
    # gradient), so that nothing in them (NaN padding, an inf token weight) reaches the loss or a gradient.
    h = torch.where(valid[:, None], hidden.reshape(-1, hidden.shape[-1]).to(c), 0.0)
    z = (h @ weight.to(c).t()).to(hidden.dtype).to(c)  # (N, V), rounded as a matmul in hidden's dtype rounds
    safe_t = torch.where(valid, t, torch.zeros_like(t)).long()
    loss = torch.logsumexp(z, dim=-1) - z.gather(1, safe_t[:, None]).squeeze(1)  # (N,)
    if token_weight is not None:
        loss = loss * torch.where(valid, token_weight.reshape(-1).to(c), 0.0)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
