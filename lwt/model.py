"""The decoder stack: token embedding (with one extra [MASK] row), DecoderBlocks, final RMSNorm and a
head tied to the embedding. Written to be read top to bottom, like nanoGPT's model.py.

The head never holds the [MASK] row: logits are hidden @ embed.weight[:vocab_size]ᵀ, so [MASK] has no
logit, never enters the softmax and can never be predicted or sampled. Logits themselves are never
materialised here: the loss (lwt.diffusion) calls lwt.functional.linear_cross_entropy with
`head_weight()`, and forward() returns the final normalised hidden states.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .layers import DecoderBlock, FrozenSwiGLU, RMSNorm, _positive_int, parallel_frozen_draws


class _TokenEmbedding(nn.Embedding):
    """nn.Embedding whose own reset_parameters() draws N(0, 0.02), as LWTModel.reset_parameters() does:
    deferred initialisation (built on meta, to_empty(), then reset_parameters() on every module in
    modules() order, parents first) would otherwise end with nn.Embedding's N(0, 1) after the model's own."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class LWTModel(nn.Module):
    """Args:
        cfg: lwt.config.ModelConfig (vocab_size, d_model, n_layers, attention settings, frozen_seed, ...).
        device, dtype: of the parameters and (unless frozen_dtype is given) of the frozen buffers.
        frozen_dtype: dtype of every block's frozen gate/up matrices (see lwt.layers.FrozenSwiGLU), e.g.
            torch.bfloat16 beside fp32 parameters; None: dtype.
    Attributes: vocab_size, mask_id (= vocab_size, the embedding's last row), embed, blocks, norm, and
    lm_head (vocab_size, d_model) when cfg.tie_embeddings is False.
    """

    def __init__(self, cfg, device=None, dtype=None, frozen_dtype=None):
        super().__init__()
        _positive_int(cfg.vocab_size, "vocab_size")
        _positive_int(cfg.n_layers, "n_layers")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.mask_id = cfg.vocab_size
        factory = dict(device=device, dtype=dtype)
        self.embed = _TokenEmbedding(cfg.vocab_size + 1, cfg.d_model, **factory)  # the last row is [MASK]
        with parallel_frozen_draws():  # every block's gate/up matrices drawn at once, on several CPU threads
            self.blocks = nn.ModuleList(DecoderBlock.from_config(cfg, i, frozen_dtype=frozen_dtype, **factory)
                                        for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, **factory)
        if cfg.tie_embeddings:
            self.register_parameter("lm_head", None)
        else:
            self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model, **factory))  # (V, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the embedding (its [MASK] row included) and an untied lm_head from N(0, 0.02); the blocks
        and the final norm keep theirs."""
        # N(0, 0.02) as GPT-2/nanoGPT. The head reads these rows: after the final RMSNorm a hidden state has
        # norm ≈ √D, so logits start with std ≈ 0.02·√D (0.23 at D = 128), near-uniform predictions and a
        # first loss ≈ ln V. torch's default N(0, 1) would start at std √D ≈ 11: confidently wrong. The input
        # side does not care about the scale: every block normalises its input first.
        self.embed.reset_parameters()  # (_TokenEmbedding: N(0, 0.02))
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head, mean=0.0, std=0.02)

    # -- the forward pass, in pieces the layer-wise trainer calls on their own ------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token embedding.

        Args:
            tokens: (B, S) int64 or int32 ids in [0, vocab_size] (vocab_size is [MASK]).
        Returns:
            (B, S, D) in the parameters' dtype.
        Raises:
            ValueError: tokens is not a 2-D int64/int32 tensor (ids are not range-checked here).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens: expected an int64 or int32 (batch, seq) tensor of ids in "
                             f"[0, {self.vocab_size}], got {got}")
        return self.embed(tokens)  # (B, S, D)

    def run_blocks(self, h: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run h through blocks[start:end], in order.

        Args:
            h: (B, S, D) hidden states.
            start, end: ints with 0 <= start <= end <= n_layers; end None: n_layers. start == end returns h.
        Returns:
            (B, S, D) in h's dtype.
        Raises:
            ValueError: start or end is not an int, or out of that range.
        """
        n = len(self.blocks)
        end = n if end is None else end
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: expected an int, got {value!r}")
        if not 0 <= start <= end <= n:
            raise ValueError(f"start, end: expected 0 <= start <= end <= n_layers={n}, got start={start}, end={end}")
        for block in self.blocks[start:end]:
            h = block(h)  # (B, S, D)
        return h

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm: h (B, S, D) -> (B, S, D), what the head multiplies."""
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """The final normalised hidden states of noisy tokens (logits are never computed: see head_weight).

        Args:
            tokens: (B, S) int64 or int32 ids in [0, vocab_size] (vocab_size is [MASK]).
            n_blocks: run only the first n_blocks blocks (an int in 0..n_layers; None: all), to evaluate
                what each layer-wise stage has trained.
        Returns:
            (B, S, D): final_hidden(run_blocks(embed_tokens(tokens), 0, n_blocks)).
        Raises:
            ValueError: malformed tokens, or n_blocks not None and not an int in [0, n_layers].
        """
        n = len(self.blocks)
        if n_blocks is not None and (isinstance(n_blocks, bool) or not isinstance(n_blocks, int)
                                     or not 0 <= n_blocks <= n):
            raise ValueError(f"n_blocks: expected an int in [0, n_layers={n}] or None, got {n_blocks!r}")
        h = self.embed_tokens(tokens)  # (B, S, D)
        h = self.run_blocks(h, 0, n_blocks)  # (B, S, D)
        return self.final_hidden(h)  # (B, S, D)

    def head_weight(self) -> torch.Tensor:
        """(vocab_size, D): logits = hidden @ head_weight()ᵀ. Tied: a view of the embedding without its
        [MASK] row, so no gradient ever reaches that row through the head."""
        return self.embed.weight[:self.vocab_size] if self.lm_head is None else self.lm_head

    # -- frozen buffers, checkpoints -----------------------------------------------------------------

    def frozen_buffer_names(self) -> list[str]:
        """state_dict keys of the frozen SwiGLU gate/up matrices (and their scales, if FP8), in module order."""
        return [f"{name}.{buf}" for name, module in self.named_modules() if isinstance(module, FrozenSwiGLU)
                for buf in module.frozen_buffer_names()]

    def frozen_checksum(self) -> str:
        """sha256 (hex) over the frozen buffers: for each, in frozen_buffer_names() order, its name, dtype,
        shape and raw bytes (copied to the CPU). The buffers are regenerated from frozen_seed at
        construction, not loaded; a checkpoint stores this checksum so that a changed seed, dtype or
        generator shows up as an error instead of a silently different model."""
        digest = hashlib.sha256()
        for module in self.modules():
            if isinstance(module, FrozenSwiGLU):
                module._draw_pending()  # (inside a parallel_frozen_draws() block: their values, not empty buffers)
        buffers = dict(self.named_buffers())
        for name in self.frozen_buffer_names():
            t = buffers[name].detach().to("cpu").contiguous()
            digest.update(f"{name}:{str(t.dtype).replace('torch.', '')}:{tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict without the frozen buffers (they are regenerated from frozen_seed)."""
        frozen = set(self.frozen_buffer_names())
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable_state_dict(self, state_dict) -> None:
        """Load a trainable_state_dict() (a full state_dict is accepted too: its frozen buffers are
        loaded).

        Args:
            state_dict: {key: tensor}; the frozen buffers may be absent, and FP8 scales of w_gate/w_up
                may be present.
        Raises:
            ValueError, before anything is copied: a key other than a frozen buffer is missing or
                unexpected, a value is not a tensor, or a shape differs.
        """
        own = self.state_dict()
        frozen = set(self.frozen_buffer_names())
        # an FP8 checkpoint's scales load into a full-precision layer (FrozenSwiGLU dequantises with them)
        scales = {f"{name}_scale" for name in frozen if name.endswith((".w_gate", ".w_up"))}
        missing = sorted(set(own) - set(state_dict) - frozen)
        unexpected = sorted(set(state_dict) - set(own) - scales)
        if missing or unexpected:
            raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected} (expected the keys "
                             f"of LWTModel.trainable_state_dict() for this config)")
        not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        if not_tensors:
            raise ValueError(f"state_dict: expected a tensor for every key, got {', '.join(not_tensors)} "
                             f"({type(state_dict[not_tensors[0]]).__name__}, ...)")
        # each key's shape; an FP8 checkpoint's scale, loaded into a full-precision model (which has no such
        # key), one per row of its matrix (a wrong one failed inside load_state_dict, after earlier copies)
        expected = {k: own[k].shape if k in own else own[k[:-len("_scale")]].shape[:1] for k in state_dict}
        wrong = [f"{k}: {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in state_dict.items()
                 if tuple(v.shape) != tuple(expected[k])]
        if wrong:
            raise ValueError(f"state_dict: shape mismatch for {', '.join(wrong)}")
        self.load_state_dict(state_dict, strict=False)

    def num_params(self, trainable_only: bool = True) -> int:
        """Count parameters.

        Args:
            trainable_only: True (default): parameters with requires_grad; False: every parameter plus
                the frozen buffers (the SwiGLU gate/up matrices and any FP8 scales).
        Returns:
            The number of elements, an int.
        """
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
        if not trainable_only:
            buffers = dict(self.named_buffers())
            n += sum(buffers[name].numel() for name in self.frozen_buffer_names())
        return n
