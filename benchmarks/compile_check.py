"""Compile the Triton kernels for an NVIDIA target on any machine (no GPU needed) and report registers,
spills and shared memory per launch config.

    python benchmarks/compile_check.py [--quick] [--arch 90] [--kernels attention,rmsnorm]

The Triton interpreter runs kernels as Python, so it accepts code the compiler rejects (a jit helper
returning different types from two branches, say) and says nothing about register pressure. This
compiles each autotune config through triton's own ptxas (shipped in the wheel) for `--arch` (90 =
H100/H200) and prints `REG` (registers per thread, 255 at most), `SPILL` (bytes of local-memory stack:
spills, which cost bandwidth), `SMEM` and `MMA` (the tensor-core instruction and its operand types), then
`WS` where a loop came out warp-specialised (setmaxnreg in the PTX: the opt-in TMA attention forward's WS
configs, compiled for sm_90 only).
--quick compiles one config per kernel variant (two for dK/dV: one with nested loops, one flattened;
for DeepSeek-V2's MLA heads one fused, one SPLIT; two for the TMA forward: one WS, one not), what the
test suite runs; the default compiles every
config of every list, and the specialisations some launches add (the attention forward without O's
residual, MLA's dK/dV with one head per program, RMSNorm's missing operands as None). `SMEM` of an attention or MLA config also shows what the autotune
prune counts for it (`prune counts`). Exit code 1 if any compile failed, or if a config's shared memory
exceeds what the prune counts by more than the margin the prune leaves under 227 KiB (a config it keeps
could then fail to launch; the line says so). The full run compiles about 530 configs: some 9 minutes on
a 2-core CPU.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real: import the kernels as JITFunctions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _signature(fn, constexprs, dtype, ints, floats, fp32_ptrs, ptr_dtypes=None, aligned=()):
    """Triton signature and divisibility hints of `fn`: arguments named in `ints` are i32 (strides, and
    the sizes named in `aligned`, are marked divisible by 16, as a real launch of aligned tensors would
    specialise them), `floats` fp32, `fp32_ptrs` fp32 pointers, `ptr_dtypes` {name: dtype} other pointer
    dtypes, every other argument a pointer to `dtype`."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in floats:
            sig[name] = "fp32"
        elif name in ints or name.startswith("stride"):
            sig[name] = "i32"
            if name.startswith("stride") or name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "*fp32" if name in fp32_ptrs else f"*{(ptr_dtypes or {}).get(name, dtype)}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _usage(compiled):
    """(registers, stack bytes) from the cubin, read with the cuobjdump triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _mma(ptx: str) -> str:
    """The tensor-core instruction of a kernel's PTX, e.g. `wgmma.f32.e4m3.e4m3` (Hopper's async MMA on FP8
    operands) or `mma.sync...`; `-` for none. A layout Triton cannot feed to wgmma falls back to mma.sync."""
    m = re.search(r"\b(wgmma\.mma_async|mma\.sync)\.\S*?((?:\.[a-z0-9]+){3});?\s", ptx)
    if not m:
        return "-"
    return ("wgmma" if m.group(1).startswith("wgmma") else "mma.sync") + m.group(2)


def _smem_estimate(label, dtype, const, stages):
    """Bytes of shared memory kernels/attention.py's prune counts for an attention or MLA job, and the
    most it may compile to: that plus the margin the prune leaves under sm_90's 227 KiB a block; None
    for other kernels."""
    from kernels import attention as A

    if not label.startswith(("attention ", "mla ")):
        return None
    count = {"fwd": A._fwd_smem, "dQ": A._dq_smem,
             "dK/dV": A._mla_dkdv_smem if label.startswith("mla") else A._dkdv_smem}.get(label.split()[-1])
    if count is None:  # the δ pass: a row reduction, not pruned (256 bytes of shared memory at most)
        return None
    elements = count(const["BLOCK_M"], const["BLOCK_N"], stages, const.get("FLATTEN", False),
                     const["HEAD_DIM"] + const["ROPE_DIM"], const["V_DIM"], const["ROPE_DIM"])
    counted = elements * (4 if dtype == "fp32" else 2)
    return counted, counted + A._SMEM_LIMIT - A._SMEM_BYTES


def _blocks(entry):
    """The constexprs of an attention table entry (BLOCK_M, BLOCK_N, warps, stages[, FLATTEN[, SPLIT]])."""
    from kernels import attention as A

    return A.as_config(entry).kwargs


def _picked(configs, quick):
    """The entries of a config list to compile: all; with quick the first, and in a dK/dV list also the
    first whose FLATTEN (or MLA's SPLIT) differs from it, so both kernels compile."""
    if not quick:
        return configs
    other = [e for e in configs[1:] if e[4:] != configs[0][4:]]
    return configs[:1] + other[:1]


def _fwd_variants(kernel, dtype, first):
    """The forward's STORE_RES as a training step launches it (O's residual kept for 16-bit inputs) and,
    for a list's first entry, as a call with no backward to come launches it (no residual); {} for the
    other kernels."""
    from kernels import attention as A

    if kernel is not A._attn_fwd_kernel:
        return [{}]
    return [{"STORE_RES": dtype != "fp32"}] + ([{"STORE_RES": False}] if first and dtype != "fp32" else [])


def _attention_jobs(quick):
    from kernels import attention as A

    ints = {"H", "GROUP", "S", "seq_bucket"}
    kernels = [("attention fwd", A._attn_fwd_kernel, A._FWD_CONFIGS), ("attention dK/dV", A._attn_bwd_dkdv_kernel,
               A._DKDV_CONFIGS), ("attention dQ", A._attn_bwd_dq_kernel, A._DQ_CONFIGS)]
    # (dtype, D, padded D, GROUP): GROUP None is any group (GQA); 1 is MHA, whose group triton compiles as
    # the constant it is (an int argument equal to 1 is specialised so): a kernel of its own
    variants = [("bf16", 128, 128, None), ("bf16", 64, 64, None), ("bf16", 256, 256, None), ("fp16", 96, 128, None),
                ("fp32", 64, 64, None), ("fp32", 128, 128, None), ("bf16", 128, 128, 1)]
    for label, kernel, table in kernels:
        for dtype, d, head_dim, group in (variants[:2] + variants[3:4] if quick else variants):
            configs = table["fp32" if dtype == "fp32" else max(64, head_dim)]
            for causal in (False, True):
                for entry in _picked(configs, quick):
                    for extra in _fwd_variants(kernel, dtype, first=entry == configs[0] and not quick):
                        const = dict(D=d, HEAD_DIM=head_dim, D_R=0, ROPE_DIM=0, D_V=d, V_DIM=head_dim,
                                     IS_CAUSAL=causal, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                     **_blocks(entry), **({} if group is None else {"GROUP": group}), **extra)
                        warps, stages = entry[2:4]
                        yield (label, kernel.fn, dtype, const, warps, stages, ints, {"sm_scale"}, {"LSE", "Delta"})
    # the opt-in TMA forward (sm_90 only: main skips it for other archs); WS configs report "WS" below
    tma_ints = {"B", "H", "GROUP", "S", "seq_bucket"}
    for d in ((64, 128) if quick else A._TMA_HEAD_DIMS):
        configs = A._TMA_FWD_CONFIGS[d]
        for causal in (False, True):
            for even in ((True,) if quick else (True, False)):
                for entry in (configs[:1] + [e for e in configs if not e[4]][:1] if quick else configs):
                    bm, bn, warps, stages, ws = entry
                    const = dict(D=d, IS_CAUSAL=causal, STORE_RES=True, EVEN_S=even, BLOCK_M=bm, BLOCK_N=bn, WS=ws)
                    yield ("attention fwd TMA", A._attn_fwd_tma_kernel.fn, "bf16", const, warps, stages, tma_ints,
                           {"sm_scale"}, {"LSE"})
    pre = A._bwd_preprocess_kernel
    for head_dim in (64, 128, 256):
        const = dict(D=head_dim, HEAD_DIM=head_dim, HAS_RES=True, BLOCK_M=A._PREPROCESS_TILE // head_dim)
        yield ("attention δ", pre, "bf16", const, 4, 3, {"H", "S"}, set(), {"Delta"})


def _mla_jobs(quick):
    from kernels import attention as A
    from kernels import mla as M

    ints = {"H", "GROUP", "HEADS_PER_PROGRAM", "S", "seq_bucket"}
    kernels = [("mla fwd", A._attn_fwd_kernel, A._FWD_CONFIGS), ("mla dK/dV", M._mla_bwd_dkdv_kernel,
               A._MLA_DKDV_CONFIGS), ("mla dQ", A._attn_bwd_dq_kernel, A._DQ_CONFIGS)]
    # (Dn, Dr, Dv): DeepSeek-V2's heads, a half-size variant, Dv == Dn + Dr, the widest heads taken
    variants = [("bf16", 128, 64, 128), ("bf16", 64, 32, 64), ("bf16", 128, 64, 192), ("bf16", 256, 128, 256),
                ("fp32", 256, 128, 256)]
    for label, kernel, table in kernels:
        # quick: DeepSeek-V2's heads, and for dK/dV the half-size ones too, whose list runs nested loops
        for dtype, dn, dr, dv in (variants[:2 if "dK/dV" in label else 1] if quick else variants):
            meta = A.head_meta(dn, dr, dv, None, False)
            configs = table["fp32" if dtype == "fp32" else A._table_key(meta["HEAD_DIM"] + meta["ROPE_DIM"],
                                                                         meta["V_DIM"])]
            precision = "ieee" if dtype == "fp32" else "tf32"
            for causal in (False, True):
                for entry in _picked(configs, quick):
                    first = entry == configs[0] and not quick
                    # dK/dV with one head per program (as many head chunks as heads: few key tiles), a
                    # HEADS_PER_PROGRAM of 1 that triton specialises, for a list's first entry
                    for extra in _fwd_variants(kernel, dtype, first) + (
                            [{"HEADS_PER_PROGRAM": 1}] if first and kernel is M._mla_bwd_dkdv_kernel else []):
                        const = {**meta, "IS_CAUSAL": causal, "INPUT_PRECISION": precision, **_blocks(entry),
                                 **extra}
                        warps, stages = entry[2:4]
                        yield (label, kernel.fn, dtype, const, warps, stages, ints, {"sm_scale"},
                               {"LSE", "Delta", "DKR_partial"})


def _swiglu_jobs(quick):
    from kernels import swiglu as W

    ints = {"M", "N", "K"}
    # (x dtype, frozen weights' dtype): the mixed pair is FrozenSwiGLU's frozen_dtype use
    scales = {"SX", "SG", "SU", "SDG", "SDU"}  # fp32, read (or written) only with SCALED (FP8)
    for mode in (0, 1, 2):
        # fp8: float8_e4m3fn x and weights (FP8 frozen weights), bf16 outputs; in mode 2 dg, du leave as FP8
        for dtype, wdtype in (("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp8e4nv")):
            fp8 = wdtype == "fp8e4nv"
            use = ("fp8_bwd" if mode == 2 else "fp8") if fp8 else (
                ("fp32" if wdtype == dtype else "fp32_cast") if dtype == "fp32" else ("bwd" if mode == 2 else "fwd"))
            for bm, bn, bk, warps, stages in (W._GEMM_CONFIGS[use][:1] if quick else W._GEMM_CONFIGS[use]):
                const = dict(MODE=mode, INPUT_PRECISION="ieee" if dtype == "fp32" else "tf32", SCALED=fp8,
                             GROUP_M=W._GROUP_M, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
                ptrs = {"WG": wdtype, "WU": wdtype} | ({"X": wdtype} if fp8 else {}) | (
                    {"DG": wdtype, "DU": wdtype} if fp8 and mode == 2 else {})
                yield ("swiglu dual GEMM" + ("" if wdtype == dtype else f" ({wdtype} weights)"),
                       W._swiglu_dual_gemm_kernel.fn, dtype, const, warps, stages, ints, set(), scales, ptrs)
    bm, bn = W._ELEMENTWISE_BLOCK
    for quant in (False, True):
        yield ("swiglu bwd elementwise" + (" (FP8 dg, du)" if quant else ""), W._swiglu_bwd_elementwise_kernel,
               "bf16", dict(QUANT=quant, BLOCK_M=bm, BLOCK_N=bn), 4, 1, ints, set(), scales,
               {"DG": "fp8e4nv", "DU": "fp8e4nv"} if quant else {})
    for dtype in ("bf16", "fp32"):
        yield ("swiglu FP8 row quantiser", W._quantize_rows_kernel, dtype, dict(BLOCK_D=4096), 8, 1, {"D"}, set(),
               {"SX"}, {"X8": "fp8e4nv"})
    for dtype in ("bf16", "fp32"):  # dx in x's dtype
        for bm, bn, warps, stages in (W._FP8_DX_CONFIGS[:1] if quick else W._FP8_DX_CONFIGS):
            yield ("swiglu FP8 dx GEMM", W._fp8_dx_kernel.fn, dtype, dict(GROUP_M=W._GROUP_M, BLOCK_M=bm, BLOCK_N=bn),
                   warps, stages, ints, set(), {"SA"}, {"A": "fp8e4nv", "BT": "fp8e4nv"}, ("K",))


def _row_warps(block_m, block_n, quick):
    """The warp counts the row kernels' prune keeps for a tile, in its order; quick: the first, which an
    untuned launch (LWT_AUTOTUNE=0) takes."""
    from kernels._common import prune_row_configs, row_configs

    kept = [c.num_warps for c in prune_row_configs(row_configs(), {}, BLOCK_M=block_m, BLOCK_N=block_n)]
    return kept[:1] if quick else kept


def _rmsnorm_jobs(quick):
    from kernels import rmsnorm as R

    ints, floats, fp32 = {"M", "N"}, {"eps"}, {"Rstd", "RowDot", "DW_partial"}
    rows = 16384
    # The tiles rms_norm_fwd / rms_norm_bwd launch: hidden 4096 (the goal's) whole; 16384, whole in the
    # forward and in chunks (with the row-dot pass) in the backward; 32768 in chunks in the forward. A
    # pointer the launch passes as None (no residual, no weight, no ds_out, no dw) is the constant None
    # triton specialises it to.
    for n in ((4096,) if quick else (4096, 8192, 16384, 32768)):
        block_m, block_n, single = R.launch_tile(n, rows, backward=False)
        for warps in _row_warps(block_m, block_n, quick):
            yield ("rmsnorm fwd", R._rms_norm_fwd_kernel.fn, "bf16",
                   dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=True, HAS_WEIGHT=True, SINGLE_PASS=single),
                   warps, 1, ints, floats, fp32)
            if not quick:
                yield ("rmsnorm fwd, no residual, no weight", R._rms_norm_fwd_kernel.fn, "bf16",
                       dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_RESIDUAL=False, HAS_WEIGHT=False, SINGLE_PASS=single,
                            R=None, W=None), warps, 1, ints, floats, fp32)
    for n in ((4096, 16384) if quick else (4096, 8192, 16384)):
        block_m, block_n, single = R.launch_tile(n, rows, backward=True)
        for warps in _row_warps(block_m, block_n, quick):
            if not single:
                yield ("rmsnorm bwd row dot", R._rms_norm_bwd_row_dot_kernel.fn, "bf16",
                       dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_WEIGHT=True), warps, 1, ints, floats, fp32)
            yield ("rmsnorm bwd", R._rms_norm_bwd_kernel.fn, "bf16",
                   dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single, HAS_DS_OUT=True, HAS_WEIGHT=True,
                        COMPUTE_DW=True, HAS_DRES=True, **({"RowDot": None} if single else {})),
                   warps, 1, ints, floats, fp32)
            if not quick:  # weight=None: no dw; no ds_out, no separate residual gradient
                yield ("rmsnorm bwd, no weight", R._rms_norm_bwd_kernel.fn, "bf16",
                       dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single, HAS_DS_OUT=False, HAS_WEIGHT=False,
                            COMPUTE_DW=False, HAS_DRES=False, W=None, DS_OUT=None, DW_partial=None,
                            **({"RowDot": None} if single else {})), warps, 1, ints, floats, fp32)


