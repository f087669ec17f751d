"""lwt.diffusion (masking, the two loss weightings, the NELBO evaluation, the sampler) and the
lwt.generate CLI, on tiny models on the CPU (reference path)."""
import argparse
import dataclasses
import io
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import lwt.generate as generate
from lwt import diffusion as D
from lwt.config import Config, DataConfig, ModelConfig
from lwt.model import LWTModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are far too small for intra-op threads, and on a loaded 2-core machine OpenMP's
    spinning workers made the training test 50× slower (40 s instead of 0.7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(vocab_size=8, seed=0, **overrides):
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
                         **overrides})
    torch.manual_seed(seed)
    return LWTModel(cfg)


# ---------------------------------------------------------------------------------------------------
# sample_t, mask_tokens
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_min,t_max", [(0.05, 1.0), (0.0, 1.0), (0.2, 0.3), (0.5, 0.5)])
def test_sample_t_is_stratified(t_min, t_max):
    B = 64
    t = D.sample_t(B, t_min, t_max, torch.Generator().manual_seed(0))
    assert t.shape == (B,) and t.dtype == torch.float32
    assert (t > 0).all() and (t <= t_max).all() and (t >= t_min).all()
    width = (t_max - t_min) / B
    sorted_t = t.double().sort().values
    lo = t_min + width * torch.arange(B, dtype=torch.float64)
    slack = 1e-6  # the float32 rounding of t
    assert ((sorted_t >= lo - slack) & (sorted_t <= lo + width + slack)).all(), "one t per stratum"
    if t_min < t_max:
        assert not torch.equal(t, t.sort().values), "the strata are shuffled over the batch"
        assert (t > t_min).all()


def test_sample_t_is_reproducible_and_bad_arguments():
    a = D.sample_t(8, 0.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, D.sample_t(8, 0.0, 1.0, torch.Generator().manual_seed(3)))
    for args, message in [((0, 0.1, 1.0), r"^batch: expected an int >= 1, got 0"),
                          ((4, 0.5, 0.2), r"^t_min, t_max: expected 0 <= t_min <= t_max <= 1"),
                          ((4, 0.0, 0.0), r"^t_min, t_max: expected .* t_max >= 1.18e-38"),
                          ((4, -0.1, 1.0), r"^t_min, t_max"),
                          ((4, 0.0, float("nan")), r"^t_max: expected a finite number"),
                          ((4, 0.0, 1e-39), r"^t_min, t_max: expected .* t_max >= 1.18e-38")]:
        with pytest.raises(ValueError, match=message):
            D.sample_t(*args)


def test_sample_t_keeps_the_elbo_weight_finite():
    """With t_min 0 and a t_max just above float32's smallest normal, the float64 t of the lowest strata
    round to float32 subnormals (or 0), whose 1/t overflows: they are raised to the smallest normal."""
    tiny = torch.finfo(torch.float32).tiny
    t = D.sample_t(64, 0.0, 2 * tiny, torch.Generator().manual_seed(0))
    assert (t >= tiny).all() and (t <= 2 * tiny).all() and torch.isfinite(1.0 / t).all()
    assert (t == tiny).any(), "some stratum fell below the smallest normal"


def test_mask_fraction_matches_t():
    """Each token is masked with probability t of its sequence: per sequence and over the batch the
    masked count is within a few binomial standard deviations of S·t."""
    B, S, mask_id = 64, 512, 100
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mask_id, (B, S), generator=gen)
    t = D.sample_t(B, 0.05, 1.0, gen)
    noisy, mask = D.mask_tokens(tokens, t, mask_id, gen)
    assert mask.dtype == torch.bool and noisy.shape == tokens.shape
    assert torch.equal(noisy[mask], torch.full_like(noisy[mask], mask_id))
    assert torch.equal(noisy[~mask], tokens[~mask])
    t64 = t.double()
    counts = mask.sum(dim=1).double()
    sd = (S * t64 * (1 - t64)).sqrt()
    assert ((counts - S * t64).abs() <= 5 * sd + 1).all()
    total_sd = sd.pow(2).sum().sqrt()
    assert abs(counts.sum() - S * t64.sum()) <= 4 * total_sd

    all_masked, m1 = D.mask_tokens(tokens[:2], torch.tensor([1.0, 0.0]), mask_id, gen)
    assert m1[0].all() and not m1[1].any() and (all_masked[0] == mask_id).all()


def test_mask_compares_float64_uniforms_with_t():
    """P(mask) = t to float64 rounding: the uniforms are float64 (float32 ones lie on a 2^-24 grid, which
    masks with probability 6e-8 every t below it while the elbo weight is 1/t)."""
    tokens = torch.zeros(4, 5000, dtype=torch.long)
    t = torch.tensor([1e-9, 0.3, 2.0**-25, 0.999999])
    _, mask = D.mask_tokens(tokens, t, 7, torch.Generator().manual_seed(5))
    r = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(mask, r < t.double()[:, None])


def test_mask_tokens_bad_arguments():
    tokens = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^t: expected a float tensor of shape \(2,\)"):
        D.mask_tokens(tokens, torch.ones(3), 5)
    with pytest.raises(ValueError, match=r"^tokens: expected an int64 or int32 \(batch, seq\) tensor"):
        D.mask_tokens(tokens.float(), torch.ones(2), 5)


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------

TOY_TOKENS = torch.tensor([[0, 3, 4], [2, 2, 1]])
TOY_MASK = torch.tensor([[True, True, False], [False, False, True]])  # flat 0, 1, 5: t of seq 0, 0, 1
TOY_T = torch.tensor([0.5, 0.25])


def test_elbo_and_uniform_weighting_hand_computed():
    """hidden = 0 makes every logit 0, so each masked token costs ln V: elbo = (2·ln5/0.5 + ln5/0.25)/6,
    uniform = ln 5."""
    hidden = torch.zeros(2, 3, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    elbo = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, TOY_T, "elbo")
    assert elbo.item() == pytest.approx((2 * math.log(5) / 0.5 + math.log(5) / 0.25) / 6, rel=1e-12)
    uniform = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, TOY_T, "uniform")
    assert uniform.item() == pytest.approx(math.log(5), rel=1e-12)


