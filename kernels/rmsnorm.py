"""Fused RMSNorm with an optional pre-norm residual add: Triton forward and backward.

Forward, per row of N elements, in fp32 whatever the storage dtype:
    s    = x + residual                (with a residual: rounded to x's dtype, stored and returned)
    rstd = 1 / sqrt(mean(s²) + eps)    (stored per row, fp32, for the backward)
    y    = s · rstd · w

Backward. With ŝ = s·rstd and g = dy·w, and d(rstd)/ds = -rstd³·s/N:
    ds = rstd · (g - ŝ · mean(g·ŝ))    (+ ds_out, the gradient reaching the returned s)
    dw = Σ_rows dy·ŝ
    dx = dresidual = ds
dw is reduced deterministically: each program of a persistent grid accumulates its own rows in fp32
and writes one partial row; a second kernel sums the (programs, N) partials in a fixed order, in fp32,
and stores dw in the weight's dtype (one launch where a torch sum and a cast were two ops). No atomics, so two
runs give bit-identical gradients (on one GPU, within one process: the warp count the autotuner picks
sets the order of the in-row fp32 sums, so another process may round the last bit differently).
The backward issues the loads of a program's next row block before working on the current one.

Limits and paths: any N from 1 to 268,431,360 (tested to 65536; beyond, the backward's grid would pass
CUDA's 65535 column programs of 4096) and any row count (0 rows returns empty tensors). A row
of up to 16384 elements (forward) / 8192 (backward) is held in registers and read once; wider rows are
processed in 4096-wide chunks, which costs the forward a second read of the row (mostly from L2) and the
backward a separate pass for mean(g·ŝ). Rows narrower than the tile (4096 elements forward, 8192
backward) are packed several to a program.
Inputs need unit stride along N only; any row stride is read in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_rms_norm_args
from ._common import (TunedKernel, absent, as_rows, cdiv, check_grid_columns, check_kernel_device, empty,
                      first_order_only, interpreting, launcher, no_transform, num_sms, prune_row_configs, row_configs,
                      row_tile)

# Widest row kept whole in registers. The backward holds four row tiles (dy, s, w, the dw accumulator)
# against the forward's two, hence the lower limit.
FWD_MAX_BLOCK_N = 16384
BWD_MAX_BLOCK_N = 8192
CHUNK_N = 4096
# Elements of a row tile per program; rows narrower than this are packed several to a program.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 8192
# Persistent backward programs per multiprocessor. The backward kernel needs ~100-128 registers per
# thread, so one 16-warp program fills an SM; with two row blocks in flight per program (8192-element
# tiles plus the prefetch) one program per SM was the fastest setting measured on an H200
# (benchmarks/tune_rmsnorm.py, GPU time of fwd+bwd at 16384x4096 bf16: 0.175 ms, others 0.177-0.195).
BWD_PROGRAMS_PER_SM = 1


@triton.jit
def _row_ptrs(PTR, rows, stride_row, cols):
    # int64 row offsets: rows × stride passes 2^31 for (32768 × 65536) inputs.
    return PTR + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]


@triton.jit
def _load_s(X, R, S, rows, cols, mask, stride_x_row, stride_r_row, stride_s_row, HAS_RESIDUAL: tl.constexpr):
    """One tile of s = x (+ residual: then rounded to the storage dtype and written to S), in fp32."""
    s = tl.load(_row_ptrs(X, rows, stride_x_row, cols), mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(_row_ptrs(R, rows, stride_r_row, cols), mask=mask, other=0.0).to(tl.float32)
        # Normalise the rounded s that is returned (and that the backward reads), not the fp32 sum.
        s = s.to(S.dtype.element_ty)
        tl.store(_row_ptrs(S, rows, stride_s_row, cols), s, mask=mask)
        s = s.to(tl.float32)
    return s


@triton.jit
def _scale(t, W, cols, col_mask, HAS_WEIGHT: tl.constexpr):
    """t (rows, cols) times the weight's columns, in fp32; t itself without a weight."""
    if HAS_WEIGHT:
        t = t * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return t


