"""SwiGLU MLP with frozen gate/up projections: a fused dual-GEMM Triton kernel, and a backward that
computes nothing for the frozen weights.

    g = x W_gateᵀ,  u = x W_upᵀ          (T, F): one pass over x feeds both, fp32 accumulators
    h = silu(g) · u                      (the epilogue; g and u are never written in the forward)
    y = h W_downᵀ                        (T, D): an ordinary matmul (cuBLAS)

Backward (W_gate, W_up frozen: no gradient computed or allocated for them). With σ = sigmoid(g),
silu(g) = g·σ and silu'(g) = σ·(1 + g·(1 - σ)):
    dh = dy W_down;   dg = dh · u · silu'(g);   du = dh · silu(g)
    dx = dg W_gate + du W_up;   dW_down = dyᵀ h
Two saving policies. recompute=True saves x alone: the backward runs the dual GEMM again and applies the
backward epilogue (h, dg, du from g, u and dh) before anything reaches memory. recompute=False makes the
forward also store g and u (what the backward needs, h being derivable from them) and the backward only
runs the elementwise epilogue. Both passes walk the tokens in chunks so that their (tokens × F)
transients (h in the forward; dh, dg, du in the backward) stay bounded (CHUNK_ELEMENTS). The backward
writes h for DW_GROUP_CHUNKS chunks side by side and runs one dW_down GEMM per such group; with several
groups dW_down sums them in fp32.

The frozen weights may be stored in another dtype than x (`frozen_dtype` of FrozenSwiGLU): tiles are
cast to x's dtype on load, so the dots run in x's dtype with fp32 accumulation. fp32 activations use
IEEE fp32 dots (no TF32).

FP8 frozen weights (float8_e4m3fn with per-output-channel fp32 scales s_g, s_u; W ≈ w8 · s[:, None]): x
is quantised per token (x ≈ x8 · s_x[:, None]; _quantize_rows_kernel, one launch, with the rounding of
kernels.reference.quantize_rows_fp8) and the dual GEMM multiplies FP8 tiles with fp32 accumulation;
since both scales are constant along the reduced dim, g = s_x[t] · s_g[f] · Σ_k x8[t,k] w8[f,k] is exact
up to the fp32 sum, applied in the epilogue before SiLU. (On Hopper an FP8 MMA sums into a narrower accumulator, ~14 bits;
each BLOCK_K step is promoted to the fp32 accumulator, as DeepSeek-V3 does every 128 products.)
The dx GEMM runs in FP8 too. With W = w8 · s[:, None], dx = (dg · s_g) w8_gate + (du · s_u) w8_up: the
backward epilogue multiplies dg and du by the weights' scales and stores them as FP8 with one scale per
token per FP8_GRAD_BLOCK features (a = a8 · s_a), beside each other in one (tokens × 2·Fp) operand
(each half zero-padded to Fp, whole blocks); the dx
GEMM runs over both halves against the transposed FP8 weights, scaling each K step's MMA result by its
row's block scale. So x's gradient passes the forward's quantisation of x straight through, and carries
FP8's rounding of its own operands (3-bit mantissa: about 2% relative L2 on random data).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_swiglu_args
from ._common import (TunedKernel, absent, as_rows, cdiv, check_grid_columns, check_kernel_device, distinct, empty,
                      first_order_only, grouped_tile, interpreting, launcher, next_power_of_2)
from .reference import FP8_MAX

# Token chunks: tokens per chunk × F stays under this many elements, for each (chunk × F) transient (h in
# the forward; dh, dg, du in the backward), and the fp32 dW_down product of one column block is at most
# half of it. At 16384 × 4096 × 14336 bf16: 1024-token chunks, 3 × 29 MB of transients, against the
# 2.75 GiB an eager fwd+bwd allocates there (shared/anchors-h200.md), whose 0.25x is the recompute goal.
CHUNK_ELEMENTS = 1024 * 14336
# The backward keeps h for this many chunks (4096 tokens, 117 MB at that shape) and runs one dW_down GEMM
# over them. With one chunk per GEMM (as at e3f8149) the fp32 dW_down buffer (235 MB there) was read and
# written, beside a product of its size, 16 times per backward at 16384 tokens, in 128 GEMMs with K 1024:
# that backward (fwd+bwd minus the inference forward) took 16.7 ms on an H200 against eager's 12.2. Four
# chunks cut that traffic by 11 GB and the GEMMs to 32 with K 4096, for 88 MB more (not yet timed); up to
# 4096 tokens dW_down is one GEMM rounded once, with no fp32 buffer.
DW_GROUP_CHUNKS = 4

# FP8 backward: dg·S_g and du·S_u are quantised with one scale per this many consecutive features of a
# token (DeepSeek-V3 §3.3.1 quantises activations per 1 × 128 tile: an outlier costs only its own block
# precision), which is also the K step of the FP8 dx GEMM, applying one scale per row per step.
FP8_GRAD_BLOCK = 128
_QB = tl.constexpr(FP8_GRAD_BLOCK)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _silu_parts(g):
    """silu(g) and silu'(g) in fp32."""
    sig = tl.sigmoid(g)
    silu = g * sig
    return silu, sig * (1.0 + g * (1.0 - sig))


