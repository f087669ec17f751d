"""Pieces every kernel file shares: output allocation, the interpreter switch, row tiling, launch configs,
and the registration of launchers as torch.library custom ops (Launcher).

Row-wise ops (RMSNorm now; the loss and MLP epilogues later) view their input as (rows, hidden) with
unit stride along hidden and any row stride, so slices of a wider buffer need no copy.
"""
from __future__ import annotations

import functools
import operator
import os

import torch
import torch.autograd.forward_ad as fwAD
import triton
import triton.language as tl
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime.errors import OutOfResources, PTXASError
from triton.runtime.jit import JITFunction

try:  # triton 3.6's pieces of JITFunction.run that TunedKernel's direct launch uses (see _DirectLaunch)
    from triton import knobs as _knobs
    from triton._C.libtriton import native_specialize_impl as _specialize
    from triton.backends.compiler import BaseBackend as _BaseBackend
    from triton.compiler import CompiledKernel as _CompiledKernel
except ImportError:  # another triton: every launch goes through JITFunction.run
    _specialize = None

from . import flops
from ._checks import autocast_available

# Tests set this to True: every buffer a launcher allocates then starts as NaN, so an element the
# kernel forgot to write fails the comparison instead of passing on whatever memory held.
POISON_OUTPUTS = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled buffer when POISON_OUTPUTS is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _triton_imported_interpreted() -> bool:
    """Whether triton itself was imported under TRITON_INTERPRET=1: its own @triton.jit helpers (and any
    kernel decorated since) are interpreted only then; setting the variable later leaves them compiled.
    (True where this triton's layout differs from 3.6's: the environment alone decides then.)"""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return True
    return isinstance(getattr(standard, "sigmoid", None), InterpretedFunction)


_TRITON_INTERPRETED = _triton_imported_interpreted()


def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (CPU tensors, TRITON_INTERPRET=1, set before
    triton was imported)."""
    return _TRITON_INTERPRETED and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of `device`. On the interpreter a small fixed count, so that persistent kernels
    still run several programs, each looping over several row blocks, as they do on a GPU."""
    if device.type != "cuda":
        return 3
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_kernel_device(t: torch.Tensor, name: str) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors through the interpreter."""
    if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
        raise ValueError(f"{name}: expected a CUDA tensor for the Triton kernel, got one on {t.device} (set "
                         f"TRITON_INTERPRET=1 before triton is imported to run it on the CPU, or use lwt.functional, "
                         f"which runs the PyTorch reference there)")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View `t` (..., N) as (rows, N) with unit stride along N; copies only when no such view exists
    (a transposed last dim, or leading dims that cannot be merged into one row stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1 and t2.shape[-1] > 1:
        t2 = t2.contiguous()
    return t2


def distinct(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors (or Nones) for an `autograd.Function.apply`, each a Python object of its own: one passed
    again (attention(q, kv, kv), mla_attention(q, kv, k_rope, kv), one FP8 scale for both frozen matrices)
    becomes a view of itself. Dynamo refuses to trace an apply that takes one tensor as two inputs
    ("duplicate tensor input"); autograd sums the view's gradient into the tensor as before."""
    return tuple(t.view_as(t) if t is not None and any(t is u for u in tensors[:i]) else t
                 for i, t in enumerate(tensors))


# CUDA's limit on a launch grid's second and third dims (the first takes 2^31 - 1)
MAX_GRID_YZ = 65535


