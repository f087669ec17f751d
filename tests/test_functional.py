"""lwt.functional dispatch (Triton kernel vs reference, LWT_BACKEND) and the bad-input contract."""
import pytest
import torch

import lwt.functional as F
from kernels import reference
from kernels import rmsnorm as rmsnorm_kernels
from tests.helpers import ENTRIES, assert_refused_before_launch
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=gen).to(DEVICE, dtype)
    return x, torch.randn(48, generator=gen).to(DEVICE, dtype), torch.randn(3, 5, 48, generator=gen).to(DEVICE, dtype)


def test_auto_backend_picks_by_device(monkeypatch):
    ref_calls = _spy(monkeypatch, reference, "rms_norm")
    kernel_calls = _spy(monkeypatch, rmsnorm_kernels, "rms_norm_fwd")
    x, w, r = _inputs()
    F.rms_norm(x, w, 1e-6, r)
    if x.is_cuda:
        assert kernel_calls and not ref_calls
    else:
        assert ref_calls and not kernel_calls


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forced_backend_runs_that_path_and_agrees(monkeypatch, backend):
    monkeypatch.setenv("LWT_BACKEND", backend)
    ref_calls = _spy(monkeypatch, reference, "rms_norm")
    kernel_calls = _spy(monkeypatch, rmsnorm_kernels, "rms_norm_fwd")
    x, w, r = _inputs()
    y, s = F.rms_norm(x, w, 1e-6, r)
    assert (kernel_calls if backend == "triton" else ref_calls) and not (ref_calls if backend == "triton" else kernel_calls)
    y64, s64 = reference.rms_norm(x.double(), w.double(), 1e-6, r.double())
    y32, s32 = reference.rms_norm(x, w, 1e-6, r)
    assert_close("y", y, y64, y32)
    assert_close("s", s, s64, s32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_weight_reaches_the_op_as_none(monkeypatch, backend):
    """weight=None (torch.nn.RMSNorm(elementwise_affine=False)) is passed on as None, not as a ones vector
    made per call, and gives y = x · rsqrt(mean(x²) + eps) on either path."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    weights = []
    module, name = (rmsnorm_kernels, "rms_norm_fwd") if backend == "triton" else (reference, "rms_norm")
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda x, w, *a: weights.append(w) or real(x, w, *a))
    x, _, _ = _inputs()
    y = F.rms_norm(x, None, 1e-6)
    assert weights == [None]
    assert_close("y", y, reference.rms_norm(x.double(), torch.ones(48, dtype=torch.float64, device=x.device), 1e-6),
                 torch.nn.functional.rms_norm(x, (48,), None, 1e-6))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_eps_zero_is_accepted(monkeypatch, backend):
    """eps is "a finite real number >= 0" (kernels/_checks.py): 0 is valid on both paths, as in
    torch.nn.functional.rms_norm."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    x, w, _ = _inputs()
    assert_close("y", F.rms_norm(x, w, 0.0), reference.rms_norm(x.double(), w.double(), 0.0),
                 torch.nn.functional.rms_norm(x, (48,), w, 0.0))


def test_reference_path_takes_every_real_the_checks_accept(monkeypatch):
    """eps and softmax_scale may be any finite real (kernels/_checks.py): a Fraction or an int too big for
    int64 passed the checks, then the reference path's tensor arithmetic raised TypeError or OverflowError
    (the kernels' wrappers convert with float()). Each now computes as its float does."""
    from fractions import Fraction

    monkeypatch.setenv("LWT_BACKEND", "reference")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    q9, kn, kr, c = (torch.randn(shape, generator=gen) for shape in ((1, 4, 2, 9), (1, 4, 2, 6), (1, 4, 3), (1, 4, 6)))
    x, w = torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)
    for value in (Fraction(1, 3), 10**20):
        pairs = [(F.rms_norm(x, w, value), F.rms_norm(x, w, float(value))),
                 (F.attention(q, k, v, False, value), F.attention(q, k, v, False, float(value))),
                 (F.mla_attention(q9, kn, kr, v, True, value), F.mla_attention(q9, kn, kr, v, True, float(value))),
                 (F.latent_attention(q9, c, kr, False, value), F.latent_attention(q9, c, kr, False, float(value)))]
        for got, want in pairs:
            assert torch.equal(got, want)


