"""The activation cache (lwt/cache.py): exact round trips, indexed and chunked reads, rank isolation, and
every way a shard can be wrong (another config, damaged on disk, never finished) failing loudly."""
import errno
import hashlib
import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import lwt.cache
from lwt.cache import DISK_MARGIN_BYTES, ActivationCache, CacheWriter, cache_bytes, check_disk_space
from tests.helpers import resident_kib

S, D = 7, 12  # odd sizes, so a row/column mix-up cannot line up by accident


def _rows(n, dtype, seed=0):
    """n random rows; hidden is drawn in fp32 then rounded, so the expected stored values are exact."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, S, D, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 50_000, (n, S), generator=g)
    mask = torch.rand(n, S, generator=g) < 0.4
    t = torch.rand(n, generator=g, dtype=torch.float64)  # the writer casts t to fp32
    return hidden, tokens, mask, t


def _write(directory, rank, n, dtype, meta=None, batch=3, seed=0):
    rows = _rows(n, dtype, seed)
    with CacheWriter(directory, rank, n, S, D, dtype, meta or {"stage": 0, "fingerprint": "abc"}) as w:
        for i in range(0, n, batch):
            w.append(*(x[i:i + batch] for x in rows))
        manifest = w.finish()
    return rows, manifest


def _expect(n, dtype):
    return {"entries": n, "seq_len": S, "d_model": D, "dtype": dtype, "stage": 0, "fingerprint": "abc"}


def _assert_rows(got, want):
    hidden, tokens, mask, t = got
    assert hidden.dtype == want[0].dtype and tokens.dtype == torch.int64
    assert mask.dtype == torch.bool and t.dtype == torch.float32
    # bitwise: the cache must hand stage k+1 exactly what block k produced
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[hidden.dtype]
    assert torch.equal(hidden.view(bits), want[0].view(bits))
    assert torch.equal(tokens, want[1])
    assert torch.equal(mask, want[2])
    assert torch.equal(t, want[3].to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_round_trip_is_bitwise(tmp_path, dtype):
    rows, manifest = _write(tmp_path, 0, 11, dtype)  # 11 = 3+3+3+2: a short last append
    cache = ActivationCache.open(tmp_path, 0, _expect(11, dtype))
    assert (cache.entries, cache.seq_len, cache.d_model, cache.dtype) == (11, S, D, dtype)
    assert cache.meta == {"stage": 0, "fingerprint": "abc"}
    _assert_rows(cache.batch(torch.arange(11)), rows)
    on_disk = sum(os.path.getsize(tmp_path / f"rank0.{p}.bin") for p in ("hidden", "tokens", "mask", "t"))
    assert on_disk == cache_bytes(11, S, D, dtype)
    assert manifest == json.loads((tmp_path / "rank0.manifest.json").read_text())
    assert sorted(os.listdir(tmp_path)) == sorted(f"rank0.{n}" for n in (
        "hidden.bin", "tokens.bin", "mask.bin", "t.bin", "manifest.json"))  # no temp files left


def test_hidden_of_another_dtype_and_device_is_stored_in_the_cache_dtype(tmp_path):
    hidden, tokens, mask, t = _rows(4, torch.float32)
    with CacheWriter(tmp_path, 0, 4, S, D, torch.bfloat16, {}) as w:
        w.append(hidden, tokens.to(torch.int32), mask, t.to(torch.float16))
        w.finish()
    got = ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(4))
    assert torch.equal(got[0].view(torch.int16), hidden.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(got[3], t.to(torch.float16).to(torch.float32))


def test_batch_with_random_indices(tmp_path):
    rows, _ = _write(tmp_path, 0, 23, torch.bfloat16)
    cache = ActivationCache.open(tmp_path, 0, _expect(23, torch.bfloat16))
    index = torch.randint(0, 23, (9,), generator=torch.Generator().manual_seed(1))
    index[0] = index[1]  # repeats are allowed
    _assert_rows(cache.batch(index), [x[index] for x in rows])
    out = cache.batch(torch.tensor([22]))
    assert out[0].shape == (1, S, D) and out[3].shape == (1,)
    out[0].add_(1)  # a copy: writing to it must not reach the read-only map
    _assert_rows(cache.batch(torch.tensor([22])), [x[22:23] for x in rows])
    for bad, msg in ((torch.tensor([23]), r"\[0, 23\)"), (torch.tensor([-1]), r"\[0, 23\)"),
                     (torch.zeros(2, 2, dtype=torch.int64), "1-D integer"), (torch.zeros(2), "1-D integer")):
        with pytest.raises(ValueError, match=msg):
            cache.batch(bad)


@pytest.mark.parametrize("chunk", [1, 4, 10, 50])
def test_iter_chunks_covers_every_entry_once_in_order(tmp_path, chunk):
    rows, _ = _write(tmp_path, 0, 10, torch.float16)
    cache = ActivationCache.open(tmp_path, 0, _expect(10, torch.float16))
    starts, parts = [], []
    for start, *got in cache.iter_chunks(chunk):
        starts.append(start)
        parts.append(got)
        assert got[0].shape[0] == min(chunk, 10 - start)
    assert starts == list(range(0, 10, chunk))
    _assert_rows([torch.cat(p) for p in zip(*parts)], rows)
    with pytest.raises(ValueError, match="chunk"):
        cache.iter_chunks(0)


def test_two_ranks_in_one_directory_do_not_collide(tmp_path):
    # Both writers open at once, interleaved, as two ranks on one node would be.
    rows = {r: _rows(5, torch.float32, seed=r) for r in (0, 1)}
    writers = {r: CacheWriter(tmp_path, r, 5, S, D, torch.float32, {"stage": 2}) for r in (0, 1)}
    for i in range(5):
        for r in (1, 0):
            writers[r].append(*(x[i:i + 1] for x in rows[r]))
    for r in (0, 1):
        assert writers[r].finish()["rank"] == r
    for r in (0, 1):
        cache = ActivationCache.open(tmp_path, r, {"stage": 2, "rank": r})
        _assert_rows(cache.batch(torch.arange(5)), rows[r])
    with pytest.raises(FileNotFoundError, match="rank2.manifest.json"):
        ActivationCache.open(tmp_path, 2, {})


@pytest.mark.parametrize("key, value, want, found", [
    ("entries", 12, "12", "11"), ("seq_len", S + 1, str(S + 1), str(S)), ("d_model", 16, "16", str(D)),
    ("dtype", torch.float32, "'float32'", "'bfloat16'"), ("dtype", "float16", "'float16'", "'bfloat16'"),
    ("stage", 1, "1", "0"), ("fingerprint", "xyz", "'xyz'", "'abc'"),
])
def test_expect_mismatch_names_the_shard_the_key_and_both_values(tmp_path, key, value, want, found):
    _write(tmp_path, 0, 11, torch.bfloat16)
    shard = re.escape(str(tmp_path / "rank0.manifest.json"))
    with pytest.raises(ValueError, match=rf"{shard} does not match this run: {key} expected {want}, found {found}"):
        ActivationCache.open(tmp_path, 0, {**_expect(11, torch.bfloat16), key: value})


def test_meta_may_repeat_the_manifest_fields(tmp_path):
    """The trainer passes one dict both as the writer's meta and as the reader's expect."""
    expect = {**_expect(3, torch.float16), "dtype": "float16", "weights": "0123"}
    with CacheWriter(tmp_path, 0, 3, S, D, torch.float16, expect) as w:
        w.append(*_rows(3, torch.float16))
        w.finish()
    assert ActivationCache.open(tmp_path, 0, expect).meta["weights"] == "0123"


def test_expect_key_absent_from_manifest(tmp_path):
    _write(tmp_path, 0, 2, torch.float32)
    with pytest.raises(ValueError, match="found no 'draws' in the manifest"):
        ActivationCache.open(tmp_path, 0, {"draws": 2})


def test_expect_dtype_accepts_names_and_torch_dtypes(tmp_path):
    _write(tmp_path, 0, 2, torch.bfloat16)
    for name in (torch.bfloat16, "bfloat16", "torch.bfloat16"):
        assert ActivationCache.open(tmp_path, 0, {"dtype": name}).dtype == torch.bfloat16


@pytest.mark.parametrize("part", ["hidden", "tokens", "mask", "t"])
def test_flipped_byte_is_detected_and_names_the_file(tmp_path, part):
    _write(tmp_path, 0, 6, torch.bfloat16)
    path = tmp_path / f"rank0.{part}.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: sha256 .*delete the cache directory"):
        ActivationCache.open(tmp_path, 0, {})
    ActivationCache.open(tmp_path, 0, {}, verify=False)  # opt-out: sizes only, for very large shards


def test_truncated_file_is_detected(tmp_path):
    _write(tmp_path, 0, 6, torch.float32)
    path = tmp_path / "rank0.hidden.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4)
    msg = rf"{re.escape(str(path))} is corrupt: {size - 4} bytes, its manifest says {size}"
    with pytest.raises(ValueError, match=msg):
        ActivationCache.open(tmp_path, 0, {}, verify=False)


def test_missing_data_file(tmp_path):
    _write(tmp_path, 0, 3, torch.float32)
    os.remove(tmp_path / "rank0.t.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "rank0.t.bin"))):
        ActivationCache.open(tmp_path, 0, {})


def test_damaged_manifest(tmp_path):
    _write(tmp_path, 0, 3, torch.float32)
    path = tmp_path / "rank0.manifest.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is unreadable"):
        ActivationCache.open(tmp_path, 0, {})
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    m["files"]["hidden"]["shape"] = [3, S, D + 1]
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: entry for 'hidden'"):
        ActivationCache.open(tmp_path, 0, {})


@pytest.mark.parametrize("field,value", [("entries", "abc"), ("checksum", "md55"), ("checksum", ["sha256"]),
                                         ("meta", "stage"), ("files", [])])
def test_malformed_manifest_field_names_the_shard(tmp_path, field, value):
    """A manifest field of the wrong kind is a ValueError naming the manifest, never a bare TypeError or
    a lookup that happens to succeed (`"stage" in "stage"` on a meta that became a string)."""
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    m[field] = value
    path = tmp_path / "rank0.manifest.json"
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"^activation cache manifest {re.escape(str(path))} is corrupt: "):
        ActivationCache.open(tmp_path, 0, {"stage": 0})


def test_manifest_of_another_rank_or_version_is_refused(tmp_path):
    """A manifest naming another rank, or another rank's files, or written in another format version, is
    refused: each check on its own (the other fields left consistent), so none hides behind another."""
    path = tmp_path / "rank0.manifest.json"
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    for field, value, message in (("rank", 1, "it is rank 1's manifest under rank 0's name"),
                                  ("version", 2, "has format version 2, this lwt reads version 1")):
        path.write_text(json.dumps({**m, field: value}))
        with pytest.raises(ValueError, match=re.escape(message)):
            ActivationCache.open(tmp_path, 0, {})
    _write(tmp_path, 1, 3, torch.float32)  # rank 1's files exist, of the same sizes and checksums
    files = json.loads(json.dumps(m["files"]))
    files["hidden"]["name"] = "rank1.hidden.bin"
    path.write_text(json.dumps({**m, "files": files}))
    with pytest.raises(ValueError, match=r"is corrupt: entry for 'hidden'"):
        ActivationCache.open(tmp_path, 0, {})


def test_numpy_sizes_in_expect(tmp_path):
    _write(tmp_path, 0, 4, torch.float32)
    cache = ActivationCache.open(tmp_path, 0, {"entries": np.int64(4), "seq_len": np.int32(S), "stage": np.int64(0)})
    assert cache.entries == 4


def _only_rank0_files(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("rank0."))


def test_aborted_writer_leaves_no_shard_and_no_temp_files(tmp_path):
    w = CacheWriter(tmp_path / "stage0", 0, 4, S, D, torch.float32, {})
    assert len(_only_rank0_files(tmp_path / "stage0")) == 4  # reserved under temporary names
    w.append(*_rows(2, torch.float32))
    w.abort()
    w.abort()  # idempotent: the trainer may call it from nested handlers
    assert _only_rank0_files(tmp_path / "stage0") == []
    with pytest.raises(FileNotFoundError, match=r"rank0\.manifest\.json not found"):
        ActivationCache.open(tmp_path / "stage0", 0, {})
    with pytest.raises(RuntimeError, match="already aborted"):
        w.append(*_rows(1, torch.float32))


@pytest.mark.parametrize("call", ["fsync", "write"])
def test_io_error_while_writing_names_the_file_and_publishes_nothing(tmp_path, monkeypatch, call):
    """An fsync or write that fails (EIO; EDQUOT at close on NFS) raises an OSError naming the shard's file
    (such errors name none of their own: the CLI printed a bare "[Errno 5] Input/output error")."""
    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    w = CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
    rows = _rows(2, torch.float32)
    if call == "fsync":
        w.append(*rows)
        monkeypatch.setattr(lwt.cache.os, "fsync", fail)
    else:
        monkeypatch.setattr(w._files["hidden"], "write", fail)
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "rank0.hidden.bin.partial"))):
        with w:
            if call == "write":
                w.append(*rows)
            w.finish()
    assert _only_rank0_files(tmp_path) == []


def test_exception_inside_with_aborts(tmp_path):
    with pytest.raises(KeyError):
        with CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {}) as w:
            w.append(*_rows(2, torch.float32))
            raise KeyError("boom")
    assert _only_rank0_files(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="not found"):
        ActivationCache.open(tmp_path, 0, {})


def test_leaving_with_without_finish_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="without finish"):
        with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
            w.append(*_rows(2, torch.float32))
    assert _only_rank0_files(tmp_path) == []


def test_crashed_writer_is_reported_as_unfinished(tmp_path):
    w = CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})  # never finished nor aborted: a killed process
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ActivationCache.open(tmp_path, 0, {})
    w.abort()


def test_crashed_writers_space_counts_as_free(tmp_path, monkeypatch):
    """A killed writer leaves its reserved temporary files behind; the next writer of that rank deletes
    them before checking the disk (their space is free to it), and leaves other ranks' files alone."""
    CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})  # never finished nor aborted: a killed process
    other = CacheWriter(tmp_path, 1, 2, S, D, torch.float32, {})  # another rank, still writing
    leftovers = sum(os.path.getsize(tmp_path / n) for n in _only_rank0_files(tmp_path))
    assert leftovers == cache_bytes(2, S, D, torch.float32)
    seen = []
    real = lwt.cache.check_disk_space
    monkeypatch.setattr(lwt.cache, "check_disk_space",
                        lambda directory, nbytes: seen.append(sorted(os.listdir(directory))) or real(directory, nbytes))
    rows = _rows(2, torch.float32)
    with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
        w.append(*rows)
        w.finish()
    assert not any(n.startswith("rank0.") for n in seen[0])  # checked with rank 0's leftovers gone
    assert sum(n.startswith("rank1.") for n in seen[0]) == 4
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(2)), rows)
    other.abort()


