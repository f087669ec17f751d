"""Time each launch config of MLA's backward passes, forced one by one, on the GPU at hand (not part of
run_all).

    python benchmarks/tune_mla.py [--batches 1,4,8]

DeepSeek-V2's heads (H 32, Dn 128, Dr 64, Dv 128), S 2048, bf16, bidirectional and causal. For each batch
size: the forward (autotuned) and δ, then δ + the dK/dV pass once with each config of
attention._MLA_DKDV_CONFIGS["mla"] (the autotuner bypassed) and with the two nested configs the H200 run of
e3f8149 chose from the 256 list, for comparison; the flattened configs also with the heads split into more
chunks than mla._head_chunks picks, at the largest batch size (4 heads per program, and 1: more
programs, more fp32 partial dk_rope tiles to sum); and at that batch size the dQ pass with each config
of _DQ_CONFIGS["mla"]. Each forced run's gradients are compared with the autotuned launch's (the max
absolute difference is printed: the configs differ only in summation order). TFLOP/s count the products
each pass computes, recomputation included (per query, key and head: forward 2·(Dqk + Dv); dK/dV the
scores again, dP, dV and dK, 2·(2·Dqk + 2·Dv), or with SPLIT, whose dv programs compute the
scores once more, 2·(3·Dqk + 2·Dv); dQ the scores again, dP and dQ, 2·(2·Dqk + Dv)), halved
for causal. The autotuner's own pick would be the fastest config at each shape: this shows by how much,
and which config LWT_AUTOTUNE=0 (the first of the list) should be.
"""
from __future__ import annotations

import argparse
import math
import sys

import _harness as H  # isort: skip
import torch

from kernels import attention as A
from kernels import mla as M

DEVICE, DTYPE = "cuda", torch.bfloat16
HEADS, SEQ, D_NOPE, D_ROPE, D_V = 32, 2048, 128, 64, 128
# The nested dK/dV configs e3f8149 ran MLA with (head dim 256 list): the baseline of the flattened ones.
E3F8149_DKDV = [(16, 32, 8, 2, False, False), (32, 32, 8, 1, False, False)]


class Forced:
    """Stands in for a TunedKernel: launches every call with one config."""

    def __init__(self, tuned, entry: tuple):
        self.tuned, self.config = tuned, A.as_config(entry)

    def launch(self, grid, *args, **meta):
        self.tuned.autotuned.fn[grid](*args, **meta, **self.config.all_kwargs())


def _time_forced(module, name: str, entry: tuple, run):
    """Milliseconds of run() (and its result) with module.<name> forced to one config; None if it fails."""
    tuned = getattr(module, name)
    setattr(module, name, Forced(tuned, entry))
    try:
        return H.attempt(None, f"{entry}", lambda: (H.bench_ms(run), run()))
    finally:
        setattr(module, name, tuned)


def _time_with_chunks(chunks: int, timing):
    """timing() with mla_bwd splitting the heads into `chunks` chunks for its dK/dV pass (mla._head_chunks
    picks the fewest that give two programs per multiprocessor)."""
    picks = M._head_chunks
    M._head_chunks = lambda B, S, H, device: chunks
    try:
        return timing()
    finally:
        M._head_chunks = picks


def _max_diff(got, want) -> float:
    """The largest |got - want| over the gradients; NaN if any is NaN (Python's max() would drop it)."""
    diffs = [float((g.float() - w.float()).abs().max()) for g, w in zip(got, want) if g.numel()]
    return math.nan if any(map(math.isnan, diffs)) else max(diffs)


def run_case(B: int, causal: bool, dq_too: bool) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=gen)  # noqa: E731
    q, k_nope, k_rope = randn(B, SEQ, HEADS, D_NOPE + D_ROPE), randn(B, SEQ, HEADS, D_NOPE), randn(B, SEQ, D_ROPE)
    v, do = randn(B, SEQ, HEADS, D_V), randn(B, SEQ, HEADS, D_V)
    scale = (D_NOPE + D_ROPE) ** -0.5
    pairs = B * HEADS * SEQ * SEQ / (2 if causal else 1)  # (query, key, head) triples computed
    d_qk = D_NOPE + D_ROPE
    tflops = lambda per_pair, ms: f"{per_pair * pairs / ms / 1e9:.0f} TFLOP/s"  # noqa: E731
    tag = f"B{B} {'causal' if causal else 'bidirectional'} (head chunks {M._head_chunks(B, SEQ, HEADS, q.device)})"
    fwd = lambda: A.launch_fwd(q, k_nope, k_rope, v, causal, scale, d_rope=D_ROPE, residual=True)  # noqa: E731
    ms = H.bench_ms(fwd)
    print(f"{tag}: fwd (autotuned) {ms:.3f} ms, {tflops(2 * (d_qk + D_V), ms)}", flush=True)
    o, lse, o_res = fwd()
    print(f"{tag}: delta {H.bench_ms(lambda: A.launch_delta(o, do, o_res)):.3f} ms", flush=True)
    dkdv = lambda: M.mla_bwd(do, q, k_nope, k_rope, v, o, lse, causal, scale, need_dq=False,  # noqa: E731
                             o_res=o_res)[1:]
    want = dkdv()  # the autotuned launch
    chunks = M._head_chunks(B, SEQ, HEADS, q.device)
    for entry in A._MLA_DKDV_CONFIGS["mla"] + E3F8149_DKDV:
        # at the largest batch, the flattened configs also with more, smaller head chunks: 4 heads per
        # program, and 1
        more = [c for c in (HEADS // 4, HEADS) if c > chunks and HEADS % c == 0] if entry[4] and dq_too else []
        for n_chunks in dict.fromkeys([chunks] + more):
            timed = _time_with_chunks(n_chunks, lambda entry=entry: _time_forced(M, "_dkdv", entry, dkdv))
            if timed is not None:
                ms, got = timed
                heads = "" if n_chunks == chunks else f", {HEADS // n_chunks} head(s) per program"
                products = 2 * ((3 if entry[5] else 2) * d_qk + 2 * D_V)  # SPLIT computes the scores twice
                print(f"{tag}: delta + dK/dV {entry}{heads}: {ms:.3f} ms, {tflops(products, ms)}, "
                      f"max |diff| {_max_diff(got, want):.1e}", flush=True)
    if not dq_too:
        return
    delta = A.launch_delta(o, do, o_res)
    dq = lambda: (A.launch_dq(do, q, k_nope, k_rope, v, lse, delta, causal, scale, d_rope=D_ROPE),)  # noqa: E731
    want = dq()
    for entry in A._DQ_CONFIGS["mla"]:
        timed = _time_forced(A, "_dq", entry, dq)
        if timed is not None:
            ms, got = timed
            print(f"{tag}: dQ {entry}: {ms:.3f} ms, {tflops(2 * (2 * d_qk + D_V), ms)}, max |diff| "
                  f"{_max_diff(got, want):.1e}", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--batches", default="1,4,8", help="comma-separated batch sizes (default 1,4,8)")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batches: expected comma-separated ints >= 1, got {args.batches!r}")
    if not H.HAS_GPU:
        print("tune_mla: no CUDA GPU here; nothing to time")
        return
    print(f"tune_mla on {H.gpu_name()}: H {HEADS}, Dn {D_NOPE}, Dr {D_ROPE}, Dv {D_V}, S {SEQ}, {DTYPE}")
    for B in batches:
        for causal in (False, True):
            run_case(B, causal, dq_too=B == max(batches))


if __name__ == "__main__":
    main()
