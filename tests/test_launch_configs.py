"""Every launch config of the GPU lists, forced one at a time, against the float64 reference.

The autotuner runs only its winner for each key, and the interpreter a small config of its own: a config
of the GPU lists that mishandled a mask, a ragged tile or the causal diagonal at its own block sizes
would be found only on the day the autotuner picked it on a GPU. Here each config is forced (the
autotuner then launches it without tuning) and the op is checked as in its own test file. On the CPU the
interpreter runs each distinct block shape once (warps and stages mean nothing there; the dK/dV pass's
FLATTEN and MLA's SPLIT do: its nested and its flattened loops both run, and MLA's split pass); on a
GPU every config of every list runs, compiled, at one head dim (or dtype) its list is for. Sizes leave
a ragged last tile of every block size listed.
"""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from kernels import attention as attn
from kernels import cross_entropy as ce
from kernels import mla
from kernels import reference
from kernels import swiglu
from kernels._common import TunedKernel
from tests import test_attention, test_cross_entropy, test_mla, test_swiglu
from tests.helpers import force_config
from tests.tolerances import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HALF = torch.bfloat16 if CUDA else torch.float16  # the interpreter's tl.dot of bf16 is wrong (triton#11584)


def _variants(configs):
    """The configs to run: all of them on a GPU; on the interpreter one per distinct block shape (and
    FLATTEN: the distinct constexprs)."""
    if CUDA:
        return configs
    distinct = {}
    for c in configs:
        distinct.setdefault(tuple(sorted(c.kwargs.items())), c)
    return list(distinct.values())


def _runs(*lists):
    """One run per config of the longest list, each shorter list cycled: every config of every list runs."""
    lists = [_variants(configs) for configs in lists]
    return [tuple(configs[i % len(configs)] for configs in lists) for i in range(max(map(len, lists)))]


def _indexed(cases, count):
    """pytest params: each case (a tuple, its id first) once per run index i < count(case), so that each
    forced run is a test of its own (on a GPU the test workers share out the compilations)."""
    return [pytest.param(*case, i, id=f"{case[0]}-run{i}") for case in cases for i in range(count(case))]


def _check_forced(kernels, run, check):
    """check() with each of `kernels` forced to its config of `run` (force_config first); each must have run
    with it, or the check tested another config. A failure (a mismatch, or on a GPU a compile error or
    a launch out of resources) names the configs."""
    try:
        check()
    except Exception as e:
        if not hasattr(e, "add_note"):  # Python 3.10
            raise AssertionError(f"configs {_run_id(run)}: {type(e).__name__}: {e}") from e
        e.add_note(f"forced configs: {_run_id(run)}")
        raise
    for kernel, config in zip(kernels, run):
        assert getattr(kernel, "autotuned", kernel).best_config is config, f"{kernel} did not run {config}"


def _run_id(configs):
    return " | ".join(f"{c.kwargs} w{c.num_warps} s{c.num_stages}" for c in configs)


# -- attention and MLA: (BLOCK_M, BLOCK_N, warps, stages[, FLATTEN[, SPLIT]]) lists keyed by padded head dim
# (or "mla", "fp32"); on the CPU a nested and a flattened dK/dV config of one block shape both run (and
# MLA's SPLIT ones).

def _blocks(table, keys):
    return [attn.as_config(entry) for key in keys for entry in table[key]]


# On a GPU each list at a head dim it is for, every run under both masks; on the CPU the 16-bit lists
# together at head dim 64, the runs alternating between the masks (the shorter lists cycle, so most of
# their configs meet both).
ATTENTION_LISTS = ([(64, [64], 64), (128, [128], 128), (256, [256], 256), ("fp32", ["fp32"], 64)] if CUDA else
                   [("16-bit", [64, 128, 256], 64), ("fp32", ["fp32"], 64)])
MASKS = ([pytest.param([False], id="bidirectional"), pytest.param([True], id="causal")] if CUDA else
         [pytest.param([False, True], id="alternating-masks")])


