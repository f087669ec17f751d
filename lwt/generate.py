"""Sample from a trained checkpoint by iterative unmasking (lwt.diffusion.sample).

    python -m lwt.generate --checkpoint runs/default/final.pt --prompt "The " --length 256 --steps 64

The checkpoint (written by lwt.train_layerwise) is a dict: "config" (the Config as nested plain dicts),
"model" (LWTModel.trainable_state_dict()) and "frozen_checksum" (LWTModel.frozen_checksum()). The frozen
SwiGLU matrices are not stored: they are regenerated from model.frozen_seed and checked against the
checksum. Text models (data.source "text") are byte-level: the prompt is encoded as UTF-8 bytes and the
samples decoded with errors="replace"; for other sources the prompt is whitespace-separated token ids and
the samples are printed as ids.

A run's resume state (checkpoint.pt, written mid-run) also holds the phase it stopped in. Written during
stage k, it samples through blocks 0..k only (blocks 0..k-1 when stage k had not taken a step yet), as
that stage's validation does: the later blocks are not trained yet (lwt.train_layerwise), and a note on
stderr says so. Written during or after a run's --end_to_end phase, it holds that comparison model, not
the layer-wise one (final.pt), and a note says that too.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import config_from_dict
from .data import TokenData
from .diffusion import ORDERS, sample
from .model import LWTModel
from .train_layerwise import first_line, out_of_memory, phase_label, phases, read_checkpoint


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[LWTModel, str]:
    """Rebuild the model of a checkpoint, check its frozen matrices, and move it to `device`.

    The model is built in the dtype of the stored weights (so its frozen buffers are rounded as they were
    in training and the checksum can match), then kept in that dtype on CUDA and cast to fp32 on the CPU.

    Args:
        path: a checkpoint written by lwt.train_layerwise (final.pt, end_to_end.pt or checkpoint.pt); a
            leading ~ is expanded.
        device: where the model goes, "cpu" by default.
    Returns:
        (model, source): the LWTModel in eval mode, and the config's data.source ("dummy", "text" or "tokens").
        The model holds every block; of a resume state written mid-run, trained_depth says how many are
        trained.
    Raises:
        FileNotFoundError: no file at path (nothing, or a directory).
        ValueError: an unreadable or malformed checkpoint, an invalid config, weights that do not fit it, or
            a frozen-matrix checksum mismatch.
    """
    model, source, _ = _load(path, device)
    return model, source


def _load(path: str, device) -> tuple[LWTModel, str, dict]:
    """load_checkpoint's work; also returns the checkpoint's dict."""
    path = os.path.expanduser(os.fspath(path))  # `--checkpoint=~/runs/...`: a shell expands no ~ after `=`
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint: {path!r} is a directory; pass a checkpoint file in it (final.pt, "
                                f"end_to_end.pt or checkpoint.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path!r}")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {"config", "model", "frozen_checksum"} <= set(ckpt):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path!r}: expected a dict with keys 'config', 'model' and 'frozen_checksum', "
                         f"got {keys}")
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["config"], dict):
        raise ValueError(f"checkpoint {path!r}: expected 'config' and 'model' to be dicts, got "
                         f"{type(ckpt['config']).__name__} and {type(ckpt['model']).__name__}")
    cfg = config_from_dict(ckpt["config"])
    model_cfg, source = cfg.model, cfg.data.source
    floats = [v for v in ckpt["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    model = LWTModel(model_cfg, dtype=dtype)
    model.load_trainable_state_dict(ckpt["model"])
    checksum = model.frozen_checksum()
    if checksum != ckpt["frozen_checksum"]:
        raise ValueError(f"checkpoint {path!r}: the frozen SwiGLU matrices regenerated from frozen_seed="
                         f"{model_cfg.frozen_seed} have checksum {checksum}, but the checkpoint was trained with "
                         f"{ckpt['frozen_checksum']} (a different seed, dtype or random generator; an lwt before "
                         f"d2e59f9 drew them in fp32, not float64: sample its checkpoints with that lwt)")
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype if device.type == "cuda" else torch.float32)
    return model.eval(), source, ckpt


def trained_depth(ckpt: dict, path: str) -> tuple[int | None, str | None]:
    """How many blocks of a checkpoint's model to sample through, and a note saying why when not all.

    Args:
        ckpt: a loaded checkpoint (load_checkpoint's checks passed). path: its file, for messages.
    Returns:
        (None, None) for a model trained through every block: final.pt and end_to_end.pt (which hold no
        phase), or a resume state written in or after the joint phase; (None, note) for a resume state
        holding the --end_to_end comparison model (written during or after its phase). For one written during
        stage k after s of its steps: (k + 1, note), or (k, note) when s is 0 (block k untrained),
        the blocks that stage's validation runs; (None, None) when that is every block.
    Raises:
        ValueError: a resume state whose phase or step is not an int >= 0 (a damaged checkpoint).
    """
    if "phase" not in ckpt:
        return None, None
    index, step = ckpt["phase"], ckpt.get("step")
    for name, value in (("phase", index), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"checkpoint {path!r}: expected {name!r} to be an int >= 0, got {value!r}")
    cfg = config_from_dict(ckpt["config"])
    order = phases(cfg, bool(ckpt.get("end_to_end", False)))
    e2e = [i for i, (name, _, _) in enumerate(order) if name == "end-to-end"]
    if e2e and (index > e2e[0] or (index == e2e[0] and step > 0)):  # the comparison model has replaced it
        when = (f"during the end-to-end phase (step {step} of {order[e2e[0]][2]})" if index == e2e[0]
                else "after the end-to-end phase")
        return None, (f"{path} was written {when}: this is the --end_to_end comparison model, trained from scratch "
                      f"for {step if index == e2e[0] else 'all'} of its steps, not the layer-wise model "
                      f"(final.pt)")
    if index >= len(order) or order[index][0] != "stage":
        return None, None
    _, k, steps = order[index]
    depth = k + 1 if step > 0 else k
    if depth == cfg.model.n_layers:
        return None, None
    if depth == 0:
        return 0, (f"{path} was written before stage 0's first step: no block is trained yet; sampling from "
                   f"the embedding and the head alone")
    when = (f"during {phase_label('stage', k)} (step {step} of {steps})" if step > 0
            else f"at the end of {phase_label('stage', k - 1)}")
    return depth, (f"{path} was written {when}: sampling through blocks 0..{depth - 1}, as that stage's "
                   f"validation does; blocks {depth}..{cfg.model.n_layers - 1} are not trained yet")


def tokenizer(source: str, vocab_size: int) -> TokenData:
    """lwt.data's encode/decode for `source` without loading any corpus: UTF-8 bytes for text (decoded
    with errors="replace"), whitespace-separated ids otherwise.

    Args:
        source: the data source the model was trained on: "dummy", "text" or "tokens".
        vocab_size: the model's vocabulary size (encode refuses ids outside [0, vocab_size) for non-text sources).
    Returns:
        A TokenData with empty splits: use only its encode() and decode().
    """
    empty = torch.empty(0, dtype=torch.int64)
    return TokenData(empty, empty, vocab_size, source, "tokenizer only: no corpus")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lwt.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by lwt.train_layerwise")
    p.add_argument("--prompt", default=None, help="kept fixed at the start of every sample")
    p.add_argument("--length", type=int, default=256, help="tokens per sample, prompt included")
    p.add_argument("--steps", type=int, default=64, help="unmasking steps")
    p.add_argument("--order", choices=ORDERS, default="random",
                   help="which draws to keep at each step (confidence collapses to spaces on small models)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    return p


# sample()'s arguments that come from flags of the same name
_SAMPLER_FLAGS = ("prompt", "length", "steps", "order", "num_samples", "temperature")


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """--device as a torch.device this machine has, else a usage error naming the flag."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            parser.error(f"--device: {name!r} asked for, but this machine has {count} CUDA GPU(s)")
    return device


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring): load the checkpoint, sample, print each sample.

    Args:
        argv: the arguments, without the program name; None: sys.argv[1:].
    Returns:
        0; 1 when stdout's reader closed it early (`| head`: the rest is not printed, no traceback). A bad
        flag, a missing or invalid checkpoint, a prompt or setting that sampling refuses, or samples too
        large to allocate exit with status 2 (SystemExit) and a message.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed: expected an int in [0, 2**64) (a torch.Generator seed), got {args.seed}")
    device = _device(parser, args.device)
    try:
        model, source, ckpt = _load(args.checkpoint, device)
        depth, note = trained_depth(ckpt, args.checkpoint)
        if note:
            print(f"note: {note}", file=sys.stderr)
        tok = tokenizer(source, model.vocab_size)
        prompt = tok.encode(args.prompt) if args.prompt else None
        generator = torch.Generator().manual_seed(args.seed)
        out = sample(model, args.num_samples, args.length, args.steps, order=args.order, prompt=prompt,
                     temperature=args.temperature, generator=generator, n_blocks=depth)
    except (FileNotFoundError, ValueError) as e:
        message = str(e)
        if message.startswith("encode:"):  # the tokenizer refused the prompt
            message = "--prompt" + message[len("encode"):]
        elif message.split(":", 1)[0] in _SAMPLER_FLAGS:  # sample()'s own name for a flag's value: name the flag
            message = "--" + message
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        parser.exit(2, f"{parser.prog}: error: --length {args.length} x --num_samples {args.num_samples}: sampling "
                       f"needs more memory than {device} has ({first_line(e)}); ask for fewer or shorter samples (on "
                       f"the CPU the reference attention holds num_samples x heads x length^2 scores)\n")
    # Characters stdout's encoding lacks (a byte model's U+FFFD in a latin-1 locale) print as its
    # replacement character, not a UnicodeEncodeError after all the sampling.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        for i, ids in enumerate(out.tolist()):
            print(f"=== sample {i} ===")
            print(tok.decode(ids).encode(encoding, "replace").decode(encoding))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (| head): quietly, as Python's docs advise (SIGPIPE)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit's flush)
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