def test_leftovers_of_rank_1_are_not_rank_10s(tmp_path):
    """remove_partials(rank 1) deletes rank1.*.partial only: rank 10's (and 11's...) reserved files, whose
    names also begin with "rank1", belong to a writer still running, which then publishes its shard."""
    CacheWriter(tmp_path, 1, 2, S, D, torch.float32, {})  # killed: its leftovers stay
    other = CacheWriter(tmp_path, 10, 2, S, D, torch.float32, {})
    rows = _rows(2, torch.float32)
    with CacheWriter(tmp_path, 1, 2, S, D, torch.float32, {}) as w:
        w.append(*rows)
        w.finish()
    assert sum(n.startswith("rank10.") and n.endswith(".partial") for n in os.listdir(tmp_path)) == 4
    other.append(*rows)
    other.finish()
    for rank in (1, 10):
        _assert_rows(ActivationCache.open(tmp_path, rank, {}).batch(torch.arange(2)), rows)


def test_crash_while_rewriting_leaves_no_manifest(tmp_path, monkeypatch):
    """Rewriting a shard: the old manifest goes before any old file is replaced, so a crash between the
    renames leaves no manifest (FileNotFoundError, "rerun it"), never the old manifest beside a mix of old
    and new files, which verify=False (sizes only) would open silently."""
    _write(tmp_path, 0, 4, torch.float32, seed=0)
    w = CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"stage": 0, "fingerprint": "abc"})
    w.append(*_rows(4, torch.float32, seed=5))
    real, renamed = os.replace, []

    def crash_on_second(src, dst):
        renamed.append(src)
        if len(renamed) == 2:
            raise OSError(5, "simulated crash between the renames")
        return real(src, dst)

    monkeypatch.setattr(lwt.cache.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="simulated crash"):
        w.finish()
    monkeypatch.undo()
    for verify in (False, True):
        with pytest.raises(FileNotFoundError, match=r"rank0\.manifest\.json not found"):
            ActivationCache.open(tmp_path, 0, {}, verify=verify)
    w.abort()


