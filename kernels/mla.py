"""MLA attention core (DeepSeek-V2, arXiv:2405.04434, §2.1): flash attention whose score has a per-head
part and a part through one RoPE key per token shared by every head. Triton forward and backward.

    score(i, j, h) = q_nope[i, h]·k_nope[j, h] + q_rope[i, h]·k_rope[j]        (times the scale)
    o[i, h]        = Σ_j softmax_j(score(i, ·, h)) v[j, h]

q is (B, S, H, Dn + Dr) with q_nope = q[..., :Dn] and q_rope = q[..., Dn:]; k_nope (B, S, H, Dn);
k_rope (B, S, Dr), one key per token; v (B, S, H, Dv), where Dv may differ from Dn + Dr (DeepSeek-V2:
Dn 128, Dr 64, Dv 128). The shared key is read once per key tile with no head stride: it is never
broadcast into a per-head tensor, in the forward or the backward.

The forward and dQ kernels are those of kernels/attention.py, whose inner loops add the rope part of
the score when ROPE_DIM > 0 and take V's own head dim (GROUP = 1: one k_nope/v head per query head).
The dK/dV pass is MLA's own: its gradients are per head for k_nope and v but summed over all H heads for
k_rope, dk_rope = scale · Σ_h dS_hᵀ q_rope_h. One program takes a key tile of one batch entry and a chunk
of heads; for each head it accumulates dk_nope and dv in registers and stores them, while dk_rope keeps
accumulating over the chunk's heads (for DeepSeek-V2's head dims the head and query loops run as one
flattened loop in most configs: attention._MLA_DKDV_CONFIGS). Each chunk writes one fp32 partial
dk_rope tile, and one torch sum over the chunks follows (no atomics, no per-head intermediate; two runs
in one process give bit-identical gradients). The backward is not itself differentiable (double
backward raises). There are as few chunks as keep the GPU busy (at least two programs per
multiprocessor). Holding dk_nope, dk_rope and dv at once limits a program to 64 keys on sm_90. The
SPLIT launch configs (attention._MLA_DKDV_CONFIGS) trade 30% more products for 128-key tiles: the
launch's first programs hold dk_nope and dk_rope alone, chunk by chunk as above, and the others (H per
key tile where there are `chunks` of the first kind) hold one head's dv each, computing the scores
again (dV = Pᵀ dO needs P, not dP); the autotuner times both kinds of config.

Limits: Dn and Dv in 1..256, Dr in 1..128 (each padded to a power of two >= 16 in registers); any S, B, H
and any strides with a unit stride along the last dim, as long as one batch entry of each tensor spans at most
2^31 elements through its strides (as in kernels/attention.py: DeepSeek-V2's heads, H 128, pass
S < 87382 for a contiguous q; lwt.layers.MLAAttention's k_nope and v, views of one (B, S, H, Dn + Dv)
buffer, S <= 65536); a larger one raises ValueError. Precision as in kernels/attention.py.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import triton
import triton.language as tl

from . import attention as A
from ._checks import check_latent_args, check_mla_args
from ._common import (TunedKernel, absent, cdiv, check_kernel_device, distinct, empty, first_order_only, forward_only,
                      launcher, num_sms)


@triton.jit
def _mla_dkdv_program(Q, KN, KR, V, DO, LSE, Delta, DKN, DKR_partial, DV,
                      stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs,
                      stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                      stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                      pid, H, heads_per_program, S, sm_scale,
                      D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
                      D_V: tl.constexpr, V_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      FLATTEN: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr):
    """The work of program `pid` among cdiv(S, BLOCK_N) · B · (H / heads_per_program): one key tile of
    one batch entry, for each head of its chunk. WANT_DK: dk_nope per head and the chunk's partial
    dk_rope (stored to DKR_partial, (B, chunks, S, D_R) fp32); WANT_DV: dv per head."""
    n_chunks = H // heads_per_program
    block_n, b, chunk = A._block_coords(pid, S, BLOCK_N, n_chunks)
    scale = tl.cast(sm_scale, tl.float32)
    qk_scale = scale * A.LOG2E
    k_start = block_n * BLOCK_N
    k_cols = k_start + tl.arange(0, BLOCK_N)
    kr = A._load_tile(KR + b.to(tl.int64) * stride_krb, k_cols, stride_krs, S, D_R, ROPE_DIM, True)
    dkr = tl.zeros((BLOCK_N, ROPE_DIM), tl.float32)
    for i in tl.range(0, heads_per_program, flatten=FLATTEN):
        h = chunk * heads_per_program + i
        k = A._load_tile(KN + b.to(tl.int64) * stride_kb + h * stride_kh, k_cols, stride_ks, S, D, HEAD_DIM, True)
        v = A._load_tile(V + b.to(tl.int64) * stride_vb + h * stride_vh, k_cols, stride_vs, S, D_V, V_DIM, True)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
        dv = tl.zeros((BLOCK_N, V_DIM), tl.float32)
        dk, dkr, dv = A._dkdv_head(dk, dkr, dv, k, kr, v, Q + b.to(tl.int64) * stride_qb + h * stride_qh,
                                   DO + b.to(tl.int64) * stride_dob + h * stride_doh,
                                   LSE + (b * H + h).to(tl.int64) * S, Delta + (b * H + h).to(tl.int64) * S,
                                   stride_qs, stride_dos, k_cols, k_start, S, qk_scale,
                                   D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_M, BLOCK_N, IS_CAUSAL, FLATTEN,
                                   WANT_DK, WANT_DV, INPUT_PRECISION)
        if WANT_DK:
            A._store_tile(DKN + b.to(tl.int64) * stride_dkb + h * stride_dkh, k_cols, stride_dks, S, dk * scale,
                          D, HEAD_DIM)
        if WANT_DV:
            A._store_tile(DV + b.to(tl.int64) * stride_dvb + h * stride_dvh, k_cols, stride_dvs, S, dv, D_V, V_DIM)
    if WANT_DK:
        A._store_tile(DKR_partial + (b * n_chunks + chunk).to(tl.int64) * S * D_R, k_cols, D_R, S, dkr * scale,
                      D_R, ROPE_DIM)


@triton.autotune(configs=A._configs(A._MLA_DKDV_CONFIGS, A._INTERPRETER_MLA_DKDV), key=A._KEY,
                 prune_configs_by={"early_config_prune": A._prune_mla_dkdv})
@triton.jit
def _mla_bwd_dkdv_kernel(
    Q, KN, KR, V, DO, LSE, Delta, DKN, DKR_partial, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    H, HEADS_PER_PROGRAM, S, sm_scale, seq_bucket,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
    D_V: tl.constexpr, V_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLATTEN: tl.constexpr, SPLIT: tl.constexpr,
):
    """dk_nope, dv of BLOCK_N keys for each head of one chunk, and the chunk's partial dk_rope:
    DKR_partial is (B, H / HEADS_PER_PROGRAM, S, D_R) fp32. FLATTEN: the head loop and the query loop run
    as one (see attention._DKDV_CONFIGS). SPLIT: the first cdiv(S, BLOCK_N) · B · chunks programs compute
    dk_nope and dk_rope alone, and cdiv(S, BLOCK_N) · B · H more compute dv, one head each
    (attention._MLA_DKDV_CONFIGS)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(ROPE_DIM > 0)
    pid = tl.program_id(0)
    if not SPLIT:
        _mla_dkdv_program(Q, KN, KR, V, DO, LSE, Delta, DKN, DKR_partial, DV, stride_qb, stride_qs, stride_qh,
                          stride_kb, stride_ks, stride_kh, stride_krb, stride_krs, stride_vb, stride_vs, stride_vh,
                          stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
                          stride_dvb, stride_dvs, stride_dvh, pid, H, HEADS_PER_PROGRAM, S, sm_scale,
                          D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, IS_CAUSAL, INPUT_PRECISION, BLOCK_M, BLOCK_N,
                          FLATTEN, True, True)
    else:
        # The grid is key tiles · B · (chunks + H) programs. (B is no argument: triton would compile a
        # binary of its own for B 1 and for B a multiple of 16.)
        n_chunks = H // HEADS_PER_PROGRAM
        dk_programs = tl.num_programs(0) // (n_chunks + H) * n_chunks
        if pid < dk_programs:
            _mla_dkdv_program(Q, KN, KR, V, DO, LSE, Delta, DKN, DKR_partial, DV, stride_qb, stride_qs,
                              stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs, stride_vb, stride_vs,
                              stride_vh, stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
                              stride_dvb, stride_dvs, stride_dvh, pid, H, HEADS_PER_PROGRAM, S, sm_scale,
                              D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, IS_CAUSAL, INPUT_PRECISION, BLOCK_M,
                              BLOCK_N, FLATTEN, True, False)
        else:
            _mla_dkdv_program(Q, KN, KR, V, DO, LSE, Delta, DKN, DKR_partial, DV, stride_qb, stride_qs,
                              stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs, stride_vb, stride_vs,
                              stride_vh, stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh,
                              stride_dvb, stride_dvs, stride_dvh, pid - dk_programs, H, 1, S, sm_scale,
                              D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, IS_CAUSAL, INPUT_PRECISION, BLOCK_M,
                              BLOCK_N, FLATTEN, False, True)


