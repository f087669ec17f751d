"""Attention: lwt vs PyTorch SDPA with the FLASH (FlashAttention-2) and cuDNN backends forced, GQA through
`repeat_interleave` + default SDPA (what a user without `enable_gqa` writes), and eager PyTorch math
(softmax(q kᵀ) v with bf16 matmuls and an fp32 softmax: kernels/reference.py with upcast=False; run
where its S x S matrices fit, S <= 2048 at 16384 tokens), forward and forward+backward, bf16.

    python benchmarks/bench_attention.py [--quick] [--only gqa|mla] [--plot PNG]

Cases: head dim 64 and 128; H32/Hkv32 (MHA), H32/Hkv8 (GQA), H32/Hkv1 (MQA); S 1024..16384 at 16384 tokens
per batch (B = 16384 / S), and in the full grid S 4000 (B 4: 16000 tokens), which no block size divides,
so every pass ends on a partly filled tile (the cost of a ragged length); causal and bidirectional. FLOPs
counted (the FlashAttention papers' convention): forward 4·B·H·S²·D (two matmuls of 2·S²·D per head),
halved when causal; forward+backward 3.5× the forward (the backward's five matmuls = 2.5× the forward).
SDPA takes (B, H, S, D): the providers pass transposed views of the same BSHD tensors, as a user of this
layout would. Goals (issue #3), bf16, head dim 128, S 2048..8192, MHA and GQA, both masks, measured in
this run: forward >= 1.0x SDPA-cuDNN, forward+backward >= 0.9x SDPA-cuDNN, and >= 1.5x SDPA-FLASH (FA2).

MLA cases (issue #4): DeepSeek-V2 heads (Dn 128, Dr 64, Dv 128), H 32 and 128, S 2048..8192 at 16384
tokens (and S 4000 in the full grid), both masks: lwt's MLA core vs SDPA cuDNN and efficient on K/V
materialised as a user would (k_rope expanded to every head, concatenated to k_nope; SDPA's FLASH backend
refuses Dv != Dqk). FLOPs forward 2·B·H·S²·(Dn + Dr + Dv), halved when causal, fwd+bwd 3.5x. Also the peak
memory a fwd+bwd step allocates on each path (the materialisation included for SDPA). Goal at H32 S2048:
forward >= 1.0x cuDNN, fwd+bwd >= 1.3x, with less memory.

For every goal case lwt's passes are also timed one by one (forward, δ, dQ, δ + dK/dV; for MLA the last
includes the sum of the dk_rope partials), each with the launch config its autotuner chose, under the
table: where lwt's fwd+bwd time goes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import _harness as H  # first: sets up the interpreter on CPU-only machines  # isort: skip
import torch
import torch.nn.functional as F

import lwt.functional as lwtF
from kernels import attention as A
from kernels import mla as M
from kernels import reference

HEAD_DIMS = (64, 128)
HEADS = ((32, 32), (32, 8), (32, 1))
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
RAGGED_SEQ_LENS = (4000,)  # full grid only (GQA and MLA): 4000 = 31 * 128 + 32
TOKENS = 16384
QUICK = [(128, (32, 32), 2048), (128, (32, 8), 2048), (128, (32, 8), 8192)]  # the goal's span (device time is scarce)
GOAL_SEQ = (2048, 8192)
EAGER_MAX_BYTES = 24 << 30  # eager math holds ~16 bytes per score in fwd+bwd (B·H·S² of them): skip above
DEVICE = "cuda"  # a module constant only so that a dry run can point the cases at the CPU


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name))


def _tma(on: bool):
    """A context factory: LWT_ATTN_TMA set to 1 or 0 while it lasts (lwt's row is the default path
    whatever the caller's environment says, `lwt TMA` the opt-in one), restored after."""
    @contextlib.contextmanager
    def context():
        before = os.environ.get("LWT_ATTN_TMA")
        os.environ["LWT_ATTN_TMA"] = "1" if on else "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("LWT_ATTN_TMA")
            else:
                os.environ["LWT_ATTN_TMA"] = before
    return context


def tma_gpu() -> bool:
    """Whether this GPU runs the opt-in TMA forward (kernels/attention.py: sm_90), timed as `lwt TMA`."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def providers(H_, Hkv):
    """name -> (fn(q, k, v, causal) -> o in BSHD, context manager factory to time it under)."""
    gqa = H_ != Hkv

    def sdpa(q, k, v, causal, enable_gqa=gqa):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, enable_gqa=enable_gqa)
        return o.transpose(1, 2)  # (B, S, H, D)

    def repeat_sdpa(q, k, v, causal):
        g = H_ // Hkv
        return sdpa(q, k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2), causal, enable_gqa=False)

    out = {
        "lwt": (lambda q, k, v, causal: lwtF.attention(q, k, v, causal), _tma(False)),
        "SDPA flash (FA2)": (sdpa, lambda: _sdpa_backend("FLASH_ATTENTION")),
        "SDPA cuDNN": (sdpa, lambda: _sdpa_backend("CUDNN_ATTENTION")),
    }
    def tma_attention(q, k, v, causal):  # (under _tma(True): LWT_ATTN_TMA=1)
        if not A._tma_forward(q, k, v):  # not measured, rather than the default kernel timed as this row
            raise RuntimeError("the TMA forward does not apply to these inputs (kernels/attention.py, _tma_forward)")
        return lwtF.attention(q, k, v, causal)

    if tma_gpu():
        out["lwt TMA"] = (tma_attention, _tma(True))
    if gqa:
        out["repeat_interleave+SDPA"] = (repeat_sdpa, contextlib.nullcontext)
    out["eager"] = (lambda q, k, v, causal: reference.attention_with_lse(q, k, v, causal, upcast=False)[0],
                    contextlib.nullcontext)
    return out


def _step(fn, q, k, v, causal, do):
    if do is None:
        return lambda: fn(q, k, v, causal)
    return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)


def _config(kernel) -> str:
    """The launch config a TunedKernel last ran with (tiles BLOCK_M x BLOCK_N, flattened loops, MLA's
    split dK/dV pass, warps, stages)."""
    c = kernel.last
    if c is None:
        return "-"
    flat = " flat" if c.kwargs.get("FLATTEN") else ""
    split = " split" if c.kwargs.get("SPLIT") else ""
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}{flat}{split} w{c.num_warps} s{c.num_stages}"


def note_passes(report, case, setup):
    """lwt's kernels timed one pass at a time, each with the config its autotuner chose: where the
    fwd+bwd time goes. setup() returns the passes, (name, fn, TunedKernel or None), after computing what
    they read (a failure there, like one of a pass, is noted and the bench goes on)."""
    passes = H.attempt(report, f"{case} lwt passes", setup)
    if passes is None:
        return
    parts = []
    for name, fn, kernel in passes:
        ms = H.attempt(report, f"{case} lwt pass {name}", lambda fn=fn: H.bench_ms(fn))
        if ms is None:
            parts.append(f"{name} n/a")
        else:  # the config is read right after the pass ran: the one it ran with
            parts.append(f"{name} {ms:.3f} ms" + ("" if kernel is None else f" ({_config(kernel)})"))
    line = f"{case} lwt passes: " + ", ".join(parts)
    report.note(line)
    print(line, flush=True)  # also unindented at once: device_check.sh's summary keeps it if the run is cut


def run_case(report, D, heads, S, causal, passes=False):
    """Every provider on one case, forward and forward+backward; passes: also lwt's pass breakdown."""
    H_, Hkv = heads
    B = max(1, TOKENS // S)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v, do = randn(B, S, H_, D), randn(B, S, Hkv, D), randn(B, S, Hkv, D), randn(B, S, H_, D)
    flops = 4 * B * H_ * S * S * D / (2 if causal else 1)
    case = f"H{H_}/{Hkv} D{D} S{S} B{B} {'causal' if causal else 'bidir'}"
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for t in (q, k, v):
            t.requires_grad_(backward)
        for name, (fn, ctx) in providers(H_, Hkv).items():
            if name == "eager" and B * H_ * S * S * 16 > EAGER_MAX_BYTES:
                continue
            def timed(fn=fn, ctx=ctx):
                with ctx():
                    return H.bench_ms(_step(fn, q, k, v, causal, do if backward else None))
            # A backend may have no kernel for the case (its own limits) or run out of memory: noted.
            ms = H.attempt(report, f"{case} {mode} {name}", timed)
            report.add(case, mode, name, ms, "TFLOP/s", flops * (3.5 if backward else 1.0))
    if passes:
        def setup(q=q.detach(), k=k.detach(), v=v.detach(), scale=D ** -0.5):
            # the passes of a training step: the forward keeps O's residual for δ; the default forward
            # (A._fwd's config is the one shown) whatever LWT_ATTN_TMA says
            def fwd():
                with _tma(False)():
                    return A.launch_fwd(q, k, None, v, causal, scale, residual=True)
            o, lse, o_res = fwd()
            delta = A.launch_delta(o, do, o_res)
            return [("fwd", fwd, A._fwd),
                    ("δ", lambda: A.launch_delta(o, do, o_res), None),
                    ("dQ", lambda: A.launch_dq(do, q, k, None, v, lse, delta, causal, scale), A._dq),
                    ("δ+dK/dV", lambda: A.attention_bwd(do, q, k, v, o, lse, causal, scale, need_dq=False,
                                                        o_res=o_res), A._dkdv)]
        note_passes(report, case, setup)
    return case


MLA_HEADS = (32, 128)
MLA_SEQ_LENS = (2048, 4096, 8192)
MLA_DIMS = (128, 64, 128)  # DeepSeek-V2: Dn, Dr, Dv
MLA_QUICK = [(32, 2048)]
MLA_GOAL = (32, 2048)  # (heads, S) of the goal line


def run_mla_case(report, H_, S, causal, passes=False):
    """MLA core: lwt (k_rope read once per token) vs SDPA cuDNN and efficient on K/V materialised the way
    a user would (k_rope expanded to every head and concatenated to k_nope). SDPA is timed on the
    materialised tensors; the memory column counts the materialisation too (a full fwd+bwd step).
    passes: also lwt's pass breakdown."""
    dn, dr, dv = MLA_DIMS
    B = max(1, TOKENS // S)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k_nope, k_rope, v, do = randn(B, S, H_, dn + dr), randn(B, S, H_, dn), randn(B, S, dr), randn(B, S, H_, dv), \
        randn(B, S, H_, dv)
    flops = 2 * B * H_ * S * S * (dn + dr + dv) / (2 if causal else 1)
    case = f"MLA H{H_} Dn{dn}/Dr{dr}/Dv{dv} S{S} B{B} {'causal' if causal else 'bidir'}"

    def materialise(k_nope, k_rope):
        return torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, H_, -1)], dim=-1)  # (B, S, H, Dn + Dr)

    def sdpa(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return o.transpose(1, 2)

    k_full = materialise(k_nope, k_rope)
    providers = {
        "lwt": (lambda: (q, k_nope, k_rope, v), lambda q, kn, kr, v: lwtF.mla_attention(q, kn, kr, v, causal),
                contextlib.nullcontext),
        "SDPA cuDNN": (lambda: (q, k_full, v), sdpa, lambda: _sdpa_backend("CUDNN_ATTENTION")),
        "SDPA efficient": (lambda: (q, k_full, v), sdpa, lambda: _sdpa_backend("EFFICIENT_ATTENTION")),
    }
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for name, (inputs, fn, ctx) in providers.items():
            args = inputs()
            for t in args:
                t.requires_grad_(backward)
            step = (lambda: fn(*args)) if not backward else (lambda: torch.autograd.grad(fn(*args), args, do))

            def timed(step=step, ctx=ctx):
                with ctx():
                    return H.bench_ms(step)
            report.add(case, mode, name, H.attempt(report, f"{case} {mode} {name}", timed), "TFLOP/s",
                       flops * (3.5 if backward else 1.0))
    # Memory of one fwd+bwd step from the unmaterialised inputs (what each path allocates on top).
    leaves = [t.detach().requires_grad_() for t in (q, k_nope, k_rope, v)]

    def lwt_step():
        return torch.autograd.grad(lwtF.mla_attention(*leaves, causal), leaves, do)

    def sdpa_step():
        return torch.autograd.grad(sdpa(leaves[0], materialise(leaves[1], leaves[2]), leaves[3]), leaves, do)

    mem = {}
    for name, step, ctx in (("lwt", lwt_step, contextlib.nullcontext),
                            ("SDPA cuDNN", sdpa_step, lambda: _sdpa_backend("CUDNN_ATTENTION")),
                            ("SDPA efficient", sdpa_step, lambda: _sdpa_backend("EFFICIENT_ATTENTION"))):
        def measured(step=step, ctx=ctx):
            with ctx():
                return H.peak_extra_mib(step)
        mib = H.attempt(report, f"{case} memory {name}", measured)
        if mib is not None:
            mem[name] = mib
    report.note(f"{case}: peak extra memory of a fwd+bwd step (with K materialised for SDPA): "
                + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))
    if passes:
        def setup(q=q.detach(), kn=k_nope.detach(), kr=k_rope.detach(), v=v.detach(), scale=(dn + dr) ** -0.5):
            fwd = lambda: A.launch_fwd(q, kn, kr, v, causal, scale, d_rope=dr, residual=True)  # noqa: E731
            o, lse, o_res = fwd()
            delta = A.launch_delta(o, do, o_res)
            return [("fwd", fwd, A._fwd),
                    ("δ", lambda: A.launch_delta(o, do, o_res), None),
                    ("dQ", lambda: A.launch_dq(do, q, kn, kr, v, lse, delta, causal, scale, d_rope=dr), A._dq),
                    ("δ+dK/dV", lambda: M.mla_bwd(do, q, kn, kr, v, o, lse, causal, scale, need_dq=False,
                                                  o_res=o_res), M._dkdv)]
        note_passes(report, case, setup)
    return case, mem


