"""The layer-wise trainer end to end on the CPU: every phase, the activation cache, resume, DDP over two
processes, the CLI forms and its errors. Tiny models on Python's own documentation text (or dummy tokens)."""
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch

from lwt import train_layerwise as T
from lwt.cache import ActivationCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--set", "model.d_ff=64", "--set", "model.n_layers=2", "--set", "data.seq_len=16",
        "--set", "data.batch_size=4", "--set", "train.max_steps=6", "--set", "train.warmup_steps=2",
        "--set", "train.joint_steps=3", "--set", "train.cache_sequences=8", "--set", "train.log_every=2",
        "--set", "objective.eval_batches=2", "--set", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest single-threaded on a loaded 2-core machine (and identically every time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, *extra, name="run"):
    out = tmp_path / name
    code = T.main(TINY + ["--set", f"train.out_dir={out}", *extra])
    return code, out


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def _shifted_clock(monkeypatch) -> list:
    """The trainer's clock, shifted by shift[0] seconds (the returned one-item list): a test adds to it to make
    a step or a cache write take that long on the trainer's clock, without sleeping."""
    shift = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + shift[0]))
    return shift


def _recording(monkeypatch, owner, name) -> list:
    """Replace owner.name by a wrapper that appends each of its results to the returned list."""
    results, fn = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args: results.append(fn(*args)) or results[-1])
    return results


def test_all_phases_cache_and_table(tmp_path, capsys, monkeypatch):
    saves, atomic_save = [], T._atomic_save

    def recording_save(state, path):
        saves.append((os.path.basename(path), state.get("phase"), state.get("step")))
        atomic_save(state, path)

    monkeypatch.setattr(T, "_atomic_save", recording_save)
    code, out = _run(tmp_path, "--end_to_end")
    assert code == 0
    # A checkpoint after each phase, and one at the end of each phase's steps that a write follows:
    # before block 0's cache (6 steps per stage), final.pt (3 joint steps) and end_to_end.pt (15 steps),
    # so that a failed write loses no training. final.pt and end_to_end.pt come before the checkpoint that
    # moves past their phase: a crash between the two resumes into a phase end that writes them again.
    assert saves == [("checkpoint.pt", 0, 6), ("checkpoint.pt", 1, 0), ("checkpoint.pt", 2, 0),
                     ("checkpoint.pt", 2, 3), ("final.pt", None, None), ("checkpoint.pt", 3, 0),
                     ("checkpoint.pt", 3, 15), ("end_to_end.pt", None, None), ("checkpoint.pt", 4, 0)]
    text = capsys.readouterr().out
    for label in ("stage 0", "stage 1", "fused", "joint", "end-to-end"):
        assert f"{label:>11} " in text, label
    assert "unigram entropy" in text
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r["phase"] for r in records if "eval" in r]
    assert evals == ["stage 0", "stage 1", "fused", "joint", "end-to-end"]
    assert [r["step"] for r in records if r.get("phase") == "stage 1" and "loss" in r] == [2, 4, 6]
    # Block 0's cache was written for stage 1, and deleted once stage 1 had finished; the last block
    # needs none.
    assert "writing block 0's activation cache" in text and "writing block 1's" not in text
    assert not (out / "cache" / "stage0").exists()
    final, e2e = (torch.load(out / f, weights_only=True) for f in ("final.pt", "end_to_end.pt"))
    assert final["model"].keys() == e2e["model"].keys()
    assert not torch.equal(final["model"]["embed.weight"], e2e["model"]["embed.weight"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["phase"] == 4 and state["step"] == 0  # after the last of the four phases (fused is an evaluation)
    assert set(state) == T._CHECKPOINT_KEYS  # what resume checks for is what save writes
    for saved in (state, final, e2e):  # frozen: regenerated, never stored (the model files' keys are the checkpoint's)
        assert saved["model"].keys() == state["model"].keys()
        assert not any(name.endswith(("w_gate", "w_up")) for name in saved["model"])
    # table.txt is the table printed, its last line the unigram entropy of the training split
    table = (out / "table.txt").read_text()
    assert table.startswith("      phase  val NELBO") and "\n" + table in text
    cfg = T.load_config(None, T.parse_args(TINY).overrides)
    unigram = T.build_data(cfg.data, cfg.model.vocab_size).unigram_entropy("train")
    assert table.splitlines()[-1].startswith(f"unigram entropy of the training tokens: {unigram:.4f} nats/token")
    rows = json.loads(state["history"])
    assert [r["phase"] for r in rows] == ["stage 0", "stage 1", "fused", "joint", "end-to-end"]
    assert all(r["ppl_bound"] == pytest.approx(math.exp(r["nelbo"])) for r in rows), rows


def test_tokens_per_second_leaves_out_the_first_step(tmp_path, capsys, monkeypatch):
    """On a GPU a phase's first step compiles and autotunes the kernels: the table's tok/s counts from
    the second step on, while "wall s" includes the first. Here the first step of each phase takes 100 s
    more on the trainer's clock (shifted, not slept: the other steps' real time, however loaded the
    machine, stays far below it)."""
    loss, seen, shift = T.Trainer.loss, set(), _shifted_clock(monkeypatch)

    def slow_first(self, *args):
        phase = self.position[0]
        if phase not in seen:
            seen.add(phase)
            shift[0] += 100.0
        return loss(self, *args)

    monkeypatch.setattr(T.Trainer, "loss", slow_first)
    code, _ = _run(tmp_path)
    assert code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("    stage ") and "[" not in line]  # table rows, not progress bars
    assert len(rows) == 2
    for row in rows:  # phase (2 words), val NELBO, ppl, tokens, wall s, cache s, tok/s, peak
        tokens, wall, rate = float(row[4].replace(",", "")), float(row[5]), float(row[7].replace(",", ""))
        assert wall >= 100 and rate > 2 * tokens / wall, row


@pytest.mark.cuda
@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_all_phases_on_a_gpu(tmp_path, capsys, attn_type):
    """The trainer's CUDA path: train.device auto (one process: the current GPU), bf16 with fp32 master
    weights and fused AdamW, the Triton kernels in every layer, the bf16 activation cache, the allocator's
    peak memory in the table; every phase of a tiny run, and the checkpoint loads."""
    code, out = _run(tmp_path, "--end_to_end", "--set", "train.device=auto", "--set", "train.dtype=auto",
                     "--set", f"model.attn_type={attn_type}")
    assert code == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()
            if line.startswith(("    stage ", "      joint", " end-to-end")) and "[" not in line]
    assert len(rows) == 4, text
    known_peak = T.peak_tflops(torch.device("cuda"), torch.bfloat16) is not None
    for row in rows:  # ... tok/s, TFLOP/s, MFU, peak MiB: the GPU's allocator peak (no "*": not the process's RSS)
        assert float(row[-4].replace(",", "")) > 0 and float(row[-3]) > 0 and not row[-1].endswith("*"), row
        assert row[-2].endswith("%") if known_peak else row[-2] == "-", row
        assert math.isfinite(float(row[-9])), row  # val NELBO
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["phase"] == 4 and all(t.device.type == "cpu" for t in state["model"].values())


def test_stages_train_only_their_block(tmp_path):
    """After stage 1, block 0, the embedding and the final norm are exactly as stage 0 left them."""
    code, out = _run(tmp_path, "--set", "train.joint_steps=0", "--stop_after", "6", name="a")
    after_stage0 = _weights(out)
    code, out = _run(tmp_path, "--set", "train.joint_steps=0", "--resume", name="a")
    after_stage1 = _weights(out)
    for key, value in after_stage1.items():
        if key.startswith("blocks.1."):
            assert not torch.equal(value, after_stage0[key]), key
        else:
            assert torch.equal(value, after_stage0[key]), key


def test_no_cache_recomputes_the_prefix(tmp_path):
    """train.cache false: no cache is written, and stage 1 still trains and is evaluated (that its inputs
    are the recomputed prefix's outputs: tests/test_wiring.py)."""
    code, out = _run(tmp_path, "--set", "train.cache=false", "--set", "train.joint_steps=0")
    assert code == 0 and not (out / "cache").exists()
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if r.get("phase") == "stage 1" and "loss" in r] == [2, 4, 6]
    stage1 = [r["eval"]["nelbo"] for r in records if r.get("phase") == "stage 1" and "eval" in r]
    assert len(stage1) == 1 and math.isfinite(stage1[0])


@pytest.mark.parametrize("stop", [3, 8, 13], ids=["mid-stage0", "mid-stage1", "mid-joint"])
def test_resume_is_bit_identical(tmp_path, stop):
    """Stopped after `stop` steps and resumed, a run ends with exactly the weights of an uninterrupted one."""
    _, full = _run(tmp_path, "--set", "train.ckpt_every=4", name="full")
    code, part = _run(tmp_path, "--set", "train.ckpt_every=4", "--stop_after", str(stop), name="part")
    assert code == 0
    mid = torch.load(part / "checkpoint.pt", weights_only=True)
    assert mid["step"] > 0  # stopped inside a phase
    _run(tmp_path, "--set", "train.ckpt_every=4", "--resume", name="part")
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the log too: the lines after the checkpoint were cut on resume and logged again, once
    logged = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in open(out / "metrics.jsonl")]
              for out in (full, part)]
    assert logged[0] == logged[1]


@pytest.mark.parametrize("at,sig", [(3, "SIGTERM"), (6, "SIGTERM"), (3, "SIGINT")],
                         ids=["mid-stage0", "stage0-last-step", "ctrl-c-mid-stage0"])
def test_sigterm_stops_with_a_checkpoint_and_resumes_bit_identical(tmp_path, monkeypatch, capsys, at, sig):
    """A SIGTERM (a scheduler preempting the job) or a SIGINT (Ctrl-C) during step `at`: the run finishes
    that step, writes a checkpoint (at the last step of a phase: the phase's end, cache included), exits
    143 (130 for SIGINT, which raised KeyboardInterrupt and lost the steps since the last checkpoint), and
    a resumed run ends with exactly the weights of an uninterrupted one. The handlers are the run's only."""
    import signal

    _, full = _run(tmp_path, name="full")
    calls, loss = [], T.Trainer.loss

    def loss_then_term(self, *args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), getattr(signal, sig))
        return loss(self, *args)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "loss", loss_then_term)
        code, part = _run(tmp_path, name="part")
    assert code == 128 + getattr(signal, sig)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert f"({sig}; a checkpoint was written)" in capsys.readouterr().out
    mid = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (mid["phase"], mid["step"]) == ((0, 3) if at == 3 else (1, 0))
    code, _ = _run(tmp_path, "--resume", name="part")
    assert code == 0
    a, b = _weights(full), _weights(part)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_second_sigint_interrupts_at_once(tmp_path, monkeypatch):
    """Ctrl-C twice: the first asks for a stop at the end of the step, the second interrupts then and there
    (KeyboardInterrupt, no checkpoint of that step), as a user pressing it again expects; the handlers
    are restored either way."""
    import signal

    calls, loss = [], T.Trainer.loss

    def loss_then_two_interrupts(self, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # (its handler runs before this returns)
            calls.append("past the first")
            signal.raise_signal(signal.SIGINT)
        return loss(self, *args)

    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "loss", loss_then_two_interrupts)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, name="twice")
    assert signal.getsignal(signal.SIGINT) == before and calls[-1] == "past the first"
    assert not (tmp_path / "twice" / "checkpoint.pt").exists()


