"""Masked (absorbing-state) diffusion over tokens: the training objective, its evaluation, and the
iterative-unmasking sampler. MDLM (Sahoo et al. 2024, arXiv:2406.07524) and LLaDA (Nie et al. 2025,
arXiv:2502.09992).

Forward process, linear schedule: at time t ∈ (0, 1] every token of a sequence x (length L) is replaced by
[MASK] independently with probability t. The model sees the noisy sequence z_t (bidirectional attention)
and predicts the original token at every masked position; the head has no [MASK] logit, and unmasked
positions are simply copied (MDLM's "carry-over" parameterisation). The continuous-time ELBO is then

    -log p_θ(x) <= E_{t ~ U(0,1]} E_{z_t} [ (1/t) Σ_{ℓ masked in z_t} -log p_θ(x^ℓ | z_t) ]

(MDLM eq. 10 with α_t = 1 - t, whose weight -α'_t / (1 - α_t) is 1/t; LLaDA eq. 3). Divided by L it bounds
the per-token negative log-likelihood: `elbo` weighting trains on this estimator with t drawn from
(mask_fraction_min, mask_fraction_max] (the bound itself when that range is (0, 1]; evaluate_nelbo always
estimates the bound, in its equivalent count form: LLaDA eq. 6), `uniform` on the plain mean cross entropy
of the masked tokens (MLM-style, not a bound).
"""
from __future__ import annotations

import math

import torch

from . import functional as F
from .config import LOSS_WEIGHTINGS as WEIGHTINGS
from .data import entropy_of_counts

ORDERS = ("confidence", "random")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_tokens(tokens, name: str = "tokens") -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{name}: expected an int64 or int32 (batch, seq) tensor of token ids, got {got}")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None (the global RNG), got {generator!r}")


def _check_t(t, batch: int, positive: torch.dtype | None = None, in_range: torch.Tensor | None = None) -> None:
    """t: (batch,) floats in [0, 1], or, where `positive` (the dtype the elbo weight 1/t is computed in), in
    (0, 1] and at least that dtype's smallest normal number, so that 1/t is finite. The range is read on the
    host: free for the CPU tensors sample_t returns. A caller that syncs anyway passes in_range =
    _t_in_range(t, positive) computed before its sync, and calls this after it, so reading adds none."""
    _check_t_shape(t, batch)
    ok = _t_in_range(t, positive) if in_range is None else in_range
    if not bool(ok.all()):  # NaN fails both bounds
        expected = "[0, 1]" if positive is None else (
            f"(0, 1], at least {torch.finfo(positive).tiny:.3g} ({str(positive)[6:]}'s smallest normal: "
            f"the elbo weight 1/t stays finite)")
        raise ValueError(f"t: expected masking rates in {expected}, got {t[~ok][0].item()}")


def _check_t_shape(t, batch: int) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (batch,):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t: expected a float tensor of shape ({batch},) (one masking rate per sequence), got {got}")


def _t_in_range(t: torch.Tensor, positive: torch.dtype | None) -> torch.Tensor:
    """(batch,) bool on t's device: t in [0, 1], or in [tiny, 1] for the smallest normal `tiny` of the dtype
    `positive` (t as that dtype: a float64 t of 1e-300 is 0 in float32)."""
    if positive is None:
        return (t >= 0) & (t <= 1)
    t = t.to(positive)
    return (t >= torch.finfo(positive).tiny) & (t <= 1)


def _rand(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1) drawn on the generator's device (so a CPU generator gives the same numbers
    whatever device the model is on), returned on `device`."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where, dtype=dtype).to(device)