def test_elbo_and_uniform_weighting_random_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    ce = torch.nn.functional.cross_entropy((hidden @ w.t()).reshape(6, 5), TOY_TOKENS.reshape(6),
                                           reduction="none").reshape(2, 3)
    want = {"elbo": (ce[0, 0] / 0.5 + ce[0, 1] / 0.5 + ce[1, 2] / 0.25) / 6,
            "uniform": (ce[0, 0] + ce[0, 1] + ce[1, 2]) / 3}
    for weighting, expected in want.items():
        got = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, TOY_T, weighting)
        torch.testing.assert_close(got, expected)
        g_got = torch.autograd.grad(got, (hidden, w))
        g_want = torch.autograd.grad(expected, (hidden, w), retain_graph=True)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b)
        assert g_got[0][~TOY_MASK].abs().sum() == 0  # unmasked positions are not scored


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
def test_loss_without_masked_tokens_is_a_differentiable_zero(weighting):
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    loss = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, torch.zeros(2, 3, dtype=torch.bool), TOY_T, weighting)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(w.grad, torch.zeros_like(w))


def test_loss_without_masked_tokens_is_zero_when_a_16_bit_sum_would_overflow():
    """fp16 hidden states whose sum exceeds fp16's range (65504): still a zero, not inf · 0 = NaN."""
    hidden = torch.ones(2, 3, 20000, dtype=torch.float16, requires_grad=True)
    w = torch.zeros(5, 20000, dtype=torch.float16, requires_grad=True)
    loss = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, torch.zeros(2, 3, dtype=torch.bool), TOY_T, "elbo")
    assert loss.item() == 0.0 and loss.dtype == torch.float32


def test_loss_bad_arguments():
    hidden, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^weighting: expected one of 'elbo', 'uniform', got 'mean'"):
        D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, TOY_T, "mean")
    with pytest.raises(ValueError, match=r"^mask: expected a bool tensor of shape \(2, 3\)"):
        D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK.long(), TOY_T, "elbo")
    with pytest.raises(ValueError, match=r"^tokens: expected ids in \[0, 5\) \(the head's rows\) at the masked "
                                         r"positions, got 5 at position \(0, 0\) \(3 such\)"):  # [MASK] targets
        D.masked_diffusion_loss(hidden, w, TOY_TOKENS.masked_fill(TOY_MASK, 5), TOY_MASK, TOY_T, "elbo")


@pytest.mark.parametrize("weighting", ["elbo", "uniform"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_loss_refuses_a_minus_100_id_at_a_masked_position(monkeypatch, weighting, backend):
    """-100 (PyTorch's padding convention) was linear_cross_entropy's ignore_index: its row was dropped from
    the sum but still counted in B·S or M, a loss too low by the padding's share, silently. It is an id
    out of range like any other, named by its (batch, seq) position; other ids' losses are unchanged."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    gen = torch.Generator().manual_seed(3)
    hidden, w = torch.randn(2, 3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    padded = TOY_TOKENS.clone()
    padded[1, 2] = -100
    with pytest.raises(ValueError, match=r"^tokens: expected ids in \[0, 5\) \(the head's rows\) at the masked "
                                         r"positions, got -100 at position \(1, 2\) \(1 such\)"):
        D.masked_diffusion_loss(hidden, w, padded, mask, TOY_T, weighting)
    lowest = TOY_TOKENS.clone()  # the lowest int64 (a NaN cast to int64 on x86) is no ignored id either
    lowest[0, 2] = torch.iinfo(torch.int64).min
    with pytest.raises(ValueError, match=r"^tokens: expected ids in \[0, 5\) .* got -9223372036854775808 at "
                                         r"position \(0, 2\) \(1 such\)"):
        D.masked_diffusion_loss(hidden, w, lowest, mask, TOY_T, weighting)
    unmasked = TOY_TOKENS.clone()
    unmasked[0, 1] = -100  # an unmasked position is no target
    assert torch.equal(D.masked_diffusion_loss(hidden, w, unmasked, mask, TOY_T, weighting),
                       D.masked_diffusion_loss(hidden, w, TOY_TOKENS, mask, TOY_T, weighting))


def test_objective_argument_errors_name_the_argument():
    """A generator that is no torch.Generator (an int seed, say) and a seed outside a Generator's range
    were AttributeError / "Overflow when unpacking long long"; a bad batch of evaluate_nelbo is named as
    one of its `batches`."""
    model_fn = lambda noisy: torch.randn(*noisy.shape, 4)  # noqa: E731
    with pytest.raises(ValueError, match=r"^generator: expected a torch.Generator or None"):
        D.sample_t(2, 0.0, 1.0, generator=5)
    with pytest.raises(ValueError, match=r"^generator: expected a torch.Generator or None"):
        D.mask_tokens(TOY_TOKENS, TOY_T, 5, generator=5)
    for seed in (-1, 2**64, 1.0):
        with pytest.raises(ValueError, match=r"^seed: expected an int in \[0, 2\*\*64\)"):
            D.evaluate_nelbo(model_fn, torch.randn(5, 4), [TOY_TOKENS], 5, seed=seed)
    with pytest.raises(ValueError, match=r"^batches\[1\]: expected an int64 or int32 \(batch, seq\) tensor"):
        D.evaluate_nelbo(model_fn, torch.randn(5, 4), [TOY_TOKENS, TOY_TOKENS[0]], 5, seed=0)
    with pytest.raises(ValueError, match=r"^batches\[0\]: expected ids in \[0, 5\) .* got 5 at position"):
        D.evaluate_nelbo(model_fn, torch.randn(5, 4), [TOY_TOKENS.clamp(min=5)], 5, seed=0)
    with pytest.raises(ValueError, match=r"^tokens: expected shape \(2, 4\) \(the leading dims of hidden\)"):
        D.evaluate_nelbo(lambda noisy: torch.randn(2, 4, 4), torch.randn(5, 4), [TOY_TOKENS], 5, seed=0)  # hidden_fn's


def test_unigram_entropy():
    assert D.unigram_entropy(torch.tensor([[3, 3], [3, 3]])) == 0.0
    assert D.unigram_entropy(torch.tensor([0, 1, 2, 5])) == pytest.approx(math.log(4))
    skewed = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert D.unigram_entropy(torch.tensor([0, 0, 0, 1])) == pytest.approx(skewed)


# ---------------------------------------------------------------------------------------------------
# Training on a learnable toy sequence, evaluation
# ---------------------------------------------------------------------------------------------------

PATTERN = torch.tensor([1, 5, 2, 7, 3])  # a period-5 cycle over vocab 8: ln 5 nats of unigram entropy


def pattern_batch(gen, B=16, S=16):
    offset = torch.randint(0, len(PATTERN), (B, 1), generator=gen)
    return PATTERN[(torch.arange(S) + offset) % len(PATTERN)]  # (B, S), cyclic shifts of the pattern


def test_elbo_training_learns_a_repeating_pattern():
    """One visible token fixes the phase of the cycle, so a bidirectional model can drive the NELBO far
    below the unigram entropy (ln 5 ≈ 1.61), which any context-free model is stuck at."""
    model = tiny_model()
    eval_gen = torch.Generator().manual_seed(123)
    val = [pattern_batch(eval_gen) for _ in range(4)]
    entropy = D.unigram_entropy(torch.cat(val))
    assert entropy == pytest.approx(math.log(5), rel=1e-3)

    def nelbo():
        return D.evaluate_nelbo(model, model.head_weight(), val, model.mask_id, seed=0)

    start = nelbo()
    assert start == nelbo(), "a fixed seed gives identical masks, so identical numbers"
    assert start["tokens"] == 4 * 16 * 16 and start["ppl_bound"] == pytest.approx(math.exp(start["nelbo"]))
    assert start["nelbo"] > entropy

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        tokens = pattern_batch(gen)
        t = D.sample_t(tokens.shape[0], 0.05, 1.0, gen)
        noisy, mask = D.mask_tokens(tokens, t, model.mask_id, gen)
        loss = D.masked_diffusion_loss(model(noisy), model.head_weight(), tokens, mask, t, "elbo")
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = nelbo()
    assert end["nelbo"] < 0.5 * start["nelbo"] and end["nelbo"] < 0.6 * entropy, (start, end, entropy)


def test_evaluate_nelbo_skips_empty_batches():
    """An empty (0, S) or (B, 0) batch scores nothing; only when every batch is empty is it an error."""
    model = tiny_model()
    good = pattern_batch(torch.Generator().manual_seed(0), B=2, S=6)
    want = D.evaluate_nelbo(model, model.head_weight(), [good], model.mask_id, seed=0)
    for empty in (torch.zeros(0, 6, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64)):
        assert D.evaluate_nelbo(model, model.head_weight(), [good, empty], model.mask_id, seed=0) == want
        # in front of the batch, too: it draws no t and no mask, so the next batch's masks are unchanged
        assert D.evaluate_nelbo(model, model.head_weight(), [empty, good], model.mask_id, seed=0) == want
        with pytest.raises(ValueError, match=r"^batches: expected at least one non-empty batch"):
            D.evaluate_nelbo(model, model.head_weight(), [empty], model.mask_id, seed=0)


def test_elbo_weight_is_float64_on_the_float64_path():
    """1/t of a t that float32 cannot hold (1/3): the float64 loss matches float64 arithmetic to ~1e-15."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    w = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    t = torch.tensor([1 / 3, 0.7], dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy((hidden @ w.t()).reshape(6, 5), TOY_TOKENS.reshape(6),
                                           reduction="none").reshape(2, 3)
    want = (ce[0, 0] / t[0] + ce[0, 1] / t[0] + ce[1, 2] / t[1]) / 6
    got = D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, t, "elbo")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_evaluate_nelbo_bad_batches():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"^batches: expected at least one non-empty batch"):
        D.evaluate_nelbo(model, model.head_weight(), [], model.mask_id, seed=0)


