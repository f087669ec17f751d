"""The layer-wise trainer: `python -m lwt.train_layerwise --config config.yaml [--set key=value ...]`.

Phases, in order (each resumable from a checkpoint mid-way):
  stage 0      the embedding, block 0 and the head (final RMSNorm + tied embedding) on the mask-diffusion
               objective; then block 0's outputs are cached on disk (with the tokens, masks and t).
  stage k      block k alone, on block k-1's cached outputs (or, with `train.cache: false`, on the
               frozen prefix recomputed under no_grad with fresh masks every step), through the frozen
               head; then its own outputs are cached for stage k+1.
  joint        the stack, already one LWTModel, is evaluated, tuned end to end for `joint_steps` (frozen
               SwiGLU projections stay frozen: they are buffers) and evaluated again.
  end-to-end   with --end_to_end, a fresh model of the same config is trained end to end for the same
               number of steps (hence tokens) as all the phases above, for comparison.

Each phase has its own AdamW (fused on CUDA; over fp32 master copies of the trained parameters when the
model is 16-bit; weight decay on the matrices only, not on norm weights) and linear-warmup + cosine
schedule. Every phase ends with the validation NELBO
(lwt.diffusion.evaluate_nelbo) and a line of the final table. Outputs in out_dir: metrics.jsonl (every
logged step and every evaluation), table.txt, checkpoint.pt (the resume state), final.pt (the fused,
joint-tuned model), end_to_end.pt, and with --plot curves.png; the .pt files are written atomically. Only the
cache the next stage reads is kept; a missing one is rebuilt from the weights on --resume. Each rank locks
out_dir (and cache_dir, when it caches) for the run's life: a second run on them is refused. A SIGTERM, or a
SIGINT (Ctrl-C; a second one interrupts at once), stops the run at the next step (with DDP: the next log step,
where the ranks agree) with a checkpoint; exit 143 (SIGTERM) or 130 (SIGINT).
A NaN or inf loss (read at log steps), trained weights (checked before each save and at a phase's end) or
validation NELBO stops it with TrainingDiverged (exit 1), saving nothing more.

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m lwt.train_layerwise ...` runs DDP over data on
what the phase trains (frozen parts are not wrapped; no buffer is broadcast: every rank regenerates the
frozen matrices from their seeds). Each rank draws its own data and writes its own cache shard; rank 0
writes metrics and checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import glob
import hashlib
import inspect
import json
import math
import os
import pickle
import resource
import signal
import sys
import threading
import time
import weakref
try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked, as remove_dead_writers_temps is POSIX only
    fcntl = None
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .cache import (ActivationCache, CacheWriter, DiskSpaceError, cache_bytes, check_disk_space, naming_errors,
                    remove_partials)
from .config import Config, config_from_dict, config_to_dict, load_config
from .data import _read_into, build_data
from .diffusion import evaluate_nelbo, mask_tokens, masked_diffusion_loss, sample_t
from .functional import backend_for
from .model import LWTModel

CHECKPOINT_FORMAT = 1
# A finished run's outputs beside checkpoint.pt (metrics.jsonl aside: a fresh run starts its own log)
OUTPUTS = ("final.pt", "end_to_end.pt", "table.txt", "curves.png")
# Keys a resumed run may change: where the run lives (a run directory copied or moved elsewhere), where its
# data file is (a relative path resumed from another working directory, a file moved to a local disk: the
# data itself is checked by content, data_identity) and how often it logs and checkpoints. Nothing else,
# since the weights it ends with depend on the rest; these are also left out of the fingerprint that
# activation caches are checked against (which holds the data's identity instead of its path).
RESUME_MAY_CHANGE = {("train", "out_dir"), ("train", "cache_dir"), ("train", "log_every"), ("train", "ckpt_every"),
                     ("data", "path")}
# What Trainer.save writes and resume reads.
_CHECKPOINT_KEYS = {"format", "config", "end_to_end", "rng", "model", "frozen_checksum", "phase", "step",
                    "optimizer", "master", "history", "phase_wall", "metrics_lines", "data"}
_OPTIONAL_CHECKPOINT_KEYS = {"data"}  # absent from checkpoints of older lwt versions, which still resume


class TrainingDiverged(RuntimeError):
    """The training loss, the trained weights or a phase's validation NELBO stopped being finite (NaN or
    inf): the run stops without saving those weights. The message says what the last checkpoint holds."""


# -- setup ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """The CLI. Besides --config/--set, any `--key value` pair is a config override of a key that exists
    in one section (`--max_steps 50`), and `--dummy True` selects the dummy data source: the original
    quickstart form `--dummy True --max_steps 50` works as it did (`--dummy False`, which would select
    nothing, is refused).

    Args:
        argv: the arguments, without the program name; None: sys.argv[1:].
    Returns:
        An argparse.Namespace: config, resume, end_to_end, plot, dummy, stop_after, set, and overrides (the
        `key=value` strings in the order applied: data.source=dummy for --dummy True, the --set ones, then
        the --key value pairs). The keys and values are checked later, by lwt.config.load_config.
    A malformed command line exits with status 2 (argparse's SystemExit).
    """
    p = argparse.ArgumentParser(prog="python -m lwt.train_layerwise", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the dataclass defaults of lwt/config.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (section.key or a unique bare key); repeatable")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    p.add_argument("--end_to_end", action="store_true",
                   help="also train the same model end to end on the same token budget, for comparison")
    p.add_argument("--plot", action="store_true", help="write <out_dir>/curves.png (needs matplotlib)")
    p.add_argument("--dummy", type=_parse_bool, default=None,
                   help="True: random tokens (data.source=dummy); False is refused (set data.source instead)")
    p.add_argument("--stop_after", type=int, default=None, metavar="STEPS",
                   help="stop, as if preempted, after this many optimizer steps of this invocation (a "
                        "checkpoint is written first): for testing --resume")
    args, rest = p.parse_known_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop_after: expected a number of steps >= 1, got {args.stop_after}")
    if args.dummy is False:  # (it would override nothing: a config's data.source dummy would stay)
        p.error("--dummy: only True is taken (it sets data.source=dummy); to choose another source, set it: "
                "--set data.source=text (or tokens)")
    overrides = list(args.set)
    if args.dummy:
        overrides.insert(0, "data.source=dummy")
    flags = {option for action in p._actions for option in action.option_strings if option.startswith("--")}
    i = 0
    while i < len(rest):  # --key value / --key=value pairs: overrides resolved (and checked) by lwt.config
        item = rest[i]
        if not item.startswith("--"):
            p.error(f"unexpected argument {item!r}")
        spelled = "--" + item[2:].split("=", 1)[0].replace("-", "_")
        if spelled in flags:  # --end-to-end, --stop-after: a flag misspelled, not a config key
            p.error(f"{item.split('=', 1)[0]}: unknown flag; did you mean {spelled}?")
        if "=" in item:
            overrides.append(item[2:])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{item[2:]}={rest[i + 1]}")
            i += 2
        else:  # (a value that starts with -- is given as --key=--value, as argparse asks of its own options)
            p.error(f"{item}: expected a value" + (f", got the flag {rest[i + 1]!r} (a value starting with -- goes "
                                                   f"as {item}=VALUE)" if i + 1 < len(rest) else ""))
    args.overrides = overrides  # --key value flags apply after the --set ones
    return args


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (torch's carry a C++ trace after it); its type's name
    when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation failure: CUDA's OutOfMemoryError, or the RuntimeError of
    torch's CPU allocator. (A process the OS kills for memory gets no exception to catch.)"""
    return isinstance(e, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(e)


def seed_model_rng(seed: int, device: torch.device) -> None:
    """torch.manual_seed(seed) for the generators a model built on `device` draws from: the CPU's and, on
    CUDA, the current GPU's (Dist made `device` current). torch.manual_seed would reseed every GPU, which
    main, restoring its caller's RNG, would then have to save and restore on each."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


class Dist:
    """Rank, world size and device; a process group when launched by torchrun with WORLD_SIZE > 1.

    Args:
        device_name: train.device: "auto" (cuda when available) | "cpu" | "cuda" (LOCAL_RANK's GPU when
            WORLD_SIZE > 1, else the current one) | "cuda:N".
    Attributes: world, rank (from WORLD_SIZE, RANK), device (a torch.device, made current on CUDA), main
    (rank 0). With WORLD_SIZE > 1 it initialises the default process group (nccl on CUDA, gloo otherwise),
    unless one exists: then it takes the world and rank from that one (WORLD_SIZE and RANK, if set, must
    agree), and close() leaves it to whoever made it.
    Raises:
        ValueError: a CUDA device is asked for but none is visible, or its index is not below the GPU count;
            WORLD_SIZE or RANK that contradict an existing process group.
    """

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        made = dist.is_available() and dist.is_initialized()
        if made:  # a group the caller made: its world and rank, which torchrun's variables must not contradict
            group = (dist.get_world_size(), dist.get_rank())
            if "WORLD_SIZE" in os.environ and (self.world, self.rank) != group:
                raise ValueError(f"WORLD_SIZE={self.world}, RANK={self.rank}: expected the world size and rank of "
                                 f"the process group made before main, {group[0]} and {group[1]}")
            self.world, self.rank = group
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        if device_name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"train.device: expected a device this machine has, got {device_name!r} "
                                 f"(no CUDA GPU is visible)")
            self.device = torch.device(device_name)
            if self.device.index is None:  # "cuda": this rank's GPU (set_device refuses a device without index)
                self.device = torch.device("cuda", local if self.world > 1 else torch.cuda.current_device())
            count = torch.cuda.device_count()
            if self.device.index >= count:  # torch would fail with "CUDA error: invalid device ordinal"
                raise ValueError(f"train.device: expected a device this machine has, got {device_name!r} "
                                 f"({self.device} for this rank; {count} CUDA GPU(s) visible)")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # a group the caller made (dist.init_process_group before main()) is used, and left to the caller
        self.owns_group = self.world > 1 and not made
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def all_mean(self, value: float) -> float:
        """The mean of `value` over the ranks, as a float (a collective: every rank calls it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a collective: every rank calls it at the same point)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj):
        """Every rank's picklable `obj`, as a list in rank order (a collective: every rank calls it)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group, if this Dist made it and it is still initialised."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# No buffer broadcast in forward (init_sync=False covers the one at construction). torch 2.13 renamed
# broadcast_buffers to forward_sync_buffers and warns about the old name; older torch has only the old one.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of train.dtype `name` ("auto": bfloat16 on a CUDA `device`, else float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# -- phases --------------------------------------------------------------------------------------------

def phases(cfg: Config, end_to_end: bool) -> list[tuple[str, int, int]]:
    """(name, index, optimizer steps) of every phase, in order. The end-to-end phase gets the steps of
    all the others, so both sides see the same number of tokens.

    Args:
        cfg: the validated Config (model.n_layers, train.max_steps, train.joint_steps).
        end_to_end: append the end-to-end comparison phase.
    Returns:
        [("stage", k, max_steps) for each layer k], then ("joint", 0, joint_steps) unless joint_steps is 0,
        then ("end-to-end", 0, the sum of the others' steps) when end_to_end.
    """
    L, steps = cfg.model.n_layers, cfg.train.max_steps
    out = [("stage", k, steps) for k in range(L)]
    if cfg.train.joint_steps:
        out.append(("joint", 0, cfg.train.joint_steps))
    if end_to_end:
        out.append(("end-to-end", 0, sum(n for _, _, n in out)))
    return out


def phase_label(name: str, index: int) -> str:
    """How logs and the table name a phase: "stage k" for stage `index`, else `name` itself."""
    return f"stage {index}" if name == "stage" else name


def trainable_core(model: LWTModel, name: str, k: int) -> nn.Module:
    """What a phase trains, as one module (what DDP wraps): stage 0 the embedding, block 0, the final
    norm and an untied head; stage k block k; joint and end-to-end the whole model (its frozen SwiGLU
    matrices are buffers, never trained)."""
    if name == "stage":
        return StageZero(model) if k == 0 else model.blocks[k]
    return model


def set_trainable(model: LWTModel, core: nn.Module) -> list[nn.Parameter]:
    """requires_grad on the core's parameters, off elsewhere; the frozen rest goes to eval mode.

    Args:
        model: the LWTModel. core: the part to train (trainable_core's result), inside model.
    Returns:
        The model's parameters that now require grad, in model.parameters() order.
    """
    model.requires_grad_(False)
    model.eval()
    core.requires_grad_(True)
    core.train()
    return [p for p in model.parameters() if p.requires_grad]


def step_flops(model: LWTModel, name: str, k: int, cached: bool, batch: int, seq_len: int) -> tuple[int, int]:
    """Model FLOPs of one training step of phase (name, k) on one rank, in two parts: the step costs
    `per_batch + per_masked · M` with M the batch's masked tokens (only those reach the head).

    Counted as torch.utils.flop_counter counts the step on the reference path (tests/test_train_layerwise.py
    checks it against FlopCounterMode): matmul FLOPs only, 2·m·n·k per product, attention's two S-long
    products in full (no causal discount); forward and what the backward computes for this phase (dX of
    every projection of the block(s) trained, dW of the trained ones, not of the frozen gate/up matrices or
    of a frozen head). Model FLOPs: what the Triton kernels recompute (attention's scores in its backward,
    a recomputing SwiGLU MLP, the cross entropy's deferred logits) is not counted, as MFU counts.

    Args:
        model: the LWTModel. name, k: the phase (phases()'s entries). cached: a stage k > 0 that reads block
            k-1's cache (False: it runs the frozen prefix forward itself). batch, seq_len: of one rank's step.
    Returns:
        (per_batch, per_masked) FLOPs.
    """
    def per_token(block):  # forward FLOPs per token: (trained projections, frozen gate/up, attention)
        attn = block.attn
        qk, v = ((attn.nope_dim + attn.rope_dim, attn.v_dim) if hasattr(attn, "nope_dim")
                 else (attn.head_dim, attn.head_dim))
        trained = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)) + block.mlp.w_down.numel()
        frozen = block.mlp.w_gate.numel() + block.mlp.w_up.numel()
        return 2 * trained, 2 * frozen, 2 * seq_len * attn.n_heads * (qk + v)

    blocks = list(model.blocks)
    trained = blocks if name != "stage" else [blocks[k]]
    prefix = blocks[:k] if name == "stage" and not cached else []  # run under no_grad: forward only
    flops = 0
    for block in trained:  # the backward: dX and dW of the trained projections, dX of the frozen ones, and
        w, f, a = per_token(block)  # attention's four products (dP, dV, dQ, dK) against its forward's two
        flops += 3 * w + 2 * f + 3 * a
    for block in prefix:
        flops += sum(per_token(block))
    head = 2 * model.cfg.d_model * model.vocab_size  # one masked row's logits
    head_trained = name != "stage" or k == 0
    return batch * seq_len * flops, head * (3 if head_trained else 2)  # forward, dH (and dW)


# Dense 16-bit (bf16/fp16) tensor-core peaks, TFLOP/s per GPU, from NVIDIA's datasheets, by the first
# match in torch.cuda.get_device_name (so GH200 before H200, the H100 variants before plain H100 = SXM).
_PEAK_16BIT_TFLOPS = (("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0),
                      ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense 16-bit peak of `device`'s GPU, for MFU; None on the CPU, for fp32 runs (no tensor-core
    peak applies to the kernels' IEEE fp32 products) and for GPUs not in the table."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((peak for part, peak in _PEAK_16BIT_TFLOPS if part in gpu), None)


def decay_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the matrices (projections, the tied embedding), none on
    vectors (RMSNorm weights, whose decay would pull them towards 0 rather than 1: nanoGPT's split by
    dimension). One group when weight_decay is 0 (the default).

    Args:
        params: the tensors to optimise. weight_decay: >= 0, applied to those with 2 or more dims.
    Returns:
        A list of {"params", "weight_decay"} dicts for torch.optim.AdamW; with weight_decay > 0, a group
        with no tensor is left out.
    """
    if weight_decay == 0:
        return [dict(params=params, weight_decay=0.0)]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def _regrouped(saved: dict, params: list, opt: torch.optim.Optimizer) -> dict:
    """A one-group AdamW state (checkpoints written before decay_groups split the parameters) laid out as
    opt's groups: each parameter keeps its state; decay_groups keeps params' order within each group."""
    if len(saved["param_groups"]) != 1 or len(opt.param_groups) == 1:
        return saved
    (old,) = saved["param_groups"]
    order = [i for i, p in enumerate(params) if p.dim() >= 2] + [i for i, p in enumerate(params) if p.dim() < 2]
    state = {new: saved["state"][old["params"][i]] for new, i in enumerate(order) if old["params"][i] in saved["state"]}
    groups, start = [], 0
    for g in opt.state_dict()["param_groups"]:
        n = len(g["params"])
        groups.append({**old, "weight_decay": g["weight_decay"], "params": list(range(start, start + n))})
        start += n
    return {"state": state, "param_groups": groups}


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then a cosine from lr down to lr · min_ratio at `total` (the step
    after a phase's last: nanoGPT's convention). With warmup = total (a phase of at most warmup_steps steps)
    the phase only warms up.

    Args:
        step: 0-based step in the phase. total: the phase's steps. lr: the peak rate.
        warmup: warmup steps (the caller passes min(train.warmup_steps, total)). min_ratio: the floor / lr.
    Returns:
        The learning rate of `step`: lr · (step + 1) / warmup during warmup, then the cosine.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StageZero(nn.Module):
    """Stage 0's trainable part as one module, so that DDP can wrap it: noisy tokens -> the final hidden
    states of a one-block model. The tied head reads embed.weight outside forward(); autograd sums that
    gradient with the embedding lookup's before DDP's hook reduces it."""

    def __init__(self, model: LWTModel):
        super().__init__()
        self.embed, self.block, self.norm = model.embed, model.blocks[0], model.norm
        self.lm_head = model.lm_head  # None when tied

    def forward(self, noisy):
        """noisy (B, S) token ids -> (B, S, D): the final norm of block 0's output, as the one-block model's."""
        return self.norm(self.block(self.embed(noisy)))  # (B, S, D)


# -- the trainer ---------------------------------------------------------------------------------------

class Trainer:
    """One rank's layer-wise run: every phase of phases(), its checkpoints, caches, metrics and table.

    Args:
        cfg: the validated Config. args: parse_args's namespace (end_to_end, stop_after are read).
        env: this rank's Dist.
    Building it loads the data (build_data) and builds the model on env.device; run() trains.
    """

    def __init__(self, cfg: Config, args, env: Dist):
        self.cfg, self.args, self.env = cfg, args, env
        t = cfg.train
        self.device = env.device
        try:  # an LWT_BACKEND this device cannot run fails here, before anything is built or written
            backend_for(torch.empty(0, device=self.device))
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.out_dir = t.out_dir
        self.cache_dir = t.cache_dir  # resolved by lwt.config (<out_dir>/cache when null)
        self.cache_entries = t.cache_sequences * t.cache_draws
        # ranks whose shards share cache_dir's disk: this node's until main counts them (count_cache_sharers)
        self.cache_sharers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.data = build_data(cfg.data, cfg.model.vocab_size)
        self.data_identity = data_identity(self.data)  # checked on --resume: the same config, other data?
        seed_model_rng(t.seed, self.device)  # the same initial weights on every rank
        self.model = LWTModel(cfg.model, device=self.device, dtype=self.dtype)
        # The frozen matrices come from the config's seeds and never change (the end-to-end model is rebuilt
        # from the same seeds): hashed once, not at every checkpoint.
        self.frozen_checksum = self.model.frozen_checksum()
        self.phases = phases(cfg, args.end_to_end)
        # Per-rank generators: the data windows and the masks of each rank differ; both are saved.
        self.data_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 17 * env.rank + 1)
        self.mask_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 17 * env.rank + 2)
        self.history = []       # one dict per finished phase: the final table
        self.position = (0, 0)  # (phase index, step) to run next
        self.saved_at = None    # the position checkpoint.pt holds (None: not written yet)
        self.opt_state = None
        self.master = None        # fp32 master copies of the trained parameters (16-bit models)
        self._input_cache = (None, None)  # (k, block k's cache) as the current stage opened it
        self.master_state = None  # ... as loaded from a checkpoint, until the phase resumes
        self._digests = []  # [(weakref to module i, sha256 state after it)]: see _weights_digest
        self.metrics_lines = 0    # lines of metrics.jsonl this run has written (a resume cuts back to it)
        self.phase_wall = 0.0   # wall seconds spent in the current phase before this invocation
        self.steps_run = 0      # optimizer steps in this invocation (for --stop_after)
        self.sigterm = False    # set by main's SIGTERM (or first SIGINT) handler, on this rank
        self.stop_signal = None  # which of the two reached this rank first
        self.terminated = False  # one reached some rank: every rank stops (agreed by Dist.any)
        identity = {s: {k: v for k, v in keys.items() if (s, k) not in RESUME_MAY_CHANGE}
                    for s, keys in config_to_dict(cfg).items()}
        identity["data_identity"] = self.data_identity  # the data by content, not by the name of its file
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    # -- checkpoints ---------------------------------------------------------------------------------

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out_dir, "checkpoint.pt")

    def save(self, optimizer) -> None:
        """Everything needed to continue: the phase and step, trainable weights, optimizer, every rank's
        generator states, the table so far. Frozen matrices are not stored (regenerated from
        frozen_seed; their checksum is). Written to a temp file, then renamed: never half a checkpoint."""
        rng = {"data": self.data_gen.get_state(), "mask": self.mask_gen.get_state(), "torch": torch.get_rng_state()}
        all_rng = self.env.gather(rng)
        self.saved_at = self.position  # (every rank knows what rank 0 writes)
        self.main_writes(lambda: _atomic_save(self._checkpoint_state(optimizer, all_rng), self.ckpt_path))

    def _checkpoint_state(self, optimizer, all_rng) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "end_to_end": self.args.end_to_end,
            "phase": self.position[0],
            "step": self.position[1],
            "model": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            "frozen_checksum": self.frozen_checksum,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "master": None if optimizer is None or self.master is None else [m.detach().cpu() for m in self.master],
            "metrics_lines": self.metrics_lines,
            "rng": all_rng,
            "history": json.dumps(self.history),
            "phase_wall": self.phase_wall,
            "data": self.data_identity,
        }

    def main_writes(self, write) -> None:
        """write() on rank 0 only. A collective: where it fails (a full disk), every rank raises, instead of
        the others going on into their next collective without rank 0."""
        self.run_together(write if self.env.main else None)

    def run_together(self, work):
        """work() on this rank (None: nothing to do here), then fail_together with what it raised; its result.
        A collective."""
        error = result = None
        if work is not None:
            try:
                result = work()
            except Exception as e:  # noqa: BLE001  (raised again, on every rank)
                error = e
        self.fail_together(error)
        return result

    def resume(self) -> None:
        """Load <out_dir>/checkpoint.pt (weights_only: a checkpoint never runs code) and continue where it
        stopped. The config must be the one the checkpoint was written with, but for RESUME_MAY_CHANGE."""
        if not os.path.exists(self.ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {self.ckpt_path} (train.out_dir={self.out_dir!r})")
        state = read_checkpoint(self.ckpt_path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{self.ckpt_path}: unknown checkpoint format {found!r}")
        missing = sorted(_CHECKPOINT_KEYS - _OPTIONAL_CHECKPOINT_KEYS - set(state))
        if missing:
            raise ValueError(f"{self.ckpt_path}: not a complete checkpoint (no {', '.join(missing)})")
        saved = config_to_dict(config_from_dict(state["config"]))
        now = config_to_dict(self.cfg)
        saved_data = state.get("data")
        # data.path may change only where the checkpoint can check the data by content
        may_change = RESUME_MAY_CHANGE if saved_data is not None else RESUME_MAY_CHANGE - {("data", "path")}
        diff = [f"{s}.{k}: {saved[s][k]!r} -> {now[s][k]!r}" for s in now for k in now[s]
                if saved[s][k] != now[s][k] and (s, k) not in may_change]
        if diff or state["end_to_end"] != self.args.end_to_end:
            what = "; ".join(diff) or "--end_to_end"
            raise ValueError(f"--resume: the config differs from the checkpoint's ({what}); resume with the same "
                             f"config, or start a new out_dir")
        differs = saved_data is not None and saved_data != self.data_identity
        # A collective: each node may read its own copy of data.path, so the ranks need not agree; none may
        # go on alone (into a collective that the refused ranks never reach).
        if self.env.any(differs):
            if not differs:
                raise ValueError("--resume: another rank's training data differs from the checkpoint's (its error "
                                 "says how; a node's own copy of data.path?): restore it, or start a new out_dir")
            now, then = self.data_identity, saved_data
            same_size = (now["train_tokens"], now["val_tokens"]) == (then.get("train_tokens"), then.get("val_tokens"))
            d = self.cfg.data
            moved = saved["data"]["path"] != d.path
            why = (f"data.path was {saved['data']['path']!r}, now {d.path!r}: another file?" if moved
                   else "data.path cut short or rewritten?" if d.path is not None
                   else "the default text is this Python's pydoc_data.topics: another Python version?"
                   if d.source == "text" else f"ids drawn from data.seed {d.seed}: another torch version?")
            raise ValueError(
                f"--resume: the training data differs from the checkpoint's ({self.data.description or now['source']}: "
                f"{now['train_tokens']} + {now['val_tokens']} tokens now, {then.get('train_tokens')} + "
                f"{then.get('val_tokens')} then{', other contents' if same_size else ''}); the data changed since the "
                f"run started ({why}): restore it, or start a new out_dir")
        if len(state["rng"]) != self.env.world:
            raise ValueError(f"--resume: the checkpoint was written by {len(state['rng'])} ranks, this run has "
                             f"{self.env.world}")
        # The same config may train in another dtype: train.dtype auto is bfloat16 on CUDA, float32 on the CPU
        # (the checkpoint's weights are in the dtype the run trained in)
        saved_dtype = next((v.dtype for v in state["model"].values()
                            if isinstance(v, torch.Tensor) and v.is_floating_point()), self.dtype)
        if saved_dtype != self.dtype:
            raise ValueError(f"--resume: the run trained in {str(saved_dtype).replace('torch.', '')}, this one would "
                             f"train in {str(self.dtype).replace('torch.', '')} (train.dtype={self.cfg.train.dtype!r} "
                             f"on {self.device}): resume it on the kind of device it started on")
        self.model.load_trainable_state_dict(state["model"])
        self._forget_digests(0)
        if self.frozen_checksum != state["frozen_checksum"]:
            raise ValueError(f"{self.ckpt_path}: the frozen SwiGLU matrices regenerated from frozen_seed do not "
                             f"match the checkpoint's checksum (another torch version's generator, or an lwt before "
                             f"d2e59f9, which drew them in fp32: resume with that lwt)")
        rng = state["rng"][self.env.rank]
        self.data_gen.set_state(rng["data"])
        self.mask_gen.set_state(rng["mask"])
        torch.set_rng_state(rng["torch"])
        self.position = self.saved_at = (state["phase"], state["step"])
        self.opt_state = state["optimizer"]
        self.master_state = state["master"]
        self.history = json.loads(state["history"])
        self.phase_wall = state["phase_wall"]
        self.metrics_lines = state["metrics_lines"]
        if self.env.main:
            self._cut_metrics()
            if self.position[0] >= len(self.phases):
                print(f"{self.ckpt_path}: this run has finished; nothing to resume", flush=True)
            else:
                name, k, _ = self.phases[self.position[0]]
                print(f"resumed from {self.ckpt_path}: {phase_label(name, k)}, step {self.position[1]}", flush=True)
            self._note_caches_left_in(saved["train"]["cache_dir"])

    def _note_caches_left_in(self, old: str | None) -> None:
        """A resume with another train.cache_dir (one moved to a bigger disk, as a DiskSpaceError advises)
        builds its caches there and never reads or deletes the old directory again, which no lock of this
        run covers (another run of the same config may use it): say where this config's caches were left."""
        if not self.cfg.train.cache or not old or os.path.realpath(old) == os.path.realpath(self.cache_dir):
            return
        left = []
        for manifest in sorted(glob.glob(os.path.join(glob.escape(old), "stage*", "rank*.manifest.json"))):
            try:
                with open(manifest) as f:
                    if json.load(f)["meta"]["fingerprint"] == self.fingerprint:
                        left.append(os.path.dirname(manifest))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if left:
            print(f"note: train.cache_dir is now {self.cache_dir!r}; this config's activation caches in the run's "
                  f"former cache_dir stay there, unread: {', '.join(sorted(set(left)))} (delete them if no other "
                  f"run of this config needs them)", flush=True)

    def save_model(self, file_name: str) -> None:
        """<out_dir>/<file_name>: the config and weights (what lwt.generate reads), written atomically (by
        rank 0: a collective, see main_writes)."""
        self.main_writes(lambda: _atomic_save(
            {"format": CHECKPOINT_FORMAT, "config": config_to_dict(self.cfg),
             "model": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
             "frozen_checksum": self.frozen_checksum},
            os.path.join(self.out_dir, file_name)))

    # -- batches ---------------------------------------------------------------------------------------

    def fresh_batch(self):
        """Clean tokens from the train split, a stratified t per sequence and a Bernoulli(t) mask."""
        c = self.cfg
        tokens = self.data.get_batch("train", c.data.batch_size, c.data.seq_len, self.data_gen)  # (B, S)
        t = sample_t(c.data.batch_size, c.objective.mask_fraction_min, c.objective.mask_fraction_max, self.mask_gen)
        noisy, mask = mask_tokens(tokens, t, self.model.mask_id, self.mask_gen)
        return self.to_device(tokens, noisy, mask, t)

    def to_device(self, *tensors):
        """CPU tensors on the training device; to a GPU through pinned memory, so the copy is asynchronous."""
        if self.device.type != "cuda":
            return tensors
        return tuple(x.pin_memory().to(self.device, non_blocking=True) for x in tensors)

    def loss(self, final, tokens, mask, t):
        """final: final normalised hidden states (B, S, D); the tied head and the masked positions' loss."""
        weighting = self.cfg.objective.loss_weighting
        return masked_diffusion_loss(final, self.model.head_weight(), tokens, mask, t, weighting)

    # -- evaluation ------------------------------------------------------------------------------------

    def evaluate(self, n_blocks: int) -> dict:
        """Validation NELBO of the model truncated to its first n_blocks blocks: the same fixed-seed
        batches and masks every time, t over (0, 1]."""
        c = self.cfg
        gen = torch.Generator().manual_seed(c.objective.eval_seed)
        batches = [self.data.get_batch("val", c.data.batch_size, c.data.seq_len, gen).to(self.device)
                   for _ in range(c.objective.eval_batches)]
        was_training = self.model.training
        self.model.eval()
        result = evaluate_nelbo(lambda noisy: self.model(noisy, n_blocks=n_blocks), self.model.head_weight(),
                                batches, self.model.mask_id, c.objective.eval_seed)
        self.model.train(was_training)
        return result

    # -- activation cache ------------------------------------------------------------------------------

    def _stage_dir(self, k: int) -> str:
        return os.path.join(self.cache_dir, f"stage{k}")

    def _cache_expect(self, k: int) -> dict:
        """What block k's cache must match: this config, and the weights of the blocks that produced it."""
        c = self.cfg
        return dict(stage=k, fingerprint=self.fingerprint, weights=self._weights_digest(k), seq_len=c.data.seq_len,
                    d_model=c.model.d_model, entries=self.cache_entries)

    def _weights_digest(self, k: int) -> str:
        """sha256 of the names and fp32 values of the embedding's and blocks 0..k's parameters, in that
        order. The hash state after each module is kept (self._digests) until train_phase trains that
        module or one before it, or resume() loads weights, so a run hashes each module about once: not
        the whole prefix at every cache write and open, which grew as L² (about 15 GB hashed twice at
        stage 31 of a 32-layer 4k model). Version counters cannot tell when to rehash: fused AdamW
        updates parameters in place without bumping them."""
        state = hashlib.sha256()
        for i, module in enumerate([self.model.embed, *self.model.blocks[:k + 1]]):
            if i < len(self._digests) and self._digests[i][0]() is module:
                state = self._digests[i][1]
                continue
            del self._digests[i:]
            state = _hash_module(state.copy(), module)
            self._digests.append((weakref.ref(module), state))
        return state.hexdigest()[:16]

    def _forget_digests(self, first: int) -> None:
        """Drop the kept hash states from module `first` on (0: the embedding, i + 1: block i)."""
        del self._digests[first:]

    def count_cache_sharers(self) -> int:
        """How many of the run's ranks write their shards to this rank's cache_dir: all of them on a
        filesystem the nodes share (the default <out_dir>/cache of a multi-node run), the node's own on a
        node-local disk. Each rank creates a marker named with a token of rank 0's and counts the markers
        it sees. A collective; call it once cache_dir exists (lock_run_dirs made it)."""
        if self.env.world == 1:
            return 1
        token = self.env.gather(os.urandom(8).hex())[0]
        marker = os.path.join(self.cache_dir, f".sharers-{token}.rank{self.env.rank}")
        try:
            open(marker, "x").close()
            made = True
        except OSError:  # (not counted by the others then; every rank still reaches both barriers)
            made = False
        self.env.barrier()
        seen = len(glob.glob(os.path.join(glob.escape(self.cache_dir), f".sharers-{token}.rank*")))
        self.env.barrier()  # every rank has counted before any marker goes
        if made:
            try:
                os.remove(marker)
            except OSError:
                pass
        return max(1, seen + (0 if made else 1))

    def remove_crashed_writers_files(self) -> None:
        """Delete the temporary files that this rank's cache writers left when a run was killed mid-write
        (a whole reserved shard each), so that their space counts as free. Only between phases: while a
        cache is being written (or rebuilt, which nests writers) its own temporary files are in use."""
        for directory in glob.glob(os.path.join(glob.escape(self.cache_dir), "stage*")):
            remove_partials(directory, self.env.rank)

    def refuse_foreign_caches(self) -> None:
        """A run's first phase deletes every stage cache in cache_dir that it does not read
        (remove_unneeded_caches): refuse, naming train.cache_dir, when one was written by a run of another
        config (a cache_dir outside out_dir only: out_dir, hence its caches, belong to this run). An explicit
        cache_dir shared by runs (a scratch path in a config file) would otherwise lose a stopped run's cache
        to the next run started, or resumed, on it, and that run's --resume would be refused on the new run's
        cache. Also refused: a stage's path that is not a directory (a file named stage0), which would fail
        the run only when it writes that cache, after the stage trained. A collective."""
        stages = [(k, self._stage_dir(k)) for k in range(self.cfg.model.n_layers - 1)]  # (the last writes none)
        foreign = [f"train.cache_dir: {path} is not a directory, and this run writes block {k}'s activation "
                   f"cache there: move it away or choose another train.cache_dir"
                   for k, path in stages if os.path.lexists(path) and not os.path.isdir(path)]
        own = os.path.realpath(self.out_dir)
        inside = os.path.commonpath([own, os.path.realpath(self.cache_dir)]) == own  # <out_dir>/cache: this run's
        pattern = os.path.join(glob.escape(self.cache_dir), "stage*", f"rank{self.env.rank}.manifest.json")
        for manifest in [] if inside else sorted(glob.glob(pattern)):
            try:
                with open(manifest) as f:
                    found = json.load(f)["meta"]["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):  # unreadable: not provably another run's
                continue
            if found != self.fingerprint:
                foreign.append(f"train.cache_dir: {os.path.dirname(manifest)} holds the activation cache of a run "
                               f"of another config (fingerprint {found}, this run's {self.fingerprint}), which this "
                               f"run would delete: resume that run, delete the directory if it is no longer needed, "
                               f"or choose another train.cache_dir")
        foreign = [message for messages in self.env.gather(foreign) for message in messages]
        if foreign:
            raise ValueError(foreign[0])

    def remove_unneeded_caches(self, index: int) -> None:
        """Delete this rank's shards of every stage cache phase `index` does not read: those a run killed
        between a phase's checkpoint and its delete_cache left behind, which nothing would delete later."""
        name, k, _ = self.phases[index]
        keep = k - 1 if name == "stage" and self.cfg.train.cache and k > 0 else None
        for directory in glob.glob(os.path.join(glob.escape(self.cache_dir), "stage*")):
            j = os.path.basename(directory)[len("stage"):]
            if j.isdigit() and int(j) != keep and os.path.isdir(directory):
                self.delete_cache(int(j))

    def check_cache_room(self, shards: int = 1) -> None:
        """DiskSpaceError unless `shards` more shards for every rank that writes to cache_dir's disk
        (cache_sharers; see check_disk_space) fit there. A collective: every rank checks its disk, and all
        raise (each its own error, or the first rank's), so that none goes on alone into a collective."""
        c = self.cfg
        shard = cache_bytes(self.cache_entries, c.data.seq_len, c.model.d_model, self.dtype)
        try:
            check_disk_space(self.cache_dir, shards * self.cache_sharers * shard,
                             f"{shards * self.cache_sharers} shard(s) of {shard / 2**20:.1f} MiB: {shards} for "
                             f"each of the {self.cache_sharers} rank(s) writing to it")
            error = None
        except DiskSpaceError as e:
            error = e
        self.fail_together(error)

    def fail_together(self, error: Exception | None) -> None:
        """A collective: every rank passes the error it met (None: none). If any rank met one, every rank
        raises: its own, or the first rank's type and message after "another rank: ". An error met on one
        rank alone must not leave the others waiting for it in their next collective (gloo reports
        "Connection closed by peer", NCCL waits until its timeout)."""
        kind = None if error is None else type(error)
        try:
            pickle.dumps(kind)
        except Exception:  # noqa: BLE001  (a class pickle cannot name, e.g. one made inside a function)
            kind = RuntimeError
        reports = self.env.gather(None if error is None else (kind, str(error)))
        first = next((report for report in reports if report is not None), None)
        if first is None:
            return
        if error is not None:
            raise error
        kind, message = first
        try:
            other = kind(f"another rank: {message}")
        except TypeError:  # a type that takes other arguments than a message
            other = RuntimeError(f"another rank: {kind.__name__}: {message}")
        raise other

    def open_input(self, index: int) -> ActivationCache | None:
        """Phase `index`'s input cache (block k-1's, for stage k > 0 with caches; else None), held in
        _input_cache. A collective, before the phase reserves anything on the disk: first the room for what
        the phase adds there is checked on every rank (check_cache_room): its own cache if it writes one, and
        where some rank has lost its input (a wiped scratch disk), the input too, rebuilt from block k-2's
        (two shards at once while it is written). Then a missing input is rebuilt (open_cache)."""
        name, k, _ = self.phases[index]
        cached = self.cfg.train.cache and name == "stage" and k > 0
        cache = None
        if cached:
            def existing():  # None where it is missing: rebuilt below, once the disk is checked
                with contextlib.suppress(FileNotFoundError):
                    return ActivationCache.open(self._stage_dir(k - 1), self.env.rank, self._cache_expect(k - 1))

            cache = self.run_together(existing)  # a corrupt one (or another run's) stops every rank
        rebuild = cached and self.env.any(cache is None)
        writes = self.writes_cache(index)
        shards = (2 if k > 1 or writes else 1) if rebuild else int(writes)
        if shards:
            self.check_cache_room(shards)
        if rebuild:  # only some ranks rebuild; what fails there (a corrupt older shard) stops every rank
            cache = self.run_together(lambda: cache if cache is not None else self.open_cache(k - 1))
        self._input_cache = (k - 1, cache) if cached else (None, None)
        return cache

    def open_cache(self, k: int) -> ActivationCache:
        """Block k's cache. A missing one (deleted, or on a scratch disk wiped by a preemption) is rebuilt
        from the weights, identically: stage 0's draws come from fixed per-rank seeds. A corrupt or
        mismatched one stays an error (lwt.cache names the shard)."""
        try:
            return ActivationCache.open(self._stage_dir(k), self.env.rank, self._cache_expect(k))
        except FileNotFoundError:  # (deleted, wiped, or its writer killed: lwt.cache's "rerun it" is done here)
            print(f"rank {self.env.rank}: block {k}'s activation cache in {self._stage_dir(k)} is missing or "
                  f"incomplete; rebuilding it from the weights", flush=True)
        self.write_cache(k)  # opens (or rebuilds, recursively) its input, block k-1's cache
        if k > 0:
            self.delete_cache(k - 1)
        return ActivationCache.open(self._stage_dir(k), self.env.rank, self._cache_expect(k))

    def delete_cache(self, k: int) -> None:
        """Remove this rank's shard of block k's cache (and the directory once it is empty)."""
        directory = self._stage_dir(k)
        for path in glob.glob(os.path.join(glob.escape(directory), f"rank{self.env.rank}.*")):
            os.remove(path)
        try:
            os.rmdir(directory)
        except OSError:  # other ranks' shards remain, or it is gone already
            pass

    @torch.no_grad()
    def write_cache(self, k: int) -> None:
        """Block k's outputs for cache_sequences × cache_draws masked sequences (stage 0: new draws from a
        generator seeded per rank, the only stage that draws; stage k > 0: block k applied to stage k-1's
        cache), written as this rank's shard."""
        c = self.cfg
        entries = self.cache_entries
        S, D = c.data.seq_len, c.model.d_model
        nbytes = cache_bytes(entries, S, D, self.dtype)
        directory = self._stage_dir(k)
        # The input first: the shard this stage trained on (opened and verified once), else opened, or
        # rebuilt, here, before this shard is reserved: a rebuild of blocks k-1, k-2, ... then holds two
        # shards on the disk at a time, as the run did, not one reserved shard per stage it goes back.
        source = None if k == 0 else (
            self._input_cache[1] if self._input_cache[0] == k - 1 else self.open_cache(k - 1))
        if self.env.main:
            print(f"writing block {k}'s activation cache: {c.train.cache_sequences} sequences x "
                  f"{c.train.cache_draws} mask draws = {entries} entries of {S} tokens, "
                  f"{nbytes / 2**20:.1f} MiB per rank, to {directory}", flush=True)
        self.model.eval()
        B = c.data.batch_size
        meta = self._cache_expect(k)
        # CacheWriter checks the disk for this rank's shard; the other local ranks' shards are either
        # reserved already (no longer free) or checked by their own writers
        with CacheWriter(directory, self.env.rank, entries, S, D, self.dtype, meta) as writer:
            if k == 0:
                gen = torch.Generator().manual_seed(c.train.seed * 1_000_003 + 7919 * self.env.rank + 3)
                seqs = self.data.get_batch("train", c.train.cache_sequences, S, gen)  # (N_seq, S)
                tokens_all = seqs.repeat(c.train.cache_draws, 1)  # (entries, S): every draw of every sequence
                for start in range(0, entries, B):
                    tokens = tokens_all[start:start + B]
                    t = sample_t(tokens.shape[0], c.objective.mask_fraction_min, c.objective.mask_fraction_max, gen)
                    noisy, mask = mask_tokens(tokens, t, self.model.mask_id, gen)
                    hidden = self.model.run_blocks(self.model.embed_tokens(noisy.to(self.device)), 0, 1)
                    writer.append(hidden, tokens, mask, t)
            else:
                for _, hidden, tokens, mask, t in source.iter_chunks(B):
                    out = self.model.blocks[k](hidden.to(self.device, self.dtype))
                    writer.append(out, tokens, mask, t)
                del source
                self._input_cache = (None, None)  # that shard is deleted next
            writer.finish()

    # -- one phase -------------------------------------------------------------------------------------

    def run_phase(self, index: int, start_step: int) -> bool:
        """Phase `index` from start_step: its training steps (unless a checkpoint taken after them is being
        resumed), then its end (cache, checkpoint). False if --stop_after stopped it."""
        total = self.phases[index][2]
        if self.cfg.train.cache:  # (a run without caches has none in cache_dir, which it does not lock)
            self.remove_crashed_writers_files()  # before anything checks the disk or writes a cache
            self.remove_unneeded_caches(index)
        self.env.barrier()  # every rank's leftovers gone before any rank checks the disk for all of them
        if start_step < total:
            if not self.train_phase(index, start_step):
                return False
        elif self.writes_cache(index):  # resumed after the steps, before the cache write: its input and room
            self.open_input(index)
        self.finish_phase(index)
        return True

    def train_phase(self, index: int, start_step: int) -> bool:
        """The optimizer steps of phase `index`, then its evaluation and table row, then, if a cache write
        or final.pt / end_to_end.pt follows, a checkpoint at (index, total): a failure while writing those
        loses no training."""
        c, env = self.cfg, self.env
        name, k, total = self.phases[index]
        label = phase_label(name, k)
        if name == "end-to-end" and start_step == 0:
            seed_model_rng(c.train.seed, self.device)  # a fresh model with the layer-wise run's initial weights
            self.model = LWTModel(c.model, device=self.device, dtype=self.dtype)
        cached = c.train.cache and name == "stage" and k > 0
        cache = self.open_input(index)  # and the disk checked for this stage's cache: before training
        core = trainable_core(self.model, name, k)
        params = set_trainable(self.model, core)
        self._forget_digests(k + 1 if name == "stage" and k > 0 else 0)  # what this phase trains changes
        # 16-bit models train fp32 master copies of what this phase trains (only that part: one block in a
        # stage k): AdamW updates far below a bf16 ulp of the weight (norm weights near 1, small lrs, weight
        # decay) would otherwise round away.
        master = params if self.dtype == torch.float32 else [p.detach().float() for p in params]
        if self.master_state is not None:
            with torch.no_grad():
                for m, saved in zip(master, self.master_state):
                    m.copy_(saved)
            self.master_state = None
        self.master = None if master is params else master
        weights = params if self.master is None else params + master  # what check_finite checks before a save
        lr = c.train.joint_lr if name == "joint" else c.train.lr
        fused = dict(fused=True) if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(decay_groups(master, c.train.weight_decay), lr=lr,
                                betas=(c.train.beta1, c.train.beta2), **fused)
        if self.opt_state is not None:
            opt.load_state_dict(_regrouped(self.opt_state, master, opt))
            self.opt_state = None
        # DDP over what this phase trains; frozen parts stay outside. Every rank builds the same weights
        # from the same seeds (and loads the same checkpoint), so nothing needs broadcasting.
        if env.world > 1:
            core = nn.parallel.DistributedDataParallel(core, init_sync=False, **_NO_BUFFER_SYNC)
        tokens_per_step = c.data.batch_size * c.data.seq_len * env.world
        warmup = min(c.train.warmup_steps, total)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = Progress(label, total, enabled=env.main)
        t0 = time.perf_counter() - self.phase_wall
        t_log, steps_log = time.perf_counter(), 0
        t_steady, steady_steps = None, 0  # tokens/s leaves out the first step (compilation and autotuning)
        per_batch, per_masked = step_flops(self.model, name, k, cached, c.data.batch_size, c.data.seq_len)
        masked = torch.zeros((), dtype=torch.int64, device=self.device)  # this invocation's, on this rank
        for step in range(start_step, total):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup, c.train.min_lr_ratio)
            if cached:  # block k-1's outputs from the cache, with the tokens, masks and t behind them
                rows = torch.randint(0, cache.entries, (c.data.batch_size,), generator=self.data_gen)
                hidden_in, tokens, mask, t = self.to_device(*cache.batch(rows))
                final = self.model.final_hidden(core(hidden_in.to(self.dtype)))
            else:
                tokens, noisy, mask, t = self.fresh_batch()
                if name == "stage" and k > 0:
                    with torch.no_grad():  # the frozen prefix, recomputed (train.cache: false)
                        prefix = self.model.run_blocks(self.model.embed_tokens(noisy), 0, k)
                    final = self.model.final_hidden(core(prefix))
                else:  # stage 0 (StageZero), joint and end-to-end (LWTModel): noisy tokens -> final hidden
                    final = core(noisy)
            masked += mask.sum()  # (on the device: read once, at the phase's end)
            loss = self.loss(final, tokens, mask, t)
            loss.backward()
            if self.master is not None:
                for p, m in zip(params, master):
                    m.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            if c.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(master, c.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.master is not None:
                with torch.no_grad():
                    for p, m in zip(params, master):
                        p.copy_(m)
            if t_steady is None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t_steady = time.perf_counter()
            else:
                steady_steps += 1
            self.steps_run += 1
            steps_log += 1
            self.position = (index, step + 1)
            last = step + 1 == total
            if (step + 1) % c.train.log_every == 0 or last:
                value = env.all_mean(loss.item())
                if not math.isfinite(value):  # (the same mean on every rank: all of them stop)
                    raise self.diverged(f"{label}, step {step + 1}: the training loss is {value}", name)
                now = time.perf_counter()
                rate = steps_log * tokens_per_step / max(now - t_log, 1e-9)
                t_log, steps_log = now, 0
                bar.update(step + 1, value, rate)
                self.log(dict(phase=label, step=step + 1, loss=value, lr=opt.param_groups[0]["lr"],
                              tokens=(step + 1) * tokens_per_step, tokens_per_s=rate))
            if env.world == 1 or (step + 1) % c.train.log_every == 0:  # with DDP, where loss.item() syncs anyway
                self.terminated = env.any(self.sigterm)
            if not last and (self.stop_requested() or (c.train.ckpt_every and (step + 1) % c.train.ckpt_every == 0)):
                self.check_finite(weights, f"{label}, step {step + 1}", name)
                self.phase_wall = time.perf_counter() - t0
                self.save(opt)
            if not last and self.stop_requested():
                bar.close()
                return False
        bar.close()
        now = time.perf_counter()  # the last step's loss.item() waited for the GPU
        wall = now - t0
        steady_rate = (steady_steps * tokens_per_step / max(now - t_steady, 1e-9) if steady_steps
                       else total * tokens_per_step / max(wall, 1e-9))
        # (the last step's loss was logged, hence checked; an update it made may still have overflowed)
        self.check_finite(weights, f"{label}, step {total}", name)
        result = self.evaluate(k + 1 if name == "stage" else None)
        nelbo = env.all_mean(result["nelbo"])  # (NaN or inf on every rank where it is on one: all of them stop)
        if not math.isfinite(nelbo):
            raise self.diverged(f"{label}: the validation NELBO after step {total} is {nelbo}", name)
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        # model FLOPs per token at this invocation's share of masked tokens, times this rank's tokens/s
        batch_tokens = c.data.batch_size * c.data.seq_len
        per_token = (per_batch + per_masked * masked.item() / (total - start_step)) / batch_tokens
        tflops = per_token * steady_rate / env.world / 1e12
        peak_flops = peak_tflops(self.device, self.dtype)
        self.history.append(dict(phase=label, nelbo=result["nelbo"], ppl_bound=result["ppl_bound"],
                                 tokens=total * tokens_per_step, wall_s=wall, cache_s=0.0,
                                 tokens_per_s=steady_rate, tflops=tflops,
                                 mfu=None if peak_flops is None else tflops / peak_flops, peak_mib=peak,
                                 peak_kind="cuda" if self.device.type == "cuda" else "rss"))
        self.log(dict(phase=label, eval=result))
        if env.main:
            print(f"{label}: validation NELBO {result['nelbo']:.4f} nats/token "
                  f"(perplexity <= {result['ppl_bound']:.2f})", flush=True)
        self.master = None
        self.phase_wall = 0.0
        if self.writes_cache(index) or self.writes_model(index):
            # position (index, total), trained and evaluated: the cache or model file write may fail (a full
            # disk), and a resume then redoes that write, not the phase
            self.save(None)
        return True

    def check_finite(self, tensors: list[torch.Tensor], where: str, phase_name: str) -> None:
        """Raise TrainingDiverged, on every rank, if any of `tensors` (the trained weights, about to be
        saved or evaluated) holds a NaN or an inf: a collective, at the same point on every rank."""
        bad = bool(tensors) and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if self.env.any(bad):
            raise self.diverged(f"{where}: the trained weights are no longer finite (NaN or inf)", phase_name)

    def diverged(self, what: str, phase_name: str) -> TrainingDiverged:
        """The error for a run that stops on a NaN or inf: what happened, what checkpoint.pt still holds,
        and what to change. Nothing is saved after it, so the checkpoint and caches hold finite weights."""
        t = self.cfg.train
        lr_key, lr = ("train.joint_lr", t.joint_lr) if phase_name == "joint" else ("train.lr", t.lr)
        change = f"a lower {lr_key} (now {lr:g})" + (" or a train.grad_clip above 0" if t.grad_clip == 0 else "")
        if self.saved_at is None:
            return TrainingDiverged(f"{what}: the run diverged and stopped before its first checkpoint; start "
                                    f"again with {change}")
        index, step = self.saved_at  # (a phase not yet finished: this one or an earlier one)
        label = phase_label(*self.phases[index][:2])
        kept = f"{self.ckpt_path} holds " + (f"the start of {label}" if step == 0 else f"{label}, step {step}")
        return TrainingDiverged(f"{what}: the run diverged and stopped, saving nothing more ({kept}). A --resume "
                                f"would repeat the same steps: start again in a new train.out_dir with {change}")

    def writes_cache(self, index: int) -> bool:
        """Whether phase `index` ends by writing its block's activation cache (for the next stage)."""
        name, k, _ = self.phases[index]
        return name == "stage" and self.cfg.train.cache and k + 1 < self.cfg.model.n_layers

    def writes_model(self, index: int) -> bool:
        """Whether phase `index` ends by writing final.pt (the last layer-wise phase) or end_to_end.pt."""
        name = self.phases[index][0]
        return name == "end-to-end" or index == max(i for i, (n, _, _) in enumerate(self.phases) if n != "end-to-end")

    def finish_phase(self, index: int) -> None:
        """After phase `index`'s steps: stage k writes block k's cache (for stage k+1) and drops block
        k-1's; the last layer-wise phase writes final.pt, the end-to-end phase end_to_end.pt."""
        c, env = self.cfg, self.env
        name, k, _ = self.phases[index]
        if self.writes_cache(index):
            t0 = time.perf_counter()
            # (the barrier too: every rank's shard written, or every rank stops; a disk may fill up since the
            # room was checked)
            self.run_together(lambda: self.write_cache(k))
            self.history[-1]["cache_s"] = time.perf_counter() - t0
        if self.writes_model(index):  # before the checkpoint that moves past this phase
            self.save_model("final.pt" if name != "end-to-end" else "end_to_end.pt")
        self.position = (index + 1, 0)
        self.save(None)
        if name == "stage" and c.train.cache and k > 0:
            if self._input_cache[0] == k - 1:  # the last stage's input: still mapped (no cache write reset it)
                self._input_cache[1].close()
                self._input_cache = (None, None)
            self.delete_cache(k - 1)  # stage k+1 reads block k's; a resume rebuilds a missing one

    def stop_requested(self) -> bool:
        """Whether to stop now: a SIGTERM or SIGINT reached some rank, or --stop_after's steps have run."""
        return self.terminated or (self.args.stop_after is not None and self.steps_run >= self.args.stop_after)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out_dir, "metrics.jsonl")

    def log(self, record: dict) -> None:
        """Append `record` as one JSON line to metrics.jsonl (rank 0 only; other ranks do nothing)."""
        if not self.env.main:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with naming_errors(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.metrics_lines += 1

    def _cut_metrics(self) -> None:
        """Back to the lines the checkpoint had seen: steps logged after it will be logged again."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, "rb") as f:
            kept = sum(len(line) for line in f.readlines()[:self.metrics_lines])
        os.truncate(self.metrics_path, kept)  # one call: the lines kept are never rewritten, so never lost

    def fused_evaluation(self) -> None:
        """Before joint tuning: the assembled stack's NELBO (the table's "fused" line)."""
        result = self.evaluate(None)
        self.history.append(dict(phase="fused", nelbo=result["nelbo"], ppl_bound=result["ppl_bound"], tokens=0,
                                 wall_s=0.0, cache_s=0.0, tokens_per_s=0.0, tflops=None, mfu=None, peak_mib=0.0,
                                 peak_kind="-"))
        self.log(dict(phase="fused", eval=result))

    def run(self) -> bool:
        """All phases from the saved position; True when every phase finished, False when --stop_after or a
        SIGTERM or SIGINT stopped the run (after writing a checkpoint)."""
        index, step = self.position
        while index < len(self.phases):
            name = self.phases[index][0]
            if name == "joint" and step == 0:
                self.fused_evaluation()
            stopped = not self.run_phase(index, step)
            self.terminated = self.env.any(self.sigterm)  # one that came during the evaluation or cache write
            if stopped or (self.stop_requested() and self.position[0] < len(self.phases)):
                if self.env.main:
                    why = "--stop_after" if not self.terminated else (
                        "SIGTERM or SIGINT on another rank" if self.stop_signal is None
                        else signal.Signals(self.stop_signal).name)
                    print(f"stopped after {self.steps_run} steps ({why}; a checkpoint was written); continue "
                          f"with --resume", flush=True)
                return False
            index, step = self.position
        return True


class Progress:
    """A one-line progress bar on a terminal; one line per log step when stdout is not a terminal.

    Args:
        label: the phase's name. total: the phase's steps (> 0). enabled: False prints nothing.
    update(step, loss, rate) redraws the bar (loss, and rate in tokens/s); close() ends its line.
    """

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, rate: float) -> None:
        if not self.enabled:
            return
        filled = int(20 * step / self.total)
        line = (f"{self.label:>11} [{'#' * filled}{'.' * (20 - filled)}] {step}/{self.total} "
                f"loss {loss:.4f} {rate:,.0f} tok/s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


def print_table(history: list[dict], unigram: float | None) -> str:
    """The final table: one line per phase. "wall s" is the training steps; "cache s" writing the
    activation cache after them; tok/s counts training tokens per second from the phase's second step on
    (the first compiles and autotunes the kernels on a GPU; "wall s" includes it). TFLOP/s is one rank's
    model FLOPs (step_flops) at that rate; MFU divides it by the GPU's dense 16-bit peak (peak_tflops),
    "-" where none is known (the CPU, fp32 runs, GPUs not in the table).

    Args:
        history: one dict per row (phase, nelbo, ppl_bound, tokens, wall_s, cache_s, tokens_per_s, tflops,
            mfu, peak_mib, peak_kind), as Trainer.history holds them.
        unigram: the training tokens' unigram entropy in nats, for a last line; None: no such line.
    Returns:
        The table as one string (it prints nothing itself).
    """
    head = (f"{'phase':>11} {'val NELBO':>10} {'ppl <=':>9} {'tokens':>12} {'wall s':>8} {'cache s':>8} "
            f"{'tok/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in history:
        peak = "-" if r["peak_kind"] == "-" else f"{r['peak_mib']:.0f}" + ("*" if r["peak_kind"] == "rss" else "")
        # (rows of a checkpoint from before the FLOP count have no tflops)
        tflops = "-" if r.get("tflops") is None else f"{r['tflops']:.3g}"
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"{r['phase']:>11} {r['nelbo']:10.4f} {r['ppl_bound']:9.2f} {r['tokens']:12,d} {r['wall_s']:8.1f} "
                     f"{r['cache_s']:8.1f} {r['tokens_per_s']:10,.0f} {tflops:>8} {mfu:>6} {peak:>10}")
    if any(r["peak_kind"] == "rss" for r in history):
        lines.append("* CPU: the process's peak resident memory so far, not a per-phase peak")
    if unigram is not None:
        lines.append(f"unigram entropy of the training tokens: {unigram:.4f} nats/token (a model that ignores "
                     f"context scores this)")
    return "\n".join(lines)


def plot(history_path: str, out_png: str) -> None:
    """Write the training-loss curves (one per phase) and the validation NELBO bars to a PNG.

    Args:
        history_path: a metrics.jsonl written by the trainer. out_png: the image to write.
    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, evals = {}, []
    with open(history_path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                curves.setdefault(r["phase"], []).append((r["step"], r["loss"]))
            elif "eval" in r:
                evals.append((r["phase"], r["eval"]["nelbo"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts in curves.items():
        a.plot(*zip(*pts), label=label)
    a.set_xlabel("step in phase")
    a.set_ylabel("training loss")
    a.legend(fontsize=7)
    b.bar([p for p, _ in evals], [v for _, v in evals])
    b.set_ylabel("validation NELBO (nats/token)")
    b.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def _hash_module(state, module: nn.Module):
    """Feed a module's parameter names and fp32 values into a hashlib state; returns the state."""
    for name, p in module.named_parameters():
        state.update(name.encode())
        state.update(p.detach().float().cpu().numpy().tobytes())
    return state


def data_identity(data) -> dict:
    """What a resumed run checks its data against: the source, each split's length, and the sha256 of 64
    windows of 4096 tokens spread evenly over each split (a file cut short, grown or rewritten between the
    runs is refused; a large token file is never read whole).

    Args:
        data: the run's TokenData.
    Returns:
        {"source", "train_tokens", "val_tokens", "sample_sha256"}, plain JSON-able values.
    """
    state = hashlib.sha256()
    for ids in (data.train, data.val):
        n = len(ids)
        width = min(n, 4096)
        for i in range(64):
            start = (n - width) * i // 63
            if isinstance(ids, torch.Tensor):
                window = ids[start:start + width].numpy()
            else:  # read as the batches are (pread): the split's run-long map keeps no pages resident
                window = _read_into(ids, start, np.empty(width, ids.dtype))
            state.update(window.tobytes())
    return {"source": data.source, "train_tokens": data.num_tokens("train"), "val_tokens": data.num_tokens("val"),
            "sample_sha256": state.hexdigest()}


def _atomic_save(state: dict, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, rename: never half a file at `path`. A failed
    write (a full disk, an I/O error) is an OSError naming `path`, and leaves no temporary file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)  # a failed write (a full disk) leaves no checkpoint-sized temporary file
        except OSError:
            pass
        # torch.save reports a failed write as a RuntimeError of its zip writer ("[enforce fail at
        # inline_container.cc:...] unexpected pos ..."), the OSError (ENOSPC, EIO) only as its context; and
        # write, flush and fsync raise OSErrors that name no file.
        cause = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
        if isinstance(e, RuntimeError) and isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None  # a Ctrl-C inside the write: an interrupt, not a writer's error
        if isinstance(cause, OSError) and cause.filename is None:
            raise OSError(cause.errno, cause.strerror or str(cause), path) from e  # (tmp is removed: name path)
        raise


def lock_run_dirs(dirs: dict[str, str], rank: int) -> tuple[list, list[str]]:
    """Take an exclusive flock on <directory>/.rank{rank}.lock for each {config key: directory} (created if
    missing), so that a second run on the same out_dir (or the same cache_dir) while this one lives is
    refused instead of overwriting its checkpoints and deleting its caches. The lock lives as long as the
    returned files stay open; the OS drops it when the process ends, however it ends, so a killed run
    leaves no stale lock.

    Args:
        dirs: {config key: directory}, e.g. {"train.out_dir": ...}; a directory reached twice (by another
            path) is locked once.
        rank: this process's rank: each rank takes its own lock file.
    Returns:
        (the open lock files, messages). On the first lock another process holds: ([], one message naming
        it), after releasing the locks this call took and removing the directories it made. Without fcntl,
        or where a filesystem refuses flock, the run goes on unlocked and says so on stderr.
    Raises:
        OSError naming the key and the directory, after the same clean-up: a directory that cannot be made
            or a lock file that cannot be written (a file in the way, no permission).
    """
    files, seen, made = [], set(), []

    def release() -> None:
        for held in files:  # refused: leave nothing behind in the directories this call made
            held.close()
            if os.path.abspath(os.path.dirname(held.name)) in made:
                try:
                    os.remove(held.name)
                except OSError:
                    pass
        for directory in reversed(made):
            try:
                os.rmdir(directory)  # only if empty: something else may have appeared there meanwhile
            except OSError:
                pass

    if fcntl is None:
        print(f"rank {rank}: no fcntl on this platform: this run goes on without locking "
              f"{', '.join(dirs.values())}", file=sys.stderr, flush=True)
    for key, directory in dirs.items():
        missing, parent = [], os.path.abspath(directory)
        while not os.path.lexists(parent):  # it and the parents makedirs will make: (normalized) abspaths
            missing.append(parent)
            parent = os.path.dirname(parent)
        made.extend(reversed(missing))
        try:
            os.makedirs(directory, exist_ok=True)
            st = os.stat(directory)
        except OSError as e:  # a file in the way, no permission: a machine problem (exit 1), naming the key
            release()
            raise OSError(e.errno, f"{key}: cannot create the directory ({e.strerror or e})", directory) from None
        identity = (st.st_dev, st.st_ino)
        if identity in seen:  # the same directory by another path (a bind mount): locked already
            continue
        seen.add(identity)
        path = os.path.join(directory, f".rank{rank}.lock")
        if fcntl is None:
            continue
        try:
            f = open(path, "a+")
        except OSError as e:  # a read-only directory
            release()
            raise OSError(e.errno, f"{key}: cannot write its lock file ({e.strerror or e})", path) from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            release()
            return [], [f"{key}: {directory} is in use by another lwt run (pid {holder} holds {path}); wait for it "
                        f"to end, or choose another {key}"]
        except OSError as e:  # a filesystem without flock (NFS without lockd: ENOLCK; Lustre noflock: ENOSYS)
            f.close()
            print(f"rank {rank}: {key}: {directory} cannot be locked ({e.strerror}); this run goes on "
                  f"without the lock", file=sys.stderr, flush=True)
            continue
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        files.append(f)
    return files, []


def remove_dead_writers_temps(out_dir: str) -> None:
    """Delete the temporary files (<name>.pt.tmp<pid>) that _atomic_save left in out_dir when its process
    was killed mid-write: those of processes no longer running on this machine (a live writer's file is its
    own; a writer on another machine sharing out_dir would look dead). POSIX only (elsewhere signal 0 is no
    mere question).

    Args:
        out_dir: the run's directory (train.out_dir).
    """
    if os.name != "posix":
        return
    for path in glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp[0-9]*")):
        pid = path.rsplit(".tmp", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except PermissionError:  # it does, another user's
            continue
        except (ProcessLookupError, OverflowError):  # it does not
            try:
                os.remove(path)
            except (FileNotFoundError, IsADirectoryError):  # removed meanwhile; not _atomic_save's
                pass


def read_checkpoint(path: str):
    """torch.load(path) with weights_only (a checkpoint never runs code), onto the CPU.

    Args:
        path: the checkpoint file.
    Returns:
        The loaded object (the trainer's checkpoints are dicts).
    Raises:
        ValueError: naming the file, when it is not a torch checkpoint, is damaged, or holds objects other
            than weights. OSError and MemoryError (the file cannot be read or held) pass through.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if e.errno == errno.EINVAL and e.filename is None:
            # torch's zip reader looks for the archive's directory in the file's last 64 KiB: a file cut short to
            # between 4 and 64 KiB fails there as a bare EINVAL (no file name), not as a RuntimeError
            raise ValueError(f"checkpoint {path!r}: not a readable checkpoint (a damaged file: cut short?)") from None
        raise  # the file cannot be read (permissions, I/O): not a question of its contents
    except MemoryError:
        raise  # the file cannot be held
    except Exception as e:  # noqa: BLE001  bytes that are not a pickle also fail as IndexError, KeyError, ...
        text = str(e)
        if "Unsupported global" in text:  # weights_only refused a class
            why = "it holds objects other than weights, which could run code on loading"
        elif isinstance(e, (RuntimeError, EOFError)):
            why = f"a damaged file: {first_line(e)}"
        else:  # the unpickler's own errors: UnpicklingError, or IndexError/KeyError on a text file
            why = "not a torch checkpoint, or a damaged one"
        raise ValueError(f"checkpoint {path!r}: not a readable checkpoint ({why})") from None


def main(argv=None) -> int:
    """The command line (see the module docstring and parse_args): train every phase, then write the table.

    Args:
        argv: the arguments, without the program name; None: sys.argv[1:].
    Returns:
        0 when the run finished or --stop_after stopped it; 143 (128 + SIGTERM) when a SIGTERM stopped it,
        130 (128 + SIGINT) when a SIGINT (Ctrl-C) did (on another rank: 143).
        Either way a stopped run wrote a checkpoint to resume from.
    Raises:
        ValueError: a bad config, an out_dir or cache_dir locked by another run, an existing checkpoint
            without --resume (or a finished run's outputs without their checkpoint), a cache_dir holding
            another config's cache or a file where a stage's cache goes (refuse_foreign_caches), or a
            checkpoint or cache that does not match. DiskSpaceError: no room for a cache. OSError: an out_dir
            or cache_dir that cannot be made or locked (lock_run_dirs names the key).
        TrainingDiverged: the loss, the trained weights or a validation NELBO became NaN or inf (nothing was
            saved after it).
        SystemExit: a flag argparse refuses (usage error, status 2), or --plot without matplotlib.
        KeyboardInterrupt: a second SIGINT (the first stops the run with a checkpoint).
    Called from Python: torch's global RNG (the initial weights are drawn from it, seeded with train.seed)
    is restored on return, gradients are on and autocast off inside whatever mode the caller is in, the
    process group is made and destroyed only when none exists (under torchrun, one the caller made is used
    and kept: make it yourself to call main more than once), and signals are handled only from the main
    thread (from another thread, --stop_after is the way to stop).
    """
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib (pip install matplotlib); nothing was trained")
    env = Dist(cfg.train.device)
    trainer, locks, previous_handlers = None, [], {}
    numerics = contextlib.ExitStack()
    try:
        # Called from Python, the run is the same as from the shell: the caller's global RNG (which seeds the
        # initial weights) is restored when main returns, and its no_grad, inference_mode or autocast do not
        # reach the training.
        numerics.enter_context(torch.random.fork_rng(devices=[env.device.index] if env.device.type == "cuda" else []))
        numerics.enter_context(torch.inference_mode(False))
        numerics.enter_context(torch.enable_grad())
        numerics.enter_context(torch.autocast(env.device.type, enabled=False))
        trainer = Trainer(cfg, args, env)
        if threading.current_thread() is threading.main_thread():  # (signal handlers are the main thread's)
            # A scheduler preempting the job (SLURM, Kubernetes; torchrun passes it on to every rank) sends
            # SIGTERM, then SIGKILL after a grace period; a user's Ctrl-C sends SIGINT: stop at the next step,
            # with a checkpoint. A second SIGINT interrupts at once (KeyboardInterrupt), without one.
            def stop(signum, frame):
                trainer.sigterm = True
                trainer.stop_signal = trainer.stop_signal or signum
                if signum == signal.SIGINT:
                    signal.signal(signal.SIGINT, signal.default_int_handler)

            for signum in (signal.SIGTERM, signal.SIGINT):
                if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                    continue  # a background job's: a Ctrl-C meant for the shell's foreground job stays ignored
                previous_handlers[signum] = signal.signal(signum, stop)
        if args.resume and not os.path.exists(trainer.ckpt_path):  # (every rank sees out_dir: all raise here)
            trainer.resume()  # its "no checkpoint" error, before the locks make out_dir: nothing is left behind
        # Nothing so far wrote to out_dir or cache_dir; from here on this run owns them, or stops on every rank.
        t = cfg.train
        dirs = {"train.out_dir": t.out_dir}
        if t.cache and os.path.realpath(t.cache_dir) != os.path.realpath(t.out_dir):  # inside it too: another
            dirs["train.cache_dir"] = t.cache_dir  # run's out_dir may name this one's <out_dir>/cache as its cache_dir
        try:
            locks, busy = lock_run_dirs(dirs, env.rank)
            unmade = None
        except OSError as e:  # (a directory this rank cannot make): it too must reach the gather, or the
            locks, busy, unmade = [], [], e  # other ranks would wait there for it
        reports = env.gather((busy, None if unmade is None else str(unmade)))
        if unmade is not None:
            raise unmade
        elsewhere = next((error for _, error in reports if error is not None), None)
        if elsewhere is not None:
            raise OSError(f"another rank: {elsewhere}")
        busy = [message for messages, _ in reports for message in messages]
        if busy:
            raise ValueError(busy[0])
        if args.resume:
            trainer.resume()
        elif os.path.exists(trainer.ckpt_path):  # every rank checks: none may go on alone
            raise ValueError(f"{trainer.ckpt_path} exists: pass --resume to continue that run, or choose another "
                             f"train.out_dir")
        else:  # a finished run whose checkpoint.pt was deleted: its outputs would sit beside this run's
            stale = [name for name in OUTPUTS if os.path.exists(os.path.join(trainer.out_dir, name))]
            if stale:
                raise ValueError(f"train.out_dir: {trainer.out_dir} holds another run's {', '.join(stale)} (and no "
                                 f"checkpoint.pt to resume): choose another train.out_dir, or move them away")
        if t.cache:  # (a resumed run too: its cache_dir may be another than the one it started with)
            trainer.refuse_foreign_caches()  # (before anything in out_dir or cache_dir is deleted)
            trainer.cache_sharers = trainer.count_cache_sharers()  # what each disk check counts
        if not args.resume and env.main and os.path.exists(trainer.metrics_path):
            os.remove(trainer.metrics_path)  # a run that never checkpointed: start its log afresh
        if env.main:  # rank 0 writes every .pt; not before a refusal: this run owns out_dir only from here
            remove_dead_writers_temps(trainer.out_dir)
        if env.main:
            m = trainer.model
            print(f"lwt layer-wise training on {env.device} ({trainer.dtype}, {env.world} process(es)): "
                  f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {m.num_params():,} trainable "
                  f"parameters; data: {trainer.data.description or cfg.data.source}", flush=True)
        if not trainer.run():
            env.barrier()
            # 143 or 130, as a process killed by the signal
            return 128 + int(trainer.stop_signal or signal.SIGTERM) if trainer.terminated else 0
        if env.main:
            unigram = trainer.data.unigram_entropy("train") if cfg.data.source != "dummy" else None
            table = print_table(trainer.history, unigram)
            print("\n" + table, flush=True)
            with open(os.path.join(trainer.out_dir, "table.txt"), "w") as f:
                f.write(table + "\n")
            if args.plot:
                plot(os.path.join(trainer.out_dir, "metrics.jsonl"), os.path.join(trainer.out_dir, "curves.png"))
                print(f"wrote {os.path.join(trainer.out_dir, 'curves.png')}")
        # Every rank leaves together: a rank tearing its process group down while another still works
        # with it (rank 0 writing the table) can abort in gloo's threads at exit.
        env.barrier()
        return 0
    finally:
        try:
            for signum, previous in previous_handlers.items():  # (None: a handler installed outside Python;
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # the default stands in)
            # DDP holds the process group, and reference cycles (its autograd hooks) would keep the trainer
            # alive until interpreter shutdown, where gloo's worker threads, freeing tensors, abort on the GIL
            # (pytorch#179291 describes it): free them now, while the interpreter is whole.
            del trainer
            gc.collect()
        finally:  # the locks go even when a second Ctrl-C lands in the above (a notebook's kernel lives on)
            try:
                for f in locks:
                    f.close()
                env.close()
            finally:
                numerics.close()  # the caller's RNG and modes, however the rest went


def cli() -> None:
    """`python -m lwt.train_layerwise`: main(), its errors printed as one line with an exit status (2: the
    input; 1: the machine or the training), not as tracebacks."""
    try:
        sys.exit(main())
    except ValueError as e:  # a bad config, flag, checkpoint or cache: the message says which and why
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DiskSpaceError, OSError, TrainingDiverged) as e:  # the machine (no room, a path that cannot be made)
        print(f"error: {e}", file=sys.stderr)  # or the training itself (NaN): not the input
        sys.exit(1)
    except RuntimeError as e:  # (torch.OutOfMemoryError is one)
        if not out_of_memory(e):
            raise
        print(f"error: out of memory ({first_line(e)}); lower data.batch_size or data.seq_len (or the model's "
              f"sizes, or train.cache_sequences if it failed writing a cache). What was saved is intact; a resumed "
              f"run keeps its config, so smaller settings mean a new run", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