def test_a_second_sigint_during_the_cleanup_still_releases_the_locks(tmp_path, monkeypatch):
    """A KeyboardInterrupt that lands while main tidies up (freeing the trainer) still closes the lock
    files: a notebook, whose process lives on, can resume at once instead of being told its own pid holds
    the run."""
    collect = T.gc.collect

    def interrupted_collect():
        collect()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(T.gc, "collect", interrupted_collect)
        with pytest.raises(KeyboardInterrupt) as kept:  # (its traceback holds main's frame, as IPython's does)
            _run(tmp_path, "--stop_after", "2")
    assert _run(tmp_path, "--resume")[0] == 0
    del kept


def test_main_called_from_python_keeps_the_callers_rng_and_modes(tmp_path):
    """main() under the caller's no_grad and autocast trains as from the shell (bit-identical weights),
    and the caller's global RNG stream goes on as if main had not run (it seeds the weights from it)."""
    torch.manual_seed(123)
    want = torch.rand(2)
    assert _run(tmp_path, name="plain")[0] == 0
    torch.manual_seed(123)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _run(tmp_path, name="inside")[0] == 0
    assert torch.equal(torch.rand(2), want)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "inside")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_callers_modes_come_back_even_when_the_teardown_is_interrupted(tmp_path, monkeypatch):
    """A KeyboardInterrupt in the process group's teardown (the last step of main's cleanup) still hands
    the caller back its grad mode and RNG at once, not when the kept traceback is collected."""
    close = T.Dist.close

    def interrupted_close(self):
        close(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Dist, "close", interrupted_close)
    torch.manual_seed(5)
    want = torch.rand(2)
    torch.manual_seed(5)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt) as kept:
            _run(tmp_path, "--stop_after", "2")
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.rand(2), want)
    del kept


def test_the_command_line_reports_an_allocation_failure_in_one_line(monkeypatch, capsys):
    """python -m lwt.train_layerwise: running out of memory (a batch size with a zero too many) is one line
    saying so and what to lower, exit status 1; any other RuntimeError stays a traceback."""
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    monkeypatch.setattr(T, "main", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        T.cli()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 "
                                              "GiB.); lower data.batch_size or data.seq_len")
    monkeypatch.setattr(T, "main", lambda: torch.zeros(2) @ torch.zeros(3))
    with pytest.raises(RuntimeError, match="size mismatch|cannot be multiplied|inconsistent"):
        T.cli()


