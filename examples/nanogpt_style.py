"""A nanoGPT-style causal language model built from lwt.layers, trained on byte-level text.

    python examples/nanogpt_style.py [--steps 100]

Embedding -> DecoderBlock(causal=True) x n -> RMSNorm -> head tied to the embedding, with the loss computed
by lwt.functional.linear_cross_entropy (never the whole (tokens, vocab) logits). The text is lwt.data's
default corpus (Python's documentation topics, one token per byte, nothing downloaded). On CPU tensors
every op runs the PyTorch reference; move the model and batches to CUDA and the same code runs the
Triton kernels.
"""
import argparse
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without pip install
from lwt.config import DataConfig
from lwt.data import build_data
from lwt.functional import linear_cross_entropy
from lwt.layers import DecoderBlock, RMSNorm


class TinyGPT(nn.Module):
    def __init__(self, vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)  # small logits at the start: a first loss near ln(256)
        # Each block's frozen MLP matrices get their own seed; they are buffers, so the optimizer never sees them.
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, d_ff, n_kv_heads=n_kv_heads, causal=True,
                                                 frozen_seed=i) for i in range(n_layers))
        self.norm = RMSNorm(d_model)

    def loss(self, tokens):
        """tokens (B, S + 1): predict tokens[:, 1:] from tokens[:, :-1]."""
        h = self.embed(tokens[:, :-1])  # (B, S, D)
        for block in self.blocks:
            h = block(h)  # (B, S, D)
        return linear_cross_entropy(self.norm(h), self.embed.weight, tokens[:, 1:])  # tied head


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = build_data(DataConfig(), vocab_size=256)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        loss = model.loss(data.get_batch("train", args.batch_size, args.seq_len + 1, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