def test_largest_token_id_is_stored(tmp_path):
    """Token ids must lie in [0, 2**31): 2**31 - 1, the largest int32, is stored and read back."""
    hidden, tokens, mask, t = _rows(2, torch.float32)
    tokens[1, 3] = 2**31 - 1
    with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
        w.append(hidden, tokens, mask, t)
        w.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(2)), (hidden, tokens, mask, t))


def test_failed_disk_check_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(lwt.cache, "DISK_MARGIN_BYTES", 1 << 62)
    with pytest.raises(RuntimeError, match="not enough disk space"):
        CacheWriter(tmp_path / "cache" / "stage0", 0, 2, S, D, torch.float32, {})
    assert os.listdir(tmp_path) == []


def test_rewriting_a_shard_replaces_it(tmp_path):
    _write(tmp_path, 0, 4, torch.float32, seed=0)
    w = CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"stage": 0, "fingerprint": "abc"})
    ActivationCache.open(tmp_path, 0, {})  # the old shard stays valid until the new one is finished
    rows = _rows(4, torch.float32, seed=5)
    w.append(*rows)
    w.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, _expect(4, torch.float32)).batch(torch.arange(4)), rows)


def test_row_count_is_enforced(tmp_path):
    rows = _rows(5, torch.float32)
    with CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {}) as w:
        w.append(*(x[:3] for x in rows))
        with pytest.raises(ValueError, match="would make 5, more than the 4 entries"):
            w.append(*(x[3:5] for x in rows))
        with pytest.raises(ValueError, match="3 rows appended, the shard was created for 4"):
            w.finish()
        w.append(*(x[3:4] for x in rows))  # the failed calls wrote nothing
        w.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(4)), [x[:4] for x in rows])


