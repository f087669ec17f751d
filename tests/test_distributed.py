"""lwt.layers under data parallelism (DDP, FSDP2) on 2 CPU processes over gloo, and state_dict round trips.

The frozen SwiGLU gate/up matrices are buffers regenerated from a seed, not Parameters: DDP never reduces
them (and with broadcast_buffers=False never broadcasts them), FSDP2 leaves them unsharded. Each
distributed test checks its ranks against one non-parallel model trained on the concatenation of every
rank's batch: with a "mean" loss over equal per-rank token counts, averaging the ranks' gradients is the
gradient of that model's loss, so the two differ only by fp32 summation order.

Workers are module-level functions (torch.multiprocessing.spawn pickles them by name); an assertion that
fails in a worker fails the test with the worker's traceback.
"""
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lwt.config import ModelConfig
from lwt.functional import linear_cross_entropy
from lwt.layers import FrozenSwiGLU
from lwt.model import LWTModel

WORLD = 2
STEPS = 3
BATCH, SEQ = 2, 8  # per rank
CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
# Parallel vs single-process training: the same fp32 math summed in another order (gloo all-reduce,
# reduce-scatter), carried through 3 SGD steps.
RTOL, ATOL = 1e-4, 1e-5

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker) -> None:
    mp.spawn(worker, args=(WORLD, _free_port()), nprocs=WORLD, join=True)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _model() -> LWTModel:
    torch.manual_seed(0)  # the same initial parameters on every rank and in the reference
    return LWTModel(ModelConfig(**CFG))


def _optimizer(params) -> torch.optim.Optimizer:
    """Plain SGD: its step is proportional to the gradient, so a gradient reduced wrongly (summed instead
    of averaged, one rank's only) moves the parameters visibly off the single-process run (Adam's
    normalised step would hide most of the scale)."""
    return torch.optim.SGD(params, lr=0.5)


def _batch(rank: int, step: int) -> torch.Tensor:
    """(BATCH, SEQ) token ids, different for every rank and step."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=g)


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token-style loss through the tied head; the head is applied outside forward(), as the trainer does."""
    hidden = model(tokens)  # (B, S, D)
    return linear_cross_entropy(hidden[:, :-1], model.head_weight(), tokens[:, 1:])


def _train(model, opt, batches) -> list[float]:
    losses = []
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _reference(world: int) -> LWTModel:
    """One process, no parallelism: every rank's batch of each step concatenated."""
    model = _model()
    opt = _optimizer(model.parameters())
    _train(model, opt, [torch.cat([_batch(r, s) for r in range(world)]) for s in range(STEPS)])
    return model


def _fresh_frozen(model: LWTModel) -> dict[str, torch.Tensor]:
    """The frozen buffers regenerated from the config's seeds, as a new model builds them."""
    return {k: v for k, v in LWTModel(model.cfg).state_dict().items() if k in model.frozen_buffer_names()}


def _run_worker(rank: int, world: int, port: int, body) -> None:
    """body(rank, world) between process-group set-up and tear-down. Its DDP/FSDP objects hold the group
    and sit in reference cycles: collected before the group is destroyed, not at interpreter shutdown,
    where gloo's threads can abort (pytorch#179291). The ranks leave together: a rank tearing gloo down
    while the other still uses it can abort too."""
    _init(rank, world, port)
    try:
        body(rank, world)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, port: int) -> None:
    _run_worker(rank, world, port, _ddp_body)


