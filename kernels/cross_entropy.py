"""Cross entropy through a linear head (the tied embedding) that never holds all the logits.

Math. Rows n = 1..N with hidden h_n (D), target t_n and weight w_n (1 without token weights);
z_n = W h_n (V logits), ℓ_n = lse(z_n) − z_{n,t_n}, and

    loss = r · Σ_n w_n ℓ_n        r = 1 / N_kept for "mean", 1 for "sum"; "none" returns w_n ℓ_n.

With an upstream gradient g (a scalar for mean/sum, one value per row for none) and c_n = g·r·w_n:

    ∂loss/∂z_{n,v} = c_n (softmax(z_n)_v − [v = t_n])      dH = dZ W,   dW = dZᵀ H,   ∂loss/∂w_n = g·r·ℓ_n.

Schedule. Rows whose target is ignore_index are dropped first (they cost no matmul). The kept rows are
walked in chunks of C rows so that only a (C × V) slice of logits ever exists (LOGITS_CHUNK_BYTES, more
with an fp32 dW sum: ACCUM_CHUNK_SHARE):

    Z_c = H_c Wᵀ                         cuBLAS, in the inputs' dtype
    _ce_rows_kernel: lse_c (base 2), ℓ_c (fp32, online log-sum-exp), then Z_c ← dZ_c in place
    dH_c = dZ_c W                        cuBLAS
    dW  += dZ_cᵀ H_c                     fp32 accumulator: _ce_dw_accumulate_kernel; else cuBLAS addmm

For mean/sum the upstream gradient is one number, so the forward computes the gradients for g = 1 and
the backward only scales them: three matmuls of N·V·D in all, where an autograd backward would redo the
forward's. Liger-Kernel's fused linear cross entropy (ops/fused_linear_cross_entropy.py) runs the same
chunked schedule. With "none" the forward keeps the per-row lse and the backward recomputes Z per chunk.

Precision. Softmax statistics and the loss are fp32; dZ is rounded to the logits' dtype, with the upstream
gradient already in it, as an eager backward rounds its grad_logits. (So fp16, whose range is narrow,
computes its gradients in the backward even for mean/sum: a loss scale must reach dZ before it is
rounded.) fp16 goes further than eager there: c_n · p underflows fp16 (below 6e-8, subnormal below 6e-5)
for the typical p ~ 1/V once c_n is small (mean over N rows: c_n = g/N; V 128000 and N 1536 without a
loss scale lose most of dZ, and eager's dH misses the float64 one by 1% of its largest entry), so when
every |c_n| is below 1 the backward writes dZ / α with α = max_n |c_n| rounded up to a power of two (|dZ / α|
<= 1, the magnitudes of an eager backward under an upstream gradient of 1: no GEMM sees larger products
than there; α = 1 from 1 up, and above 2^15 only what keeps dZ / α finite: _fp16_grad_scale), and the
GEMMs multiply their fp32 sums by α before rounding dH and dW (cuBLAS's alpha; the fp32 dW sum at its
last store). dW sums the chunks in fp32 by default (accum_dtype=torch.float32: a (V, D) fp32 buffer for
16-bit weights, when there is more than one chunk); accum_dtype=None sums them in the weight's dtype (one
rounding per chunk, no V × D buffer). Offsets: chunks are capped at (2³¹ − 1) / V rows and (2³¹ − 1) / (h's
row stride) rows (fewer than 2³¹ elements of logits and of h), and the dW offsets are int64.

Layout. A chunk's logits live in a buffer whose rows are padded to a multiple of 16 elements (V 50257:
50272), the GEMMs writing and reading its (C, V) view. A row stride divisible by 16 is what Triton
specialises on to issue vector loads from each row (with V itself as the stride, a vocabulary such as
GPT-2's gets scalar loads), and cuBLAS's 16-bit kernels want a leading dimension of 8 elements' multiple.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import check_linear_cross_entropy_args, count_valid_targets
from ._common import (TunedKernel, absent, as_rows, cdiv, check_kernel_device, dispatch_modes, empty, first_order_only,
                      grouped_tile, interpreting, launcher, next_power_of_2)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Bytes of one chunk of logits (C × V in the inputs' dtype): the op's working memory beside the gradient
# buffers. 250 MiB is 1024 rows of a 128000-word vocabulary in bf16 (16384 rows in 16 chunks, within the
# 0.25 GiB of issue #6's goal). Each chunk reads and writes the whole (V, D) dW sum once, and its dH GEMM
# has only C × D outputs: at D 4096, 1024 rows make 128 tiles of 128 x 256 for an H200's 132 SMs. (The
# 192 MiB chunks timed at e3f8149 held 768 rows: 96 such tiles, and 22 chunks. Not yet timed since.)
# Tests shrink it to get many chunks.
LOGITS_CHUNK_BYTES = 250 * 2**20
# With an fp32 dW sum (4·V·D bytes: 2000 MiB at V 128000, D 4096) the working memory is mostly that
# buffer, and each chunk's accumulation GEMM reads and writes all of it (about 4 GB a chunk there); chunks
# may then hold logits up to this share of its size (500 MiB there: 8 chunks of 2048 rows instead of 16 of
# 1024, half the traffic for 250 MiB more). Rows that fit in one such chunk need no fp32 sum.
ACCUM_CHUNK_SHARE = 0.25
# Row stride of a logits chunk: V rounded up to a multiple of this (see Layout above).
_ROW_ALIGN = 16


@triton.jit
def _ce_rows_kernel(Z, stride_z_row, Target, stride_t, RowScale, Lse, Loss, V,
                    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row of the (C, V) logits chunk Z. COMPUTE_LSE: Lse[row] = log2 Σ_v 2^(z_v·log2 e) (the
    log-sum-exp in base-2 units: lse · log2 e) and ℓ = lse − z_t (summed as (max − z_t) + log Σ) from one online
    pass over the row (otherwise Lse[row] is read). WRITE_GRAD: a second pass overwrites the row with c · (softmax −
    onehot(t)), c = RowScale[row]. The backward's exponents z·log2 e − Lse use the forward's base-2 value as it is,
    with no round trip through natural-log units: a row whose softmax is exactly one-hot (V = 1) gets p = 2^0 = 1
    (up to the contraction of z·log2 e − Lse into one fma), not 1 plus the round trip's rounding."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(Target + row * stride_t)
    if COMPUTE_LSE:
        # Per-lane running max and sum (in log2 units), merged once at the end: one cross-lane reduction
        # per row instead of one per block. A lane that has only seen -inf keeps max -inf and sum 0.
        m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_lane = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32) * LOG2E
            m_new = tl.maximum(m_lane, z)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            # The lane's max adds 2^0 = 1 by a comparison of the rounded products: compiled, z − m_ref is
            # contracted into one fma with the exact product, which adds 2^(ulps of m) to the sum, and log2 Σ
            # (a confident row's whole loss below: 2e-6 at logits 30 and 17) took that in (37% there).
            s_lane = s_lane * tl.exp2(m_lane - m_ref) + tl.exp2(tl.where(z == m_ref, 0.0, z - m_ref))
            m_lane = m_new
        m = tl.max(m_lane, 0)
        log2_s = tl.log2(tl.sum(s_lane * tl.exp2(m_lane - m), 0))
        lse2 = m + log2_s
        tl.store(Lse + row, lse2)
        # (m − z_t) + log2 Σ, not lse − z_t: lse rounded to fp32 is ulps of the largest logit off, which a
        # confident row's loss (log2 Σ itself when the target is the top logit: 2e-6 at logits 30 and 17)
        # would take whole, as F.cross_entropy's log_softmax does not. For the top logit m − z_t is 0 by a
        # comparison of the rounded products, as the top term of Σ is 2^0 above: compiled, m − z_t·log2 e is
        # contracted into one fma with the exact product, which is ulps of m off again. Below the top logit the
        # loss is at least ln 2, and the fma's half ulp of m nothing beside it.
        z_t = tl.load(z_row + target).to(tl.float32) * LOG2E
        tl.store(Loss + row, (tl.where(z_t >= m, 0.0, m - z_t) + log2_s) * LN2)
    else:
        lse2 = tl.load(Lse + row)
    if WRITE_GRAD:
        c = tl.load(RowScale + row)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            in_row = offs < V
            z = tl.load(z_row + offs, mask=in_row, other=0.0).to(tl.float32)
            dz = tl.exp2(z * LOG2E - lse2) * c
            dz = tl.where(offs == target, dz - c, dz)
            tl.store(z_row + offs, dz.to(Z.dtype.element_ty), mask=in_row)


# dW accumulation tiles (BLOCK_V, BLOCK_D, BLOCK_C, warps, stages) for 16-bit inputs; the C loop is the
# GEMM's K dimension. Compiled for sm_90 with V, D and C multiples of 16 (benchmarks/compile_check.py),
# none spills while accumulating; 128 x 256 spills 88 B only in the last chunk's launch, which writes the
# weight-dtype result and is tuned on its own. 256 x 128 spills while accumulating: left out.
_DW_CONFIGS = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
               (128, 128, 32, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)]
_GROUP_V = 8


def _dw_configs():
    if interpreting():
        return [triton.Config({"BLOCK_V": 16, "BLOCK_D": 32, "BLOCK_C": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_V": bv, "BLOCK_D": bd, "BLOCK_C": bc}, num_warps=w, num_stages=s)
            for bv, bd, bc, w, s in _DW_CONFIGS]


# restore_value: the kernel adds into Acc, so each config the autotuner tries must start from the same Acc.
@triton.autotune(configs=_dw_configs(), key=["V", "D", "ACCUMULATE"], restore_value=["Acc"])
@triton.jit
def _ce_dw_accumulate_kernel(DZ, H, Acc, Out, alpha, C, V, D, stride_dz_row, stride_h_row, stride_acc_row,
                             ACCUMULATE: tl.constexpr, GROUP_V: tl.constexpr,
                             BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out (V, D) = Acc (+) DZᵀ H for one (BLOCK_V × BLOCK_D) tile, DZ (C, V) and H (C, D) 16-bit, Acc fp32:
    the products are summed in fp32 over the chunk and added to the fp32 running sum without rounding.
    Out is Acc itself, or for the last chunk the weight-dtype gradient (Acc's row stride), which gets the
    sum times alpha (1 for Acc: the running sum stays unscaled)."""
    # GROUP_V row tiles of dW share each column tile of H while it is in L2.
    pid_v, pid_d = grouped_tile(tl.program_id(0), tl.cdiv(V, BLOCK_V), tl.cdiv(D, BLOCK_D), GROUP_V)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    ptrs = Acc + offs_v[:, None].to(tl.int64) * stride_acc_row + offs_d[None, :]
    in_tile = (offs_v < V)[:, None] & (offs_d < D)[None, :]
    # The running sum enters as the dot's initial accumulator: adding it after the loop would hold a
    # second (BLOCK_V, BLOCK_D) fp32 tile in registers and spill.
    if ACCUMULATE:
        acc = tl.load(ptrs, mask=in_tile, other=0.0)
    else:
        acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + offs_c
        dz = tl.load(DZ + rows[:, None] * stride_dz_row + offs_v[None, :],
                     mask=(rows < C)[:, None] & (offs_v < V)[None, :], other=0.0)  # (BLOCK_C, BLOCK_V)
        h = tl.load(H + rows[:, None] * stride_h_row + offs_d[None, :],
                    mask=(rows < C)[:, None] & (offs_d < D)[None, :], other=0.0)  # (BLOCK_C, BLOCK_D)
        acc = tl.dot(tl.trans(dz), h, acc)
    out = Out + offs_v[:, None].to(tl.int64) * stride_acc_row + offs_d[None, :]
    tl.store(out, (acc * alpha).to(Out.dtype.element_ty), mask=in_tile)