def test_append_checks_shapes_and_dtypes(tmp_path):
    hidden, tokens, mask, t = _rows(2, torch.float32)
    w = CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {})
    cases = [
        ((hidden[:, :, :-1], tokens, mask, t), rf"hidden: expected shape \(B, {S}, {D}\)"),
        ((hidden[0], tokens, mask, t), "hidden: expected shape"),
        ((hidden, tokens[:1], mask, t), r"tokens: expected shape \(2, 7\)"),
        ((hidden, tokens, mask[:, :-1], t), "mask: expected shape"),
        ((hidden, tokens, mask, t[:1]), r"t: expected shape \(2,\)"),
        ((hidden, tokens.float(), mask, t), "tokens: expected an integer dtype"),
        ((hidden, tokens, mask.to(torch.uint8), t), "mask: expected torch.bool"),
        ((hidden, torch.full_like(tokens, -1), mask, t), r"tokens: ids must lie in \[0, 2\*\*31\)"),
        ((hidden, torch.full_like(tokens, 2**31), mask, t), r"tokens: ids must lie in \[0, 2\*\*31\)"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            w.append(*args)
    assert w.rows == 0
    w.abort()


def test_writer_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        CacheWriter(tmp_path, 0, 4, S, D, torch.int8, {})
    with pytest.raises(ValueError, match="entries: expected an int >= 1"):
        CacheWriter(tmp_path, 0, 0, S, D, torch.float32, {})
    with pytest.raises(ValueError, match="meta: must be a JSON-serialisable dict"):
        CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"stage": object()})
    with pytest.raises(ValueError, match="meta: entries=5 contradicts the writer's entries=4"):
        CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"entries": 5})
    with pytest.raises(ValueError, match="meta: dtype='float16' contradicts the writer's dtype='float32'"):
        CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"dtype": "float16"})
    assert os.listdir(tmp_path) == []
    # sizes computed with numpy (e.g. sequences * draws) are ints too
    with CacheWriter(tmp_path, np.int64(0), np.int64(1), np.int32(S), D, torch.float32, {}) as w:
        w.append(*_rows(1, torch.float32))
        assert w.finish()["entries"] == 1