_dkdv = TunedKernel(_mla_bwd_dkdv_kernel)
# Key tile assumed when sizing the head chunks (the autotuned tile is picked later, per launch).
_CHUNK_SIZING_BLOCK_N = 64


def _head_chunks(B: int, S: int, H: int, device) -> int:
    """How many chunks to split the H heads into for the dK/dV pass: the fewest (each chunk adds one
    (B, S, Dr) fp32 partial to sum) that still give two programs per multiprocessor; a divisor of H.
    (Sized for the fused configs' 64-key tiles; a SPLIT config's dk programs hold 128 keys, and its dv
    programs, H per key tile, fill the GPU beside them.)"""
    tiles = cdiv(S, _CHUNK_SIZING_BLOCK_N) * B
    for chunks in range(1, H + 1):
        if H % chunks == 0 and tiles * chunks >= 2 * num_sms(device):
            return chunks
    return H


def _mla_bwd_fake(do, q, k_nope, k_rope, v, o, lse, causal, sm_scale, need_dq=True, need_dkv=True, o_res=None):
    return A.grads_like((need_dq, need_dkv, need_dkv, need_dkv), q, k_nope, k_rope, v)


@launcher("mla_bwd", fake=_mla_bwd_fake)
def mla_bwd(do: torch.Tensor, q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, causal: bool, sm_scale: float, need_dq: bool = True,
            need_dkv: bool = True, o_res: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: δ, dQ, the dK/dV pass (each only if needed, else its results are empty).
    Shapes as in mla_attention, unit stride along the last dims; do like o; lse: launch_fwd's (base 2);
    o_res: launch_fwd's residual of o, or None (kernels/attention.py, Precision). Returns (dq, dk_nope,
    dk_rope, dv), contiguous, in the inputs' dtypes."""
    B, S, H, _ = q.shape
    d, d_rope, d_v = k_nope.shape[3], k_rope.shape[2], v.shape[3]
    if q.numel() == 0:
        return A.grads_like((need_dq, need_dkv, need_dkv, need_dkv), q, k_nope, k_rope, v, zero=True)
    dk_nope = empty(k_nope.shape, k_nope.dtype, k_nope.device) if need_dkv else None
    dv = empty(v.shape, v.dtype, v.device) if need_dkv else None
    A._check_offsets(do=do, dq=q.shape, **({"dk_nope": dk_nope, "dv": dv} if need_dkv else {}))
    delta = A.launch_delta(o, do, o_res)
    dq = A.launch_dq(do, q, k_nope, k_rope, v, lse, delta, causal, sm_scale, d_rope) if need_dq else absent(q)
    if not need_dkv:
        return dq, absent(k_nope), absent(k_rope), absent(v)
    chunks = _head_chunks(B, S, H, q.device)
    dkr_partial = empty((B, chunks, S, d_rope), torch.float32, q.device)
    _dkdv.launch(
        lambda m: (cdiv(S, m["BLOCK_N"]) * B * (chunks + (H if m["SPLIT"] else 0)),),
        q, k_nope, k_rope, v, do, lse, delta, dk_nope, dkr_partial, dv,
        q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1), k_nope.stride(2),
        k_rope.stride(0), k_rope.stride(1), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dk_nope.stride(0), dk_nope.stride(1), dk_nope.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, H // chunks, S, sm_scale, A._seq_bucket(S),
        **A.head_meta(d, d_rope, d_v, q.dtype, causal),
    )
    dk_rope = dkr_partial.sum(dim=1).to(k_rope.dtype)  # (B, S, Dr): the chunks in a fixed order
    return dq, dk_nope, dk_rope, dv