def test_an_interrupt_inside_a_checkpoint_write_is_a_keyboard_interrupt(tmp_path, monkeypatch):
    """torch.save's zip writer turns a KeyboardInterrupt in a write into a RuntimeError ('[enforce fail at
    inline_container.cc] ...'), the interrupt only its context: _atomic_save raises the interrupt, and
    leaves no temporary file."""
    def interrupted_save(state, f):
        f.write(b"x" * 4096)
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46 vs 0")

    monkeypatch.setattr(T.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        T._atomic_save({"step": 1}, str(tmp_path / "checkpoint.pt"))
    assert os.listdir(tmp_path) == []


def test_an_ignored_sigint_stays_ignored(tmp_path, monkeypatch):
    """A background job of a non-interactive shell starts with SIGINT ignored: a Ctrl-C meant for the
    foreground job must not stop the run (it stopped it once the trainer handled SIGINT)."""
    import signal

    calls, loss = [], T.Trainer.loss

    def loss_then_interrupt(self, *args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return loss(self, *args)

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with monkeypatch.context() as m:
            m.setattr(T.Trainer, "loss", loss_then_interrupt)
            code, _ = _run(tmp_path, name="ignored")
        assert code == 0 and len(calls) > 3 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _nan_loss_at(monkeypatch, call):
    """Make the training loss of the `call`-th step of the run (1-based, over all phases) NaN: its
    gradients, hence the weights after its update, are NaN too."""
    calls, loss = [], T.Trainer.loss

    def poisoned(self, *args):
        calls.append(1)
        value = loss(self, *args)
        return value * float("nan") if len(calls) == call else value

    monkeypatch.setattr(T.Trainer, "loss", poisoned)


def test_a_nan_loss_stops_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    """A NaN loss at step 1 is seen at the first log step (2): the run stops with an error saying so and
    writes neither a checkpoint nor block 0's cache of NaN activations."""
    _nan_loss_at(monkeypatch, 1)
    with pytest.raises(T.TrainingDiverged, match=r"^stage 0, step 2: the training loss is nan: .* before its first "
                                                 r"checkpoint; start again with a lower train.lr \(now 0.003\)$"):
        _run(tmp_path, name="nan")
    out = tmp_path / "nan"
    assert not (out / "checkpoint.pt").exists()
    assert not (out / "cache" / "stage0").exists() or not os.listdir(out / "cache" / "stage0")


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Weights made NaN by step 2 of stage 1 (step 8 of the run), with a checkpoint due at step 3 and no log
    step before it: the checkpoint is not overwritten (it still holds the start of stage 1, finite), block
    0's cache is intact, and a resume without the fault ends as an uninterrupted run."""
    every = ("--set", "train.ckpt_every=3", "--set", "train.log_every=4", "--set", "train.grad_clip=0")
    _, full = _run(tmp_path, *every, name="full")
    with monkeypatch.context() as m:
        _nan_loss_at(m, 8)
        with pytest.raises(T.TrainingDiverged, match=r"^stage 1, step 3: the trained weights are no longer finite "
                                                     r".*checkpoint.pt holds the start of stage 1\). A --resume .* "
                                                     r"or a train.grad_clip above 0$"):
            _run(tmp_path, *every, name="part")
    part = tmp_path / "part"
    saved = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (saved["phase"], saved["step"]) == (1, 0)
    assert all(torch.isfinite(w).all() for w in saved["model"].values())
    assert _run(tmp_path, *every, "--resume", name="part")[0] == 0  # reads block 0's cache: checked on open
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_nan_validation_nelbo_stops_before_the_cache_write(tmp_path, monkeypatch, value):
    evaluate = T.Trainer.evaluate
    monkeypatch.setattr(T.Trainer, "evaluate", lambda self, n: {**evaluate(self, n), "nelbo": float(value)})
    with pytest.raises(T.TrainingDiverged, match=rf"^stage 0: the validation NELBO after step 6 is {value}: "):
        _run(tmp_path, name="nan")
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.parametrize("extra", [(), ("--set", "model.attn_type=mla", "--set", "model.mla_rq=16"),
                                   ("--set", "train.cache=false", "--set", "model.tie_embeddings=false")],
                         ids=["gqa-cached", "mla-cached", "gqa-recomputed-untied"])
def test_step_flops_are_what_the_flop_counter_counts(tmp_path, monkeypatch, extra):
    """step_flops gives every phase's training step (forward, backward, the frozen prefix's forward when it
    is recomputed) the FLOPs torch's FlopCounterMode counts for it on the reference path: the counter runs
    from the step's first lr_at call (before its batch) to its gradient clipping (after its backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    lr_at, clip, loss, step_flops = T.lr_at, torch.nn.utils.clip_grad_norm_, T.Trainer.loss, T.step_flops
    live, steps = {}, []

    def counting_lr_at(*args):
        if "mode" not in live:
            live["mode"] = FlopCounterMode(display=False)
            live["mode"].__enter__()
        return lr_at(*args)

    def recording_loss(self, final, tokens, mask, t):
        live["masked"] = int(mask.sum())
        return loss(self, final, tokens, mask, t)

    def recording_step_flops(*args):
        live["parts"] = step_flops(*args)
        return live["parts"]

    def count_then_clip(*args, **kwargs):
        mode = live.pop("mode")
        mode.__exit__(None, None, None)
        per_batch, per_masked = live["parts"]
        steps.append((mode.get_total_flops(), per_batch + per_masked * live["masked"]))
        return clip(*args, **kwargs)

    monkeypatch.setattr(T, "lr_at", counting_lr_at)
    monkeypatch.setattr(T.Trainer, "loss", recording_loss)
    monkeypatch.setattr(T, "step_flops", recording_step_flops)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", count_then_clip)
    code, _ = _run(tmp_path, "--set", "model.n_layers=3", "--set", "train.max_steps=1", "--set", "train.joint_steps=1",
                   "--end_to_end", *extra)
    assert code == 0
    assert len(steps) == 8  # stages 0, 1, 2, joint, then end-to-end for as many steps
    assert all(counted == expected for counted, expected in steps), steps
    assert len({expected for _, expected in steps[:4]}) == 4  # the phases differ: each has its own formula


@pytest.mark.parametrize("gpu,dtype,peak", [("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0),
                                            ("NVIDIA H100 PCIe", torch.float16, 756.0),
                                            ("NVIDIA H100 NVL", torch.bfloat16, 835.0),
                                            ("NVIDIA H200", torch.bfloat16, 989.0),
                                            ("NVIDIA GH200 480GB", torch.bfloat16, 989.0),
                                            ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
                                            ("NVIDIA H100 80GB HBM3", torch.float32, None),
                                            ("Tesla T4", torch.bfloat16, None)])
def test_peak_for_the_mfu(monkeypatch, gpu, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    assert T.peak_tflops(torch.device("cuda", 0), dtype) == peak
    assert T.peak_tflops(torch.device("cpu"), torch.bfloat16) is None


def test_table_of_rows_with_and_without_flops():
    """MFU as a percentage where a peak is known; rows from a checkpoint written before the FLOP count
    (no tflops, no mfu) print "-"."""
    row = dict(phase="stage 0", nelbo=2.5, ppl_bound=12.18, tokens=1000, wall_s=1.0, cache_s=0.0,
               tokens_per_s=900.0, peak_mib=100.0, peak_kind="cuda")
    lines = T.print_table([{**row, "tflops": 412.3456, "mfu": 0.4169}, row], None).splitlines()
    assert lines[2].split()[-3:] == ["412", "41.7%", "100"]
    assert lines[3].split()[-3:] == ["-", "-", "100"]


def test_resume_of_a_one_group_optimizer_state(tmp_path):
    """A checkpoint whose AdamW state has one parameter group (written before weight decay spared the norm
    weights) resumes with weight decay on: each parameter keeps its moments, so the run ends as one resumed
    from the same state in two groups does."""
    import shutil

    wd = ("--set", "train.weight_decay=0.1", "--set", "train.joint_steps=0")
    code, two = _run(tmp_path, *wd, "--stop_after", "3", name="two")
    assert code == 0
    shutil.copytree(two, tmp_path / "one")
    state = torch.load(two / "checkpoint.pt", weights_only=True)
    saved = state["optimizer"]
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    # the one-group layout: parameters in the model's order (stage 0: the embedding, block 0, the final norm)
    model = T.LWTModel(T.load_config(None, T.parse_args(TINY + list(wd)).overrides).model)
    params = T.set_trainable(model, T.trainable_core(model, "stage", 0))
    order = [i for i, p in enumerate(params) if p.dim() >= 2] + [i for i, p in enumerate(params) if p.dim() < 2]
    state["optimizer"] = {"state": {old: saved["state"][new] for new, old in enumerate(order)},
                          "param_groups": [{**saved["param_groups"][0], "params": list(range(len(params)))}]}
    torch.save(state, tmp_path / "one" / "checkpoint.pt")
    for name in ("two", "one"):
        assert _run(tmp_path, *wd, "--resume", name=name)[0] == 0
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_missing_cache_is_rebuilt_on_resume(tmp_path, capsys):
    """A wiped cache directory (a scratch disk lost to a preemption) is rebuilt from the checkpoint:
    the resumed run still ends bit-identical to an uninterrupted one. What it prints says so (it said
    "rerun it" of the stage it was rerunning)."""
    _, full = _run(tmp_path, "--set", "model.n_layers=3", name="full")
    _run(tmp_path, "--set", "model.n_layers=3", "--stop_after", "14", name="part")  # inside stage 2
    shutil.rmtree(tmp_path / "part" / "cache")
    capsys.readouterr()
    _run(tmp_path, "--set", "model.n_layers=3", "--resume", name="part")
    out = capsys.readouterr().out
    stage1 = tmp_path / "part" / "cache" / "stage1"
    assert (f"rank 0: block 1's activation cache in {stage1} is missing or incomplete; rebuilding it from the "
            f"weights") in out and "rerun it" not in out
    a, b = _weights(full), _weights(tmp_path / "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_generate_from_a_mid_stage_checkpoint_runs_the_trained_blocks(tmp_path, capsys):
    """lwt.generate on a run's checkpoint.pt written inside stage 1 of 3 samples through blocks 0 and 1, the
    model stage 1 evaluates: its hidden states are the truncated model's, and a note says so."""
    from lwt import generate

    _run(tmp_path, "--set", "model.n_layers=3", "--stop_after", "8", name="part")  # stage 1, step 2 of 6
    path = str(tmp_path / "part" / "checkpoint.pt")
    capsys.readouterr()
    model, _, ckpt = generate._load(path, "cpu")
    assert generate.trained_depth(ckpt, path)[0] == 2
    tokens = torch.randint(0, model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(model(tokens, n_blocks=2), model(tokens))  # block 2 (untrained) changes them
    assert generate.main(["--checkpoint", path, "--length", "8", "--steps", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"note: {path} was written during stage 1 (step 2 of 6): sampling through blocks 0..1" in err


def _digest_from_scratch(model, k):
    """A cache's weights digest the plain way: the embedding's and blocks 0..k's parameters, hashed now."""
    state = hashlib.sha256()
    for module in [model.embed, *model.blocks[:k + 1]]:
        for name, p in module.named_parameters():
            state.update(name.encode())
            state.update(p.detach().float().numpy().tobytes())
    return state.hexdigest()[:16]


def test_cache_digests_are_exact_and_hash_each_module_once(tmp_path, monkeypatch):
    """Every weights digest a cache is written or opened with equals one computed from scratch at that
    moment, through a 3-layer run and through a resume that rebuilds the wiped caches; and each process
    hashes each module once (the kept hash states), where hashing the whole prefix at every call took
    10 module hashes in the first run."""
    hashed, checked = [], []
    hash_module, weights_digest = T._hash_module, T.Trainer._weights_digest

    def counting_hash(state, module):
        hashed.append(module)
        return hash_module(state, module)

    def checked_digest(self, k):
        digest = weights_digest(self, k)
        assert digest == _digest_from_scratch(self.model, k), k
        checked.append(k)
        return digest

    monkeypatch.setattr(T, "_hash_module", counting_hash)
    monkeypatch.setattr(T.Trainer, "_weights_digest", checked_digest)
    three = ["--set", "model.n_layers=3"]
    _run(tmp_path, *three, "--stop_after", "14", name="part")  # inside stage 2
    assert checked == [0, 0, 1, 1]  # block 0's cache written, opened; block 1's written, opened
    assert len(hashed) == len({id(m) for m in hashed}) == 3  # the embedding, block 0, block 1
    shutil.rmtree(tmp_path / "part" / "cache")
    hashed.clear()
    _run(tmp_path, *three, "--resume", name="part")
    assert len(hashed) == len({id(m) for m in hashed}) == 3


def _trainer(out, *extra):
    args = T.parse_args(TINY + ["--set", f"train.out_dir={out}", *extra])
    return T.Trainer(T.load_config(args.config, args.overrides), args, T.Dist("cpu"))


def test_training_or_loading_weights_forgets_the_kept_digests(tmp_path):
    """A digest kept from before stage 0 (the embedding and block 0 train), before stage 1 (block 1
    trains; the kept embedding's and block 0's stay right) or before a resume (every weight is loaded)
    must not be reused after it: each digest is checked against one from scratch."""

    def digest(trainer):
        value = trainer._weights_digest(1)
        assert value == _digest_from_scratch(trainer.model, 1)
        return value

    trainer = _trainer(tmp_path / "run")
    before = digest(trainer)
    trainer.train_phase(0, 0)
    trainer.finish_phase(0)  # block 0's cache (which stage 1 reads) and a checkpoint
    after_stage0 = digest(trainer)
    trainer.train_phase(1, 0)
    after_stage1 = digest(trainer)
    resumed = _trainer(tmp_path / "run")
    assert digest(resumed) == before  # the same initial weights
    resumed.resume()  # the checkpoint written after stage 0
    assert digest(resumed) == after_stage0
    assert len({before, after_stage0, after_stage1}) == 3


def test_bf16_trains_fp32_master_weights(tmp_path):
    """A bf16 model: every trained weight moves (updates far below a bf16 ulp accumulate in the fp32
    master copy), and a resume restores the master copy exactly."""
    # lr 2e-3: an Adam update (at most ~lr) rounds away in bf16 at 1.0, where the norm weights start,
    # unless it passes half the spacing there (2^-9 below 1, 2^-8 above); 12 of them add up past it.
    bf16 = ["--set", "train.dtype=bfloat16", "--set", "train.lr=2e-3", "--set", "train.max_steps=12"]
    _, full = _run(tmp_path, *bf16, name="full")
    _, stage0 = _run(tmp_path, *bf16, "--stop_after", "12", name="s0")
    w = _weights(stage0)
    assert w["norm.weight"].dtype == torch.bfloat16
    moved = torch.cat([(w[k] != 1) for k in ("norm.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight")])
    assert moved.float().mean() > 0.5  # 76% move; without master copies 12.5% did (measured)
    _run(tmp_path, *bf16, "--stop_after", "15", name="part")
    _run(tmp_path, *bf16, "--resume", name="part")
    a, b = _weights(full), _weights(tmp_path / "part")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_corrupt_cache_is_named_on_resume(tmp_path):
    _run(tmp_path, "--stop_after", "8", name="c")  # inside stage 1, which reads block 0's cache
    hidden = tmp_path / "c" / "cache" / "stage0" / "rank0.hidden.bin"
    data = bytearray(hidden.read_bytes())
    data[100] ^= 0xFF
    hidden.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="rank0.hidden.bin"):
        _run(tmp_path, "--resume", name="c")


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    _run(tmp_path, "--stop_after", "2", name="d")
    with pytest.raises(ValueError, match="pass --resume"):
        _run(tmp_path, name="d")
    with pytest.raises(ValueError, match=r"train.lr: 0.003 -> 0.001"):
        _run(tmp_path, "--resume", "--set", "train.lr=1e-3", name="d")


def test_a_finished_runs_outputs_without_its_checkpoint_are_refused(tmp_path):
    """A fresh run in an out_dir whose checkpoint.pt was deleted but whose final.pt and table.txt remain
    is refused before it trains or deletes anything: it would leave another run's model beside its log."""
    assert _run(tmp_path, name="f")[0] == 0
    out = tmp_path / "f"
    (out / "checkpoint.pt").unlink()
    kept = {name: (out / name).read_bytes() for name in ("final.pt", "table.txt", "metrics.jsonl")}
    with pytest.raises(ValueError, match=r"^train\.out_dir: .* holds another run's final\.pt, table\.txt \(and no "
                                         r"checkpoint\.pt to resume\)"):
        _run(tmp_path, "--set", "model.d_model=16", name="f")
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert not (out / "checkpoint.pt").exists()


def test_resume_of_a_moved_run_with_other_logging(tmp_path):
    """A run directory copied elsewhere resumes there (out_dir and the derived cache_dir differ from the
    checkpoint's), also with another log_every and ckpt_every, and ends as the uninterrupted run."""
    _, full = _run(tmp_path, name="full")
    _run(tmp_path, "--stop_after", "8", name="first")  # inside stage 1: block 0's cache is in use
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    shutil.rmtree(tmp_path / "first")
    code, moved = _run(tmp_path, "--resume", "--set", "train.log_every=1", "--set", "train.ckpt_every=3",
                       name="moved")
    assert code == 0
    a, b = _weights(full), _weights(moved)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_into_another_cache_dir_names_the_caches_left(tmp_path, capsys):
    """Resumed with another train.cache_dir (as a DiskSpaceError advises), a run rebuilds its cache there
    and says where the former cache_dir's caches of its config stay, which it never reads or deletes."""
    _run(tmp_path, "--stop_after", "8", name="r")  # inside stage 1: block 0's cache is in use
    capsys.readouterr()
    code, _ = _run(tmp_path, "--resume", "--set", f"train.cache_dir={tmp_path / 'bigger'}", name="r")
    assert code == 0
    left = tmp_path / "r" / "cache" / "stage0"
    assert left.is_dir() and not (tmp_path / "bigger" / "stage0").exists()
    assert f"caches in the run's former cache_dir stay there, unread: {left} " in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing-config", "out_dir-is-a-file"])
def test_command_line_errors_are_one_line(tmp_path, case):
    """`python -m lwt.train_layerwise` reports a config it cannot read (exit 2) and a machine problem such
    as an out_dir it cannot create (exit 1) as `error: ...`, not as a traceback."""
    (tmp_path / "file").write_text("")
    args = (["--config", str(tmp_path / "nope.yaml")] if case == "missing-config"
            else [*TINY, "--set", f"train.out_dir={tmp_path / 'file'}"])
    proc = subprocess.run([sys.executable, "-m", "lwt.train_layerwise", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == (2 if case == "missing-config" else 1), proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_resume_refuses_a_data_file_changed_since_the_checkpoint(tmp_path, change):
    """data.path cut short (a partial copy to a new node) or rewritten between the runs: the config is the
    same, but the data is not, so --resume refuses instead of finishing a run mixed across two corpora."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(2000)))
    data = ["--set", f"data.path={text}"]
    _run(tmp_path, *data, "--stop_after", "3", name="part")
    raw = text.read_bytes()
    text.write_bytes(raw[:len(raw) // 2] if change == "truncated" else raw.replace(b"fox", b"cat"))
    with pytest.raises(ValueError, match="the training data differs from the checkpoint's"):
        _run(tmp_path, *data, "--resume", name="part")


def test_resume_reads_the_same_data_under_another_path(tmp_path, monkeypatch, capsys):
    """A relative data.path resumed from another working directory (a job script's), or the data file
    moved (to a node's local disk): the same data by another name resumes, with its activation cache
    (checked by content, as the data is), to the uninterrupted run's weights."""
    lines = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(2000))
    (tmp_path / "corpus.txt").write_text(lines)
    _, full = _run(tmp_path, "--set", f"data.path={tmp_path / 'corpus.txt'}", name="full")
    monkeypatch.chdir(tmp_path)
    _, part = _run(tmp_path, "--set", "data.path=corpus.txt", "--stop_after", "8", name="part")
    assert (part / "cache" / "stage0").is_dir()
    os.makedirs(tmp_path / "scratch")
    os.replace(tmp_path / "corpus.txt", tmp_path / "scratch" / "moved.txt")
    (tmp_path / "other.txt").write_text(lines.replace("fox", "cat"))
    with pytest.raises(ValueError, match=r"data.path was 'corpus.txt', now 'other.txt': another file\?"):
        _run(tmp_path, "--set", "data.path=other.txt", "--resume", name="part")  # other data: still refused
    capsys.readouterr()
    assert _run(tmp_path, "--set", "data.path=scratch/moved.txt", "--resume", name="part")[0] == 0
    assert "rebuilding" not in capsys.readouterr().out  # the cache written before the move was read
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_of_a_checkpoint_without_data_identity(tmp_path):
    """Checkpoints written before the data identity was stored still resume, to the uninterrupted weights."""
    _, full = _run(tmp_path, name="full")
    _, part = _run(tmp_path, "--stop_after", "8", name="part")
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    del state["data"]
    torch.save(state, part / "checkpoint.pt")
    assert _run(tmp_path, "--resume", name="part")[0] == 0
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_without_checkpoint(tmp_path):
    """Refused before anything is made: the out_dir, its lock file and an empty cache/ were left behind."""
    with pytest.raises(ValueError, match="no checkpoint at"):
        _run(tmp_path, "--resume", name="none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", "list", "incomplete"], ids=["garbage", "not-a-dict",
                                                                               "incomplete"])
def test_resume_from_an_unreadable_checkpoint(tmp_path, content):
    out = tmp_path / "bad"
    out.mkdir()
    if content in ("list", "incomplete"):
        torch.save([1, 2] if content == "list" else {"format": T.CHECKPOINT_FORMAT}, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(content)
    message = {"list": "unknown checkpoint format 'list'", "incomplete": r"not a complete checkpoint \(no config, "
               }.get(content, "not a readable checkpoint")
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, "--resume", name="bad")


@pytest.mark.parametrize("size", [100, 5000, 40000, 70000])
def test_a_checkpoint_cut_short_is_a_value_error_naming_it(tmp_path, size):
    """A checkpoint copied or written only in part: cut to between 4 and 64 KiB, torch's zip reader fails as a
    bare OSError EINVAL (no file name); it must read as the damaged file it is, naming it, at any length."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.arange(40000, dtype=torch.float32)}, path)  # 160 kB
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {str(path)!r}: not a readable checkpoint (a damaged")):
        T.read_checkpoint(str(path))


def test_quickstart_form_and_bare_key_flags():
    args = T.parse_args(["--dummy", "True", "--max_steps", "50", "--lr=1e-3"])
    assert args.overrides == ["data.source=dummy", "max_steps=50", "lr=1e-3"]
    with pytest.raises(SystemExit):
        T.parse_args(["--max_steps"])


@pytest.mark.parametrize("argv,flag", [(["--end-to-end", "--plot"], "--end_to_end"),
                                       (["--stop-after", "2"], "--stop_after"), (["--stop-after=2"], "--stop_after")])
def test_a_flag_spelled_with_hyphens_is_named(capsys, argv, flag):
    """--end-to-end was read as a config override wanting a value ("expected a value"), --stop-after as an
    unknown config key: the flag with underscores is suggested instead."""
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"{argv[0].split('=')[0]}: unknown flag; did you mean {flag}?" in capsys.readouterr().err


def test_quickstart_runs_on_dummy_tokens(tmp_path, capsys):
    code, out = _run(tmp_path, "--dummy", "True", "--max_steps", "3", "--set", "model.vocab_size=50",
                     "--set", "train.joint_steps=0")
    assert code == 0
    assert "dummy" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="did you mean train.max_steps"):
        _run(tmp_path, "--set", "train.max_step=3")
    with pytest.raises(ValueError, match="model.n_heads"):
        _run(tmp_path, "--set", "model.n_heads=3")


def test_lr_schedule():
    lrs = [T.lr_at(s, 10, 1.0, 2, 0.1) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] > 0.1
    # the cosine: from lr at the end of warmup, halfway (step 6 of the 8 after it) at the mean of lr and the
    # floor, and the floor lr · min_ratio at `total`
    assert lrs[2] == 1.0 and lrs[6] == pytest.approx(0.55) and T.lr_at(10, 10, 1.0, 2, 0.1) == pytest.approx(0.1)
    # at another peak the whole curve scales with it, the floor included
    assert [T.lr_at(s, 10, 2e-3, 2, 0.1) for s in (0, 6, 10)] == [pytest.approx(1e-3), pytest.approx(1.1e-3),
                                                                  pytest.approx(2e-4)]


def test_weight_decay_spares_norm_weights(tmp_path, monkeypatch):
    """train.weight_decay applies to the matrices a phase trains (the embedding among them), never to the
    RMSNorm weights (decay would pull them to 0, not to their initial 1)."""
    groups, adamw = [], torch.optim.AdamW

    class RecordingAdamW(adamw):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            groups.append([(g["weight_decay"], {id(p) for p in g["params"]}) for g in self.param_groups])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    code, out = _run(tmp_path, "--set", "train.weight_decay=0.5", "--set", "model.n_layers=1",
                     "--set", "train.joint_steps=0")
    assert code == 0 and len(groups) == 1  # stage 0 (fp32 on the CPU: the parameters themselves, no master copy)
    # Stage 0 trains the embedding and block 0: the embedding, the fused QKV and output projections and
    # the MLP's down projection decay; the block's two norm weights and the final norm's do not.
    assert [(wd, len(ids)) for wd, ids in groups[0]] == [(0.5, 1 + 3), (0.0, 3)]


def test_two_process_ddp(tmp_path):
    """torchrun with two CPU processes (gloo): stopped at the end of stage 0, each rank has written its
    own cache shard from its own data; resumed, stopped by a SIGTERM and resumed again, the run goes
    through every phase and rank 0 prints the table."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lwt.train_layerwise", *TINY, "--set", f"train.out_dir={out}", "--set", "train.joint_steps=2"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + ["--stop_after", "6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [ActivationCache.open(out / "cache" / "stage0", rank, {"stage": 0}) for rank in (0, 1)]
    assert [c.entries for c in shards] == [16, 16]
    assert not torch.equal(shards[0].batch(torch.arange(4))[1], shards[1].batch(torch.arange(4))[1])
    # Resumed, and rank 1 alone gets a SIGTERM in its third step of stage 1: both ranks stop at the next log
    # step (4) with a checkpoint, and exit 143 (torchrun reports the failed workers).
    worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(REPO, "tests", "ddp_sigterm_worker.py"), *cmd[cmd.index("lwt.train_layerwise") + 1:]]
    proc = subprocess.run(worker + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "exitcode  : 143" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "stopped after 4 steps (SIGTERM" in proc.stdout, proc.stdout[-2000:]
    mid = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (mid["phase"], mid["step"]) == (1, 4)
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "joint" in proc.stdout and "stage 1" in proc.stdout


def _two_nodes(nodes, *args) -> subprocess.CompletedProcess:
    """The trainer (TINY, then args) under torchrun with 2 ranks, rank r running in <nodes>/node<r>, as if
    on a node of its own (tests/ddp_local_data_worker.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "ddp_local_data_worker.py"), *TINY, *args]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "LWT_NODES": str(nodes)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_resume_refuses_one_nodes_changed_data_on_every_rank(tmp_path):
    """Each rank reads its own copy of a relative data.path (one per node); rank 1's copy was cut short
    since the checkpoint. Every rank refuses the resume: rank 0 does not go on alone (it said "resumed
    from" and died in its next barrier, on gloo's "Connection closed by peer"; NCCL would wait there)."""
    corpus = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(2000))
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        (tmp_path / f"node{rank}" / "corpus.txt").write_text(corpus)
    args = ["--set", f"train.out_dir={tmp_path / 'ddp'}", "--set", "data.path=corpus.txt"]
    proc = _two_nodes(tmp_path, *args, "--stop_after", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "node1" / "corpus.txt").write_text(corpus[:len(corpus) // 2])
    proc = _two_nodes(tmp_path, *args, "--resume")
    assert proc.returncode != 0
    assert "the training data differs from the checkpoint's" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from" not in proc.stdout and "Connection closed" not in proc.stderr, proc.stderr[-3000:]


def test_a_dir_one_rank_cannot_make_stops_every_rank(tmp_path):
    """A relative cache_dir that rank 1 cannot make (a file in its way on that node only): rank 1's OSError
    names the key, and rank 0 stops with it too instead of waiting for rank 1 in the gather of the lock
    refusals (it died there, on gloo's "Connection closed by peer"; NCCL would wait)."""
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    (tmp_path / "node1" / "scratch").write_text("a file where rank 1's cache_dir should go")
    proc = _two_nodes(tmp_path, "--set", f"train.out_dir={tmp_path / 'out'}", "--set", "train.cache_dir=scratch/c")
    assert proc.returncode != 0
    assert "OSError: another rank: [Errno 20] train.cache_dir: cannot create the directory" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr, proc.stderr[-3000:]


class _OneOfTwoRanks:
    """Rank `rank` of a 2-rank run (no process group) whose other rank answers each collective from `script`,
    in order (what it gathers, or its flag for any; None once the script is used up). Logs what this rank
    sent."""
    world, device = 2, torch.device("cpu")

    def __init__(self, *script, rank=0):
        self.rank, self.main = rank, rank == 0
        self.script, self.sent = list(script), []

    def _other(self):
        return self.script.pop(0) if self.script else None

    def gather(self, obj):
        self.sent.append(obj)
        return [obj, self._other()][::1 if self.rank == 0 else -1]

    def any(self, flag):
        self.sent.append(flag)
        return bool(flag or self._other())

    def barrier(self):
        pass


def test_an_input_cache_error_on_one_rank_stops_every_rank(tmp_path):
    """Block 0's cache, stage 1's input, fails to open on one rank only (a damaged shard on one node's
    disk, or another run's): every rank stops with that rank's ValueError, the others after "another
    rank: ". The failing rank raised it alone, before the collective every rank calls next, where the
    others then died on gloo's "Connection closed by peer" (NCCL would wait); a failed rebuild of one
    rank's missing shard did the same."""
    out = tmp_path / "run"
    assert _run(tmp_path, "--stop_after", "7")[0] == 0  # stopped in stage 1: block 0's cache written
    trainer = _trainer(out, "--resume")
    trainer.resume()
    stage1 = next(i for i, (name, k, _) in enumerate(trainer.phases) if (name, k) == ("stage", 1))
    corrupt = "activation cache file rank1.hidden.bin is corrupt"
    # rank 1's shard is damaged, rank 0's intact
    trainer.env = _OneOfTwoRanks((ValueError, corrupt))
    with pytest.raises(ValueError, match=f"^another rank: {corrupt}$"):
        trainer.open_input(stage1)
    # rank 1's shard is missing and rebuilding it fails; rank 0 waits with it instead of going on
    trainer.env = _OneOfTwoRanks(None, True, None, (T.DiskSpaceError, "no room on rank 1's disk"))
    with pytest.raises(T.DiskSpaceError, match="^another rank: no room on rank 1's disk$"):
        trainer.open_input(stage1)
    # rank 0's own shard is damaged: it raises its error in the first collective, as rank 1 does there
    hidden = out / "cache" / "stage0" / "rank0.hidden.bin"
    data = bytearray(hidden.read_bytes())
    data[0] ^= 1
    hidden.write_bytes(bytes(data))
    trainer.env = _OneOfTwoRanks()
    with pytest.raises(ValueError, match=r"rank0\.hidden\.bin is corrupt"):
        trainer.open_input(stage1)
    (sent,) = trainer.env.sent
    assert sent[0] is ValueError and "rank0.hidden.bin is corrupt" in sent[1]


def test_a_cache_write_failing_on_one_rank_stops_every_rank(tmp_path, monkeypatch):
    """A rank whose cache write fails (its disk filled up after the collective check) stops every rank with
    its error: it raised alone, and the others waited for it in the barrier after the write."""
    trainer = _trainer(tmp_path / "run", "--set", "train.max_steps=1")
    assert trainer.train_phase(0, 0)
    trainer.env = _OneOfTwoRanks((T.DiskSpaceError, "rank 1's disk filled up"))
    with pytest.raises(T.DiskSpaceError, match="^another rank: rank 1's disk filled up$"):
        trainer.finish_phase(0)
    assert ActivationCache.open(trainer._stage_dir(0), 0, trainer._cache_expect(0)) is not None  # rank 0's
    assert trainer.position == (0, 1)  # no checkpoint moved past the phase

    def full(*args):
        raise T.DiskSpaceError("rank 0's disk filled up")

    monkeypatch.setattr(T, "CacheWriter", full)
    trainer.env = _OneOfTwoRanks()
    with pytest.raises(T.DiskSpaceError, match="^rank 0's disk filled up$"):
        trainer.finish_phase(0)
    assert trainer.env.sent == [(T.DiskSpaceError, "rank 0's disk filled up")]


def test_a_checkpoint_write_failing_on_rank_0_stops_every_rank(tmp_path, monkeypatch):
    """Rank 0 alone writes checkpoint.pt and final.pt: where that fails (a full disk), every rank raises, the
    others with rank 0's error after "another rank: ", instead of going on into the next collective alone."""
    trainer = _trainer(tmp_path / "run")
    full = "[Errno 28] No space left on device: checkpoint.pt"
    trainer.env = _OneOfTwoRanks(None, (OSError, full), rank=1)  # rank 0 answers the rng gather, then fails
    with pytest.raises(OSError, match=re.escape(f"another rank: {full}")):
        trainer.save(None)
    trainer.env = _OneOfTwoRanks((OSError, full), rank=1)
    with pytest.raises(OSError, match=re.escape(f"another rank: {full}")):
        trainer.save_model("final.pt")

    def no_room(state, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(T, "_atomic_save", no_room)
    for write in (lambda: trainer.save(None), lambda: trainer.save_model("final.pt")):
        trainer.env = _OneOfTwoRanks()
        with pytest.raises(OSError, match="No space left on device"):
            write()
        assert trainer.env.sent[-1][0] is OSError and "No space left on device" in trainer.env.sent[-1][1]
    assert not os.path.exists(trainer.ckpt_path)


def test_a_second_run_on_the_same_dirs_is_refused(tmp_path):
    """While a run holds out_dir (or its cache_dir), another run on it stops before touching
    anything there; once the holder ends, the directory is free again."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # a run that never checkpointed: a new run would delete it
    held, busy = T.lock_run_dirs({"train.out_dir": str(out)}, 0)
    assert busy == []
    try:
        with pytest.raises(ValueError, match=rf"^train.out_dir: .* is in use by another lwt run \(pid {os.getpid()} "):
            _run(tmp_path)
        assert (out / "metrics.jsonl").read_text() == "{}\n"
        assert sorted(os.listdir(out)) == [".rank0.lock", "metrics.jsonl"]
    finally:
        for f in held:
            f.close()
    cache = tmp_path / "scratch"
    held, _ = T.lock_run_dirs({"train.cache_dir": str(cache)}, 0)
    try:
        with pytest.raises(ValueError, match=r"^train.cache_dir: .*scratch is in use by another lwt run"):
            _run(tmp_path, "--set", f"train.cache_dir={cache}")
        # rank 1's lock is another file: ranks of one run never block each other
        other, busy = T.lock_run_dirs({"train.cache_dir": str(cache)}, 1)
        assert busy == [] and len(other) == 1
        other[0].close()
    finally:
        for f in held:
            f.close()
    code, _ = _run(tmp_path, "--set", f"train.cache_dir={cache}", "--set", "train.joint_steps=0",
                   "--set", "train.max_steps=2")
    assert code == 0
    code, _ = _run(tmp_path, "--set", "train.cache=false", "--set", f"train.cache_dir={tmp_path / 'unused'}",
                   "--set", "train.joint_steps=0", "--set", "train.max_steps=2", name="nocache")
    assert code == 0 and not (tmp_path / "unused").exists()


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch, capsys):
    """NFS without lockd (ENOLCK) or Lustre mounted noflock (ENOSYS) cannot lock: the run goes on, and says so."""
    import errno

    def no_flock(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(T.fcntl, "flock", no_flock)
    code, _ = _run(tmp_path, "--set", "train.joint_steps=0", "--set", "train.max_steps=2")
    assert code == 0 and "cannot be locked (No locks available)" in capsys.readouterr().err


def test_lock_edge_cases(tmp_path, monkeypatch, capsys):
    """One directory under two paths takes one lock (two would refuse each other inside one process); a
    refused call leaves nothing in the directories it made; without fcntl (Windows) nothing is locked, and
    the run is told so."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)  # (a bind mount, to realpath(): main() compares those)
    held, busy = T.lock_run_dirs({"train.out_dir": str(real), "train.cache_dir": str(tmp_path / "alias")}, 0)
    assert busy == [] and len(held) == 1
    fresh = tmp_path / "fresh"
    files, busy = T.lock_run_dirs({"train.out_dir": str(fresh), "train.cache_dir": str(real)}, 0)
    assert files == [] and busy[0].startswith("train.cache_dir: ") and not fresh.exists()
    for f in held:
        f.close()
    monkeypatch.setattr(T, "fcntl", None)
    files, busy = T.lock_run_dirs({"train.out_dir": str(tmp_path / "win")}, 0)
    assert files == [] and busy == [] and "goes on without locking" in capsys.readouterr().err


def test_a_dir_that_cannot_be_made_names_its_key_and_leaves_nothing(tmp_path):
    """A file in the way of cache_dir (or out_dir) is an OSError naming the key, and the out_dir the lock
    call made (with its lock file) is removed again, as when a lock is refused."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match=r"train.cache_dir: cannot create the directory .*afile/c"):
        _run(tmp_path, "--set", f"train.cache_dir={tmp_path / 'afile' / 'c'}")
    assert not (tmp_path / "run").exists()
    with pytest.raises(OSError, match=r"train.out_dir: cannot create the directory .*afile"):
        _run(tmp_path, name="afile")
    # the parents makedirs made go too, and a trailing slash (a shell's completion) changes nothing
    for name in ("new/deeper/run", "new/run/"):
        with pytest.raises(OSError, match=r"train.cache_dir: cannot create the directory"):
            _run(tmp_path, "--set", f"train.cache_dir={tmp_path / 'afile' / 'c'}", name=name)
        assert not (tmp_path / "new").exists()


def test_a_file_in_place_of_a_stage_cache_is_refused_before_training(tmp_path, monkeypatch):
    """A file where a stage's cache directory goes (stage1 in cache_dir, 3 layers) is a ValueError naming
    train.cache_dir and the path before any step, not a bare FileExistsError once block 1 trained. With 2
    layers the last stage, 1, writes no cache: the run goes through and leaves the file alone."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "stage1").write_text("x")
    steps = _recording(monkeypatch, T.Trainer, "loss")
    with pytest.raises(ValueError, match=r"^train.cache_dir: .*scratch/stage1 is not a directory, and this run "
                                         r"writes block 1's activation cache there"):
        _run(tmp_path, "--set", f"train.cache_dir={scratch}", "--set", "model.n_layers=3")
    assert steps == [] and not (tmp_path / "run" / "checkpoint.pt").exists()
    code, out = _run(tmp_path, "--set", f"train.cache_dir={scratch}", name="two")
    assert code == 0 and (out / "final.pt").exists() and (scratch / "stage1").read_text() == "x"


def test_resume_in_another_dtype_names_it(tmp_path, monkeypatch):
    """train.dtype auto is float32 on the CPU, bfloat16 on CUDA: the same config resumed on the other kind of
    machine is refused saying so, not as a frozen-matrix checksum mismatch blamed on the torch version."""
    code, _ = _run(tmp_path, "--set", "train.dtype=auto", "--stop_after", "2")
    assert code == 0
    resolve = T.resolve_dtype
    monkeypatch.setattr(T, "resolve_dtype", lambda name, device: torch.bfloat16 if name == "auto" else resolve(name, device))
    with pytest.raises(ValueError, match=r"^--resume: the run trained in float32, this one would train in bfloat16"):
        _run(tmp_path, "--set", "train.dtype=auto", "--resume")


def test_a_fresh_run_leaves_a_stopped_runs_shared_cache_alone(tmp_path):
    """Two runs of different configs share an explicit cache_dir, one at a time: run B, started while run A
    is stopped in stage 1, is refused naming train.cache_dir (it deleted A's block-0 cache and wrote its own,
    and A's --resume was then refused on B's cache); A resumes to the end."""
    shared = ["--set", f"train.cache_dir={tmp_path / 'scratch'}"]
    code, _ = _run(tmp_path, *shared, "--stop_after", "8", name="a")
    assert code == 0 and (tmp_path / "scratch" / "stage0" / "rank0.manifest.json").exists()
    with pytest.raises(ValueError, match=r"^train.cache_dir: .*stage0 holds the activation cache of a run of another"):
        _run(tmp_path, *shared, "--set", "train.seed=1", name="b")
    # B started on a cache_dir of its own and resumed on the shared one (cache_dir may change on --resume):
    # refused too, not deleting A's cache and writing its own there
    code, _ = _run(tmp_path, "--set", f"train.cache_dir={tmp_path / 'own'}", "--set", "train.seed=1",
                   "--stop_after", "2", name="b")
    assert code == 0
    with pytest.raises(ValueError, match=r"^train.cache_dir: .*stage0 holds the activation cache of a run of another"):
        _run(tmp_path, *shared, "--set", "train.seed=1", "--resume", name="b")
    code, out = _run(tmp_path, *shared, "--resume", name="a")
    assert code == 0 and (out / "final.pt").exists()


def test_a_live_runs_cache_is_left_alone(tmp_path, monkeypatch):
    """Run A, live (paused in stage 1, block 0's cache on disk, in a thread), keeps its cache: a run whose
    cache_dir is A's <out_dir>/cache is refused, and a run with train.cache false on A's cache_dir runs
    without touching it."""
    import threading

    loss = T.Trainer.loss
    for a_cache, b_extra in [(None, ["--set", "train.cache_dir={a}/cache"]),
                             ("scratch", ["--set", "train.cache_dir={c}", "--set", "train.cache=false"])]:
        paused, go, calls = threading.Event(), threading.Event(), []

        def loss_then_wait(self, *args):
            if threading.current_thread() is not threading.main_thread():
                calls.append(1)
                if len(calls) == 7:  # run A's stage 1: block 0's cache is on disk
                    paused.set()
                    go.wait(120)
            return loss(self, *args)

        monkeypatch.setattr(T.Trainer, "loss", loss_then_wait)
        a = tmp_path / f"a-{a_cache}"
        cache = a / "cache" if a_cache is None else tmp_path / a_cache
        a_args = [] if a_cache is None else ["--set", f"train.cache_dir={cache}"]
        runner = threading.Thread(target=_run, args=(tmp_path, *a_args), kwargs=dict(name=a.name))
        runner.start()
        try:
            assert paused.wait(120)
            shard = sorted(os.listdir(cache / "stage0"))
            extra = [x.format(a=a, c=cache) for x in b_extra]
            if a_cache is None:
                with pytest.raises(ValueError, match=r"^train.cache_dir: .* is in use by another lwt run"):
                    _run(tmp_path, *extra, name=f"b-{a_cache}")
            else:
                code, _ = _run(tmp_path, *extra, "--set", "train.joint_steps=0", name=f"b-{a_cache}")
                assert code == 0
            assert sorted(os.listdir(cache / "stage0")) == shard
        finally:
            go.set()
            runner.join()


def test_plot_writes_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    code, out = _run(tmp_path, "--plot", "--set", "train.joint_steps=0")
    assert code == 0 and (out / "curves.png").stat().st_size > 1000


def test_plot_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="needs matplotlib"):
        _run(tmp_path, "--plot")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,world,local,expected", [("auto", 1, 0, "cuda:0"), ("cuda", 1, 0, "cuda:0"),
                                                       ("cuda", 2, 1, "cuda:1"), ("cuda:1", 1, 0, "cuda:1")])
def test_cuda_device_has_an_index(monkeypatch, name, world, local, expected):
    """train.device auto/cuda on a GPU machine: one process takes the current GPU, a torchrun rank its
    LOCAL_RANK's. torch.cuda.set_device refuses a device without an index, so that check is kept
    (torch's own) while the rest of torch.cuda is faked: this machine may have no GPU."""
    from torch.cuda._utils import _get_device_index

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(_get_device_index(d)))
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)  # no process group for world 2: its sizes faked
    monkeypatch.setattr(T.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(T.dist, "get_rank", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    env = T.Dist(name)
    assert env.device == torch.device(expected) and chosen == [torch.device(expected).index]


@pytest.mark.parametrize("name,world,local", [("cuda:3", 1, 0), ("cuda", 2, 1)])
def test_cuda_device_the_machine_lacks_is_a_value_error(monkeypatch, name, world, local):
    """A GPU index past the visible count (train.device, or a torchrun LOCAL_RANK) is refused by name,
    not left to torch.cuda.set_device's "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    monkeypatch.setattr(T.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(T.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(T.dist, "get_rank", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    with pytest.raises(ValueError, match=rf"^train\.device: expected a device this machine has, got '{name}' "
                                         r"\(cuda:\d for this rank; 1 CUDA GPU\(s\) visible\)"):
        T.Dist(name)


def test_crashed_writers_files_are_removed(tmp_path):
    """Before a phase (and its check of the disk for its cache), this rank's temporary files left by a
    writer that was killed (a full reserved shard each) are deleted; another rank's files stay."""
    stage = tmp_path / "cache" / "stage0"
    stage.mkdir(parents=True)
    for name in ("rank0.hidden.bin.partial", "rank0.manifest.json.partial", "rank1.hidden.bin.partial",
                 "rank0.hidden.bin"):
        (stage / name).write_bytes(b"x" * 100)
    trainer = type("Trainer", (), {"cache_dir": str(tmp_path / "cache"), "env": type("Env", (), {"rank": 0})})()
    T.Trainer.remove_crashed_writers_files(trainer)
    assert sorted(os.listdir(stage)) == ["rank0.hidden.bin", "rank1.hidden.bin.partial"]


def test_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) raises, and neither a checkpoint nor its temporary file remains."""
    def fill_the_disk(state, f):
        f.write(b"x" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T.torch, "save", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        T._atomic_save({"step": 1}, str(tmp_path / "checkpoint.pt"))
    assert os.listdir(tmp_path) == []


def test_checkpoint_write_on_a_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """The real torch.save on a full disk: its zip writer turns the file's ENOSPC into a RuntimeError
    ('[enforce fail at inline_container.cc] unexpected pos ...', the OSError only its context), which the
    CLI printed as a traceback naming no file. _atomic_save raises the OSError, naming the checkpoint."""
    real_open = open

    class FullDisk(io.RawIOBase):  # a file that takes 4 KiB, then fails as a full disk does
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def fileno(self):
            return self.f.fileno()

        def write(self, b):
            if self.n + len(b) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(b)
            return self.f.write(b)

        def close(self):
            self.f.close()
            super().close()

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(path, mode, *args, **kwargs)
        return io.BufferedWriter(FullDisk(real_open(path, mode, buffering=0)))

    monkeypatch.setattr(T, "open", open_on_a_full_disk, raising=False)
    path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(OSError, match="No space left on device") as info:
        T._atomic_save({"w": torch.zeros(100_000)}, path)
    assert info.value.errno == errno.ENOSPC and path in str(info.value)
    assert os.listdir(tmp_path) == []


def test_dead_writers_temporary_checkpoints_are_removed(tmp_path):
    """Temporary files of _atomic_save's killed processes go; a running process's file and others stay."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    names = [f"checkpoint.pt.tmp{dead}", f"final.pt.tmp{os.getpid()}", "final.pt", "notes.pt.tmpx", "table.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    T.remove_dead_writers_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings from /proc")
def test_deleted_caches_are_no_longer_mapped(tmp_path, monkeypatch):
    """A stage's input cache is closed before its files are deleted, the last stage's included (no cache
    write follows it): a file still mapped keeps its disk space until the process exits."""
    still_mapped, delete_cache = [], T.Trainer.delete_cache

    def deleting(self, k):
        delete_cache(self, k)
        with open("/proc/self/maps") as f:
            still_mapped.extend(line.strip() for line in f if self._stage_dir(k) in line)

    monkeypatch.setattr(T.Trainer, "delete_cache", deleting)
    code, out = _run(tmp_path, "--set", "model.n_layers=3", "--set", "train.max_steps=2",
                     "--set", "train.joint_steps=0")
    assert code == 0 and not (out / "cache" / "stage1").exists()
    assert still_mapped == []


def test_cache_left_by_a_kill_before_its_deletion_is_removed(tmp_path, monkeypatch):
    """A run killed after a phase's checkpoint but before it deleted the previous stage's cache: the
    resumed run deletes that cache (nothing else ever would) and ends with no cache left."""
    three = ["--set", "model.n_layers=3", "--set", "train.max_steps=2", "--set", "train.joint_steps=0"]

    class Killed(BaseException):
        pass

    def killed(self, k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "delete_cache", killed)
        with pytest.raises(Killed):
            _run(tmp_path, *three)
    assert (tmp_path / "run" / "cache" / "stage0").exists()
    code, out = _run(tmp_path, *three, "--resume")
    assert code == 0 and os.listdir(out / "cache") == [".rank0.lock"]  # (released: the run ended)


def test_a_phase_shorter_than_the_warmup_warms_up_over_its_own_steps(tmp_path):
    """train.warmup_steps above a phase's steps: the phase warms up over its own steps (min(warmup_steps,
    steps)), so its last step runs at the peak rate."""
    code, out = _run(tmp_path, "--set", "train.warmup_steps=10", "--set", "train.max_steps=4",
                     "--set", "model.n_layers=1", "--set", "train.joint_steps=0")
    assert code == 0
    lrs = [r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r]
    assert lrs == [pytest.approx(3e-3 * 2 / 4), pytest.approx(3e-3)]  # steps 2 and 4 of a 4-step warmup


def test_end_to_end_trains_at_train_lr_not_joint_lr(tmp_path, monkeypatch):
    """train.joint_lr is the joint phase's alone: the stages and the end-to-end comparison run at train.lr."""
    made, adamw = [], torch.optim.AdamW

    class RecordingAdamW(adamw):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append(kwargs["lr"])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    code, _ = _run(tmp_path, "--end_to_end", "--set", "model.n_layers=1", "--set", "train.max_steps=2",
                   "--set", "train.joint_steps=2", "--set", "train.joint_lr=5e-4")
    assert code == 0 and made == [3e-3, 5e-4, 3e-3]


def test_resume_inside_the_end_to_end_phase_is_bit_identical(tmp_path):
    """Stopped inside the end-to-end phase and resumed, the comparison model continues from the checkpoint's
    weights (it is built fresh only at the phase's start): end_to_end.pt and the table's rows are those of an
    uninterrupted run."""
    e2e = ("--end_to_end", "--set", "train.joint_steps=0", "--set", "model.n_layers=1", "--set", "train.max_steps=4")
    _, full = _run(tmp_path, *e2e, name="full")
    code, part = _run(tmp_path, *e2e, "--stop_after", "6", name="part")  # step 2 of the 4-step end-to-end phase
    assert code == 0 and torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 2
    assert _run(tmp_path, *e2e, "--resume", name="part")[0] == 0
    a, b = (torch.load(out / "end_to_end.pt", weights_only=True)["model"] for out in (full, part))
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = [[(r["phase"], r["nelbo"], r["tokens"]) for r in json.loads(torch.load(out / "checkpoint.pt",
             weights_only=True)["history"])] for out in (full, part)]
    assert rows[0] == rows[1]  # the end-to-end row counts all of its phase's tokens, not this invocation's


def test_a_sigterm_during_an_evaluation_stops_after_it(tmp_path, monkeypatch):
    """A SIGTERM that arrives during a phase's evaluation (or cache write) stops the run once the phase has
    ended, with the checkpoint at the next phase's start: no step of the next phase runs."""
    import signal

    evaluate = T.Trainer.evaluate

    def evaluate_then_term(self, n_blocks):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, n_blocks)

    monkeypatch.setattr(T.Trainer, "evaluate", evaluate_then_term)
    code, out = _run(tmp_path)
    assert code == 143
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["phase"], state["step"]) == (1, 0)


def test_resume_refuses_another_end_to_end_flag_or_rank_count(tmp_path):
    """--end_to_end changes the phases (and the positions the checkpoint names), and the checkpoint holds
    one generator state per rank: a resume with another --end_to_end, or another number of ranks, is refused."""
    _run(tmp_path, "--stop_after", "2")
    with pytest.raises(ValueError, match=r"the config differs from the checkpoint's \(--end_to_end\)"):
        _run(tmp_path, "--resume", "--end_to_end")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["rng"] = state["rng"] * 2
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"the checkpoint was written by 2 ranks, this run has 1"):
        _run(tmp_path, "--resume")


def test_a_fresh_run_starts_the_metrics_afresh(tmp_path):
    """A metrics.jsonl left by a run that never checkpointed is replaced, not appended to."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"phase": "stale"}\n')
    code, _ = _run(tmp_path, "--set", "model.n_layers=1", "--set", "train.joint_steps=0", "--set", "train.max_steps=2")
    assert code == 0
    assert all(json.loads(line)["phase"] == "stage 0" for line in open(out / "metrics.jsonl"))


class _Rank:
    """A Dist of one rank of a 2-rank run, without a process group (what Trainer reads of it)."""
    world, device, main = 2, torch.device("cpu"), False

    def __init__(self, rank):
        self.rank = rank

    def any(self, flag):
        return flag


def test_each_rank_draws_its_own_batches_and_resumes_its_own_generators(tmp_path):
    """With DDP each rank trains on its own windows and masks (data_gen, mask_gen seeded by rank), and a
    resume gives each rank back the generator states it saved, not rank 0's."""
    args = T.parse_args(TINY + ["--set", f"train.out_dir={tmp_path / 'run'}"])
    cfg = T.load_config(args.config, args.overrides)
    batches = [T.Trainer(cfg, args, _Rank(rank)).fresh_batch() for rank in (0, 1)]
    assert not torch.equal(batches[0][0], batches[1][0]) and not torch.equal(batches[0][2], batches[1][2])
    _run(tmp_path, "--stop_after", "2")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    other = T.Trainer(cfg, args, _Rank(1))
    other.fresh_batch()  # rank 1's generators moved past their seeded start: a fresh Trainer's differ from them
    state["rng"] = [state["rng"][0], {"data": other.data_gen.get_state(), "mask": other.mask_gen.get_state(),
                                      "torch": torch.get_rng_state()}]
    torch.save(state, path)
    resumed = T.Trainer(cfg, args, _Rank(1))
    resumed.resume()
    assert torch.equal(resumed.data_gen.get_state(), other.data_gen.get_state())
    assert torch.equal(resumed.mask_gen.get_state(), other.mask_gen.get_state())


def test_resume_refuses_frozen_matrices_other_than_the_checkpoints(tmp_path):
    _run(tmp_path, "--stop_after", "2")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["frozen_checksum"] = "0" * len(state["frozen_checksum"])
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"the frozen SwiGLU matrices regenerated from frozen_seed do not match"):
        _run(tmp_path, "--resume")


def test_caches_rebuilt_on_resume_are_deleted_once_read(tmp_path):
    """A wiped cache_dir resumed inside stage 2: block 0's cache is rebuilt to rebuild block 1's, then deleted;
    the run ends with no cache left (no later phase would delete it)."""
    three = ("--set", "model.n_layers=3", "--set", "train.max_steps=2", "--set", "train.joint_steps=0")
    _run(tmp_path, *three, "--stop_after", "5")  # inside stage 2
    shutil.rmtree(tmp_path / "run" / "cache")
    code, out = _run(tmp_path, *three, "--resume")
    assert code == 0 and os.listdir(out / "cache") == [".rank0.lock"]


def test_a_resumed_phase_counts_the_wall_time_before_the_stop(tmp_path, monkeypatch):
    """The table's "wall s" of a phase resumed mid-way includes the time spent in it before the stop (its
    first 3 steps, 100 s each on a shifted clock)."""
    loss, shift = T.Trainer.loss, _shifted_clock(monkeypatch)

    def slow(self, *args):
        shift[0] += 100.0
        return loss(self, *args)

    one = ("--set", "model.n_layers=1", "--set", "train.joint_steps=0")
    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "loss", slow)
        _run(tmp_path, *one, "--stop_after", "3")
    assert _run(tmp_path, *one, "--resume")[0] == 0
    (row,) = json.loads(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"])
    assert row["wall_s"] >= 300


def test_dummy_applies_before_the_set_overrides():
    assert T.parse_args(["--dummy", "True", "--set", "data.source=text"]).overrides == ["data.source=dummy",
                                                                                        "data.source=text"]


def test_a_flag_followed_by_a_flag_has_no_value(capsys):
    """`--out_dir --max_steps=5` took '--max_steps=5' as the output directory and dropped the step count,
    silently. A value that starts with -- goes as --key=value (as argparse asks of its own options)."""
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(["--out_dir", "--max_steps=5"])
    assert exit_info.value.code == 2
    assert ("--out_dir: expected a value, got the flag '--max_steps=5' (a value starting with -- goes as "
            "--out_dir=VALUE)") in capsys.readouterr().err
    assert T.parse_args(["--out_dir=--odd", "--lr", "-1e-3"]).overrides == ["out_dir=--odd", "lr=-1e-3"]


@pytest.mark.parametrize("value", ["False", "0", "no"])
def test_dummy_false_is_refused(capsys, value):
    """--dummy False was accepted and did nothing: a config whose data.source is dummy kept training on
    random tokens. It is a usage error now, naming the key to set instead."""
    with pytest.raises(SystemExit) as exit_info:
        T.parse_args(["--dummy", value])
    assert exit_info.value.code == 2
    assert "--dummy: only True is taken (it sets data.source=dummy); to choose another source, set it: " \
           "--set data.source=text (or tokens)" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    """--resume of a run whose checkpoint is past its last phase trains nothing, says so and exits 0 with the
    table (it indexed a phase past the last)."""
    one = ("--set", "model.n_layers=1", "--set", "train.joint_steps=0", "--set", "train.max_steps=2")
    assert _run(tmp_path, *one)[0] == 0
    before = _weights(tmp_path / "run")
    capsys.readouterr()
    code, out = _run(tmp_path, *one, "--resume")
    assert code == 0 and "this run has finished; nothing to resume" in capsys.readouterr().out
    after = _weights(out)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_a_divergence_after_a_resume_names_the_checkpoint_resumed(tmp_path, monkeypatch):
    """A run resumed at stage 1, step 2 that diverges before its next checkpoint: the error names what
    checkpoint.pt holds (stage 1, step 2), not "before its first checkpoint"."""
    _run(tmp_path, "--stop_after", "8")
    _nan_loss_at(monkeypatch, 1)  # step 3, seen at the log step 4
    with pytest.raises(T.TrainingDiverged, match=r"^stage 1, step 4: the training loss is nan: the run diverged and "
                                                 r"stopped, saving nothing more \(.*checkpoint.pt holds stage 1, "
                                                 r"step 2\)\. A --resume"):
        _run(tmp_path, "--resume")


def test_resume_refuses_a_change_in_any_section(tmp_path):
    """Not only train.lr: a changed key of every section (but RESUME_MAY_CHANGE's) refuses the resume, by name."""
    _run(tmp_path, "--stop_after", "2")
    for key, value in [("model.frozen_seed", "1"), ("data.seq_len", "8"), ("objective.eval_seed", "7"),
                       ("train.seed", "1")]:
        with pytest.raises(ValueError, match=rf"the config differs from the checkpoint's \({re.escape(key)}: "):
            _run(tmp_path, "--resume", "--set", f"{key}={value}")


def test_the_tables_seconds_are_each_phases_own(tmp_path, monkeypatch):
    """On a shifted clock (stage 0's steps 100 s each, block 0's cache write 1000 s): stage 0's "wall s" is
    its two steps, its "cache s" the write; stage 1's wall time does not carry stage 0's over (its
    checkpoint every step kept the phase's wall time so far), and the last stage writes no cache."""
    shift, loss, write_cache = _shifted_clock(monkeypatch), T.Trainer.loss, T.Trainer.write_cache

    def slow_stage0(self, *args):
        if self.position[0] == 0:
            shift[0] += 100.0
        return loss(self, *args)

    def slow_write(self, k):
        shift[0] += 1000.0
        return write_cache(self, k)

    monkeypatch.setattr(T.Trainer, "loss", slow_stage0)
    monkeypatch.setattr(T.Trainer, "write_cache", slow_write)
    code, out = _run(tmp_path, "--set", "train.joint_steps=0", "--set", "train.max_steps=2",
                     "--set", "train.ckpt_every=1")
    assert code == 0
    rows = json.loads(torch.load(out / "checkpoint.pt", weights_only=True)["history"])
    assert [r["phase"] for r in rows] == ["stage 0", "stage 1"]
    assert 200 <= rows[0]["wall_s"] < 250 and 1000 <= rows[0]["cache_s"] < 1050, rows[0]
    assert rows[1]["wall_s"] < 50 and rows[1]["cache_s"] == 0.0, rows[1]


def test_no_room_for_the_cache_stops_before_the_first_step(tmp_path, monkeypatch):
    """A cache_dir without room for the stage's cache is refused before the stage trains, not after it."""
    from lwt.cache import DiskSpaceError

    steps, loss = [], T.Trainer.loss

    def counting(self, *args):
        steps.append(1)
        return loss(self, *args)

    def no_room(directory, nbytes, what=""):
        raise DiskSpaceError(f"{directory}: no room for {nbytes} bytes")

    monkeypatch.setattr(T.Trainer, "loss", counting)
    monkeypatch.setattr(T, "check_disk_space", no_room)
    with pytest.raises(DiskSpaceError, match="no room"):
        _run(tmp_path)
    assert steps == [] and not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("value,match", [("triton", r"^LWT_BACKEND=triton needs CUDA tensors \(got a tensor on cpu\)"),
                                         ("tritn", r"^LWT_BACKEND: expected one of auto, triton, reference")])
def test_an_lwt_backend_the_device_cannot_run_is_refused_before_anything_is_made(tmp_path, monkeypatch, value, match):
    """LWT_BACKEND=triton on the CPU without the interpreter (or a misspelt value) is a ValueError from
    the trainer's start, not a traceback from the first step with out_dir and its cache directory made."""
    import kernels._common

    monkeypatch.setenv("LWT_BACKEND", value)
    monkeypatch.setattr(kernels._common, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=match):
        _run(tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_rebuild_holds_two_shards_on_the_disk_at_a_time(tmp_path, monkeypatch):
    """A wiped cache_dir resumed inside stage 3 rebuilds blocks 0, 1 and 2's caches one from the other:
    each writer reserves its shard with only its input on the disk (two shards, as the run itself held),
    not with a writer open for every stage it goes back (which reserved all three at once)."""
    held, writer = [], T.CacheWriter

    def counting(directory, rank, *args, **kwargs):
        stages = {os.path.basename(d) for d in os.listdir(tmp_path / "run" / "cache") if d.startswith("stage")
                  and any(f.startswith("rank0.") for f in os.listdir(tmp_path / "run" / "cache" / d))}
        held.append(len(stages | {os.path.basename(directory)}))
        return writer(directory, rank, *args, **kwargs)

    four = ("--set", "model.n_layers=4", "--set", "train.max_steps=2", "--set", "train.joint_steps=0")
    _run(tmp_path, *four, "--stop_after", "7")  # inside stage 3, which reads block 2's cache
    shutil.rmtree(tmp_path / "run" / "cache")
    monkeypatch.setattr(T, "CacheWriter", counting)
    assert _run(tmp_path, *four, "--resume")[0] == 0
    assert held == [1, 2, 2], held  # blocks 0, 1, 2 rebuilt; stage 3 writes none


def _disk_events(monkeypatch, tmp_path) -> list:
    """A log of ("check", bytes) for every trainer disk check and ("write", stage dir) for every cache writer."""
    events, writer = [], T.CacheWriter
    monkeypatch.setattr(T, "check_disk_space", lambda directory, nbytes, what="": events.append(("check", nbytes)))
    monkeypatch.setattr(T, "CacheWriter", lambda directory, *args: events.append(
        ("write", os.path.basename(directory))) or writer(directory, *args))
    return events


def test_a_rebuild_is_checked_for_room_on_every_rank_before_it_writes(tmp_path, monkeypatch):
    """Resumed inside stage 2 (the last, which writes no cache) with the cache wiped: before any shard is
    reserved, every rank checks room for the two the rebuild holds at once (block 0's, then block 1's
    written from it), so that a disk too small stops every rank together, not one rank inside the rebuild
    while the others go on into a collective."""
    three = ("--set", "model.n_layers=3", "--set", "train.max_steps=2", "--set", "train.joint_steps=0")
    _run(tmp_path, *three, "--stop_after", "5")  # inside stage 2
    shutil.rmtree(tmp_path / "run" / "cache")
    events = _disk_events(monkeypatch, tmp_path)
    assert _run(tmp_path, *three, "--resume")[0] == 0
    shard = T.cache_bytes(16, 16, 32, torch.float32)
    assert events == [("check", 2 * shard), ("write", "stage0"), ("write", "stage1")], events


@pytest.mark.parametrize("extra,file_name", [((), "final.pt"), (("--end_to_end",), "end_to_end.pt")])
def test_a_failed_model_file_write_loses_no_training(tmp_path, monkeypatch, extra, file_name):
    """final.pt (end_to_end.pt) was written before any checkpoint of its phase's last steps: a full disk
    there lost the whole phase since its last checkpoint. A checkpoint at the phase's end comes first now;
    the resumed run trains nothing and writes the file the uninterrupted run wrote."""
    want = torch.load(_run(tmp_path, *extra, name="whole")[1] / file_name, weights_only=True)
    save_model, failed = T.Trainer.save_model, []

    def full_once(self, name):
        if name == file_name and not failed:
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_model(self, name)

    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "save_model", full_once)
        with pytest.raises(OSError, match="No space left"):
            _run(tmp_path, *extra)
    steps = _recording(monkeypatch, T.Trainer, "train_phase")
    code, out = _run(tmp_path, *extra, "--resume")
    assert code == 0 and steps == []
    got = torch.load(out / file_name, weights_only=True)
    assert got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][key], want["model"][key]) for key in want["model"])
    for saved in (got, want):  # (the two runs' directories differ)
        del saved["model"], saved["config"]["train"]["out_dir"], saved["config"]["train"]["cache_dir"]
    assert got == want


