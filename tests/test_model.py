"""DecoderBlock (lwt.layers) and LWTModel (lwt.model): shapes, where gradients go, the [MASK] row kept out
of the head, checkpoint state dicts, and the Triton path against the reference through a whole model."""
import copy
import re

import pytest
import torch

from lwt.config import ModelConfig
from lwt.layers import DecoderBlock, FrozenSwiGLU, GQAAttention, MLAAttention
from lwt.model import LWTModel
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: intra-op threads only add OpenMP spin-waiting, which on a loaded 2-core machine
    costs far more than the work (see tests/test_diffusion.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, mla_rkv=16)
    return ModelConfig(**{**base, **overrides})


def random_tokens(cfg, B=2, S=16, seed=0, with_masks=True):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    if with_masks:  # some [MASK] inputs, as in training
        tokens[:, ::3] = cfg.vocab_size
    return tokens


# ---------------------------------------------------------------------------------------------------
# DecoderBlock
# ---------------------------------------------------------------------------------------------------

BLOCK_KINDS = [
    pytest.param(dict(attn_type="gqa", n_kv_heads=2), GQAAttention, id="gqa-H4-Hkv2"),
    pytest.param(dict(attn_type="standard"), GQAAttention, id="standard-H4"),
    pytest.param(dict(attn_type="mla", mla_rkv=16), MLAAttention, id="mla-rkv16"),
    pytest.param(dict(attn_type="mla", mla_rq=8, mla_rkv=12, mla_nope_dim=6, mla_rope_dim=2, mla_v_dim=10),
                 MLAAttention, id="mla-rq8-odd-dims"),
]


@pytest.mark.parametrize("kwargs,attn_cls", BLOCK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_shape_dtype_and_gradients(kwargs, attn_cls, dtype):
    torch.manual_seed(0)
    block = DecoderBlock(32, 4, 48, frozen_seed=3, dtype=dtype, **kwargs)
    assert isinstance(block.attn, attn_cls) and isinstance(block.mlp, FrozenSwiGLU)
    x = torch.randn(2, 7, 32, dtype=dtype, requires_grad=True)
    out = block(x)
    assert out.shape == (2, 7, 32) and out.dtype == dtype
    out.backward(torch.randn_like(out))
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    for name, b in block.named_buffers():
        assert not b.requires_grad and b.grad is None, name
    assert {n for n, _ in block.named_parameters()}.isdisjoint({"mlp.w_gate", "mlp.w_up"})


def test_block_is_prenorm_with_fused_residual():
    """out = s + mlp(norm2(s)) with s = x + attn(norm1(x)), written out from the parts."""
    torch.manual_seed(0)
    block = DecoderBlock(32, 4, 48, n_kv_heads=1, dtype=torch.float64)
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 1.5)
        block.norm2.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    s = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), s + block.mlp(block.norm2(s)))