def test_forced_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LWT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="LWT_BACKEND=triton needs CUDA tensors.*TRITON_INTERPRET=1"):
        F.rms_norm(x, torch.ones(8))
    monkeypatch.setattr(F, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="triton cannot be imported"):
        F.rms_norm(x, torch.ones(8))


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("LWT_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="LWT_BACKEND: expected one of auto, triton, reference, got 'cudnn'"):
        F.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_reference_path_takes_float64_and_kernel_path_refuses_it(monkeypatch):
    x, w = torch.randn(4, 16, dtype=torch.float64, device=DEVICE), torch.ones(16, dtype=torch.float64, device=DEVICE)
    monkeypatch.setenv("LWT_BACKEND", "reference")
    assert F.rms_norm(x, w).dtype == torch.float64
    monkeypatch.setenv("LWT_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"^x: expected dtype float32, float16 or bfloat16, got torch.float64"):
        F.rms_norm(x, w)


def _bad_inputs():
    x, w, r = _inputs()
    other = torch.device("meta")  # a second device exists on every machine
    return [
        pytest.param(dict(x=x, weight=w[:47]), r"^weight: expected shape \(48,\) \(the last dim of x\), got \(47,\)", id="weight-short"),
        pytest.param(dict(x=x, weight=w[None]), r"^weight: expected shape \(48,\)", id="weight-2d"),
        pytest.param(dict(x=x, weight=w.to(other)), r"^weight: expected a tensor on .* \(the device of x\), got meta", id="weight-device"),
        pytest.param(dict(x=x.long(), weight=w), r"^x: expected dtype float32, float16,? .*bfloat16.*, got torch.int64", id="x-int"),
        pytest.param(dict(x=x, weight=w.int()), r"^weight: expected dtype .*, got torch.int32", id="weight-int"),
        pytest.param(dict(x=x.sum(), weight=w), r"^x: expected at least 1 dims, got shape \(\)", id="x-0d"),
        pytest.param(dict(x=x[..., :0], weight=w[:0]), r"^x: expected a last \(hidden\) dim of at least 1", id="x-hidden-0"),
        pytest.param(dict(x=x.tolist(), weight=w), r"^x: expected a torch.Tensor, got list", id="x-list"),
        pytest.param(dict(x=x, weight=w, residual=r[:, :4]), r"^residual: expected the shape of x \(3, 5, 48\), got \(3, 4, 48\)", id="residual-shape"),
        pytest.param(dict(x=x, weight=w, residual=r.half()), r"^residual: expected the dtype of x \(torch.float32\), got torch.float16", id="residual-dtype"),
        pytest.param(dict(x=x, weight=w, residual=r.to(other)), r"^residual: expected a tensor on .*, got meta", id="residual-device"),
        pytest.param(dict(x=x, weight=w, eps=-1e-6), r"^eps: expected a finite real number >= 0, got -1e-06", id="eps-negative"),
        pytest.param(dict(x=x, weight=w, eps=None), r"^eps: expected a finite real number >= 0, got None", id="eps-none"),
        pytest.param(dict(x=x, weight=w, eps=float("nan")), r"^eps: expected a finite real number >= 0, got nan", id="eps-nan"),
        pytest.param(dict(x=x, weight=w, eps=10**400), r"^eps: expected a finite real number >= 0, got 1000", id="eps-huge-int"),
        pytest.param(dict(x=x.to_sparse(), weight=w), r"^x: expected a dense \(strided\) tensor, got layout torch.sparse_coo", id="x-sparse"),
    ]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kwargs,message", _bad_inputs())
def test_bad_input_raises_value_error_before_launch(monkeypatch, kwargs, message, entry):
    assert_refused_before_launch(monkeypatch, entry, rmsnorm_kernels.rms_norm, F.rms_norm,
                                 [(rmsnorm_kernels, "rms_norm_fwd"), (reference, "rms_norm")], message, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_latent_wider_than_the_kernel_runs_the_reference_whatever_the_backend(monkeypatch, backend):
    """A latent wider than 256 (DeepSeek-V2's 512) has no kernel: the reference runs, even with
    LWT_BACKEND=triton on a machine that could not run the kernels (CPU tensors, no interpreter)."""
    import kernels._common as common

    monkeypatch.setenv("LWT_BACKEND", backend)
    monkeypatch.setattr(common, "interpreting", lambda: False)
    g = torch.Generator().manual_seed(2)
    q, c, kr = (torch.randn(*shape, generator=g) for shape in ((1, 3, 2, 300 + 4), (1, 3, 300), (1, 3, 4)))
    torch.testing.assert_close(F.latent_attention(q, c, kr), reference.latent_attention(q, c, kr))


def test_latent_of_the_kernels_widest_size_takes_the_kernel_path(monkeypatch):
    """A latent of exactly 256 has a kernel: LWT_BACKEND=triton takes it (here, with the interpreter
    said to be off, the documented RuntimeError), while 257 runs the reference."""
    import kernels._common as common

    monkeypatch.setenv("LWT_BACKEND", "triton")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    g = torch.Generator().manual_seed(2)
    for R in (256, 257):
        q, c, kr = (torch.randn(*shape, generator=g) for shape in ((1, 3, 2, R + 4), (1, 3, R), (1, 3, 4)))
        if R == 256:
            with pytest.raises(RuntimeError, match="LWT_BACKEND=triton needs CUDA tensors"):
                F.latent_attention(q, c, kr)
        else:
            torch.testing.assert_close(F.latent_attention(q, c, kr), reference.latent_attention(q, c, kr))


def test_backend_names_ignore_case_and_surrounding_spaces(monkeypatch):
    monkeypatch.setenv("LWT_BACKEND", " Reference ")
    calls = _spy(monkeypatch, reference, "rms_norm")
    F.rms_norm(torch.randn(2, 8), torch.ones(8))
    assert calls == ["rms_norm"]


# ---------------------------------------------------------------------------------------------------
# Parity of the two paths: what a caller sees besides the numbers
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_residual_sum_needs_no_gradient_when_only_the_weight_does(monkeypatch, backend):
    """A trainable norm over cached activations: s = x + residual does not require grad on either path
    (the Function returned it as a differentiable output)."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    x, w, r = _inputs()
    y, s = F.rms_norm(x, w.requires_grad_(), 1e-6, r)
    assert y.requires_grad and not s.requires_grad and s.grad_fn is None
    y2, s2 = F.rms_norm(x.requires_grad_(), w, 1e-6, r)
    assert s2.requires_grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_outputs_are_contiguous_on_both_paths(monkeypatch, backend):
    """(B, S, H, D) contiguous, as the kernels' (o.view(B, S, H * D) works on either path)."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g).to(DEVICE) for _ in range(3))
    kn, kr, vm = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 5, 3, 6), (2, 5, 2), (2, 5, 3, 4)))
    assert F.attention(q, k, v).is_contiguous()
    assert F.mla_attention(q, kn, kr, vm).is_contiguous()


