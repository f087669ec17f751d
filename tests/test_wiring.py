"""What each part of the objective, the model and the trainer is wired to: the documented estimator and
sampler orders, the initial scales, which split, generator, block, cache, learning rate and gradient clip
each phase uses. (Each test here stands for a plausible one-line bug that the rest of the suite let pass:
a mutation audit of lwt/.)"""
import json
import math

import pytest
import torch

from lwt import diffusion as D
from lwt import train_layerwise as T
from lwt.config import load_config
from lwt.data import build_data
from lwt.layers import FrozenSwiGLU
from lwt.model import LWTModel
from tests.test_diffusion import _one_thread, tiny_model  # noqa: F401  (_one_thread: an autouse fixture)
from tests.test_train_layerwise import TINY


# -- the objective ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_min,t_max", [(0.0, 1.0), (0.2, 0.3)])
def test_sample_t_is_the_documented_formula(t_min, t_max):
    """t_i = t_min + (t_max - t_min)·(i + 1 - u)/batch, shuffled: (t_min, t_max], never t_min (so never 0)."""
    B = 16
    t = D.sample_t(B, t_min, t_max, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = torch.rand((), generator=g, dtype=torch.float64)
    perm = torch.randperm(B, generator=g)
    want = (t_min + (t_max - t_min) * (torch.arange(B, dtype=torch.float64) + 1.0 - u) / B)[perm].float()
    assert torch.equal(t, want)


def test_evaluate_nelbo_is_the_documented_estimator():
    """One generator seeded once for all batches; per sequence n masked positions, n stratified uniform on
    {1..S} whatever training used (LLaDA eq. 6), a uniformly random subset, weighted S/n (1/t at t = n/S),
    normalised by every token; batches of different sizes weighted by their tokens."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8, (b, 12), generator=gen) for b in (2, 3, 5)]
    got = D.evaluate_nelbo(model, model.head_weight(), batches, model.mask_id, seed=5)
    g = torch.Generator().manual_seed(5)
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens in batches:
            B, S = tokens.shape
            u = torch.rand((), generator=g, dtype=torch.float64)
            perm = torch.randperm(B, generator=g)
            strata = ((torch.arange(B, dtype=torch.float64) + 1.0 - u) / B)[perm].float().double()  # (0, 1]
            n = (strata * S).ceil().clamp(1, S).long()  # (B,) in 1..S
            ranks = torch.rand((B, S), generator=g, dtype=torch.float64).argsort(1).argsort(1)
            mask = ranks < n[:, None]  # exactly n[b] masked in row b
            assert torch.equal(mask.sum(1), n)
            t = n.double() / S
            logits = model(tokens.masked_fill(mask, model.mask_id)).double() @ model.head_weight().double().t()
            ce = torch.nn.functional.cross_entropy(logits[mask], tokens[mask], reduction="none")
            total += float((ce / t.double()[:, None].expand(B, S)[mask]).sum())
            count += B * S
    assert got["tokens"] == count
    assert got["nelbo"] == pytest.approx(total / count, rel=1e-5)


# -- the sampler's order ------------------------------------------------------------------------------

class TwoPositions(torch.nn.Module):
    """A stand-in model for the sampler over 2 positions, vocab 8 (hidden = logits, head = identity):
    position 0 always predicts token 1 almost surely (confidence ~0); position 1 is uniform (confidence
    -ln 8) while position 0 is masked, and predicts token 2 almost surely once it is not."""
    vocab_size = mask_id = 8

    def head_weight(self):
        return torch.eye(8)

    def forward(self, tokens):
        N = tokens.shape[0]
        out = torch.zeros(N, 2, 8)
        out[:, 0, 1] = 50.0
        known = tokens[:, 0] != self.mask_id
        out[known, 1, 2] = 50.0
        return out


def test_confidence_order_keeps_the_surest_draws_first():
    """One position per step: confidence order fills position 0 (surest) first, so position 1 then sees it
    and predicts 2: every sample is [1, 2] at any temperature."""
    for temperature in (1.0, 0.0):
        out = D.sample(TwoPositions(), 64, 2, 2, order="confidence", temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        assert (out == torch.tensor([1, 2])).all(), temperature


def test_random_order_is_not_confidence_order():
    """order='random' (the default) fills position 1 first in about half the samples, drawing it from the
    uniform distribution: some samples then end with a token other than 2."""
    out = D.sample(TwoPositions(), 64, 2, 2, generator=torch.Generator().manual_seed(0))
    assert (out[:, 0] == 1).all()
    assert 8 <= int((out[:, 1] != 2).sum()) <= 50  # ~28 expected


# -- the model's initialisation -----------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_initial_loss_is_near_ln_vocab(tie):
    """N(0, 0.02) embedding (and untied head): near-uniform first predictions, a first loss ≈ ln V."""
    model = tiny_model(vocab_size=64, tie_embeddings=tie)
    for w in [model.embed.weight] + ([] if tie else [model.lm_head]):
        assert float(w.detach().std()) == pytest.approx(0.02, rel=0.1)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 16), generator=gen)
    t = D.sample_t(4, 0.2, 1.0, gen)
    noisy, mask = D.mask_tokens(tokens, t, model.mask_id, gen)
    with torch.no_grad():
        loss = D.masked_diffusion_loss(model(noisy), model.head_weight(), tokens, mask, t, "uniform")
    assert float(loss) == pytest.approx(math.log(64), abs=0.05)


def test_frozen_matrices_are_n_0_1_over_d_model():
    mlp = FrozenSwiGLU(64, 512, seed=0)
    for w in (mlp.w_gate, mlp.w_up):
        assert float(w.detach().std()) == pytest.approx(64 ** -0.5, rel=0.02)
        assert abs(float(w.mean())) < 0.01


# -- the trainer --------------------------------------------------------------------------------------

def _run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    args = TINY + ["--set", f"train.out_dir={out}", *extra]
    return T.main(args), out, args


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradients_reach_adamw_clipped(tmp_path, monkeypatch, dtype):
    """train.grad_clip bounds the global norm of the gradients AdamW steps with (fp32 master gradients in
    a 16-bit run), in every phase; 0 leaves them unclipped."""
    norms, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    code, _, _ = _run(tmp_path, "--set", "train.grad_clip=0.01", "--set", f"train.dtype={dtype}",
                      "--set", "train.max_steps=3", "--set", "train.joint_steps=2", name="clip")
    assert code == 0 and len(norms) == 3 + 3 + 2
    assert max(norms) <= 0.01 * (1 + 1e-4), norms
    norms.clear()
    _run(tmp_path, "--set", "train.grad_clip=0", "--set", f"train.dtype={dtype}", "--set", "train.max_steps=3",
         "--set", "train.joint_steps=0", name="noclip")
    assert min(norms) > 0.01, norms  # the clip above did bind


def test_stage_evaluations_are_the_validation_nelbo_of_the_first_k_blocks(tmp_path):
    """The table's stage k row is the NELBO of blocks 0..k on the validation split (eval_seed batches);
    stage 1 leaves blocks 0, the embedding and the norm as stage 0 left them, so the final weights give
    both rows."""
    code, out, args = _run(tmp_path, "--set", "train.joint_steps=0")
    assert code == 0
    cfg = load_config(None, T.parse_args(args).overrides)
    model = LWTModel(cfg.model)
    model.load_trainable_state_dict(torch.load(out / "final.pt", weights_only=True)["model"])
    data = build_data(cfg.data, cfg.model.vocab_size)
    gen = torch.Generator().manual_seed(cfg.objective.eval_seed)
    val = [data.get_batch("val", cfg.data.batch_size, cfg.data.seq_len, gen) for _ in range(cfg.objective.eval_batches)]
    model.eval()
    evals = {r["phase"]: r["eval"]["nelbo"] for r in map(json.loads, open(out / "metrics.jsonl")) if "eval" in r}
    for k in (0, 1):
        want = D.evaluate_nelbo(lambda x: model(x, n_blocks=k + 1), model.head_weight(), val, model.mask_id,
                                cfg.objective.eval_seed)["nelbo"]
        assert evals[f"stage {k}"] == pytest.approx(want, rel=1e-6), k


def test_training_reads_only_the_train_split(tmp_path, monkeypatch):
    """Training batches and the cache come from the train split; the validation split is read by the
    evaluations only."""
    from lwt.data import TokenData

    reads, in_eval = [], [False]
    get_batch, evaluate = TokenData.get_batch, T.Trainer.evaluate

    def recording_get_batch(self, split, *args, **kwargs):
        reads.append((split, in_eval[0]))
        return get_batch(self, split, *args, **kwargs)

    def flagged_evaluate(self, *args, **kwargs):
        in_eval[0] = True
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            in_eval[0] = False

    monkeypatch.setattr(TokenData, "get_batch", recording_get_batch)
    monkeypatch.setattr(T.Trainer, "evaluate", flagged_evaluate)
    code, _, _ = _run(tmp_path, "--set", "train.joint_steps=0")
    assert code == 0
    assert {split for split, ev in reads if ev} == {"val"}
    assert {split for split, ev in reads if not ev} == {"train"}


def test_cached_stage_draws_new_rows_every_step(tmp_path, monkeypatch):
    """Stage k > 0 samples its batches from the cache with the data generator: different rows each step."""
    from lwt.cache import ActivationCache

    rows, batch = [], ActivationCache.batch

    def recording_batch(self, index):
        rows.append(tuple(index.tolist()))
        return batch(self, index)

    monkeypatch.setattr(ActivationCache, "batch", recording_batch)
    code, _, _ = _run(tmp_path, "--set", "train.joint_steps=0", "--set", "train.cache_sequences=32")
    assert code == 0 and len(rows) == 6
    assert len(set(rows)) == 6


def test_optimizer_hyperparameters_reach_adamw(tmp_path, monkeypatch):
    """train.beta1/beta2 in that order, train.lr for the stages and train.joint_lr for the joint phase."""
    made, adamw = [], torch.optim.AdamW

    class RecordingAdamW(adamw):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    code, out, _ = _run(tmp_path, "--set", "train.beta1=0.8", "--set", "train.beta2=0.99", "--set", "train.lr=2e-3",
                        "--set", "train.joint_lr=5e-4")
    assert code == 0
    assert [(k["lr"], k["betas"]) for k in made] == [(2e-3, (0.8, 0.99))] * 2 + [(5e-4, (0.8, 0.99))]
    joint = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("phase") == "joint" and "lr" in r]
    assert [r["lr"] for r in joint] == [pytest.approx(T.lr_at(s - 1, 3, 5e-4, 2, 0.1)) for s in (2, 3)]


def test_no_cache_stage_k_trains_on_blocks_before_k(tmp_path, monkeypatch):
    """train.cache false: in stage k every input of block k is the output of block k-1 in the same step
    (the frozen prefix recomputed whole), never the embedding or an earlier block's."""
    events = []

    class HookedModel(LWTModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for i, block in enumerate(self.blocks):
                block.register_forward_pre_hook(lambda m, a, i=i: events.append(("in", i, a[0].detach().clone())))
                block.register_forward_hook(lambda m, a, o, i=i: events.append(("out", i, o.detach().clone())))

    monkeypatch.setattr(T, "LWTModel", HookedModel)
    code, _, _ = _run(tmp_path, "--set", "train.cache=false", "--set", "train.joint_steps=0",
                      "--set", "model.n_layers=3", "--set", "objective.eval_batches=1")
    assert code == 0
    inputs = [(n, e) for n, e in enumerate(events) if e[0] == "in" and e[1] > 0]
    assert inputs
    for n, (_, i, x) in inputs:
        prev = events[n - 1]
        assert prev[0] == "out" and prev[1] == i - 1 and torch.equal(prev[2], x), (n, i)


def test_stage_k_cache_holds_the_output_of_blocks_0_to_k(tmp_path):
    """Block 1's cache (written after stage 1 of a 3-layer run) holds, for each entry, the output of
    blocks 0 and 1 on the entry's masked tokens, with the weights the checkpoint holds."""
    from lwt.cache import ActivationCache

    code, out, args = _run(tmp_path, "--set", "model.n_layers=3", "--set", "train.joint_steps=0", "--stop_after", "12")
    assert code == 0
    cfg = load_config(None, T.parse_args(args).overrides)
    model = LWTModel(cfg.model)
    model.load_trainable_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    cache = ActivationCache.open(out / "cache" / "stage1", 0, {"stage": 1})
    hidden, tokens, mask, _ = cache.batch(torch.arange(len(cache)))
    with torch.no_grad():
        want = model.run_blocks(model.embed_tokens(tokens.masked_fill(mask, model.mask_id)), 0, 2)
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)


def test_data_and_mask_generators_are_independent_streams(tmp_path):
    """The trainer's data and mask generators are seeded apart: identical seeds would tie each batch's masks
    and t to its window offsets."""
    args = T.parse_args(TINY + ["--set", f"train.out_dir={tmp_path / 'g'}"])
    cfg = load_config(None, args.overrides)
    trainer = T.Trainer(cfg, args, T.Dist("cpu"))
    a = torch.rand(8, generator=trainer.data_gen)
    b = torch.rand(8, generator=trainer.mask_gen)
    assert not torch.equal(a, b)


def test_end_to_end_phase_starts_from_the_initial_weights(tmp_path, monkeypatch):
    """--end_to_end trains a fresh model, initialised as the layer-wise run was (train.seed), not the
    layer-wise result."""
    made, adamw = [], torch.optim.AdamW

    class RecordingAdamW(adamw):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append([p.detach().clone() for g in self.param_groups for p in g["params"]])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    code, _, args = _run(tmp_path, "--set", "train.joint_steps=0", "--set", "model.n_layers=1", "--end_to_end")
    assert code == 0 and len(made) == 2
    cfg = load_config(None, T.parse_args(args).overrides)
    torch.manual_seed(cfg.train.seed)
    fresh = list(LWTModel(cfg.model).parameters())
    assert len(made[1]) == len(fresh)
    for got, want in zip(made[1], fresh):
        assert torch.equal(got, want)


def test_generate_seed_selects_the_samples(tmp_path, capsys):
    """lwt.generate --seed: the same seed gives the same samples, another seed other samples."""
    import dataclasses

    import lwt.generate as generate
    from lwt.config import Config, DataConfig

    model = tiny_model(vocab_size=50, seed=4)
    path = tmp_path / "final.pt"
    torch.save({"config": dataclasses.asdict(Config(model=model.cfg, data=DataConfig(source="dummy"))),
                "model": model.trainable_state_dict(), "frozen_checksum": model.frozen_checksum()}, path)

    def run(seed):
        assert generate.main(["--checkpoint", str(path), "--length", "24", "--steps", "4", "--num_samples", "2",
                              "--seed", str(seed), "--device", "cpu"]) == 0
        return capsys.readouterr().out

    assert run(1) == run(1)
    assert run(1) != run(2)