def _ratio(report, case, mode, other, lwt="lwt"):
    a, b = report.ms(case, mode, lwt), report.ms(case, mode, other)
    return None if a is None or b is None else b / a


def summarize(report, goal_cases):
    lines = []
    for case in goal_cases:
        cudnn_f, cudnn_fb = _ratio(report, case, "fwd", "SDPA cuDNN"), _ratio(report, case, "fwd+bwd", "SDPA cuDNN")
        fa_f, fa_fb = _ratio(report, case, "fwd", "SDPA flash (FA2)"), _ratio(report, case, "fwd+bwd", "SDPA flash (FA2)")
        fmt = lambda r: "n/a" if r is None else f"{r:.2f}x"  # noqa: E731
        ok = (cudnn_f is not None and cudnn_fb is not None and cudnn_f >= 1.0 and cudnn_fb >= 0.9
              and fa_f is not None and fa_fb is not None and min(fa_f, fa_fb) >= 1.5)
        # the opt-in TMA forward, where it was timed (sm_90): beside the goal, which is the default path's
        tma, own = ([_ratio(report, case, mode, other, lwt="lwt TMA") for mode in ("fwd", "fwd+bwd")]
                    for other in ("SDPA cuDNN", "lwt"))
        opt_in = "" if own == [None, None] else (f"; opt-in lwt TMA vs cuDNN fwd {fmt(tma[0])}, fwd+bwd "
                                                 f"{fmt(tma[1])}, vs lwt fwd {fmt(own[0])}, fwd+bwd {fmt(own[1])}")
        lines.append(f"attention {case}: vs cuDNN fwd {fmt(cudnn_f)} (goal 1.0), fwd+bwd {fmt(cudnn_fb)} (goal 0.9); "
                     f"vs FA2 fwd {fmt(fa_f)}, fwd+bwd {fmt(fa_fb)} (goal 1.5){opt_in} -> {'met' if ok else 'NOT met'}")
    return lines


