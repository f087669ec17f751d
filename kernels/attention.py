"""Flash attention for MHA, GQA and MQA, causal or bidirectional: Triton forward and backward.

Layout BSHD: q (B, S, H, D); k, v (B, S, Hkv, D) with H = GROUP · Hkv. Query head h reads K/V head
h // GROUP by index, in every pass: K and V are never expanded per query head.

Forward (FlashAttention-2, Dao 2023, arXiv:2307.08691, Algorithm 1). A program owns BLOCK_M query rows
of one head and streams BLOCK_N-row tiles of K and V through an online softmax held in fp32:
    t  = (Q Kᵀ) · scale · log2(e)           logits in base 2: exp2 is the hardware instruction
    m' = max(m, rowmax(t));  p = 2^(t - m');  l = l · 2^(m - m') + rowsum(p)
    acc = acc · 2^(m - m') + p V
    O = acc / l;  LSE₂ = m + log2 l          (base 2, fp32, kept for the backward)
No S × S matrix exists in memory. p is rounded to the input dtype for the tensor-core dot, as in FA2.

Backward (FA2 Algorithm 2). With P = 2^(t - LSE₂) recomputed tile by tile from the stored LSE₂ as it is:
in natural-log units and back (LSE · ln 2 · log2 e) it came back an ulp off in one row of seven, and an ulp
of a large LSE₂ is a factor on P (at |logits| 1e6 dV was 2% off, at softmax_scale 1e30 inf):
    δ  = rowsum(dO ∘ O)                      (a small preprocess kernel, fp32, from O + R: see Precision)
    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP - δ);  dK = scale · dSᵀ Q;  dQ = scale · dS K
Two kernels, so that no gradient needs atomics: one program per (key block, K/V head) accumulates dK and
dV in registers over the query blocks of all GROUP query heads that read that K/V head (the GQA sum over
the group, with no per-query-head copy in memory); one program per (query block, query head)
accumulates dQ over the key blocks. Every sum has a fixed order: two runs give bit-identical gradients
(within one process: the block sizes the autotuner picks set that order, and another process may pick
others). The backward is not itself differentiable (double backward raises).

Masks. Causal means query i sees keys j <= i (q and k share positions: self-attention). Tiles wholly
above the diagonal are never visited, tiles wholly below it run without a mask, and only the tiles on
the diagonal, or (forward and dQ) holding keys past the sequence end, build one (except in the dK/dV
configs that flatten their loops, which mask every causal tile: _DKDV_CONFIGS). Block sizes are chosen
so that a query block starts on a key-block boundary (and vice versa in the dK/dV pass), which makes
that split exact. Rows past the sequence end load as zeros and are never stored.

Precision. Statistics, accumulators, P and dS are computed in fp32; P and dS are rounded to the input
dtype for their tensor-core dots (as in FA2). For fp32 inputs the dots are IEEE fp32 (no TF32), so fp32
gets fp32 accuracy at a lower speed.
As in every flash-attention backward, P is recomputed from Q Kᵀ (summed in another order than the
forward's) and δ from the forward's O, so the gradients' error grows with the logits' magnitude (fp32, S
16, head dim 32, on the CPU: at |logits| up to 1e3 dV is within 7e-6 of the float64 one, relative to its
largest entry, an eager fp32 backward within 1.4e-5; 2.7e-5 while LSE went through natural log). Where
the softmax saturates on one key the exact dQ and dK are near 0, but δ no longer cancels dP exactly and
the kernel's are of order scale · 1e-7 · |dO|·|V|·|K| (|Q| for dK) instead. The forward is unaffected.
(The MLA kernels share these passes.) Compiled, each exponent t − m (forward) and t − LSE₂ (backward) is
one FMA of the exact product qk · scale · log2 e, where m, and so LSE₂, come from the rounded one (as in
FA2's kernels): the top key's P is then 2^e instead of 1, |e| up to half an ulp of LSE₂, about 4e-5 at
|logits| 1e3 (by this reasoning, not measured on a GPU); the forward's O divides it out, the backward's P
keeps it. The interpreter rounds the product first (tests/test_attention.py, saturated softmax).
δ is read from O's fp32 value, not from O rounded to 16 bits (FA2 reads the rounded one): a forward with
a backward to come (grad mode on, an input requiring grad) also stores R = O_fp32 − O, rounded to the
input dtype (one more O-sized tensor kept for the backward), and δ = rowsum(dO ∘ (O + R)). An error in δ
is common to every key of its query row, so dQ = scale · Σ_j P_ij (dP_ij − δ_i) k_j takes it times the
keys' P-weighted mean (Σ_j dS_ij is 0 exactly), where an eager backward's roundings differ from key to
key and average out. When the values share a large common part (O ≈ each v_j, so dP − δ is small) and so
do the keys, the 16-bit O made dQ's error 6 to 10 times an eager 16-bit backward's (measured on the CPU:
an MLA block of the bf16 model test, tests/test_model.py, whose values average 1.56 with a spread of
0.18 over the sequence, through the interpreter with its bf16 dot and rounding patched to a GPU's; and
test_attention's fp16 common-mode case); with R it is 1.5 to 4 times. What is left is P's rounding
before the P·V dot, which O and so δ inherit. R costs some configs register spills (_FWD_CONFIGS); on an
H200 a training step (fwd+bwd) took 0.0 to 0.4% longer (benchmarks/residual_cost.py).

Limits: head dim 1..256 (a non-power-of-two D is padded to the next power of two, at least 16, in
registers only); any S >= 1, B, H and any strides with a unit stride along D (anything else is copied
first), as long as one batch entry of each tensor spans at most 2^31 elements through its strides
(offsets inside an entry are int32: S·H·D <= 2^31 for a contiguous tensor; a view keeps its buffer's
strides, so q of a fused QKV output spans S·(H + 2·Hkv)·D); a larger one raises ValueError.

Opt-in (LWT_ATTN_TMA=1): a second forward kernel for sm_90 that loads its tiles through TMA descriptors
and warp-specialises its key loop (_attn_fwd_tma_kernel, where its section says when it applies). Not
yet run on a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # the allocator's context variable (_tma_scratch)

from ._checks import MAX_HEAD_DIM, check_attention_args
from ._common import (TunedKernel, absent, cdiv, check_kernel_device, distinct, empty, first_order_only,
                      forward_only, interpreting, launcher, next_power_of_2)

# Module constants read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)


# ---------------------------------------------------------------------------------------------------
# Shared @triton.jit pieces
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(BASE, rows, stride_row, S, D: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr):
    """A (len(rows), HEAD_DIM) tile of one head's (S, D) slice; zeros past S (ROW_MASK) and past D."""
    cols = tl.arange(0, HEAD_DIM)
    ptrs = BASE + rows[:, None] * stride_row + cols[None, :]
    if ROW_MASK:
        if D < HEAD_DIM:
            return tl.load(ptrs, mask=(rows < S)[:, None] & (cols < D)[None, :], other=0.0)
        return tl.load(ptrs, mask=(rows < S)[:, None], other=0.0)
    if D < HEAD_DIM:
        return tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _kv_bases(K, KR, V, b, hk, stride_kb, stride_kh, stride_krb, stride_vb, stride_vh):
    """K, its rope keys KR (no head dim) and V, advanced to batch entry b and K/V head hk. Batch offsets
    in int64 (B·S·H·D passes 2^31); offsets inside one batch entry stay int32."""
    bb = b.to(tl.int64)
    return K + bb * stride_kb + hk * stride_kh, KR + bb * stride_krb, V + bb * stride_vb + hk * stride_vh