def _launch_views(q, k_nope, k_rope, v):
    """The forward launcher's arguments: unit stride along the last dim, and v a tensor of its own when
    one tensor was passed as both k_nope and v (launch_fwd would take it for latent_attention's c)."""
    q, k_nope, k_rope, v = (A._unit_last(t) for t in (q, k_nope, k_rope, v))
    return q, k_nope, k_rope, v.view_as(v) if v is k_nope else v


class MLAFunction(torch.autograd.Function):
    """Autograd over the launchers; `mla_attention` validates and fixes the scale before `.apply`."""

    @staticmethod
    def forward(ctx, q, k_nope, k_rope, v, causal, sm_scale):
        q, k_nope, k_rope, v = _launch_views(q, k_nope, k_rope, v)
        o, lse, o_res = A.launch_fwd(q, k_nope, k_rope, v, causal, sm_scale, d_rope=k_rope.shape[-1],
                                     residual=any(ctx.needs_input_grad[:4]))
        ctx.save_for_backward(q, k_nope, k_rope, v, o, lse, o_res)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    @first_order_only
    def backward(ctx, do):
        q, k_nope, k_rope, v, o, lse, o_res = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = mla_bwd(A._unit_last(do), q, k_nope, k_rope, v, o, lse, ctx.causal, ctx.sm_scale,
                        need_dq=need[0], need_dkv=any(need[1:4]), o_res=o_res)
        return (*(g if wanted else None for g, wanted in zip(grads, need)), None, None)