def _attention_runs(keys, dkdv_kernel, dkdv_table=attn._DKDV_CONFIGS):
    """(kernels, runs) of the forward, dK/dV and dQ configs of the lists `keys`."""
    tables = (attn._FWD_CONFIGS, dkdv_table, attn._DQ_CONFIGS)
    return (attn._fwd, dkdv_kernel, attn._dq), _runs(*(_blocks(table, keys) for table in tables))


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("name,keys,D,i", _indexed(ATTENTION_LISTS, lambda c: len(_attention_runs(c[1], None)[1])))
def test_attention_configs(monkeypatch, name, keys, D, i, masks):
    """S spans several of the largest tiles and ends in a ragged one; GQA (two query heads per K/V head)
    makes the dK/dV pass sum over a group."""
    dtype = torch.float32 if name == "fp32" else HALF
    shape = (2, 1000, 4, 2, D, None) if CUDA else (1, 170, 2, 1, D, None)
    kernels, runs = _attention_runs(keys, attn._dkdv)
    for kernel, config in zip(kernels, runs[i]):
        force_config(monkeypatch, kernel, config)
    _check_forced(kernels, runs[i], lambda: test_attention._check(shape, dtype, masks[i % len(masks)]))


# MLA: its own dK/dV kernel, the attention forward and dQ kernels; the lists by the widest padded operand,
# DeepSeek-V2's heads (128 + 64 query/key and 128 value dims) on the "mla" list, Dv == Dn + Dr on the 256.
MLA_CASES = ([((2, 700, 4, 128, 64, 128, None), ["mla"]), ((2, 700, 4, 128, 64, 192, None), [256]),
              ((2, 700, 4, 64, 32, 64, None), [128]), ((2, 700, 4, 32, 16, 16, None), [64])] if CUDA else
             [((1, 170, 2, 32, 16, 32, None), [64, 128, 256, "mla"])])
MLA_CASES = [("x".join(map(str, shape[3:6])), shape, keys) for shape, keys in MLA_CASES]


@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("name,shape,keys,i", _indexed(MLA_CASES, lambda c: len(
    _attention_runs(c[2], None, attn._MLA_DKDV_CONFIGS)[1])))
def test_mla_configs(monkeypatch, name, shape, keys, i, masks):
    kernels, runs = _attention_runs(keys, mla._dkdv, attn._MLA_DKDV_CONFIGS)
    for kernel, config in zip(kernels, runs[i]):
        force_config(monkeypatch, kernel, config)
    _check_forced(kernels, runs[i], lambda: test_mla._check(shape, HALF, masks[i % len(masks)]))


# -- frozen SwiGLU: the dual GEMM's lists, and the FP8 backward's -----------------------------------------

def _gemm(tuples, names=("BLOCK_M", "BLOCK_N", "BLOCK_K")):
    return swiglu._configs(tuples, names)


# On a GPU the "fwd" list runs the forwards it is for: inference, and training with gate/up kept (whose
# backward has no dual GEMM); the "bwd" list the recomputing backward (its forward too); "fp32" both
# policies. On the CPU all of them together, each under both policies.
SWIGLU_LISTS = ([("fwd", ["fwd"], HALF), ("bwd", ["bwd"], HALF), ("fp32", ["fp32"], torch.float32)] if CUDA else
                [("all", ["fwd", "bwd", "fp32"], torch.float16)])


def _swiglu_runs(lists):
    return _runs(_gemm([t for key in lists for t in swiglu._GEMM_CONFIGS[key]]))


@pytest.mark.parametrize("name,lists,dtype,i", _indexed(SWIGLU_LISTS, lambda c: len(_swiglu_runs(c[1]))))
def test_swiglu_dual_gemm_configs(monkeypatch, name, lists, dtype, i):
    """T, D and F leave ragged tiles in every dimension (D 168 ends in a partial K step of 32, 64 and 128)."""
    T, D, F = (1000, 1000, 1400) if CUDA else (150, 168, 200)

    def check():
        if name == "fwd":
            _check_swiglu_forward(T, D, F, dtype)
        for recompute in {"fwd": [False], "bwd": [True]}.get(name, [False, True]):
            test_swiglu._check((T, D), F, dtype, recompute)

    run = _swiglu_runs(lists)[i]
    force_config(monkeypatch, swiglu._dual_gemm, run[0])
    _check_forced([swiglu._dual_gemm], run, check)


