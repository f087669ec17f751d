"""tests/interpreter_speedup.py: a kernel's jit helpers stop re-swapping triton.language on every call, the
frontend's names and tuple types are built when read, and nothing else changes (the rest of the suite
runs every kernel with it; the tests below compare each replaced piece with triton's own).

What it saves, measured on a 2-core AMD EPYC without AVX-512: the first part took a quarter to two fifths
off a kernel test's time. With the second part too (2026-11-28), an attention fwd+bwd at S 130 (4/2 heads
of 32) and an RMSNorm fwd+bwd of 64 x 4000, fp32, took a median 2.1-2.4 s a step where the first part
alone took 4.3-4.6 s: eight steps in each of two processes running side by side, three times (this
machine's timings drift by a third from one run to the next, so only side-by-side runs compare)."""
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
    assert tl.core.tuple.__init__ is interpreter_speedup._tuple_init
    assert tl.core.block_type.__init__ is interpreter_speedup._block_type_init
    assert tl.core.tuple_type.__init__ is interpreter_speedup._tuple_type_init
    assert interpreter._get_np_dtype is interpreter_speedup._get_np_dtype


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


# The second part: each replaced piece against triton's own (interpreter_speedup._triton), on fresh objects.
triton_init = interpreter_speedup._triton


def _tritons(cls, *args):
    """An instance of `cls` made by triton's own __init__, with triton's own tuple constructor inside it
    (eager assignments of a name or type land in the properties' setters: .name is then triton's string)."""
    obj = object.__new__(cls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl.core.tuple, "__init__", triton_init["tuple.__init__"])
        triton_init[f"{cls.__name__}.__init__"](obj, *args)
    return obj


def test_np_dtypes_are_tritons():
    theirs = triton_init["_get_np_dtype"]
    for name in interpreter_speedup._NUMPY_DTYPES:
        dt = getattr(tl, name)
        for t in (dt, tl.block_type(dt, [4]), tl.pointer_type(dt), tl.block_type(tl.pointer_type(dt), [2, 8])):
            assert interpreter._get_np_dtype(t) == theirs(t), t
    for fn in (theirs, interpreter._get_np_dtype):
        with pytest.raises(KeyError):
            fn(tl.void)


@pytest.mark.parametrize("shape", [[4, 8], [tl.constexpr(16)], "tuple", [1], [2, tl.constexpr(1), 32]])
def test_block_type_is_tritons(shape):
    if shape == "tuple":  # a triton tuple, as a tensor's shape is
        shape = tl.core.tuple([2, tl.constexpr(4)])
    ours, theirs = tl.block_type(tl.float16, shape), _tritons(tl.core.block_type, tl.float16, shape)
    assert ours == theirs and ours.numel == theirs.numel and ours.shape == theirs.shape
    assert [type(d) for d in ours.shape] == [type(d) for d in theirs.shape]
    assert ours.name == theirs.name and str(ours) == str(theirs) and ours.mangle() == theirs.mangle()
    assert ours.name == f"<{theirs.shape}, fp16>"


@pytest.mark.parametrize("shape, error",
                         [([], TypeError), ([3], ValueError), ([2.0], TypeError), ([None], AttributeError)])
def test_block_type_refuses_what_triton_refuses(shape, error):
    with pytest.raises(error) as ours:
        tl.block_type(tl.float32, shape)
    with pytest.raises(error) as theirs:
        _tritons(tl.core.block_type, tl.float32, shape)
    assert str(ours.value) == str(theirs.value)


def test_tuple_types_are_tritons():
    values = [1, tl.constexpr(2), 2.5, tl.float32, tl.block_type(tl.int32, [4])]
    t = tl.core.tuple(values)
    assert "_lazy_type" not in t.__dict__  # not built until read
    expected = tl.core._type_for_tuple_values(values)
    assert t.type == expected and t.type is t.type
    assert t.type.name == _tritons(tl.core.tuple_type, expected.types, None).name
    named = tl.core.tuple_type(expected.types, [f"f{i}" for i in range(len(values))])
    assert named.name == _tritons(tl.core.tuple_type, expected.types, named.fields).name
    assert tl.core.tuple(values, named).type is named  # a type given is kept
    t._setitem(0, tl.constexpr(7))  # triton's one in-place change sets the type again
    assert t.type == tl.core._type_for_tuple_values([tl.constexpr(7)] + values[1:])
    with pytest.raises(TypeError, match="without a type"):  # (triton raised AttributeError when built)
        tl.core.tuple([object()]).type


@pytest.mark.parametrize("missing", ["_patch_lang", "tuple.__init__", "_get_np_dtype"])
def test_install_changes_nothing_where_triton_lacks_a_piece(monkeypatch, missing):
    """On a triton without one of the pieces either part replaces, install() returns False and leaves
    triton's own functions in place: the suite runs slower, not wrongly."""
    originals = [(interpreter, "_patch_lang", interpreter_speedup._patch_lang),
                 (interpreter.GridExecutor, "__call__", interpreter_speedup._grid_call),
                 (tl.core.tuple, "__init__", triton_init["tuple.__init__"]),
                 (tl.core.block_type, "__init__", triton_init["block_type.__init__"]),
                 (tl.core.tuple_type, "__init__", triton_init["tuple_type.__init__"]),
                 (interpreter, "_get_np_dtype", triton_init["_get_np_dtype"])]
    for obj, name, value in originals:  # as before install() (restored after the test)
        monkeypatch.setattr(obj, name, value)
    if missing == "_patch_lang":
        monkeypatch.setattr(interpreter_speedup, "_patch_lang", None)
    else:
        monkeypatch.setitem(interpreter_speedup._triton, missing, None)
    assert interpreter_speedup.install() is False
    assert all(getattr(obj, name) is value for obj, name, value in originals)