def test_a_cache_write_resumed_after_its_stage_is_checked_for_room(tmp_path, monkeypatch):
    """A run stopped by a failed cache write resumes at the write (its checkpoint is after the steps): the
    disk is checked, on every rank, before the shard is reserved, as before a stage's steps."""
    writer, calls = T.CacheWriter, []

    def full_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise T.DiskSpaceError("the disk filled up")
        return writer(*args)

    one = ("--set", "train.joint_steps=0")
    with monkeypatch.context() as m:
        m.setattr(T, "CacheWriter", full_once)
        with pytest.raises(T.DiskSpaceError, match="filled up"):
            _run(tmp_path, *one)
    events = _disk_events(monkeypatch, tmp_path)
    assert _run(tmp_path, *one, "--resume")[0] == 0
    shard = T.cache_bytes(16, 16, 32, torch.float32)
    assert events[:2] == [("check", shard), ("write", "stage0")], events


def test_a_disk_check_failing_on_one_rank_stops_every_rank(tmp_path, monkeypatch):
    """check_cache_room is a collective: a rank whose disk has room still raises when another's has none."""
    trainer = _trainer(tmp_path / "run")
    trainer.env = _OneOfTwoRanks((T.DiskSpaceError, "not enough disk space on rank 1"))
    monkeypatch.setattr(T, "check_disk_space", lambda *args: None)
    with pytest.raises(T.DiskSpaceError, match="^another rank: not enough disk space on rank 1$"):
        trainer.check_cache_room()