def _check_swiglu_forward(T, D, F, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    wg, wu, wd = test_swiglu._weights(D, F, gen, dtype)
    with torch.no_grad():
        y = swiglu.frozen_swiglu(x, wg, wu, wd)
        y64 = reference.frozen_swiglu(x.double(), wg.double(), wu.double(), wd.double())
        y_ref = reference.frozen_swiglu(x, wg, wu, wd)
    assert_close("y", y, y64, y_ref, reduced_over=F)


_FP8_FORWARD = _gemm(swiglu._GEMM_CONFIGS["fp8"])
_FP8_RUNS = _runs(_FP8_FORWARD, _gemm(swiglu._GEMM_CONFIGS["fp8_bwd"]),
                  _gemm(swiglu._FP8_DX_CONFIGS, names=("BLOCK_M", "BLOCK_N")))


@test_swiglu.needs_fp8
@pytest.mark.parametrize("i", range(len(_FP8_RUNS)), ids=lambda i: f"run{i}")
def test_swiglu_fp8_configs(monkeypatch, i):
    """FP8 frozen weights: the dual GEMM's "fp8" list (forward), the FP8 backward's list (the recomputing
    policy's backward dual GEMM) and the FP8 dx GEMM's list; on a GPU in bf16, as
    test_swiglu.test_fp8_frozen_weights. Every run checks the recomputing policy; the first ones, one per
    forward config, the keeping policy too (its training forward; its backward has no dual GEMM)."""
    T, D, F = (1000, 1000, 1400) if CUDA else (150, 168, 200)
    kernels, run = (swiglu._dual_gemm, swiglu._dual_gemm_fp8_bwd, swiglu._fp8_dx), _FP8_RUNS[i]
    for kernel, config in zip(kernels, run):
        force_config(monkeypatch, kernel, config)
    _check_forced(kernels, run, lambda: test_swiglu._check((T, D), F, HALF, True, torch.float8_e4m3fn, seed=5))
    if i < len(_variants(_FP8_FORWARD)):
        for kernel, config in zip(kernels, run):
            force_config(monkeypatch, kernel, config)
        _check_forced(kernels[::2], run[::2],
                      lambda: test_swiglu._check((T, D), F, HALF, False, torch.float8_e4m3fn, seed=5))


# -- cross entropy: the fp32 dW accumulation GEMM -------------------------------------------------------

_CE_DW_RUNS = _runs([triton.Config({"BLOCK_V": bv, "BLOCK_D": bd, "BLOCK_C": bc}, num_warps=w, num_stages=s)
                     for bv, bd, bc, w, s in ce._DW_CONFIGS])


@pytest.mark.parametrize("i", range(len(_CE_DW_RUNS)), ids=lambda i: f"run{i}")
def test_cross_entropy_dw_accumulation_configs(monkeypatch, i):
    """16-bit inputs, dW summed in fp32 over row chunks by the Triton accumulation GEMM: V and D leave
    ragged tiles of every config's blocks."""
    N, D, V = (600, 1000, 3000) if CUDA else (41, 264, 257)
    itemsize = torch.tensor([], dtype=HALF).element_size()
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", (N // 5) * V * itemsize)  # about five chunks of rows
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)  # (not larger for the fp32 sum)
    force_config(monkeypatch, ce._dw_accumulate, _CE_DW_RUNS[i][0])
    _check_forced([ce._dw_accumulate], _CE_DW_RUNS[i],
                  lambda: test_cross_entropy._check(N, D, V, HALF, "mean", "weighted-ignored", seed=3,
                                                    accum_dtype=torch.float32))


# -- the autotuning switch (kernels._common.autotuning, LWT_AUTOTUNE) -------------------------------------

@triton.jit
def _scale_kernel(X, Y, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * SCALE, mask=offs < n)


def _scale_tuner(pruned):
    """A TunedKernel over three configs, the first pruned away; `pruned` counts the prune's calls."""
    def prune(configs, nargs, **kwargs):
        pruned.append(nargs["n"])
        return [c for c in configs if c.kwargs["BLOCK"] > 16]

    configs = [triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32, 64)]
    return TunedKernel(triton.autotune(configs=configs, key=["n"], prune_configs_by={"early_config_prune": prune})(
        _scale_kernel))


