"""Smoke tests: the scripts in examples/ run to completion as a user would start them."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LWT_BACKEND"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_nanogpt_style_trains_a_few_steps():
    proc = _run("nanogpt_style.py", "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses), proc.stdout  # steps 1 and 3


def test_hf_llama_swap_matches_the_original_logits():
    proc = _run("hf_llama_swap.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if importlib.util.find_spec("transformers") is None:
        assert "skipped" in proc.stdout
        pytest.skip("transformers is not installed: the example only printed that it skipped")
    assert "logits match" in proc.stdout, proc.stdout