def test_disk_checks_count_the_shards_of_the_ranks_writing_to_the_disk(tmp_path, monkeypatch):
    """Before a stage trains, the disk must hold a shard for every rank writing to cache_dir (here two
    local ranks); at the write itself only this rank's shard is checked (by its CacheWriter): another
    rank's shard reserved first is no longer free space, and counting it again refused a disk that fits."""
    checks = []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(T, "check_disk_space", lambda directory, nbytes, what="": checks.append((nbytes, what)))
    trainer = _trainer(tmp_path / "run")
    shard = T.cache_bytes(trainer.cache_entries, 16, 32, torch.float32)
    trainer.train_phase(0, 0)
    assert checks == [(2 * shard, f"2 shard(s) of {shard / 2**20:.1f} MiB: 1 for each of the 2 rank(s) writing "
                                  f"to it")]
    trainer.finish_phase(0)
    assert len(checks) == 1


class _TwoRanks:
    """Rank 0 of a 2-rank run, for count_cache_sharers: rank 1 makes its marker at the first barrier when
    it writes to the same cache_dir (a filesystem the nodes share), and elsewhere when it does not."""

    world, rank = 2, 0

    def __init__(self, elsewhere):
        self.elsewhere, self.barriers = elsewhere, 0

    def gather(self, obj):
        return [obj, "rank 1's token"]

    def barrier(self):
        self.barriers += 1
        if self.barriers == 1:
            token = next(n for n in os.listdir(self.cache_dir) if n.startswith(".sharers-")).split(".")[1]
            where = self.elsewhere or self.cache_dir
            open(os.path.join(where, f".{token}.rank1"), "x").close()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-filesystem", "node-local"])