def mla_attention(q: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, v: torch.Tensor,
                  causal: bool = False, softmax_scale: float | None = None) -> torch.Tensor:
    """MLA attention core (Triton) with the decoupled, head-shared RoPE key.

    Args:
        q: (B, S, H, Dn + Dr), float32, float16 or bfloat16, on a CUDA device (or CPU under
            TRITON_INTERPRET=1); q[..., :Dn] meets k_nope, q[..., Dn:] meets k_rope.
        k_nope: (B, S, H, Dn). k_rope: (B, S, Dr), one key per token shared by all heads.
        v: (B, S, H, Dv), Dv may differ from Dn + Dr. All of q's dtype and device; any strides, a
            non-unit stride along the last dim costs a copy.
        causal: query i attends keys j <= i; False (the default) attends all S keys.
        softmax_scale: > 0; (Dn + Dr) ** -0.5 when None.
    Returns:
        (B, S, H, Dv) in q's dtype. Gradients flow to q, k_nope, k_rope (summed over heads) and v.
    Raises:
        ValueError: naming the argument, for a wrong rank, shape, dtype, device or head dim, a causal
            flag that is not a bool, a scale that is not > 0, or a tensor whose batch entry spans more
            than 2^31 elements through its strides (see Limits), before any launch.
    """
    check_mla_args(q, k_nope, k_rope, v, causal, softmax_scale)
    check_kernel_device(q, "q")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if forward_only(q, k_nope, k_rope, v):  # inference, evaluation: no O residual, no autograd.Function
        return A.launch_fwd(*_launch_views(q, k_nope, k_rope, v), causal, scale, d_rope=k_rope.shape[-1])[0]
    return MLAFunction.apply(*distinct(q, k_nope, k_rope, v), causal, scale)


def latent_attention(q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, causal: bool = False,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """MLA's absorbed inference form (Triton, forward only): H query heads attend over one latent per
    token, c (B, S, R) as key and value, plus the shared rope key. The same forward kernel, as MQA
    (one K/V head) with a rope part. Args and result as in kernels.reference.latent_attention; R at
    most 256, Dr at most 128. Raises ValueError if autograd would need it (inputs requiring grad with
    grad mode on, or forward-mode dual tensors): there is no backward and no jvp."""
    check_latent_args(q, c, k_rope, causal, softmax_scale)
    check_kernel_device(q, "q")
    named = (("q", q), ("c", c), ("k_rope", k_rope))
    wanting = [name for name, t in named if t.requires_grad]
    if torch.is_grad_enabled() and wanting:
        raise ValueError(f"{wanting[0]}: requires grad, but latent_attention is forward-only (inference); call it "
                         f"under torch.no_grad()")
    if fwAD._current_level >= 0:  # inside a dual level: a tangent would be dropped silently
        for name, t in named:
            if fwAD.unpack_dual(t).tangent is not None:
                raise ValueError(f"{name}: has a forward-mode tangent, but latent_attention has no jvp (a forward-"
                                 f"only kernel); use kernels.reference.latent_attention")
    if not torch.compiler.is_compiling():  # (Dynamo's traced tensors are never a transform's: _common.no_transform)
        for name, t in named:
            if torch._C._functorch.is_functorch_wrapped_tensor(t):
                raise ValueError(f"{name}: a torch.func transform's tensor (vmap, grad, ...), which the Triton "
                                 f"kernel cannot read; use kernels.reference.latent_attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    c4 = A._unit_last(c)[:, :, None, :]  # (B, S, 1, R): the one K/V head
    o, _, _ = A.launch_fwd(A._unit_last(q), c4, A._unit_last(k_rope), c4, causal, scale, d_rope=k_rope.shape[-1])
    return o


__all__ = ["mla_attention", "mla_bwd", "MLAFunction", "latent_attention"]