def _ddp_body(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    frozen_names = model.frozen_buffer_names()
    ddp = DDP(model, broadcast_buffers=False)
    # DDP reduces the gradients of what parameters() yields: the frozen matrices are not among them.
    param_ids = {id(p) for p in ddp.parameters()}
    buffers = dict(model.named_buffers())
    assert frozen_names and not any(id(buffers[n]) in param_ids for n in frozen_names)
    assert all(p.requires_grad for p in ddp.parameters())

    opt = _optimizer(ddp.parameters())
    initial = [p.detach().clone() for p in model.parameters()]
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        tokens = _batch(rank, step)
        hidden = ddp(tokens)  # through DDP's forward, so its reducer is armed
        loss = linear_cross_entropy(hidden[:, :-1], model.head_weight(), tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(buffers[n].grad is None for n in frozen_names)

    # Different data per rank (different losses), identical parameters after the all-reduced steps.
    all_losses = [None] * world
    dist.all_gather_object(all_losses, losses)
    assert all_losses[0] != all_losses[1]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "parameters differ across ranks"
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), initial)), "nothing was trained"

    # Frozen buffers: untouched by training, equal to a fresh regeneration from the seeds, same on every rank.
    fresh = _fresh_frozen(model)
    for name in frozen_names:
        assert torch.equal(buffers[name], fresh[name]), name
        gathered = [torch.empty_like(buffers[name]) for _ in range(world)]
        dist.all_gather(gathered, buffers[name].contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), name

    # The same as one process training on both ranks' data.
    ref = dict(_reference(world).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    _run_worker(rank, world, port, _fsdp_body)


def _fsdp_body(rank: int, world: int) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded(model: LWTModel) -> LWTModel:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = sharded(_model())
    frozen_names = model.frozen_buffer_names()
    # Every Parameter is sharded (a DTensor split along dim 0); the frozen matrices are not Parameters,
    # so FSDP2 leaves them as plain, whole tensors on every rank.
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
    buffers = dict(model.named_buffers())
    for name in frozen_names:
        assert name not in params
        assert type(buffers[name]) is torch.Tensor and buffers[name].shape == (CFG["d_ff"], CFG["d_model"])

    opt = _optimizer(model.parameters())
    losses = _train(model, opt, [_batch(rank, s) for s in range(STEPS)])
    assert all(map(torch.isfinite, map(torch.tensor, losses)))

    full_opts = StateDictOptions(full_state_dict=True)
    full = get_model_state_dict(model, options=full_opts)  # gathered on every rank
    ref = _reference(world)
    ref_sd = ref.state_dict()
    assert set(full) == set(ref_sd)
    fresh = _fresh_frozen(ref)
    for name, value in full.items():
        assert type(value) is torch.Tensor, name
        if name in frozen_names:
            assert torch.equal(value, fresh[name]), f"{name}: the frozen matrix changed"
        else:
            torch.testing.assert_close(value, ref_sd[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")

    # Round trip: the full state dict loads into a freshly sharded model (other initial weights) and
    # into a plain one; both then compute what the trained sharded model computes.
    torch.manual_seed(1)
    other = sharded(LWTModel(ModelConfig(**CFG)))
    set_model_state_dict(other, dict(full), options=full_opts)  # a copy: it replaces the values it loads
    again = get_model_state_dict(other, options=full_opts)
    assert set(again) == set(full) and all(torch.equal(again[k], full[k]) for k in full)
    plain = LWTModel(ModelConfig(**CFG))
    plain.load_state_dict(full)
    tokens = _batch(rank, STEPS)
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(other(tokens), expected, rtol=0, atol=0)
        torch.testing.assert_close(plain(tokens), expected, rtol=1e-5, atol=1e-6)

    # Mixed precision (bf16 compute, fp32 sharded parameters and gradient reduction): FSDP2 casts the
    # Parameters it gathers for compute; the frozen matrices are not Parameters and keep their fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = _model()
    for block in mixed.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(mixed, mesh=mesh, mp_policy=policy)
    seen = []
    mlp = mixed.blocks[0].mlp
    hook = mlp.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].dtype, m.w_down.dtype, m.w_gate.dtype)))
    mixed_opt = _optimizer(mixed.parameters())
    mixed_losses = _train(mixed, mixed_opt, [_batch(rank, s) for s in range(STEPS)])
    hook.remove()
    assert seen and all(d == (torch.bfloat16, torch.bfloat16, torch.float32) for d in seen), seen
    assert all(isinstance(p, DTensor) and p.dtype == p.grad.dtype == torch.float32 for p in mixed.parameters())
    mixed_buffers = dict(mixed.named_buffers())
    for name in frozen_names:
        assert torch.equal(mixed_buffers[name], fresh[name]), f"{name}: changed under mixed precision"
    # Same data and initial weights as the fp32 run above: each step's loss within 1e-2 relative of it,
    # 2.5 units of bf16's 2^-8 rounding (about 1e-3 observed over the 3 steps).
    torch.testing.assert_close(torch.tensor(mixed_losses), torch.tensor(losses), rtol=1e-2, atol=0)