@triton.jit
def _tile_ptrs(BASE, rows, cols, stride_row):
    return BASE + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per use. Two fp32 accumulators of BLOCK_M × BLOCK_N
# live in registers; the 16-bit lists compile for sm_90 (triton 3.6) without spills (benchmarks/
# compile_check.py; not yet timed on a GPU). The backward epilogue (mode 2) also holds dh and two more
# tiles, so it gets the narrower tiles. fp32 (IEEE dots): with frozen weights in another dtype (cast per
# tile) only the last, smallest config compiles without spills (the others spilled 4-8 KB), so that case
# gets it alone ("fp32_cast"). A config whose shared memory does not fit a GPU is dropped by the
# autotuner at its first launch there.
_GEMM_CONFIGS = {
    "fwd": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4)],
    "bwd": [(128, 64, 64, 8, 4), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4)],
    "fp32": [(128, 64, 64, 8, 4), (64, 64, 32, 4, 3), (64, 64, 32, 8, 3)],
    "fp32_cast": [(64, 64, 32, 8, 3)],
    # FP8 (float8_e4m3fn x and frozen weights): a byte per element, so twice the K step in the same
    # shared memory. All compile without spills (64 x 128 and 128 x 128 x 128 tiles spilled; left out).
    "fp8": [(128, 64, 128, 8, 4), (128, 64, 128, 8, 3), (128, 128, 64, 8, 4)],
    # The FP8 backward epilogue quantises whole FP8_GRAD_BLOCK column blocks: BLOCK_N 128. These two compile
    # without spills; BLOCK_K 128 spilled (24-48 bytes), as did every 128 × 128 and 4-warp tile tried.
    "fp8_bwd": [(64, 128, 64, 8, 4), (64, 128, 64, 8, 3)],
}
# The FP8 dx GEMM: (BLOCK_M, BLOCK_N, num_warps, num_stages); its K step is FP8_GRAD_BLOCK.
_FP8_DX_CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4)]


