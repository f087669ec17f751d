"""Triton 3.6's interpreter, without the work it repeats at every call of a @triton.jit helper.

The interpreter runs a kernel by swapping triton.language's builtins (tl.load, tl.dot, ...) for NumPy
versions while the launch lasts (interpreter._patch_lang, undone by GridExecutor when the grid is done).
It also calls _patch_lang at every call of a jit helper inside the kernel (InterpretedFunction.__call__),
for the modules that helper's globals name: tl, or triton.language.core for the standard library's
tl.sum, tl.max, tl.zeros, tl.cdiv. Once a launch has swapped a module, doing it again finds nothing left
to swap, yet each repeat walks the module with inspect.getmembers: ~2 ms a call on a 2-core AMD EPYC, a
quarter (an RMSNorm test at N = 65536) to two fifths (an attention test at S = 130) of what a test of a
kernel with helpers in its loops spent.

Here a helper's call skips _patch_lang when every module it names was already swapped during the launch
in progress; the first call that names a new one swaps it as before (and, as before, leaves it swapped).
The kernels run exactly as they did: only repeats are skipped. Imported by tests/conftest.py when the
interpreter is on; nothing here touches compiled kernels.
"""
import inspect

import triton.language as tl
from triton.runtime import interpreter

# (absent from another triton's interpreter: then install() leaves it as it is)
_patch_lang = getattr(interpreter, "_patch_lang", None)
_grid_call = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)

# One entry per launch in progress (a kernel does not launch kernels, so at most one): the ids of the
# language modules swapped since it began.
_swapped: list = []
_launching = False  # GridExecutor.__call__ has begun and its own _patch_lang call is the next one


_modules_of: dict = {}  # function -> the ids of the language modules its globals name


def _modules(fn):
    modules = _modules_of.get(fn)
    if modules is None:  # (a module's imports are at its top: its globals name the same modules later)
        modules = _modules_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                              if inspect.ismodule(v) and (v is tl or v is tl.core))
    return modules


def _patch_lang_once(fn):
    global _launching
    modules = _modules(fn)
    if _launching:  # the launch's own swap, undone by its scope's restore()
        _launching = False
        scope = _patch_lang(fn)
        _swapped.append(modules)
        restore = scope.restore

        def restore_and_forget():
            _swapped.pop()
            restore()
        scope.restore = restore_and_forget
        return scope
    if _swapped and modules <= _swapped[-1]:
        return interpreter._LangPatchScope()  # nothing to swap; its restore() does nothing
    if _swapped:
        _swapped[-1] = _swapped[-1] | modules
    return _patch_lang(fn)


def _grid_call_marked(self, *args, **kwargs):
    global _launching
    _launching = True
    try:
        return _grid_call(self, *args, **kwargs)
    finally:
        _launching = False


def install() -> bool:
    """Idempotent. False, and nothing changed, where triton's interpreter lacks what this replaces or uses
    (_patch_lang, GridExecutor, _LangPatchScope: 3.6 has them): the suite then runs as slowly as before,
    and test_interpreter_speedup.py's first test fails to say so."""
    if _patch_lang is None or _grid_call is None or not hasattr(interpreter, "_LangPatchScope"):
        return False
    if interpreter._patch_lang is not _patch_lang_once:
        interpreter._patch_lang = _patch_lang_once
        interpreter.GridExecutor.__call__ = _grid_call_marked
    return True