def _fsdp2_unavailable() -> str | None:
    """Why FSDP2 cannot run here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}: {e}"
    return None


@needs_gloo
def test_ddp_reduces_parameters_only_and_frozen_buffers_stay_identical():
    _spawn(_ddp_worker)


@needs_gloo
def test_fsdp2_leaves_frozen_buffers_unsharded_and_state_dict_round_trips():
    """Also under a bf16 MixedPrecisionPolicy: the frozen matrices stay fp32 and whole."""
    reason = _fsdp2_unavailable()
    if reason:
        pytest.skip(reason)
    _spawn(_fsdp_worker)


def _collectives_worker(rank: int, world: int, port: int) -> None:
    _run_worker(rank, world, port, _collectives_body)


def _collectives_body(rank: int, world: int) -> None:
    from lwt.train_layerwise import Dist

    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), str(rank)
    env = Dist("cpu")  # (the process group is up: Dist uses it)
    assert (env.world, env.rank, env.main) == (world, rank, rank == 0)
    assert env.all_mean(float(rank + 1)) == 1.5  # the logged loss and the NELBO check: a mean, not a sum
    assert env.any(rank == 1) and not env.any(False)
    assert env.gather(10 * rank) == [0, 10]
    env.close()
    assert dist.is_initialized(), "a group the caller made is the caller's to destroy"
    del os.environ["WORLD_SIZE"], os.environ["RANK"]
    assert (Dist("cpu").world, Dist("cpu").rank) == (world, rank)  # the group's, without torchrun's variables
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), str(1 - rank)
    with pytest.raises(ValueError, match=rf"^WORLD_SIZE=2, RANK={1 - rank}: expected the world size and rank of "
                                         rf"the process group made before main, 2 and {rank}$"):
        Dist("cpu")


@needs_gloo
def test_the_trainers_collectives_average_agree_and_gather_in_rank_order():
    _spawn(_collectives_worker)


# -- one process ------------------------------------------------------------------------------------------


def test_state_dict_loads_into_a_fresh_model_with_identical_outputs():
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    src = LWTModel(cfg)
    torch.manual_seed(1)
    dst = LWTModel(cfg)
    sd = src.state_dict()
    assert set(src.frozen_buffer_names()) <= set(sd)  # the frozen matrices are saved...
    assert not any(k.endswith(("_cos", "_sin")) for k in sd)  # ...the RoPE tables are not (plain attributes)
    dst.load_state_dict(sd)
    tokens = _batch(0, 0)
    with torch.no_grad():
        assert torch.equal(dst(tokens), src(tokens))


def test_to_float64_and_back_keeps_outputs_close():
    torch.manual_seed(0)
    model = LWTModel(ModelConfig(**CFG))
    tokens = _batch(0, 0)
    with torch.no_grad():
        expected = model(tokens)
        model.to(torch.float64)
        assert model.embed.weight.dtype == torch.float64
        torch.testing.assert_close(model(tokens).float(), expected, rtol=1e-4, atol=1e-5)
        model.to(torch.float32)
        torch.testing.assert_close(model(tokens), expected, rtol=1e-6, atol=1e-6)


def test_frozen_swiglu_keeps_its_frozen_dtype_under_to_dtype():
    mlp = FrozenSwiGLU(32, 64, seed=0, frozen_dtype=torch.bfloat16).to(torch.float64)
    assert mlp.w_down.dtype == torch.float64
    assert mlp.w_gate.dtype == torch.bfloat16 and mlp.w_up.dtype == torch.bfloat16
