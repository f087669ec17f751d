"""Where an eager fwd+bwd step of lwt's RMSNorm spends its time on a GPU, and whether bench_rmsnorm's step
can be captured in a CUDA graph: a diagnostic for the two RMSNorm questions README "Measured on a GPU"
leaves open (not part of run_all).

    python benchmarks/diagnose_rmsnorm.py [--rows 16384] [--hidden 4096] [--sections 1,2,3,4,5]

At 871b73f, on an H200, lwt's eager step at 16384 x 4096 bf16 took 0.64-0.81 ms against 0.18 ms of GPU
time, and every CUDA-graph row of bench_rmsnorm failed with "operation failed due to a previous error
during capture". Launches issued back to back make a step last about the longer of its host and GPU
times; a step in which the host waits for the GPU lasts about their sum. Its first run, at 2af8f80 on an
H200, answered both: lwt's step was bound by its host time (0.31 ms to issue a step, at 16384 rows and
at 64 alike, against 0.17 ms of GPU time; triton's JITFunction.run took about 57 us per launch), and
every capture of bench_rmsnorm's step failed with cudaErrorStreamCaptureImplicit because the step takes
its gradients at clones made outside the capture (see bench_rmsnorm.run_case), while lwt's step with
leaves was captured and replayed in 0.181 ms. The kinds below are kept as they were. Printed, bf16:

1. per provider (lwt, F.rms_norm, Liger-Kernel when importable) and step style ("leaves": x and the weight
   leaves, .backward() into their .grad; "bench": bench_rmsnorm's step, on clones, torch.autograd.grad):
   the eager time (do_bench, as the bench), then over 50 back-to-back steps the host's time to issue one
   and the wall time per step, at this shape and at 64 rows (where the GPU is never the limit);
2. the synchronisations torch reports in one lwt step (torch.cuda.set_sync_debug_mode("warn"), with
   where each was reported): only those torch's own CUDA calls make, not a wait in Triton's launcher or
   the driver;
3. torch.profiler over 10 lwt steps: the events with the most self CPU time and the GPU time per step.
   The CUDA runtime calls are among the events (a cudaStreamSynchronize or cudaDeviceSynchronize there is
   a wait), but of the driver's calls only kernel launches are recorded: no wait found is no proof;
4. the host time per lwt step at 64 rows, and how much of it the launchers (rms_norm_fwd, rms_norm_bwd),
   TunedKernel.launch and triton's JITFunction.run inside them take;
5. CUDA-graph captures, each in a fresh process (a failed capture can leave a process unable to capture
   again; each child has CAPTURE_TIMEOUT_S seconds, and dumps its threads' stacks if it hangs):
   lwt-leaves     lwt's step with leaves, warmed up on a side stream, one step captured under
                  torch.cuda.graph, replayed (its gradients checked against an eager step's);
   lwt-bench-global, lwt-bench-thread-local
                  the same with bench_rmsnorm's step, in the default (global) and in thread-local error
                  mode, where another thread's calls (the autograd engine's) cannot invalidate it;
   lwt-bench, F.rms_norm-bench
                  bench_rmsnorm's order for one provider alone: the forward timed, the eager fwd+bwd
                  timed, then do_bench_cudagraph (unrolled steps) of the step;
   bench-case     bench_rmsnorm's own run_case (every provider, torch.compile left out), whose CUDA-graph
                  rows all failed until 2af8f80 (they take leaves since): which of its rows were measured.
   The replayed times of the hand-made captures come from do_bench (L2 flushed between replays), those of
   do_bench_cudagraph without flushes: compare a kind's time with its own kind only.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import time
import traceback
import warnings

import _harness as H  # first: sets up the interpreter on CPU-only machines  # isort: skip
import torch
import triton
import triton.testing

import bench_rmsnorm as B
from kernels import rmsnorm as R
from kernels._common import TunedKernel

DEVICE, DTYPE = "cuda", torch.bfloat16  # module constants only so that a dry run can point them at the CPU
SMALL_ROWS = 64
BACK_TO_BACK = 50
PROFILED_STEPS = 10
CAPTURES = ("lwt-leaves", "lwt-bench-global", "lwt-bench-thread-local", "lwt-bench", "F.rms_norm-bench",
            "bench-case")
CAPTURE_TIMEOUT_S = 50  # a healthy child takes 15-25 s
PIECE_STEPS = 300


def providers() -> dict:
    """name -> fn(x, w, r): bench_rmsnorm's providers without a residual, torch.compile left out."""
    provs = B.providers(False)
    return {k: provs[k] for k in ("lwt", "F.rms_norm", "Liger-Kernel") if k in provs}