@triton.autotune(configs=row_configs(), key=["N", "BLOCK_M", "BLOCK_N", "HAS_RESIDUAL", "HAS_WEIGHT", "SINGLE_PASS"],
                 prune_configs_by={"early_config_prune": prune_row_configs})
@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, Rstd,
    stride_x_row, stride_r_row, stride_y_row, stride_s_row,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Without HAS_WEIGHT, W is not read: y = s · rstd (torch.nn.RMSNorm(elementwise_affine=False))."""
    # int64 rows: program_id · BLOCK_M passes 2^31 once M does (narrow rows, BLOCK_M > 1), and the mask and
    # the Rstd offsets take rows as they are
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    # A Python float argument may be specialised to fp64, which would promote the whole row to fp64
    # (Liger-Kernel PR #1350): pin it to fp32.
    eps = tl.cast(eps, tl.float32)
    if SINGLE_PASS:
        mask = row_mask[:, None] & (cols < N)[None, :]
        s = _load_s(X, R, S, rows, cols, mask, stride_x_row, stride_r_row, stride_s_row, HAS_RESIDUAL)
        rstd = tl.math.rsqrt(tl.sum(s * s, axis=1) / N + eps)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = _scale(s * rstd[:, None], W, cols, cols < N, HAS_WEIGHT)
        tl.store(_row_ptrs(Y, rows, stride_y_row, cols), y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: the sum of squares (and s, written out), chunk by chunk.
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            s = _load_s(X, R, S, rows, c, mask, stride_x_row, stride_r_row, stride_s_row, HAS_RESIDUAL)
            sum_sq += tl.sum(s * s, axis=1)
        rstd = tl.math.rsqrt(sum_sq / N + eps)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        # Pass 2: normalise; the row was just read by this program, so this re-read mostly hits L2.
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            if HAS_RESIDUAL:
                s = tl.load(_row_ptrs(S, rows, stride_s_row, c), mask=mask, other=0.0).to(tl.float32)
            else:
                s = tl.load(_row_ptrs(X, rows, stride_x_row, c), mask=mask, other=0.0).to(tl.float32)
            y = _scale(s * rstd[:, None], W, c, c < N, HAS_WEIGHT)
            tl.store(_row_ptrs(Y, rows, stride_y_row, c), y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=row_configs(), key=["N", "BLOCK_M", "BLOCK_N", "HAS_WEIGHT"],
                 prune_configs_by={"early_config_prune": prune_row_configs})
@triton.jit
def _rms_norm_bwd_row_dot_kernel(
    DY, S, W, Rstd, RowDot,
    stride_dy_row, stride_s_row,
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):
    """mean(g·ŝ) per row, for rows too wide for the backward kernel to hold whole."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for off in range(0, N, BLOCK_N):
        c = off + cols
        mask = row_mask[:, None] & (c < N)[None, :]
        dy = tl.load(_row_ptrs(DY, rows, stride_dy_row, c), mask=mask, other=0.0).to(tl.float32)
        s = tl.load(_row_ptrs(S, rows, stride_s_row, c), mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(_scale(dy, W, c, c < N, HAS_WEIGHT) * s, axis=1)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    tl.store(RowDot + rows, acc * rstd / N, mask=row_mask)


@triton.jit
def _load_bwd_block(DY, S, Rstd, DS_OUT, rows, cols, col_mask, M, stride_dy_row, stride_s_row, stride_dso_row,
                    HAS_DS_OUT: tl.constexpr):
    """The loads of one backward row block, left in their storage dtypes (half the registers while
    in flight). Without DS_OUT, dso is dy again: a placeholder the caller never reads."""
    mask = (rows < M)[:, None] & col_mask[None, :]
    dy = tl.load(_row_ptrs(DY, rows, stride_dy_row, cols), mask=mask, other=0.0)
    s = tl.load(_row_ptrs(S, rows, stride_s_row, cols), mask=mask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=rows < M, other=0.0)
    if HAS_DS_OUT:
        dso = tl.load(_row_ptrs(DS_OUT, rows, stride_dso_row, cols), mask=mask, other=0.0)
    else:
        dso = dy
    return dy, s, rstd, dso


@triton.autotune(configs=row_configs(),
                 key=["N", "BLOCK_M", "BLOCK_N", "SINGLE_PASS", "HAS_DS_OUT", "HAS_WEIGHT", "COMPUTE_DW", "HAS_DRES"],
                 prune_configs_by={"early_config_prune": prune_row_configs})
@triton.jit
def _rms_norm_bwd_kernel(
    DY, S, W, Rstd, RowDot, DS_OUT, DX, DRES, DW_partial,
    stride_dy_row, stride_s_row, stride_dso_row, stride_dx_row, stride_dres_row,
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr, HAS_DS_OUT: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """Persistent over rows: program (i, j) takes row blocks i, i + num_programs(0), ... for the
    columns of block j (one block, the whole row, when SINGLE_PASS). Writes dx and, with COMPUTE_DW,
    the program's fp32 partial sum of dy·ŝ into row i of DW_partial. Without HAS_WEIGHT, g = dy (W is not
    read, and there is no dw). With HAS_DRES, dx is stored into DRES too (the residual's own gradient
    buffer: a second store, not a copy that would read dx again)."""
    tl.static_assert(HAS_WEIGHT or not COMPUTE_DW)
    pid_m = tl.program_id(0)
    # int64 row starts, as in the forward: below M = 2^31 (then an int32 argument), start + step would wrap
    # to a negative row that the mask rows < M lets through
    first = pid_m.to(tl.int64) * BLOCK_M
    step = tl.num_programs(0).to(tl.int64) * BLOCK_M
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if COMPUTE_DW:
        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Software-pipelined by hand: the next row block's loads are issued before this block's reduction,
    # arithmetic and stores, so each program keeps two blocks in flight instead of waiting a full memory
    # latency per block. (num_stages does not pipeline these loads: they feed no tl.dot.)
    dy_next, s_next, rstd_next, dso_next = _load_bwd_block(
        DY, S, Rstd, DS_OUT, first + tl.arange(0, BLOCK_M), cols, col_mask, M,
        stride_dy_row, stride_s_row, stride_dso_row, HAS_DS_OUT)
    for start in tl.range(first, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        dy = dy_next.to(tl.float32)
        s = s_next.to(tl.float32)
        rstd = rstd_next
        if HAS_DS_OUT:
            dso = dso_next.to(tl.float32)
        # Past the last block the masks are all false: nothing is read.
        dy_next, s_next, rstd_next, dso_next = _load_bwd_block(
            DY, S, Rstd, DS_OUT, rows + step, cols, col_mask, M,
            stride_dy_row, stride_s_row, stride_dso_row, HAS_DS_OUT)

        s_hat = s * rstd[:, None]
        if HAS_WEIGHT:
            g = dy * w[None, :]
        else:
            g = dy
        if SINGLE_PASS:
            row_dot = tl.sum(g * s_hat, axis=1) / N
        else:
            row_dot = tl.load(RowDot + rows, mask=rows < M, other=0.0)
        dx = (g - s_hat * row_dot[:, None]) * rstd[:, None]
        if HAS_DS_OUT:
            dx += dso
        dx = dx.to(DX.dtype.element_ty)
        tl.store(_row_ptrs(DX, rows, stride_dx_row, cols), dx, mask=mask)
        if HAS_DRES:
            tl.store(_row_ptrs(DRES, rows, stride_dres_row, cols), dx, mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * s_hat
    if COMPUTE_DW:
        tl.store(DW_partial + pid_m.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# Columns per program and partial rows per step of the dW reduction: 4096 columns make 32 programs,
# each summing (programs, 128) fp32 partials, 32 rows at a time.
DW_REDUCE_BLOCK_N = 128
DW_REDUCE_BLOCK_P = 32


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest, ties to even (a GPU's cast), in integer arithmetic: the same result
    on the interpreter, whose fp32 -> bf16 cast truncates (triton 3.6, interpreter.py cast_impl; its
    explicit "rtne" rounds ties up and drops the carry into the exponent). NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, x.to(tl.bfloat16), bits.to(tl.uint16).to(tl.bfloat16, bitcast=True))


@triton.autotune(configs=[triton.Config({}, num_warps=1 if interpreting() else 4, num_stages=1)], key=["N"])
@triton.jit
def _rms_norm_dw_reduce_kernel(DW_partial, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dw[cols] = the sum over the P partial rows, in fp32, BLOCK_P rows at a time in row order (a fixed
    order: deterministic), stored in DW's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(_row_ptrs(DW_partial, rows, N, cols), mask=mask, other=0.0), axis=0)
    if DW.dtype.element_ty == tl.bfloat16:
        dw = _to_bf16_rtne(acc)
    else:
        dw = acc.to(DW.dtype.element_ty)
    tl.store(DW + cols, dw, mask=col_mask)


# Launched through the tuned-config cache (kernels/_common.py), with every argument in declaration order.
_fwd = TunedKernel(_rms_norm_fwd_kernel)
_row_dot = TunedKernel(_rms_norm_bwd_row_dot_kernel)
_bwd = TunedKernel(_rms_norm_bwd_kernel)
_dw_reduce = TunedKernel(_rms_norm_dw_reduce_kernel)


# Rows per program at most (row_tile's limit): M beyond it does not change a launch's tile.
MAX_BLOCK_M = 64
_tiles = {}  # launch_tile's answers, keyed by everything they depend on (the tuning script sets the constants)


def launch_tile(N: int, M: int, backward: bool) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, SINGLE_PASS) of a forward or backward launch over M rows of N: whole rows up to
    the direction's widest (narrow ones packed several to a program), else one row at a time in CHUNK_N
    column chunks. Remembered: this is on every launch's host path."""
    key = (N, min(M, MAX_BLOCK_M), backward, FWD_MAX_BLOCK_N, FWD_TILE_ELEMENTS, BWD_MAX_BLOCK_N, BWD_TILE_ELEMENTS,
           CHUNK_N)
    tile = _tiles.get(key)
    if tile is None:
        max_n, elements = (BWD_MAX_BLOCK_N, BWD_TILE_ELEMENTS) if backward else (FWD_MAX_BLOCK_N, FWD_TILE_ELEMENTS)
        block_m, block_n, single = row_tile(N, max_n, elements, max_block_m=MAX_BLOCK_M, rows=key[1])
        tile = _tiles[key] = (block_m, block_n, True) if single else (1, CHUNK_N, False)
    return tile


def _rms_norm_fwd_fake(x, weight, eps, residual=None):
    M, N = x.shape
    s_shape = (M, N) if residual is not None else (0,)
    return x.new_empty((M, N)), x.new_empty(s_shape), x.new_empty((M,), dtype=torch.float32)


@launcher("rms_norm_fwd", fake=_rms_norm_fwd_fake)
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on row views. x, residual: (M, N) with unit stride along N; weight: (N,),
    contiguous, or None (no scale). Returns (y, s, rstd): y (M, N) of x's dtype; s = x + residual, a new
    (M, N) tensor (empty without a residual: the normalised input is x itself); rstd (M,) fp32."""
    M, N = x.shape
    y = empty((M, N), x.dtype, x.device)
    s = absent(x) if residual is None else empty((M, N), x.dtype, x.device)
    rstd = empty((M,), torch.float32, x.device)
    if M == 0:
        return y, s, rstd
    block_m, block_n, single = launch_tile(N, M, backward=False)
    has_res = residual is not None
    s_arg = s if has_res else x  # S is neither read nor written without a residual
    _fwd.launch(
        (cdiv(M, block_m),),
        x, residual, weight, y, s_arg, rstd,
        x.stride(0), residual.stride(0) if has_res else 0, y.stride(0), s_arg.stride(0),
        M, N, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=has_res, HAS_WEIGHT=weight is not None, SINGLE_PASS=single,
    )
    return y, s, rstd


def _rms_norm_bwd_fake(dy, s, weight, rstd, ds_out=None, compute_dw=True, separate_dres=False):
    dw = weight.new_empty(weight.shape) if compute_dw and weight is not None else s.new_empty((0,))
    return s.new_empty(s.shape), dw, s.new_empty(s.shape if separate_dres else (0,))


@launcher("rms_norm_bwd", fake=_rms_norm_bwd_fake)
def rms_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 ds_out: torch.Tensor | None = None, compute_dw: bool = True,
                 separate_dres: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. dy, s, ds_out: (M, N) with unit stride along N; weight (N,) contiguous, or
    None (no scale: there is no dw); rstd (M,) fp32 from the forward. Returns (dx, dw, dres): dx (M, N) of
    s's dtype (it is also the residual's gradient); dw (N,) of weight's dtype, or an empty tensor (of s's
    dtype) without compute_dw or weight; dres, with separate_dres, a second (M, N) buffer holding dx (the
    same kernel stores it twice), else an empty tensor."""
    M, N = s.shape
    dx = empty((M, N), s.dtype, s.device)
    dres = empty((M, N), s.dtype, s.device) if separate_dres else absent(s)
    has_weight = weight is not None
    if not has_weight:
        compute_dw = False
    if M == 0:
        return dx, (torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device) if compute_dw
                    else absent(s)), dres
    block_m, block_n, single = launch_tile(N, M, backward=True)
    row_dot = None
    if not single:
        row_dot = empty((M,), torch.float32, s.device)
        _row_dot.launch(
            (M,),
            dy, s, weight, rstd, row_dot, dy.stride(0), s.stride(0), M, N,
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=has_weight,
        )
    n_col_blocks = cdiv(N, block_n)
    n_row_progs = max(1, min(cdiv(M, block_m), num_sms(s.device) * BWD_PROGRAMS_PER_SM // n_col_blocks))
    dw_partial = empty((n_row_progs, N), torch.float32, s.device) if compute_dw else None
    has_dso = ds_out is not None
    _bwd.launch(
        (n_row_progs, n_col_blocks),
        dy, s, weight, rstd, row_dot, ds_out, dx, dres if separate_dres else dx, dw_partial,
        dy.stride(0), s.stride(0), ds_out.stride(0) if has_dso else 0, dx.stride(0),
        dres.stride(0) if separate_dres else 0,
        M, N,
        BLOCK_M=block_m, BLOCK_N=block_n,
        SINGLE_PASS=single, HAS_DS_OUT=has_dso, HAS_WEIGHT=has_weight, COMPUTE_DW=compute_dw,
        HAS_DRES=separate_dres,
    )
    if not compute_dw:
        return dx, absent(s), dres
    dw = empty((N,), weight.dtype, s.device)
    _dw_reduce.launch((cdiv(N, DW_REDUCE_BLOCK_N),), dw_partial, dw, n_row_progs, N,
                      BLOCK_P=DW_REDUCE_BLOCK_P, BLOCK_N=DW_REDUCE_BLOCK_N)
    return dx, dw, dres


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """Gradients may arrive as expanded views (stride 0 along N, from a .sum()): copy only then."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Autograd over (M, N) row views and a contiguous weight (or None); `rms_norm` prepares both."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s, rstd = rms_norm_fwd(x, weight, eps, residual)
        if residual is None:
            s = x  # what was normalised
        elif not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            ctx.mark_non_differentiable(s)  # x + residual needs no gradient (as on the reference path)
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_residual = residual is not None
        # Unused outputs (s, when only y is used) arrive as None instead of a zero-filled tensor.
        ctx.set_materialize_grads(False)
        return (y, s) if residual is not None else y

    @staticmethod
    @first_order_only
    def backward(ctx, dy, ds_out=None):
        s, w, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None:
            # Only s = x + residual reached the loss (or neither output: None throughout): its gradient passes
            # to both unchanged, and the weight gets none (None, as on the reference path: a zero .grad would
            # still feed the optimizer's momentum and weight decay). Never one tensor for both (see below).
            # (Eager only: AOTAutograd hands a traced backward zeros for y's gradient, and that one computes.)
            dres = ds_out.clone() if need[0] and need[2] and ds_out is not None else ds_out
            return ds_out, None, dres, None
        # dx is also the residual's gradient, but the two get separate buffers whenever both are wanted:
        # when x reaches a leaf through ops whose backward hands the gradient on unchanged (a clone, a
        # same-shape add, a view), autograd can store dx itself as that leaf's .grad and the residual's leaf
        # a view of it too (pytorch#34082), and an in-place update of one (accumulation over micro-batches,
        # clipping) would change both. The kernel stores dx a second time: one more (M, N) write.
        separate = ctx.has_residual and need[0] and need[2]
        dx, dw, dres = rms_norm_bwd(_unit_stride(dy), s, w, rstd,
                                    ds_out=_unit_stride(ds_out) if ds_out is not None else None,
                                    compute_dw=need[1], separate_dres=separate)
        dres = (dres if separate else dx) if ctx.has_residual else None
        return dx, dw if need[1] else None, dres, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """Fused RMSNorm (Triton), with the optional pre-norm residual add.

    Args:
        x: (..., N), float32, float16 or bfloat16, on a CUDA device (or CPU under TRITON_INTERPRET=1).
            Any strides; only a non-unit stride along N, or leading dims that do not merge, costs a copy.
        weight: (N,), any of those dtypes, on x's device; None: no scale (torch.nn.RMSNorm with
            elementwise_affine=False), nothing read in its place.
        eps: float >= 0.
        residual: optional (..., N), x's shape, dtype and device.
    Returns:
        y: (..., N) in x's dtype, y = s · rsqrt(mean(s², -1) + eps) · weight (· 1 without) with s = x; or, with a
        residual, (y, s) where s = x + residual in x's dtype (the new residual stream).
    Raises:
        ValueError: naming the argument, for a wrong shape, dtype or device, before any launch.
    """
    check_rms_norm_args(x, weight, residual, eps)
    check_kernel_device(x, "x")
    check_grid_columns(x.shape[-1], CHUNK_N, "x", "a hidden size (last dim)")  # the backward's column chunks
    shape = x.shape
    x2 = as_rows(x)  # (M, N)
    w = None if weight is None else weight.contiguous()  # (differentiable: a copy passes its gradient on)
    # (an `or` chain, not any() over a generator: this is on every call's host path)
    no_backward = not torch.is_grad_enabled() or not (x.requires_grad or (w is not None and w.requires_grad)
                                                      or (residual is not None and residual.requires_grad))
    if no_backward and no_transform():
        # No backward to come (no_grad, inference, a frozen prefix): the launcher alone, without the
        # autograd.Function's per-call cost, a visible part of this op's host time (README, Measured).
        y, s, _ = rms_norm_fwd(x2, w, float(eps), None if residual is None else as_rows(residual))
        return y.view(shape) if residual is None else (y.view(shape), s.view(shape))
    if residual is None:
        return RMSNormFunction.apply(x2, w, None, float(eps)).view(shape)
    y, s = RMSNormFunction.apply(x2, w, as_rows(residual), float(eps))
    return y.view(shape), s.view(shape)
