"""Helpers the kernel tests share: layout-preserving copies and output-plus-gradient evaluation."""
import torch


def fresh_copy(c: torch.Tensor) -> torch.Tensor:
    """A copy of c with c's strides: clone() would make a sliced or expanded tensor contiguous, and
    the kernels' strided paths would go untested."""
    if 0 in c.stride():  # expanded: copy one slice, expand it again
        return c[tuple(slice(0, 1) if st == 0 else slice(None) for st in c.stride())].clone().expand_as(c)
    return torch.empty_strided(c.size(), c.stride(), dtype=c.dtype, device=c.device).copy_(c)


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


# The three ways an op can be entered: the kernel module's public function, and lwt.functional with
# each backend forced.
ENTRIES = ["kernel", "functional-triton", "functional-reference"]


def assert_refused_before_launch(monkeypatch, entry, kernel_op, functional_op, blocked, match, *args, **kwargs):
    """Call the op through `entry` with every (module, attribute) in `blocked` (its launchers, its
    reference) replaced by a function that fails the test, and expect a ValueError matching `match`."""
    import pytest

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
