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

Each phase has its own AdamW (fused on CUDA) and linear-warmup + cosine schedule. Every phase ends with
the validation NELBO (lwt.diffusion.evaluate_nelbo) and a line of the final table. Outputs in out_dir:
metrics.jsonl (every logged step and every evaluation), checkpoint.pt (the latest, written atomically)
and, with --plot, curves.png.

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m lwt.train_layerwise ...` runs DDP over data on
what the phase trains (frozen parts are not wrapped; no buffer is broadcast: every rank regenerates the
frozen matrices from their seeds). Each rank draws its own data and writes its own cache shard; rank 0
writes metrics and checkpoints.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import sys
import time
import torch
import torch.distributed as dist
from torch import nn

from .cache import ActivationCache, CacheWriter, cache_bytes, check_disk_space
from .config import Config, config_from_dict, config_to_dict, load_config
from .data import build_data
from .diffusion import evaluate_nelbo, mask_tokens, masked_diffusion_loss, sample_t
from .model import LWTModel

CHECKPOINT_FORMAT = 1


# -- setup ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """The CLI. Besides --config/--set, any `--key value` pair is a config override of a key that exists
    in one section (`--max_steps 50`), and `--dummy True` selects the dummy data source: the original
    quickstart form `--dummy True --max_steps 50` works as it did."""
    p = argparse.ArgumentParser(prog="python -m lwt.train_layerwise", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the built-in defaults, as config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (section.key or a unique bare key); repeatable")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoint.pt")
    p.add_argument("--end_to_end", action="store_true",
                   help="also train the same model end to end on the same token budget, for comparison")
    p.add_argument("--plot", action="store_true", help="write <out_dir>/curves.png (needs matplotlib)")
    p.add_argument("--dummy", type=_parse_bool, default=None, help="True: random tokens (data.source=dummy)")
    p.add_argument("--stop_after", type=int, default=None, metavar="STEPS",
                   help="stop, as if preempted, after this many optimizer steps of this invocation (a "
                        "checkpoint is written first): for testing --resume")
    args, rest = p.parse_known_args(argv)
    overrides = list(args.set)
    if args.dummy:
        overrides.insert(0, "data.source=dummy")
    i = 0
    while i < len(rest):  # --key value / --key=value pairs: overrides resolved (and checked) by lwt.config
        item = rest[i]
        if not item.startswith("--"):
            p.error(f"unexpected argument {item!r}")
        if "=" in item:
            overrides.append(item[2:])
            i += 1
        elif i + 1 < len(rest):
            overrides.append(f"{item[2:]}={rest[i + 1]}")
            i += 2
        else:
            p.error(f"{item}: expected a value")
    args.overrides = overrides
    return args


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class Dist:
    """Rank, world size and device; a process group when launched by torchrun with WORLD_SIZE > 1."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        if device_name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"train.device: expected a device this machine has, got {device_name!r} "
                                 f"(no CUDA GPU is visible)")
            self.device = torch.device(f"cuda:{local}" if device_name == "cuda" and self.world > 1 else device_name)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def all_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# -- phases --------------------------------------------------------------------------------------------

def phases(cfg: Config, end_to_end: bool) -> list[tuple[str, int, int]]:
    """(name, index, optimizer steps) of every phase, in order. The end-to-end phase gets the steps of
    all the others, so both sides see the same number of tokens."""
    L, steps = cfg.model.n_layers, cfg.train.max_steps
    out = [("stage", k, steps) for k in range(L)]
    if cfg.train.joint_steps:
        out.append(("joint", 0, cfg.train.joint_steps))
    if end_to_end:
        out.append(("end-to-end", 0, sum(n for _, _, n in out)))
    return out


def phase_label(name: str, index: int) -> str:
    return f"stage {index}" if name == "stage" else name


def trainable_core(model: LWTModel, name: str, k: int) -> nn.Module:
    """What a phase trains, as one module (what DDP wraps): stage 0 the embedding, block 0, the final
    norm and an untied head; stage k block k; joint and end-to-end the whole model (its frozen SwiGLU
    matrices are buffers, never trained)."""
    if name == "stage":
        return StageZero(model) if k == 0 else model.blocks[k]
    return model


def set_trainable(model: LWTModel, core: nn.Module) -> list[nn.Parameter]:
    """requires_grad on the core's parameters, off elsewhere; the frozen rest goes to eval mode."""
    model.requires_grad_(False)
    model.eval()
    core.requires_grad_(True)
    core.train()
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then a cosine from lr down to lr · min_ratio at `total`."""
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
        return self.norm(self.block(self.embed(noisy)))  # (B, S, D)


# -- the trainer ---------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: Config, args, env: Dist):
        self.cfg, self.args, self.env = cfg, args, env
        t = cfg.train
        self.device = env.device
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.out_dir = t.out_dir
        self.cache_dir = t.cache_dir or os.path.join(t.out_dir, "cache")
        self.data = build_data(cfg.data, cfg.model.vocab_size)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = LWTModel(cfg.model, device=self.device, dtype=self.dtype)
        self.phases = phases(cfg, args.end_to_end)
        # Per-rank generators: the data windows and the masks of each rank differ; both are saved.
        self.data_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 17 * env.rank + 1)
        self.mask_gen = torch.Generator().manual_seed(t.seed * 1_000_003 + 17 * env.rank + 2)
        self.history = []       # one dict per finished phase: the final table
        self.position = (0, 0)  # (phase index, step) to run next
        self.opt_state = None
        self.phase_wall = 0.0   # wall seconds spent in the current phase before this invocation
        self.steps_run = 0      # optimizer steps in this invocation (for --stop_after)
        self.fingerprint = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]

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
        if not self.env.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "end_to_end": self.args.end_to_end,
            "phase": self.position[0],
            "step": self.position[1],
            "model": {k: v.detach().cpu() for k, v in self.model.trainable_state_dict().items()},
            "frozen_checksum": self.model.frozen_checksum(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": all_rng,
            "history": json.dumps(self.history),
            "phase_wall": self.phase_wall,
        }
        os.makedirs(self.out_dir, exist_ok=True)
        tmp = self.ckpt_path + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.ckpt_path)

    def resume(self) -> None:
        """Load <out_dir>/checkpoint.pt (weights_only: a checkpoint never runs code) and continue where it
        stopped. The config must be the one the checkpoint was written with."""
        if not os.path.exists(self.ckpt_path):
            raise ValueError(f"--resume: no checkpoint at {self.ckpt_path} (train.out_dir={self.out_dir!r})")
        state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.ckpt_path}: unknown checkpoint format {state.get('format')!r}")
        saved = config_to_dict(config_from_dict(state["config"]))
        now = config_to_dict(self.cfg)
        diff = [f"{s}.{k}: {saved[s][k]!r} -> {now[s][k]!r}" for s in now for k in now[s] if saved[s][k] != now[s][k]]
        if diff or state["end_to_end"] != self.args.end_to_end:
            raise ValueError(f"--resume: the config differs from the checkpoint's ({'; '.join(diff) or '--end_to_end'}); "
                             f"resume with the same config, or start a new out_dir")
        if len(state["rng"]) != self.env.world:
            raise ValueError(f"--resume: the checkpoint was written by {len(state['rng'])} ranks, this run has "
                             f"{self.env.world}")
        self.model.load_trainable_state_dict(state["model"])
        if self.model.frozen_checksum() != state["frozen_checksum"]:
            raise ValueError(f"{self.ckpt_path}: the frozen SwiGLU matrices regenerated from frozen_seed do not "
                             f"match the checkpoint's checksum (another torch version's generator?)")
        rng = state["rng"][self.env.rank]
        self.data_gen.set_state(rng["data"])
        self.mask_gen.set_state(rng["mask"])
        torch.set_rng_state(rng["torch"])
        self.position = (state["phase"], state["step"])
        self.opt_state = state["optimizer"]
        self.history = json.loads(state["history"])
        self.phase_wall = state["phase_wall"]
        if self.env.main:
            name, k, _ = self.phases[min(self.position[0], len(self.phases) - 1)]
            print(f"resumed from {self.ckpt_path}: {phase_label(name, k)}, step {self.position[1]}", flush=True)

    # -- batches ---------------------------------------------------------------------------------------

    def fresh_batch(self):
        """Clean tokens from the train split, a stratified t per sequence and a Bernoulli(t) mask."""
        c = self.cfg
        tokens = self.data.get_batch("train", c.data.batch_size, c.data.seq_len, self.data_gen)  # (B, S)
        t = sample_t(c.data.batch_size, c.objective.mask_fraction_min, c.objective.mask_fraction_max, self.mask_gen)
        noisy, mask = mask_tokens(tokens, t, self.model.mask_id, self.mask_gen)
        to = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        return to(tokens), to(noisy), to(mask), to(t)

    def loss(self, final, tokens, mask, t):
        """final: final normalised hidden states (B, S, D); the tied head and the masked positions' loss."""
        return masked_diffusion_loss(final, self.model.head_weight(), tokens, mask, t, self.cfg.objective.loss_weighting)

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
        digest = hashlib.sha256()
        for module in [self.model.embed] + list(self.model.blocks[:k + 1]):
            for name, p in module.named_parameters():
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().numpy().tobytes())
        c = self.cfg
        return dict(stage=k, fingerprint=self.fingerprint, weights=digest.hexdigest()[:16], seq_len=c.data.seq_len,
                    d_model=c.model.d_model, entries=c.train.cache_sequences * c.train.cache_draws)

    @torch.no_grad()
    def write_cache(self, k: int) -> None:
        """Block k's outputs for cache_sequences × cache_draws masked sequences (stage 0: new draws from a
        generator seeded per rank and stage; stage k > 0: block k applied to stage k-1's cache), written
        as this rank's shard."""
        c = self.cfg
        entries = c.train.cache_sequences * c.train.cache_draws
        S, D = c.data.seq_len, c.model.d_model
        nbytes = cache_bytes(entries, S, D, self.dtype)
        directory = self._stage_dir(k)
        if self.env.main:
            print(f"writing block {k}'s activation cache: {entries} sequences x {S} tokens, "
                  f"{nbytes / 2**20:.1f} MiB per rank, to {directory}", flush=True)
        check_disk_space(self.cache_dir, nbytes)
        self.model.eval()
        B = c.data.batch_size
        meta = self._cache_expect(k)
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
                source = ActivationCache.open(self._stage_dir(k - 1), self.env.rank, self._cache_expect(k - 1))
                for _, hidden, tokens, mask, t in source.iter_chunks(B):
                    out = self.model.blocks[k](hidden.to(self.device, self.dtype))
                    writer.append(out, tokens, mask, t)
            writer.finish()

    # -- one phase -------------------------------------------------------------------------------------

    def run_phase(self, index: int, start_step: int) -> bool:
        """Train phase `index` from start_step; False if --stop_after stopped it."""
        c, env = self.cfg, self.env
        name, k, total = self.phases[index]
        label = phase_label(name, k)
        if name == "end-to-end" and start_step == 0:
            torch.manual_seed(c.train.seed)  # a fresh model with the layer-wise run's initial weights
            self.model = LWTModel(c.model, device=self.device, dtype=self.dtype)
        core = trainable_core(self.model, name, k)
        params = set_trainable(self.model, core)
        lr = c.train.joint_lr if name == "joint" else c.train.lr
        fused = dict(fused=True) if self.device.type == "cuda" else {}
        opt = torch.optim.AdamW(params, lr=lr, betas=(c.train.beta1, c.train.beta2),
                                weight_decay=c.train.weight_decay, **fused)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
            self.opt_state = None
        # DDP over what this phase trains; frozen parts stay outside. Every rank builds the same weights
        # from the same seeds (and loads the same checkpoint), so nothing needs broadcasting.
        if env.world > 1:
            core = nn.parallel.DistributedDataParallel(core, broadcast_buffers=False, init_sync=False)
        cached = c.train.cache and name == "stage" and k > 0
        cache = None
        if cached:
            cache = ActivationCache.open(self._stage_dir(k - 1), env.rank, self._cache_expect(k - 1))
        tokens_per_step = c.data.batch_size * c.data.seq_len * env.world
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = Progress(label, total, enabled=env.main)
        t0 = time.perf_counter() - self.phase_wall
        t_log, steps_log = time.perf_counter(), 0
        for step in range(start_step, total):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, c.train.warmup_steps, c.train.min_lr_ratio)
            if cached:  # block k-1's outputs from the cache, with the tokens, masks and t behind them
                rows = torch.randint(0, cache.entries, (c.data.batch_size,), generator=self.data_gen)
                hidden_in, tokens, mask, t = (x.to(self.device) for x in cache.batch(rows))
                final = self.model.final_hidden(core(hidden_in.to(self.dtype)))
            else:
                tokens, noisy, mask, t = self.fresh_batch()
                if name == "stage" and k > 0:
                    with torch.no_grad():  # the frozen prefix, recomputed (train.cache: false)
                        prefix = self.model.run_blocks(self.model.embed_tokens(noisy), 0, k)
                    final = self.model.final_hidden(core(prefix))
                else:  # stage 0 (StageZero), joint and end-to-end (LWTModel): noisy tokens -> final hidden
                    final = core(noisy)
            loss = self.loss(final, tokens, mask, t)
            loss.backward()
            if c.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, c.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.steps_run += 1
            steps_log += 1
            self.position = (index, step + 1)
            last = step + 1 == total
            if (step + 1) % c.train.log_every == 0 or last:
                value = env.all_mean(loss.item())
                now = time.perf_counter()
                rate = steps_log * tokens_per_step / max(now - t_log, 1e-9)
                t_log, steps_log = now, 0
                bar.update(step + 1, value, rate)
                self.log(dict(phase=label, step=step + 1, loss=value, lr=opt.param_groups[0]["lr"],
                              tokens=(step + 1) * tokens_per_step, tokens_per_s=rate))
            stop = self.args.stop_after is not None and self.steps_run >= self.args.stop_after
            if not last and (stop or (c.train.ckpt_every and (step + 1) % c.train.ckpt_every == 0)):
                self.phase_wall = time.perf_counter() - t0
                self.save(opt)
            if stop and not last:
                bar.close()
                if env.main:
                    print(f"stopped after {self.steps_run} steps (--stop_after); continue with --resume", flush=True)
                return False
        bar.close()
        wall = time.perf_counter() - t0
        result = self.evaluate(k + 1 if name == "stage" else None)
        peak = (torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        row = dict(phase=label, nelbo=result["nelbo"], ppl_bound=result["ppl_bound"], tokens=total * tokens_per_step,
                   wall_s=wall, tokens_per_s=total * tokens_per_step / max(wall, 1e-9), peak_mib=peak, peak_kind="cuda" if self.device.type == "cuda" else "rss")
        self.history.append(row)
        self.log(dict(phase=label, eval=result))
        if env.main:
            print(f"{label}: validation NELBO {result['nelbo']:.4f} nats/token (perplexity <= {result['ppl_bound']:.2f})",
                  flush=True)
        if name == "stage" and k + 1 < self.cfg.model.n_layers and c.train.cache:
            self.write_cache(k)
            env.barrier()
        self.position = (index + 1, 0)
        self.phase_wall = 0.0
        self.save(None)
        return True

    def log(self, record: dict) -> None:
        if not self.env.main:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def fused_evaluation(self) -> None:
        """Before joint tuning: the assembled stack's NELBO (the table's "fused" line)."""
        result = self.evaluate(None)
        self.history.append(dict(phase="fused", nelbo=result["nelbo"], ppl_bound=result["ppl_bound"], tokens=0,
                                 wall_s=0.0, tokens_per_s=0.0, peak_mib=0.0, peak_kind="-"))
        self.log(dict(phase="fused", eval=result))

    def run(self) -> bool:
        """All phases from the saved position; True when every phase finished."""
        index, step = self.position
        while index < len(self.phases):
            name = self.phases[index][0]
            if name == "joint" and step == 0:
                self.fused_evaluation()
            if not self.run_phase(index, step):
                return False
            index, step = self.position
        return True


class Progress:
    """A one-line progress bar on a terminal; one line per log step when stdout is not a terminal."""

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
    head = f"{'phase':>11} {'val NELBO':>10} {'ppl <=':>9} {'tokens':>12} {'wall s':>8} {'tok/s':>10} {'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    for r in history:
        peak = f"{r['peak_mib']:.0f}" + ("" if r["peak_kind"] == "cuda" else "*") if r["peak_kind"] != "-" else "-"
        lines.append(f"{r['phase']:>11} {r['nelbo']:10.4f} {r['ppl_bound']:9.2f} {r['tokens']:12,d} {r['wall_s']:8.1f} "
                     f"{r['tokens_per_s']:10,.0f} {peak:>10}")
    if any(r["peak_kind"] == "rss" for r in history):
        lines.append("* CPU: the process's peak resident memory so far, not a per-phase peak")
    if unigram is not None:
        lines.append(f"unigram entropy of the training tokens: {unigram:.4f} nats/token (a model that ignores "
                     f"context scores this)")
    return "\n".join(lines)


def plot(history_path: str, out_png: str) -> None:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib (pip install matplotlib); nothing was trained")
    env = Dist(cfg.train.device)
    try:
        trainer = Trainer(cfg, args, env)
        if args.resume:
            trainer.resume()
        elif env.main and os.path.exists(trainer.ckpt_path):
            raise ValueError(f"{trainer.ckpt_path} exists: pass --resume to continue that run, or choose another "
                             f"train.out_dir")
        if env.main:
            m = trainer.model
            print(f"lwt layer-wise training on {env.device} ({trainer.dtype}, {env.world} process(es)): "
                  f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {m.num_params():,} trainable "
                  f"parameters; data: {trainer.data.description or cfg.data.source}", flush=True)
        if not trainer.run():
            return 0
        if env.main:
            unigram = trainer.data.unigram_entropy("train") if cfg.data.source != "dummy" else None
            table = print_table(trainer.history, unigram)
            print("\n" + table, flush=True)
            with open(os.path.join(trainer.out_dir, "table.txt"), "w") as f:
                f.write(table + "\n")
            if args.plot:
                plot(os.path.join(trainer.out_dir, "metrics.jsonl"), os.path.join(trainer.out_dir, "curves.png"))
                print(f"wrote {os.path.join(trainer.out_dir, 'curves.png')}")
        return 0
    finally:
        env.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:  # a bad config, flag, checkpoint or cache: the message says which and why
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