def test_block_from_config_seeds_each_layer():
    cfg = tiny_config(frozen_seed=5)
    b0, b1 = DecoderBlock.from_config(cfg, 0), DecoderBlock.from_config(cfg, 1)
    assert b0.mlp.seed == 5 and b1.mlp.seed == 6
    assert not torch.equal(b0.mlp.w_gate, b1.mlp.w_gate)
    assert torch.equal(b1.mlp.w_gate, DecoderBlock(32, 4, 64, n_kv_heads=2, frozen_seed=6).mlp.w_gate)
    assert b0.attn.n_kv_heads == 2
    mla = DecoderBlock.from_config(tiny_config(attn_type="mla", mla_rope_dim=None), 0)
    assert (mla.attn.nope_dim, mla.attn.rope_dim, mla.attn.v_dim, mla.attn.kv_rank) == (8, 4, 8, 16)
    assert DecoderBlock.from_config(tiny_config(n_kv_heads=None), 0).attn.n_kv_heads == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(attn_type="linear"), r"^attn_type: expected one of 'standard', 'gqa', 'mla', got 'linear'"),
    (dict(attn_type="standard", n_kv_heads=2), r"^n_kv_heads: attn_type 'standard' \(MHA\) needs n_kv_heads"),
    (dict(n_kv_heads=3), r"^n_kv_heads: expected a divisor of n_heads=4"),
    (dict(n_heads=0), r"^n_heads: expected a positive int"),
    # the sub-layers' errors under the block's own argument names
    (dict(norm_eps=-1.0), r"^norm_eps: expected a finite real number >= 0, got -1.0"),
    (dict(frozen_seed=-1), r"^frozen_seed: expected an int in \[0, 2\*\*64\)"),
    (dict(attn_type="mla", mla_rkv=0), r"^mla_rkv: expected a positive int, got 0"),
    (dict(attn_type="mla", mla_rq=-1), r"^mla_rq: expected an int >= 0"),
    (dict(attn_type="mla", mla_rope_dim=3), r"^mla_rope_dim: expected an even number"),
    (dict(attn_type="mla", mla_v_dim=0), r"^mla_v_dim: expected a positive int, got 0"),
    (dict(attn_type="mla", mla_nope_dim=300), r"^mla_nope_dim, mla_v_dim: expected at most 256, got 300, 8"),
    (dict(d_model=1200), r"^head_dim \(d_model // n_heads\): expected an even number <= 256 .*got 300"),
    (dict(attn_type="mla", n_heads=3), r"^n_heads: expected a divisor of d_model=32 when an MLA head size is None"),
    (dict(n_heads=3), r"^n_heads: expected a divisor of d_model=32 \(head_dim is d_model // n_heads\), got 3$"),
])
def test_block_bad_arguments(kwargs, message):
    args = dict(d_model=32, n_heads=4, d_ff=48)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        DecoderBlock(args.pop("d_model"), args.pop("n_heads"), args.pop("d_ff"), **args)


def test_mla_block_with_every_head_size_given_needs_no_divisible_width():
    """MLA derives only its default head sizes from d_model // n_heads: with all three given, n_heads need
    not divide d_model (as lwt.config allows), and the sizes are the ones given."""
    block = DecoderBlock(32, 3, 48, attn_type="mla", mla_rkv=16, mla_nope_dim=8, mla_rope_dim=4, mla_v_dim=6)
    assert (block.attn.n_heads, block.attn.nope_dim, block.attn.rope_dim, block.attn.v_dim) == (3, 8, 4, 6)
    assert block(torch.randn(1, 4, 32)).shape == (1, 4, 32)


def test_block_from_config_bad_layer_idx():
    with pytest.raises(ValueError, match=r"^layer_idx: expected an int >= 0, got -1"):
        DecoderBlock.from_config(tiny_config(), -1)


# ---------------------------------------------------------------------------------------------------
# LWTModel
# ---------------------------------------------------------------------------------------------------

def test_model_shapes_and_mask_row():
    cfg = tiny_config()
    model = LWTModel(cfg)
    V, D = cfg.vocab_size, cfg.d_model
    assert model.mask_id == V and model.embed.weight.shape == (V + 1, D)
    assert model.head_weight().shape == (V, D)
    assert model.head_weight().data_ptr() == model.embed.weight.data_ptr()  # tied: a view, not a copy
    hidden = model(random_tokens(cfg))
    assert hidden.shape == (2, 16, D) and hidden.dtype == torch.float32


def test_int32_tokens_embed_as_int64_ones():
    """tokens may be int32, as documented, not only int64: the same hidden states."""
    cfg = tiny_config()
    model = LWTModel(cfg)
    tokens = random_tokens(cfg)
    with torch.no_grad():
        assert torch.equal(model(tokens.int()), model(tokens))


@pytest.mark.parametrize("key", ["vocab_size", "n_layers"])
def test_model_refuses_an_empty_vocabulary_or_stack(key):
    """A ModelConfig not passed through lwt.config.validate: vocab_size or n_layers 0 is refused by name
    (n_layers 0 would otherwise build a model without blocks, silently)."""
    with pytest.raises(ValueError, match=rf"^{key}: expected a positive int, got 0"):
        LWTModel(tiny_config(**{key: 0}))


