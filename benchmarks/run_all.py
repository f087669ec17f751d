"""Run every benchmarks/bench_<op>.py in one process and print their summaries last.

    python benchmarks/run_all.py [--quick] [--results-dir DIR] [--no-save]

Without a GPU each bench says so in one line and runs its tiny CPU smoke check; the exit code is 0
when every bench ran, 1 if one raised (the others still run).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
import traceback

import _harness as H  # first: interpreter switch on CPU-only machines  # isort: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The options every bench takes, checked here: --help describes run_all, and an option some bench
    # lacks (bench_attention's --plot) stops the run before any bench spends GPU time, not midway.
    H.parse_args(__doc__.splitlines()[0], argv)
    here = os.path.dirname(os.path.abspath(__file__))
    summaries, failed = [], []
    for path in sorted(glob.glob(os.path.join(glob.escape(here), "bench_*.py"))):  # (a checkout path may hold [ ])
        name = os.path.splitext(os.path.basename(path))[0]
        print(f"\n=== {name} ===", flush=True)
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            summaries.extend(module.main(argv))
        except (Exception, SystemExit):  # a bench's sys.exit too: the others still run
            traceback.print_exc()
            failed.append(name)
    print("\n=== summary ===")
    for line in summaries:
        print(line)
    for name in failed:
        print(f"{name}: FAILED (traceback above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
