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
The kernels run exactly as they did: only repeats are skipped.

Second, the frontend's bookkeeping that nothing reads. Under the interpreter, triton.language's frontend
(semantic.py's type checks, core.py's tensors and types) runs at every operation of every program, and
much of that time went into strings and types built eagerly and never read: each tl.tensor's block_type
printed its shape into a name, and each triton tuple (a tensor's shape is one) built a tuple_type whose
name printed every element. Here:
- block_type and tuple_type format their names when one is read (str, repr, an error message);
- a triton tuple built without a type works it out from its values when it is first read (the values
  change only through its _setitem, which sets the type again);
- _get_np_dtype looks the NumPy dtype up in a table built once from triton's own answers, where triton's
  builds its table of 18 dtypes at every call.
Each gives what triton's code gives (tests/test_interpreter_speedup.py compares them); one difference
is left: a triton tuple built without a type, holding a value that has none, raises a TypeError when its
type is read, where triton raised an AttributeError when it was built (no kernel here builds one). On a
2-core AMD EPYC this part took about half off a kernel's fwd+bwd under the interpreter, on top of the
first part (see the test file), and the whole suite went from 8:43 to 7:59 (the kernel test files' CPU time
fell by 30 to 40%).

Imported by tests/conftest.py when the interpreter is on; nothing here touches compiled kernels.
"""
import inspect

import triton.language as tl
import triton.language.core as core
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


# ---------------------------------------------------------------------------------------------------
# The frontend's types, built lazily
# ---------------------------------------------------------------------------------------------------

def _tuple_type_init(self, types, fields=None):
    self.types = types
    self.fields = fields or [""] * len(types)


def _tuple_type_name(self):
    name = self.__dict__.get("_lazy_name")
    if name is None:  # (as triton's tuple_type.__init__ formats it)
        name = "[" + ",".join([f"{k}:{v}" for k, v in zip(self.fields, self.types)]) + "]"
    return name


def _set_lazy_name(self, name):
    self.__dict__["_lazy_name"] = name


def _int_dims(shape):
    """The dims of a shape given as a list or triton tuple of ints or constexpr ints (what the frontend
    builds), as core._unwrap_shape gives them but without its intermediate triton tuple; None otherwise."""
    values = shape.values if type(shape) is core.tuple else shape
    if type(values) is not list:
        return None
    dims = []
    for d in values:
        if type(d) is core.constexpr:
            d = d.value
        if type(d) is not int:
            return None
        dims.append(d)
    return dims


def _block_type_init(self, element_ty, shape):
    """block_type.__init__ without its name (formatted when read) and its intermediate tuple."""
    self.element_ty = element_ty
    assert isinstance(shape, (list, core.tuple))
    dims = _int_dims(shape)
    if dims is None:  # anything else as triton takes it, up to the error its eager tuple type raises
        dims = core._unwrap_shape(shape)
        core._type_for_tuple_values(dims)
    self.shape = core.tuple(dims)
    if not self.shape:
        raise TypeError("0d block_type is forbidden")
    self.numel = core.validate_block_shape(self.shape)


def _block_type_name(self):
    name = self.__dict__.get("_lazy_name")
    return name if name is not None else f"<{self.shape}, {self.element_ty}>"


def _tuple_init(self, args, type=None):
    if type is None:  # the type is worked out when first read
        self.values = [i for i in args]
    else:
        _triton["tuple.__init__"](self, args, type)


def _tuple_type_of(self):
    t = self.__dict__.get("_lazy_type")
    if t is None:
        try:
            t = core._type_for_tuple_values(self.values)
        except AttributeError as e:  # (not left an AttributeError: tuple.__getattr__ would recurse on it)
            raise TypeError(f"a triton tuple holds a value without a type: {e}") from e
        self.__dict__["_lazy_type"] = t
    return t


def _set_tuple_type(self, t):
    self.__dict__["_lazy_type"] = t


_np_dtypes: dict = {}  # triton dtype (and "pointer") -> NumPy dtype: triton's own _get_np_dtype's answers


def _get_np_dtype(tt_dtype):
    if isinstance(tt_dtype, tl.block_type):
        tt_dtype = tt_dtype.element_ty
    if isinstance(tt_dtype, tl.pointer_type):
        return _np_dtypes["pointer"]
    return _np_dtypes[tt_dtype]  # (a KeyError for any other, as triton's)


# What install() replaces, as triton defines it (read back by the tests, and by _tuple_init; None where
# this triton lacks it)
_triton = {f"{cls}.__init__": getattr(getattr(core, cls, None), "__init__", None)
           for cls in ("tuple_type", "block_type", "tuple")}
_triton["_get_np_dtype"] = getattr(interpreter, "_get_np_dtype", None)
_NUMPY_DTYPES = ("int1", "float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                 "int64", "uint64", "bfloat16", "float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15")


def _lazy_types_available() -> bool:
    return (all(fn is not None for fn in _triton.values()) and hasattr(core, "constexpr")
            and all(hasattr(core, name) for name in ("_type_for_tuple_values", "validate_block_shape", "_unwrap_shape"))
            and hasattr(tl, "pointer_type") and all(hasattr(tl, name) for name in _NUMPY_DTYPES))


def _install_lazy_types() -> None:
    if core.tuple.__init__ is _tuple_init:
        return
    _np_dtypes.update({getattr(tl, name): _triton["_get_np_dtype"](getattr(tl, name)) for name in _NUMPY_DTYPES})
    _np_dtypes["pointer"] = _triton["_get_np_dtype"](tl.pointer_type(tl.float32))
    core.tuple_type.__init__ = _tuple_type_init
    core.tuple_type.name = property(_tuple_type_name, _set_lazy_name)
    core.block_type.__init__ = _block_type_init
    core.block_type.name = property(_block_type_name, _set_lazy_name)
    core.tuple.type = property(_tuple_type_of, _set_tuple_type)
    core.tuple.__init__ = _tuple_init
    interpreter._get_np_dtype = _get_np_dtype


def install() -> bool:
    """Idempotent. False, and nothing changed, where triton's interpreter lacks what this replaces or uses
    (_patch_lang, GridExecutor, _LangPatchScope, and the frontend's pieces of the second part: 3.6 has
    them): the suite then runs as slowly as before, and test_interpreter_speedup.py's first test fails to
    say so."""
    if _patch_lang is None or _grid_call is None or not hasattr(interpreter, "_LangPatchScope") or \
            not _lazy_types_available():
        return False
    if interpreter._patch_lang is not _patch_lang_once:
        interpreter._patch_lang = _patch_lang_once
        interpreter.GridExecutor.__call__ = _grid_call_marked
    _install_lazy_types()
    return True
