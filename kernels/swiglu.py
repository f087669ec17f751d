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
transients (h in the forward; dh, dg, du, h in the backward) stay bounded (CHUNK_ELEMENTS); dW_down
accumulates over the chunks in fp32.

The frozen weights may be stored in another dtype than x (`frozen_dtype` of FrozenSwiGLU): tiles are
cast to x's dtype on load, so the dots run in x's dtype with fp32 accumulation. fp32 activations use
IEEE fp32 dots (no TF32).

FP8 frozen weights (float8_e4m3fn with per-output-channel fp32 scales s_g, s_u; W ≈ w8 · s[:, None]): x
is quantised per token (x ≈ x8 · s_x[:, None], kernels.reference.quantize_rows_fp8, torch ops: a few
passes over x) and the dual GEMM multiplies FP8 tiles with fp32 accumulation; since both scales are
constant along the reduced dim, g = s_x[t] · s_g[f] · Σ_k x8[t,k] w8[f,k] is exact up to the fp32 sum,
applied in the epilogue before SiLU. (On Hopper an FP8 MMA sums into a narrower accumulator, ~14 bits;
each BLOCK_K step is promoted to the fp32 accumulator, as DeepSeek-V3 does every 128 products.) The dx
GEMMs run in x's dtype on the dequantised weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_swiglu_args
from ._common import (TunedKernel, absent, as_rows, cdiv, check_kernel_device, empty, grouped_tile, interpreting,
                      launcher)
from .reference import quantize_rows_fp8

# Token chunks: tokens per chunk × F stays under this many elements, for each (chunk × F) transient (h in
# the forward; dh, h, dg, du in the backward), and the fp32 dW_down product of one column block is at
# most half of it. At 16384 × 4096 × 14336 bf16: 1024-token chunks, 4 × 29 MB of transients, against the
# 2.75 GiB an eager fwd+bwd allocates there (shared/anchors-h200.md), whose 0.25x is the recompute goal.
CHUNK_ELEMENTS = 1024 * 14336


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
# tile) only the last, smallest config compiles without spills; the autotuner weighs them. A config
# whose shared memory does not fit a GPU is dropped by the autotuner at its first launch there.
_GEMM_CONFIGS = {
    "fwd": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4)],
    "bwd": [(128, 64, 64, 8, 4), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4)],
    "fp32": [(128, 64, 64, 8, 4), (64, 64, 32, 4, 3), (64, 64, 32, 8, 3)],
    # FP8 (float8_e4m3fn x and frozen weights): a byte per element, so twice the K step in the same
    # shared memory. All compile without spills (64 x 128 and 128 x 128 x 128 tiles spilled; left out).
    "fp8": [(128, 64, 128, 8, 4), (128, 64, 128, 8, 3), (128, 128, 64, 8, 4)],
    "fp8_bwd": [(128, 64, 128, 8, 4), (64, 64, 128, 4, 4)],
}


def _gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    listed = sorted({c for cs in _GEMM_CONFIGS.values() for c in cs})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in listed]