def inputs(rows: int, hidden: int):
    """(x, w, dy) as bench_rmsnorm makes them: random, bf16, none requiring grad."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    randn = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=gen)  # noqa: E731
    return randn(rows, hidden), randn(hidden) * 0.1 + 1, randn(rows, hidden)


def make_step(fn, style: str, x, w, dy):
    """One fwd+bwd step of fn, in `style` (see the module docstring), on inputs of its own."""
    w = w.detach().requires_grad_(True)
    if style == "bench":
        return B._step(fn, x.detach().requires_grad_(True).clone(), w, None, [dy], True)
    x = x.detach().requires_grad_(True)

    def step():
        x.grad = w.grad = None
        fn(x, w, None).backward(dy)
    step.leaves = (x, w)
    return step


def sync() -> None:
    torch.cuda.synchronize()


def host_and_wall_ms(step, n: int = BACK_TO_BACK, warmup: int = 3) -> tuple[float, float]:
    """The harness's host_and_wall_ms, with this script's sync (a dry run stubs it)."""
    return H.host_and_wall_ms(step, n, warmup, sync=sync)


def section_times(rows: int, hidden: int) -> None:
    print(f"== 1. per step, ms: eager (do_bench) | {BACK_TO_BACK} steps back to back: host, wall | the same "
          f"at {SMALL_ROWS} rows ({rows} x {hidden}, {DTYPE})", flush=True)
    big, small = inputs(rows, hidden), inputs(SMALL_ROWS, hidden)
    for name, fn in providers().items():
        for style in ("leaves", "bench"):
            label = f"{name:<12} {style:<6}"

            def measure(fn=fn, style=style):
                eager = H.bench_ms(make_step(fn, style, *big))
                return (eager, *host_and_wall_ms(make_step(fn, style, *big)),
                        *host_and_wall_ms(make_step(fn, style, *small)))
            got = H.attempt(None, label, measure)
            if got is not None:
                print(f"{label} eager {got[0]:.3f} | host {got[1]:.3f}, wall {got[2]:.3f} | host {got[3]:.3f}, "
                      f"wall {got[4]:.3f}", flush=True)


def set_sync_debug_mode(mode: str) -> None:
    torch.cuda.set_sync_debug_mode(mode)


def section_syncs(rows: int, hidden: int) -> None:
    print("== 2. synchronisations torch reports in one lwt step (set_sync_debug_mode('warn'))", flush=True)
    fn = providers()["lwt"]
    for style in ("leaves", "bench"):
        step = make_step(fn, style, *inputs(rows, hidden))
        step()
        sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_sync_debug_mode("warn")
            try:
                step()
            finally:
                set_sync_debug_mode("default")
        sync()
        found = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:160]}" for w in caught
                 if "synchroniz" in str(w.message).lower()]
        print(f"lwt {style}: {len(found)} synchronizing operation(s)" + "".join(f"\n  {m}" for m in found),
              flush=True)


def profiler_activities() -> list:
    from torch.profiler import ProfilerActivity
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA]


def _self_device_us(event) -> float:
    """An averaged profiler event's self time on the device (the attribute's name differs across torch
    versions)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def section_profile(rows: int, hidden: int) -> None:
    from torch.profiler import profile

    steps = PROFILED_STEPS
    print(f"== 3. torch.profiler, lwt leaves, {steps} steps ({rows} x {hidden}): per step", flush=True)
    step = make_step(providers()["lwt"], "leaves", *inputs(rows, hidden))
    for _ in range(3):
        step()
    sync()
    with profile(activities=profiler_activities()) as prof:  # (its exit waits for the GPU: one sync in the list)
        for _ in range(steps):
            step()
    sync()
    events = prof.key_averages()
    on_device = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    on_host = [e for e in events if e not in on_device]
    print(f"GPU time {sum(_self_device_us(e) for e in on_device) / steps:.1f} us (kernels and copies); host events' "
          f"self CPU time {sum(e.self_cpu_time_total for e in on_host) / steps:.1f} us (all threads)")
    for e in sorted(on_host, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]:
        print(f"  {e.key[:64]:<64} calls {e.count / steps:5.1f}  self CPU {e.self_cpu_time_total / steps:8.1f} us")
    waits = [e for e in on_host if any(s in e.key for s in ("ynchroniz", "Memcpy", "Query", "Malloc", "Free"))]
    print(f"waits, copies, allocations over the {steps} steps (the profiler's exit adds one synchronisation):"
          + ("".join(f"\n  {e.key[:64]:<64} calls {e.count:4d}  self CPU {e.self_cpu_time_total:8.1f} us"
                     for e in waits) or " none"), flush=True)


