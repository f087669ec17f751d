"""Typed configuration of the model, the objective, the data and the trainer.

One dataclass per component; each component receives only its own section (torchtitan's layout). A
config file is YAML with up to four top-level sections; a missing section or key takes its default:

    model      ModelConfig: vocabulary, width, depth, attention (standard | gqa | mla), RoPE, frozen MLP seed
    objective  ObjectiveConfig: the mask-diffusion objective (mask fraction range, loss weighting, evaluation)
    data       DataConfig: the token source (dummy | text | tokens), sequence length, batch size, split
    train      TrainConfig: optimizer and schedule, steps per stage, activation cache, joint tuning, device

    load_config(path, overrides)  read a YAML file, apply `section.key=value` overrides, validate
    validate(cfg)                 check every value, fill in the None defaults; returns a new Config
    config_to_dict(cfg)           a plain nested dict of builtins (what checkpoints store) ...
    config_from_dict(d)           ... and back, checked like a file

Every problem is a ValueError that names the key as `section.key`, the value found and what is allowed;
an unknown key suggests the closest valid one across all sections.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
import warnings
from dataclasses import dataclass, field

import yaml

from kernels._checks import MAX_HEAD_DIM, MAX_ROPE_DIM, _is_finite_real


@dataclass
class ModelConfig:
    """The `model` section: the LWTModel's sizes, attention and frozen MLP. A plain dataclass: nothing is
    checked until `validate`, which also resolves the None defaults.

    Args:
        vocab_size: real tokens, >= 1 (>= 256 with data.source text); the model adds [MASK] as id vocab_size.
        d_model: model width, >= 1; a multiple of n_heads unless attn_type is mla with all three mla_*_dim set.
        n_layers, n_heads, d_ff: blocks, query heads, SwiGLU hidden width; each >= 1.
        n_kv_heads: K/V heads, >= 1; None: n_heads. standard needs n_heads, gqa a divisor of n_heads; mla
            ignores it.
        attn_type: "standard" (MHA) | "gqa" | "mla". For standard and gqa, d_model // n_heads must be even and
            at most 256.
        mla_rq: MLA query rank, >= 0; 0 projects queries directly. mla_rkv: MLA latent K/V rank, >= 1.
        mla_nope_dim, mla_v_dim: MLA per-head sizes, 1..256; None: d_model // n_heads.
        mla_rope_dim: MLA shared RoPE key size, even, 2..128; None: (d_model // n_heads) // 2.
        tie_embeddings: the head is the embedding without its [MASK] row; False: a separate lm_head.
        causal: causal attention; False (default) attends both ways, as mask diffusion needs.
        rope_theta: RoPE frequency base, > 1.
        frozen_seed: block k's frozen SwiGLU gate/up matrices are drawn from seed frozen_seed + k;
            in [0, 2**64 - n_layers).
        norm_eps: eps of every RMSNorm, > 0.
    """
    vocab_size: int = 256           # real tokens; the model adds one [MASK] id (= vocab_size), never a target
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None   # None: n_heads; attn_type gqa needs n_heads % n_kv_heads == 0
    d_ff: int = 384
    attn_type: str = "gqa"          # standard (MHA) | gqa | mla
    mla_rq: int = 0                 # MLA query rank; 0 projects queries directly (no low-rank W_q)
    mla_rkv: int = 64               # MLA latent K/V rank
    mla_nope_dim: int | None = None  # None: d_model // n_heads
    mla_rope_dim: int | None = None  # None: half of d_model // n_heads (the shared RoPE key)
    mla_v_dim: int | None = None    # None: d_model // n_heads
    tie_embeddings: bool = True
    causal: bool = False            # mask diffusion attends both ways
    rope_theta: float = 10000.0
    frozen_seed: int = 0            # seed of the frozen SwiGLU gate/up matrices
    norm_eps: float = 1e-6


@dataclass
class ObjectiveConfig:
    """The `objective` section: the mask-diffusion loss and its evaluation (see lwt.diffusion).

    Args:
        mask_fraction_min, mask_fraction_max: training masking rates t are drawn from
            (mask_fraction_min, mask_fraction_max]; each in (0, 1], min <= max, max >= 1.18e-38 (float32's
            smallest normal number, so that 1/t is finite). validate warns (UserWarning) when
            mask_fraction_max · data.seq_len < 1: most sequences would then mask no token.
        loss_weighting: "elbo" (1/t-weighted, a NELBO estimate) | "uniform" (mean CE over masked tokens).
        eval_batches: validation batches per NELBO evaluation, >= 1.
        eval_seed: seed of the evaluation's batches, t and masks (the same every evaluation); in [0, 2**64).
    """
    mask_fraction_min: float = 0.05
    mask_fraction_max: float = 1.0
    loss_weighting: str = "elbo"    # elbo (1/t per masked token over all tokens) | uniform (mean over masked)
    eval_batches: int = 8           # validation batches of the NELBO estimate (t over (0, 1], fixed seed)
    eval_seed: int = 1234


@dataclass
class DataConfig:
    """The `data` section: the token source (see lwt.data.build_data) and the batch shape.

    Args:
        source: "dummy" (random ids) | "text" (a file's bytes, one token each) | "tokens" (a raw token file).
        path: text: any file, read as raw bytes (UTF-8 text for samples that read as text; nothing checks
            it), None for Python's documentation topics; tokens: the file (required). A leading ~ is
            expanded by validate; a relative path is read from the working directory (not the config's).
        token_dtype: item type of a tokens file: "uint16" | "uint32".
        seq_len, batch_size: tokens per sequence and sequences per batch, each >= 1.
        val_fraction: the last fraction of the corpus held out for validation, in (0, 1).
        seed: seed of the dummy corpus, in [0, 2**64).
    """
    source: str = "text"            # dummy | text | tokens
    path: str | None = None         # text: a file, one token per byte (None: Python's own documentation topics);
                                    # tokens: a raw uint16/uint32 token file
    token_dtype: str = "uint16"     # tokens: uint16 | uint32
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.1       # the last fraction of the corpus is the validation split
    seed: int = 0


@dataclass
class TrainConfig:
    """The `train` section: the layer-wise trainer's optimizer, schedule, cache, checkpoints and device.

    Args:
        max_steps: optimizer steps per stage, >= 1.
        lr: peak learning rate, > 0. min_lr_ratio: the cosine's floor as a fraction of the peak, in [0, 1].
        warmup_steps: linear warmup steps of each phase, >= 0 (a phase warms up over at most its own steps).
        weight_decay: AdamW's, >= 0, on matrices only. beta1, beta2: AdamW's betas, each in [0, 1).
        grad_clip: max gradient norm, >= 0; 0 disables clipping.
        log_every: log the training loss every this many steps (and at a phase's last), >= 1.
        cache: write each stage's outputs to disk for the next stage; False recomputes the frozen prefix.
        cache_dir: where the caches go; None: <out_dir>/cache.
        cache_sequences, cache_draws: sequences cached per rank and mask draws of each, each >= 1.
        joint_steps: end-to-end tuning steps after the stages, >= 0; 0 skips the joint phase.
        joint_lr: the joint phase's peak learning rate, > 0; None: lr.
        ckpt_every: also checkpoint every this many steps, >= 0; 0: only when a phase ends or the run stops.
        out_dir: the run's directory (checkpoints, metrics, table); a leading ~ is expanded by validate.
        seed: the trainer's seed, in [0, 2**40) (its data and mask seeds are derived from it).
        device: "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU) | "float32" | "bfloat16" | "float16".
    """
    max_steps: int = 200            # per stage
    lr: float = 3e-3
    min_lr_ratio: float = 0.1       # the cosine reaches lr * min_lr_ratio at a phase's step count (just after
                                    # its last step); a phase of at most warmup_steps steps only warms up
    warmup_steps: int = 20
    weight_decay: float = 0.0       # AdamW's, on matrices only (not on norm weights)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # 0 disables clipping
    log_every: int = 10
    cache: bool = True              # cache each stage's outputs on disk (False: recompute the frozen prefix)
    cache_dir: str | None = None    # None: <out_dir>/cache
    cache_sequences: int = 1024
    cache_draws: int = 2
    joint_steps: int = 100          # end-to-end tuning after fusion
    joint_lr: float | None = None   # None: lr
    ckpt_every: int = 0             # 0: checkpoints only at the end of each stage
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"            # auto (cuda when available) | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16


@dataclass
class Config:
    """A whole config: one dataclass per section, each defaulting to its own defaults.

    Args:
        model, objective, data, train: a ModelConfig, ObjectiveConfig, DataConfig and TrainConfig.
    """
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "train": TrainConfig}
# The declared type of every key, per section, in declaration order: {"model": {"vocab_size": int, ...}}.
_FIELD_TYPES = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
_TYPE_NAMES = {int: "an int", float: "a finite number", bool: "true or false", str: "a string"}

ATTN_TYPES = ("standard", "gqa", "mla")
LOSS_WEIGHTINGS = ("elbo", "uniform")
DATA_SOURCES = ("dummy", "text", "tokens")
TOKEN_DTYPES = ("uint16", "uint32")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BYTE_VOCAB = 256                   # the text source is byte-level: ids 0..255


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `3e-3`, `1e6`, `+.5` and `.5e3` as floats. PyYAML follows YAML 1.1,
    where a float needs a dot, a signed exponent and a digit between a sign and the dot, so `lr: 3e-3` would
    otherwise load as the string '3e-3'. It refuses what YAML 1.1 reads in other bases (`0100` is octal 64,
    `1:30` is base 60: 90) and a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _decimal_only(base_constructor, is_int: bool):
    """A constructor for ints or floats that refuses YAML 1.1's base-60 (a colon) and, for ints, octal (a
    leading 0) forms, which would otherwise load as a number other than the one written."""
    def construct(loader, node):
        text = str(node.value).replace("_", "").lstrip("+-")
        if ":" in text or (is_int and len(text) > 1 and text[0] == "0" and text[1].isdigit()):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is read by YAML 1.1 as octal or base 60: write the number in decimal "
                            f"without leading zeros, or quote it for a string", node.start_mark)
        return base_constructor(loader, node)
    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _decimal_only(yaml.SafeLoader.construct_yaml_int, True))
_Loader.add_constructor("tag:yaml.org,2002:float", _decimal_only(yaml.SafeLoader.construct_yaml_float, False))


# add_implicit_resolver copies the resolver table into _Loader first: yaml.SafeLoader is left as it was.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+"
                                         r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)$"),
                              list("-+.0123456789"))


def _parse_yaml(text: str, where: str):
    """text as YAML (_Loader); ValueError naming `where` (the file, or the override's section.key), on one
    line, for invalid YAML and for a tagged value PyYAML's converters refuse with a plain Python error
    (`!!int` with no digits: an IndexError; `!!bool maybe`: a KeyError; `!!int 1e3`: a ValueError)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = "; ".join(part for part in (e.context, e.problem) if part) or type(e).__name__
        raise ValueError(f"{where}: not valid YAML: {problem}{at}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"{where}: not valid YAML: a value its tag cannot convert (an explicit !!tag?): "
                         f"{type(e).__name__}{': ' + detail if detail else ''}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply command-line overrides, validate.

    Args:
        path: a YAML file with sections model / objective / data / train (see the module docstring);
            None: every key takes its default. A leading ~ is expanded.
        overrides: `key=value` strings, applied in order after the file. `key` is `section.key`, or a bare
            key that exists in exactly one section (`max_steps=50`; `seed` needs `data.` or `train.`).
            `value` is parsed as YAML: `true`, `3e-3`, `null`, `gqa`; for a string key it is the text as
            given (`out_dir=2024`, `out_dir=runs/a#b`), unless null (or empty) or quoted.
    Returns:
        The validated Config, with the None defaults resolved (see `validate`).
    Raises:
        ValueError: an unreadable file, invalid YAML, an unknown section or key, a malformed or ambiguous
            override, or a value `validate` refuses.
    """
    raw = {}
    if path is not None:
        path = os.path.expanduser(path)  # `--config=~/exp.yaml`: a shell expands no ~ after `=` (see validate)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"config: cannot read {os.fspath(path)!r} ({e})") from None
        raw = _parse_yaml(text, os.fspath(path))
    _check_layout(raw)
    merged = {name: dict((raw or {}).get(name) or {}) for name in SECTIONS}
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        section, key, value = _parse_override(item)
        merged[section][key] = value
    return config_from_dict(merged)


def config_to_dict(cfg: Config) -> dict:
    """The config as {section: {key: value}} of plain builtins; config_from_dict() gives a validated
    config back exactly (an unvalidated one comes back validated: its None defaults filled in).

    Args:
        cfg: a Config (not validated here).
    Returns:
        A new nested dict (dataclasses.asdict): the four sections, each with every key.
    """
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict | None) -> Config:
    """Build and validate a Config from {section: {key: value}} (a parsed YAML file, a checkpoint's copy).
    Missing sections and keys take their defaults; unknown ones are errors.

    Args:
        d: {section: {key: value} or None}, or None (every key takes its default).
    Returns:
        The validated Config (see `validate`).
    Raises:
        ValueError: `d` or a section is not a mapping, an unknown section or key, or a value `validate` refuses.
    """
    _check_layout(d)
    sections = {name: SECTIONS[name](**(values or {})) for name, values in (d or {}).items()}
    return validate(Config(**sections))


def validate(cfg: Config) -> Config:
    """Check every value of `cfg` and return a new, explicit Config: ints given for float keys become
    floats, and the None defaults are filled in (model.n_kv_heads: n_heads; model.mla_nope_dim and
    model.mla_v_dim: d_model // n_heads; model.mla_rope_dim: half of that; train.cache_dir:
    <out_dir>/cache; train.joint_lr: lr). `cfg` itself is not modified.

    Args:
        cfg: a Config whose sections are the four section dataclasses.
    Returns:
        A new Config, as above; a leading ~ in data.path, train.out_dir and train.cache_dir is expanded.
    Raises:
        ValueError naming the key as `section.key`, the value found and what is allowed.
    """
    _require(isinstance(cfg, Config), "config", cfg, "an lwt.config.Config")
    model, objective, data, train = (_typed(name, getattr(cfg, name)) for name in SECTIONS)
    model = _check_model(model)
    _check_objective(objective)
    _check_data(data, model)
    _warn_sparse_masks(objective, data)
    train = _check_train(train)
    # ~ in a path: a shell leaves `--set train.out_dir=~/runs` unexpanded (a directory named "~" would
    # appear in the working directory)
    data = dataclasses.replace(data, path=None if data.path is None else os.path.expanduser(data.path))
    train = dataclasses.replace(train, out_dir=os.path.expanduser(train.out_dir),
                                cache_dir=os.path.expanduser(train.cache_dir))
    return Config(model=model, objective=objective, data=data, train=train)


# ---- the checks, one helper per kind ----

FLOAT32_MAX = 3.4028234663852886e38


def _require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {value!r}")


def _at_least(section: str, cfg, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        _require(getattr(cfg, name) >= minimum, f"{section}.{name}", getattr(cfg, name), f"an int >= {minimum}")


def _check_seed(key: str, value: int, limit: int = 2**64, why: str = "a torch.Generator seed") -> None:
    """Seeds seed torch.Generators, which take [0, 2**64)."""
    _require(0 <= value < limit, key, value, f"an int in [0, {limit}) ({why})")


def _one_of(key: str, value, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, "one of " + " | ".join(choices))


def _closest_key(name: str, sections: bool = True) -> str | None:
    """The valid section (when `sections`) or `section.key` nearest to `name`, comparing whole names and
    last parts, so `model.mask_fraction_min` finds `objective.mask_fraction_min` and `model.d_modle` finds
    `model.d_model`; never `name` itself."""
    def similarity(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    leaf = name.rsplit(".", 1)[-1]
    candidates = (list(SECTIONS) if sections else []) + [f"{s}.{k}" for s, types in _FIELD_TYPES.items() for k in types]
    candidates = [c for c in candidates if c != name]
    scores = {c: (max(similarity(name, c), similarity(leaf, c.rsplit(".", 1)[-1])), similarity(name, c))
              for c in candidates}
    best = max(candidates, key=scores.__getitem__)
    return best if scores[best][0] >= 0.6 else None


def _unknown(name: str, what: str, section: str | None = None) -> ValueError:
    """The error for an unknown section or key: the nearest valid name, then what the section holds."""
    suggestion = _closest_key(name, sections=what == "section")
    hint = f"; did you mean {suggestion}?" if suggestion else ""
    if section is None:
        allowed = "sections: " + ", ".join(SECTIONS)
    else:
        allowed = f"{section} keys: " + ", ".join(_FIELD_TYPES[section])
    return ValueError(f"{name}: unknown {what}{hint} ({allowed})")


def _check_layout(d) -> None:
    """Every section and key of the nested dict `d` is known; each section is a mapping (or empty)."""
    if d is None:
        return
    _require(isinstance(d, dict), "config", d, "a mapping of sections: " + ", ".join(SECTIONS))
    for section, values in d.items():
        if section not in SECTIONS:
            raise _unknown(str(section), "section")
        _require(values is None or isinstance(values, dict), section, values, f"a mapping of {section} keys")
        for key in values or {}:
            if key not in _FIELD_TYPES[section]:
                raise _unknown(f"{section}.{key}", "key", section)


def _parse_override(item: str) -> tuple[str, str, object]:
    """`section.key=value` or `key=value` -> (section, key, value parsed as YAML)."""
    name, sep, text = item.partition("=")
    name = name.strip()
    _require(bool(sep and name), "override", item, "key=value, e.g. train.max_steps=50")
    if "." in name:
        section, _, key = name.partition(".")
        if section not in SECTIONS:
            raise _unknown(name, "section")
        if key not in _FIELD_TYPES[section]:
            raise _unknown(name, "key", section)
    else:
        owners = [s for s, types in _FIELD_TYPES.items() if name in types]
        if name in SECTIONS:
            raise ValueError(f"{name}: a section, not a key; expected {name}.<key>=value ({name} keys: "
                             + ", ".join(_FIELD_TYPES[name]) + ")")
        if not owners:
            raise _unknown(name, "key")
        if len(owners) > 1:
            raise ValueError(f"{name}: ambiguous key, found in several sections; expected one of: "
                             + ", ".join(f"{s}.{name}" for s in owners))
        section, key = owners[0], name
    stripped = text.strip()
    if _base_type(_FIELD_TYPES[section][key])[0] is str and stripped not in _YAML_NULLS and stripped[:1] not in "'\"":
        # A string key keeps the text as given: YAML would drop a ` #...` tail, refuse a leading @ or `, and
        # read *x or &x as an alias or an anchor. Quotes still work ('null' is the string), as does null.
        return section, key, stripped
    return section, key, _parse_yaml(text, f"{section}.{key}")


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _base_type(hint) -> tuple[type, bool]:
    """`int | None` -> (int, True); `float` -> (float, False)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def _typed(section: str, cfg):
    """A copy of one section with every value type-checked; ints given for float keys become floats."""
    cls = SECTIONS[section]
    _require(isinstance(cfg, cls), section, cfg, f"a {cls.__name__}")
    values = {}
    for key, hint in _FIELD_TYPES[section].items():
        value, (base, optional) = getattr(cfg, key), _base_type(hint)
        if value is None:
            ok = optional
        elif base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = _is_finite_real(value)
        else:
            ok = isinstance(value, base)
        _require(ok, f"{section}.{key}", value, _TYPE_NAMES[base] + (" or null" if optional else ""))
        values[key] = float(value) if base is float and value is not None else value
    return cls(**values)


def mla_head_dims(d_model: int, n_heads: int, nope_dim: int | None, rope_dim: int | None, v_dim: int | None):
    """(nope_dim, rope_dim, v_dim) of an MLA layer, each None replaced by its default: d_model // n_heads,
    half of that (the shared RoPE key), d_model // n_heads. Unchecked: callers validate.

    Args:
        d_model, n_heads: model width and query heads (positive ints; n_heads need not divide d_model).
        nope_dim, rope_dim, v_dim: per-head sizes, or None for the default.
    Returns:
        (nope_dim, rope_dim, v_dim): each given value unchanged, each None replaced by its default.
    """
    head_dim = d_model // n_heads
    return (head_dim if nope_dim is None else nope_dim, head_dim // 2 if rope_dim is None else rope_dim,
            head_dim if v_dim is None else v_dim)


def _check_model(m: ModelConfig) -> ModelConfig:
    _at_least("model", m, ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"), 1)
    _at_least("model", m, ("mla_rq",), 0)
    _check_seed("model.frozen_seed", m.frozen_seed, 2**64 - m.n_layers, "block k's MLP is seeded with it + k")
    _one_of("model.attn_type", m.attn_type, ATTN_TYPES)
    _require(m.rope_theta > 1, "model.rope_theta", m.rope_theta, "a number > 1")
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a number > 0")

    n_kv_heads = m.n_heads if m.n_kv_heads is None else m.n_kv_heads
    _require(n_kv_heads >= 1, "model.n_kv_heads", n_kv_heads, "an int >= 1, or null for model.n_heads")
    mla_dims = (m.mla_nope_dim, m.mla_rope_dim, m.mla_v_dim)
    # GQA heads are d_model / n_heads wide; MLA derives only its default head dims from that ratio.
    if m.attn_type != "mla" or None in mla_dims:
        _require(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
                 f"a multiple of model.n_heads={m.n_heads} (the head dim is d_model / n_heads)")
    head_dim = m.d_model // m.n_heads
    nope_dim, rope_dim, v_dim = mla_head_dims(m.d_model, m.n_heads, *mla_dims)
    m = dataclasses.replace(m, n_kv_heads=n_kv_heads, mla_nope_dim=nope_dim, mla_rope_dim=rope_dim, mla_v_dim=v_dim)

    if m.attn_type == "standard":
        _require(n_kv_heads == m.n_heads, "model.n_kv_heads", n_kv_heads,
                 f"model.n_heads={m.n_heads} (or null) with attn_type standard; use attn_type gqa for fewer K/V heads")
    elif m.attn_type == "gqa":
        _require(m.n_heads % n_kv_heads == 0, "model.n_kv_heads", n_kv_heads,
                 f"a divisor of model.n_heads={m.n_heads} (each K/V head serves a whole group of query heads)")
    if m.attn_type in ("standard", "gqa"):
        _require(head_dim % 2 == 0 and head_dim <= MAX_HEAD_DIM, "model.d_model", m.d_model,
                 f"a head dim d_model / model.n_heads (here {head_dim}) that is even (RoPE rotates pairs of "
                 f"dims) and at most {MAX_HEAD_DIM} (the attention kernel's limit)")
    else:
        _at_least("model", m, ("mla_rkv",), 1)
        for name, given in zip(("mla_nope_dim", "mla_v_dim"), mla_dims[::2]):
            derived = "" if given is not None else (f" (null: derived from d_model // n_heads = {head_dim}; "
                                                    f"set it, or change d_model or n_heads)")
            _require(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), f"an int >= 1{derived}")
        derived = "" if mla_dims[1] is not None else f" (null: (d_model // n_heads) // 2 = {m.mla_rope_dim}; set it)"
        _require(m.mla_rope_dim % 2 == 0 and 2 <= m.mla_rope_dim <= MAX_ROPE_DIM, "model.mla_rope_dim",
                 m.mla_rope_dim, f"an even number (RoPE rotates pairs of dims) from 2 to {MAX_ROPE_DIM} (the MLA "
                 f"kernel's limit){derived}")
        _require(m.mla_nope_dim <= MAX_HEAD_DIM, "model.mla_nope_dim", m.mla_nope_dim,
                 f"at most {MAX_HEAD_DIM} (the MLA kernel's limit)")
        _require(m.mla_v_dim <= MAX_HEAD_DIM, "model.mla_v_dim", m.mla_v_dim, f"at most {MAX_HEAD_DIM}")
    return m


def _check_objective(o: ObjectiveConfig) -> None:
    for key in ("mask_fraction_min", "mask_fraction_max"):
        value = getattr(o, key)
        _require(0 < value <= 1, f"objective.{key}", value, "a fraction in (0, 1]")
    tiny = 2.0 ** -126  # torch.finfo(torch.float32).tiny
    _require(o.mask_fraction_max >= tiny, "objective.mask_fraction_max", o.mask_fraction_max,
             f"at least {tiny:.3g} (float32's smallest normal: the elbo weight 1/t stays finite)")
    _require(o.mask_fraction_min <= o.mask_fraction_max, "objective.mask_fraction_min", o.mask_fraction_min,
             f"at most objective.mask_fraction_max={o.mask_fraction_max}")
    _one_of("objective.loss_weighting", o.loss_weighting, LOSS_WEIGHTINGS)
    _at_least("objective", o, ("eval_batches",), 1)
    _check_seed("objective.eval_seed", o.eval_seed)


def _warn_sparse_masks(o: ObjectiveConfig, d: DataConfig) -> None:
    """A UserWarning (valid, but almost surely not meant) when even the largest training masking rate masks
    fewer than one token of a sequence on average: each token is masked independently with probability t,
    so at t · seq_len < 1 most sequences mask none, add nothing to the loss and get no gradient, and with
    elbo weighting the few tokens that are masked count 1/t times."""
    expected = o.mask_fraction_max * d.seq_len
    if expected < 1:
        warnings.warn(f"objective.mask_fraction_max={o.mask_fraction_max} with data.seq_len={d.seq_len} masks "
                      f"{expected:.3g} tokens of a sequence on average, fewer than one: most training sequences "
                      f"will mask no token and train on nothing; raise objective.mask_fraction_max or "
                      f"data.seq_len", UserWarning, stacklevel=3)


def _check_data(d: DataConfig, model: ModelConfig) -> None:
    _one_of("data.source", d.source, DATA_SOURCES)
    _one_of("data.token_dtype", d.token_dtype, TOKEN_DTYPES)
    if d.source == "tokens":
        _require(d.path is not None, "data.path", d.path, "a token file path with data.source tokens")
    _require(d.path is None or d.path != "", "data.path", d.path, "a file path or null")
    if d.source == "text":
        _require(model.vocab_size >= BYTE_VOCAB, "model.vocab_size", model.vocab_size,
                 f"at least {BYTE_VOCAB} with data.source text (one token per byte)")
    _at_least("data", d, ("seq_len", "batch_size"), 1)
    _check_seed("data.seed", d.seed)
    _require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a fraction in (0, 1)")


def _check_train(t: TrainConfig) -> TrainConfig:
    _at_least("train", t, ("max_steps", "cache_sequences", "cache_draws", "log_every"), 1)
    # warmup_steps may exceed a phase's steps: each phase warms up over min(warmup_steps, its steps)
    _at_least("train", t, ("warmup_steps", "joint_steps", "ckpt_every"), 0)
    # the trainer seeds its data and mask generators with train.seed · 1000003 + ...
    _check_seed("train.seed", t.seed, 2**40, "the trainer's other seeds are derived from it")
    _require(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _require(t.joint_lr is None or t.joint_lr > 0, "train.joint_lr", t.joint_lr, "a number > 0, or null for train.lr")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "a number in [0, 1]")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(t, key) < 1, f"train.{key}", getattr(t, key), "a number in [0, 1)")
    # AdamW's first step size is lr / (1 - beta1) (its bias correction), a float32 scalar to torch: past
    # float32's range it raised a traceback inside the optimizer, not the divergence error of a large lr
    for key in ("lr", "joint_lr"):
        lr = getattr(t, key)
        _require(lr is None or lr / (1 - t.beta1) <= FLOAT32_MAX, f"train.{key}", lr,
                 f"a number whose first AdamW step, lr / (1 - train.beta1), fits float32 (<= {FLOAT32_MAX:.4g})")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "a number >= 0 (0 disables clipping)")
    _require(t.out_dir != "", "train.out_dir", t.out_dir, "a directory path")
    _require(t.cache_dir != "", "train.cache_dir", t.cache_dir, "a directory path, or null for <out_dir>/cache")
    _require(re.fullmatch(r"auto|cpu|cuda|cuda:(0|[1-9]\d*)", t.device) is not None, "train.device", t.device,
             "one of auto | cpu | cuda | cuda:N")
    _one_of("train.dtype", t.dtype, DTYPES)
    return dataclasses.replace(t, cache_dir=os.path.join(t.out_dir, "cache") if t.cache_dir is None else t.cache_dir,
                               joint_lr=t.lr if t.joint_lr is None else t.joint_lr)