def test_check_disk_space(tmp_path):
    check_disk_space(tmp_path / "not" / "yet" / "made", 1 << 20)  # fits; a missing directory is fine
    huge = 1 << 62
    target = tmp_path / "cache" / "stage0"
    msg = (rf"in {re.escape(str(target))}: needs {huge + DISK_MARGIN_BYTES} bytes .*, "
           rf"\d+ bytes .* free on the disk holding {re.escape(str(tmp_path))}")
    with pytest.raises(RuntimeError, match=msg):
        check_disk_space(target, huge)


def test_cache_bytes():
    N = 6
    assert cache_bytes(N, S, D, torch.float32) == N * S * D * 4 + N * S * 4 + N * S + N * 4
    assert cache_bytes(N, S, D, torch.bfloat16) == N * S * D * 2 + N * S * 4 + N * S + N * 4
    assert cache_bytes(N, S, D, torch.float16) == cache_bytes(N, S, D, torch.bfloat16)
    # the default config's stage: 512 sequences x 128 tokens x d_model 128 in fp32 is ~33.9 MB
    assert cache_bytes(512, 128, 128, torch.float32) == 33_884_160
    with pytest.raises(ValueError, match="dtype"):
        cache_bytes(N, S, D, torch.float64)


def test_writer_whose_temporary_files_were_taken_over_publishes_nothing(tmp_path):
    """Two runs sharing one cache_dir: the second writer of a rank deletes the first's temporary files and
    makes its own; the first must not publish its manifest over the second's (blank) files, nor delete them."""
    rows = _rows(4, torch.float32)
    with pytest.raises(RuntimeError, match="deleted or replaced while this writer held it"):
        with CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"run": "a"}) as a:
            a.append(*rows)
            b = CacheWriter(tmp_path, 0, 4, S, D, torch.float32, {"run": "b"})
            a.finish()
    assert not (tmp_path / "rank0.manifest.json").exists()
    b.append(*rows)
    b.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, {"run": "b"}).batch(torch.arange(4)), rows)