def _instrument(owner, name: str, totals: dict, label: str):
    """Replace owner.<name> by a wrapper adding each call's wall time to totals[label]; returns the undo."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def section_pieces(rows: int, hidden: int) -> None:
    n = PIECE_STEPS
    print(f"== 4. host time per lwt step at {SMALL_ROWS} x {hidden}, us (mean of {n}; nested: each line "
          "includes the ones below it)", flush=True)
    step = make_step(providers()["lwt"], "leaves", *inputs(SMALL_ROWS, hidden))
    whole, _ = host_and_wall_ms(step, n)
    kernel_class = type(R._fwd.autotuned.fn)  # triton's JITFunction (the interpreter's InterpretedFunction)
    labels = ["rms_norm_fwd + rms_norm_bwd (launchers)", "TunedKernel.launch", f"triton's {kernel_class.__name__}.run"]
    totals = dict.fromkeys(labels, 0.0)
    undo = [_instrument(R, "rms_norm_fwd", totals, labels[0]), _instrument(R, "rms_norm_bwd", totals, labels[0]),
            _instrument(TunedKernel, "launch", totals, labels[1]), _instrument(kernel_class, "run", totals, labels[2])]
    try:
        instrumented, _ = host_and_wall_ms(step, n, warmup=0)  # (warm already: totals count the n steps only)
    finally:
        for u in reversed(undo):
            u()
    print(f"  {'the whole step':<44} {whole * 1e3:8.1f}  ({instrumented * 1e3:.1f} with the timers)")
    for label, total in totals.items():
        print(f"  {label:<44} {total / n * 1e6:8.1f}")
    sys.stdout.flush()


def _capture_by_hand(fn, step, dy, mode: str) -> float:
    """Warm step (make_step's, of fn) up on a side stream, capture one step in `mode`, replay it (a step
    with leaves: its gradients checked against an eager step's); ms per replay (do_bench)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=mode):
        step()
    leaves = getattr(step, "leaves", ())
    for t in leaves:  # the gradients the replay must write (zeroed: the capture itself ran no kernel)
        t.grad.zero_()
    graph.replay()
    sync()
    got = [t.grad.clone() for t in leaves]
    expected = [t.detach().requires_grad_(True) for t in leaves]
    if expected:
        x, w = expected
        fn(x, w, None).backward(dy)
        for g, e, name in zip(got, expected, ("x", "w")):
            if not torch.equal(g, e.grad):
                raise RuntimeError(f"the replay's {name}.grad differs from an eager step's by up to "
                                   f"{(g.float() - e.grad.float()).abs().max().item():.3g}")
    return triton.testing.do_bench(graph.replay, return_mode="median")


def _bench_case(rows: int, hidden: int) -> str:
    """bench_rmsnorm.run_case, no residual, torch.compile left out: which CUDA-graph rows it measured."""
    report = H.Report("rmsnorm", "bfloat16", skip_compiled=True)
    B.run_case(report, rows, hidden, False, DTYPE)
    case = f"{rows}x{hidden}"
    graph = {r.provider: r.ms for r in report.rows if (r.case, r.mode) == (case, "fwd+bwd graph")}
    failed = [n for n in report.notes if " graph " in n]
    if failed:
        raise RuntimeError(f"measured {sorted(graph)}; " + "; ".join(failed))
    return ", ".join(f"{name} {ms:.3f} ms" for name, ms in graph.items())


def capture(kind: str, rows: int, hidden: int) -> int:
    """In a fresh process: capture one kind of step (CAPTURES) and print whether it worked."""
    # a hang shows its threads' stacks (to the real stderr: the parent reads it, merged with stdout)
    faulthandler.dump_traceback_later(max(1, CAPTURE_TIMEOUT_S - 5), exit=True, file=sys.__stderr__)
    try:
        if kind == "bench-case":
            result = _bench_case(rows, hidden)
        else:
            fn = providers()["F.rms_norm" if kind.startswith("F.rms_norm") else "lwt"]
            x, w, dy = inputs(rows, hidden)
            if kind == "lwt-leaves" or kind.startswith("lwt-bench-"):
                step = make_step(fn, "leaves" if kind == "lwt-leaves" else "bench", x, w, dy)
                mode = "thread_local" if kind.endswith("thread-local") else "global"
                result = f"{_capture_by_hand(fn, step, dy, mode):.3f} ms per step replayed (do_bench)"
            else:  # bench_rmsnorm's order: the forward timed without gradients, the eager fwd+bwd, the graph
                H.bench_ms(lambda: fn(x, w, None))
                step = make_step(fn, "bench", x, w, dy)
                H.bench_ms(step)
                result = f"{H.bench_graph_ms(step):.3f} ms per step replayed (do_bench_cudagraph)"
    except Exception as e:
        traceback.print_exc(file=sys.stdout)
        print(f"capture {kind}: FAILED ({H.first_line(e, 400)})", flush=True)
        return 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"capture {kind}: ok, {result}", flush=True)
    return 0