def test_cache_sharers_are_counted_on_the_disk(tmp_path, shared):
    trainer = _trainer(tmp_path / "run")
    os.makedirs(trainer.cache_dir)
    other = tmp_path / "other-node"
    other.mkdir()
    trainer.env = _TwoRanks(None if shared else str(other))
    trainer.env.cache_dir = trainer.cache_dir
    assert trainer.count_cache_sharers() == (2 if shared else 1)
    assert trainer.env.barriers == 2
    assert not [n for n in os.listdir(trainer.cache_dir) if n.endswith(".rank0")], "rank 0's marker is removed"


def test_weights_made_nan_by_a_phases_last_update_are_named(tmp_path, monkeypatch):
    """The last step's update makes a weight NaN (its loss, computed before it, was finite): the phase's end
    check names the trained weights, before the evaluation runs."""
    step, calls = torch.optim.AdamW.step, []

    def poisoning_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(T.TrainingDiverged, match=r"^stage 0, step 6: the trained weights are no longer finite"):
        _run(tmp_path)
    assert not any("eval" in json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl"))


def test_an_infinite_loss_stops_the_run(tmp_path, monkeypatch):
    """An inf training loss stops the run as a NaN does (here its gradients, hence the weights, stay finite)."""
    loss = T.Trainer.loss
    monkeypatch.setattr(T.Trainer, "loss", lambda self, *args: loss(self, *args) + float("inf"))
    with pytest.raises(T.TrainingDiverged, match=r"^stage 0, step 2: the training loss is inf: "):
        _run(tmp_path)


def test_every_parameter_group_follows_the_schedule_to_min_lr_ratio(tmp_path, monkeypatch):
    """With weight decay (two AdamW groups) both groups step at lr_at's rate, with train.min_lr_ratio's floor."""
    lrs, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    code, _ = _run(tmp_path, "--set", "train.weight_decay=0.1", "--set", "train.min_lr_ratio=0.5",
                   "--set", "train.warmup_steps=1", "--set", "model.n_layers=1", "--set", "train.joint_steps=0",
                   "--set", "train.max_steps=4")
    assert code == 0
    want = [T.lr_at(s, 4, 3e-3, 1, 0.5) for s in range(4)]
    assert lrs == [[pytest.approx(w)] * 2 for w in want]
    assert want[-1] == pytest.approx(0.625 * 3e-3)  # (with the default floor 0.1: 0.325 of the peak)


def test_logged_tokens_and_rate_since_the_last_log(tmp_path, monkeypatch):
    """metrics.jsonl: `tokens` counts the phase's tokens through the logged step, `tokens_per_s` the tokens
    of the steps since the previous log over their time (100 s per step on a shifted clock)."""
    loss, shift = T.Trainer.loss, _shifted_clock(monkeypatch)

    def slow(self, *args):
        shift[0] += 100.0
        return loss(self, *args)

    monkeypatch.setattr(T.Trainer, "loss", slow)
    code, out = _run(tmp_path, "--set", "model.n_layers=1", "--set", "train.joint_steps=0")
    assert code == 0
    per_step = 4 * 16  # data.batch_size · data.seq_len, one rank
    logged = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in logged] == [(s, s * per_step) for s in (2, 4, 6)]
    assert all(r["tokens_per_s"] == pytest.approx(per_step / 100, rel=0.02) for r in logged), logged


