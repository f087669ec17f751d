"""Shared benchmark harness: timing, the copy-bandwidth ceiling, the ratio table, the results file.

Import it before anything that imports triton: without a GPU it switches the Triton interpreter on, and
the bench scripts then run one tiny shape end to end as a smoke check instead of timing anything.

Timing is `triton.testing.do_bench` (median of its repetitions, L2 flushed between them) after one
warm-up call that compiles and autotunes. Every provider of a case is timed in the same process on the
same inputs (random, never zeros), so the ratios printed are like for like.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python benchmarks/bench_x.py` from a checkout, installed or not
    sys.path.insert(0, REPO)

from kernels._common import autotuning  # noqa: E402  (after the interpreter switch and the path)

DEFAULT_RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def parse_args(description: str, argv=None, extra=None) -> argparse.Namespace:
    """The options every bench takes (run_all passes its own arguments to each bench); extra(parser)
    adds options of one bench, for running it directly."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few representative shapes instead of the full grid")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR, help="where <op>.csv is appended to")
    p.add_argument("--no-save", action="store_true", help="print only; append nothing to the results file")
    p.add_argument("--skip-compiled-baselines", action="store_true",
                   help="leave out the torch.compile baselines no goal is judged on (rmsnorm, swiglu, "
                        "cross_entropy: their Inductor compilations take most of a quick run); bench_block "
                        "keeps its compiled providers, which are what it compares")
    if extra is not None:
        extra(p)
    return p.parse_args(argv)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if HAS_GPU else "cpu"