def summarize_mla(report, goal_cases):
    lines = []
    for case, mem in goal_cases:
        fwd, fb = _ratio(report, case, "fwd", "SDPA cuDNN"), _ratio(report, case, "fwd+bwd", "SDPA cuDNN")
        fmt = lambda r: "n/a" if r is None else f"{r:.2f}x"  # noqa: E731
        less = "lwt" in mem and "SDPA cuDNN" in mem and mem["lwt"] < mem["SDPA cuDNN"]
        ok = fwd is not None and fb is not None and fwd >= 1.0 and fb >= 1.3 and less
        nan = float("nan")
        lines.append(f"attention {case}: vs cuDNN (K/V materialised) fwd {fmt(fwd)} (goal 1.0), fwd+bwd {fmt(fb)} "
                     f"(goal 1.3), memory {mem.get('lwt', nan):.0f} vs {mem.get('SDPA cuDNN', nan):.0f} MiB "
                     f"-> {'met' if ok else 'NOT met'}")
    return lines


def plot(report, path):
    """TFLOP/s against S, one panel per (heads, head dim, mask, mode), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {}
    for r in report.rows:
        words = r.case.split()
        heads, dim, seq, mask = " ".join(words[:-4]), words[-4], words[-3], words[-1]
        panels.setdefault((heads, dim, mask, r.mode), {}).setdefault(r.provider, []).append((int(seq[1:]), r.value))
    keys = sorted(panels)
    cols = 4
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for provider, points in sorted(panels[key].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(" ".join(key), fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"attention bf16 on {H.gpu_name()} (commit {H.git_sha()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def smoke():
    """CPU: one tiny GQA and one tiny MLA shape through the kernels (interpreter) against the float64
    reference."""
    from kernels.attention import attention
    from kernels.mla import mla_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 19, h, 32, generator=gen) for h in (4, 2, 2, 4))
    for causal in (False, True):
        H.assert_matches_float64(lambda q, k, v: attention(q, k, v, causal=causal),
                                 lambda q, k, v: reference.attention(q, k, v, causal), [q, k, v], do)
    mla_inputs = [torch.randn(1, 19, 2, 48, generator=gen), torch.randn(1, 19, 2, 32, generator=gen),
                  torch.randn(1, 19, 16, generator=gen), torch.randn(1, 19, 2, 24, generator=gen)]
    H.assert_matches_float64(lambda *a: mla_attention(*a, causal=True), lambda *a: reference.mla_attention(*a, True),
                             mla_inputs, torch.randn(1, 19, 2, 24, generator=gen))


def _add_args(p):
    p.add_argument("--plot", metavar="PNG", help="also write TFLOP/s against sequence length to this PNG (matplotlib)")
    p.add_argument("--only", choices=("gqa", "mla"), help="run only the GQA/MHA cases, or only the MLA ones")


def main(argv=None) -> list[str]:
    """Runs the benchmark; returns the summary lines (run_all prints them last)."""
    args, report = H.start("attention", __doc__, smoke, argv, extra=_add_args)
    if report is None:
        return H.smoke_only("attention")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit("--plot needs matplotlib: pip install matplotlib (nothing was run)")
    cases = QUICK if args.quick else [(d, h, s) for d in HEAD_DIMS for h in HEADS
                                      for s in sorted(SEQ_LENS + RAGGED_SEQ_LENS)]
    mla_cases = MLA_QUICK if args.quick else [(h, s) for h in MLA_HEADS for s in sorted(MLA_SEQ_LENS + RAGGED_SEQ_LENS)]
    cases, mla_cases = ([] if args.only == "mla" else cases), ([] if args.only == "gqa" else mla_cases)
    # Each goal line is also printed as soon as its case is measured: a run cut off by a time limit
    # (benchmarks/device_check.sh) keeps the verdicts it reached.
    goal_cases = []
    for D, heads, S in cases:
        goal = D == 128 and heads[1] > 1 and GOAL_SEQ[0] <= S <= GOAL_SEQ[1]
        for causal in (False, True):
            case = run_case(report, D, heads, S, causal, passes=goal)
            if goal:
                goal_cases.append(case)
                print(*summarize(report, [case]), flush=True)
    mla_goal = []
    for H_, S in mla_cases:
        for causal in (False, True):
            case, mem = run_mla_case(report, H_, S, causal, passes=(H_, S) == MLA_GOAL)
            if (H_, S) == MLA_GOAL:
                mla_goal.append((case, mem))
                print(*summarize_mla(report, [(case, mem)]), flush=True)
    summary = summarize(report, goal_cases) + summarize_mla(report, mla_goal)
    report.finish(summary)
    if args.plot:
        plot(report, args.plot)
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