def _prune_gemm(configs, nargs, **kwargs):
    """early_config_prune: the list for this mode and dtype."""
    if interpreting():
        return configs
    meta = {**nargs, **kwargs}
    if meta["SCALED"]:
        use = "fp8_bwd" if meta["MODE"] == 2 else "fp8"
    else:
        use = "fp32" if meta["INPUT_PRECISION"] == "ieee" else ("bwd" if meta["MODE"] == 2 else "fwd")
    wanted = set(_GEMM_CONFIGS[use])
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                   c.num_stages) in wanted]


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "MODE", "INPUT_PRECISION", "SCALED"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _swiglu_dual_gemm_kernel(
    X, WG, WU, H, G, U, DH, DG, DU, SX, SG, SU,
    M, N, K,
    stride_x, stride_wg, stride_wu, stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du,
    MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCALED: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g, u = x W_gateᵀ, x W_upᵀ for one (BLOCK_M tokens × BLOCK_N features) tile, then the epilogue:
    MODE 0: h = silu(g)·u; MODE 1: also g and u (recompute=False's forward); MODE 2 (the recomputing
    backward): h, dg, du from g, u and DH. SCALED (FP8): X, WG, WU hold float8_e4m3fn values and the fp32
    products are multiplied by the per-token scale SX[row] and the per-channel scales SG[col], SU[col]."""
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
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
    _swiglu_epilogue(acc_g, acc_u, rows, cols, out_mask, H, G, U, DH, DG, DU,
                     stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, MODE)


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
def _swiglu_epilogue(g, u, rows, cols, mask, H, G, U, DH, DG, DU,
                     stride_h, stride_g, stride_u, stride_dh, stride_dg, stride_du, MODE: tl.constexpr):
    """From fp32 g and u: MODE 0 stores h; 1 stores h, g, u; 2 stores h, dg, du (reads DH)."""
    silu, dsilu = _silu_parts(g)
    h = silu * u
    tl.store(_tile_ptrs(H, rows, cols, stride_h), h.to(H.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(_tile_ptrs(G, rows, cols, stride_g), g.to(G.dtype.element_ty), mask=mask)
        tl.store(_tile_ptrs(U, rows, cols, stride_u), u.to(U.dtype.element_ty), mask=mask)
    if MODE == 2:
        dh = tl.load(_tile_ptrs(DH, rows, cols, stride_dh), mask=mask, other=0.0).to(tl.float32)
        tl.store(_tile_ptrs(DG, rows, cols, stride_dg), (dh * u * dsilu).to(DG.dtype.element_ty), mask=mask)
        tl.store(_tile_ptrs(DU, rows, cols, stride_du), (dh * silu).to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_elementwise_kernel(G, U, DH, H, DG, DU, M, N, stride_g, stride_u, stride_dh, stride_h,
                                   stride_dg, stride_du, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward epilogue from stored g and u (recompute=False): h, dg, du."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(_tile_ptrs(G, rows, cols, stride_g), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(_tile_ptrs(U, rows, cols, stride_u), mask=mask, other=0.0).to(tl.float32)
    _swiglu_epilogue(g, u, rows, cols, mask, H, G, U, DH, DG, DU, stride_h, stride_g, stride_u, stride_dh,
                     stride_dg, stride_du, 2)


_dual_gemm = TunedKernel(_swiglu_dual_gemm_kernel)
_GROUP_M = 8
_ELEMENTWISE_BLOCK = (32, 128)


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _launch_dual_gemm(x, w_gate, w_up, mode, dh=None, gu_out=None, w_scales=None):
    """The dual GEMM over x (T, D) with its epilogue. Returns h, and (g, u) for mode 1 or (dg, du) for
    mode 2, each (T, F) in x's dtype. gu_out: (g, u) views to write mode 1's g and u into. w_scales:
    (s_gate, s_up), (F,) fp32, for FP8 weights: then x is quantised per token (quantize_rows_fp8, the
    reference's own rounding; rows are independent, so chunk by chunk) and the GEMM runs on FP8 operands."""
    T, D = x.shape
    F = w_gate.shape[0]
    out_dtype = x.dtype
    scales = None
    if w_scales is not None:
        x, sx = quantize_rows_fp8(x)
        scales = (sx, *w_scales)
    h = empty((T, F), out_dtype, x.device)
    if gu_out is not None:
        a, b = gu_out
    else:
        a = empty((T, F), out_dtype, x.device) if mode else h  # g (mode 1) or dg (mode 2)
        b = empty((T, F), out_dtype, x.device) if mode else h  # u or du
    if T == 0:
        return h, a, b
    dh_ = dh if dh is not None else h  # read only in mode 2
    g, u, dg, du = (a, b, h, h) if mode == 1 else (h, h, a, b)
    sx, sg, su = scales if scales is not None else (h, h, h)  # unread without SCALED
    _dual_gemm.launch(
        lambda m: (cdiv(T, m["BLOCK_M"]) * cdiv(F, m["BLOCK_N"]),),
        x, w_gate, w_up, h, g, u, dh_, dg, du, sx, sg, su,
        T, F, D,
        x.stride(0), w_gate.stride(0), w_up.stride(0), h.stride(0), g.stride(0), u.stride(0), dh_.stride(0),
        dg.stride(0), du.stride(0),
        MODE=mode, INPUT_PRECISION=_precision(x), SCALED=scales is not None, GROUP_M=_GROUP_M,
    )
    return h, a, b


def _launch_bwd_elementwise(g, u, dh):
    T, F = g.shape
    h, dg, du = (empty((T, F), g.dtype, g.device) for _ in range(3))
    bm, bn = _ELEMENTWISE_BLOCK
    _swiglu_bwd_elementwise_kernel[(cdiv(T, bm), cdiv(F, bn))](
        g, u, dh, h, dg, du, T, F, g.stride(0), u.stride(0), dh.stride(0), h.stride(0), dg.stride(0), du.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
    )
    return h, dg, du


def _dequantized(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """w in `dtype` (no copy when it already is), times its per-row scale for FP8 weights."""
    if scale is None:
        return w.to(dtype)
    return (w.float() * scale[:, None]).to(dtype)


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
    which is x's. Walks the tokens in chunks of at most CHUNK_ELEMENTS // F; with several chunks dW_down
    sums their products in fp32. Frozen weights in another dtype than x are cast to it for the dx GEMMs (a
    transient (F, D) copy each; FP8 weights are dequantised with their scales: the dx GEMMs run in x's
    dtype, only the recomputed gate/up GEMM in FP8)."""
    T, D = dy.shape
    dtype, device = dy.dtype, dy.device
    F = w_gate.shape[0]
    if T == 0:
        return (torch.zeros((T, D), dtype=dtype, device=device) if need_dx else absent(dy),
                torch.zeros(w_down.shape, dtype=w_down.dtype, device=device) if need_dw_down else absent(w_down))
    chunk = max(1, CHUNK_ELEMENTS // F)
    dx = empty((T, D), dtype, device) if need_dx else absent(dy)
    dw = torch.zeros((D, F), dtype=torch.float32, device=device) if need_dw_down and T > chunk else None
    if need_dx:
        wg, wu = _dequantized(w_gate, w_gate_scale, dtype), _dequantized(w_up, w_up_scale, dtype)
    w_scales = None if w_gate_scale is None else (w_gate_scale, w_up_scale)
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        if need_dx:
            dh = dy[sl] @ w_down  # (C, F)
            if g is None:
                h, dg, du = _launch_dual_gemm(x[sl], w_gate, w_up, 2, dh, w_scales=w_scales)
            else:
                h, dg, du = _launch_bwd_elementwise(g[sl], u[sl], dh)
            torch.matmul(dg, wg, out=dx[sl])
            dx[sl].addmm_(du, wu)
            del dh, dg, du
        elif g is None:  # dW_down alone needs only h
            h, _, _ = _launch_dual_gemm(x[sl], w_gate, w_up, 0, w_scales=w_scales)
        else:
            h = (torch.nn.functional.silu(g[sl].float()) * u[sl].float()).to(dtype)
        if need_dw_down:
            if dw is None:  # one chunk: one GEMM, rounded once, as an eager backward does
                dw = dy.t() @ h
            else:  # column blocks, so that the fp32 product of one is at most CHUNK_ELEMENTS // 2 elements
                cols = max(1, CHUNK_ELEMENTS // (2 * D))
                for f0 in range(0, F, cols):
                    dw[:, f0:f0 + cols] += _mm_fp32(dy[sl].t(), h[:, f0:f0 + cols])
        del h  # before the next chunk allocates its own
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
    @torch.autograd.function.once_differentiable
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
            step summed in the MMA's accumulator and added to an fp32 one; the dx GEMMs run in x's dtype
            on the dequantised weights.
        w_down: (D, F), x's dtype, trained.
        recompute: True saves only x for the backward (recomputes gate/up); False keeps g and u, stored in
            x's dtype (in fp16, gate values beyond fp16's range overflow there, as they would in eager
            fp16). Without a backward to come (no grad mode, or neither x nor w_down requiring grad)
            nothing is kept either way.
    Returns:
        y (..., D) in x's dtype, y = (silu(x W_gateᵀ) · (x W_upᵀ)) W_downᵀ. Gradients flow to x and w_down.
    Raises:
        ValueError: naming the argument, for a wrong shape, dtype or device, frozen weights that require
            grad, or a recompute flag that is not a bool, before any launch.
    """
    check_swiglu_args(x, w_gate, w_up, w_down, recompute, w_gate_scale, w_up_scale)
    check_kernel_device(x, "x")
    if w_gate_scale is not None and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(x.device)
        raise ValueError(f"w_gate: float8_e4m3fn frozen weights need FP8 tensor cores (compute capability 8.9 or "
                         f"newer: Ada, Hopper); this GPU is sm_{major}{minor}: use bf16 frozen weights")
    shape = x.shape
    training = torch.is_grad_enabled() and (x.requires_grad or w_down.requires_grad)
    scales = (None, None) if w_gate_scale is None else (w_gate_scale.contiguous(), w_up_scale.contiguous())
    y = FrozenSwiGLUFunction.apply(as_rows(x), as_rows(w_gate), as_rows(w_up), w_down, recompute, training, *scales)
    return y.view(*shape[:-1], w_down.shape[0])


__all__ = ["frozen_swiglu", "swiglu_fwd", "swiglu_bwd", "FrozenSwiGLUFunction"]
