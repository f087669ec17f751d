"""lwt.config: the shipped configs load, overrides resolve, dicts round-trip, and every bad value gets a
ValueError that names the key, the value and what is allowed."""
import re
import warnings
from pathlib import Path

import pytest

from lwt.config import (Config, DataConfig, ModelConfig, ObjectiveConfig, TrainConfig, config_from_dict,
                        config_to_dict, load_config, validate)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [pytest.param(ROOT / "config.yaml", id="default"),
           pytest.param(ROOT / "configs" / "llama-4k-gqa.yaml", id="llama-4k-gqa"),
           pytest.param(ROOT / "configs" / "deepseek-mla.yaml", id="deepseek-mla")]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_load_and_are_explicit(path):
    cfg = load_config(path)
    assert validate(cfg) == cfg  # already resolved: validating again changes nothing
    assert cfg.model.n_kv_heads is not None and cfg.train.cache_dir is not None and cfg.train.joint_lr is not None
    assert None not in (cfg.model.mla_nope_dim, cfg.model.mla_rope_dim, cfg.model.mla_v_dim)


def test_default_config_is_small_byte_level_text():
    cfg = load_config(ROOT / "config.yaml")
    assert (cfg.data.source, cfg.model.vocab_size, cfg.model.attn_type) == ("text", 256, "gqa")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.seq_len) == (128, 4, 128)
    assert cfg.model.n_kv_heads == 2 and cfg.train.cache_dir == str(Path("runs/default/cache"))


def test_presets_have_their_shapes():
    llama = load_config(ROOT / "configs" / "llama-4k-gqa.yaml").model
    assert (llama.vocab_size, llama.d_model, llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.d_ff,
            llama.rope_theta) == (128256, 4096, 32, 32, 8, 14336, 500000.0)
    mla = load_config(ROOT / "configs" / "deepseek-mla.yaml").model
    assert (mla.attn_type, mla.d_model, mla.n_heads, mla.mla_rq, mla.mla_rkv, mla.mla_nope_dim, mla.mla_rope_dim,
            mla.mla_v_dim) == ("mla", 2048, 16, 0, 512, 128, 64, 128)


def test_no_path_gives_the_resolved_defaults():
    cfg = load_config(None)
    assert cfg.model.n_kv_heads == cfg.model.n_heads == 4
    assert (cfg.model.mla_nope_dim, cfg.model.mla_rope_dim, cfg.model.mla_v_dim) == (32, 16, 32)
    assert cfg.train.joint_lr == cfg.train.lr and cfg.train.cache_dir == str(Path("runs/default/cache"))
    assert cfg.objective == ObjectiveConfig() and cfg.data == DataConfig()


def test_the_defaults_are_config_yamls_but_n_kv_heads():
    """What README's main job says of a run without --config (an installed lwt has no config.yaml): the
    dataclass defaults are config.yaml's values, except n_kv_heads (null: n_heads, multi-head attention)."""
    shipped, defaults = config_to_dict(load_config(ROOT / "config.yaml")), config_to_dict(load_config(None))
    differ = [(section, key) for section in shipped for key in shipped[section]
              if shipped[section][key] != defaults[section][key]]
    assert differ == [("model", "n_kv_heads")]