def test_a_resumed_phases_flops_and_rate_count_this_invocations_steps(tmp_path, monkeypatch):
    """A phase resumed with one step left: its TFLOP/s are step_flops at that step's masked tokens (every
    token masked: t = 1), and its tok/s, with no second step to time, the phase's tokens over its wall time."""
    flops = _recording(monkeypatch, T, "step_flops")
    one = ("--set", "model.n_layers=1", "--set", "train.joint_steps=0", "--set", "train.max_steps=4",
           "--set", "objective.mask_fraction_min=1", "--set", "objective.mask_fraction_max=1")
    _run(tmp_path, *one, "--stop_after", "3")
    assert _run(tmp_path, *one, "--resume")[0] == 0
    (row,) = json.loads(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["history"])
    per_batch, per_masked = flops[-1]
    tokens = 4 * 16
    assert row["tflops"] * 1e12 / row["tokens_per_s"] == pytest.approx((per_batch + per_masked * tokens) / tokens)
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["wall_s"])


class _RankZeroOfTwo(_Rank):
    """Rank 0 of a 2-rank run without a process group: the other rank's loss (and NELBO) is this one's + 1."""
    main = True

    def __init__(self):
        super().__init__(0)

    def all_mean(self, value):
        return value + 0.5

    def gather(self, obj):
        return [obj, obj]

    def barrier(self):
        pass