def _cross_entropy_jobs(quick):
    from kernels import cross_entropy as CE

    ints = {"C", "V", "D"}
    for dtype in ("bf16", "fp32"):
        for compute_lse, write_grad in ((True, True), (True, False), (False, True)):
            block_v = 4096
            yield ("ce rows", CE._ce_rows_kernel, dtype,
                   dict(COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, BLOCK_V=block_v), 8, 1, ints, set(),
                   {"RowScale", "Lse", "Loss"}, {"Target": "i64"})
    # Vocabulary and model sizes of real heads are multiples of 16 (V 128000, D 4096), and so are the
    # chunk's rows: launched, triton specialises them as such, which is what lets it pipeline the loads.
    for bv, bd, bc, warps, stages in (CE._DW_CONFIGS[:1] if quick else CE._DW_CONFIGS):
        for accumulate, out in ((False, "fp32"), (True, "fp32"), (True, "bf16")):
            yield ("ce dW accumulate", CE._ce_dw_accumulate_kernel.fn, "bf16",
                   dict(ACCUMULATE=accumulate, GROUP_V=CE._GROUP_V, BLOCK_V=bv, BLOCK_D=bd, BLOCK_C=bc), warps, stages,
                   ints, {"alpha"}, {"Acc"}, {"Out": out}, ints)
    yield ("ce scale", CE._scale_kernel, "bf16", dict(BLOCK=4096), 4, 1, {"n"}, set(), {"G"})