@triton.jit
def _load_query(Q, q_rows, stride_qs, S, D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr,
                ROPE_DIM: tl.constexpr):
    """A query tile and its rope part (the D_R dims after the first D of each row); without a rope part
    (ROPE_DIM 0) the second value is the first again, a placeholder never read."""
    q = _load_tile(Q, q_rows, stride_qs, S, D, HEAD_DIM, True)
    qr = q
    if ROPE_DIM > 0:
        qr = _load_tile(Q + D, q_rows, stride_qs, S, D_R, ROPE_DIM, True)
    return q, qr


@triton.jit
def _store_tile(BASE, rows, stride_row, S, value, D: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    ptrs = BASE + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, value.to(BASE.dtype.element_ty), mask=(rows < S)[:, None] & (cols < D)[None, :])


@triton.jit
def _visible(q_rows, k_cols, S, IS_CAUSAL: tl.constexpr):
    """Mask (broadcastable to len(q_rows) × len(k_cols)) of the logits that exist: key inside the
    sequence and, causal, not after the query. Query rows past S stay unmasked: they see key 0, so their
    running max stays finite (no inf - inf), and they are never stored."""
    keep = (k_cols < S)[None, :]
    if IS_CAUSAL:
        keep = keep & (q_rows[:, None] >= k_cols[None, :])
    return keep


@triton.jit
def _program_coords(S, BLOCK: tl.constexpr, heads, REVERSE: tl.constexpr):
    """(row block, batch, head) of this program in a 1-D grid of cdiv(S, BLOCK) · B · heads programs
    (no 65535 limit on B·heads). Row blocks vary fastest, so the programs running at once share K/V
    heads in L2. REVERSE hands out the costliest causal query blocks (the last ones) first, which evens
    out the tail of the grid; in the dK/dV pass the costliest key blocks come first anyway."""
    block, b, h = _block_coords(tl.program_id(0), S, BLOCK, heads)
    if REVERSE:
        block = tl.cdiv(S, BLOCK) - 1 - block
    return block, b, h


@triton.jit
def _block_coords(pid, S, BLOCK: tl.constexpr, heads):
    """(row block, batch, head) of program `pid` of a grid as _program_coords', row blocks fastest."""
    num_blocks = tl.cdiv(S, BLOCK)
    bh = pid // num_blocks
    return pid % num_blocks, bh // heads, bh % heads


@triton.jit
def _key_ranges(q_start, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query block starting at q_start: keys [0, split) are visible to all of its queries (no
    mask), keys [split, end) need the mask. Causal: everything before the block, then its diagonal
    (q_start is a multiple of BLOCK_N because BLOCK_N divides BLOCK_M). Bidirectional: the whole key
    tiles, then the ragged last one."""
    if IS_CAUSAL:
        return q_start, tl.minimum(q_start + BLOCK_M, S)
    return (S // BLOCK_N) * BLOCK_N, S


# ---------------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages), and FLATTEN for dK/dV, per padded head dim (16 and 32 use the
# 64 list), one list for DeepSeek-V2's MLA heads ("mla": q·k 128 + 64, v 128) and one for fp32 inputs;
# BLOCK_M is the query tile, BLOCK_N the key tile in every kernel. Short lists, keyed on the head dim, the
# mask, the dtype and a power-of-two bucket of S (never on B or the raw S: flash-linear-attention#533).
# At the attention head dims and DeepSeek-V2's MLA heads every 16-bit config here compiles for sm_90
# (triton 3.6) without register spills, or with a few dozen bytes (checked with benchmarks/compile_check.py,
# which also lists the MLA widths that spill more); fp32 tiles (IEEE dots, no tensor cores) spill at head
# dims >= 128 and are a correctness path. Storing O's residual (STORE_RES, every 16-bit training forward)
# costs the forward's epilogue registers: at head dim 128, (128, 32, 4, 3) spills 144 / 152 bytes
# (bidirectional / causal; 144 / 208 at fp16 D 96, padded to 128) and at 256 the 128-row tiles 72 to 112;
# MLA at Dn 128 / Dr 64 / Dv 192, (128, 64, 8, 2) and (128, 32, 8, 2) spill 24 / 72 and 24 / 40, and at
# 256 / 128 / 256 64 to 96 (none of these spilled without it, but for 24 bytes of (128, 64, 8, 2) causal
# at 256; DeepSeek-V2's 128 / 64 / 128 heads spill nothing either way). Computing the residual before the
# stores spilled more. On an H200 the MLA forward (its first config) took 2.8% longer with the residual.
_FWD_CONFIGS = {
    64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 32, 8, 3)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    # "mla"'s last entry, 128-key tiles, came after the H200 runs (255 registers, 0 / 8 bytes spilled)
    "mla": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)],
    "fp32": [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# dK/dV entries have a fifth field, FLATTEN: run the loop over query heads (the GQA group; MLA's chunk
# of heads) and each head's query loop as one flattened loop (tl.range(flatten=True)), each head's
# query tiles in a single loop (causal: every tile masked, not only the diagonal ones), instead of
# nested loops with the causal diagonal split off. Nested, the head loop keeps the query loop's pipeline
# state beside its own; flattened, ptxas needs fewer registers (sm_90, D 128, GQA: 64x128 tiles at 2 stages
# 255 and no spill, bidirectional / causal, where nested spills 104 / 360 bytes; 32x128 237 / 246 against
# 250 / 255 and 24 bytes spilled. MHA, whose group of 1 triton specialises, spills 32 / 40 bytes at
# 64x128 flattened) and a head's first query tiles load while the previous head's last ones compute. The
# nested configs are the lists timed at e3f8149; the flattened ones are not yet timed on a GPU.
_DKDV_CONFIGS = {  # BLOCK_N (keys) is the resident tile; BLOCK_M query rows stream through
    64: [(32, 128, 8, 3, False), (32, 128, 8, 2, False), (64, 128, 8, 1, False), (32, 64, 4, 2, False),
         (16, 128, 8, 2, False)],
    128: [(32, 64, 8, 2, False), (32, 64, 8, 1, False), (32, 128, 8, 2, False), (16, 128, 8, 2, False),
          (64, 64, 8, 1, False), (64, 128, 8, 2, True), (32, 128, 8, 2, True), (32, 64, 8, 2, True)],
    256: [(16, 32, 8, 2, False), (32, 32, 8, 1, False), (16, 32, 4, 1, False), (16, 64, 8, 2, False)],
    "fp32": [(16, 32, 4, 2, False), (16, 32, 8, 2, False)],
}
# MLA's dK/dV kernel (kernels/mla.py) takes GQA's lists with a sixth field, SPLIT, False there; DeepSeek-V2's
# heads have a list of their own.
# Its key tile holds three fp32 accumulators (dk_nope 128, dk_rope 64, dv 128 wide). On an H200, at
# e3f8149, with the 256 list (query tiles of 16 or 32 rows) and nested head and query loops, its
# fwd+bwd ran at 0.27-0.34x SDPA-cuDNN's. Nested, 32x64 tiles spilled 40 / 192 bytes (bidirectional /
# causal); flattened, these compile without spills (registers: 64x64 252 / 255, 32x64 229 / 241 or,
# one stage, 255 / 255, 16x64 214 / 222), while 128-key tiles, 4 warps and 32x32 (mma.sync) spill. At
# 871b73f the autotuner picked 64x64 flattened, and the pass ran at about 200 TFLOP/s where dQ ran at 540.
# SPLIT gives the pass two kinds of programs in one launch: ones that hold dk_nope and dk_rope (192
# wide), head chunk by head chunk, and ones that hold dv, one head each. The scores are computed twice
# (the pass does 2·(3·Dqk + 2·Dv) products per query, key and head instead of 2·(2·Dqk + 2·Dv): 30%
# more at DeepSeek-V2's heads) so that 128-key tiles fit: compiled for sm_90 without spills, flattened,
# 32x128 (registers 254 / 252) and 16x128 (254 / 254); nested, 32x128 spills 0 / 200 bytes; 64x128
# spills 8 / 56 flattened (and needs 256 KiB of shared memory), 168 / 664 nested, in its dk programs.
# Which is fastest is the autotuner's measurement (not yet made on a GPU: the fused configs come first,
# the ones LWT_AUTOTUNE=0 takes). MLA heads with Dv = Dn + Dr (128 / 64 / 192) take the 256 list, whose
# 16x64 spills 96 / 344 bytes there; SPLIT at 32x64 (registers 233 / 240) and 16x64 (199 / 232) spills
# nothing. At the widest heads (256 / 128 / 256) SPLIT's 16x64 spills 32 / 40 bytes and its 32x64 needs
# more shared memory than sm_90 has (the prune drops it).
_MLA_DKDV_CONFIGS = {key: [(*entry, False) for entry in entries] for key, entries in _DKDV_CONFIGS.items()}
_MLA_DKDV_CONFIGS[256] += [(32, 64, 8, 2, True, True), (16, 64, 8, 2, True, True)]
_MLA_DKDV_CONFIGS["mla"] = [(32, 64, 8, 2, True, False), (64, 64, 8, 2, True, False), (16, 64, 8, 2, True, False),
                            (32, 64, 8, 1, True, False), (32, 128, 8, 2, True, True), (16, 128, 8, 2, True, True),
                            (32, 128, 8, 2, False, True)]
_DQ_CONFIGS = {
    64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)],
    256: [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
    "mla": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 3)],
    # (32, 16, 4, 2): the only one that fits the widest MLA heads in fp32 (q·k 384 + v 256 wide)
    "fp32": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)],
}
# The interpreter runs one small config that still has BLOCK_M != BLOCK_N, so the diagonal tiles span
# several inner tiles there too.
_INTERPRETER_FWD = (32, 16)
_INTERPRETER_DKDV = (16, 32, False)  # nested; the tests force the flattened loops too
_INTERPRETER_MLA_DKDV = (*_INTERPRETER_DKDV, False)  # fused; the tests force SPLIT too
_INTERPRETER_DQ = (32, 16)
_SMEM_LIMIT = 227 * 1024  # shared memory an H100/H200 (sm_90) block may use
_SMEM_BYTES = _SMEM_LIMIT - 7 * 1024  # what the prunes allow: a margin for the compiler's scratch


_OPTIONAL_FIELDS = ("FLATTEN", "SPLIT")  # a table entry's fields after (BLOCK_M, BLOCK_N, warps, stages)


def as_config(entry: tuple, fields: tuple = _OPTIONAL_FIELDS) -> triton.Config:
    """The triton.Config of a table entry (BLOCK_M, BLOCK_N, warps, stages[, FLATTEN[, SPLIT]]), or with
    other optional `fields` (the TMA forward's WS)."""
    bm, bn, warps, stages, *optional = entry
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **dict(zip(fields, optional))},
                         num_warps=warps, num_stages=stages)