def test_num_params_counts_parameters_frozen_by_hand():
    """trainable_only=False counts every parameter, those set to requires_grad=False too (an embedding
    frozen by the user), plus the frozen buffers; the default counts only the ones that train."""
    cfg = tiny_config()
    model = LWTModel(cfg)
    total = model.num_params(trainable_only=False)
    model.embed.weight.requires_grad_(False)
    assert model.num_params(trainable_only=False) == total
    assert model.num_params() == total - model.embed.weight.numel() - 2 * cfg.n_layers * cfg.d_ff * cfg.d_model


def test_every_norm_takes_norm_eps():
    """model.norm_eps is the eps of every RMSNorm (config.py): the blocks' two, MLA's latent norms and
    the final norm before the head."""
    from lwt.layers import RMSNorm

    for attn_type in ("gqa", "mla"):
        model = LWTModel(tiny_config(attn_type=attn_type, mla_rq=8, norm_eps=1e-3))
        norms = {name: m.eps for name, m in model.named_modules() if isinstance(m, RMSNorm)}
        assert "norm" in norms and set(norms.values()) == {1e-3}, norms


def test_head_gradient_never_reaches_the_mask_row():
    """Through the head alone (hidden states not from the embedding) every real row gets a gradient and
    the [MASK] row none: its logit does not exist."""
    cfg = tiny_config()
    model = LWTModel(cfg)
    hidden = torch.randn(5, cfg.d_model)
    logits = hidden @ model.head_weight().t()  # (5, V): no [MASK] column
    assert logits.shape == (5, cfg.vocab_size)
    torch.nn.functional.cross_entropy(logits, torch.arange(5)).backward()
    g = model.embed.weight.grad
    assert torch.count_nonzero(g[cfg.vocab_size]) == 0
    assert (g[:cfg.vocab_size].abs().sum(dim=1) > 0).all()


def test_untied_head():
    cfg = tiny_config(tie_embeddings=False)
    model = LWTModel(cfg)
    assert model.head_weight() is model.lm_head and model.lm_head.shape == (cfg.vocab_size, cfg.d_model)
    assert "lm_head" in model.trainable_state_dict()
    assert "lm_head" not in LWTModel(tiny_config()).state_dict()


def test_partial_forward_runs_the_first_blocks():
    cfg = tiny_config(n_layers=3)
    model = LWTModel(cfg)
    tokens = random_tokens(cfg)
    with torch.no_grad():
        h = model.embed_tokens(tokens)
        assert torch.equal(model(tokens, n_blocks=0), model.final_hidden(h))
        h1 = model.blocks[0](h)
        assert torch.equal(model(tokens, n_blocks=1), model.final_hidden(h1))
        assert torch.equal(model.run_blocks(h1, 1), model.run_blocks(h, 0, 3))
        assert torch.equal(model(tokens), model(tokens, n_blocks=3))
    with pytest.raises(ValueError, match=r"^start, end: expected 0 <= start <= end <= n_layers=3, got start=2, end=1"):
        model.run_blocks(h, 2, 1)
    for start, end, bad in ((True, None, "start: expected an int, got True"), (0, 2.0, "end: expected an int, got 2.0")):
        with pytest.raises(ValueError, match=rf"^{bad}$"):
            model.run_blocks(h, start, end)
    for n_blocks in (4, -1, 1.0, True):
        message = rf"^n_blocks: expected an int in \[0, n_layers=3\] or None, got {n_blocks}$"
        with pytest.raises(ValueError, match=message):
            model(tokens, n_blocks=n_blocks)
    with pytest.raises(ValueError, match=r"^tokens: expected an int64 or int32 \(batch, seq\) tensor"):
        model(tokens.float())
    with pytest.raises(ValueError, match=r"^tokens: expected .*\(batch, seq\) tensor.*got torch\.int64 \(16,\)$"):
        model(tokens[0])  # one unbatched sequence: named as tokens, not as some block's x