def test_missing_sections_and_keys_take_defaults(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  d_model: 64\ndata:\n")
    cfg = load_config(path)
    assert cfg.model.d_model == 64 and cfg.model.n_layers == ModelConfig().n_layers
    assert cfg.data == DataConfig() and cfg.train.max_steps == TrainConfig().max_steps
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == load_config(None)


def test_overrides_by_section_key_and_bare_key():
    cfg = load_config(ROOT / "config.yaml", ["train.max_steps=50", "warmup_steps=5", "data.seed=3"])
    assert (cfg.train.max_steps, cfg.train.warmup_steps, cfg.data.seed, cfg.train.seed) == (50, 5, 3, 0)


def test_override_values_are_read_as_yaml():
    cfg = load_config(None, ["causal=true", "lr=3e-4", "joint_lr=1e-5", "n_kv_heads=null", "attn_type=standard",
                             "rope_theta=500000", "out_dir=2024"])
    assert cfg.model.causal is True and cfg.model.attn_type == "standard" and cfg.model.n_kv_heads == 4
    assert (cfg.train.lr, cfg.train.joint_lr) == (3e-4, 1e-5)
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.train.out_dir == "2024"  # a string key keeps the text given


@pytest.mark.parametrize("text,value", [("+.003", 0.003), (".5E3", 500.0), ("+.5", 0.5), ("5e-1", 0.5),
                                        ("+2.5e-3", 2.5e-3), ("1e6", 1e6), ("2E3", 2000.0)])
def test_floats_that_yaml_1_1_reads_as_strings(text, value):
    """Leading-dot numbers with a sign or an exponent, and exponents without a dot, are floats."""
    assert load_config(None, [f"train.lr={text}"]).train.lr == value


def test_override_later_wins_and_resolves_after_overrides():
    cfg = load_config(None, ["lr=1e-3", "lr=2e-3", "out_dir=runs/x"])
    assert cfg.train.lr == cfg.train.joint_lr == 2e-3
    assert cfg.train.cache_dir == str(Path("runs/x/cache"))


def test_ambiguous_bare_key():
    with pytest.raises(ValueError, match=r"seed: ambiguous.*data\.seed, train\.seed"):
        load_config(None, ["seed=1"])


def test_override_without_equals():
    with pytest.raises(ValueError, match=r"override: expected key=value.*'train\.max_steps'"):
        load_config(None, ["train.max_steps"])


def test_round_trip_through_dict():
    for path in (ROOT / "config.yaml", ROOT / "configs" / "deepseek-mla.yaml"):
        cfg = load_config(path, ["mask_fraction_min=0.2"])
        d = config_to_dict(cfg)
        assert set(d) == {"model", "objective", "data", "train"} and d["objective"]["mask_fraction_min"] == 0.2
        assert all(type(v) in (int, float, bool, str, type(None)) for s in d.values() for v in s.values())
        assert config_from_dict(d) == cfg and config_to_dict(config_from_dict(d)) == d


def test_validate_returns_a_new_config_and_coerces_floats():
    cfg = Config(train=TrainConfig(lr=1, joint_lr=None))
    out = validate(cfg)
    assert out.train.lr == 1.0 and isinstance(out.train.lr, float) and out.train.joint_lr == 1.0
    assert cfg.train.joint_lr is None and cfg.model.n_kv_heads is None  # the input is left as it was


@pytest.mark.parametrize("sections, message", [
    pytest.param({"model": {"mask_fraction_min": 0.1}},
                 r"model\.mask_fraction_min: unknown key; did you mean objective\.mask_fraction_min\?",
                 id="key-in-other-section"),
    pytest.param({"model": {"d_modle": 64}}, r"model\.d_modle: unknown key; did you mean model\.d_model\?.*d_model",
                 id="misspelt-key"),
    pytest.param({"optim": {"lr": 1e-3}}, r"optim: unknown section.*sections: model, objective, data, train",
                 id="unknown-section"),
    pytest.param({"modle": {}}, r"modle: unknown section; did you mean model\?", id="misspelt-section"),
    pytest.param({"model": 3}, r"model: expected a mapping of model keys, got 3", id="section-not-mapping"),
    pytest.param({"model": {"n_layers": True}}, r"model\.n_layers: expected an int, got True", id="bool-for-int"),
    pytest.param({"model": {"d_model": 128.0}}, r"model\.d_model: expected an int, got 128\.0", id="float-for-int"),
    pytest.param({"train": {"lr": "fast"}}, r"train\.lr: expected a finite number, got 'fast'", id="str-for-float"),
    pytest.param({"train": {"lr": True}}, r"train\.lr: expected a finite number, got True", id="bool-for-float"),
    pytest.param({"model": {"causal": 1}}, r"model\.causal: expected true or false, got 1", id="int-for-bool"),
    pytest.param({"model": {"d_model": None}}, r"model\.d_model: expected an int, got None", id="null-not-optional"),
    pytest.param({"model": {"n_layers": 0}}, r"model\.n_layers: expected an int >= 1, got 0", id="zero-layers"),
    pytest.param({"model": {"n_heads": 4, "n_kv_heads": 3}},
                 r"model\.n_kv_heads: expected a divisor of model\.n_heads=4.*got 3", id="gqa-heads"),
    pytest.param({"model": {"d_model": 130, "n_heads": 4}},
                 r"model\.d_model: expected a multiple of model\.n_heads=4.*got 130", id="d_model-heads"),
    pytest.param({"model": {"attn_type": "mla", "d_model": 100, "n_heads": 3}},
                 r"model\.d_model: expected a multiple of model\.n_heads=3.*got 100", id="mla-derived-head-dims"),
    pytest.param({"model": {"d_model": 130, "n_heads": 4, "mla_nope_dim": 8, "mla_rope_dim": 4, "mla_v_dim": 8}},
                 r"model\.d_model: expected a multiple of model\.n_heads=4.*got 130", id="gqa-with-mla-dims-set"),
    pytest.param({"model": {"d_model": 120, "n_heads": 8, "n_kv_heads": 8}},
                 r"model\.d_model: .*here 15\) that is even", id="odd-head-dim"),
    pytest.param({"model": {"d_model": 1024, "n_heads": 2}}, r"model\.d_model: .*at most 256.*got 1024",
                 id="head-dim-too-big"),
    pytest.param({"model": {"attn_type": "standard", "n_heads": 4, "n_kv_heads": 2}},
                 r"model\.n_kv_heads: expected model\.n_heads=4.*use attn_type gqa.*got 2", id="standard-kv-heads"),
    pytest.param({"model": {"attn_type": "flash"}}, r"model\.attn_type: expected one of standard \| gqa \| mla, "
                 r"got 'flash'", id="attn-type"),
    pytest.param({"model": {"attn_type": "mla", "mla_rope_dim": 6, "mla_nope_dim": 8, "mla_v_dim": 8,
                            "mla_rkv": 0}}, r"model\.mla_rkv: expected an int >= 1, got 0", id="mla-rank"),
    pytest.param({"model": {"attn_type": "mla", "mla_rope_dim": 7}}, r"model\.mla_rope_dim: expected an even",
                 id="mla-odd-rope"),
    pytest.param({"model": {"attn_type": "mla", "mla_rope_dim": 0}},
                 r"model\.mla_rope_dim: expected an even number .* from 2 to 128 .*got 0", id="mla-rope-zero"),
    pytest.param({"model": {"attn_type": "mla", "d_model": 12, "n_heads": 4}},
                 r"model\.mla_rope_dim: expected an even number .*\(null: \(d_model // n_heads\) // 2 = 1; set it\)",
                 id="mla-rope-derived-odd"),
    pytest.param({"model": {"attn_type": "mla", "mla_rope_dim": 192, "mla_nope_dim": 32}},
                 r"model\.mla_rope_dim: .*from 2 to 128.*got 192", id="mla-rope-too-big"),
    pytest.param({"model": {"attn_type": "mla", "mla_rope_dim": 128, "mla_nope_dim": 320}},
                 r"model\.mla_nope_dim: expected at most 256 \(the MLA kernel's limit\), got 320", id="mla-nope-dim"),
    pytest.param({"model": {"attn_type": "mla", "mla_v_dim": 258}},
                 r"model\.mla_v_dim: expected at most 256, got 258", id="mla-v-dim"),
    pytest.param({"model": {"rope_theta": 1.0}}, r"model\.rope_theta: expected a number > 1, got 1\.0", id="theta"),
    pytest.param({"objective": {"mask_fraction_min": 0.0}},
                 r"objective\.mask_fraction_min: expected a fraction in \(0, 1\], got 0\.0", id="fraction-zero"),
    pytest.param({"objective": {"mask_fraction_max": 1.5}},
                 r"objective\.mask_fraction_max: expected a fraction in \(0, 1\], got 1\.5", id="fraction-above-1"),
    pytest.param({"objective": {"mask_fraction_min": 1e-39, "mask_fraction_max": 1e-39}},
                 r"objective\.mask_fraction_max: expected at least 1\.18e-38 \(float32's smallest normal",
                 id="fraction-subnormal"),
    pytest.param({"objective": {"mask_fraction_min": 0.8, "mask_fraction_max": 0.5}},
                 r"objective\.mask_fraction_min: expected at most objective\.mask_fraction_max=0\.5, got 0\.8",
                 id="min-above-max"),
    pytest.param({"objective": {"loss_weighting": "mse"}},
                 r"objective\.loss_weighting: expected one of elbo \| uniform, got 'mse'", id="loss-weighting"),
    pytest.param({"data": {"source": "tokens"}},
                 r"data\.path: expected a token file path with data\.source tokens, got None", id="tokens-no-path"),
    pytest.param({"data": {"source": "tokens", "path": "t.bin", "token_dtype": "int32"}},
                 r"data\.token_dtype: expected one of uint16 \| uint32, got 'int32'", id="token-dtype"),
    pytest.param({"data": {"path": ""}}, r"data\.path: expected a file path or null, got ''", id="empty-path"),
    pytest.param({"data": {"source": "web"}}, r"data\.source: expected one of dummy \| text \| tokens", id="source"),
    pytest.param({"data": {"val_fraction": 1}}, r"data\.val_fraction: expected a fraction in \(0, 1\), got 1\.0",
                 id="val-fraction"),
    pytest.param({"model": {"vocab_size": 100}},
                 r"model\.vocab_size: expected at least 256 with data\.source text", id="text-vocab"),
    pytest.param({"train": {"log_every": 0}}, r"train\.log_every: expected", id="log-every"),
    pytest.param({"train": {"beta2": 1.0}}, r"train\.beta2: expected a number in \[0, 1\), got 1\.0", id="beta"),
    pytest.param({"train": {"min_lr_ratio": -0.1}}, r"train\.min_lr_ratio: expected a number in \[0, 1\]",
                 id="min-lr-ratio"),
    pytest.param({"train": {"lr": 0}}, r"train\.lr: expected a number > 0, got 0\.0", id="lr"),
    pytest.param({"train": {"ckpt_every": -1}}, r"train\.ckpt_every: expected an int >= 0, got -1", id="ckpt"),
    pytest.param({"train": {"device": "gpu"}}, r"train\.device: expected one of auto \| cpu \| cuda \| cuda:N, "
                 r"got 'gpu'", id="device"),
    pytest.param({"train": {"device": "cuda:01"}}, r"train\.device: expected one of auto \| cpu \| cuda \| cuda:N, "
                 r"got 'cuda:01'", id="device-leading-zero"),
    pytest.param({"train": {"dtype": "fp8"}}, r"train\.dtype: expected one of auto \| float32", id="dtype"),
    pytest.param({"train": {"joint_lr": 0}}, r"train\.joint_lr: expected a number > 0, or null for train\.lr, got 0\.0",
                 id="joint-lr-zero"),
    pytest.param({"objective": {"eval_batches": 0}}, r"objective\.eval_batches: expected an int >= 1, got 0",
                 id="eval-batches"),
    pytest.param({"model": {"norm_eps": 0}}, r"model\.norm_eps: expected a number > 0, got 0\.0", id="norm-eps"),
    pytest.param({"model": {"n_kv_heads": 0}}, r"model\.n_kv_heads: expected an int >= 1, or null", id="kv-heads-zero"),
    pytest.param({"train": {"cache_draws": 0}}, r"train\.cache_draws: expected an int >= 1, got 0", id="cache-draws"),
    pytest.param({"train": {"cache_sequences": 0}}, r"train\.cache_sequences: expected an int >= 1, got 0",
                 id="cache-sequences"),
    pytest.param({"data": {"batch_size": 0}}, r"data\.batch_size: expected an int >= 1, got 0", id="batch-size"),
    pytest.param({"train": {"cache_dir": ""}}, r"train\.cache_dir: expected a directory path", id="cache-dir-empty"),
])
def test_bad_values_name_the_key(sections, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(sections)


@pytest.mark.parametrize("override, message", [
    pytest.param("model.d_modle=64", r"model\.d_modle: unknown key; did you mean model\.d_model\?", id="misspelt"),
    pytest.param("model.mask_fraction_min=0.1", r"did you mean objective\.mask_fraction_min\?", id="wrong-section"),
    pytest.param("d_modle=64", r"d_modle: unknown key; did you mean model\.d_model\?", id="bare-misspelt"),
    pytest.param("optim.lr=1e-3", r"optim\.lr: unknown section; did you mean train\.lr\?", id="unknown-section"),
    pytest.param("max_steps=yes", r"train\.max_steps: expected an int, got True", id="yaml-bool-for-int"),
    pytest.param("lr=fast", r"train\.lr: expected a finite number, got 'fast'", id="string-for-float"),
    pytest.param("lr=.nan", r"train\.lr: expected a finite number, got nan", id="nan"),
    pytest.param("n_heads=3", r"model\.d_model: expected a multiple of model\.n_heads=3", id="cross-key"),
    pytest.param("train=1", r"^train: a section, not a key; expected train\.<key>=value", id="section-as-key"),
    pytest.param("t_min=0.1", r"^t_min: unknown key(?!; did you mean train\?)", id="no-section-suggested"),
    pytest.param("model.lr=1e-3", r"^model\.lr: unknown key; did you mean train\.lr\?", id="short-key-in-other-section"),
    pytest.param("vocab=300", r"^vocab: unknown key; did you mean model\.vocab_size\?", id="bare-prefix-of-a-key"),
    pytest.param("dropout=0.1", r"^dropout: unknown key \((?!.*did you mean)", id="no-close-key"),
    pytest.param("model.=1", r"^model\.: unknown key(?!; did you mean model\?)", id="empty-key"),
    pytest.param("max_steps=010", r"'010' is read by YAML 1\.1 as octal", id="octal"),
    pytest.param("max_steps=1:30", r"'1:30' is read by YAML 1\.1 as octal or base 60", id="base-60"),
    pytest.param("lr=1" + "0" * 400, r"train\.lr: expected a finite number, got 1000", id="int-too-big-for-float"),
    pytest.param("train.seed=20000000000000", r"train\.seed: expected an int in \[0, 1099511627776\) \(the "
                 r"trainer's other seeds", id="seed"),
    pytest.param("model.frozen_seed=-1", r"model\.frozen_seed: expected an int in \[0, ", id="frozen-seed"),
    pytest.param("model.frozen_seed=18446744073709551614", r"model\.frozen_seed: expected an int in \[0, "
                 r"18446744073709551612\) \(block k's MLP is seeded with it \+ k\)", id="frozen-seed-plus-layers"),
    pytest.param("objective.eval_seed=18446744073709551616", r"objective\.eval_seed: expected an int in "
                 r"\[0, 18446744073709551616\)", id="eval-seed"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "config.yaml", [override])


def test_seeds_take_what_a_generator_takes():
    cfg = load_config(None, ["data.seed=2199023255552", "objective.eval_seed=18446744073709551615",
                             "train.seed=1099511627775"])
    assert (cfg.data.seed, cfg.objective.eval_seed, cfg.train.seed) == (2**41, 2**64 - 1, 2**40 - 1)


def test_string_overrides_keep_their_text_and_paths_expand_the_home_directory():
    """A string key takes the text after = as it is (YAML would cut ` #b`, refuse `@x`, read `*x` as an
    alias); quotes and null still mean what they mean in YAML. `~` in a path is the home directory."""
    cfg = load_config(None, ["out_dir=runs/a #b", "data.path=@corpus.txt", "cache_dir=*x"])
    assert (cfg.train.out_dir, cfg.data.path, cfg.train.cache_dir) == ("runs/a #b", "@corpus.txt", "*x")
    cfg = load_config(None, ["out_dir='null'", "cache_dir=null", "attn_type=mla"])
    assert cfg.train.out_dir == "null" and cfg.train.cache_dir == str(Path("null/cache"))
    assert cfg.model.attn_type == "mla"
    cfg = load_config(None, ["out_dir=~/runs/x", "data.source=tokens", "data.path=~/tokens.bin"])
    home = str(Path.home())
    assert cfg.train.out_dir == str(Path(home, "runs/x")) and cfg.train.cache_dir == str(Path(home, "runs/x/cache"))
    assert cfg.data.path == str(Path(home, "tokens.bin"))


def test_config_file_errors_name_the_file(tmp_path):
    for path, message in [(tmp_path / "missing.yaml", "No such file"), (tmp_path, "Is a directory")]:
        with pytest.raises(ValueError, match=rf"^config: cannot read {re.escape(repr(str(path)))} \(.*{message}"):
            load_config(path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"train:\n  out_dir: caf\xe9\n")
    with pytest.raises(ValueError, match=rf"^config: cannot read .*latin\.yaml.*utf-8"):
        load_config(latin)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  max_steps: 7\nmodel:\n  d_model: 64\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ValueError, match=r"not valid YAML: .*duplicate key 'train'"):
        load_config(twice)
    twice.write_text("train:\n  lr: 1.0e-3\n  lr: 5.0e-3\n")
    with pytest.raises(ValueError, match=r"duplicate key 'lr'"):
        load_config(twice)


def test_the_config_path_expands_a_tilde(tmp_path, monkeypatch):
    """`--config=~/exp.yaml`: the shell leaves a ~ after `=` as it is (lwt.config expands the path keys)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "exp.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config("~/exp.yaml").train.max_steps == 7


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)
    path.write_text("- model\n")
    with pytest.raises(ValueError, match=r"config: expected a mapping of sections"):
        load_config(path)


def test_mla_defaults_follow_the_head_dim():
    cfg = load_config(None, ["attn_type=mla", "d_model=256", "n_heads=4"])
    assert (cfg.model.mla_nope_dim, cfg.model.mla_rope_dim, cfg.model.mla_v_dim) == (64, 32, 64)
    # Explicit MLA dims do not need d_model to divide into heads.
    explicit = ["attn_type=mla", "d_model=100", "n_heads=3", "mla_nope_dim=32", "mla_rope_dim=16", "mla_v_dim=32"]
    assert load_config(None, explicit).model.d_model == 100


def test_values_at_the_boundaries_are_accepted():
    """The closed ends of every documented range: 0 for the ratios, betas, warmup, clip and decay; a 256-wide
    head (the attention kernels' limit) and MLA's 256/128/256 per-head sizes."""
    cfg = load_config(None, ["min_lr_ratio=0", "beta1=0", "beta2=0", "warmup_steps=0", "grad_clip=0",
                             "weight_decay=0", "joint_steps=0", "ckpt_every=0"])
    assert (cfg.train.min_lr_ratio, cfg.train.beta1, cfg.train.beta2, cfg.train.warmup_steps) == (0, 0, 0, 0)
    assert load_config(None, ["min_lr_ratio=1", "mask_fraction_min=1", "mask_fraction_max=1"]).train.min_lr_ratio == 1
    assert load_config(None, ["d_model=512", "n_heads=2", "n_kv_heads=1"]).model.d_model == 512  # head dim 256
    mla = load_config(None, ["attn_type=mla", "mla_nope_dim=256", "mla_rope_dim=128", "mla_v_dim=256"]).model
    assert (mla.mla_nope_dim, mla.mla_rope_dim, mla.mla_v_dim) == (256, 128, 256)


@pytest.mark.parametrize("value,detail", [
    ("!!int", r"a value its tag cannot convert \(an explicit !!tag\?\): IndexError"),
    ("!!bool maybe", r"a value its tag cannot convert \(an explicit !!tag\?\): KeyError: 'maybe'"),
    ("!!int 1e3", r"a value its tag cannot convert \(an explicit !!tag\?\): ValueError: invalid literal"),
    ("[1, 2", r"while parsing a flow sequence; expected ',' or '\]', but got '<stream end>' \(line 1, column 6\)$"),
])
def test_yaml_a_value_cannot_be_read_from_is_one_named_line(tmp_path, value, detail):
    """An explicit tag PyYAML's converters refuse raised its plain IndexError, KeyError or ValueError (a
    traceback from the CLI, or a message naming neither file nor key); YAML's own errors spanned several
    lines. Each is now a one-line ValueError naming the override's key or the file."""
    with pytest.raises(ValueError, match=r"^train\.max_steps: not valid YAML: " + detail) as info:
        load_config(None, [f"train.max_steps={value}"])
    assert "\n" not in str(info.value)
    path = tmp_path / "tagged.yaml"
    path.write_text(f"train:\n  max_steps: {value}\n")
    with pytest.raises(ValueError, match=r"^" + re.escape(str(path)) + r": not valid YAML: ") as info:
        load_config(path)
    assert "\n" not in str(info.value)
    path.write_text("train:\n  lr: 1\n  lr: 2\n")
    with pytest.raises(ValueError, match=r": not valid YAML: duplicate key 'lr' \(line 3, column 3\)$"):
        load_config(path)


def test_a_masking_rate_that_masks_under_one_token_warns():
    """Valid but almost surely not meant: at mask_fraction_max · seq_len < 1 most sequences mask nothing.
    One token on average (the boundary) and the shipped configs load without a warning."""
    with pytest.warns(UserWarning, match=r"objective\.mask_fraction_max=0\.001 with data\.seq_len=128 masks "
                                         r"0\.128 tokens of a sequence on average, fewer than one"):
        load_config(None, ["mask_fraction_min=0.0001", "mask_fraction_max=0.001"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["mask_fraction_min=0.0001", "mask_fraction_max=0.25", "seq_len=4"])
        for path in SHIPPED:
            load_config(path.values[0])


def test_the_dataclass_defaults_are_config_yaml():
    """Without --config every key takes its dataclass default: the shipped config.yaml's values (which
    spell them out), but for its 2 K/V heads."""
    assert load_config(None, ["n_kv_heads=2"]) == load_config(ROOT / "config.yaml")


def test_overrides_may_be_one_string_and_values_are_stripped():
    assert load_config(None, "train.max_steps=7").train.max_steps == 7
    cfg = load_config(None, ["train.out_dir = runs/x ", "attn_type= mla"])
    assert (cfg.train.out_dir, cfg.model.attn_type) == ("runs/x", "mla")


def test_a_learning_rate_whose_first_adamw_step_overflows_float32_is_refused(tmp_path):
    """AdamW's first step size, lr / (1 - beta1), is a float32 scalar to torch: past its range the run
    raised a traceback in the optimizer's step (lr 4e37 with warmup 0; joint_lr 1e38 at the joint phase,
    after every stage had trained), not the divergence error a merely large lr gets. Refused up front,
    naming the key; at the limit itself it is accepted."""
    for overrides, key in ((["lr=4e37"], "train.lr"), (["joint_lr=1e38"], "train.joint_lr"),
                           (["lr=1e28", "beta1=0.999999999999"], "train.lr")):
        with pytest.raises(ValueError, match=rf"^{key}: expected a number whose first AdamW step"):
            load_config(None, overrides)
    assert load_config(None, ["lr=3.4e37", "beta1=0.9"]).train.lr == 3.4e37
    assert load_config(None, ["lr=3.4e38", "beta1=0"]).train.lr == 3.4e38
