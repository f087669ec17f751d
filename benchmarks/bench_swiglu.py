"""Frozen SwiGLU MLP: lwt (both saving policies) vs the eager MLP with frozen gate/up and torch.compile of
it, forward and forward+backward, bf16, with the peak memory each allocates.

    python benchmarks/bench_swiglu.py [--quick]

Cases: d_model 2048/4096/8192 with d_ff 7168/14336/28672 (3.5x), 4096..32768 tokens. FLOPs counted for
tokens T, model dim D, hidden F: forward 6·T·D·F (gate, up, down GEMMs); backward 8·T·D·F (dh, the two
GEMMs of dx, dW_down); lwt's recompute policy runs the gate/up GEMM again in the backward, which is not
counted (its TFLOP/s shows the cost). "fwd" is the inference forward (nothing requires grad, so lwt keeps
nothing for a backward under either policy); "fwd+bwd" a training step, gradients to x and W_down only,
for every provider. Memory: the peak of torch.cuda.max_memory_allocated during one fwd+bwd step, above
what was allocated before it.
"lwt (fp8 frozen, keep / recompute)" is the stretch of issue #5: the frozen matrices in float8_e4m3fn with
per-channel scales, x quantised per token, the gate/up GEMM on FP8 tensor cores, and the dx GEMM too (its
operands quantised per 1 x 128 block); FLOPs are counted as for the others, and the relative L2
differences of the keep policy's y and dx from the bf16 lwt ones are printed per case.
Goals (issue #5) at 16384 tokens x 4096 x 14336, against eager in this run: recompute=False fwd+bwd time
<= 1.0x and memory <= 0.6x; recompute=True memory <= 0.25x with time <= 1.35x.
"""
from __future__ import annotations

import sys

import _harness as H  # first: sets up the interpreter on CPU-only machines  # isort: skip
import torch

import lwt.functional as lwtF
from kernels import reference
from kernels.reference import quantize_rows_fp8

SHAPES = [(t, d, f) for d, f in ((2048, 7168), (4096, 14336), (8192, 28672)) for t in (4096, 16384, 32768)]
QUICK = [(16384, 4096, 14336), (4096, 2048, 7168)]
GOAL = (16384, 4096, 14336)
DEVICE = "cuda"  # a module constant only so that a dry run can point the cases at the CPU


def _eager(x, wg, wu, wd):
    return torch.nn.functional.linear(torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()), wd)


def providers(fp8):
    """fp8: ((w_gate8, scale), (w_up8, scale)), the frozen weights quantised for the FP8 provider."""
    compiled = torch.compile(_eager, dynamic=False)
    (wg8, sg), (wu8, su) = fp8
    return {
        "lwt (keep gate/up)": lambda x, wg, wu, wd: lwtF.frozen_swiglu(x, wg, wu, wd, recompute=False),
        "lwt (recompute)": lambda x, wg, wu, wd: lwtF.frozen_swiglu(x, wg, wu, wd, recompute=True),
        "lwt (fp8 frozen, keep)": lambda x, wg, wu, wd: lwtF.frozen_swiglu(x, wg8, wu8, wd, recompute=False,
                                                                           w_gate_scale=sg, w_up_scale=su),
        "lwt (fp8 frozen, recompute)": lambda x, wg, wu, wd: lwtF.frozen_swiglu(x, wg8, wu8, wd, recompute=True,
                                                                                w_gate_scale=sg, w_up_scale=su),
        "eager": _eager,
        "torch.compile(eager)": compiled,
    }