def test_state_dicts_and_frozen_buffers():
    cfg = tiny_config()
    model = LWTModel(cfg)
    frozen = model.frozen_buffer_names()
    assert frozen == ["blocks.0.mlp.w_gate", "blocks.0.mlp.w_up", "blocks.1.mlp.w_gate", "blocks.1.mlp.w_up"]
    sd = model.trainable_state_dict()
    assert set(sd) == set(model.state_dict()) - set(frozen)
    assert set(sd) == {n for n, _ in model.named_parameters()}  # only trained tensors are stored
    n_frozen = 2 * cfg.n_layers * cfg.d_ff * cfg.d_model
    assert model.num_params() == sum(v.numel() for v in sd.values())
    assert model.num_params(trainable_only=False) == model.num_params() + n_frozen


def test_load_trainable_state_dict_round_trip_and_errors():
    cfg = tiny_config()
    torch.manual_seed(0)
    a = LWTModel(cfg)
    torch.manual_seed(1)
    b = LWTModel(cfg)
    tokens = random_tokens(cfg)
    assert not torch.equal(a(tokens), b(tokens))
    b.load_trainable_state_dict(a.trainable_state_dict())
    assert torch.equal(a(tokens), b(tokens))
    b.load_trainable_state_dict(a.state_dict())  # a full state_dict is accepted too

    sd = a.trainable_state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \[\]"):
        b.load_trainable_state_dict({k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['extra'\]"):
        b.load_trainable_state_dict({**sd, "extra": torch.zeros(1)})
    before = b.embed.weight.clone()
    with pytest.raises(ValueError, match=r"shape mismatch for norm.weight: \(3,\) \(expected \(32,\)\)"):
        b.load_trainable_state_dict({**sd, "norm.weight": torch.ones(3)})
    assert torch.equal(b.embed.weight, before)  # nothing was copied
    with pytest.raises(ValueError, match=r"^state_dict: expected a tensor for every key, got embed.weight \(int, "):
        b.load_trainable_state_dict({**sd, "embed.weight": 5})  # (an AttributeError on .shape before)
    assert torch.equal(b.embed.weight, before)


def test_load_trainable_state_dict_takes_an_fp8_models_full_state_dict():
    """A full state_dict of a model with FP8 frozen matrices loads into a full-precision one (its scales
    dequantise them), as load_state_dict does: the same frozen matrices either way."""
    cfg = tiny_config()
    fp8 = LWTModel(cfg, frozen_dtype=torch.float8_e4m3fn)
    sd = fp8.state_dict()
    assert any(k.endswith("w_gate_scale") for k in sd)
    strict, trainable = LWTModel(cfg), LWTModel(cfg)
    strict.load_state_dict(sd)
    trainable.load_trainable_state_dict(sd)
    assert trainable.frozen_checksum() == strict.frozen_checksum()
    tokens = random_tokens(cfg)
    assert torch.equal(trainable(tokens), strict(tokens))
    # a scale of the wrong shape: broadcast silently (one per matrix, leaving the raw FP8 values up to
    # 448) or failed inside load_state_dict after earlier keys were copied; named, nothing copied, now
    key = next(k for k in sd if k.endswith("w_gate_scale"))
    before = {k: v.clone() for k, v in trainable.state_dict().items()}
    for bad in (torch.ones(1), torch.ones(cfg.d_ff + 1)):
        with pytest.raises(ValueError, match=rf"^state_dict: shape mismatch for {re.escape(key)}: "
                                             rf"\({bad.numel()},\) \(expected \({cfg.d_ff},\)\)"):
            LWTModel(cfg).load_trainable_state_dict({**sd, key: bad})
        with pytest.raises(ValueError, match=r"^state_dict: shape mismatch"):
            trainable.load_trainable_state_dict({**sd, key: bad})
        assert all(torch.equal(v, before[k]) for k, v in trainable.state_dict().items())


def test_load_trainable_state_dict_takes_an_fp8_state_dict_cast_to_float():
    """An FP8 model's full state_dict with every tensor cast to fp32 (saved through a format without FP8)
    still carries the scales: a full-precision model dequantises with them as from the FP8 tensors, rather
    than loading the raw FP8 values (up to 448) and dropping the scales under strict=False."""
    cfg = tiny_config()
    sd = LWTModel(cfg, frozen_dtype=torch.float8_e4m3fn).state_dict()
    want, got = LWTModel(cfg), LWTModel(cfg)
    want.load_trainable_state_dict(sd)
    got.load_trainable_state_dict({k: v.float() for k, v in sd.items()})
    assert got.frozen_checksum() == want.frozen_checksum()


def test_frozen_checksum_depends_on_seed_and_dtype_only():
    cfg = tiny_config(frozen_seed=7)
    torch.manual_seed(0)
    a = LWTModel(cfg)
    torch.manual_seed(1)
    b = LWTModel(cfg)  # other trainable weights, same frozen ones
    assert a.frozen_checksum() == b.frozen_checksum()
    assert len(a.frozen_checksum()) == 64
    assert LWTModel(tiny_config(frozen_seed=8)).frozen_checksum() != a.frozen_checksum()
    assert LWTModel(cfg, dtype=torch.bfloat16).frozen_checksum() != a.frozen_checksum()
    assert LWTModel(cfg, dtype=torch.bfloat16).frozen_checksum() == a.to(torch.bfloat16).frozen_checksum()


# ---------------------------------------------------------------------------------------------------
# The kernels through a whole model
# ---------------------------------------------------------------------------------------------------

def _hidden_and_grads(model, tokens, cotangent, backend, monkeypatch):
    """Final hidden states and every trainable parameter's gradient of Σ hidden · cotangent."""
    monkeypatch.setenv("LWT_BACKEND", backend)
    model.zero_grad(set_to_none=True)
    hidden = model(tokens)
    hidden.backward(cotangent.to(hidden.dtype))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.delenv("LWT_BACKEND")
    return hidden.detach(), grads


def _compare_backends(model, truth_model, tokens, monkeypatch):
    """model on the Triton path against truth_model (model's weights in a wider dtype) on the reference;
    model on the reference in its own dtype is the error yardstick (tests/tolerances.py)."""
    gen = torch.Generator().manual_seed(1)
    device = tokens.device
    cotangent = torch.randn(*tokens.shape, model.cfg.d_model, generator=gen).to(device)
    got = _hidden_and_grads(model, tokens, cotangent, "triton", monkeypatch)
    want = _hidden_and_grads(truth_model, tokens, cotangent, "reference", monkeypatch)
    yardstick = _hidden_and_grads(model, tokens, cotangent, "reference", monkeypatch)
    assert_close("hidden", got[0], want[0].double(), yardstick[0])
    for name in got[1]:
        # a weight gradient sums over the B·S rows (fp32 accumulation in both paths, different orders)
        assert_close(f"d {name}", got[1][name], want[1][name].double(), yardstick[1][name],
                     reduced_over=tokens.numel())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter on CPU tensors; the GPU has "
                    "test_model_cuda_bf16_matches_reference")
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_model_triton_interpreter_matches_reference_fp32(monkeypatch, attn_type):
    """A tiny model, fp32, on the CPU: every kernel (RMSNorm with and without the residual, GQA or MLA
    attention, frozen SwiGLU) runs through the Triton interpreter; the float64 reference is the truth."""
    cfg = tiny_config(n_layers=2, attn_type=attn_type, mla_rq=8)
    torch.manual_seed(0)
    model = LWTModel(cfg)
    with torch.no_grad():
        for block in model.blocks:  # norm scales away from 1, so their gradients are not trivial
            block.norm1.weight.uniform_(0.5, 1.5)
            block.norm2.weight.uniform_(0.5, 1.5)
    truth = copy.deepcopy(model).double()
    _compare_backends(model, truth, random_tokens(cfg, B=2, S=16), monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_model_cuda_bf16_matches_reference(monkeypatch, attn_type):
    """The compiled kernels in bf16 on a GPU, at a small but GPU-sized shape. Truth: the same (bf16-rounded)
    weights in fp32 on the reference; yardstick: the reference in bf16."""
    cfg = tiny_config(vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512,
                      attn_type=attn_type, mla_rkv=64)
    torch.manual_seed(0)
    model = LWTModel(cfg, device="cuda", dtype=torch.bfloat16)
    truth = copy.deepcopy(model).float()
    tokens = random_tokens(cfg, B=2, S=128).cuda()
    _compare_backends(model, truth, tokens, monkeypatch)