def test_variable_length_checksum_in_manifest_is_corrupt(tmp_path):
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    m["checksum"] = "shake_128"
    (tmp_path / "rank0.manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="is corrupt: unknown checksum algorithm 'shake_128'"):
        ActivationCache.open(tmp_path, 0, {})


def test_closed_cache_says_so(tmp_path):
    _write(tmp_path, 0, 3, torch.float32)
    cache = ActivationCache.open(tmp_path, 0, {})
    cache.close()
    with pytest.raises(RuntimeError, match="ActivationCache of rank 0 in .* is closed"):
        cache.batch(torch.arange(2))
    with pytest.raises(RuntimeError, match="is closed"):
        cache.iter_chunks(2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_reads_do_not_stay_resident(tmp_path):
    """batch() and iter_chunks() read through maps dropped after use: pages read through the maps open()
    made stayed in the process's RSS, which grew by the whole shard over a stage (8 GiB a rank at the
    LLaMA preset's size)."""
    n, s, d = 64, 64, 256  # 4 MiB of fp32 hidden states
    with CacheWriter(tmp_path, 0, n, s, d, torch.float32, {}) as w:
        g = torch.Generator().manual_seed(0)
        for _ in range(0, n, 16):
            w.append(torch.randn(16, s, d, generator=g), torch.zeros(16, s, dtype=torch.long),
                     torch.zeros(16, s, dtype=torch.bool), torch.full((16,), 0.5))
        w.finish()
    cache = ActivationCache.open(tmp_path, 0, {})
    for i in range(50):
        cache.batch(torch.arange(i, i + 8) % n)
    for _ in cache.iter_chunks(16):
        pass
    hidden = os.path.join(cache.directory, cache.manifest["files"]["hidden"]["name"])
    assert resident_kib(hidden) < 512, f"{resident_kib(hidden)} KiB of the 4096 KiB shard stay resident"


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_open_cache_is_not_copied(tmp_path, how):
    """The open shard's files are closed by close() or garbage collection of the cache that opened them:
    a copy sharing them (copy.copy: EBADF) or holding their bare numbers (deepcopy: a later open() reuses
    them, and the copy read another file's bytes as activations, silently) is refused instead."""
    import copy
    import pickle
    _write(tmp_path, 0, 4, torch.float32)
    cache = ActivationCache.open(tmp_path, 0, {})
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how](cache)
    cache.close()


# ------------------------------------------------------------------ from a second mutation run over lwt/cache.py

def test_leftovers_are_removed_from_a_directory_named_with_glob_characters(tmp_path):
    """remove_partials escapes the directory for glob: a cache_dir such as runs/exp[1] (a character class to
    glob) still has a killed writer's reserved files deleted, whose space the next writer counts as free."""
    directory = tmp_path / "exp[1]" / "stage0"
    CacheWriter(directory, 0, 2, S, D, torch.float32, {})  # never finished nor aborted: a killed process
    assert len(_only_rank0_files(directory)) == 4
    lwt.cache.remove_partials(directory, 0)
    assert _only_rank0_files(directory) == []


def test_disk_check_needs_the_margin_and_not_a_byte_more(tmp_path, monkeypatch):
    """Exactly nbytes + DISK_MARGIN_BYTES free is enough; one byte less is a DiskSpaceError."""
    free = 5 << 30
    monkeypatch.setattr(lwt.cache.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
    check_disk_space(tmp_path, free - DISK_MARGIN_BYTES)
    with pytest.raises(lwt.cache.DiskSpaceError, match=rf"needs {free + 1} bytes"):
        check_disk_space(tmp_path, free - DISK_MARGIN_BYTES + 1)


@pytest.mark.parametrize("name, value", [("rank", -1), ("seq_len", 0), ("d_model", 0), ("entries", True),
                                         ("rank", np.bool_(False)), ("d_model", float(D))])
def test_writer_refuses_each_bad_size(tmp_path, name, value):
    """rank >= 0 and entries, seq_len, d_model >= 1, each an int (a bool or a float is not one), checked
    before anything is written."""
    sizes = {"rank": 0, "entries": 4, "seq_len": S, "d_model": D, name: value}
    with pytest.raises(ValueError, match=rf"^{name}: expected an int >= "):
        CacheWriter(tmp_path, dtype=torch.float32, meta={}, **sizes)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this OS")
def test_full_disk_at_the_reservation_is_a_disk_space_error(tmp_path, monkeypatch):
    """posix_fallocate failing with ENOSPC (the disk filled after the free-space check, or a quota) is a
    DiskSpaceError naming the file, and the writer leaves no temporary files behind."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lwt.cache.os, "posix_fallocate", full)
    with pytest.raises(lwt.cache.DiskSpaceError, match=r"reserving \d+ bytes for .*rank0\.hidden\.bin\.partial"):
        CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
    assert _only_rank0_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this OS")
@pytest.mark.parametrize("code", ["EOPNOTSUPP", "EINVAL", "ENOSYS", "EIO"])
def test_filesystem_without_fallocate(tmp_path, monkeypatch, code):
    """A filesystem that cannot fallocate (EOPNOTSUPP, EINVAL, ENOSYS) gets files of the shard's size
    (truncate) and a shard that round-trips; any other error (EIO) is an OSError naming the file, with no
    temporary files left."""
    def unsupported(fd, offset, length):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(lwt.cache.os, "posix_fallocate", unsupported)
    if code == "EIO":
        with pytest.raises(OSError, match=re.escape(str(tmp_path / "rank0.hidden.bin.partial"))):
            CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
        assert _only_rank0_files(tmp_path) == []
        return
    rows = _rows(2, torch.float32)
    with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
        assert sum(os.path.getsize(tmp_path / n) for n in _only_rank0_files(tmp_path)) == cache_bytes(
            2, S, D, torch.float32)
        w.append(*rows)
        w.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(2)), rows)


def test_abort_after_finish_is_a_no_op(tmp_path):
    """abort() after finish() (the trainer's handlers may abort a writer that finished) keeps the published
    shard, and leaving the `with` block afterwards is no error."""
    rows = _rows(2, torch.float32)
    with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
        w.append(*rows)
        w.finish()
        w.abort()
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(2)), rows)
    with pytest.raises(RuntimeError, match="already finished"):
        w.append(*rows)


def test_finish_publishes_in_a_durable_order(tmp_path, monkeypatch):
    """finish(): each data file is fsynced, then renamed into place; the renames are made durable (a
    directory fsync) before the manifest is written, fsynced and renamed, and that rename is made durable
    too. A crash at any point then leaves either no manifest or a manifest whose files are all on disk."""
    w = CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
    w.append(*_rows(2, torch.float32))
    events, real_replace, real_fsync = [], os.replace, os.fsync
    monkeypatch.setattr(lwt.cache.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(lwt.cache.os, "replace",
                        lambda src, dst: events.append(os.path.basename(dst)) or real_replace(src, dst))
    monkeypatch.setattr(lwt.cache, "_fsync_dir", lambda directory: events.append("fsync dir"))
    w.finish()
    assert events == (["fsync"] * 4 + [f"rank0.{p}.bin" for p in ("hidden", "tokens", "mask", "t")]
                      + ["fsync dir", "fsync", "rank0.manifest.json", "fsync dir"])


def test_meta_may_spell_dtype_as_open_takes_it(tmp_path):
    """The dict the trainer passes as both meta and expect may spell dtype "torch.float16", as open()'s
    expect accepts it: that agrees with the writer's float16, it does not contradict it."""
    expect = {"dtype": "torch.float16", "stage": 0}
    with CacheWriter(tmp_path, 0, 3, S, D, torch.float16, expect) as w:
        w.append(*_rows(3, torch.float16))
        w.finish()
    assert ActivationCache.open(tmp_path, 0, expect).dtype == torch.float16


def test_manifest_of_another_format_is_corrupt(tmp_path):
    """A JSON file at the manifest's name that is not an lwt-activation-cache manifest (another format
    name, none, or not an object) is refused as corrupt, naming it."""
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    path = tmp_path / "rank0.manifest.json"
    without = {k: v for k, v in m.items() if k != "format"}
    for bad in ({**m, "format": "other-cache"}, without, [m]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: not an lwt-activation-cache"):
            ActivationCache.open(tmp_path, 0, {})


@pytest.mark.parametrize("field, value", [("name", "rank0.other.bin"), ("dtype", "float16"),
                                          ("shape", [3, S * D]), ("bytes", 1)])
def test_file_entry_that_disagrees_with_the_shard_is_corrupt(tmp_path, field, value):
    """Each field of a file's manifest entry (name, dtype, shape, bytes) must be what entries, seq_len,
    d_model and dtype imply: one edited field is a corrupt manifest naming the entry (bytes: not a
    "truncated or overwritten" data file, which the file is not)."""
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    m["files"]["hidden"][field] = value
    path = tmp_path / "rank0.manifest.json"
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: entry for 'hidden'"):
        ActivationCache.open(tmp_path, 0, {}, verify=False)


def test_grown_file_is_detected_without_verify(tmp_path):
    """A data file longer than its manifest says (appended to, or another shard's file copied over it) is
    refused on its size alone, as a truncated one is, even with verify=False."""
    _write(tmp_path, 0, 6, torch.float32)
    path = tmp_path / "rank0.tokens.bin"
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: {size + 4} bytes, its manifest says {size}"):
        ActivationCache.open(tmp_path, 0, {}, verify=False)


def test_manifest_checksum_algorithm_is_honoured(tmp_path):
    """open() verifies with the algorithm the manifest names (its "checksum" field), not always sha256: a
    shard whose manifest lists blake2b digests opens, and a flipped byte is still found."""
    m = _write(tmp_path, 0, 3, torch.float32)[1]
    m["checksum"] = "blake2b"
    for rec in m["files"].values():
        del rec["sha256"]
        rec["blake2b"] = hashlib.blake2b((tmp_path / rec["name"]).read_bytes()).hexdigest()
    (tmp_path / "rank0.manifest.json").write_text(json.dumps(m))
    ActivationCache.open(tmp_path, 0, {}).close()
    path = tmp_path / "rank0.t.bin"
    path.write_bytes(bytes([path.read_bytes()[0] ^ 1]) + path.read_bytes()[1:])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is corrupt: blake2b "):
        ActivationCache.open(tmp_path, 0, {})


def test_boolean_index_is_refused(tmp_path):
    """A bool mask is not an index: read as 0/1 it would return rows 0 and 1 instead of the masked ones.
    Nor is a complex tensor: its cast to int64 would drop the imaginary part and truncate the real one."""
    _write(tmp_path, 0, 3, torch.float32)
    with pytest.raises(ValueError, match="1-D integer"):
        ActivationCache.open(tmp_path, 0, {}).batch(torch.tensor([False, True, True]))
    with pytest.raises(ValueError, match="1-D integer tensor, got torch.complex64"):
        ActivationCache.open(tmp_path, 0, {}).batch(torch.tensor([2.7 + 0j]))


def test_open_names_a_rank_that_is_not_an_int(tmp_path):
    """A rank read from the environment ("0") named rank 0's manifest, then called that valid shard corrupt
    and advised deleting it; it is refused by name, as CacheWriter refuses it. NumPy ints are ranks."""
    _write(tmp_path, 0, 3, torch.float32)
    with pytest.raises(ValueError, match=r"^rank: expected an int >= 0, got '0'$"):
        ActivationCache.open(tmp_path, "0", {})
    assert len(ActivationCache.open(tmp_path, np.int64(0), {})) == 3


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int16])
def test_unsigned_token_ids_are_stored(tmp_path, dtype):
    """Token ids of any integer dtype, the unsigned ones too (uint16 is the usual dtype of a token file),
    whose min and max torch does not implement on the CPU for uint16..uint64."""
    hidden, tokens, mask, t = _rows(2, torch.float32)
    tokens = tokens % 200
    with CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {}) as w:
        w.append(hidden, tokens.to(dtype), mask, t)
        w.finish()
    _assert_rows(ActivationCache.open(tmp_path, 0, {}).batch(torch.arange(2)), (hidden, tokens, mask, t))


def test_an_unsigned_token_id_beyond_int32_is_refused(tmp_path):
    hidden, tokens, mask, t = _rows(2, torch.float32)
    w = CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
    for dtype, big in ((torch.uint32, 2**31), (torch.uint64, 2**40)):
        wide = tokens.to(dtype)
        wide[1, 2] = big
        with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 2\*\*31\)"):
            w.append(hidden, wide, mask, t)
    w.abort()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_close_releases_the_shards_files(tmp_path):
    """close() closes the shard's files and drops its maps at once, not at garbage collection: the trainer
    closes a stage's input cache before deleting it, and open descriptors would keep its disk space taken."""
    _write(tmp_path, 0, 3, torch.float32)

    def open_here():
        fds = os.listdir("/proc/self/fd")
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)) for fd in fds
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    cache = ActivationCache.open(tmp_path, 0, {})
    cache.batch(torch.arange(3))
    assert open_here() > 0
    cache.close()
    assert open_here() == 0


