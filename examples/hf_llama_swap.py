"""Swap lwt into a Hugging Face LLaMA: RMSNorm modules and the attention core.

    python examples/hf_llama_swap.py

Builds a tiny randomly initialised LlamaForCausalLM (nothing is downloaded), then
- replaces every LlamaRMSNorm with lwt.layers.RMSNorm, copying weight and eps (both normalise in fp32);
- registers lwt.functional.attention as an attention implementation. LlamaAttention keeps its q/k/v/o
  projections and RoPE; only the softmax(q kᵀ) v core runs in lwt, on the (B, H, S, D) tensors LLaMA
  computes, read as (B, S, H, D) views. K/V heads stay grouped (GQA): lwt reads them by index.
and checks that the logits and gradients match the original model's. Causal batches without padding
or a KV cache only: a padded batch (attention_mask with zeros) or a generate() that uses the cache raises
a ValueError. Needs `transformers` 4.54 or newer (AttentionInterface, set_attn_implementation); without
it, prints one line and exits 0.
"""
import copy
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without pip install
from lwt.functional import attention
from lwt.layers import RMSNorm

try:
    from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import sdpa_mask
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    if not hasattr(LlamaForCausalLM, "set_attn_implementation"):
        raise ImportError("no PreTrainedModel.set_attn_implementation")
except ImportError as e:
    print(f"hf_llama_swap: skipped, needs transformers 4.54 or newer ({e})")
    sys.exit(0)


CALLS = {"lwt_attention": 0}


def lwt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, S, D), key/value (B, Hkv, S, D), after RoPE -> ((B, S, H, D), None), as
    transformers' sdpa_attention_forward returns. Causal only: lwt's kernel takes no mask, so a mask that
    is more than causal (padding, packed sequences) or a KV cache is refused with a ValueError."""
    if dropout:
        raise ValueError("lwt_attention: attention dropout is not supported")
    if query.shape[2] != key.shape[2]:
        raise ValueError("lwt_attention: needs as many keys as queries (no KV cache: generate(use_cache=False))")
    if attention_mask is not None:  # sdpa_mask (registered below) gives None for a causal batch without padding
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        if not torch.equal(allowed, causal.expand_as(allowed)):
            raise ValueError("lwt_attention: the attention mask is not plain causal (padding or packed "
                             "sequences), which lwt's attention cannot apply")
    CALLS["lwt_attention"] += 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, heads, D) views, no copy
    return attention(q, k, v, causal=True, softmax_scale=scaling), None


def register_lwt_attention(name: str = "lwt", fn=lwt_attention) -> None:
    """Register `fn` as attention implementation `name`, with sdpa's mask function: without a mask function
    of its own, transformers passes attention_mask=None to a custom implementation even for a padded batch,
    and sdpa's gives None only where the batch needs no more than causal masking."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def swap_rms_norms(model: torch.nn.Module) -> int:
    """Replace every LlamaRMSNorm in `model` by an lwt RMSNorm with the same weight and eps."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LlamaRMSNorm)]
    for name, old in targets:
        new = RMSNorm(old.weight.shape[0], eps=old.variance_epsilon, device=old.weight.device,
                      dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return len(targets)


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    original = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a weight that was not copied shows up
        for m in original.modules():
            if isinstance(m, LlamaRMSNorm):
                m.weight.uniform_(0.5, 1.5)

    register_lwt_attention("lwt")
    swapped = copy.deepcopy(original)
    n_norms = swap_rms_norms(swapped)
    swapped.set_attn_implementation("lwt")

    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        expected = original(tokens).logits
        got = swapped(tokens).logits
    err = (got - expected).abs().max().item()
    print(f"swapped {n_norms} RMSNorms; lwt attention ran {CALLS['lwt_attention']} times "
          f"({cfg.num_hidden_layers} layers); max |logit diff| {err:.2e}")
    if CALLS["lwt_attention"] != cfg.num_hidden_layers:
        raise RuntimeError("the lwt attention implementation was not used")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    print("logits match")

    for model in (original, swapped):  # one training step's gradients, every parameter
        model.train()
        model(tokens, labels=tokens).loss.backward()
    grads = dict(swapped.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    print("gradients match")

    padded = torch.ones_like(tokens)
    padded[1, :4] = 0  # left padding: lwt's attention takes no mask, so this must be refused, not ignored
    try:
        with torch.no_grad():
            swapped(tokens, attention_mask=padded)
    except ValueError as e:
        print(f"padded batch refused: {e}")
    else:
        raise RuntimeError("a padded batch was not refused: its attention mask would have been ignored")


if __name__ == "__main__":
    main()
