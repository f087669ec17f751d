"""The one tolerance table of the test suite, and the comparison every kernel test uses.

Each kernel output and gradient is compared with the float64 reference (kernels/reference.py run on the
same inputs upcast to float64). Two bounds, both on the max-abs error, scaled by max |expected|:

1. The table: error <= RTOL[dtype] · max|expected|. fp32 1e-4: fp32 math with tree-ordered sums over
   up to 65536 elements stays near 1e-6 relative, so 1e-4 catches any real mistake. fp16 1e-2 and bf16
   5e-2: a few units of the 10-bit (fp16) / 7-bit (bf16) mantissa the outputs are rounded to.
2. For 16-bit dtypes, the bound flash-attention and quack use: error <= 2 · (error of the PyTorch
   reference run in the same dtype) + ATOL[dtype] · max|expected|. The reference computes in fp32 and
   rounds once, so the kernel may be at most about as wrong as that rounding; ATOL, one unit roundoff,
   only matters where the rounding happens to be exact.

Reductions over many rows (RMSNorm's dw = Σ_rows dy·ŝ): both kernel and reference accumulate in fp32,
whose relative error grows like u32·√rows ≈ 6e-8·64 = 4e-6 for the 4096 rows the tests use at most,
far below RTOL; the final rounding to the weight's dtype dominates in 16 bits, as for any output. So
the same two bounds apply to them unchanged, and no test widens them.
"""
import torch

RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ATOL = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_close(name: str, actual: torch.Tensor, expected64: torch.Tensor, same_dtype_ref: torch.Tensor | None = None):
    """actual: the kernel's result; expected64: the float64 reference; same_dtype_ref: the PyTorch
    reference computed in actual's dtype (required for 16-bit dtypes)."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten outputs are NaN-poisoned)"
    dtype = actual.dtype
    scale = expected64.abs().max().item() or 1.0
    err = (actual.double() - expected64).abs().max().item()
    assert err <= RTOL[dtype] * scale, (
        f"{name} ({dtype}): max error {err:.3e} > {RTOL[dtype]:.0e} x max|expected| {scale:.3e}")
    if dtype in ATOL:
        assert same_dtype_ref is not None, f"{name}: 16-bit comparison needs the same-dtype reference"
        ref_err = (same_dtype_ref.double() - expected64).abs().max().item()
        bound = 2 * ref_err + ATOL[dtype] * scale
        assert err <= bound, (
            f"{name} ({dtype}): max error {err:.3e} > 2 x reference's own error {ref_err:.3e} + atol "
            f"{ATOL[dtype] * scale:.3e}")
