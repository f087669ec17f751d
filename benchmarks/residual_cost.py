"""What keeping O's rounding residual costs (kernels/attention.py, Precision), on the GPU at hand (not part
of run_all).

    python benchmarks/residual_cost.py

The goal cases of bench_attention in bf16, bidirectional: GQA (B 4, S 4096, H 32/8, D 128) and MLA (B 8,
S 2048, H 32, Dn 128 / Dr 64 / Dv 128). For each, with and without the residual: the forward alone
(launch_fwd, which stores it), δ (launch_delta, which reads it) and a fwd+bwd step through the public op
(without: the forward told not to keep it, as before the residual), each a median of do_bench; then the
ratios with ÷ without. Set LWT_AUTOTUNE=0 to time each kernel's first launch config that fits instead of
autotuning it (one compilation per kernel: a quicker run).
"""
from __future__ import annotations

import argparse
import contextlib

import _harness as H  # isort: skip
import torch

from kernels import attention as A
from kernels import mla as M

DEVICE, DTYPE = "cuda", torch.bfloat16
GQA = dict(B=4, S=4096, H=32, HKV=8, D=128)
MLA = dict(B=8, S=2048, H=32, DN=128, DR=64, DV=128)


@contextlib.contextmanager
def _residual(keep: bool):
    """The forward keeps O's residual (as it does) or not (as before it did)."""
    real = A._keeps_residual
    if not keep:
        A._keeps_residual = lambda residual, dtype: False
    try:
        yield
    finally:
        A._keeps_residual = real


def run_case(name: str, fwd, op, inputs: list, do: torch.Tensor) -> dict:
    """{(pass, keep): ms}; fwd(keep) launches the forward, op(*inputs) is the public autograd op."""
    ms = {}
    for keep in (False, True):
        ms["fwd", keep] = H.bench_ms(lambda: fwd(keep))
        o, _, o_res = fwd(keep)
        ms["δ", keep] = H.bench_ms(lambda: A.launch_delta(o, do, o_res))
        leaves = [t.detach().requires_grad_() for t in inputs]
        with _residual(keep):
            ms["fwd+bwd", keep] = H.bench_ms(lambda: torch.autograd.grad(op(*leaves), leaves, do), rep_ms=300)
    for step in ("fwd", "δ", "fwd+bwd"):
        print(f"{name}: {step} {ms[step, False]:.3f} ms without the residual, {ms[step, True]:.3f} ms with it: "
              f"{ms[step, True] / ms[step, False]:.3f}x", flush=True)
    return ms


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not H.HAS_GPU:
        print("residual_cost: no CUDA GPU here; nothing to time")
        return 0
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=gen)  # noqa: E731
    print(f"residual_cost on {H.gpu_name()}, {DTYPE}, bidirectional", flush=True)
    B, S, Hq, Hkv, D = GQA["B"], GQA["S"], GQA["H"], GQA["HKV"], GQA["D"]
    q, k, v = randn(B, S, Hq, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D)
    run_case(f"GQA B{B} S{S} H{Hq}/{Hkv} D{D}",
             lambda keep: A.launch_fwd(q, k, None, v, False, D ** -0.5, residual=keep),
             A.attention, [q, k, v], randn(B, S, Hq, D))
    B, S, Hq, dn, dr, dv = MLA["B"], MLA["S"], MLA["H"], MLA["DN"], MLA["DR"], MLA["DV"]
    q, kn, kr, v = randn(B, S, Hq, dn + dr), randn(B, S, Hq, dn), randn(B, S, dr), randn(B, S, Hq, dv)
    run_case(f"MLA B{B} S{S} H{Hq} Dn{dn}/Dr{dr}/Dv{dv}",
             lambda keep: A.launch_fwd(q, kn, kr, v, False, (dn + dr) ** -0.5, d_rope=dr, residual=keep),
             M.mla_attention, [q, kn, kr, v], randn(B, S, Hq, dv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
