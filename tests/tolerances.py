"""The one tolerance table of the test suite, and the comparison every kernel test uses.

Each kernel output and gradient is compared with the float64 reference (kernels/reference.py run on the
same inputs upcast to float64). Two bounds, both on the max-abs error, scaled by max |expected|:

1. The table: error <= RTOL[dtype] · max|expected|. fp32 1e-4, fp16 1e-2, bf16 5e-2: a coarse net, a
   few units of the 10-bit (fp16) / 7-bit (bf16) mantissa the outputs are rounded to.
2. The bound flash-attention and quack use, applied to every dtype: error <= 2 · (error of the PyTorch
   reference run in the same dtype) + atol. The reference computes in fp32 and rounds once, so the
   kernel may be at most about as wrong as that. This is the bound that bites in fp32, where the
   reference is within ~1e-7 and a kernel mistake of 1/N or a dropped eps shows up far above it.
   atol = ATOL[dtype] · max|expected|: a few units of roundoff (8 for fp32, one for 16-bit outputs),
   which only matters where the reference happens to be exact.

Reductions over rows (RMSNorm's dw = Σ_rows dy·ŝ, `reduced_over` = the row count): kernel and
reference both accumulate in fp32 but in different orders (the kernel row by row in each persistent
program, torch pairwise). Rounding in a running sum of k random-sign terms grows like u32·√k relative
to the result, so atol gains FP32_SUM_ATOL·√k·max|expected| (4 units of u32 per √k), e.g. 1.5e-5
relative at 4099 rows: still well below the 1/k error of a row dropped or counted twice.
"""
import math

import torch

RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ATOL = {torch.float32: 2.0**-21, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_SUM_ATOL = 2.0**-22


def assert_close(name: str, actual: torch.Tensor, expected64: torch.Tensor, same_dtype_ref: torch.Tensor,
                 reduced_over: int = 1, scale: float | None = None, dtype: torch.dtype | None = None):
    """actual: the kernel's result; expected64: the float64 reference; same_dtype_ref: the PyTorch
    reference computed in actual's dtype; reduced_over: terms summed into each element (dw: rows);
    scale: what errors are measured against, max|expected| by default. Only for a result that is zero in
    exact arithmetic because two equal quantities cancel (attention's dQ and dK with S = 1: dS = P∘(dP − δ)
    with dP = δ; cross entropy with V = 1, whose softmax is exactly 1): there max|expected| is 0, the fp32
    reference happens to be exact too (torch's softmax of one element is 1), and the roundoff to allow is
    that of the cancelling terms, not ATOL[dtype] of the unit 1.0 that max|expected| = 0 falls back to (a
    GPU's approximate exp2 and division leave an ulp or two of those terms). dtype: whose tolerances
    apply, actual's by default; a float64 sum of 16-bit parts (attention's O + its residual) names its
    parts' dtype, since the table has no float64 row."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten outputs are NaN-poisoned)"
    dtype = actual.dtype if dtype is None else dtype
    if scale is None:
        scale = expected64.abs().max().item() or 1.0
    err = (actual.double() - expected64).abs().max().item()
    assert err <= RTOL[dtype] * scale, (
        f"{name} ({dtype}): max error {err:.3e} > {RTOL[dtype]:.0e} x max|expected| {scale:.3e}")
    ref_err = (same_dtype_ref.double() - expected64).abs().max().item()
    atol = (ATOL[dtype] + FP32_SUM_ATOL * math.sqrt(max(reduced_over - 1, 0))) * scale
    assert err <= 2 * ref_err + atol, (
        f"{name} ({dtype}): max error {err:.3e} > 2 x reference's own error {ref_err:.3e} + atol {atol:.3e}")
