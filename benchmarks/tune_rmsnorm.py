"""Sweep the launch constants of kernels/rmsnorm.py on the GPU at hand (not part of run_all).

    python benchmarks/tune_rmsnorm.py

Prints, at 16384x4096 and 16384x16384 bf16, the forward time per forward tile size, and the
forward+backward time per (backward programs per SM, backward tile size, widest backward row held in
registers), beside F.rms_norm and a copy of the same bytes measured in the same run, plus the launch
config the autotuner picked. The constants in kernels/rmsnorm.py are set from what this shows.
"""
from __future__ import annotations

import itertools

import _harness as H  # noqa: F401  # isort: skip
import torch
import torch.nn.functional as F

from kernels import rmsnorm as K

EPS = 1e-6


def _reset_autotune():
    for kernel in (K._rms_norm_fwd_kernel, K._rms_norm_bwd_kernel, K._rms_norm_bwd_row_dot_kernel):
        kernel.cache.clear()


def _fwd_bwd(fn, x, w, dy):
    return lambda: torch.autograd.grad(fn(x, w), [x, w], dy)


def main():
    if not H.HAS_GPU:
        print("tune_rmsnorm: no CUDA GPU here; nothing to tune")
        return
    defaults = {k: getattr(K, k) for k in ("FWD_TILE_ELEMENTS", "BWD_TILE_ELEMENTS", "BWD_PROGRAMS_PER_SM", "BWD_MAX_BLOCK_N")}
    print(f"tune_rmsnorm on {H.gpu_name()}; current constants {defaults}")
    for M, N in ((16384, 4096), (16384, 16384)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=gen)
        dy = torch.randn_like(x)
        copy = H.copy_ms(x)
        torch_fwd = H.bench_ms(lambda: F.rms_norm(x, (N,), w, EPS))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch_fb = H.bench_ms(_fwd_bwd(lambda a, b: F.rms_norm(a, (N,), b, EPS), xg, wg, dy))
        print(f"\n{M}x{N}: copy {copy:.4f} ms, F.rms_norm fwd {torch_fwd:.4f} ms, fwd+bwd {torch_fb:.4f} ms")
        for tile in (4096, 8192, 16384):
            K.FWD_TILE_ELEMENTS = tile
            _reset_autotune()
            ms = H.bench_ms(lambda: K.rms_norm(x, w, EPS))
            print(f"  fwd tile {tile:6d}: {ms:.4f} ms = {100 * copy / ms:5.1f}% of copy  "
                  f"[{K._rms_norm_fwd_kernel.best_config}]")
        K.FWD_TILE_ELEMENTS = defaults["FWD_TILE_ELEMENTS"]
        max_blocks = (8192, 16384) if N > 8192 else (defaults["BWD_MAX_BLOCK_N"],)
        for per_sm, tile, max_block in itertools.product((1, 2, 4, 8), (4096, 8192), max_blocks):
            K.BWD_PROGRAMS_PER_SM, K.BWD_TILE_ELEMENTS, K.BWD_MAX_BLOCK_N = per_sm, tile, max_block
            _reset_autotune()
            ms = H.bench_ms(_fwd_bwd(lambda a, b: K.rms_norm(a, b, EPS), xg, wg, dy))
            print(f"  fwd+bwd programs/SM {per_sm} tile {tile:5d} max row {max_block:5d}: {ms:.4f} ms = "
                  f"{torch_fb / ms:.2f}x F.rms_norm  [{K._rms_norm_bwd_kernel.best_config}]")
        for k, v in defaults.items():
            setattr(K, k, v)


if __name__ == "__main__":
    main()