def check_grid_columns(n: int, block: int, name: str, what: str) -> None:
    """ValueError, naming the argument, when a launch that puts cdiv(n, block) programs on the grid's
    second dim would pass MAX_GRID_YZ (what: the dim's meaning, for the message)."""
    if cdiv(n, block) > MAX_GRID_YZ:
        raise ValueError(f"{name}: expected {what} of at most {MAX_GRID_YZ * block} on the Triton path (a grid "
                         f"dim of one program per {block}, at most {MAX_GRID_YZ}), got {n}")


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b). (triton.cdiv and triton.next_power_of_2 are constexpr functions in
    triton 3.6: called from Python they cost several microseconds each, on every launch.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_tile(n: int, max_block_n: int, tile_elements: int, max_block_m: int = 64, rows: int | None = None):
    """Tile sizes for a row-wise kernel over (rows, n).

    Returns (BLOCK_M, BLOCK_N, SINGLE_PASS). SINGLE_PASS: a whole row fits in one BLOCK_N (at most
    `max_block_n`, what stays in registers without spilling) and is read once; otherwise the kernel
    loops over BLOCK_N chunks. Narrow rows are packed BLOCK_M to a program so that each program still
    moves about `tile_elements` elements. The tile is chosen here, not autotuned, because it fixes how
    rows are grouped in the fp32 accumulations across rows (dw); the autotuned warp count still sets the
    order of the sums within a row, so another process may differ in the last bit.
    """
    # At least 16 columns: tiles of one or two columns give degenerate layouts for no gain.
    block_n = max(16, next_power_of_2(n))
    single = block_n <= max_block_n
    if not single:
        block_n = max_block_n
    block_m = max(1, min(max_block_m, tile_elements // block_n))
    if rows is not None:
        block_m = min(block_m, next_power_of_2(rows))
    return block_m, block_n, single


# Launch configs for row-wise kernels: the warp count is the only knob that matters for these
# memory-bound loops (the persistent backward pipelines its row loop by hand). The list is pruned per
# tile so that each thread holds 4..32 elements of a row tile; the autotune key is the hidden size and
# the tile flags, never the row count (flash-linear-attention#533: keying on batch retunes every step).
_ROW_WARPS = (1, 2, 4, 8, 16, 32)


_AUTOTUNE_CHOICES = ("1", "0")


def autotuning() -> bool:
    """Whether a kernel's first launch for a new key times its launch configs (LWT_AUTOTUNE=1, the
    default) or takes the first config of its list that fits (LWT_AUTOTUNE=0: nothing is timed, and every
    process picks the same config, so results do not depend on which config won a timing race). Read
    when a key is first launched; a key already tuned keeps its config."""
    value = os.environ.get("LWT_AUTOTUNE", "1").strip() or "1"
    if value not in _AUTOTUNE_CHOICES:
        raise ValueError(f"LWT_AUTOTUNE: expected 1 (time the launch configs) or 0 (take the first that fits), "
                         f"got {value!r}")
    return value == "1"


class TunedKernel:
    """Launches an autotuned kernel, skipping the autotuner's per-call bookkeeping once a key is tuned,
    and, once a key's compiled binary is known, triton's own per-launch bookkeeping too.

    triton.autotune rebuilds a dict of every argument on each call to look up its cache; on the slow
    host CPUs of GPU servers that is a visible share of a small op's launch cost. The cache key here is
    the autotuner's own (its key arguments and the dtypes of the tensor arguments), read by position.
    After the first call for a key (which autotunes), the winning config is kept and the jitted kernel
    is launched with it directly: the config, arguments and compiled binary the autotuner would use.
    From then on each launch also skips triton's JITFunction.run (see _DirectLaunch): about 57 us of
    host time per launch on an H200 server's CPU at 2af8f80 (benchmarks/diagnose_rmsnorm.py, section 4).
    With LWT_AUTOTUNE=0 (see autotuning) the first call launches the first config that survives the
    autotuner's pruning and compiles for this GPU, instead of timing them all: one compilation per key,
    the GPU test suite's setting (tests/conftest.py). `last` is the config of the latest launch (the
    benchmarks report it); a key's first launch also leaves it in the autotuner's `best_config`.
    Clearing `best` forgets every tuned config and every binary found for it.
    """

    def __init__(self, autotuned):
        self.autotuned = autotuned
        self.best = {}  # key -> (config, its all_kwargs(): built once, not at every launch, _DirectLaunch or None)
        self.last = None
        self._key_slots = [autotuned.arg_names.index(k) for k in autotuned.keys]
        getter = operator.itemgetter(*self._key_slots)  # (an itemgetter: cheaper per call than a generator)
        self._key_values = getter if len(self._key_slots) > 1 else lambda values: (getter(values),)

    def launch(self, grid, *args, **meta):
        values = args + tuple(meta.values())  # launches pass every argument in declaration order
        key = self._key_values(values) + tuple([a.dtype for a in args if isinstance(a, torch.Tensor)])
        tuned = self.best.get(key)
        if tuned is None:
            names = self.autotuned.arg_names
            if list(meta) != names[len(args):len(args) + len(meta)]:
                raise TypeError(f"TunedKernel: pass {names[len(args):]} in declaration order, got {list(meta)}")
            if not autotuning() and len(self.autotuned.configs) > 1:
                config = self._first_launchable(grid, args, meta)
            else:  # timed (a lone config is launched without timing)
                self.autotuned[grid](*args, **meta)
                config = self.autotuned.best_config
            self.best[key] = (config, config.all_kwargs(), _DirectLaunch.make(self.autotuned.fn, len(values), config))
            self.last = config
            return
        config, kwargs, direct = tuned
        self.last = config
        if direct is None or not direct.launch(grid, values):
            kernel = self.autotuned.fn[grid](*args, **meta, **kwargs)
            if direct is not None:
                direct.remember(values, kernel)

    def _first_launchable(self, grid, args, meta):
        """Launch the first config, in order, that the autotuner's early_config_prune keeps for these
        arguments and that compiles and fits this GPU (what the timing would skip: too much shared memory
        or too many registers, a ptxas error or a failed static assertion raise before anything runs),
        and return it."""
        configs = self.autotuned.configs
        prune = self.autotuned.early_config_prune
        if prune is not None:
            configs = prune(configs, dict(zip(self.autotuned.arg_names, args)), **meta)
        if not configs:
            raise RuntimeError(f"TunedKernel: no launch config of {self.autotuned.base_fn.__name__} survives pruning")
        for i, config in enumerate(configs):
            try:
                self.autotuned.fn[grid](*args, **meta, **config.all_kwargs())
            except (OutOfResources, PTXASError, CompileTimeAssertionFailure):
                if i == len(configs) - 1:
                    raise
                continue
            self.autotuned.best_config = config
            return config


class _DirectLaunch:
    """The compiled binaries of one tuned key, launched without triton's JITFunction.run.

    JITFunction.run binds every argument into a dict, derives the kernel's specialisation (each tensor's
    dtype and 16-byte alignment, each int's width and whether it is 1 or a multiple of 16, the constexpr
    values), turns it with the options into a string key, looks that up, checks the kernel's globals, and
    builds launch metadata for the launch hooks before calling the compiled binary's C launcher. Here the
    specialisation is derived by triton's own function (native_specialize_impl, as its binder calls it
    on NVIDIA GPUs) for the non-constexpr arguments, the constexpr values are taken with their types,
    and the debug and instrumentation settings that enter triton's options are added; a launch whose key
    was seen before calls that binary's launcher at once, with triton's arguments (no launch metadata:
    only a launch hook reads it). Any other launch goes through JITFunction.run, which compiles what is
    missing, and its binary is remembered. While a launch hook (a profiler's) or a pre-run hook is
    installed every launch takes triton's path and nothing is remembered: a profiler's instrumented
    binaries are never launched after it has gone. The options (the config's warps and stages) are fixed
    per tuned key. Skipped from triton's run: its check that the kernel's globals kept their values.
    Only for triton 3.6's JITFunction on CUDA (not the interpreter, not ROCm, whose specialisation
    differs), and only when the launch passes every parameter, the config's own last (checked when the
    key is tuned). (benchmarks/diagnose_rmsnorm.py measured the cost this saves; a second reading checked
    it against triton 3.6's run, binder and launcher.)"""

    __slots__ = ("constexpr", "names", "tail", "binaries", "pre_run_hooks")

    def __init__(self, fn, config):
        self.constexpr = tuple(p.is_constexpr for p in fn.params)
        self.names = fn.arg_names
        self.tail = tuple(config.kwargs.values())  # the config's meta-parameters, the last parameters
        self.binaries = {}  # _key -> (C launcher, function handle, packed metadata)
        self.pre_run_hooks = fn.pre_run_hooks  # (triton's own list: hooks added later are seen)

    @classmethod
    def make(cls, fn, n_passed: int, config):
        """A _DirectLaunch for the key tuned to `config`, or None where triton's path must be kept."""
        if _specialize is None or not isinstance(fn, JITFunction) or torch.version.hip is not None:
            return None
        if n_passed + len(config.kwargs) != len(fn.arg_names) or \
                list(config.kwargs) != fn.arg_names[n_passed:]:
            return None
        return cls(fn, config)

    def _key(self, params):
        # The specialisation JITFunction.run's binder derives (flags as for a parameter without
        # do_not_specialize: a flag there only makes triton's key coarser, never finer than this one);
        # constexprs with their types (triton keys on their text: True and 1 differ there, not in a dict).
        return (torch._C._cuda_getDevice(), _knobs.runtime.debug, _knobs.compilation.instrumentation_mode) + tuple([
            (p.__class__, p) if cx else _specialize(_BaseBackend, p, False, True, True)
            for p, cx in zip(params, self.constexpr)])

    def _hooked(self) -> bool:
        hooks = _knobs.runtime
        return bool(self.pre_run_hooks or getattr(hooks.launch_enter_hook, "calls", hooks.launch_enter_hook)
                    or getattr(hooks.launch_exit_hook, "calls", hooks.launch_exit_hook))

    def launch(self, grid, values) -> bool:
        """Launch the remembered binary for these arguments; False (nothing launched) if there is none
        yet, or a hook is installed."""
        if self._hooked():
            return False
        params = values + self.tail
        key = self._key(params)
        binary = self.binaries.get(key)
        if binary is None:
            return False
        if callable(grid):
            grid = grid(dict(zip(self.names, params)))
        run, function, packed = binary
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, torch._C._cuda_getCurrentRawStream(key[0]),
            function, packed, None, None, None, *params)
        return True

    def remember(self, values, kernel) -> None:
        """Keep the binary JITFunction.run just launched for these arguments (not while a hook is
        installed: a profiler may have had it compiled with its instrumentation)."""
        if isinstance(kernel, _CompiledKernel) and kernel.function is not None and not self._hooked():
            self.binaries[self._key(values + self.tail)] = (kernel.run, kernel.function, kernel.packed_metadata)


class Launcher:
    """A launcher (tensors in, new tensors out, no autograd) registered as the custom op `lwt::<name>`.

    Calling it runs `fn` directly in eager mode. While torch.compile or torch.export traces (Dynamo, then
    AOTAutograd over the autograd.Function around it) it calls the registered op instead: one opaque node in the
    graph whose output shapes, dtypes and strides come from `fake`, since the host-side launch code
    (config caches, the autotuner, grid lambdas) is not something Dynamo can trace. Eager calls skip the
    dispatcher, whose per-call cost (about 50 µs on a slow host CPU) is larger than a small op's launch,
    unless a TorchDispatchMode is active: then the op is called too, so that the mode sees it (FlopCounterMode
    counts it with the formulas of kernels/flops.py, FakeTensorMode runs `fake`, a selective checkpointing
    policy can save its outputs). The op itself is `.op` (torch.ops.lwt.<name>), for torch.library.opcheck.

    Rules `fn` keeps, as custom ops must: no output aliases an input and no input is written (mutates_args
    is empty), every output is a tensor (an output not asked for is an empty tensor), and its outputs
    have the strides `fake` gives.
    """

    registry: dict[str, "Launcher"] = {}  # every lwt:: op, by name

    def __init__(self, name: str, fn, fake, host_sync: bool = False):
        self.fn, self.name = fn, name
        Launcher.registry[name] = self
        # host_sync: the op waits for the GPU (it reads a count back), which a CUDA graph cannot capture;
        # the tag tells Inductor's CUDA-graph mode (mode="reduce-overhead") to leave it out of its graphs.
        unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)  # not in every torch
        tags = {"tags": (unsafe,)} if host_sync and unsafe is not None else {}
        # the registered op (what a compiled graph calls) makes its inputs' GPU current too: only Inductor's
        # wrapper code enters a device guard of its own
        guarded = functools.wraps(fn)(lambda *args, **kwargs: _on_inputs_gpu(fn, args, kwargs))
        self.op = torch.library.custom_op(f"lwt::{name}", guarded, mutates_args=(), **tags)
        self.op.register_fake(fake)
        flops.register(name, fn)  # its FLOPs, for FlopCounterMode (ops without a matmul have none)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.op(*args, **kwargs)
        if dispatch_modes():  # FlopCounterMode, FakeTensorMode, selective checkpointing, DebugMode: only the
            flops.reach_counters(self.name)  # dispatcher shows a mode the kernel, as one op
            return self.op(*args, **kwargs)
        return _on_inputs_gpu(self.fn, args, kwargs)


# How many TorchDispatchModes are active (user modes and the infra ones, FakeTensorMode among them): one C
# call (about 0.1 µs), the only cost Launcher.__call__ adds to an eager launch. (torch 2.11 and 2.13.)
dispatch_modes = torch._C._len_torch_dispatch_stack


def _on_inputs_gpu(fn, args, kwargs):
    """fn(*args, **kwargs) with its inputs' GPU current. Triton launches on the current CUDA device, not
    on its arguments' device (and the autotuner times on the current device's stream). Every launcher's
    first tensor argument (positional or keyword) is on the device of all the others."""
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    index = first.get_device()  # -1 on the CPU (the interpreter): CUDA is never touched
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def first_order_only(backward):
    """In place of torch.autograd.function.once_differentiable on a backward built from launchers (whose
    outputs carry no graph). once_differentiable only catches a double backward when an upstream gradient
    requires grad; from a .sum() or .mean() it does not, and a second-order term (a gradient penalty)
    would silently be taken as zero. Here any backward run with create_graph=True (grad mode on inside
    the backward) for an op whose inputs require grad raises at once."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            raise RuntimeError("lwt: the Triton kernels' backward is not differentiable: create_graph=True (double "
                               "backward, gradient penalties) is not supported; run the reference "
                               "(LWT_BACKEND=reference) for higher-order gradients")
        try:  # eager only: traced graphs hold fake tensors
            if not torch.compiler.is_compiling():
                for g in grads:
                    if isinstance(g, torch.Tensor):
                        g.untyped_storage()
        except NotImplementedError:  # a vmap's BatchedTensor (or another wrapper): no memory a launcher can read
            raise RuntimeError("lwt: the Triton kernels' backward cannot be batched: torch.autograd.grad("
                               "is_grads_batched=True) and torch.autograd.functional.jacobian(vectorize=True) run "
                               "it under vmap; loop over the gradients instead, or run the reference "
                               "(LWT_BACKEND=reference)") from None
        # autocast off, as in the forward (whose launchers allocate their outputs in the inputs' dtypes):
        # a backward() called inside an autocast region would otherwise round the torch GEMMs of a
        # backward (SwiGLU's dh and dW_down, cross entropy's recomputed chunks) to 16 bits. Eager only: Dynamo
        # traces this backward while it traces the forward, and the switched-off state leaked into the rest
        # of the forward's trace (an autocast projection after the op looked fp32 to it, and the casts that
        # depend on its dtype went wrong); the compiled backward matches eager's without the switch
        # (tests/test_compile.py, test_a_triton_block_compiled_under_autocast_is_eager).
        device = next((g.device.type for g in grads if isinstance(g, torch.Tensor)), "cpu")
        with torch.no_grad():
            if not torch.compiler.is_compiling() and autocast_available(device) and torch.is_autocast_enabled(device):
                with torch.autocast(device, enabled=False):
                    return backward(ctx, *grads)
            return backward(ctx, *grads)
    return wrapper


def launcher(name: str, fake, host_sync: bool = False):
    """Decorator form of Launcher: `@launcher("rms_norm_fwd", fake=...)` over a typed function (the
    annotations are the op's schema)."""
    return lambda fn: Launcher(name, fn, fake, host_sync)


def forward_only(*tensors: torch.Tensor) -> bool:
    """Whether no backward can follow an op on these inputs: grad mode off or none of them requiring
    grad, and no_transform(). Then an op calls its forward launcher alone, asking it for nothing only a
    backward reads."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return no_transform()


def no_transform() -> bool:
    """Neither a forward-mode AD level nor a torch.func transform is open. A dual tensor, or a vmap's
    BatchedTensor, does not require grad; inside either the op's autograd.Function must run, and raise
    (it has no jvp, no setup_context: README), where its launcher alone would drop the tangent or hand
    Triton a BatchedTensor ("Cannot access storage of BatchedTensorImpl"). While Dynamo traces, the
    transforms' stack is not read: Dynamo runs the traced graph's tensors, never BatchedTensors, and how
    it treats the peek differs between torch versions."""
    if fwAD._current_level >= 0:
        return False
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None


def absent(like: torch.Tensor) -> torch.Tensor:
    """The placeholder a Launcher returns for an output that was not asked for: an empty tensor."""
    return like.new_empty((0,))


def row_configs() -> list[triton.Config]:
    if interpreting():
        # One config: the interpreter would otherwise "benchmark" each one on the CPU.
        return [triton.Config({}, num_warps=1)]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in _ROW_WARPS]


def prune_row_configs(configs, nargs, **kwargs):
    """early_config_prune for row kernels: keep warp counts giving 4..32 tile elements per thread, the
    one nearest 16 elements per thread first (then fewer warps first): the config LWT_AUTOTUNE=0 takes.
    At the ends of that range sm_90 spills (benchmarks/compile_check.py, RMSNorm backward: 32 elements a
    thread spill at tiles of 8192 and 4096 elements, 16 do not at 4096 and spill less at 8192)."""
    meta = {**nargs, **kwargs}
    tile = meta["BLOCK_M"] * meta["BLOCK_N"]
    kept = [c for c in configs if 4 <= tile // (32 * c.num_warps) <= 32]
    if not kept:  # tiny tiles: the fewest warps; huge tiles: the most
        target = min(_ROW_WARPS) if tile < 4 * 32 else max(_ROW_WARPS)
        kept = [c for c in configs if c.num_warps == target]
    per_thread = lambda c: tile // (32 * c.num_warps)  # noqa: E731  (a power of two)
    return sorted(kept, key=lambda c: (abs(per_thread(c).bit_length() - 5), c.num_warps))


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` of a 1-D GEMM grid in grouped order (the Triton matmul
    tutorial's L2 swizzle): GROUP consecutive row tiles share each column tile while it is in L2."""
    group = pid // (GROUP * n_cols)
    first = group * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % (GROUP * n_cols)) % size, (pid % (GROUP * n_cols)) // size
