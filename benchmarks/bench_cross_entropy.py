"""Linear cross entropy through a tied embedding: lwt vs eager F.cross_entropy(F.linear(h, E)),
torch.compile of it and Liger-Kernel's fused linear cross entropy (when importable); fwd+bwd, bf16.

    python benchmarks/bench_cross_entropy.py [--quick]

Cases: V 32000/128000, D 2048/4096, 2048..32768 tokens (rows that reach the loss: the masked positions
of a diffusion batch), reduction mean, gradients to h and E. FLOPs counted: 6·N·V·D (the logits, dH and
dW matmuls; lwt and Liger compute them in the forward). Memory: the peak of a fwd+bwd step beyond its
inputs and the gradients it returns (benchmarks/_harness.py peak_transient_mib), i.e. the op's working
memory. lwt runs twice: dW summed over row chunks in fp32 (the default) and in the weight's dtype
(accum_dtype=None, as Liger does by default).
Goal (issue #6) at V 128000, D 4096, 16384 tokens: fwd+bwd time <= 0.9x Liger's and <= 1.0x eager's,
with peak extra memory <= 0.25 GiB.
"""
from __future__ import annotations

import sys

import _harness as H  # first: sets up the interpreter on CPU-only machines  # isort: skip
import torch

import lwt.functional as lwtF
from kernels import reference

SHAPES = [(n, v, d) for v in (32000, 128000) for d in (2048, 4096) for n in (2048, 8192, 16384, 32768)]
QUICK = [(16384, 128000, 4096), (8192, 32000, 2048)]  # each case compiles torch.compile's provider afresh
GOAL = (16384, 128000, 4096)
DEVICE = "cuda"  # a module constant only so that a dry run can point the cases at the CPU


def _eager(h, w, t):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w), t)


def _liger():
    """Liger-Kernel's fused linear cross entropy (h, w, t) -> loss, or None with the reason."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # not installed, or an incompatible torch/triton
        return None, f"{type(e).__name__}: {e}"

    def call(h, w, t):
        out = liger_fused_linear_cross_entropy(h, w, t)
        return out[0] if isinstance(out, tuple) else out

    return call, None


def providers():
    out = {
        "lwt": lambda h, w, t: lwtF.linear_cross_entropy(h, w, t),
        "lwt (dW in bf16)": lambda h, w, t: lwtF.linear_cross_entropy(h, w, t, accum_dtype=None),
        "eager": _eager,
    }
    liger, _ = _liger()
    if liger is not None:
        out["Liger-Kernel"] = liger
    out["torch.compile(eager)"] = torch.compile(_eager, dynamic=False)
    return out


def run_case(report, N, V, D, memory):
    torch._dynamo.reset()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(N, D, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    # Logits of a few units (std 2), as from a trained head: not a uniform softmax.
    w = (torch.randn(V, D, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 2 * D ** -0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE, generator=gen)
    case = f"{N}x{V}x{D}"
    for name, fn in report.providers(providers()).items():
        def step(fn=fn):
            return torch.autograd.grad(fn(h, w, t), (h, w))
        H.time_and_memory(report, case, name, step, 6 * N * V * D, memory, transient=True)
    return case


def smoke():
    """CPU: a tiny case through the kernel (interpreter) against the float64 reference."""
    from kernels.cross_entropy import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 24, generator=gen), torch.randn(70, 24, generator=gen) / 3
    t = torch.randint(0, 70, (9,), generator=gen)
    H.assert_matches_float64(lambda h, w: linear_cross_entropy(h, w, t),
                             lambda h, w: reference.linear_cross_entropy(h, w, t), [h, w], torch.tensor(1.0))


def main(argv=None) -> list[str]:
    """Runs the benchmark; returns the summary lines (run_all prints them last)."""
    args, report = H.start("cross_entropy", __doc__, smoke, argv)
    if report is None:
        return H.smoke_only("cross_entropy")
    memory = {}
    for N, V, D in (QUICK if args.quick else SHAPES):
        run_case(report, N, V, D, memory)
    for (case, name), mib in memory.items():
        report.notes.append(f"{case} {name}: peak working memory of a fwd+bwd step {mib:.0f} MiB")
    _, why = _liger()
    if why:
        report.notes.append(f"Liger-Kernel not measured ({why})")
    case = "x".join(map(str, GOAL))
    summary = []
    eager, liger = report.ms(case, "fwd+bwd", "eager"), report.ms(case, "fwd+bwd", "Liger-Kernel")
    for name in ("lwt", "lwt (dW in bf16)"):
        ms, mib = report.ms(case, "fwd+bwd", name), memory.get((case, name))
        if None in (ms, mib, eager):
            missing = name if None in (ms, mib) else "eager"
            summary.append(f"cross_entropy {case} {name}: fwd+bwd goal <= 1.0x eager, <= 0.9x Liger, <= 0.25 GiB "
                           f"-> NOT met ({missing} not measured)")
            continue
        parts = [f"{ms / eager:.2f}x eager (goal <= 1.0)"]
        ok = ms / eager <= 1.0 and mib / 1024 <= 0.25
        if liger is not None:
            parts.append(f"{ms / liger:.2f}x Liger (goal <= 0.9)")
            ok = ok and ms / liger <= 0.9
        parts.append(f"{mib / 1024:.2f} GiB working memory (goal <= 0.25)")
        verdict = "NOT met" if not ok else "met" if liger is not None else "Liger not measured"
        summary.append(f"cross_entropy {case} {name}: fwd+bwd " + ", ".join(parts) + f" -> {verdict}")
    return report.finish(summary)


if __name__ == "__main__":
    main()
    sys.exit(0)