def test_evaluate_nelbo_of_a_diverged_model_reports_a_finite_bound():
    """A NELBO past exp's float range (~709 nats: a diverged model, confidently wrong): the nelbo itself,
    and a ppl_bound capped at exp(700), not an OverflowError out of the evaluation."""
    head = torch.tensor([[0.0], [1.0]])  # (V=2, D=1): token 1's logit is the hidden state
    tokens = torch.zeros(4, 8, dtype=torch.int64)  # every target is token 0, whose logit stays 0
    got = D.evaluate_nelbo(lambda noisy: torch.full((*noisy.shape, 1), 1e4), head, [tokens], mask_id=2, seed=0)
    assert got["nelbo"] > 1000 and got["ppl_bound"] == math.exp(700.0) and got["tokens"] == 32


# ---------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["confidence", "random"])
@pytest.mark.parametrize("length,steps,prompt", [
    pytest.param(16, 4, [3, 1], id="L16-steps4-prompt2"),
    pytest.param(7, 20, None, id="L7-steps20"),
    pytest.param(9, 1, [0], id="L9-steps1"),
    pytest.param(3, 2, [4, 4, 6], id="all-prompt"),
])
def test_sampler_output(order, length, steps, prompt):
    model = tiny_model()
    prompt_t = None if prompt is None else torch.tensor(prompt)
    out = D.sample(model, 3, length, steps, order=order, prompt=prompt_t, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, length) and out.dtype == torch.int64
    assert ((out >= 0) & (out < model.vocab_size)).all(), "no [MASK] id (= vocab_size) is left or produced"
    if prompt is not None:
        assert (out[:, :len(prompt)] == prompt_t).all()
    again = D.sample(model, 3, length, steps, order=order, prompt=prompt_t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_sampler_never_produces_mask_even_when_it_dominates():
    """Make the [MASK] embedding row huge: if the head had that row, every masked position (whose input is
    that row) would predict [MASK]."""
    model = tiny_model()
    with torch.no_grad():
        model.embed.weight[model.mask_id] = 100.0
    out = D.sample(model, 4, 12, 3, temperature=0.0)
    assert (out < model.vocab_size).all()


@pytest.mark.parametrize("length,steps,prompt_len,expected", [
    (10, 4, 0, [10, 7, 4, 2]),    # ceil(10/4)=3, ceil(7/3)=3, ceil(4/2)=2, then the last 2
    (5, 20, 0, [5, 4, 3, 2, 1]),  # more steps than tokens: one per step, no pass once all are filled
    (12, 3, 3, [9, 6, 3]),
])
def test_sampler_unmasks_equal_shares(monkeypatch, length, steps, prompt_len, expected):
    model = tiny_model()
    seen = []
    forward = model.forward

    def recording_forward(tokens, n_blocks=None):
        assert not model.training, "the sampler runs the model in eval mode"
        seen.append((tokens == model.mask_id).sum(dim=1).tolist())
        return forward(tokens, n_blocks)

    monkeypatch.setattr(model, "forward", recording_forward)
    prompt = torch.arange(prompt_len) if prompt_len else None
    D.sample(model, 2, length, steps, prompt=prompt)
    assert seen == [[n, n] for n in expected]
    assert model.training, "the sampler restores the training mode"


def test_sampler_restores_eval_mode():
    """The sampler switches to eval() and back to the mode it found: an eval model stays in eval."""
    model = tiny_model().eval()
    D.sample(model, 1, 4, 2, generator=torch.Generator().manual_seed(0))
    assert not model.training


def test_sampler_greedy_follows_the_head():
    """temperature 0 with one step fills every position with the head's argmax."""
    model = tiny_model()
    out = D.sample(model, 2, 6, 1, temperature=0.0)
    with torch.no_grad():
        hidden = model(torch.full((2, 6), model.mask_id))
        assert torch.equal(out, (hidden @ model.head_weight().t()).argmax(-1))


def test_sampler_takes_an_int32_prompt():
    """A prompt may be int32 (as documented), not only int64: the same samples as its int64 copy."""
    model = tiny_model()
    runs = [D.sample(model, 2, 6, 3, prompt=torch.tensor([3, 1], dtype=dtype),
                     generator=torch.Generator().manual_seed(0)) for dtype in (torch.int32, torch.int64)]
    assert torch.equal(runs[0], runs[1]) and (runs[0][:, :2] == torch.tensor([3, 1])).all()


def test_sampler_n_blocks_zero_runs_no_block(monkeypatch):
    """n_blocks=0 (generate on a checkpoint written before stage 0's first step) reaches the model as 0,
    not as None (every block): 0 is falsy, but it is not "no limit"."""
    model = tiny_model()
    seen, forward = [], model.forward

    def recording_forward(tokens, n_blocks=None):
        seen.append(n_blocks)
        return forward(tokens, n_blocks)

    monkeypatch.setattr(model, "forward", recording_forward)
    D.sample(model, 1, 4, 2, generator=torch.Generator().manual_seed(0), n_blocks=0)
    assert seen == [0, 0]


class FixedLogits(torch.nn.Module):
    """A stand-in model for the sampler whose logits are `logits` at every position: the hidden state is
    the logit vector and the head the identity."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        self.vocab_size = self.mask_id = len(logits)

    def head_weight(self):
        return torch.eye(self.vocab_size)

    def forward(self, tokens):
        return self.logits.expand(*tokens.shape, self.vocab_size)


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampler_draws_follow_the_softmax(temperature):
    """20000 one-token samples against softmax(logits / temperature): Pearson's chi-square, 7 degrees of
    freedom, below 40 (p ~ 1e-6 under the right distribution; the seed is fixed). The same counts against
    the distribution at 1.5x the temperature score far above it (~400 expected at temperature 2, the
    closest case): the test can tell them apart."""
    logits = torch.tensor([-1.2, -1.6, 0.8, 0.8, -0.1, -1.8, 0.6, 0.3], dtype=torch.float64)
    out = D.sample(FixedLogits(logits), 20000, 1, 1, temperature=temperature,
                   generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(out.flatten(), minlength=8).double()
    assert chi_square(counts, torch.softmax(logits / temperature, -1)) < 40
    assert chi_square(counts, torch.softmax(logits / (temperature * 1.5), -1)) > 150


def _fixed_uniforms(monkeypatch, u):
    monkeypatch.setattr(D, "_rand", lambda shape, generator, device, dtype=torch.float32:
                        torch.full(shape, u, dtype=dtype, device=device))


@pytest.mark.parametrize("logits,u,expected", [
    # exp(-1e4) is 0 in float64: tokens of zero probability are never drawn, at either end of [0, 1)
    ([-1e4, 0.0, -1e4, 0.0, 0.0, -1e4], 0.0, 1),
    ([-1e4, 0.0, -1e4, 0.0, 0.0, -1e4], 1.0 - 2.0 ** -53, 4),
    # u = 1 is outside torch.rand's range: the guard draws the last token of nonzero probability instead
    # of indexing past the vocabulary
    ([-1e4, 0.0, -1e4, 0.0, 0.0, -1e4], 1.0, 4),
    # p = 1.4e-11: the cumulative sum in float32 would round token 0's to 1 and never draw token 1
    ([0.0, -25.0], 1.0 - 1e-12, 1),
    ([0.0, -25.0], 1.0 - 2e-11, 0),
])
def test_sampler_draws_by_the_float64_cumulative_probability(monkeypatch, logits, u, expected):
    _fixed_uniforms(monkeypatch, u)
    assert D.sample(FixedLogits(logits), 3, 1, 1).flatten().tolist() == [expected] * 3


def test_sampler_never_draws_a_zero_probability_token():
    out = D.sample(FixedLogits([0.0, -1e4, 0.0, -1e4, 0.0, -1e4]), 4000, 1, 1,
                   generator=torch.Generator().manual_seed(0))
    assert set(out.flatten().tolist()) == {0, 2, 4}


def test_sampler_tiny_temperature_is_greedy():
    """logits / 1e-300 overflows to inf; shifted by the row max first, the argmax is drawn every time."""
    out = D.sample(FixedLogits([0.3, 0.9, -0.5, 0.899]), 50, 1, 1, temperature=1e-300,
                   generator=torch.Generator().manual_seed(0))
    assert (out == 1).all()


def test_confidence_is_the_probability_of_the_drawn_token(monkeypatch):
    """order="confidence" ranks positions by the log-probability of the token drawn there (LLaDA's
    low-confidence remasking), not by the position's most probable token. Position 0 is 0.9 / 0.1 and,
    with u = 0.95, draws the 0.1 token; position 1 is uniform over 4 tokens and draws one of p = 0.25:
    position 1 is the surer draw and is kept first, although position 0's best token is the likelier."""
    _fixed_uniforms(monkeypatch, 0.95)
    logits = torch.full((2, 8), -1e4)
    logits[0, :2] = torch.tensor([0.9, 0.1]).log()
    logits[1, :4] = 0.0
    seen = []

    class TwoRows(FixedLogits):
        def forward(self, tokens):
            seen.append(tokens.clone())
            return logits.expand(tokens.shape[0], 2, 8)

    out = D.sample(TwoRows(logits[0]), 1, 2, 2, order="confidence")
    assert seen[1].tolist() == [[8, 3]], "position 1 (its draw has p = 0.25, position 0's 0.1) kept first"
    assert out.tolist() == [[1, 3]]


def test_greedy_confidence_is_the_log_probability_not_the_logit(monkeypatch):
    """temperature 0 with order="confidence" ranks positions by the log-probability of their argmax, not by
    its raw logit. Position 0's logits are all 5 (best logit 5, probability 1/8); position 1's are 0 for
    token 3 and -30 elsewhere (best logit 0, probability ~1): position 1 is the surer one and is kept first."""
    logits = torch.full((2, 8), 5.0)
    logits[1] = -30.0
    logits[1, 3] = 0.0
    seen = []

    class TwoRows(FixedLogits):
        def forward(self, tokens):
            seen.append(tokens.clone())
            return logits.expand(tokens.shape[0], 2, 8)

    D.sample(TwoRows(logits[0]), 1, 2, 2, order="confidence", temperature=0.0)
    assert seen[1].tolist() == [[8, 3]], "position 1 (probability ~1) kept first, not position 0 (logit 5)"


def test_sampler_one_non_finite_logit_is_an_error():
    """A head with one inf row (a diverged token) makes one logit of each row inf, the others finite:
    still the clear error, not a draw from a NaN cumulative sum."""

    class OneBadToken(FixedLogits):
        def head_weight(self):
            head = torch.eye(self.vocab_size)
            head[1, 1] = math.inf
            return head

    with pytest.raises(ValueError, match=r"^model: expected finite logits, got NaN or inf at step 0"):
        D.sample(OneBadToken([0.5, 0.5, 0.5]), 2, 3, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_sampler_non_finite_logits_are_an_error(bad):
    """A diverged model's NaN or inf logits: a clear error, not an index past the vocabulary (on a GPU a
    device-side assert that would end the process's CUDA context)."""
    with pytest.raises(ValueError, match=r"^model: expected finite logits, got NaN or inf at step 0"):
        D.sample(FixedLogits([0.0, bad, 1.0]), 2, 3, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=0), r"^num_samples: expected an int >= 1, got 0"),
    (dict(length=0), r"^length: expected an int >= 1, got 0"),
    (dict(steps=0), r"^steps: expected an int >= 1, got 0"),
    (dict(order="left"), r"^order: expected one of 'confidence', 'random', got 'left'"),
    (dict(temperature=-1.0), r"^temperature: expected a finite number >= 0"),
    (dict(prompt=torch.tensor([1, 2, 3, 4, 5])), r"^prompt: expected at most length=4 tokens, got 5"),
    (dict(prompt=torch.tensor([1, 8])), r"^prompt: expected ids in \[0, 8\), got min 1, max 8"),
    (dict(prompt=torch.tensor([[1]])), r"^prompt: expected a 1-D int64 or int32 tensor"),
    (dict(prompt=torch.tensor([1.0])), r"^prompt: expected a 1-D int64 or int32 tensor .*, got torch.float32 \(1,\)"),
])
def test_sampler_bad_arguments(kwargs, message):
    args = dict(num_samples=1, length=4, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        D.sample(tiny_model(), args.pop("num_samples"), args.pop("length"), args.pop("steps"), **args)


# ---------------------------------------------------------------------------------------------------
# python -m lwt.generate
# ---------------------------------------------------------------------------------------------------

def write_checkpoint(path, model, source="text", **extra):
    """A checkpoint as lwt.generate reads it; extra: more keys (a resume state's phase, step, ...)."""
    cfg = Config(model=model.cfg, data=DataConfig(source=source))
    torch.save({"config": dataclasses.asdict(cfg), "model": model.trainable_state_dict(),
                "frozen_checksum": model.frozen_checksum(), **extra}, path)


def test_generate_text_checkpoint(tmp_path, monkeypatch, capsys):
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    sampled = []

    def recording_sample(*args, **kwargs):
        sampled.append(D.sample(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(generate, "sample", recording_sample)
    argv = ["--checkpoint", str(path), "--prompt", "Hi", "--length", "24", "--steps", "6", "--num_samples", "2",
            "--device", "cpu"]
    assert generate.main(argv) == 0
    out = capsys.readouterr().out
    (ids,) = sampled
    assert ids.shape == (2, 24) and (ids[:, :2] == torch.tensor([ord("H"), ord("i")])).all()
    texts = re.split(r"=== sample \d ===\n", out)[1:]
    assert len(texts) == 2
    for text, row in zip(texts, ids.tolist()):
        assert text == bytes(row).decode("utf-8", errors="replace") + "\n"
        assert text.startswith("Hi")


def test_generate_token_ids_checkpoint_prints_ids(tmp_path, capsys):
    model = tiny_model(vocab_size=50, seed=4, tie_embeddings=False)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model, source="dummy")
    assert generate.main(["--checkpoint", str(path), "--prompt", "7 49", "--length", "10", "--steps", "3",
                          "--order", "random", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "=== sample 0 ==="
    ids = [int(s) for s in lines[1].split()]
    assert len(ids) == 10 and ids[:2] == [7, 49] and all(0 <= i < 50 for i in ids)


def test_generate_expands_a_tilde_in_the_checkpoint_path(tmp_path, monkeypatch, capsys):
    """`--checkpoint=~/runs/default/final.pt`: the shell leaves a ~ after `=` as it is (as in --set
    train.out_dir=~/runs, which lwt.config expands)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_checkpoint(tmp_path / "final.pt", tiny_model(vocab_size=50, seed=4), source="dummy")
    assert generate.main(["--checkpoint=~/final.pt", "--length", "6", "--steps", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("=== sample 0 ===")


def test_generate_prints_what_stdouts_encoding_lacks_as_its_replacement(tmp_path, monkeypatch):
    """A byte model's samples hold U+FFFD and other non-ASCII characters: on a latin-1 stdout (a locale,
    PYTHONIOENCODING) print raised UnicodeEncodeError after the sampling. They print as '?' now."""
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    monkeypatch.setattr(generate, "sample", lambda *args, **kwargs: torch.tensor([[72, 0xE9, 0xFF, 0xE2, 0x82, 0xAC]]))
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1", errors="strict"))
    assert generate.main(["--checkpoint", str(path), "--length", "6", "--steps", "2", "--device", "cpu"]) == 0
    sys.stdout.flush()
    # H, then the invalid bytes 0xE9 0xFF (each U+FFFD, not in latin-1: '?'), then the euro sign (not in it)
    assert raw.getvalue() == b"=== sample 0 ===\nH???\n"


def test_generate_into_a_closed_pipe_stops_quietly(tmp_path):
    """`python -m lwt.generate ... | head -1`: a BrokenPipeError traceback once head had exited; now exit
    code 1 and nothing on stderr."""
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    cmd = [sys.executable, "-m", "lwt.generate", "--checkpoint", str(path), "--length", "64", "--steps", "1",
           "--num_samples", "2000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_generate_refuses_a_sample_larger_than_a_tensor(tmp_path, capsys):
    """--length 2**62 x 4 samples (or a length past int64) overflowed torch's size arithmetic: a
    RuntimeError or TypeError traceback. Now the usage error naming --length, as for any refused value."""
    model = tiny_model(vocab_size=50, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model, source="dummy")
    for length in (2**62, 2**63):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--checkpoint", str(path), "--length", str(length), "--num_samples", "4", "--device", "cpu"])
        assert exit_info.value.code == 2
        assert (f"error: --length: expected num_samples x length at most 2**62 tokens (what one tensor can hold), "
                f"got 4 x {length}") in capsys.readouterr().err


def test_generate_loads_the_trained_weights(tmp_path):
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    loaded, source = generate.load_checkpoint(str(path))
    assert source == "text" and not loaded.training
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


def test_generate_errors(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="no such file"):
        generate.load_checkpoint(str(missing))
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", str(missing)])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err

    model = tiny_model(vocab_size=256, frozen_seed=1)
    path = tmp_path / "bad.pt"
    cfg = dataclasses.asdict(Config(model=dataclasses.replace(model.cfg, frozen_seed=2)))
    stored = model.frozen_checksum()
    torch.save({"config": cfg, "model": model.trainable_state_dict(), "frozen_checksum": stored}, path)
    regenerated = tiny_model(vocab_size=256, frozen_seed=2).frozen_checksum()
    with pytest.raises(ValueError, match=f"frozen_seed=2 have checksum {regenerated}, but the checkpoint was "
                                         f"trained with {stored}"):
        generate.load_checkpoint(str(path))
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(path)])
    assert stored in capsys.readouterr().err

    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match=r"expected a dict with keys 'config', 'model' and 'frozen_checksum'"):
        generate.load_checkpoint(str(path))


def test_generate_refuses_a_directory_and_a_checkpoint_without_its_checksum(tmp_path, capsys):
    """A run's directory given as --checkpoint, and a dict lacking 'frozen_checksum': usage errors (exit 2)
    naming the problem, not an IsADirectoryError or KeyError traceback."""
    with pytest.raises(FileNotFoundError, match=r"is a directory; pass a checkpoint file in it \(final.pt, "):
        generate.load_checkpoint(str(tmp_path))
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "partial.pt"
    torch.save({"config": dataclasses.asdict(Config(model=model.cfg)), "model": model.trainable_state_dict()}, path)
    with pytest.raises(ValueError, match=r"expected a dict with keys 'config', 'model' and 'frozen_checksum', "
                                         r"got \['config', 'model'\]"):
        generate.load_checkpoint(str(path))
    for bad in (tmp_path, path):
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--checkpoint", str(bad), "--device", "cpu"])
        assert exit_info.value.code == 2


def test_generate_loads_a_bf16_checkpoint_in_fp32_on_the_cpu(tmp_path):
    """A checkpoint trained in bf16 (the CUDA default): the model is rebuilt in bf16, so the regenerated
    frozen matrices match the stored checksum, then cast to fp32 for the CPU: the same weights, upcast."""
    model = tiny_model(vocab_size=64, seed=4)
    bf16 = LWTModel(model.cfg, dtype=torch.bfloat16)
    bf16.load_trainable_state_dict({k: v.to(torch.bfloat16) for k, v in model.trainable_state_dict().items()})
    path = tmp_path / "final.pt"
    write_checkpoint(path, bf16, source="dummy")
    loaded, _ = generate.load_checkpoint(str(path))
    state = loaded.trainable_state_dict()
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values() if v.is_floating_point())
    for key, value in bf16.trainable_state_dict().items():
        assert torch.equal(state[key], value.float()), key


def test_generate_passes_its_flags_to_the_sampler(tmp_path, monkeypatch, capsys):
    """--num_samples, --length, --steps, --order and --temperature reach diffusion.sample as given."""
    model = tiny_model(vocab_size=50, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model, source="dummy")
    calls = []

    def recording_sample(model, num_samples, length, steps, **kwargs):
        calls.append((num_samples, length, steps, kwargs["order"], kwargs["temperature"]))
        return D.sample(model, num_samples, length, steps, **kwargs)

    monkeypatch.setattr(generate, "sample", recording_sample)
    assert generate.main(["--checkpoint", str(path), "--num_samples", "2", "--length", "5", "--steps", "3",
                          "--order", "confidence", "--temperature", "0", "--device", "cpu"]) == 0
    assert calls == [(2, 5, 3, "confidence", 0.0)]
    assert capsys.readouterr().out.count("=== sample") == 2


@pytest.mark.parametrize("flags,message", [
    (["--length", "0"], "--length: expected an int >= 1, got 0"),
    (["--steps", "0"], "--steps: expected an int >= 1, got 0"),
    (["--num_samples", "0"], "--num_samples: expected an int >= 1, got 0"),
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
    (["--length", "3", "--prompt", "7 8 9 10"], "--prompt: expected at most length=3 tokens, got 4"),
    (["--prompt", "7 999"], "--prompt: ids must be in [0, 50), got 999")])
def test_generate_names_the_flag_the_sampler_refused(tmp_path, capsys, flags, message):
    model = tiny_model(vocab_size=50, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model, source="dummy")
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", str(path), "--device", "cpu", *flags])
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("name,ok", [("cuda:0", True), ("cuda", True), ("cuda:1", False)])
def test_generate_device_index_past_the_gpu_count(monkeypatch, capsys, name, ok):
    """On a machine with one GPU, cuda:1 is a usage error; cuda and cuda:0 are that GPU (no CUDA needed:
    the count is faked and no tensor is made)."""
    with monkeypatch.context() as fake:  # undone before the fixtures' teardown, which asks torch.cuda too
        fake.setattr(torch.cuda, "is_available", lambda: True)
        fake.setattr(torch.cuda, "device_count", lambda: 1)
        if ok:
            assert generate._device(generate._parser(), name) == torch.device(name)
            return
        with pytest.raises(SystemExit) as exit_info:
            generate._device(generate._parser(), name)
    assert exit_info.value.code == 2
    assert "'cuda:1' asked for, but this machine has 1 CUDA GPU(s)" in capsys.readouterr().err


def test_generate_unreadable_checkpoints_are_value_errors(tmp_path, capsys):
    """A file that is not a torch checkpoint, one cut short, one holding code and one whose parts have
    the wrong types: each a ValueError naming the file, and a usage error (exit 2) from the command."""
    model = tiny_model(vocab_size=256, seed=4)
    good = tmp_path / "good.pt"
    write_checkpoint(good, model)
    # text starting with s (or t, r, e, h, ...) fails inside the unpickler as IndexError / KeyError
    cases = {"garbage.pt": b"not a checkpoint", "notes.pt": b"stage 0: NELBO 2.3\n", "cut.pt": good.read_bytes()[:3000]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"config": {}, "model": [], "frozen_checksum": "x"}, tmp_path / "list.pt")
    torch.save(argparse.Namespace(model=1), tmp_path / "code.pt")  # an arbitrary class: weights_only refuses it
    for name, message in [("garbage.pt", r"not a readable checkpoint \(not a torch checkpoint, or a damaged one\)"),
                          ("notes.pt", r"not a readable checkpoint \(not a torch checkpoint, or a damaged one\)"),
                          ("cut.pt", r"not a readable checkpoint \(a damaged file: "),
                          ("code.pt", r"not a readable checkpoint \(it holds objects other than weights"),
                          ("list.pt", "expected 'config' and 'model' to be dicts")]:
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(repr(path))}: {message}"):
            generate.load_checkpoint(path)
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--checkpoint", path, "--device", "cpu"])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def _resume_state(phase, step, n_layers=3, joint_steps=2, end_to_end=False):
    """The fields of a trainer's checkpoint.pt that trained_depth reads (max_steps 5 per stage)."""
    cfg = Config(model=tiny_model(vocab_size=256, n_layers=n_layers).cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=5, joint_steps=joint_steps))
    return {"config": dataclasses.asdict(cfg), "phase": phase, "step": step, "end_to_end": end_to_end}


@pytest.mark.parametrize("phase,step,kwargs,depth", [
    (0, 3, {}, 1), (0, 5, {}, 1), (1, 0, {}, 1), (1, 2, {}, 2), (2, 0, {}, 2),  # stages: the blocks trained so far
    (0, 0, {}, 0),                                                           # nothing trained yet
    (2, 1, {}, None), (3, 1, {}, None), (4, 0, {}, None),           # the last stage, joint, finished: every block
    (3, 0, {"joint_steps": 0, "end_to_end": True}, None),           # end-to-end (no joint phase)
    (1, 3, {"n_layers": 2}, None)])
def test_generate_depth_of_a_resume_state(phase, step, kwargs, depth):
    """A checkpoint.pt written during stage k samples through the blocks trained so far, as that stage's
    validation does; a note says which and why. Joint, end-to-end and finished runs use every block."""
    got, note = generate.trained_depth(_resume_state(phase, step, **kwargs), "ck.pt")
    assert got == depth
    if depth is None:
        assert note is None
    elif depth == 0:
        assert "no block is trained yet" in note
    else:
        when = f"during stage {phase} (step {step} of 5)" if step else f"at the end of stage {phase - 1}"
        assert note.startswith(f"ck.pt was written {when}: sampling through blocks 0..{depth - 1}")
        assert f"blocks {depth}..2 are not trained yet" in note
    assert generate.trained_depth({"config": {}, "model": {}, "frozen_checksum": ""}, "final.pt") == (None, None)


@pytest.mark.parametrize("phase,step,when", [(4, 3, "during the end-to-end phase (step 3 of 17)"),
                                             (5, 0, "after the end-to-end phase")])
def test_generate_notes_a_resume_state_holding_the_end_to_end_model(phase, step, when):
    """Written during (or after) the --end_to_end phase, checkpoint.pt holds the comparison model trained
    from scratch, not the layer-wise one: sampled silently, it read as a barely trained layer-wise model.
    At that phase's step 0 it still holds the layer-wise model (no note)."""
    got, note = generate.trained_depth(_resume_state(phase, step, end_to_end=True), "ck.pt")
    assert got is None and note == (f"ck.pt was written {when}: this is the --end_to_end comparison model, "
                                    f"trained from scratch for {step if phase == 4 else 'all'} of its steps, "
                                    f"not the layer-wise model (final.pt)")
    assert generate.trained_depth(_resume_state(4, 0, end_to_end=True), "ck.pt") == (None, None)


@pytest.mark.parametrize("field,value", [("phase", -1), ("phase", "1"), ("step", None), ("step", True)])
def test_generate_depth_of_a_damaged_resume_state(field, value):
    state = {**_resume_state(1, 2), field: value}
    with pytest.raises(ValueError, match=rf"^checkpoint 'ck.pt': expected '{field}' to be an int >= 0, got"):
        generate.trained_depth(state, "ck.pt")


def test_generate_samples_a_mid_stage_checkpoint_through_its_trained_blocks(tmp_path, monkeypatch, capsys):
    """generate.main passes the depth to the sampler, which runs model(x, n_blocks=depth)."""
    model = tiny_model(vocab_size=256, seed=4, n_layers=3)
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(path, model, phase=1, step=2, end_to_end=False)  # stage 1 of 3, after 2 of its steps
    depths, forward = [], LWTModel.forward

    def recording_forward(self, tokens, n_blocks=None):
        depths.append(n_blocks)
        return forward(self, tokens, n_blocks)

    monkeypatch.setattr(LWTModel, "forward", recording_forward)
    argv = ["--checkpoint", str(path), "--length", "6", "--steps", "2", "--device", "cpu", "--seed", "3"]
    assert generate.main(argv) == 0
    captured = capsys.readouterr()
    assert depths == [2, 2] and "note: " in captured.err and "blocks 0..1, as that stage's validation" in captured.err
    monkeypatch.setattr(LWTModel, "forward", forward)
    loaded, _ = generate.load_checkpoint(str(path))
    want = D.sample(loaded, 1, 6, 2, generator=torch.Generator().manual_seed(3), n_blocks=2)
    assert captured.out.splitlines()[1] == bytes(want[0].tolist()).decode("utf-8", errors="replace")


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 57600000000 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 57600000000 bytes.\nException raised from alloc_cpu at alloc_cpu.cpp:127 (most recent "
                 "call first):\nframe #0: c10::Error::Error"),  # TORCH_SHOW_CPP_STACKTRACES=1: its first line shown
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 53.64 GiB.")])
def test_generate_samples_too_large_for_memory_are_a_usage_error(tmp_path, monkeypatch, capsys, error):
    """An allocation that fails while sampling (a --length whose reference attention scores do not fit)
    exits 2 naming --length and --num_samples; any other RuntimeError passes through."""
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    argv = ["--checkpoint", str(path), "--length", "60000", "--num_samples", "3", "--device", "cpu"]

    def failing_sample(*args, **kwargs):
        raise error

    monkeypatch.setattr(generate, "sample", failing_sample)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "error: --length 60000 x --num_samples 3: sampling needs more memory than cpu has" in err
    assert str(error).splitlines()[0] in err and "ask for fewer or shorter samples" in err
    error = RuntimeError("expected scalar type Float but found Half")
    with pytest.raises(RuntimeError, match="expected scalar type"):
        generate.main(argv)


@pytest.mark.parametrize("device,message", [("bogus", "expected auto, cpu, cuda or cuda:N, got 'bogus'"),
                                            ("meta", "expected auto, cpu, cuda or cuda:N, got 'meta'"),
                                            ("cuda:99", "'cuda:99' asked for, but this machine has")])
def test_generate_device_errors(tmp_path, capsys, device, message):
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", str(path), "--device", device])
    assert exit_info.value.code == 2 and f"--device: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_generate_seed_range(capsys, seed):
    """--seed seeds a torch.Generator, which takes [0, 2**64): -1 would silently mean 2**64 - 1."""
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", "unused.pt", "--seed", seed])
    assert exit_info.value.code == 2 and "--seed: expected an int in [0, 2**64)" in capsys.readouterr().err


def test_generate_prompt_bytes_from_a_non_utf8_command_line(tmp_path, capsys):
    """Python decodes command-line bytes that are not UTF-8 to escaped characters; a byte-level model gets
    the bytes themselves back."""
    model = tiny_model(vocab_size=256, seed=4)
    path = tmp_path / "final.pt"
    write_checkpoint(path, model)
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # Latin-1 "café" as it arrives in sys.argv
    assert generate.main(["--checkpoint", str(path), "--prompt", prompt, "--length", "8", "--steps", "2",
                          "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()[1]
    assert out.startswith("caf\ufffd")  # the byte 0xe9 kept, shown as the replacement character


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.5])
def test_masking_rates_outside_the_unit_interval_are_refused(bad):
    """A t outside [0, 1] (or 0 for the elbo weight 1/t) is a ValueError naming t, not a mask drawn with a
    rate that is no probability or a negative or infinite NELBO."""
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^t: expected masking rates in \[0, 1\]"):
        D.mask_tokens(tokens, torch.tensor([bad, 0.5]), 9)
    hidden, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    # 1e-39 is a float32 subnormal (1/t overflows), and 1e-300 in float64 is 0 in float32
    for t in (torch.tensor([bad, 0.5]), torch.tensor([0.0, 0.5]), torch.tensor([1e-39, 0.5]),
              torch.tensor([1e-300, 0.5], dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"^t: expected masking rates in \(0, 1\], at least 1.18e-38 "):
            D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, t, "elbo")
    D.masked_diffusion_loss(hidden, w, TOY_TOKENS, TOY_MASK, torch.tensor([0.0, 0.5]), "uniform")
    # float64 hidden (the reference path's float64 loss) computes 1/t in float64: 1e-300 is a weight there
    loss = D.masked_diffusion_loss(hidden.double(), w.double(), TOY_TOKENS, TOY_MASK,
                                   torch.tensor([1e-300, 0.5], dtype=torch.float64), "elbo")
    assert torch.isfinite(loss)


def test_evaluate_nelbo_is_unbiased_and_low_variance_for_a_context_free_model():
    """A 'model' predicting a fixed distribution p at every masked position has NELBO exactly the tokens'
    mean -log p (E_t[(1/t) · E|masked|] = L). The estimate at the trainer's default size (8 batches of
    16 x 128) must be that, within its noise, and that noise small beside the table's 4 decimals: a
    Bernoulli(t) mask weighted 1/t carries the Binomial noise of the masked count (seed-to-seed std 0.03
    nats here; the default eval_seed put a context-free model 0.15 nats under its bound), the exact-count
    form (LLaDA eq. 6) does not."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02], dtype=torch.float64)
    batches = [torch.multinomial(p, 16 * 128, replacement=True, generator=gen).reshape(16, 128) for _ in range(8)]
    head = p.log()[:, None]  # (V, 1): logits = log p for a hidden state of 1
    exact = torch.cat([-p.log()[b.reshape(-1)] for b in batches]).mean().item()
    est = [D.evaluate_nelbo(lambda noisy: torch.ones(*noisy.shape, 1, dtype=torch.float64), head, batches,
                            mask_id=7, seed=seed)["nelbo"] for seed in range(40)]
    mean = sum(est) / len(est)
    std = (sum((e - mean) ** 2 for e in est) / (len(est) - 1)) ** 0.5
    assert abs(mean - exact) < 4 * std / len(est) ** 0.5 + 1e-9
    assert std < 0.02, std


def test_evaluate_nelbo_under_a_default_device_and_a_bad_mask_id():
    """evaluate_nelbo draws its masks from its CPU generator whatever the default device (inside `with
    torch.device("cuda")` the default device's rand refuses a CPU generator; meta stands in for it here),
    and checks mask_id as mask_tokens did before the exact-count masks."""
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 8, (3, 5), generator=torch.Generator().manual_seed(2))
    hidden_fn = lambda noisy: w[noisy.clamp(max=7)].to("cpu")  # (B, S, 4), CPU whatever the default device
    want = D.evaluate_nelbo(hidden_fn, w, [tokens], mask_id=7, seed=0)
    with torch.device("meta"):
        assert D.evaluate_nelbo(hidden_fn, w, [tokens], mask_id=7, seed=0) == want
    for bad in (-1, True, 2.5, None):
        with pytest.raises(ValueError, match=r"^mask_id: expected an int >= 0"):
            D.evaluate_nelbo(hidden_fn, w, [tokens], mask_id=bad, seed=0)