def test_a_ranks_log_and_table_count_every_rank(tmp_path, monkeypatch):
    """Rank 0 of a 2-rank run (DDP left out): metrics.jsonl logs the ranks' mean loss and both ranks' tokens;
    the table row's tokens and tok/s are both ranks', its TFLOP/s one rank's (step_flops at the masked
    tokens: all of them, t = 1)."""
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda core, **kwargs: core)
    losses, flops = _recording(monkeypatch, T.Trainer, "loss"), _recording(monkeypatch, T, "step_flops")
    args = T.parse_args(TINY + ["--set", f"train.out_dir={tmp_path / 'run'}", "--set", "model.n_layers=1",
                                "--set", "train.joint_steps=0", "--set", "train.max_steps=4",
                                "--set", "objective.mask_fraction_min=1", "--set", "objective.mask_fraction_max=1"])
    trainer = T.Trainer(T.load_config(args.config, args.overrides), args, _RankZeroOfTwo())
    assert trainer.train_phase(0, 0)
    logged = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    assert [r["loss"] for r in logged] == [pytest.approx(losses[s - 1].item() + 0.5) for s in (2, 4)]
    per_step = 2 * 4 * 16  # ranks · data.batch_size · data.seq_len
    assert [r["tokens"] for r in logged] == [2 * per_step, 4 * per_step]
    (row,) = trainer.history
    (per_batch, per_masked), tokens = flops[0], 4 * 16
    assert row["tokens"] == 4 * per_step
    assert row["tflops"] * 1e12 / (row["tokens_per_s"] / 2) == pytest.approx((per_batch + per_masked * tokens) / tokens)


def test_stop_after_needs_a_step():
    with pytest.raises(SystemExit):
        T.parse_args(["--stop_after", "0"])
    assert T.parse_args(["--stop_after", "1"]).stop_after == 1


def test_a_run_dir_named_with_glob_characters_deletes_its_own_caches_only(tmp_path):
    """An out_dir such as runs/exp[12] (a character class to glob; Hydra-style directories hold brackets):
    each stage's cache is deleted once read, as anywhere else, and a sibling runs/exp1's cache, which the
    unescaped pattern also matched, is left alone."""
    sibling = tmp_path / "exp1" / "cache" / "stage0"
    sibling.mkdir(parents=True)
    (sibling / "rank0.manifest.json").write_text("another run's cache")
    code, out = _run(tmp_path, "--set", "model.n_layers=3", "--set", "train.joint_steps=0", name="exp[12]")
    assert code == 0
    assert os.listdir(sibling) == ["rank0.manifest.json"]
    assert not list((out / "cache").glob("stage*/rank0.*"))
