"""Helpers the kernel tests share: layout-preserving copies and output-plus-gradient evaluation; forcing a
launch config; a small DecoderBlock and the comparison of its output and gradients (the compile tests);
the HEAVY marker; how much of a file stays resident in this process's maps."""
import pytest
import torch

from lwt.config import ModelConfig
from lwt.layers import DecoderBlock
from tests.tolerances import assert_close


def fresh_copy(c: torch.Tensor) -> torch.Tensor:
    """A copy of c with c's layout, made by copying c's whole storage: clone() would make a sliced or
    expanded tensor contiguous, and the kernels' strided paths would go untested; copying into an
    empty_strided buffer would keep the strides but not what lies between the elements (a NaN padding
    that a kernel reading past the view must meet)."""
    t = torch.empty(0, dtype=c.dtype, device=c.device)
    return t.set_(c.untyped_storage().clone(), c.storage_offset(), c.size(), c.stride())


def grads(fn, inputs, cotangents):
    """Output(s) of fn(*inputs) and the gradients of Σ out·cotangent w.r.t. every input. Inputs enter
    as they are laid out (detached views); each cotangent is a fresh copy, so a backward that wrote
    into its gradient could not affect another call. cotangents: one per output, None for an unused one."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, fresh_copy(c)) for o, c in zip(outs, cotangents) if c is not None]
    gs = torch.autograd.grad([o for o, _ in used], leaves, [c for _, c in used], allow_unused=False)
    return [o.detach() for o in outs], list(gs)


def force_config(monkeypatch, kernel, config):
    """Launches of `kernel` (a TunedKernel, or a triton autotuner) use `config`: the autotuner launches a
    lone config without pruning or benchmarking it."""
    autotuner = getattr(kernel, "autotuned", kernel)
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})
    monkeypatch.setattr(autotuner, "best_config", None, raising=False)
    if hasattr(kernel, "best"):
        monkeypatch.setattr(kernel, "best", {})


# The CUDA tests that hold GiBs of GPU memory (float64 references at long sequences or wide vocabularies,
# 4 GiB buffers): one xdist worker runs them one after another (benchmarks/device_check.sh: --dist
# loadgroup), so that the other workers sharing the GPU never meet several of them at once.
HEAVY = pytest.mark.xdist_group("heavy")

# The three ways an op can be entered: the kernel module's public function, and lwt.functional with
# each backend forced.
ENTRIES = ["kernel", "functional-triton", "functional-reference"]


def assert_refused_before_launch(monkeypatch, entry, kernel_op, functional_op, blocked, match, *args, **kwargs):
    """Call the op through `entry` with every (module, attribute) in `blocked` (its launchers, its
    reference) replaced by a function that fails the test, and expect a ValueError matching `match`."""
    def no_launch(*a, **k):
        raise AssertionError("a kernel (or the reference) ran on invalid input")

    for module, attribute in blocked:
        monkeypatch.setattr(module, attribute, no_launch)
    if entry == "kernel":
        fn = kernel_op
    else:
        monkeypatch.setenv("LWT_BACKEND", entry.split("-")[1])
        fn = functional_op
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def block_config(attn_type: str, **overrides) -> ModelConfig:
    base = dict(vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, attn_type=attn_type,
                mla_rq=16, mla_rkv=16)
    return ModelConfig(**{**base, **overrides})


def make_block(attn_type: str, **factory) -> DecoderBlock:
    torch.manual_seed(0)
    block = DecoderBlock.from_config(block_config(attn_type), 0, **factory)
    with torch.no_grad():  # norm scales away from 1, so their gradients are not trivial
        for name, p in block.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "_norm." in name:
                p.uniform_(0.5, 1.5)
    return block


def output_and_grads(module, x, dy, dynamic_seq: bool = False):
    """module(x) and the gradients of Σ module(x)·dy w.r.t. x and every parameter, by name.
    dynamic_seq: compile for any sequence length (x's dim 1), not for this one."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    if dynamic_seq:
        import torch._dynamo

        torch._dynamo.mark_dynamic(leaf, 1)
    y = module(leaf)
    y.backward(dy.clone())
    # a compiled module (OptimizedModule) names its parameters "_orig_mod.<name>"
    grads = {"x": leaf.grad} | {name.removeprefix("_orig_mod."): p.grad.detach().clone()
                                for name, p in module.named_parameters()}
    return y.detach(), grads


def compare(got, truth, yardstick, rows: int):
    """got (compiled) against truth (eager, float64 weights), eager in got's dtype as the yardstick
    (tests/tolerances.py). A weight gradient sums over the rows (fp32 in both, possibly reordered)."""
    assert_close("y", got[0], truth[0].double(), yardstick[0])
    assert got[1].keys() == truth[1].keys()
    for name in got[1]:
        assert_close(f"d {name}", got[1][name], truth[1][name].double(), yardstick[1][name], reduced_over=rows)


def resident_kib(path) -> int:
    """KiB of `path` resident in this process's maps (/proc/self/smaps), whatever the page cache holds."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total