def run_case(report, T, D, F, memory):
    torch._dynamo.reset()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    wg, wu = (torch.randn(F, D, device=DEVICE, dtype=torch.bfloat16, generator=gen) * D ** -0.5 for _ in range(2))
    wd = torch.randn(D, F, device=DEVICE, dtype=torch.bfloat16, generator=gen) * F ** -0.5
    dy = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    case = f"{T}x{D}x{F}"
    provs = report.providers(providers((quantize_rows_fp8(wg), quantize_rows_fp8(wu))))
    for name, fn in provs.items():
        ms = H.attempt(report, f"{case} fwd {name}", lambda fn=fn: H.bench_ms(lambda: fn(x, wg, wu, wd)))
        report.add(case, "fwd", name, ms, "TFLOP/s", 6 * T * D * F)

    def fp8_difference(what, run):
        """The relative L2 difference of run(provider) between the FP8 and the bf16 keep policy."""
        def diff():
            ref, fp8 = (run(provs[name]).float() for name in ("lwt (keep gate/up)", "lwt (fp8 frozen, keep)"))
            report.note(f"{case} fp8 frozen vs bf16: relative L2 difference of {what} "
                        f"{(fp8 - ref).norm() / ref.norm():.4f}")
        H.attempt(report, f"{case} fp8 difference of {what}", diff)

    fp8_difference("y", lambda fn: fn(x, wg, wu, wd))
    x.requires_grad_(True)
    wd.requires_grad_(True)
    for name, fn in provs.items():
        def step(fn=fn):
            return torch.autograd.grad(fn(x, wg, wu, wd), (x, wd), dy)
        H.time_and_memory(report, case, name, step, 14 * T * D * F, memory)
    fp8_difference("dx", lambda fn: torch.autograd.grad(fn(x, wg, wu, wd), x, dy)[0])
    x.requires_grad_(False)
    wd.requires_grad_(False)
    return case


def smoke():
    """CPU: a tiny case through the kernels (interpreter), both policies, against the float64 reference."""
    from kernels.swiglu import frozen_swiglu

    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(7, 24, generator=gen), torch.randn(7, 24, generator=gen)
    wg, wu = torch.randn(40, 24, generator=gen) / 5, torch.randn(40, 24, generator=gen) / 5
    wd = torch.randn(24, 40, generator=gen) / 6
    for recompute in (False, True):
        H.assert_matches_float64(lambda x, wd: frozen_swiglu(x, wg, wu, wd, recompute),
                                 lambda x, wd: reference.frozen_swiglu(x, wg.double(), wu.double(), wd), [x, wd], dy)


def main(argv=None) -> list[str]:
    """Runs the benchmark; returns the summary lines (run_all prints them last)."""
    args, report = H.start("swiglu", __doc__, smoke, argv)
    if report is None:
        return H.smoke_only("swiglu")
    memory = {}
    for T, D, F in (QUICK if args.quick else SHAPES):
        run_case(report, T, D, F, memory)
    for (case, name), mib in memory.items():
        report.notes.append(f"{case} {name}: peak extra memory of a fwd+bwd step {mib:.0f} MiB")
    case = "x".join(map(str, GOAL))
    summary = []
    eager_ms, eager_mib = report.ms(case, "fwd+bwd", "eager"), memory.get((case, "eager"))
    for name, t_goal, m_goal in (("lwt (keep gate/up)", 1.0, 0.6), ("lwt (recompute)", 1.35, 0.25)):
        ms, mib = report.ms(case, "fwd+bwd", name), memory.get((case, name))
        if None in (ms, mib, eager_ms, eager_mib):
            missing = name if None in (ms, mib) else "eager"
            summary.append(f"swiglu {case} {name}: fwd+bwd time goal <= {t_goal}x eager, memory <= {m_goal}x "
                           f"-> NOT met ({missing} not measured)")
            continue
        t, m = ms / eager_ms, mib / eager_mib
        ok = t <= t_goal and m <= m_goal
        summary.append(f"swiglu {case} {name}: fwd+bwd {t:.2f}x eager's time (goal <= {t_goal}), "
                       f"{m:.2f}x its memory (goal <= {m_goal}) -> {'met' if ok else 'NOT met'}")
    return report.finish(summary, lwt="lwt (keep gate/up)")


if __name__ == "__main__":
    main()
    sys.exit(0)