def _scale(tuner, n):
    x = torch.randn(n, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    tuner.launch(lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, y, n, SCALE=3.0)
    assert torch.equal(y, x * 3.0)


def test_untuned_launch_takes_the_first_config_that_survives_pruning(monkeypatch):
    """LWT_AUTOTUNE=0: nothing is timed; the first config the prune keeps runs, and is reused for its key."""
    monkeypatch.setenv("LWT_AUTOTUNE", "0")
    pruned = []
    tuner = _scale_tuner(pruned)
    monkeypatch.setattr(tuner.autotuned, "_bench", lambda *a, **k: pytest.fail("a config was timed"))
    _scale(tuner, 100)
    assert tuner.last is tuner.autotuned.configs[1] and tuner.autotuned.best_config is tuner.last
    _scale(tuner, 100)
    assert pruned == [100]  # the second launch found its key's config without pruning again
    _scale(tuner, 37)  # a new key is looked up anew
    assert pruned == [100, 37] and tuner.last is tuner.autotuned.configs[1]


@pytest.mark.parametrize("refused", [{32}, {32, 64}], ids=["first-refused", "all-refused"])
def test_untuned_launch_passes_over_configs_that_do_not_fit(monkeypatch, refused):
    """LWT_AUTOTUNE=0: a config that does not fit the GPU (here, as if out of shared memory) is passed over
    for the next one, as the autotuner's timing would; if none fits, the last one's error is raised."""
    monkeypatch.setenv("LWT_AUTOTUNE", "0")
    tuner = _scale_tuner([])
    jit = tuner.autotuned.fn

    class Refusing:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if kwargs["BLOCK"] in refused:
                    raise OutOfResources(300000, 232448, "shared memory")
                return jit[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(tuner.autotuned, "fn", Refusing())
    if len(refused) == 2:
        with pytest.raises(OutOfResources):
            _scale(tuner, 100)
        assert not tuner.best
    else:
        _scale(tuner, 100)
        assert tuner.last is tuner.autotuned.configs[2] and tuner.autotuned.best_config is tuner.last


def test_tuned_launch_times_the_configs_that_survive_pruning(monkeypatch):
    """LWT_AUTOTUNE=1 (the default): the autotuner times each config the prune keeps and runs the fastest."""
    monkeypatch.delenv("LWT_AUTOTUNE", raising=False)
    tuner = _scale_tuner([])
    timed = []

    def bench(*args, config, **meta):  # the last config is the "fastest"
        timed.append(config)
        return [1.0 / config.kwargs["BLOCK"]] * 3

    monkeypatch.setattr(tuner.autotuned, "_bench", bench)
    _scale(tuner, 100)
    assert timed == tuner.autotuned.configs[1:] and tuner.last is tuner.autotuned.configs[2]


@pytest.mark.parametrize("value", ["yes", "2", "first"])
def test_autotune_switch_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv("LWT_AUTOTUNE", value)
    tuner = _scale_tuner([])
    with pytest.raises(ValueError, match="LWT_AUTOTUNE: expected 1 .* or 0 .*, got"):
        _scale(tuner, 10)


# -- TunedKernel's direct launch (kernels._common._DirectLaunch) ---------------------------------------

def _axpy_kernel(X, Y, n, alpha, SCALE: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    pass  # never compiled: triton's JITFunction.run and the binary's launcher are stood in for below


class _Recorded:
    """Stands in for triton: JITFunction.run (recorded in `slow`, returns a CompiledKernel whose C launcher
    records into `direct`), and the CUDA device and stream queries of the direct launch."""

    def __init__(self, monkeypatch):
        from triton.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction

        self.slow, self.direct = [], []
        jit = JITFunction(_axpy_kernel)  # compiled, not interpreted: the kind of kernel a GPU launches
        config = triton.Config({"BLOCK": 64}, num_warps=2)
        self.tuner = TunedKernel(triton.autotune(configs=[config], key=["K"])(jit))

        def run(*args, grid, warmup, **kwargs):
            self.slow.append((grid, args, kwargs))
            kernel = object.__new__(CompiledKernel)
            kernel._run = lambda *a: self.direct.append(a)
            kernel.function, kernel.packed_metadata = 1000 + len(self.slow), ("packed", len(self.slow))
            return kernel

        monkeypatch.setattr(jit, "run", run)
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)

    def launch(self, x, y, n=100, alpha=2.0, scale=3.0, k=1, grid=(4,)):
        self.tuner.launch(grid, x, y, n, alpha, SCALE=scale, K=k)


def test_direct_launch_reuses_a_binary_only_for_the_same_specialisation(monkeypatch):
    """After a key is tuned, the first launch of each specialisation goes through triton (JITFunction.run)
    and later ones call that binary's launcher directly, with every parameter in declaration order; a
    change triton specialises on (16-byte alignment, an int's divisibility by 16 or value 1, a constexpr
    not in the autotune key, the device) goes through triton again, one that it does not (another int of
    the same kind, the data itself) does not."""
    rec = _Recorded(monkeypatch)
    base = torch.zeros(64)
    x, y = base[:32], base[32:]  # 128-byte offset: both 16-byte aligned
    rec.launch(x, y)  # tunes the key (a lone config: launched untimed)
    rec.launch(x, y)  # its first launch with a binary to remember
    assert len(rec.slow) == 2 and rec.direct == []
    rec.launch(x, y)
    (call,) = rec.direct
    assert call[:9] == (4, 1, 1, 7, 1002, ("packed", 2), None, None, None)
    assert call[9:] == (x, y, 100, 2.0, 3.0, 1, 64)  # X, Y, n, alpha, SCALE, K, BLOCK
    rec.launch(base[:31], base[36:], n=101, alpha=-1.0)  # other data, the same kinds: still direct
    assert len(rec.slow) == 2 and len(rec.direct) == 2
    for changed in (dict(x=base[1:33]), dict(n=96), dict(n=1), dict(n=2 ** 31), dict(scale=4.0)):
        args = {"x": x, "y": y, **changed}
        before = len(rec.slow)
        rec.launch(**args)
        assert len(rec.slow) == before + 1, changed  # through triton
        rec.launch(**args)
        assert len(rec.slow) == before + 1, changed  # then direct
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 1)
    rec.launch(x, y)
    assert len(rec.slow) == 8


def test_direct_launch_steps_aside_for_hooks_settings_and_cleared_caches(monkeypatch):
    """While a launch hook (a profiler's) or a pre-run hook is installed, every launch goes through triton,
    which calls it, and no binary is remembered (a profiler's may be instrumented); a change of triton's
    debug setting, or a constexpr of another type (True for 1), goes through triton too; clearing `best`
    (as the tuning scripts and force_config do) forgets the remembered binaries; a grid given as a
    function gets the parameters by name."""
    from triton import knobs

    rec = _Recorded(monkeypatch)
    x, y = torch.zeros(32), torch.zeros(32)
    for _ in range(3):
        rec.launch(x, y, grid=lambda meta: (meta["n"] // meta["BLOCK"] + 1, 2))
    assert len(rec.slow) == 2 and len(rec.direct) == 1 and rec.direct[0][:3] == (2, 2, 1)

    def counts():
        return len(rec.slow), len(rec.direct)

    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        rec.launch(x, y)
        assert counts() == (3, 1)
        rec.tuner.best.clear()
        rec.launch(x, y)  # tunes
        rec.launch(x, y)  # through triton, and not remembered
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert counts() == (5, 1)
    rec.launch(x, y)  # the hook gone: through triton once more, remembered
    rec.launch(x, y)
    assert counts() == (6, 2)
    rec.tuner.autotuned.fn.pre_run_hooks.append(hook)
    rec.launch(x, y)
    rec.tuner.autotuned.fn.pre_run_hooks.remove(hook)
    assert counts() == (7, 2)
    with monkeypatch.context() as patch:
        patch.setattr(knobs.runtime, "debug", True)  # (a plain value in triton 3.6, read once from TRITON_DEBUG)
        rec.launch(x, y)
    assert counts() == (8, 2)
    rec.launch(x, y, scale=1)
    rec.launch(x, y, scale=1)
    rec.launch(x, y, scale=True)
    assert counts() == (10, 3)
    rec.launch(x, y)
    assert counts() == (10, 4)


@pytest.mark.cuda
def test_direct_launches_give_the_results_of_triton_launches(monkeypatch):
    """On a GPU: RMSNorm's fwd+bwd (three kernels) on aligned and unaligned views, in turn, so that each
    key's later launches are direct ones of both specialisations; each result is bit for bit the one
    triton's own launch path gives for the same inputs (these kernels are deterministic)."""
    from kernels import rmsnorm
    from kernels._common import _DirectLaunch

    direct = []
    launch = _DirectLaunch.launch

    def counted(self, grid, values):
        direct.append(launch(self, grid, values))
        return direct[-1]

    monkeypatch.setattr(_DirectLaunch, "launch", counted)
    for kernel in (rmsnorm._fwd, rmsnorm._bwd, rmsnorm._dw_reduce):
        monkeypatch.setattr(kernel, "best", {})  # (other tests in this process may have launched these keys)
    gen = torch.Generator(device="cuda").manual_seed(0)
    M, N = 37, 1000
    buf = torch.randn(4, M * N + 1, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(N, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step(x, dy):
        x, w = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = rmsnorm.rms_norm(x, w, 1e-6)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    # offset 1: a 2-byte shift, no pointer 16-byte aligned; rows stay unit-stride views (no copy)
    views = [(buf[i % 3, o:o + M * N].view(M, N), buf[3, o:o + M * N].view(M, N))
             for i, o in enumerate((0, 0, 0, 1, 1, 1, 0, 1))]
    got = [step(x, dy) for x, dy in views]
    # the forward and the backward: 2 of their 4 aligned launches direct (the first tunes, the second
    # remembers), 3 of their 4 unaligned ones (a new specialisation: its first goes through triton); the dW
    # reduction sees only buffers of its own (aligned): 6 of its 8
    assert sum(direct) == 5 + 5 + 6, direct
    monkeypatch.setattr(_DirectLaunch, "launch", lambda self, grid, values: False)
    for (x, dy), results in zip(views, got):
        for name, a, b in zip(("y", "dx", "dweight"), results, step(x, dy)):
            assert torch.equal(a, b), name


@pytest.mark.cuda
def test_timed_autotuning_picks_a_correct_config(monkeypatch):
    """The suite runs untimed (tests/conftest.py); here the attention kernels autotune as in training
    (every listed config compiled and timed, the fastest launched) and the result is checked."""
    monkeypatch.setenv("LWT_AUTOTUNE", "1")
    kernels = (attn._fwd, attn._dkdv, attn._dq)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "best", {})
        monkeypatch.setattr(kernel.autotuned, "cache", {})
    test_attention._check((2, 1000, 4, 2, 128, None), torch.bfloat16, True)
    assert all(kernel.autotuned.cache for kernel in kernels)  # each was timed, not launched untimed


def test_timed_dw_accumulation_restores_its_running_sum(monkeypatch):
    """Timing runs each config of the CE dW accumulation GEMM on the call's own arguments, and the kernel
    adds into the fp32 running sum in place: the autotuner must put the sum back after each run
    (restore_value), or dW comes out several times too large. Two configs, and a stand-in for the timer
    that runs each three times (on the interpreter too)."""
    monkeypatch.setenv("LWT_AUTOTUNE", "1")
    tuner = ce._dw_accumulate.autotuned
    configs = tuner.configs[:2] if CUDA else [
        tuner.configs[0], triton.Config({"BLOCK_V": 32, "BLOCK_D": 16, "BLOCK_C": 16}, num_warps=1, num_stages=1)]
    timed = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(1)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setitem(tuner.__dict__, "do_bench", bench)  # (over the cached_property; not read first)
    monkeypatch.setattr(ce._dw_accumulate, "best", {})
    N, D, V = (600, 1000, 3000) if CUDA else (41, 40, 257)
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", (N // 5) * V * 2)  # about five chunks of rows
    monkeypatch.setattr(ce, "ACCUM_CHUNK_SHARE", 0.0)
    test_cross_entropy._check(N, D, V, HALF, "mean", "weighted-ignored", seed=3, accum_dtype=torch.float32)
    assert len(timed) == 6  # two configs for each key: the first chunk's, the adding chunks', the last one's