def as_entry(config: triton.Config, fields: tuple = _OPTIONAL_FIELDS) -> tuple:
    """The table entry of a config: as_config's inverse."""
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages,
            *(kw[name] for name in fields if name in kw))


def _configs(table, interpreter_blocks, fields: tuple = _OPTIONAL_FIELDS):
    """Every distinct config of `table` (pruned per head dim at launch), or the one interpreter config."""
    if interpreting():
        bm, bn, *optional = interpreter_blocks
        return [as_config((bm, bn, 1, 1, *optional), fields)]
    entries = dict.fromkeys(e for dim_configs in table.values() for e in dim_configs)  # distinct, in order
    return [as_config(e, fields) for e in entries]


def _table_key(qk_dim: int, v_dim: int) -> int | str:
    """Which config list a head takes: by its widest padded operand (q·k with any rope part, or v), with
    MLA heads like DeepSeek-V2's (q·k over 128 and at most 192 wide, e.g. 128 + 64; v at most 128) on a
    list of their own."""
    width = max(qk_dim, v_dim)
    if 128 < qk_dim <= 192 and v_dim <= 128:
        return "mla"
    return 64 if width <= 64 else 128 if width <= 128 else 256


def _make_prune(table, smem_elements, divides):
    """early_config_prune: the configs listed for these head dims whose shared memory fits, in their
    list's order (LWT_AUTOTUNE=0 launches the first). smem_elements(BM, BN, stages, FLATTEN, QK, V, R):
    elements a config holds in shared memory (below); divides(BM, BN): the block alignment the mask
    split needs."""
    def prune(configs, nargs, **kwargs):
        meta = {**nargs, **kwargs}
        if interpreting():
            return configs
        qk, vd, rope = meta["HEAD_DIM"] + meta["ROPE_DIM"], meta["V_DIM"], meta["ROPE_DIM"]
        fp32 = meta["INPUT_PRECISION"] == "ieee"
        order = {entry: i for i, entry in enumerate(table["fp32" if fp32 else _table_key(qk, vd)])}
        kept = []
        for c in sorted((c for c in configs if as_entry(c) in order), key=lambda c: order[as_entry(c)]):
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if not divides(bm, bn):
                continue
            flatten = c.kwargs.get("FLATTEN", False)
            if smem_elements(bm, bn, c.num_stages, flatten, qk, vd, rope) * (4 if fp32 else 2) <= _SMEM_BYTES:
                kept.append(c)
        if not kept:  # tests/test_attention.py checks that every head dim keeps some
            raise RuntimeError(f"no listed launch config fits {_SMEM_BYTES} bytes of shared memory for q·k width "
                               f"{qk}, v width {vd}, {meta['INPUT_PRECISION']} dots")
        return kept
    return prune


# Shared memory of a config, in elements of the inputs' dtype, for tiles BM x BN, `st` stages, FLATTEN (the
# dK/dV field), QK and V the padded widths of q·k (rope part included) and of v, R the padded rope width.
# Streamed tiles (K and V in the forward and dQ, q and dO in dK/dV) have `st` copies in flight; the
# resident ones (q; k and v; q and dO) one. benchmarks/compile_check.py fails a config whose compiled
# shared memory exceeds its estimate by more than the margin _SMEM_BYTES leaves.
def _fwd_smem(bm, bn, st, flatten, qk, vd, rope):
    return st * bn * (qk + vd) + bm * qk


def _dkdv_smem(bm, bn, st, flatten, qk, vd, rope):
    # One stage: sm_90 compiles 32-key tiles (mma.sync) with a second copy of dO's tile (16 KiB more for
    # (32, 32) at v 256); counted for every one-stage config, which overcounts the others by that much.
    return (st * bm + bn) * (qk + vd) + (bm * vd if st == 1 else 0)


def _mla_dkdv_smem(bm, bn, st, flatten, qk, vd, rope):
    """MLA's heads have keys and values of their own: flattened, the loop over a chunk's heads streams
    k_nope and v as well, `st` copies of them beside the shared rope key's tile (sm_90 compiles
    DeepSeek-V2's heads and half-size ones to this within 512 bytes; nested, GQA's count holds)."""
    return st * (bm + bn) * (qk + vd) + bn * rope if flatten else _dkdv_smem(bm, bn, st, flatten, qk, vd, rope)