# The targets the launch configs and their shared-memory prunes are written for (sm_90's 227 KiB a block,
# and the Ampere/Ada parts they also run on); newer ones pipeline differently and older ones lack bf16 MMA.
ARCHS = (80, 86, 89, 90)

JOBS = {"attention": _attention_jobs, "mla": _mla_jobs, "swiglu": _swiglu_jobs, "rmsnorm": _rmsnorm_jobs,
        "cross_entropy": _cross_entropy_jobs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="one config per kernel variant")
    p.add_argument("--arch", type=int, default=90, choices=ARCHS,
                   help="compute capability: 90 (Hopper, the default) or 80, 86, 89 (Ampere, Ada)")
    p.add_argument("--kernels", default=",".join(JOBS), help=f"comma-separated subset of {', '.join(JOBS)}")
    args = p.parse_args(argv)
    unknown = [g for g in args.kernels.split(",") if g not in JOBS]
    if unknown:
        p.error(f"--kernels: unknown {', '.join(unknown)} (choose from {', '.join(JOBS)})")
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for group in args.kernels.split(","):
        for label, fn, dtype, const, warps, stages, ints, floats, fp32, *extra in JOBS[group](args.quick):
            if args.arch < 89 and "fp8e4nv" in repr(extra):  # FP8 kernels need compute capability 8.9+
                continue  # (kernels/swiglu.py refuses FP8 weights below it: never launched there)
            if args.arch != 90 and label.endswith(" TMA"):  # launched on sm_90 only (attention._tma_forward)
                continue
            sig, attrs = _signature(fn, const, dtype, ints, floats, fp32, *extra)
            shown = " ".join(f"{k}={v}" for k, v in const.items())
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                                          options=dict(num_warps=warps, num_stages=stages))
            except Exception as e:  # report and go on: every failing config is listed
                failed += 1
                msg = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())[-300:]
                print(f"FAILED {label} {dtype} {shown} w{warps} s{stages}: {type(e).__name__}: {msg}", flush=True)
                continue
            regs, stack = _usage(compiled)
            smem, estimate = compiled.metadata.shared, _smem_estimate(label, dtype, const, stages)
            under = estimate is not None and smem > estimate[1]
            failed += under
            print(f"{'FAILED' if under else 'ok'} {label} {dtype} {shown} w{warps} s{stages}: REG {regs} SPILL {stack} "
                  f"SMEM {smem}{'' if estimate is None else f' (prune counts {estimate[0]})'} "
                  f"MMA {_mma(compiled.asm['ptx'])}"
                  f"{' WS' if 'setmaxnreg' in compiled.asm['ptx'] else ''}"
                  f"{f' (compiled, but SMEM is over the {estimate[1]} bytes the prune allows for it)' if under else ''}",
                  flush=True)
    print(f"{failed} failed" if failed else "all compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