def sample_t(batch: int, t_min: float, t_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masking rates for a batch, stratified: with one offset u ~ U[0, 1),
    t_i = t_min + (t_max - t_min) · (i + 1 - u) / batch, then shuffled. Each of the `batch` equal strata of
    (t_min, t_max] holds exactly one t, which cuts the variance of the batch's loss against i.i.d. draws
    (MDLM's low-discrepancy sampler, arXiv:2406.07524 §3.5, uses t_i = (i + u) / batch mod 1; the
    1 - u form here keeps t > t_min, so t is never 0 even when t_min is, and 1/t stays finite).

    Args:
        batch: number of sequences (>= 1). t_min, t_max: 0 <= t_min <= t_max <= 1, t_max at least float32's
            smallest normal number (1.18e-38).
        generator: torch.Generator (None: the global RNG); the numbers are drawn on its device.
    Returns:
        (batch,) float32 on the generator's device (CPU without one): values in (t_min, t_max] (all t_max
        when t_min == t_max) computed in float64, then rounded to float32 (which may round one onto t_min),
        and raised to float32's smallest normal number where they fall below it (with t_min 0, a t that
        rounding would make subnormal or 0, whose 1/t overflows).
    """
    _check_int(batch, "batch", 1)
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
    tiny = torch.finfo(torch.float32).tiny
    if not 0.0 <= t_min <= t_max <= 1.0 or t_max < tiny:
        raise ValueError(f"t_min, t_max: expected 0 <= t_min <= t_max <= 1 and t_max >= {tiny:.3g} (float32's "
                         f"smallest normal: the elbo weight 1/t stays finite), got {t_min}, {t_max}")
    _check_generator(generator)
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    strata = (torch.arange(batch, device=device, dtype=torch.float64) + 1.0 - u) / batch  # (batch,) in (0, 1]
    t = t_min + (t_max - t_min) * strata
    perm = torch.randperm(batch, generator=generator, device=device)
    return t[perm].to(torch.float32).clamp_min_(tiny)


def mask_tokens(tokens: torch.Tensor, t: torch.Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process: every token of sequence b becomes mask_id with probability t[b].

    Args:
        tokens: (B, S) int64 ids. t: (B,) float masking rates in [0, 1]. mask_id: the [MASK] id.
        generator: torch.Generator (None: the global RNG); the uniforms are drawn on its device.
    Returns:
        noisy (B, S) int64 with mask_id where masked, and mask (B, S) bool, both on tokens' device.
    """
    _check_tokens(tokens)
    _check_t(t, tokens.shape[0])
    _check_int(mask_id, "mask_id", 0)
    _check_generator(generator)
    # float64 uniforms: P(r < t) = t up to float64 rounding (float32 ones sit on a 2^-24 grid, which would
    # turn every t below 6e-8 into 6e-8 while the elbo weight is still 1/t)
    r = _rand(tokens.shape, generator, tokens.device, torch.float64)  # (B, S) in [0, 1)
    mask = r < t.to(device=tokens.device, dtype=torch.float64)[:, None]  # (B, S)
    return tokens.masked_fill(mask, mask_id), mask