def test_unfinished_shard_names_only_its_own_temporary_files(tmp_path):
    """A missing manifest of rank 1 beside rank 10's live temporary files (names that also begin with
    "rank1") is "not finished", not "a writer of this shard did not finish"; nor is a missing directory."""
    other = CacheWriter(tmp_path, 10, 2, S, D, torch.float32, {})
    with pytest.raises(FileNotFoundError, match="the stage that writes this shard has not finished"):
        ActivationCache.open(tmp_path, 1, {})
    with pytest.raises(FileNotFoundError, match="the stage that writes this shard has not finished"):
        ActivationCache.open(tmp_path / "stage9", 0, {})
    other.abort()


def test_append_refuses_each_wrong_dtype(tmp_path):
    """hidden and t must be floating, tokens integer and not bool: an integer hidden or t, or bool tokens,
    is a ValueError naming the argument, never silently cast and stored."""
    hidden, tokens, mask, t = _rows(2, torch.float32)
    w = CacheWriter(tmp_path, 0, 2, S, D, torch.float32, {})
    for args, msg in (((hidden.to(torch.int32), tokens, mask, t), "hidden: expected a floating dtype"),
                      ((hidden, tokens, mask, torch.ones(2, dtype=torch.int64)), "t: expected a floating dtype"),
                      ((hidden, tokens > 0, mask, t), "tokens: expected an integer dtype")):
        with pytest.raises(ValueError, match=msg):
            w.append(*args)
    assert w.rows == 0
    w.abort()


def test_empty_index_gives_empty_rows(tmp_path):
    """batch() of an empty index returns zero rows of each part, with the right trailing shapes."""
    _write(tmp_path, 0, 3, torch.bfloat16)
    hidden, tokens, mask, t = ActivationCache.open(tmp_path, 0, {}).batch(torch.tensor([], dtype=torch.int64))
    assert (hidden.shape, tokens.shape, mask.shape, t.shape) == ((0, S, D), (0, S), (0, S), (0,))
    assert hidden.dtype == torch.bfloat16