def _configs(tuples, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    """triton.Configs from (block sizes..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, t[:-2])), num_warps=t[-2], num_stages=t[-1]) for t in tuples]


def _gemm_configs(fp8_bwd=False):
    """The dual GEMM's configs: those of the FP8 backward (fp8_bwd) or all the others."""
    if interpreting():
        return _configs([(16, FP8_GRAD_BLOCK if fp8_bwd else 32, 16, 1, 1)])
    if fp8_bwd:
        return _configs(_GEMM_CONFIGS["fp8_bwd"])
    return _configs(sorted({c for name, cs in _GEMM_CONFIGS.items() if name != "fp8_bwd" for c in cs}))


def _prune_gemm(configs, nargs, **kwargs):
    """early_config_prune: the list for this mode and dtype, in its order (LWT_AUTOTUNE=0 launches the
    first; the FP8 backward has its own autotuner)."""
    if interpreting():
        return configs
    meta = {**nargs, **kwargs}
    if meta["SCALED"]:
        use = "fp8"
    else:
        use = "fp32" if meta["INPUT_PRECISION"] == "ieee" else ("bwd" if meta["MODE"] == 2 else "fwd")
        if use == "fp32" and meta["WG"].dtype != meta["X"].dtype:
            use = "fp32_cast"
    order = {entry: i for i, entry in enumerate(_GEMM_CONFIGS[use])}

    def entry(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages
    return sorted((c for c in configs if entry(c) in order), key=lambda c: order[entry(c)])


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "MODE", "INPUT_PRECISION", "SCALED"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _swiglu_dual_gemm_kernel(
    X, WG, WU, H, G, U, DH, DG, DU, SX, SG, SU, SDG, SDU,
    M, N, K,
    stride_x, stride_wg, stride_wu, stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, stride_sd,
    MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALED: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g, u = x W_gateᵀ, x W_upᵀ for one (BLOCK_M tokens × BLOCK_N features) tile, then the epilogue:
    MODE 0: h = silu(g)·u; MODE 1: also g and u (recompute=False's forward); MODE 2 (the recomputing
    backward): h, dg, du from g, u and DH. SCALED (FP8): X, WG, WU hold float8_e4m3fn values and the fp32
    products are multiplied by the per-token scale SX[row] and the per-channel scales SG[col], SU[col];
    MODE 2 then leaves dg·SG and du·SU in FP8 blocks (DG, DU, float8_e4m3fn; scales in SDG, SDU) for the
    FP8 dx GEMM."""
    # GROUP_M token tiles share each feature tile of the weights while it is in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Loads past the last token or feature wrap around to valid rows (the matmul tutorial's trick) and
    # only whole BLOCK_K steps run in the loop, so its loads carry no mask: masked loads there kept
    # triton 3.6 from pipelining them (no async copies in the TTGIR). A partial last K step follows.
    xp = _tile_ptrs(X, rows % M, ks, stride_x)
    gp = _tile_ptrs(WG, cols % N, ks, stride_wg)
    up = _tile_ptrs(WU, cols % N, ks, stride_wu)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_full = (K // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        acc_g, acc_u = _dual_step(xp + k0, gp + k0, up + k0, acc_g, acc_u, ks, K - k0, False, INPUT_PRECISION,
                                  SCALED, BLOCK_K)
    if k_full < K:
        acc_g, acc_u = _dual_step(xp + k_full, gp + k_full, up + k_full, acc_g, acc_u, ks, K - k_full, True,
                                  INPUT_PRECISION, SCALED, BLOCK_K)
    if SCALED:  # x ≈ x8 · SX[row], W ≈ w8 · S[col]: the scales factor out of the sum over K
        sx = tl.load(SX + rows % M)[:, None]
        acc_g = acc_g * sx * tl.load(SG + cols % N)[None, :]
        acc_u = acc_u * sx * tl.load(SU + cols % N)[None, :]
    _swiglu_epilogue(acc_g, acc_u, rows, cols, pid_n * BLOCK_N, M, N, H, G, U, DH, DG, DU, SG, SU, SDG, SDU,
                     stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, stride_sd, MODE,
                     SCALED and MODE == 2, BLOCK_M, BLOCK_N)


@triton.jit
def _dual_step(xp, gp, up, acc_g, acc_u, ks, k_left, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_g += x·W_gateᵀ and acc_u += x·W_upᵀ over one BLOCK_K step (MASKED: only k_left columns)."""
    if MASKED:
        x = tl.load(xp, mask=(ks < k_left)[None, :], other=0.0)
        wg = tl.load(gp, mask=(ks < k_left)[None, :], other=0.0)
        wu = tl.load(up, mask=(ks < k_left)[None, :], other=0.0)
    else:
        x = tl.load(xp)
        wg = tl.load(gp)
        wu = tl.load(up)
    if FP8:
        # Hopper's FP8 MMAs add into a narrower accumulator (~14 bits kept, DeepSeek-V3 §3.3.2): each step's
        # BLOCK_K products are summed there, then added to the fp32 accumulator (Triton's
        # max_num_imprecise_acc; its default on sm_90 never promotes).
        acc_g = tl.dot(x, tl.trans(wg), acc_g, max_num_imprecise_acc=BLOCK_K)
        acc_u = tl.dot(x, tl.trans(wu), acc_u, max_num_imprecise_acc=BLOCK_K)
    else:
        acc_g = tl.dot(x, tl.trans(wg.to(x.dtype)), acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(x, tl.trans(wu.to(x.dtype)), acc_u, input_precision=INPUT_PRECISION)
    return acc_g, acc_u


@triton.jit
def _swiglu_epilogue(g, u, rows, cols, col0, M, N, H, G, U, DH, DG, DU, SG, SU, SDG, SDU,
                     stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, stride_sd, MODE: tl.constexpr,
                     QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """From fp32 g and u of the tile at rows × cols (cols starting at col0): MODE 0 stores h; 1 stores h,
    g, u; 2 stores h, dg, du (reads DH). QUANT (MODE 2, FP8 frozen weights): dg·SG[col] and du·SU[col],
    the dx GEMM's operands once the weights' scales are moved onto them, go out as FP8 blocks."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    silu, dsilu = _silu_parts(g)
    h = silu * u
    tl.store(_tile_ptrs(H, rows, cols, stride_h), h.to(H.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(_tile_ptrs(G, rows, cols, stride_g), g.to(G.dtype.element_ty), mask=mask)
        tl.store(_tile_ptrs(U, rows, cols, stride_u), u.to(U.dtype.element_ty), mask=mask)
    if MODE == 2:
        dh = tl.load(_tile_ptrs(DH, rows, cols, stride_dh), mask=mask, other=0.0).to(tl.float32)
        dg = dh * u * dsilu
        du = dh * silu
        if QUANT:
            # dx = dg W_gate + du W_up with W = w8 · S[:, None]: dx = (dg · S_g) w8_gate + (du · S_u) w8_up
            dg = tl.where(mask, dg * tl.load(SG + cols % N)[None, :], 0.0)
            du = tl.where(mask, du * tl.load(SU + cols % N)[None, :], 0.0)
            _store_fp8_blocks(DG, SDG, dg, rows, cols, col0, M, N, stride_dg, stride_sd, BLOCK_M, BLOCK_N)
            _store_fp8_blocks(DU, SDU, du, rows, cols, col0, M, N, stride_du, stride_sd, BLOCK_M, BLOCK_N)
        else:
            tl.store(_tile_ptrs(DG, rows, cols, stride_dg), dg.to(DG.dtype.element_ty), mask=mask)
            tl.store(_tile_ptrs(DU, rows, cols, stride_du), du.to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _e4m3_rtne(v):
    """fp32 v (|v| <= 448) rounded to the nearest float8_e4m3fn value, ties to even, kept in fp32: the cast
    that follows only re-encodes it. (Triton 3.6's interpreter casts fp32 to FP8 wrongly: a round-up
    that carries out of the mantissa halves the value, ties go away from zero, subnormals truncate; a
    GPU's cvt.rn agrees with this.) The e4m3 grid's spacing is 2^k, k = max(exponent, -6) - 3; adding
    and subtracting 1.5·2^(k+23) rounds to a multiple of it in fp32's own round-to-nearest-even."""
    bits = v.to(tl.int32, bitcast=True)
    k = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    magic = (((k + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5·2^(k+23): exponent k + 23 + 127
    return (v + magic) - magic


@triton.jit
def _fp8_scale(amax):
    """The FP8 scale of values whose largest magnitude is amax: amax / 448 (1 where that is 0), exactly
    divided, as kernels.reference.quantize_blocks_fp8 computes it."""
    scale = tl.math.div_rn(amax, _FP8_MAX)
    return tl.where(scale > 0, scale, 1.0)  # also where a (subnormal) amax / 448 underflows to 0


@triton.jit
def _fp8_values(v, scale):
    """v / scale rounded to the e4m3 grid (still fp32: the cast to float8_e4m3fn only re-encodes it)."""
    return _e4m3_rtne(tl.math.div_rn(v, scale))


@triton.jit
def _store_fp8_blocks(A8, S, v, rows, cols, col0, M, N, stride_a, stride_s, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Stores the fp32 tile v (zero past column N) in FP8 with one scale per FP8_GRAD_BLOCK columns of a
    row (kernels.reference.quantize_blocks_fp8's rounding): A8 gets v / scale, S[row, block] the scale
    max|block| / 448 (1 for an all-zero block). A8's columns run to N rounded up to whole blocks; the
    padding gets zeros, so the dx GEMM's K loop needs no mask. Finite values assumed: a block holding a
    NaN gets an unspecified scale (a GPU's max drops NaN, torch's keeps it)."""
    QB: tl.constexpr = _QB
    tl.static_assert((BLOCK_N // QB) * QB == BLOCK_N, "FP8 backward: column tiles of whole quantisation blocks")
    blocks = tl.reshape(v, (BLOCK_M, BLOCK_N // QB, QB))
    scale = _fp8_scale(tl.max(tl.abs(blocks), axis=2))
    q = tl.reshape(_fp8_values(blocks, scale[:, :, None]), (BLOCK_M, BLOCK_N))
    n_blocks = tl.cdiv(N, QB)
    tl.store(_tile_ptrs(A8, rows, cols, stride_a), q.to(A8.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < n_blocks * QB)[None, :])
    block_ids = col0 // QB + tl.arange(0, BLOCK_N // QB)
    tl.store(_tile_ptrs(S, rows, block_ids, stride_s), scale,
             mask=(rows < M)[:, None] & (block_ids < n_blocks)[None, :])


@triton.jit
def _quantize_rows_kernel(X, X8, SX, D, stride_x, stride_x8, BLOCK_D: tl.constexpr):
    """One row of X to FP8 (kernels.reference.quantize_rows_fp8's rounding): SX[row] = max|row| / 448 (1
    for an all-zero row), X8[row] = X[row] / SX[row] rounded to nearest even. Two passes over the row,
    the second one mostly from cache. Finite values assumed, as in _store_fp8_blocks."""
    row = tl.program_id(0).to(tl.int64)
    x_row, x8_row = X + row * stride_x, X8 + row * stride_x8
    amax = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_row + offs, mask=offs < D, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = _fp8_scale(tl.max(amax, axis=0))
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_row + offs, mask=offs < D, other=0.0).to(tl.float32)
        tl.store(x8_row + offs, _fp8_values(v, scale).to(X8.dtype.element_ty), mask=offs < D)
    tl.store(SX + row, scale)


@triton.jit
def _swiglu_bwd_elementwise_kernel(G, U, DH, H, DG, DU, SG, SU, SDG, SDU, M, N, stride_g, stride_u, stride_dh,
                                   stride_h, stride_dg, stride_du, stride_sd, QUANT: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward epilogue from stored g and u (recompute=False): h, dg, du (QUANT: FP8 blocks of dg·SG,
    du·SU, as the recomputing backward leaves them with FP8 frozen weights)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(_tile_ptrs(G, rows, cols, stride_g), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(_tile_ptrs(U, rows, cols, stride_u), mask=mask, other=0.0).to(tl.float32)
    _swiglu_epilogue(g, u, rows, cols, tl.program_id(1) * BLOCK_N, M, N, H, G, U, DH, DG, DU, SG, SU, SDG, SDU,
                     stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, stride_sd, 2, QUANT,
                     BLOCK_M, BLOCK_N)


def _fp8_dx_configs():
    return _configs([(16, 32, 1, 1)] if interpreting() else _FP8_DX_CONFIGS, names=("BLOCK_M", "BLOCK_N"))


@triton.autotune(configs=_fp8_dx_configs(), key=["N", "K"])
@triton.jit
def _fp8_dx_kernel(A, SA, BT, DX, M, N, K, stride_a, stride_sa, stride_bt, stride_dx, GROUP_M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DX = A · BTᵀ for one (BLOCK_M × BLOCK_N) tile, with A given as FP8 blocks: A[r, k] = A8[r, k] ·
    SA[r, k // QB]. Each QB-wide K step is one FP8 MMA chain whose fp32 result is multiplied by its row
    scales and added to the fp32 accumulator (the per-block scaling of DeepSeek-V3 §3.3.2, which also
    promotes the MMA's narrower accumulator every QB products). K is a multiple of QB (zero-padded)."""
    QB: tl.constexpr = _QB
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, QB)
    ap = _tile_ptrs(A, rows % M, ks, stride_a)  # wrapped rows and columns, as in the dual GEMM
    bp = _tile_ptrs(BT, cols % N, ks, stride_bt)
    sp = SA + (rows % M).to(tl.int64) * stride_sa
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(0, K // QB):
        part = tl.dot(tl.load(ap + kb * QB), tl.trans(tl.load(bp + kb * QB)))
        acc += part * tl.load(sp + kb)[:, None]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(_tile_ptrs(DX, rows, cols, stride_dx), acc.to(DX.dtype.element_ty), mask=mask)


_dual_gemm = TunedKernel(_swiglu_dual_gemm_kernel)
# The same kernel in the FP8 backward (MODE 2, SCALED), whose tiles must hold whole quantisation blocks.
_swiglu_fp8_bwd_kernel = triton.autotune(configs=_gemm_configs(fp8_bwd=True), key=["N", "K"])(
    _swiglu_dual_gemm_kernel.fn)
_dual_gemm_fp8_bwd = TunedKernel(_swiglu_fp8_bwd_kernel)
_fp8_dx = TunedKernel(_fp8_dx_kernel)
_GROUP_M = 8
_ELEMENTWISE_BLOCK = (32, 128)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _launch_dual_gemm(x, w_gate, w_up, mode, dh=None, gu_out=None, w_scales=None, fp8_out=None, h_out=None):
    """The dual GEMM over x (T, D) with its epilogue. Returns h, and (g, u) for mode 1 or (dg, du) for
    mode 2, each (T, F) in x's dtype. gu_out: (g, u) views to write mode 1's g and u into; h_out: a (T, F)
    view (unit stride along F) to write h into. w_scales:
    (s_gate, s_up), (F,) fp32, for FP8 weights: then x is quantised per token (_quantize_rows, the
    reference's rounding; rows are independent, so chunk by chunk) and the GEMM runs on FP8 operands.
    Mode 2 with FP8 weights writes dg·s_gate and du·s_up as FP8 blocks into fp8_out (the views of
    _fp8_dx_operands) instead, and returns (h, None, None)."""
    T, D = x.shape
    F = w_gate.shape[0]
    out_dtype = x.dtype
    if (mode == 2 and w_scales is not None) != (fp8_out is not None):
        raise AssertionError("the FP8 backward (mode 2 with FP8 weights) writes into fp8_out, and only it does")
    scales = None
    if w_scales is not None:
        x, sx = _quantize_rows(x)
        scales = (sx, *w_scales)
    h = empty((T, F), out_dtype, x.device) if h_out is None else h_out
    if fp8_out is not None:
        a = b = None
    elif gu_out is not None:
        a, b = gu_out
    else:
        a = empty((T, F), out_dtype, x.device) if mode else h  # g (mode 1) or dg (mode 2)
        b = empty((T, F), out_dtype, x.device) if mode else h  # u or du
    if T == 0:
        return h, a, b
    dh_ = dh if dh is not None else h  # read only in mode 2
    if fp8_out is not None:
        g = u = h  # unread in mode 2
        (dg, du), (sdg, sdu) = fp8_out
    else:
        g, u, dg, du = (a, b, h, h) if mode == 1 else (h, h, a, b)
        sdg = sdu = h  # unread: only the FP8 backward writes block scales
    sx, sg, su = scales if scales is not None else (h, h, h)  # unread without SCALED
    (_dual_gemm_fp8_bwd if fp8_out is not None else _dual_gemm).launch(
        lambda m: (cdiv(T, m["BLOCK_M"]) * cdiv(F, m["BLOCK_N"]),),
        x, w_gate, w_up, h, g, u, dh_, dg, du, sx, sg, su, sdg, sdu,
        T, F, D,
        x.stride(0), w_gate.stride(0), w_up.stride(0), h.stride(0), g.stride(0), u.stride(0), dh_.stride(0),
        dg.stride(0), du.stride(0), sdg.stride(0),
        MODE=mode, INPUT_PRECISION=_precision(x), SCALED=scales is not None, GROUP_M=_GROUP_M,
    )
    return h, a, b


def _quantize_rows(x: torch.Tensor):
    """x (T, D), unit stride along D -> (x8 (T, D) float8_e4m3fn, scale (T,) fp32): per-token FP8, as
    kernels.reference.quantize_rows_fp8 (the same values) in one launch."""
    T, D = x.shape
    x8 = empty((T, D), torch.float8_e4m3fn, x.device)
    scale = empty((T,), torch.float32, x.device)
    if T:
        block = min(256 if interpreting() else 4096, next_power_of_2(max(D, 16)))
        _quantize_rows_kernel[(T,)](x, x8, scale, D, x.stride(0), x8.stride(0), BLOCK_D=block,
                                    num_warps=max(1, min(8, block // 512)))
    return x8, scale


def _launch_bwd_elementwise(g, u, dh, w_scales=None, fp8_out=None, h_out=None):
    """h, dg, du (T, F) from the stored g and u and dh; h written into h_out when given (a (T, F) view,
    unit stride along F). With FP8 weights (w_scales given) dg·s_gate and du·s_up go into fp8_out (the
    views of _fp8_dx_operands) as FP8 blocks instead: returns (h, None, None)."""
    T, F = g.shape
    h = empty((T, F), g.dtype, g.device) if h_out is None else h_out
    if fp8_out is None:
        dg, du = empty((T, F), g.dtype, g.device), empty((T, F), g.dtype, g.device)
        sg = su = sdg = sdu = h  # unread
    else:
        (dg, du), (sdg, sdu) = fp8_out
        sg, su = w_scales
    bm, bn = _ELEMENTWISE_BLOCK
    _swiglu_bwd_elementwise_kernel[(cdiv(T, bm), cdiv(F, bn))](
        g, u, dh, h, dg, du, sg, su, sdg, sdu, T, F, g.stride(0), u.stride(0), dh.stride(0), h.stride(0),
        dg.stride(0), du.stride(0), sdg.stride(0), QUANT=fp8_out is not None, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=4,
    )
    return (h, dg, du) if fp8_out is None else (h, None, None)


def _padded_features(F: int) -> int:
    """F rounded up to whole FP8_GRAD_BLOCKs: the width of each half of the FP8 backward's operands."""
    return cdiv(F, FP8_GRAD_BLOCK) * FP8_GRAD_BLOCK


def _fp8_weights_transposed(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """The FP8 dx GEMM's B operand: (D, 2·Fp) float8_e4m3fn = [w8_gateᵀ, 0, w8_upᵀ, 0], Fp being F rounded
    up to whole FP8_GRAD_BLOCKs. Each row contiguous along the reduced dim: the layout Hopper's FP8 MMA
    reads straight from shared memory. A transient copy of 2·Fp·D bytes (half of what the two matrices
    dequantised to bf16 would take), made once per backward."""
    F, D = w_gate.shape
    f_pad = _padded_features(F)
    wt = empty((D, 2 * f_pad), w_gate.dtype, w_gate.device)  # one pass: each column written once
    for half, w in enumerate((w_gate, w_up)):
        wt[:, half * f_pad:half * f_pad + F] = w.t()
        wt[:, half * f_pad + F:(half + 1) * f_pad] = 0
    return wt


def _fp8_dx_operands(tokens: int, F: int, device):
    """Buffers of the FP8 backward for `tokens` tokens: a8 (tokens, 2·Fp) float8_e4m3fn, dg·s_gate in its
    first Fp columns and du·s_up in the rest, and their block scales sa (tokens, 2·Fp / FP8_GRAD_BLOCK)
    fp32. Returns (a8, sa, ((gate part, up part) of a8, (gate part, up part) of sa)), the views being what
    the backward epilogue writes."""
    f_pad = _padded_features(F)
    nb = f_pad // FP8_GRAD_BLOCK
    a8 = empty((tokens, 2 * f_pad), torch.float8_e4m3fn, device)
    sa = empty((tokens, 2 * nb), torch.float32, device)
    return a8, sa, ((a8[:, :f_pad], a8[:, f_pad:]), (sa[:, :nb], sa[:, nb:]))


def _launch_fp8_dx(a8: torch.Tensor, sa: torch.Tensor, wt: torch.Tensor, out: torch.Tensor) -> None:
    """out (T, D) = a8 (T, K) dequantised with its block scales sa, times wtᵀ (wt (D, K)), in out's dtype."""
    T, K = a8.shape
    D = wt.shape[0]
    if T == 0:
        return
    _fp8_dx.launch(lambda m: (cdiv(T, m["BLOCK_M"]) * cdiv(D, m["BLOCK_N"]),),
                   a8, sa, wt, out, T, D, K, a8.stride(0), sa.stride(0), wt.stride(0), out.stride(0),
                   GROUP_M=_GROUP_M)


def _fwd_fake(x, w_gate, w_up, w_down, save_gate_up, w_gate_scale=None, w_up_scale=None):
    T, F = x.shape[0], w_gate.shape[0]
    gu_shape = (T, F) if save_gate_up else (0,)
    return x.new_empty((T, w_down.shape[0])), x.new_empty(gu_shape), x.new_empty(gu_shape)


@launcher("frozen_swiglu_fwd", fake=_fwd_fake)
def swiglu_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
               save_gate_up: bool, w_gate_scale: torch.Tensor | None = None,
               w_up_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, D) -> (y (T, D), g, u), g and u (T, F) only if save_gate_up (else empty). Token chunks as in
    the backward: one chunk's h exists at a time. With FP8 frozen weights (their scales given) x is
    quantised per token first and the dual GEMM runs on FP8 operands."""
    T, D = x.shape
    F = w_gate.shape[0]
    w_scales = None if w_gate_scale is None else (w_gate_scale, w_up_scale)
    y = empty((T, w_down.shape[0]), x.dtype, x.device)
    g = empty((T, F), x.dtype, x.device) if save_gate_up else absent(x)
    u = empty((T, F), x.dtype, x.device) if save_gate_up else absent(x)
    chunk = max(1, CHUNK_ELEMENTS // F)
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        h, _, _ = _launch_dual_gemm(x[sl], w_gate, w_up, 1 if save_gate_up else 0,
                                    gu_out=(g[sl], u[sl]) if save_gate_up else None, w_scales=w_scales)
        torch.matmul(h, w_down.t(), out=y[sl])
        del h  # before the next chunk allocates its own
    return y, g, u


_MM_OUT_DTYPE = None  # whether torch.mm(..., out_dtype=torch.float32) exists here (probed once, CUDA only)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32. 16-bit operands stay 16-bit (tensor cores, fp32 accumulation): cuBLAS returns the
    fp32 sum directly where torch offers mm's out_dtype; elsewhere the product is rounded to the operands'
    dtype once before the conversion."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except TypeError:  # no out_dtype argument in this torch
            _MM_OUT_DTYPE = False
        except RuntimeError as e:  # the overload exists but not for these inputs (an OOM is raised as is)
            if "out of memory" in str(e):
                raise
            _MM_OUT_DTYPE = False
    return (a @ b).float()


def _bwd_fake(dy, x, w_gate, w_up, w_down, g=None, u=None, need_dx=True, need_dw_down=True, w_gate_scale=None,
              w_up_scale=None):
    return (dy.new_empty(dy.shape if need_dx else (0,)), w_down.new_empty(w_down.shape if need_dw_down else (0,)))


@launcher("frozen_swiglu_bwd", fake=_bwd_fake)
def swiglu_bwd(dy: torch.Tensor, x: torch.Tensor | None, w_gate: torch.Tensor, w_up: torch.Tensor,
               w_down: torch.Tensor, g: torch.Tensor | None = None, u: torch.Tensor | None = None,
               need_dx: bool = True, need_dw_down: bool = True, w_gate_scale: torch.Tensor | None = None,
               w_up_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (T, D) and dW_down (D, F) from dy (T, D), each empty unless asked for. x: the input rows when
    the forward kept nothing else (recompute), else None, with g and u (T, F) given; dx takes dy's dtype,
    which is x's. Walks the tokens in chunks of at most CHUNK_ELEMENTS // F, writing h for DW_GROUP_CHUNKS
    chunks into one buffer and running one dW_down GEMM per such group; with several groups dW_down sums
    their products in fp32. Frozen weights in another dtype than x are cast to it for the dx GEMMs (a
    transient (F, D) copy each). FP8 weights (scales given) keep FP8 for the dx GEMM: their transposed
    copy (2·Fp·D bytes, Fp = _padded_features(F)) is made once, and each chunk's dg·s_gate, du·s_up
    leave the epilogue as FP8 blocks for it."""
    T, D = dy.shape
    dtype, device = dy.dtype, dy.device
    F = w_gate.shape[0]
    if T == 0:
        return (torch.zeros((T, D), dtype=dtype, device=device) if need_dx else absent(dy),
                torch.zeros(w_down.shape, dtype=w_down.dtype, device=device) if need_dw_down else absent(w_down))
    chunk = max(1, CHUNK_ELEMENTS // F)
    group = chunk * DW_GROUP_CHUNKS  # tokens per dW_down GEMM; chunks never straddle two groups
    dx = empty((T, D), dtype, device) if need_dx else absent(dy)
    dw = empty((D, F), torch.float32, device) if need_dw_down and T > group else None  # the first group sets it
    h_group = empty((min(T, group), F), dtype, device) if need_dw_down else None
    w_scales = None if w_gate_scale is None else (w_gate_scale, w_up_scale)
    fp8_dx = need_dx and w_scales is not None
    if fp8_dx:
        wt = _fp8_weights_transposed(w_gate, w_up)
    elif need_dx:
        wg, wu = w_gate.to(dtype), w_up.to(dtype)
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        g0 = t0 - t0 % group  # the first token of this chunk's group
        h_out = None if h_group is None else h_group[t0 - g0:sl.stop - g0]
        if need_dx:
            dh = dy[sl] @ w_down  # (C, F)
            a8 = sa = fp8_out = None
            if fp8_dx:
                a8, sa, fp8_out = _fp8_dx_operands(dh.shape[0], F, device)
            if g is None:
                _, dg, du = _launch_dual_gemm(x[sl], w_gate, w_up, 2, dh, w_scales=w_scales, fp8_out=fp8_out,
                                              h_out=h_out)
            else:
                _, dg, du = _launch_bwd_elementwise(g[sl], u[sl], dh, w_scales=w_scales, fp8_out=fp8_out,
                                                    h_out=h_out)
            if fp8_dx:
                _launch_fp8_dx(a8, sa, wt, out=dx[sl])
            else:
                torch.matmul(dg, wg, out=dx[sl])
                dx[sl].addmm_(du, wu)
            del dh, dg, du, a8, sa, fp8_out
        elif g is None:  # dW_down alone needs only h
            _launch_dual_gemm(x[sl], w_gate, w_up, 0, w_scales=w_scales, h_out=h_out)
        else:
            torch.mul(torch.nn.functional.silu(g[sl].float()), u[sl].float(), out=h_out)
        if need_dw_down and (sl.stop == T or sl.stop - g0 == group):  # the group is complete: its GEMM
            rows, h = slice(g0, sl.stop), h_group[:sl.stop - g0]
            if dw is None:  # one group: one GEMM, rounded once, as an eager backward does
                dw = dy.t() @ h
            else:  # column blocks, so that the fp32 product of one is at most CHUNK_ELEMENTS // 2 elements
                cols = max(1, CHUNK_ELEMENTS // (2 * D))
                for f0 in range(0, F, cols):
                    part = _mm_fp32(dy[rows].t(), h[:, f0:f0 + cols])
                    if g0 == 0:  # the first group writes dW_down: no zero fill to read back
                        dw[:, f0:f0 + cols].copy_(part)
                    else:
                        dw[:, f0:f0 + cols] += part
    return dx, (dw.to(w_down.dtype) if need_dw_down else absent(w_down))


class FrozenSwiGLUFunction(torch.autograd.Function):
    """Autograd over (T, D) rows; `frozen_swiglu` validates, reshapes and picks what to save before
    `.apply`. Gradients flow to x and w_down only."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, recompute, training, w_gate_scale, w_up_scale):
        """training: a backward may follow (grad mode on and x or w_down requiring grad): only then does
        recompute=False store g and u, and recompute=True keep x."""
        saved_gate_up = training and not recompute
        y, g, u = swiglu_fwd(x, w_gate, w_up, w_down, saved_gate_up, w_gate_scale, w_up_scale)
        ctx.save_for_backward(x if training and recompute else None, w_gate, w_up, w_down,
                              g if saved_gate_up else None, u if saved_gate_up else None, w_gate_scale, w_up_scale)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, g, u, w_gate_scale, w_up_scale = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx, dw = swiglu_bwd(dy, x, w_gate, w_up, w_down, g, u, need_dx=need_dx, need_dw_down=need_dw,
                            w_gate_scale=w_gate_scale, w_up_scale=w_up_scale)
        return (dx if need_dx else None), None, None, (dw if need_dw else None), None, None, None, None


def frozen_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  recompute: bool = False, *, w_gate_scale: torch.Tensor | None = None,
                  w_up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU MLP (Triton) whose gate/up projections are frozen.

    Args:
        x: (..., D), float32, float16 or bfloat16, on a CUDA device (or CPU under TRITON_INTERPRET=1).
        w_gate, w_up: (F, D), frozen: must not require grad; any of those dtypes (cast on load), or both
            float8_e4m3fn with w_gate_scale and w_up_scale, (F,) fp32 per-output-channel scales
            (W = w · scale[:, None]): then x is quantised to FP8 per token and the gate/up GEMM (forward,
            and the recomputing backward) runs on FP8 operands (compute capability 8.9+), each BLOCK_K
            step summed in the MMA's accumulator and added to an fp32 one. The dx GEMM runs on FP8
            operands too: dg·s_gate and du·s_up quantised with one scale per token per 128 features
            (FP8_GRAD_BLOCK), so dx carries FP8's rounding of them (about 2% relative L2); dW_down does not.
        w_down: (D, F), x's dtype, trained.
        recompute: True saves only x for the backward (recomputes gate/up); False keeps g and u, stored in
            x's dtype (in fp16, gate values beyond fp16's range overflow there, as they would in eager
            fp16). Without a backward to come (no grad mode, or neither x nor w_down requiring grad)
            nothing is kept either way.
    Returns:
        y (..., D) in x's dtype, y = (silu(x W_gateᵀ) · (x W_upᵀ)) W_downᵀ. Gradients flow to x and w_down.
        h = silu(g)·u is rounded to x's dtype for the W_down GEMM (and for dW_down), in both modes: in fp16
        an |h| beyond 65504 is inf there, as in eager fp16 (the fp32 reference keeps it).
    Raises:
        ValueError: naming the argument, for a wrong shape, dtype or device, frozen weights that require
            grad, or a recompute flag that is not a bool, before any launch.
    """
    check_swiglu_args(x, w_gate, w_up, w_down, recompute, w_gate_scale, w_up_scale)
    check_kernel_device(x, "x")
    check_grid_columns(w_gate.shape[0], _ELEMENTWISE_BLOCK[1], "w_gate", "a d_ff (first dim)")  # backward's grid
    if w_gate_scale is not None and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(x.device)
        raise ValueError(f"w_gate: float8_e4m3fn frozen weights need FP8 tensor cores (compute capability 8.9 or "
                         f"newer: Ada, Hopper); this GPU is sm_{major}{minor}: use bf16 frozen weights")
    shape = x.shape
    training = torch.is_grad_enabled() and (x.requires_grad or w_down.requires_grad)
    scales = (None, None) if w_gate_scale is None else (w_gate_scale.contiguous(), w_up_scale.contiguous())
    x2, wg, wu, wd, *scales = distinct(as_rows(x), as_rows(w_gate), as_rows(w_up), w_down, *scales)
    y = FrozenSwiGLUFunction.apply(x2, wg, wu, wd, recompute, training, *scales)
    return y.view(*shape[:-1], w_down.shape[0])


__all__ = ["frozen_swiglu", "swiglu_fwd", "swiglu_bwd", "FrozenSwiGLUFunction"]