def masked_diffusion_loss(hidden: torch.Tensor, head_weight: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                          t: torch.Tensor, weighting: str = "elbo") -> torch.Tensor:
    """Cross entropy of the masked positions only; the logits of unmasked positions are never computed.

    Args:
        hidden: (B, S, D) final hidden states of the noisy sequence (the model's forward()).
        head_weight: (V, D), hidden's dtype: the tied embedding without its [MASK] row.
        tokens: (B, S) the clean ids (targets), in [0, V) at the masked positions (there is no ignored id:
            leave padding unmasked). mask: (B, S) bool, True where the input was masked.
        t: (B,) the masking rate each sequence was drawn with, in (0, 1] for "elbo", where 1/t must be finite
            in fp32 (float64 for float64 hidden): t at least that dtype's smallest normal number, 1.18e-38 in
            fp32 ([0, 1] for "uniform").
        weighting: "elbo": Σ_masked (1/t) · CE / (B·S), the MDLM/LLaDA NELBO estimate per token (every token
            counts in the denominator, masked or not); "uniform": Σ_masked CE / M, the mean over the M
            masked tokens.
    Returns:
        fp32 scalar (float64 for float64 inputs, on the reference path). With no masked token at all, a
        zero that still depends on hidden and head_weight, so backward runs (and gives zero gradients).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {', '.join(map(repr, WEIGHTINGS))}, got {weighting!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden: expected (batch, seq, d_model), got {got}")
    B, S, _ = hidden.shape
    _check_tokens(tokens)
    if tuple(tokens.shape) != (B, S):
        raise ValueError(f"tokens: expected shape {(B, S)} (the leading dims of hidden), got {tuple(tokens.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (B, S):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor of shape {(B, S)}, got {got}")
    _check_t_shape(t, B)
    weight_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 path: 1/t in float64
    positive = weight_dtype if weighting == "elbo" else None
    in_range = _t_in_range(t, positive)  # read after the masked positions' sync below
    # The masked positions, found once (one host sync; boolean indexing would sync for each gather).
    flat = mask.reshape(-1).nonzero().squeeze(1)  # (M,), row-major: hidden[mask]'s order
    _check_t(t, B, positive, in_range)
    M = flat.shape[0]
    if M == 0:
        # the cross entropy of no rows: validates head_weight as any other batch would, and is an exact 0
        # (a 16-bit hidden.sum() · 0 would be NaN once the sum overflows)
        return F.linear_cross_entropy(hidden.reshape(B * S, hidden.shape[-1])[:0], head_weight,
                                      tokens.reshape(-1)[:0], reduction="sum")
    rows = hidden.reshape(B * S, -1).index_select(0, flat)  # (M, D): only these reach the head
    targets = tokens.reshape(-1).index_select(0, flat)  # (M,)
    if weighting == "uniform":
        return _masked_cross_entropy(rows, head_weight, targets, flat, S) / M
    inv_t = (1.0 / t.to(device=hidden.device, dtype=weight_dtype)).index_select(0, flat // S)  # (M,)
    return _masked_cross_entropy(rows, head_weight, targets, flat, S, token_weight=inv_t) / (B * S)


def _masked_cross_entropy(rows, head_weight, targets, flat, S: int, token_weight=None) -> torch.Tensor:
    """Σ (token_weight ·) CE over the masked rows, every one a target. A -100 id (PyTorch's padding
    convention, linear_cross_entropy's ignore_index) was dropped from the sum while B·S or M still counted
    it: it reaches the op as V, out of range like any other id outside [0, V) (no id is ignored, and no
    sync is added). In eager mode the op's refusal becomes a ValueError naming `tokens` and the (batch,
    seq) position of the first bad id (compiled, the op's own error comes out)."""
    V = head_weight.shape[0] if isinstance(head_weight, torch.Tensor) and head_weight.dim() == 2 else None
    kept = targets if V is None else targets.masked_fill(targets == -100, V)  # (None: the op names weight)
    try:
        return F.linear_cross_entropy(rows, head_weight, kept, token_weight=token_weight, reduction="sum")
    except ValueError as e:
        bad = ((targets < 0) | (targets >= V)).nonzero().squeeze(1) if V is not None else targets[:0]
        if not str(e).startswith("target:") or bad.numel() == 0:
            raise
        i = int(bad[0])
        b, s = divmod(int(flat[i]), S)
        raise ValueError(f"tokens: expected ids in [0, {V}) (the head's rows) at the masked positions, got "
                         f"{int(targets[i])} at position ({b}, {s}) ({bad.numel()} such)") from None


def _exact_count_mask(batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """evaluate_nelbo's masks: n_b masked positions in row b, n_b uniform on {1, ..., seq} (one per stratum
    of the batch, shuffled), the positions a uniformly random subset. Returns t = n / seq (batch,) float64
    and mask (batch, seq) bool, on the CPU generator's device."""
    strata = sample_t(batch, 0.0, 1.0, generator).double()  # (batch,) in (0, 1], stratified and shuffled
    n = (strata * seq).ceil().clamp_(1, seq).long()  # (batch,) uniform on {1, ..., seq}
    # (on the generator's device, not the default one: inside `with torch.device("cuda")` the default
    # device's rand refuses a CPU generator)
    order = _rand((batch, seq), generator, generator.device, torch.float64).argsort(1)  # a random permutation
    # the first n of each row's permutation are masked (one sort; the same mask as ranks < n, ranks its inverse)
    first_n = torch.arange(seq, device=order.device) < n[:, None]
    return n.double() / seq, torch.zeros_like(first_n).scatter_(1, order, first_n)


@torch.no_grad()
def evaluate_nelbo(hidden_fn, head_weight: torch.Tensor, batches, mask_id: int, seed: int) -> dict:
    """Monte Carlo estimate of the continuous-time NELBO per token, in nats.

    Why it bounds the NLL: with masking rate t ~ U(0, 1] (the whole range, whatever training used),
    -log p_θ(x) <= E_t E_{z_t} [(1/t) Σ_{ℓ masked} -log p_θ(x^ℓ | z_t)] (MDLM eq. 10, LLaDA eq. 3; see the
    module docstring), where p_θ(x) is the likelihood of the model's own reverse process (unmask, carry
    unmasked tokens over). Dividing by the L tokens gives an upper bound on the per-token NLL, and
    exp(nelbo) one on the perplexity of that generative model. Each sequence of length L is scored once,
    with the equivalent count form of that expectation (LLaDA eq. 6): n masked positions, n uniform on
    {1, ..., L} (stratified across the batch, shuffled), chosen uniformly at random, weighted L/n (1/t at
    t = n/L). Integrating 1/t · Binomial(n; L, t) over t gives 1/n, so it estimates the same bound without
    bias, but without the Binomial noise of the masked count around tL that a Bernoulli(t) mask weighted
    1/t carries (about 3x less standard deviation at the default 8 x 16 x 128 tokens). It is comparable
    across runs, but is not an autoregressive perplexity.

    Args:
        hidden_fn: noisy tokens (B, S) -> final hidden states (B, S, D) (e.g. an LWTModel).
        head_weight: (V, D), the head (LWTModel.head_weight()).
        batches: iterable of (B, S) int64 clean token batches (ids in [0, V)).
        mask_id: the [MASK] id.
        seed: an int in [0, 2**64): seeds one CPU torch.Generator for every t and mask, so evaluations see
            identical masks.
    Returns:
        dict(nelbo=nats per token, ppl_bound=exp(nelbo), tokens=number of tokens scored).
    """
    _check_int(mask_id, "mask_id", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64) (a torch.Generator seed), got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i, tokens in enumerate(batches):
        _check_tokens(tokens, f"batches[{i}]")
        B, S = tokens.shape
        if B * S == 0:  # nothing to score (and sample_t needs B >= 1)
            continue
        t, mask = _exact_count_mask(B, S, generator)  # (B,) = n / S, (B, S) with n masked per row
        mask = mask.to(tokens.device)
        noisy = tokens.masked_fill(mask, mask_id)
        hidden = hidden_fn(noisy)  # (B, S, D)
        try:
            loss = masked_diffusion_loss(hidden, head_weight, tokens, mask, t, "elbo")
        except ValueError as e:  # (its `tokens` is this batch; a shape it names is hidden_fn's doing)
            if not str(e).startswith("tokens: expected ids in "):
                raise
            raise ValueError(f"batches[{i}]: {str(e)[len('tokens: '):]}") from None
        total += loss.item() * (B * S)
        count += B * S
    if count == 0:
        raise ValueError("batches: expected at least one non-empty batch of tokens")
    nelbo = total / count
    return dict(nelbo=nelbo, ppl_bound=math.exp(min(nelbo, 700.0)), tokens=count)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the empirical token distribution of `tokens`: the loss of a model that ignores
    context, printed beside the NELBO as a yardstick.

    Args:
        tokens: integer ids >= 0, any shape and device (counted on the CPU).
    Returns:
        The entropy in nats, a Python float (0 for an empty tensor).
    Raises:
        RuntimeError: a negative id (torch.bincount's error).
    """
    return entropy_of_counts(torch.bincount(tokens.reshape(-1).long().cpu()).numpy())


@torch.no_grad()
def sample(model, num_samples: int, length: int, steps: int, *, order: str = "random",
           prompt: torch.Tensor | None = None, temperature: float = 1.0,
           generator: torch.Generator | None = None, n_blocks: int | None = None) -> torch.Tensor:
    """Iterative unmasking (MDLM/LLaDA reverse process): start from all [MASK] (after the prompt) and, over
    `steps` steps, fill in ceil(remaining / steps_left) positions of every sequence per step.

    At each step every still-masked position draws a token from softmax(logits / temperature) by inverse
    transform sampling in float64: one uniform u per position, the first token whose cumulative
    probability exceeds u. Low-precision sampling truncates the tail and measurably hurts masked-diffusion
    samples (Zheng et al. 2024, arXiv:2409.02908, about float32 Gumbel noise); float64 reaches every token
    whose probability exceeds ~1e-16 of the total. One uniform per position (not one per vocabulary entry,
    as the Gumbel-max trick needs) keeps a CPU generator cheap at any vocabulary size. Then
    order="confidence" keeps the draws the model is surest of (highest log-probability of the drawn
    token; LLaDA's low-confidence remasking), order="random" (the default) a uniformly random subset; the
    others stay masked for the next step. Unmasked tokens are never changed. Random is the default
    because confidence order degenerates with small models: the most frequent token (a space, in byte
    text) is always the surest draw, so it fills most positions first and the rest then follows it.

    Logits = final hidden @ head_weight()ᵀ, in fp32 on the model's device, for the still-masked positions
    only: this is the one place logits are materialised ((num_samples · masked) × V per step), so keep
    the batch small. [MASK] has no logit (the head excludes it) and is never produced.

    Args:
        model: an LWTModel (uses forward(), head_weight(), mask_id, vocab_size).
        num_samples, length, steps: >= 1, num_samples · length <= 2**62; length counts the prompt.
        order: "random" (default) | "confidence".
        prompt: optional 1-D int64 or int32 tensor of ids in [0, vocab_size), len <= length, kept at the start.
        temperature: >= 0; 0 is greedy (argmax, confidence = its log-probability).
        generator: torch.Generator for the token and order draws (None: the global RNG), on the CPU or
            the model's device.
        n_blocks: run the model's first n_blocks blocks only (model(x, n_blocks=...), as a layer-wise
            stage's validation does); None: model(x), every block.
    Returns:
        (num_samples, length) int64 on the model's device, every id in [0, vocab_size).
    """
    _check_int(num_samples, "num_samples", 1)
    _check_int(length, "length", 1)
    _check_int(steps, "steps", 1)
    if num_samples * length > 2**62:  # (torch's own errors here: an overflowed storage size, or a TypeError)
        raise ValueError(f"length: expected num_samples x length at most 2**62 tokens (what one tensor can hold), "
                         f"got {num_samples} x {length}")
    _check_generator(generator)
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy), got {temperature!r}")
    head = model.head_weight()
    device, V, mask_id = head.device, model.vocab_size, model.mask_id
    P = 0
    if prompt is not None:
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
            got = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"prompt: expected a 1-D int64 or int32 tensor of token ids, got {got}")
        P = prompt.numel()
        if P > length:
            raise ValueError(f"prompt: expected at most length={length} tokens, got {P}")
        if P and not (0 <= int(prompt.min()) and int(prompt.max()) < V):
            raise ValueError(f"prompt: expected ids in [0, {V}), got min {int(prompt.min())}, max {int(prompt.max())}")
    x = torch.full((num_samples, length), mask_id, dtype=torch.int64, device=device)  # (N, L)
    if P:
        x[:, :P] = prompt.to(device=device, dtype=torch.int64)
    was_training = model.training
    model.eval()
    head_t = head.float().t()  # (D, V), converted once for every step
    try:
        remaining = length - P  # masked positions per sequence (the same in every row)
        for step in range(steps):
            if remaining == 0:
                break
            k = -(-remaining // (steps - step))  # ceil: equal shares; the last step unmasks the rest
            masked = x == mask_id  # (N, L)
            where = masked.nonzero(as_tuple=True)  # found once (one host sync), row-major: sequence by sequence
            hidden = model(x) if n_blocks is None else model(x, n_blocks=n_blocks)  # (N, L, D)
            rows = hidden[where].float()  # (N · remaining, D)
            logits = (rows @ head_t).double()  # (N · remaining, V)
            if not bool(torch.isfinite(logits).all()):
                raise ValueError(f"model: expected finite logits, got NaN or inf at step {step} (diverged weights?)")
            if temperature == 0:
                logp = torch.log_softmax(logits, dim=-1)
                conf, draw = logp.max(dim=-1)
            else:
                # shifted by the row max first: a tiny temperature then sends the rest to -inf, never to NaN
                logits -= logits.amax(dim=-1, keepdim=True)
                logp = torch.log_softmax(logits / temperature, dim=-1)
                cdf = logp.exp().cumsum_(dim=-1)  # (N · remaining, V)
                u = _rand(cdf.shape[:1], generator, device, torch.float64)  # (N · remaining,)
                # the first index whose cdf exceeds u · total, so a token of zero probability is never drawn;
                # u < 1 keeps u · total below the total, and the minimum (the last token of nonzero
                # probability) guards the index should it ever round up to it
                total = cdf[:, -1:].contiguous()  # (N · remaining, 1)
                draw = torch.minimum(torch.searchsorted(cdf, u[:, None] * total, right=True),
                                     torch.searchsorted(cdf, total)).squeeze(1)  # (N · remaining,)
                conf = logp.gather(1, draw[:, None]).squeeze(1)
            if order == "random":
                conf = _rand(conf.shape, generator, device, torch.float64)
            score = torch.full(x.shape, -math.inf, dtype=torch.float64, device=device)  # (N, L)
            score[where] = conf
            proposal = x.clone()
            proposal[where] = draw
            keep = score.topk(k, dim=1).indices  # (N, k): all among the masked positions (score > -inf)
            x.scatter_(1, keep, proposal.gather(1, keep))
            remaining -= k
    finally:
        model.train(was_training)
    return x
