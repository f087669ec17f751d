"""tests/interpreter_speedup.py: a kernel's jit helpers stop re-swapping triton.language on every call, and
nothing else changes (the rest of the suite runs every kernel with it)."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import kernels._common
from tests import interpreter_speedup

pytestmark = pytest.mark.skipif(not kernels._common.interpreting(), reason="only the interpreter is sped up")


@triton.jit
def _twice(x):
    return x * 2.0


@triton.jit
def _helper_kernel(x_ptr, out_ptr, N: tl.constexpr, STEPS: tl.constexpr, FAIL: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    acc = tl.zeros([N], dtype=tl.float32)  # the standard library: a helper whose globals name tl.core
    for _ in range(STEPS):
        acc += _twice(x)
    if FAIL:
        tl.static_assert(False, "asked to fail")
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def _counting(monkeypatch):
    calls = []

    def count(fn):
        calls.append(fn.__name__)
        return original(fn)
    original = interpreter_speedup._patch_lang
    monkeypatch.setattr(interpreter_speedup, "_patch_lang", count)
    return calls


def test_installed_by_conftest():
    assert interpreter._patch_lang is interpreter_speedup._patch_lang_once
    assert interpreter.GridExecutor.__call__ is interpreter_speedup._grid_call_marked


def test_each_module_is_swapped_once_per_launch_and_restored_after(monkeypatch):
    calls = _counting(monkeypatch)
    x = torch.randn(16)
    out = torch.full((3,), float("nan"))
    for launch in range(2):
        _helper_kernel[(3,)](x, out, N=16, STEPS=4, FAIL=False)
        torch.testing.assert_close(out, (8 * x).sum().expand(3), rtol=1e-6, atol=1e-5)
        # The launch swaps tl; the first standard-library call (tl.zeros) swaps tl.core. Three programs x
        # four _twice calls, tl.zeros and tl.sum: no other swap.
        assert calls == ["_helper_kernel", "zeros"] * (launch + 1)
        assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)  # tl restored
        assert interpreter_speedup._swapped == [] and not interpreter_speedup._launching


def test_a_failing_launch_leaves_nothing_behind(monkeypatch):
    calls = _counting(monkeypatch)
    with pytest.raises(Exception, match="asked to fail"):
        _helper_kernel[(2,)](torch.randn(16), torch.empty(2), N=16, STEPS=1, FAIL=True)
    assert calls[0] == "_helper_kernel"
    assert tl.core.is_builtin(tl.load)
    assert interpreter_speedup._swapped == [] and not interpreter_speedup._launching
    out = torch.full((1,), float("nan"))
    _helper_kernel[(1,)](torch.ones(16), out, N=16, STEPS=1, FAIL=False)  # and the next launch runs
    assert out.item() == 32.0