_dw_accumulate = TunedKernel(_ce_dw_accumulate_kernel)


@triton.jit
def _scale_kernel(X, G, n, BLOCK: tl.constexpr):
    """X (n elements, contiguous) *= G[0], in fp32: a 16-bit X never sees G rounded to its own dtype.
    Exact zeros stay zero whatever G (see _scale_)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    y = tl.where(x == 0, 0.0, x.to(tl.float32) * tl.load(G))
    tl.store(X + offs, y.to(X.dtype.element_ty), mask=offs < n)


# Elements per block of the torch-op scaling used under a TorchDispatchMode (LinearCrossEntropyFunction):
# about 0.2 GB of temporaries per block.
_MODE_SCALE_ELEMENTS = 1 << 24


def _scaled(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """_scale_'s result in torch ops, as a new tensor (for traced graphs and dispatch modes, which do not
    see the kernel): t · g in fp32, rounded to t's dtype once; exact zeros stay zero."""
    return torch.where(t == 0, t, (t.float() * g).to(t.dtype))


def _scale_(t: torch.Tensor, g: torch.Tensor) -> None:
    """t *= g in place; g a one-element fp32 tensor (the upstream gradient, on the device: no sync). In
    torch, a 16-bit t would meet g cast to its dtype: a GradScaler's 65536 is inf in fp16. Exact zeros
    stay zero, also for an inf or NaN g: the rows of ignored targets get no gradient whatever g is, as in
    the reference (and in the deferred fp16 / "none" backward, which never scales them)."""
    block = 1024 if interpreting() else 4096
    _scale_kernel[(cdiv(t.numel(), block),)](t, g, t.numel(), BLOCK=block, num_warps=4)