@functools.cache
def git_sha() -> str:
    """LWT_GIT_SHA if set (copies of the tree without .git), else the checkout's HEAD, '+dirty' if modified."""
    if os.environ.get("LWT_GIT_SHA"):
        return os.environ["LWT_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        # The results files are left out: a bench appending to them must not mark the next run dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_ms(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on the GPU, after a warm-up call (compilation, autotuning). rep_ms: the
    time do_bench spends repeating fn (raise it for calls of tens of ms, to get enough samples)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def bench_graph_ms(fn):
    """Median milliseconds per fn() replayed from a CUDA graph (triton.testing.do_bench_cudagraph):
    GPU time alone, with the Python/launch cost of the host taken out and no L2 flush between calls.
    Raises when fn cannot be captured (it synchronises, say): run it through attempt()."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:
        # the whole traceback to the log: the report's note keeps one line, and a failed capture leaves the
        # next ones failing with "a previous error during capture" (every graph row at 871b73f: the cause,
        # gradients taken at clones made before the capture, is in bench_rmsnorm.run_case)
        traceback.print_exc()
        raise


def host_and_wall_ms(step, n: int, warmup: int = 3, sync=None) -> tuple[float, float]:
    """Per step over n back-to-back calls of step(), after `warmup` more: (the host's time until the last
    one was issued, the time until the GPU had finished it), in ms. Launches issued back to back make a
    step last about the longer of its host and GPU times. sync: waits for the GPU (torch.cuda.synchronize;
    a dry run passes a stub)."""
    sync = sync or torch.cuda.synchronize
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3 / n, (t2 - t0) * 1e3 / n


def first_line(e: BaseException, width: int = 160) -> str:
    """'Type: the first line of its message', cut to `width` characters."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:width]}"


def _recover() -> None:
    """After a failed provider: wait for the GPU's queue and hand cached memory back, so that the next
    provider starts clean (a sticky CUDA error makes these raise too, and the next provider reports it)."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:
        pass


def attempt(report, label: str, thunk):
    """thunk() (a provider's timing or memory), or None when it raises, with the note "label: not
    measured (...)": one failing provider (no kernel for the case, out of memory, a compile error) costs
    its own numbers only, never the rest of the run. report.add takes None as "no row". report None:
    the note is only printed."""
    try:
        return thunk()
    except Exception as e:
        line = f"{label}: not measured ({first_line(e)})"
        report.note(line) if report is not None else print(f"  {line}", flush=True)
    _recover()  # outside the except block: its traceback, and the tensors its frames hold, are gone
    return None


def time_and_memory(report, case, name, step, flops, memory, transient=False) -> None:
    """A fwd+bwd provider: its time as a TFLOP/s row (`flops` per step) and, when it ran, its peak memory
    (peak_transient_mib, or peak_extra_mib) in memory[(case, name)]; a failure of either is noted."""
    ms = attempt(report, f"{case} fwd+bwd {name}", lambda: bench_ms(step))
    report.add(case, "fwd+bwd", name, ms, "TFLOP/s", flops)
    if ms is not None:
        peak = peak_transient_mib if transient else peak_extra_mib
        mib = attempt(report, f"{case} memory {name}", lambda: peak(step))
        if mib is not None:
            memory[(case, name)] = mib


def peak_extra_mib(fn) -> float:
    """Memory fn() allocates on the GPU beyond what was allocated before it, at its peak (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_transient_mib(fn) -> float:
    """Memory fn() needs at its peak beyond what was allocated before it and what it returns (gradients,
    held until it is measured): the working memory of the op, the "extra" of anchors-h200.md's loss
    numbers (where Liger's 0.12 GiB at 16384 tokens is its one chunk of logits) (MiB). For an op that
    allocates what it returns after its peak (eager autograd: the gradients come last), the returned
    bytes were not part of that peak and this understates it by their size: a lower bound there."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    held = max(base, torch.cuda.memory_allocated())
    del result
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def copy_ms(t: torch.Tensor) -> float:
    """Time of a device-to-device copy of `t` (reads and writes t's bytes once): the bandwidth ceiling
    a memory-bound kernel over a tensor of this size is measured against, in the same run."""
    dst = torch.empty_like(t)
    return bench_ms(lambda: dst.copy_(t))


@dataclass
class Row:
    case: str          # e.g. "16384x4096"
    mode: str          # "fwd", "fwd+bwd", or "fwd+bwd graph" (CUDA-graph replay: GPU time only)
    provider: str      # "lwt", "F.rms_norm", ...
    ms: float
    metric: str        # "GB/s" or "TFLOP/s"
    value: float       # the metric: bytes (or FLOPs) counted by the bench's formula / time


@dataclass
class Report:
    """Collects rows, prints the per-case ratio table at the end. Each row is also printed and appended to
    <results_dir>/<op>.csv as soon as it is measured (results_dir None: not saved), so a run cut short
    keeps what it measured."""
    op: str
    dtype: str
    results_dir: str | None = None
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    skip_compiled: bool = False  # --skip-compiled-baselines

    def providers(self, table: dict) -> dict:
        """`table` (provider name -> fn) without the torch.compile baselines when they are skipped."""
        return {k: v for k, v in table.items() if not (self.skip_compiled and k.startswith("torch.compile"))}

    def add(self, case, mode, provider, ms, metric, amount):
        """amount: bytes moved (metric GB/s) or FLOPs (TFLOP/s) by the bench's explicit formula.
        ms None (the provider could not be measured this way) adds no row."""
        if ms is None:
            return None
        scale = 1e-9 if metric == "GB/s" else 1e-12
        row = Row(case, mode, provider, ms, metric, amount * scale / (ms * 1e-3))
        self.rows.append(row)
        print(f"  {case} {mode} {provider}: {ms:.4f} ms, {row.value:.1f} {metric}", flush=True)
        if self.results_dir is not None:
            self._append(row)
        return row

    def note(self, line: str) -> None:
        """A line printed now and again under the table."""
        print(f"  {line}", flush=True)
        self.notes.append(line)

    def ms(self, case, mode, provider):
        for r in self.rows:
            if (r.case, r.mode, r.provider) == (case, mode, provider):
                return r.ms
        return None

    def print_table(self, lwt="lwt"):
        """One line per provider; 'lwt speedup' = provider ms / lwt ms (above 1: lwt is faster)."""
        print(f"\n{self.op} ({self.dtype}) on {gpu_name()}, torch {torch.__version__}, commit {git_sha()}")
        wc = max([12] + [len(r.case) for r in self.rows])
        wm = max([8] + [len(r.mode) for r in self.rows])
        wp = max([22] + [len(r.provider) for r in self.rows])
        head = f"{'case':>{wc}} {'mode':>{wm}} {'provider':>{wp}} {'ms':>9} {'metric':>17} {'lwt speedup':>12}"
        print(head)
        print("-" * len(head))
        for r in self.rows:
            base = self.ms(r.case, r.mode, lwt)
            ratio = f"{r.ms / base:.2f}x" if base else "-"
            print(f"{r.case:>{wc}} {r.mode:>{wm}} {r.provider:>{wp}} {r.ms:9.4f} {r.value:9.1f} {r.metric:<7} {ratio:>12}")
        for n in self.notes:
            print(n)

    def finish(self, summary, lwt="lwt"):
        """End of a bench's main(): the summary lines join the notes and the table is printed (the rows
        are already saved); returns the summary for run_all."""
        self.notes.extend(summary)
        self.print_table(lwt=lwt)
        if self.results_dir is not None:
            print(f"appended {len(self.rows)} rows to {self.path()}")
        return summary

    def path(self) -> str:
        return os.path.join(self.results_dir, f"{self.op}.csv")

    def _append(self, r):
        os.makedirs(self.results_dir, exist_ok=True)
        fields = ["timestamp", "op", "case", "dtype", "mode", "provider", "ms", "metric", "value", "gpu",
                  "torch", "triton", "git_sha"]
        import triton

        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        new = not os.path.exists(self.path())
        with open(self.path(), "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow(dict(timestamp=stamp, op=self.op, case=r.case, dtype=self.dtype, mode=r.mode,
                            provider=r.provider, ms=f"{r.ms:.5f}", metric=r.metric, value=f"{r.value:.2f}",
                            gpu=gpu_name(), torch=torch.__version__, triton=triton.__version__, git_sha=git_sha()))


def assert_matches_float64(fn, ref, inputs, cotangent):
    """Smoke check: the outputs of fn(*inputs) and the gradients of its first output w.r.t. every input,
    against ref on float64 copies (loose: a tiny shape through the interpreter, not the test suite)."""
    def run(f, xs, dy):
        leaves = [t.detach().clone().requires_grad_() for t in xs]
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return [*outs, *torch.autograd.grad(outs[0], leaves, dy)]

    for a, b in zip(run(fn, inputs, cotangent), run(ref, [t.double() for t in inputs], cotangent.double())):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-4, atol=1e-5)


def start(op: str, doc: str, smoke, argv=None, extra=None):
    """The start of every bench's main(): its options (parse_args, the description from the first paragraph
    of `doc`), and the Report of `op` in bf16. Without a GPU the smoke check runs instead (no_gpu_smoke) and
    the report is None: main() then returns smoke_only(op). Returns (args, report)."""
    args = parse_args(" ".join(doc.split("\n\n")[0].split()), argv, extra)
    if not HAS_GPU:
        no_gpu_smoke(f"bench_{op}", smoke)
        return args, None
    report = Report(op, "bfloat16", results_dir=None if args.no_save else args.results_dir,
                    skip_compiled=args.skip_compiled_baselines)
    if report.skip_compiled and op in ("rmsnorm", "swiglu", "cross_entropy"):
        report.note("torch.compile baseline left out (--skip-compiled-baselines)")
    if not autotuning():
        report.note("LWT_AUTOTUNE=0: lwt's kernels run the first launch config that fits, untimed (unset it to "
                    "autotune them as training does)")
    return args, report


def smoke_only(op: str) -> list[str]:
    """A bench's summary lines when it only ran its smoke check."""
    return [f"{op}: no GPU, smoke check only"]


def no_gpu_smoke(op: str, check) -> int:
    """Without a GPU: say so in one line, run `check()` (a tiny shape through the interpreter against
    the reference; it raises on a mismatch) and return the exit code 0."""
    print(f"{op}: no CUDA GPU here, so no timings; smoke check of a tiny shape through the Triton interpreter ...",
          end=" ", flush=True)
    check()
    print("ok")
    return 0