def test_bad_backend_is_refused_by_the_latent_reference_path_too(monkeypatch):
    monkeypatch.setenv("LWT_BACKEND", "ref")
    g = torch.Generator().manual_seed(2)
    q, c, kr = (torch.randn(*shape, generator=g) for shape in ((1, 3, 2, 300 + 4), (1, 3, 300), (1, 3, 4)))
    with pytest.raises(ValueError, match="LWT_BACKEND: expected one of auto, triton, reference, got 'ref'"):
        F.latent_attention(q, c, kr)


def test_kernels_refuse_tensors_on_other_devices_by_name():
    """Meta tensors (any device but CUDA, or the CPU under the interpreter) are a ValueError naming the
    argument, not a crash inside the launch."""
    from kernels.attention import attention
    from kernels.rmsnorm import rms_norm
    x = torch.randn(2, 8, device="meta")
    with pytest.raises(ValueError, match="^x: expected a CUDA tensor for the Triton kernel, got one on meta"):
        rms_norm(x, torch.ones(8, device="meta"))
    q = torch.randn(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="^q: expected a CUDA tensor"):
        attention(q, q, q)


@pytest.mark.skipif(torch.cuda.is_available(), reason="about the interpreter, on CPU-only machines")
def test_interpreter_switched_on_after_triton_was_imported_is_a_clear_error():
    """TRITON_INTERPRET=1 set after triton was imported does not make triton interpret (its own jitted
    helpers are compiled): forcing the Triton path on CPU tensors is then the documented RuntimeError, not
    a crash inside the launch."""
    import os
    import subprocess
    import sys
    code = ("import os, torch, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'; os.environ['LWT_BACKEND'] = 'triton'\n"
            "import lwt.functional as F\n"
            "try:\n"
            "    F.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LWT_BACKEND")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert "refused: LWT_BACKEND=triton needs CUDA tensors" in out.stdout, out.stdout + out.stderr


def test_batched_backward_on_the_kernel_path_is_a_clear_error(monkeypatch):
    """torch.autograd.grad(is_grads_batched=True) runs the backward under vmap, whose BatchedTensors the
    launchers cannot read (it was a NotImplementedError from deep in the launch); the reference path runs it."""
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE)
    for backend in ("triton", "reference"):
        monkeypatch.setenv("LWT_BACKEND", backend)
        y = F.rms_norm(x, w)
        grads = torch.randn(4, *y.shape, device=DEVICE)
        if backend == "triton":
            with pytest.raises(RuntimeError, match="cannot be batched"):
                torch.autograd.grad(y, x, grads, is_grads_batched=True)
        else:
            (g,) = torch.autograd.grad(y, x, grads, is_grads_batched=True)
            assert g.shape == (4, 2, 3, 8)