def _dq_smem(bm, bn, st, flatten, qk, vd, rope):
    return (st * bn + bm) * (qk + vd)


_prune_fwd = _make_prune(_FWD_CONFIGS, _fwd_smem, lambda bm, bn: bm % bn == 0)
_prune_dkdv = _make_prune(_DKDV_CONFIGS, _dkdv_smem, lambda bm, bn: bn % bm == 0)
_prune_mla_dkdv = _make_prune(_MLA_DKDV_CONFIGS, _mla_dkdv_smem, lambda bm, bn: bn % bm == 0)
_prune_dq = _make_prune(_DQ_CONFIGS, _dq_smem, lambda bm, bn: bm % bn == 0)
_KEY = ["D", "HEAD_DIM", "D_R", "ROPE_DIM", "D_V", "V_DIM", "IS_CAUSAL", "INPUT_PRECISION", "seq_bucket"]


def _seq_bucket(s: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, within [64, 16384]."""
    return min(16384, max(64, next_power_of_2(s)))


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------
# The inner loops and the forward and dQ kernels also serve MLA (kernels/mla.py): a score may have a
# second part, q_rope·k_rope, whose keys KR (B, S, D_R) are one per token, shared by every head (read
# with no head stride, never broadcast in memory), and V may have its own head dim D_V. Each tensor dim
# comes as (real size, the power of two >= 16 it is padded to in registers): D/HEAD_DIM for q·k,
# D_R/ROPE_DIM for the rope part (ROPE_DIM = 0: none, plain attention), D_V/V_DIM for v.

@triton.jit
def _scores(q, qr, K, KR, k_cols, stride_ks, stride_krs, S, D: tl.constexpr, HEAD_DIM: tl.constexpr,
            D_R: tl.constexpr, ROPE_DIM: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """q·kᵀ (+ q_rope·k_ropeᵀ) for one key tile, fp32 (BLOCK_M, BLOCK_N); also the tiles loaded."""
    k = _load_tile(K, k_cols, stride_ks, S, D, HEAD_DIM, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    kr = k
    if ROPE_DIM > 0:
        kr = _load_tile(KR, k_cols, stride_krs, S, D_R, ROPE_DIM, MASKED)
        qk = tl.dot(qr, tl.trans(kr), qk, input_precision=INPUT_PRECISION)
    return qk, k, kr


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qr, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows, lo, hi, S, qk_scale,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
               D_V: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online softmax over the key tiles [lo, hi). MASKED tiles may hold keys past S or (causal) after
    some query; the others are fully visible and skip the mask."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_cols = start_n + tl.arange(0, BLOCK_N)
        qk, k, kr = _scores(q, qr, K, KR, k_cols, stride_ks, stride_krs, S, D, HEAD_DIM, D_R, ROPE_DIM,
                            MASKED, INPUT_PRECISION)
        if MASKED:
            qk = tl.where(_visible(q_rows, k_cols, S, IS_CAUSAL), qk, float("-inf"))
        p, alpha, l_i, m_new = _softmax_step(qk, l_i, m_i, qk_scale)
        v = _load_tile(V, k_cols, stride_vs, S, D_V, V_DIM, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _softmax_step(qk, l_i, m_i, qk_scale):
    """One key tile's online-softmax update of both forwards: (p, alpha, l_i, m_new), p in base 2. The
    scale is folded into the exponent's subtraction (one FMA per logit); it is > 0, so the max of the
    scaled logits is the scaled max."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _fwd_epilogue(O, ORES, LSE, acc, l_i, m_i, q_rows, b, h, H, S, stride_ob, stride_os, stride_oh,
                  D_V: tl.constexpr, V_DIM: tl.constexpr, STORE_RES: tl.constexpr):
    """Both forwards' stores: O = acc / l (O already advanced to (b, h), ORES, O's shape and strides,
    not yet), with STORE_RES its rounding residual O_fp32 − O in O's dtype, and LSE₂ = m + log2 l
    (B, H, S). Every row saw key 0 in its first tile, so m_i is finite and l_i >= 1 here (rows past S
    included)."""
    o = acc / l_i[:, None]
    _store_tile(O, q_rows, stride_os, S, o, D_V, V_DIM)
    if STORE_RES:
        ORES += b.to(tl.int64) * stride_ob + h * stride_oh
        _store_tile(ORES, q_rows, stride_os, S, o - o.to(O.dtype.element_ty).to(tl.float32), D_V, V_DIM)
    tl.store(LSE + (b * H + h).to(tl.int64) * S + q_rows, m_i + tl.math.log2(l_i), mask=q_rows < S)


