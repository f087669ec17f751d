"""Sweep the launch constants of kernels/rmsnorm.py on the GPU at hand (not part of run_all).

    python benchmarks/tune_rmsnorm.py [--apply [bench_rmsnorm args...]]

At 16384x4096 (plain and with the residual) and 16384x16384, bf16, prints the forward+backward GPU
time (CUDA-graph replay, so host overhead does not hide kernel differences) per (backward programs per
SM, backward tile, widest backward row held in registers) beside F.rms_norm measured the same way in
the same run, and the warp count the autotuner picked. Also prints the host (CPU) cost of one lwt and
one torch forward+backward, which is what eager timings of small shapes measure. With --apply, the
fastest setting is kept for the rest of the process and bench_rmsnorm runs with it (its remaining
arguments are passed on), so the table it prints is for exactly those constants.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import _harness as H  # isort: skip
import torch
import torch.nn.functional as F

from kernels import rmsnorm as K

EPS = 1e-6
KNOBS = ("BWD_PROGRAMS_PER_SM", "BWD_TILE_ELEMENTS", "BWD_MAX_BLOCK_N")


def _reset_autotune():
    for tuned in (K._fwd, K._bwd, K._row_dot):
        tuned.autotuned.cache.clear()
        tuned.best.clear()


def _fwd_bwd(fn, inputs, cotangents):
    def step():
        outs = fn(*inputs)
        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), inputs, cotangents)
    return step


def _fwd_bwd_values(fn, inputs, cotangents):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, cotangents))


def _host_us(step, n=200):
    """Host time per call with the GPU never waited on: what a step costs the CPU."""
    return H.host_and_wall_ms(step, n, warmup=1)[0] * 1e3


def sweep(M, N, residual, settings):
    gen = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    x, w = randn(M, N).requires_grad_(), (randn(N) * 0.1 + 1).requires_grad_()
    r = randn(M, N).requires_grad_() if residual else None
    inputs = [x, w] + ([r] if residual else [])
    cots = [randn(M, N)] + ([randn(M, N)] if residual else [])
    if residual:
        def ref(a, b, c):
            s = a + c
            return F.rms_norm(s, (N,), b, EPS), s
        lwt = lambda a, b, c: K.rms_norm(a, b, EPS, c)  # noqa: E731
    else:
        ref = lambda a, b: F.rms_norm(a, (N,), b, EPS)  # noqa: E731
        lwt = lambda a, b: K.rms_norm(a, b, EPS)  # noqa: E731
    torch_ms = H.attempt(None, "torch graph timing", lambda: H.bench_graph_ms(_fwd_bwd(ref, inputs, cots)))
    print(f"\n{M}x{N}{' +res' if residual else ''}: copy {H.copy_ms(x.detach()):.4f} ms, "
          f"torch fwd+bwd {torch_ms} ms (graph)")
    # The launch path must give the reference's answer on this GPU before its speed means anything.
    got, want = _fwd_bwd_values(lwt, inputs, cots), _fwd_bwd_values(ref, inputs, cots)
    errs = [((g.float() - e.float()).abs().max() / e.float().abs().max()).item() for g, e in zip(got, want)]
    print(f"  lwt vs torch, max error / max value per output and gradient: {', '.join(f'{v:.1e}' for v in errs)}"
          + ("" if max(errs) < 2e-2 else "  MISMATCH"))
    results = {}
    for setting in settings:
        for k, v in zip(KNOBS, setting):
            setattr(K, k, v)
        _reset_autotune()
        ms = H.attempt(None, "lwt graph timing", lambda: H.bench_graph_ms(_fwd_bwd(lwt, inputs, cots))) or float("inf")
        results[setting] = ms
        ratio = f"{torch_ms / ms:.2f}x torch" if torch_ms else "torch not measured"
        print(f"  {dict(zip(KNOBS, setting))}: {ms:.4f} ms = {ratio}  "
              f"[bwd {K._rms_norm_bwd_kernel.best_config}]", flush=True)
    print(f"  host cost of one lwt fwd+bwd: {_host_us(_fwd_bwd(lwt, inputs, cots)):.0f} us "
          f"(torch: {_host_us(_fwd_bwd(ref, inputs, cots)):.0f} us)")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                usage="%(prog)s [-h] [--apply [bench_rmsnorm args...]]")
    p.add_argument("--apply", action="store_true",
                   help="keep the fastest setting and run bench_rmsnorm with it (the other arguments are its)")
    args, rest = p.parse_known_args(argv)
    if rest and not args.apply:
        p.error(f"unrecognized arguments: {' '.join(rest)} (bench_rmsnorm's options go with --apply)")
    if args.apply:
        H.parse_args("bench_rmsnorm", rest)  # a bad bench option fails now, not after the sweep
    if not H.HAS_GPU:
        print("tune_rmsnorm: no CUDA GPU here; nothing to tune")
        return
    apply = args.apply
    defaults = tuple(getattr(K, k) for k in KNOBS)
    print(f"tune_rmsnorm on {H.gpu_name()}; current {dict(zip(KNOBS, defaults))}")
    narrow = list(itertools.product((1, 2), (4096, 8192), (defaults[2],)))
    plain = sweep(16384, 4096, False, narrow)
    res = sweep(16384, 4096, True, narrow)
    wide = sweep(16384, 16384, False, list(itertools.product((1, 2), (4096,), (8192, 16384))))
    # Narrow rows: the setting with the least total time over the plain and residual cases.
    best = min(narrow, key=lambda s: plain[s] + res[s])
    best_wide = min(wide, key=wide.get)
    chosen = (best[0], best[1], best_wide[2])
    print(f"\nfastest: {dict(zip(KNOBS, chosen))} (wide rows alone: {dict(zip(KNOBS, best_wide))})")
    if apply:
        for k, v in zip(KNOBS, chosen):
            setattr(K, k, v)
        _reset_autotune()
        import bench_rmsnorm

        bench_rmsnorm.main(rest)
    else:
        for k, v in zip(KNOBS, defaults):
            setattr(K, k, v)


if __name__ == "__main__":
    main()