def _row_config(V: int):
    """(BLOCK_V, num_warps) of the row kernel. Chosen, not autotuned: the kernel rewrites Z in place, and
    this memory-bound loop only needs enough bytes in flight (4096 lanes, 16 per thread at 8 warps)."""
    if interpreting():
        return min(256, max(16, next_power_of_2(V))), 1
    block_v = min(4096, max(128, next_power_of_2(V)))
    return block_v, max(1, min(8, block_v // 512))


def _launch_rows(z, target, row_scale, lse, loss, compute_lse: bool, write_grad: bool) -> None:
    C, V = z.shape
    block_v, warps = _row_config(V)
    dummy = lse  # pointer arguments a constexpr branch never reads
    _ce_rows_kernel[(C,)](z, z.stride(0), target, target.stride(0), row_scale if write_grad else dummy, lse,
                          loss if compute_lse else dummy, V,
                          COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float) -> None:
    """out = alpha · (a b), alpha applied to cuBLAS's fp32 sum before it is rounded to out's dtype."""
    if alpha == 1.0:
        torch.mm(a, b, out=out)
    else:  # beta 0: out's uninitialised values, NaN included, are not read
        torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)


def _accumulate_dw(dw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, first: bool, out=None,
                   alpha: float = 1.0) -> None:
    """dw (V, D) = (first) or += (later) alpha · dzᵀ h, dz (C, V), h (C, D). out: for the last chunk into an
    fp32 dw, the weight-dtype tensor that receives the final sum instead of dw (no separate conversion
    pass). An fp32 dw holds the sum without alpha, which only the store into out applies: give the same
    alpha to every chunk."""
    if dw.dtype == dz.dtype:  # fp32 inputs, or accumulation in the weight's dtype: cuBLAS
        if first:
            _mm(dz.t(), h, dw, alpha)
        else:
            dw.addmm_(dz.t(), h, alpha=alpha)
        return
    # A 16-bit product added to an fp32 running sum: cuBLAS has no in-place form of that here (torch's
    # addmm out_dtype overload allocates its result: pytorch#154086), so a Triton GEMM does it.
    C, V = dz.shape
    D = h.shape[1]
    grid = lambda meta: (cdiv(V, meta["BLOCK_V"]) * cdiv(D, meta["BLOCK_D"]),)  # noqa: E731
    _dw_accumulate.launch(grid, dz, h, dw, dw if out is None else out, 1.0 if out is None else alpha, C, V, D,
                          dz.stride(0), h.stride(0), dw.stride(0), ACCUMULATE=not first, GROUP_V=_GROUP_V)


def _chunk_rows(n: int, V: int, D: int, itemsize: int, budget: int) -> int:
    """Rows per chunk: at most `budget` bytes of logits (V: the padded row length), and fewer than 2^31
    elements of logits and of h in one chunk (D: h's row stride; the dW kernel's offsets are int32: only a
    vocabulary of a few hundred words, or an fp32 sum's budget at a width of tens of thousands, gets near
    it). The fewest chunks that allows, since each chunk is a pass over the whole dW sum (N 16384 with 786
    rows allowed: 21 chunks of 781, not 21 of 768 and a 22nd of 256), each rounded up to whole 128-row GEMM
    tiles where the bound allows (the last chunk is then the shortest)."""
    cap = max(1, min(budget // (V * itemsize), (2**31 - 1) // V, (2**31 - 1) // D))
    if n <= cap:
        return max(1, n)
    rows = cdiv(n, cdiv(n, cap))
    tiled = cdiv(rows, 128) * 128
    return tiled if tiled <= cap else rows  # as many chunks either way: cdiv(n, cap) <= cdiv(n, tiled)


def ce_chunks(h, weight, target, row_scale=None, lse=None, need_dh=False, need_dw=False, accum_dtype=torch.float32,
              dw_wanted=None, grad_scale=1.0):
    """Walk the kept rows in chunks. h (N, D) and weight (V, D) share a dtype; target (N,) int64 in [0, V).

    row_scale (N,) fp32: c_n, given when gradients are wanted. lse (N,) fp32, in base-2 units
    (_ce_rows_kernel): given (from an earlier call) to skip the statistics pass; else computed. Returns
    (lse, loss_rows, dh, dw): loss_rows (N,) fp32 the unweighted ℓ_n (None when lse was given), dh (N, D)
    in h's dtype, dw (V, D) in weight's dtype. dw_wanted (default need_dw): whether the op computes dW,
    now or in a later call; it sizes the chunks, so that a deferred backward recomputes each chunk's
    logits with the GEMM shapes the forward used. grad_scale α: dZ is written as c_n (p − onehot) / α and
    the dH and dW GEMMs multiply their fp32 sums by α (see Precision)."""
    N, D = h.shape
    V = weight.shape[0]
    compute_lse = lse is None
    if compute_lse:
        lse = empty((N,), torch.float32, h.device)
        loss_rows = empty((N,), torch.float32, h.device)
    else:
        loss_rows = None
    grads = need_dh or need_dw
    dh = empty((N, D), h.dtype, h.device) if need_dh else None
    v_pad = cdiv(V, _ROW_ALIGN) * _ROW_ALIGN
    wider_sum = accum_dtype is not None and weight.dtype != accum_dtype  # dW summed in a wider dtype
    budget = LOGITS_CHUNK_BYTES
    if wider_sum and (need_dw if dw_wanted is None else dw_wanted):
        acc_bytes = V * D * accum_dtype.itemsize
        budget = max(budget, int(acc_bytes * ACCUM_CHUNK_SHARE))
    # (the row stride of h, not D, bounds the dW kernel's int32 offsets into h)
    chunk = _chunk_rows(N, v_pad, max(D, h.stride(0)), h.element_size(), budget)
    n_chunks = cdiv(N, chunk)
    dw = acc = None
    if need_dw:
        dw = empty((V, D), weight.dtype, h.device)
        if N == 0:
            dw.zero_()
        # One chunk is one matmul, rounded once: only several need a wider running sum.
        if n_chunks > 1 and wider_sum:
            acc = empty((V, D), accum_dtype, h.device)
    for i, n0 in enumerate(range(0, N, chunk)):
        rows = slice(n0, min(N, n0 + chunk))
        # (C, V) with rows padded to v_pad: the only logits that exist at any time
        z = empty((rows.stop - n0, v_pad), h.dtype, h.device)[:, :V]
        torch.mm(h[rows], weight.t(), out=z)
        _launch_rows(z, target[rows], row_scale[rows] if grads else None, lse[rows],
                     loss_rows[rows] if compute_lse else None, compute_lse, grads)
        if need_dh:
            _mm(z, weight, dh[rows], grad_scale)
        if need_dw:
            last = i == n_chunks - 1
            _accumulate_dw(dw if acc is None else acc, z, h[rows], first=i == 0,
                           out=dw if acc is not None and last else None, alpha=grad_scale)
        del z  # before the next chunk allocates its own
    return lse, loss_rows, dh, dw


def _scatter_rows(rows: torch.Tensor, kept: torch.Tensor | None, n: int) -> torch.Tensor:
    """The (n, ...) tensor holding `rows` at the kept positions and zeros at the ignored ones."""
    if kept is None:
        return rows
    return torch.zeros((n,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device).index_copy_(0, kept, rows)


def _kept_rows(target: torch.Tensor, V: int, ignore_index: int):
    """(n_kept, kept): the count of rows whose target is not ignore_index (the op's one host sync, which
    also range-checks the targets) and their indices, or None when every row is kept."""
    n_kept = count_valid_targets(target, V, ignore_index)
    # nonzero_static: the size is known from the sync above, so finding the rows needs no second one
    kept = None if n_kept == target.numel() else torch.nonzero_static(target != ignore_index, size=n_kept).squeeze(1)
    return n_kept, kept


def _select(kept: torch.Tensor | None, *rows):
    """Each of `rows` ((N, ...) tensors or None) at the kept positions."""
    return tuple(t if t is None or kept is None else t.index_select(0, kept) for t in rows)


# The largest |c_n| / α the fp16 backward lets through (a power of two): |dZ / α| stays below fp16's 65504.
_FP16_DZ_MAX = 2.0**15


def _fp16_grad_scale(row_scale: torch.Tensor) -> float:
    """α for an fp16 backward (see Precision), a power of two. Every |c_n| below 1: max |c_n| rounded up, so
    that |dZ / α| <= 1 and c_n · p / α is a normal fp16 number down to p ~ 6e-5 · max|c| / |c_n|. Otherwise
    1 (eager's dZ), or above 2^15 just enough that |dZ / α| <= 2^15 (no inf in dZ): α > 1 writes every row
    α times smaller than eager, deeper into the subnormals for a row whose c_n is far below the largest
    (token weights, a "none" gradient), so it is used only where eager's dZ would overflow. 1 when there is
    no row or no finite, nonzero c_n (dZ is zero, or inf/NaN as eager's would be)."""
    if row_scale.numel() == 0:
        return 1.0
    top = row_scale.abs().max().item()  # a host sync, beside the backward's count of the kept rows
    if not math.isfinite(top) or top == 0.0:
        return 1.0
    if top < 1.0:
        return 2.0 ** math.ceil(math.log2(top))
    return 2.0 ** max(0, math.ceil(math.log2(top / _FP16_DZ_MAX)))


def _deferred(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the gradients wait for the backward. Computing them ahead needs a scalar upstream gradient
    (mean/sum) and a dtype whose range does not care what it is: fp16 dZ rounded without it (a GradScaler's
    2^16, say) would flush small probabilities to zero, so fp16 computes them in the backward, as "none"
    does."""
    return reduction == "none" or dtype == torch.float16


def _fwd_fake(hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype, need_dh, need_dw,
              need_dtw):
    N = hidden.shape[0]
    now = not _deferred(reduction, hidden.dtype)
    later = not now and (need_dh or need_dw)
    fp32 = dict(dtype=torch.float32)
    return (hidden.new_empty((N,) if reduction == "none" else (), **fp32),
            hidden.new_empty(hidden.shape if now and need_dh else (0,)),
            weight.new_empty(weight.shape if now and need_dw else (0,)),
            hidden.new_empty((N,) if need_dtw else (0,), **fp32), hidden.new_empty((N,) if later else (0,), **fp32))


@launcher("linear_cross_entropy_fwd", fake=_fwd_fake, host_sync=True)
def ce_forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor | None,
               reduction: str, ignore_index: int, accum_dtype: torch.dtype | None, need_dh: bool, need_dw: bool,
               need_dtw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward over validated rows: hidden (N, D), weight (V, D), target (N,), token_weight (N,) or None.

    Returns (loss, dh, dw, dloss_dtw, lse), each empty when not needed: loss, fp32, a scalar or (N,) for
    "none"; dh (N, D) and dw (V, D), the gradients for an upstream gradient of 1, computed now unless they
    are deferred (_deferred); dloss_dtw (N,) fp32, ∂loss/∂token_weight for an upstream gradient of 1; lse
    (N,) fp32 in base-2 units, kept for a deferred backward. Ignored rows get zeros in dh, dloss_dtw and lse."""
    N = hidden.shape[0]
    n_kept, kept = _kept_rows(target, weight.shape[0], ignore_index)
    h, t, tw = _select(kept, hidden, target.long(), None if token_weight is None else token_weight.float())
    r = 1.0 / n_kept if reduction == "mean" and n_kept else 1.0
    now = not _deferred(reduction, hidden.dtype)
    row_scale = None
    if now and (need_dh or need_dw):  # c_n = r · w_n
        row_scale = torch.full((h.shape[0],), r, dtype=torch.float32, device=h.device) if tw is None else tw * r
    lse, ell, dh, dw = ce_chunks(h, weight, t, row_scale, None, need_dh and now, need_dw and now, accum_dtype,
                                 dw_wanted=need_dw)
    weighted = ell if tw is None else ell * tw
    if reduction == "none":
        loss = _scatter_rows(weighted, kept, N)
    elif reduction == "mean":
        loss = weighted.sum() / n_kept  # 0 / 0 = NaN without kept rows, as F.cross_entropy
    else:
        loss = weighted.sum()
    return (loss,
            absent(hidden) if dh is None else _scatter_rows(dh, kept, N),
            absent(weight) if dw is None else dw,
            _scatter_rows(ell * r, kept, N) if need_dtw else absent(ell),
            _scatter_rows(lse, kept, N) if not now and (need_dh or need_dw) else absent(lse))


def _bwd_fake(hidden, weight, target, token_weight, lse, grad, reduction, ignore_index, accum_dtype, need_dh,
              need_dw):
    return hidden.new_empty(hidden.shape if need_dh else (0,)), weight.new_empty(weight.shape if need_dw else (0,))


@launcher("linear_cross_entropy_bwd", fake=_bwd_fake, host_sync=True)
def ce_backward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, token_weight: torch.Tensor | None,
                lse: torch.Tensor, grad: torch.Tensor, reduction: str, ignore_index: int,
                accum_dtype: torch.dtype | None, need_dh: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The deferred backward: (dh, dw) for the upstream gradient `grad` (fp32: one element for mean/sum,
    (N,) for "none"), from ce_forward's arguments and its lse, each empty when not needed. The kept rows
    are found again (a second host sync, on these paths only; fp16 reads α back too: _fp16_grad_scale)."""
    N = hidden.shape[0]
    n_kept, kept = _kept_rows(target, weight.shape[0], ignore_index)
    if reduction == "none":
        (g_rows,) = _select(kept, grad.reshape(N))
    else:  # fp16 mean/sum: one upstream gradient for every row
        r = 1.0 / n_kept if reduction == "mean" and n_kept else 1.0
        g_rows = (grad.reshape(()) * r).expand(n_kept).contiguous()
    h, t, tw, lse = _select(kept, hidden, target.long(), None if token_weight is None else token_weight.float(), lse)
    row_scale = g_rows if tw is None else g_rows * tw
    alpha = _fp16_grad_scale(row_scale) if hidden.dtype == torch.float16 else 1.0
    if alpha != 1.0:
        row_scale = row_scale / alpha  # a power of two: exact
    _, _, dh, dw = ce_chunks(h, weight, t, row_scale, lse, need_dh, need_dw, accum_dtype, grad_scale=alpha)
    return (absent(hidden) if dh is None else _scatter_rows(dh, kept, N)), (absent(weight) if dw is None else dw)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd over ce_forward / ce_backward. Inputs come flattened and validated: hidden (N, D), weight
    (V, D), target (N,), token_weight (N,) or None; need_*: whether hidden, weight and token_weight get a
    gradient (grad mode on and the input requiring one)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype, need_dh, need_dw,
                need_dtw):
        loss, dh, dw, dloss_dtw, lse = ce_forward(hidden, weight, target, token_weight, reduction, ignore_index,
                                                  accum_dtype, need_dh, need_dw, need_dtw)
        later = _deferred(reduction, hidden.dtype) and (need_dh or need_dw)
        # target only where the backward reads it: a loader may refill its buffer before backward()
        ctx.save_for_backward(*((hidden, weight, token_weight, lse) if later else (None,) * 4),
                              target if later or need_dtw else None, dh, dw, dloss_dtw)
        ctx.options = (reduction, ignore_index, accum_dtype, need_dh, need_dw, need_dtw, later)
        ctx.token_weight_dtype = None if token_weight is None else token_weight.dtype
        ctx.scaled = False
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss):
        if ctx.scaled:  # before the saved tensors are unpacked: autograd would refuse them with a vaguer message
            raise RuntimeError("linear_cross_entropy: backward ran twice over the same graph; its gradients are "
                               "computed in the forward and scaled in place by the first backward")
        hidden, weight, token_weight, lse, target, dh, dw, dloss_dtw = ctx.saved_tensors
        reduction, ignore_index, accum_dtype, need_dh, need_dw, need_dtw, later = ctx.options
        # contiguous: the kernels read the gradient with unit stride, and (B, S).sum() hands back an expanded g
        g = grad_loss.float().contiguous()
        if later:
            dh, dw = ce_backward(hidden, weight, target, token_weight, lse, g, reduction, ignore_index,
                                 accum_dtype, need_dh, need_dw)
        elif (need_dh or need_dw) and torch.compiler.is_compiling():
            # Traced (torch.compile): new tensors, as a traced backward may not write its saved tensors. g is
            # one element here (mean/sum); an empty (not needed) gradient stays empty. Inductor still scales
            # in place: AOTAutograd donates the saved dh and dw to the backward graph, whose buffers Inductor
            # reuses (tests/test_library_ops.py checks that the returned gradients are the forward's).
            dh, dw = (_scaled(t, g) for t in (dh, dw))
        elif (need_dh or need_dw) and dispatch_modes():
            # Under a TorchDispatchMode (FlopCounterMode, FakeTensorMode, ...): the same in-place scaling in
            # torch ops, which the mode sees (_scale_'s launch is no op at all: FakeTensorMode would hand it
            # tensors without memory), a block of rows at a time, so that the fp32 temporaries stay small
            # beside a (V, D) dW of a large vocabulary.
            ctx.scaled = True
            for t in (dh, dw):
                for rows in t.split(max(1, _MODE_SCALE_ELEMENTS // max(1, t.shape[-1]))):
                    rows.copy_(_scaled(rows, g))
        elif need_dh or need_dw:
            ctx.scaled = True
            # The gradients were computed for an upstream gradient of 1: scale them in place (no copies).
            for grad in (dh, dw):
                if grad.numel():
                    _scale_(grad, g)
        dtw = None
        if need_dtw:  # ignored rows get 0 whatever their upstream gradient ("none": inf · 0 would be NaN)
            dtw = torch.where(target != ignore_index, g * dloss_dtw, 0.0).to(ctx.token_weight_dtype)
        return (dh if need_dh else None), (dw if need_dw else None), None, dtw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         token_weight: torch.Tensor | None = None, reduction: str = "mean", ignore_index: int = -100,
                         *, accum_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Cross entropy of hidden @ weightᵀ without materialising the logits.

    Args:
        hidden: (..., D) float32/float16/bfloat16; weight: (V, D), same dtype and device.
        target: (...) int64/int32 in [0, V) or ignore_index; token_weight: optional (...) float tensor.
        reduction: "mean" (weighted sum over the number of kept rows), "sum" or "none".
        accum_dtype: torch.float32 or None (the weight's dtype): what dW sums its chunks in.
    Returns:
        fp32 loss: a scalar, or target's shape for "none". Gradients for hidden, weight, token_weight.
    """
    check_linear_cross_entropy_args(hidden, weight, target, token_weight, reduction, ignore_index, accum_dtype)
    check_kernel_device(hidden, "hidden")
    h = as_rows(hidden)  # (N, D), unit stride along D (a copy only when no such view exists)
    t = target.reshape(-1)  # any stride: the kernel takes it
    tw = None if token_weight is None else token_weight.reshape(-1)
    grad = torch.is_grad_enabled()
    need = (grad and h.requires_grad, grad and weight.requires_grad, grad and tw is not None and tw.requires_grad)
    loss = LinearCrossEntropyFunction.apply(h, weight, t, tw, reduction, ignore_index, accum_dtype, *need)
    return loss.reshape(target.shape) if reduction == "none" else loss