# STORE_RES in the key: the residual's stores change which configs spill (_FWD_CONFIGS), so a config timed
# without it (an inference forward) is not reused for a training forward, nor the other way round.
@triton.autotune(configs=_configs(_FWD_CONFIGS, _INTERPRETER_FWD), key=_KEY + ["STORE_RES"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attn_fwd_kernel(
    Q, K, KR, V, O, ORES, LSE,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs,
    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
    H, GROUP, S, sm_scale, seq_bucket,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
    D_V: tl.constexpr, V_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    STORE_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O and LSE for BLOCK_M query rows of one (batch, head). Q (B, S, H, D + D_R): the rope part of a
    query follows its first D dims. LSE: (B, H, S) fp32, base 2. STORE_RES: ORES (O's shape and
    strides) gets O's rounding residual, O_fp32 − O, in O's dtype."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    block_m, b, h = _program_coords(S, BLOCK_M, H, IS_CAUSAL)
    K, KR, V = _kv_bases(K, KR, V, b, h // GROUP, stride_kb, stride_kh, stride_krb, stride_vb, stride_vh)
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    O += b.to(tl.int64) * stride_ob + h * stride_oh
    # A Python float may be specialised to fp64 (Liger-Kernel PR #1350): pin the scale to fp32.
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E

    q_start = block_m * BLOCK_M
    q_rows = q_start + tl.arange(0, BLOCK_M)
    q, qr = _load_query(Q, q_rows, stride_qs, S, D, HEAD_DIM, D_R, ROPE_DIM)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, V_DIM), tl.float32)
    split, end = _key_ranges(q_start, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qr, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows, 0, split,
                               S, qk_scale, D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_N, IS_CAUSAL, False,
                               INPUT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qr, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows, split, end,
                               S, qk_scale, D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_N, IS_CAUSAL, True,
                               INPUT_PRECISION)
    _fwd_epilogue(O, ORES, LSE, acc, l_i, m_i, q_rows, b, h, H, S, stride_ob, stride_os, stride_oh, D_V, V_DIM,
                  STORE_RES)


# ---------------------------------------------------------------------------------------------------
# Forward through TMA, warp-specialised (opt-in, LWT_ATTN_TMA=1; sm_90)
# ---------------------------------------------------------------------------------------------------
# The same forward for plain attention heads (no rope part, 16-bit, head dim 32, 64 or 128), with its
# tiles loaded by the Hopper tensor-memory accelerator (TMA) through descriptors the kernel builds
# (tl.make_tensor_descriptor), and its key loop warp-specialised (tl.range(warp_specialize=True)): at 4
# warps, triton's Hopper pass (triton-lang/triton#7136, #7658) splits the program into a producer warp
# group issuing the TMA loads and two consumer warp groups of 64 query rows each (12 warps, registers
# rebalanced by setmaxnreg), FlashAttention-3's layout (Shah et al. 2024, arXiv:2407.08608, section 3.1).
# Configs with WS False keep 8 ordinary warps and only the TMA loads. Compiled for sm_90 (triton 3.6),
# no config spills; at head dim 128 a training forward's 128 x 64 tile at 8 warps takes 145 registers
# where _attn_fwd_kernel's takes 188 (bidirectional; TMA computes no addresses per element).
# Not yet run on a GPU: opt-in until a GPU session has tested and timed it (LWT_ATTN_TMA, launch_fwd).
#
# What triton 3.6's pass accepts shaped the kernel: one key loop (a second loop, such as the ragged tail
# or causal diagonal kept apart as _attn_fwd_kernel does, fails in its data partitioning), and
# descriptors of (B, S, heads·D) (a 4-D (B, S, H, D) one's tile reshape fails there). A tile past the
# sequence end reads zeros (TMA fills what lies outside the descriptor's shape, and the batch entry is
# a dimension of it: no row of another entry is read); keys past S get -inf logits, and query rows past
# S are never stored. EVEN_S (S a multiple of 128, so of every BLOCK_N) drops that key mask from the
# bidirectional loop; the causal loop masks every tile (one select per logit) instead of the diagonal
# ones alone.
_TMA_FWD_CONFIGS = {  # (BLOCK_M, BLOCK_N, warps, stages, WS)
    32: [(128, 64, 4, 3, True), (128, 128, 4, 2, True), (128, 64, 8, 3, False), (128, 128, 8, 2, False)],
    64: [(128, 64, 4, 3, True), (128, 128, 4, 2, True), (128, 64, 8, 3, False), (128, 128, 8, 2, False)],
    128: [(128, 64, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 8, 2, False), (128, 64, 8, 3, False)],
}
_TMA_HEAD_DIMS = tuple(_TMA_FWD_CONFIGS)
_TMA_FIELDS = ("WS",)  # a TMA entry's field after (BLOCK_M, BLOCK_N, warps, stages)
_INTERPRETER_TMA_FWD = (32, 16, False)


def _prune_tma_fwd(configs, nargs, **kwargs):
    """The configs listed for this head dim, in their list's order."""
    if interpreting():
        return configs
    order = {entry: i for i, entry in enumerate(_TMA_FWD_CONFIGS[kwargs.get("D", nargs.get("D"))])}
    listed = (c for c in configs if as_entry(c, _TMA_FIELDS) in order)
    return sorted(listed, key=lambda c: order[as_entry(c, _TMA_FIELDS)])


@triton.autotune(configs=_configs(_TMA_FWD_CONFIGS, _INTERPRETER_TMA_FWD, _TMA_FIELDS),
                 key=["D", "IS_CAUSAL", "STORE_RES", "seq_bucket"],
                 prune_configs_by={"early_config_prune": _prune_tma_fwd})
@triton.jit
def _attn_fwd_tma_kernel(
    Q, K, V, O, ORES, LSE, stride_qb, stride_qs, stride_kb, stride_ks, stride_vb, stride_vs,
    stride_ob, stride_os, stride_oh, B, H, GROUP, S, sm_scale, seq_bucket,
    D: tl.constexpr, IS_CAUSAL: tl.constexpr, STORE_RES: tl.constexpr, EVEN_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr,
):
    """_attn_fwd_kernel's O, LSE and residual for heads without a rope part, q·k and v both D wide (a
    power of two), through TMA descriptors of Q as (B, S, H·D), K and V as (B, S, Hkv·D), each with its
    batch and row strides (a query's or key's heads D apart: launch_fwd checks)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    # 16-bit operands only (launch_fwd sends fp32 to _attn_fwd_kernel's IEEE dots): input_precision is moot
    tl.static_assert(Q.dtype.element_ty == tl.float16 or Q.dtype.element_ty == tl.bfloat16)
    block_m, b, h = _program_coords(S, BLOCK_M, H, IS_CAUSAL)
    hk = h // GROUP
    kv_width = (H // GROUP) * D
    q_desc = tl.make_tensor_descriptor(Q, shape=[B, S, H * D], strides=[stride_qb, stride_qs, 1],
                                       block_shape=[1, BLOCK_M, D])
    k_desc = tl.make_tensor_descriptor(K, shape=[B, S, kv_width], strides=[stride_kb, stride_ks, 1],
                                       block_shape=[1, BLOCK_N, D])
    v_desc = tl.make_tensor_descriptor(V, shape=[B, S, kv_width], strides=[stride_vb, stride_vs, 1],
                                       block_shape=[1, BLOCK_N, D])
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    q_start = block_m * BLOCK_M
    q_rows = q_start + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, q_start, h * D]).reshape(BLOCK_M, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    end = tl.minimum(q_start + BLOCK_M, S) if IS_CAUSAL else S
    for start_n in tl.range(0, end, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([b, start_n, hk * D]).reshape(BLOCK_N, D)
        qk = tl.dot(q, tl.trans(k), input_precision="tf32")
        if IS_CAUSAL or not EVEN_S:
            qk = tl.where(_visible(q_rows, start_n + tl.arange(0, BLOCK_N), S, IS_CAUSAL), qk, float("-inf"))
        p, alpha, l_i, m_new = _softmax_step(qk, l_i, m_i, qk_scale)
        v = v_desc.load([b, start_n, hk * D]).reshape(BLOCK_N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="tf32")
        m_i = m_new
    O += b.to(tl.int64) * stride_ob + h * stride_oh
    _fwd_epilogue(O, ORES, LSE, acc, l_i, m_i, q_rows, b, h, H, S, stride_ob, stride_os, stride_oh, D, D, STORE_RES)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess_kernel(O, ORES, DO, Delta, stride_ob, stride_os, stride_oh, stride_rb, stride_rs, stride_rh,
                           stride_dob, stride_dos, stride_doh,
                           H, S, D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RES: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """δ = rowsum(dO ∘ O) in fp32, (B, H, S), O read as O + ORES (its rounding residual) with HAS_RES."""
    block_m, b, h = _program_coords(S, BLOCK_M, H, False)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(O + b.to(tl.int64) * stride_ob + h * stride_oh, rows, stride_os, S, D, HEAD_DIM, True)
    o = o.to(tl.float32)
    if HAS_RES:
        o += _load_tile(ORES + b.to(tl.int64) * stride_rb + h * stride_rh, rows, stride_rs, S, D, HEAD_DIM,
                        True).to(tl.float32)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h * stride_doh, rows, stride_dos, S, D, HEAD_DIM, True)
    delta = tl.sum(o * do.to(tl.float32), axis=1)
    tl.store(Delta + (b * H + h).to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _dkdv_inner(dk, dkr, dv, k, kr, v, Q, DO, LSE, Delta, stride_qs, stride_dos, k_cols, lo, hi, S, qk_scale,
                D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
                D_V: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """Accumulate dK (and dK_rope), dV of one key tile over the query tiles [lo, hi) of one query head,
    working in the transposed orientation (keys along rows) so that they come out without a transpose.
    Query rows past S load as zeros (q, dO, LSE, δ), and a zero q and dO row adds exactly nothing to
    dK = Σ dS·q or dV = Σ P·dO, so no tile needs a bounds mask here; CAUSAL_MASK: apply the causal mask
    to P (_dkdv_head sets it for the diagonal tiles alone, or for every tile of a flattened loop).
    WANT_DK / WANT_DV: which gradients to accumulate (the other is returned as it came; MLA's split
    dK/dV pass computes them in programs of their own, kernels/mla.py)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        q_rows = start_m + tl.arange(0, BLOCK_M)
        q, qr = _load_query(Q, q_rows, stride_qs, S, D, HEAD_DIM, D_R, ROPE_DIM)
        do = _load_tile(DO, q_rows, stride_dos, S, D_V, V_DIM, True)
        if WANT_DK:
            delta = tl.load(Delta + q_rows, mask=q_rows < S, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if ROPE_DIM > 0:
            qk_t = tl.dot(kr, tl.trans(qr), qk_t, input_precision=INPUT_PRECISION)
        lse2 = tl.load(LSE + q_rows, mask=q_rows < S, other=0.0)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(k_cols[:, None] <= q_rows[None, :], p_t, 0.0)
        if WANT_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        if WANT_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=INPUT_PRECISION)
            if ROPE_DIM > 0:
                dkr = tl.dot(ds_t, qr, dkr, input_precision=INPUT_PRECISION)
    return dk, dkr, dv


@triton.jit
def _dkdv_head(dk, dkr, dv, k, kr, v, Q, DO, LSE, Delta, stride_qs, stride_dos, k_cols, k_start, S, qk_scale,
               D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
               D_V: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, FLATTEN: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """All the query tiles of one query head for the key tile starting at k_start. Causal: queries before
    k_start see none of these keys; [k_start, k_start + BLOCK_N) is the diagonal (k_start + BLOCK_N is a
    multiple of BLOCK_M); later queries see all of them. FLATTEN (for a head loop to be flattened around
    it): a single query loop, every tile masked when causal; otherwise the diagonal tiles apart. WANT_DK,
    WANT_DV: as in _dkdv_inner."""
    if IS_CAUSAL and not FLATTEN:
        diag_end = k_start + BLOCK_N
        dk, dkr, dv = _dkdv_inner(dk, dkr, dv, k, kr, v, Q, DO, LSE, Delta, stride_qs, stride_dos, k_cols,
                                  k_start, tl.minimum(diag_end, S), S, qk_scale,
                                  D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_M, True, WANT_DK, WANT_DV,
                                  INPUT_PRECISION)
        dk, dkr, dv = _dkdv_inner(dk, dkr, dv, k, kr, v, Q, DO, LSE, Delta, stride_qs, stride_dos, k_cols,
                                  diag_end, S, S, qk_scale,
                                  D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_M, False, WANT_DK, WANT_DV,
                                  INPUT_PRECISION)
    else:  # one query loop: every key visible (bidirectional), or every tile masked (causal, FLATTEN)
        dk, dkr, dv = _dkdv_inner(dk, dkr, dv, k, kr, v, Q, DO, LSE, Delta, stride_qs, stride_dos, k_cols,
                                  k_start if IS_CAUSAL else 0, S, S, qk_scale,
                                  D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_M, IS_CAUSAL, WANT_DK, WANT_DV,
                                  INPUT_PRECISION)
    return dk, dkr, dv


@triton.autotune(configs=_configs(_DKDV_CONFIGS, _INTERPRETER_DKDV), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    H, GROUP, S, sm_scale, seq_bucket,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
    D_V: tl.constexpr, V_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLATTEN: tl.constexpr,
):
    """dK, dV for BLOCK_N keys of one (batch, K/V head), summed over the GROUP query heads reading it.
    (No rope part here: ROPE_DIM is 0, in the signature for the shared autotune key.) FLATTEN: the
    group loop and the query loop run as one (see _DKDV_CONFIGS)."""
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    tl.static_assert(ROPE_DIM == 0)
    block_n, b, hk = _program_coords(S, BLOCK_N, H // GROUP, False)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    k_start = block_n * BLOCK_N
    k_cols = k_start + tl.arange(0, BLOCK_N)
    k = _load_tile(K + b.to(tl.int64) * stride_kb + hk * stride_kh, k_cols, stride_ks, S, D, HEAD_DIM, True)
    v = _load_tile(V + b.to(tl.int64) * stride_vb + hk * stride_vh, k_cols, stride_vs, S, D_V, V_DIM, True)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, V_DIM), tl.float32)
    for g in tl.range(0, GROUP, flatten=FLATTEN):
        h = hk * GROUP + g
        dk, _, dv = _dkdv_head(dk, dk, dv, k, k, v, Q + b.to(tl.int64) * stride_qb + h * stride_qh,
                               DO + b.to(tl.int64) * stride_dob + h * stride_doh,
                               LSE + (b * H + h).to(tl.int64) * S, Delta + (b * H + h).to(tl.int64) * S,
                               stride_qs, stride_dos, k_cols, k_start, S, qk_scale,
                               D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_M, BLOCK_N, IS_CAUSAL, FLATTEN,
                               True, True, INPUT_PRECISION)
    _store_tile(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh, k_cols, stride_dks, S,
                dk * tl.cast(sm_scale, tl.float32), D, HEAD_DIM)
    _store_tile(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh, k_cols, stride_dvs, S, dv, D_V, V_DIM)


@triton.jit
def _dq_inner(dq, dqr, q, qr, do, lse2, delta, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows, lo, hi, S,
              qk_scale, D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
              D_V: tl.constexpr, V_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dQ (and dQ_rope) of one query tile over the key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_cols = start_n + tl.arange(0, BLOCK_N)
        qk, k, kr = _scores(q, qr, K, KR, k_cols, stride_ks, stride_krs, S, D, HEAD_DIM, D_R, ROPE_DIM,
                            MASKED, INPUT_PRECISION)
        v = _load_tile(V, k_cols, stride_vs, S, D_V, V_DIM, MASKED)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(q_rows, k_cols, S, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=INPUT_PRECISION)
        if ROPE_DIM > 0:
            dqr = tl.dot(ds, kr, dqr, input_precision=INPUT_PRECISION)
    return dq, dqr


@triton.autotune(configs=_configs(_DQ_CONFIGS, _INTERPRETER_DQ), key=_KEY,
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, KR, V, DO, LSE, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_krb, stride_krs,
    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    H, GROUP, S, sm_scale, seq_bucket,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, D_R: tl.constexpr, ROPE_DIM: tl.constexpr,
    D_V: tl.constexpr, V_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (B, S, H, D + D_R) for BLOCK_M query rows of one (batch, head)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    block_m, b, h = _program_coords(S, BLOCK_M, H, IS_CAUSAL)
    K, KR, V = _kv_bases(K, KR, V, b, h // GROUP, stride_kb, stride_kh, stride_krb, stride_vb, stride_vh)
    Q += b.to(tl.int64) * stride_qb + h * stride_qh
    DQ += b.to(tl.int64) * stride_dqb + h * stride_dqh
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    q_start = block_m * BLOCK_M
    q_rows = q_start + tl.arange(0, BLOCK_M)
    q, qr = _load_query(Q, q_rows, stride_qs, S, D, HEAD_DIM, D_R, ROPE_DIM)
    dqr = tl.zeros((1, 1), tl.float32)  # a placeholder unless there is a rope part
    if ROPE_DIM > 0:
        dqr = tl.zeros((BLOCK_M, ROPE_DIM), tl.float32)
    do = _load_tile(DO + b.to(tl.int64) * stride_dob + h * stride_doh, q_rows, stride_dos, S, D_V, V_DIM, True)
    bh = (b * H + h).to(tl.int64)
    lse2 = tl.load(LSE + bh * S + q_rows, mask=q_rows < S, other=0.0)
    delta = tl.load(Delta + bh * S + q_rows, mask=q_rows < S, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    split, end = _key_ranges(q_start, S, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq, dqr = _dq_inner(dq, dqr, q, qr, do, lse2, delta, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows, 0,
                        split, S, qk_scale, D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_N, IS_CAUSAL, False,
                        INPUT_PRECISION)
    dq, dqr = _dq_inner(dq, dqr, q, qr, do, lse2, delta, K, KR, V, stride_ks, stride_krs, stride_vs, q_rows,
                        split, end, S, qk_scale, D, HEAD_DIM, D_R, ROPE_DIM, D_V, V_DIM, BLOCK_N, IS_CAUSAL, True,
                        INPUT_PRECISION)
    scale = tl.cast(sm_scale, tl.float32)
    _store_tile(DQ, q_rows, stride_dqs, S, dq * scale, D, HEAD_DIM)
    if ROPE_DIM > 0:
        _store_tile(DQ + D, q_rows, stride_dqs, S, dqr * scale, D_R, ROPE_DIM)


# Launched through the tuned-config cache (kernels/_common.py), every argument in declaration order.
_fwd = TunedKernel(_attn_fwd_kernel)
_fwd_tma = TunedKernel(_attn_fwd_tma_kernel)
_dkdv = TunedKernel(_attn_bwd_dkdv_kernel)
_dq = TunedKernel(_attn_bwd_dq_kernel)
# δ preprocess: rows per program so that each of its two (rows, HEAD_DIM) tiles holds 4096 elements
# (32 fp32 registers per thread at 4 warps).
_PREPROCESS_TILE = 4096


# ---------------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ---------------------------------------------------------------------------------------------------

def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels need unit stride along the last dim: a tensor without it is copied; the other dims'
    strides (0 included) are read in place."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_offsets(**tensors) -> None:
    """Offsets inside one batch entry are int32 in the kernels (only the batch offset is int64). Each
    value: a tensor, or the shape of a contiguous output still to be allocated."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            shape, strides = t.shape, t.stride()
        else:
            shape, strides = t, [math.prod(t[i + 1:]) for i in range(len(t))]
        span = sum((n - 1) * abs(st) for n, st in zip(shape[1:], strides[1:]))
        if span >= 2**31:
            raise ValueError(f"{name}: one batch entry spans {span + 1} elements through its strides; the "
                             f"kernels address at most 2^31 per entry (views keep their buffer's strides: pass "
                             f"contiguous tensors of fewer heads per call, or a shorter sequence)")


def _padded(n: int) -> int:
    """Register width of a head dim of n: the next power of two, at least 16 (tl.dot's minimum); 0 for 0."""
    return max(16, next_power_of_2(n)) if n else 0


def head_meta(d: int, d_rope: int, d_v: int, dtype: torch.dtype, causal: bool) -> dict:
    """The constexpr arguments the kernels take for heads of q·k dim d (+ a rope part of d_rope) and v
    dim d_v."""
    return dict(D=d, HEAD_DIM=_padded(d), D_R=d_rope, ROPE_DIM=_padded(d_rope), D_V=d_v, V_DIM=_padded(d_v),
                IS_CAUSAL=bool(causal), INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _keeps_residual(residual: bool, dtype: torch.dtype) -> bool:
    """Whether launch_fwd stores O's rounding residual: asked for, and O rounded to 16 bits."""
    return residual and dtype in (torch.float16, torch.bfloat16)


def _fwd_fake(q, k, kr, v, causal, sm_scale, d_rope=0, residual=False):
    B, S, H, _ = q.shape
    o = q.new_empty((B, S, H, v.shape[3]))
    return o, q.new_empty((B, H, S), dtype=torch.float32), torch.empty_like(o) if _keeps_residual(
        residual, q.dtype) else absent(q)


@launcher("attention_fwd", fake=_fwd_fake)
def launch_fwd(q: torch.Tensor, k: torch.Tensor, kr: torch.Tensor | None, v: torch.Tensor, causal: bool,
               sm_scale: float, d_rope: int = 0, residual: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward, for attention (kr None, d_rope 0) and MLA. q (B, S, H, D + d_rope); k (B, S, Hkv, D);
    kr (B, S, d_rope): rope keys shared by all heads; v (B, S, Hkv, D_V); unit stride along the last dim.
    residual: also return O's rounding residual for the backward's δ (fp16/bf16 only; see Precision).
    Returns (o, lse, o_res): o (B, S, H, D_V) contiguous in q's dtype; lse (B, H, S) fp32, base 2 (the
    natural-log LSE times log2 e: what the backward takes);
    o_res like o, O_fp32 − o rounded to o's dtype, or empty when not kept."""
    B, S, H, _ = q.shape
    Hkv, d, d_v = k.shape[2], k.shape[3], v.shape[3]
    o = empty((B, S, H, d_v), q.dtype, q.device)
    lse = empty((B, H, S), torch.float32, q.device)
    keep = _keeps_residual(residual, q.dtype)
    o_res = empty(o.shape, o.dtype, o.device) if keep else absent(q)
    if o.numel() == 0:
        return o, lse, o_res
    # named as the caller's arguments: attention's k, v; mla_attention's k_nope, v; latent_attention's c (k and v)
    if kr is None:
        _check_offsets(q=q, k=k, v=v, o=o)
    elif k is v:
        _check_offsets(q=q, c=k, k_rope=kr, o=o)
    else:
        _check_offsets(q=q, k_nope=k, v=v, k_rope=kr, o=o)
    if kr is None and _tma_forward(q, k, v):
        with _tma_scratch(q.device):
            _fwd_tma.launch(
                lambda m: (cdiv(S, m["BLOCK_M"]) * B * H,),
                q, k, v, o, o_res if keep else o, lse, *_tma_strides(q), *_tma_strides(k), *_tma_strides(v),
                o.stride(0), o.stride(1), o.stride(2), B, H, H // Hkv, S, sm_scale, _seq_bucket(S),
                D=d, IS_CAUSAL=bool(causal), STORE_RES=keep, EVEN_S=S % 128 == 0,
            )
        return o, lse, o_res
    kr_strides = (0, 0) if kr is None else (kr.stride(0), kr.stride(1))
    _fwd.launch(
        lambda m: (cdiv(S, m["BLOCK_M"]) * B * H,),
        # without a rope part, k stands in for the unread kr; o for an unwritten residual
        q, k, k if kr is None else kr, v, o, o_res if keep else o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *kr_strides,
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, H // Hkv, S, sm_scale, _seq_bucket(S),
        **head_meta(d, d_rope, d_v, q.dtype, causal), STORE_RES=keep,
    )
    return o, lse, o_res


def tma_requested() -> bool:
    """LWT_ATTN_TMA=1: attention's forward takes _attn_fwd_tma_kernel where it can (_tma_forward); 0 or
    unset: never. Read at each launch."""
    value = os.environ.get("LWT_ATTN_TMA", "0").strip() or "0"
    if value not in ("0", "1"):
        raise ValueError(f"LWT_ATTN_TMA: expected 1 (the TMA forward where it applies) or 0, got {value!r}")
    return value == "1"


def _tma_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this attention forward runs _attn_fwd_tma_kernel: asked for (tma_requested), an sm_90 GPU
    (or the interpreter), 16-bit inputs, one head dim D of 32, 64 or 128 for q, k and v, and each of them
    readable as the (B, S, heads·D) tensor a descriptor describes: unit stride along D, heads D apart,
    batch and row strides that are positive multiples of 16 bytes (TMA's rule), a 16-byte aligned start."""
    if not tma_requested():
        return False
    D = q.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16) or D not in _TMA_HEAD_DIMS:
        return False
    if not interpreting() and not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    for t in (q, k, v):
        if t.shape[3] != D or t.stride(3) != 1 or (t.shape[2] > 1 and t.stride(2) != D) or t.data_ptr() % 16:
            return False
        if any(st <= 0 or (st * t.element_size()) % 16 for st in _tma_strides(t)):
            return False
    return True


def _tma_strides(t: torch.Tensor) -> tuple[int, int]:
    """The batch and row strides of t (B, S, heads, D) for its descriptor: a dim of size 1 takes the
    contiguous stride in its place (torch leaves any stride there; only index 0 is read)."""
    B, S, heads, D = t.shape
    row = t.stride(1) if S > 1 else heads * D
    return (t.stride(0) if B > 1 else S * row), row


@contextlib.contextmanager
def _tma_scratch(device: torch.device):
    """Global memory for the descriptors a kernel builds (tl.make_tensor_descriptor: 128 bytes each per
    program), from torch's caching allocator on the inputs' device, for this launch only: triton takes
    it from a context variable (triton.set_allocator sets it for good; the caller's, if any, is restored
    here). The interpreter needs none."""
    if interpreting():
        yield
        return
    token = _allocation._allocator.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                                  device=device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def launch_delta(o, do, o_res=None):
    """δ = rowsum(dO ∘ O): (B, H, S) fp32, from o and do (B, S, H, D_V) with unit stride along D_V; O is
    o + o_res when launch_fwd's residual (like o) is given (None or empty: o alone)."""
    B, S, H, d_v = o.shape
    delta = empty((B, H, S), torch.float32, o.device)
    rows = _PREPROCESS_TILE // _padded(d_v)
    has_res = o_res is not None and o_res.numel() > 0
    r = o_res if has_res else o
    _bwd_preprocess_kernel[(cdiv(S, rows) * B * H,)](
        o, r, do, delta, o.stride(0), o.stride(1), o.stride(2), r.stride(0), r.stride(1), r.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, S, D=d_v, HEAD_DIM=_padded(d_v), HAS_RES=has_res, BLOCK_M=rows, num_warps=4,
    )
    return delta


def launch_dq(do, q, k, kr, v, lse, delta, causal: bool, sm_scale: float, d_rope: int = 0):
    """dQ, for attention and MLA (arguments as in launch_fwd): (B, S, H, D + d_rope) in q's dtype."""
    B, S, H, _ = q.shape
    Hkv, d, d_v = k.shape[2], k.shape[3], v.shape[3]
    dq = empty(q.shape, q.dtype, q.device)
    kr_strides = (0, 0) if kr is None else (kr.stride(0), kr.stride(1))
    _dq.launch(
        lambda m: (cdiv(S, m["BLOCK_M"]) * B * H,),
        q, k, k if kr is None else kr, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *kr_strides,
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, H // Hkv, S, sm_scale, _seq_bucket(S),
        **head_meta(d, d_rope, d_v, q.dtype, causal),
    )
    return dq


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float):
    """Launch the forward. q (B, S, H, D); k, v (B, S, Hkv, D); unit stride along D. Returns
    (o, lse): o (B, S, H, D) contiguous in q's dtype; lse (B, H, S) fp32, natural log."""
    o, lse2, _ = launch_fwd(q, k, None, v, causal, sm_scale)
    return o, lse2 * math.log(2)


def grads_like(need: tuple, *inputs: torch.Tensor, zero: bool = False) -> tuple:
    """For a backward launcher: per input, a contiguous tensor of its shape and dtype where `need` says so
    (uninitialised, or zeros), else the empty tensor that stands for "not computed"."""
    make = torch.zeros if zero else torch.empty
    return tuple(make(t.shape, dtype=t.dtype, device=t.device) if wanted else absent(t)
                 for wanted, t in zip(need, inputs))


def _bwd_fake(do, q, k, v, o, lse, causal, sm_scale, need_dq=True, need_dkdv=True, o_res=None):
    return grads_like((need_dq, need_dkdv, need_dkdv), q, k, v)


@launcher("attention_bwd", fake=_bwd_fake)
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, sm_scale: float, need_dq: bool = True,
                  need_dkdv: bool = True, o_res: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: δ, then dQ and dK/dV (each pass only if needed, else its result is empty).
    Shapes as in attention_fwd; do like o; lse: launch_fwd's (base 2, not attention_fwd's natural-log one);
    o_res: launch_fwd's residual of o, or None. Returns (dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return grads_like((need_dq, need_dkdv, need_dkdv), q, k, v, zero=True)
    dq = absent(q)
    dk = empty(k.shape, k.dtype, k.device) if need_dkdv else None
    dv = empty(v.shape, v.dtype, v.device) if need_dkdv else None
    _check_offsets(do=do, dq=q.shape, **({"dk": dk, "dv": dv} if need_dkdv else {}))
    delta = launch_delta(o, do, o_res)
    if need_dq:
        dq = launch_dq(do, q, k, None, v, lse, delta, causal, sm_scale)
    if not need_dkdv:
        return dq, absent(k), absent(v)
    _dkdv.launch(
        lambda m: (cdiv(S, m["BLOCK_N"]) * B * Hkv,),
        q, k, v, do, lse, delta, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, H // Hkv, S, sm_scale, _seq_bucket(S),
        **head_meta(D, 0, D, q.dtype, causal),
    )
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Autograd over the launchers; `attention` validates and fixes the scale before `.apply`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse, o_res = launch_fwd(q, k, None, v, causal, sm_scale, residual=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(q, k, v, o, lse, o_res)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    @first_order_only
    def backward(ctx, do):
        q, k, v, o, lse, o_res = ctx.saved_tensors
        need = ctx.needs_input_grad
        dq, dk, dv = attention_bwd(_unit_last(do), q, k, v, o, lse, ctx.causal, ctx.sm_scale,
                                   need_dq=need[0], need_dkdv=need[1] or need[2], o_res=o_res)
        return (*(g if wanted else None for g, wanted in zip((dq, dk, dv), need)), None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Flash attention (Triton) for MHA, GQA and MQA.

    Args:
        q: (B, S, H, D), float32, float16 or bfloat16, on a CUDA device (or CPU under TRITON_INTERPRET=1).
        k, v: (B, S, Hkv, D), q's dtype and device, with H % Hkv == 0. Any strides; only a non-unit
            stride along D costs a copy.
        causal: query i attends keys j <= i; False (the default) attends all S keys.
        softmax_scale: > 0; D ** -0.5 when None.
    Returns:
        (B, S, H, D) in q's dtype, softmax(scale · q kᵀ) v per head with K/V head h // (H / Hkv).
        Gradients flow to q, k and v.
    Raises:
        ValueError: naming the argument, for a wrong rank, shape, dtype, device, head dim (1..256),
            causal flag or scale, or a tensor whose batch entry spans more than 2^31 elements through its
            strides (see Limits), before any launch.
    """
    check_attention_args(q, k, v, causal, softmax_scale)
    check_kernel_device(q, "q")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if forward_only(q, k, v):  # inference, evaluation: no O residual, no autograd.Function
        return launch_fwd(_unit_last(q), _unit_last(k), None, _unit_last(v), causal, scale)[0]
    return AttentionFunction.apply(*distinct(q, k, v), causal, scale)


__all__ = ["attention", "attention_fwd", "attention_bwd", "AttentionFunction", "MAX_HEAD_DIM"]