def run_child(cmd: list) -> tuple[int | None, str]:
    """(exit code, or None when it ran out of time; its output, stderr interleaved with stdout)."""
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=CAPTURE_TIMEOUT_S + 10,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})  # nothing lost if it is killed
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode(errors="replace")
    return out.returncode, out.stdout.decode(errors="replace")


def section_captures(rows: int, hidden: int) -> None:
    print(f"== 5. CUDA-graph captures, each in a fresh process ({rows} x {hidden})", flush=True)
    for kind in CAPTURES:
        cmd = [sys.executable, os.path.abspath(__file__), "--capture", kind, "--rows", str(rows), "--hidden", str(hidden)]
        code, out = run_child(cmd)
        lines = out.strip().splitlines()
        verdict = [line for line in lines if line.startswith(f"capture {kind}:")]
        print(verdict[-1] if verdict else f"capture {kind}: "
              f"{'no answer in time' if code is None else f'exit {code}'}, no verdict", flush=True)
        if code != 0:  # the traceback's (or the hang's stacks') last lines say where
            print("".join(f"  | {line}\n" for line in lines[-60:]), end="", flush=True)


SECTIONS = (section_times, section_syncs, section_profile, section_pieces, section_captures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--rows", type=int, default=16384, help="tokens (default 16384)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096)")
    p.add_argument("--sections", default="1,2,3,4,5",
                   help="which sections to run, comma-separated numbers (default: all five)")
    p.add_argument("--capture", choices=CAPTURES, help=argparse.SUPPRESS)  # section 5's child processes
    args = p.parse_args(argv)
    if args.rows < 1 or args.hidden < 1:
        p.error(f"--rows and --hidden: expected ints >= 1, got {args.rows} and {args.hidden}")
    chosen = [part.strip() for part in args.sections.split(",")]
    if not chosen or any(c not in {str(i) for i in range(1, len(SECTIONS) + 1)} for c in chosen):
        p.error(f"--sections: expected comma-separated numbers from 1 to {len(SECTIONS)}, got {args.sections!r}")
    if not H.HAS_GPU:
        print("diagnose_rmsnorm: no CUDA GPU here; nothing to time")
        return 0
    if args.capture:
        return capture(args.capture, args.rows, args.hidden)
    print(f"diagnose_rmsnorm on {H.gpu_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {H.git_sha()}, LWT_AUTOTUNE={os.environ.get('LWT_AUTOTUNE', '1')}", flush=True)
    failed = 0
    for number, section in enumerate(SECTIONS, 1):
        if str(number) not in chosen:
            continue
        try:
            section(args.rows, args.hidden)
        except Exception:  # the whole traceback: these sections first run on a GPU machine
            traceback.print_exc(file=sys.stdout)
            print(f"{section.__name__}: FAILED; the next section runs", flush=True)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
