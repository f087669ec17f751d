"""lwt.data: the three token sources, the split, the batch sampler, and every error a user can hit."""
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

from lwt import data as lwt_data
from lwt.config import DataConfig
from lwt.data import TokenData, build_data
from lwt.train_layerwise import data_identity
from tests.helpers import resident_kib


def _cfg(**kw) -> DataConfig:
    kw.setdefault("seq_len", 16)
    return DataConfig(**kw)


def _write_tokens(path, ids, dtype) -> str:
    np.asarray(ids, dtype=dtype).tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def text_data() -> TokenData:
    return build_data(_cfg(source="text"), vocab_size=256)


# ----------------------------------------------------------------------------------------------- sources

def test_dummy_builds_deterministically():
    a = build_data(_cfg(source="dummy", seed=3), vocab_size=50)
    b = build_data(_cfg(source="dummy", seed=3), vocab_size=50)
    c = build_data(_cfg(source="dummy", seed=4), vocab_size=50)
    assert a.source == "dummy" and a.vocab_size == 50
    assert a.num_tokens("train") + a.num_tokens("val") >= lwt_data.DUMMY_MIN_TOKENS
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train, c.train)
    assert int(a.train.min()) == 0 and int(a.train.max()) == 49  # covers the whole vocab, nothing beyond


def test_dummy_grows_for_long_windows():
    d = build_data(_cfg(source="dummy", seq_len=4000), vocab_size=7)
    assert d.num_tokens("train") + d.num_tokens("val") == lwt_data.DUMMY_MIN_WINDOWS * 4001


@pytest.mark.parametrize("seq_len,fraction", [(1024, 0.01), (512, 0.005), (1024, 0.995)])
def test_dummy_grows_for_a_small_split(seq_len, fraction):
    """However small val_fraction (or 1 - val_fraction) is, each split holds a window; past
    DUMMY_MAX_TOKENS that is a clear error instead of gigabytes of random ids."""
    d = build_data(_cfg(source="dummy", seq_len=seq_len, val_fraction=fraction), vocab_size=7)
    assert min(d.num_tokens("train"), d.num_tokens("val")) >= seq_len + 1
    with pytest.raises(ValueError, match=r"^data.val_fraction=1e-06 / data.seq_len=1024: a dummy corpus"):
        build_data(_cfg(source="dummy", seq_len=1024, val_fraction=1e-6), vocab_size=7)
    # a denormal fraction: (seq_len + 1) / fraction is inf, which ceil() refused with an OverflowError
    with pytest.raises(ValueError, match=r"^data.val_fraction=1e-310 / data.seq_len=128: a dummy corpus with one "
                                         r"window in each split needs inf tokens, more than the 134217728"):
        build_data(_cfg(source="dummy", seq_len=128, val_fraction=1e-310), vocab_size=7)


def test_default_text_is_real_english(text_data):
    n = text_data.num_tokens("train") + text_data.num_tokens("val")
    assert n > 100_000
    text = text_data.decode(text_data.train)
    assert text.count(" the ") > 1000
    assert "documentation topics" in text_data.description or "docstrings" in text_data.description
    assert 2.5 < text_data.unigram_entropy() < 4.0  # English bytes: ~3.2 nats; uniform bytes would be 5.5


def test_entropy_of_one_outcome_prints_as_zero():
    """-Σ p log p of a single outcome is -0.0 in floating point, which the table printed as "-0.0000"."""
    assert f"{lwt_data.entropy_of_counts([5, 0]):.4f}" == "0.0000"


def test_default_text_falls_back_to_docstrings(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import now raises ImportError
    text, origin = lwt_data.default_text()
    assert "docstrings" in origin
    assert len(text.encode()) > lwt_data.MIN_DEFAULT_TEXT_BYTES and text.count(" the ") > 1000


def test_default_text_too_short_is_an_error(monkeypatch):
    fake = types.ModuleType("pydoc_data.topics")
    fake.topics = {"b": "two", "a": "one"}
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", fake)
    with pytest.raises(ValueError, match=r"default text .* only 8 bytes"):
        lwt_data.default_text()


def test_text_file(tmp_path):
    text = ("héllo wörld, the quick brown fox. " * 40).encode("utf-8")
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    d = build_data(_cfg(source="text", path=str(path), val_fraction=0.25), vocab_size=300)
    assert isinstance(d.train, np.memmap)
    n_val = int(len(text) * 0.25)
    assert d.num_tokens("val") == n_val and d.num_tokens("train") == len(text) - n_val
    assert bytes(np.asarray(d.train)) + bytes(np.asarray(d.val)) == text


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32], ids=["uint16", "uint32"])
def test_tokens_file(tmp_path, dtype):
    vocab = 70_000 if dtype == np.uint32 else 1000
    ids = np.random.default_rng(0).integers(0, vocab, size=5003)
    ids[17] = vocab - 1
    path = _write_tokens(tmp_path / "tok.bin", ids, dtype)
    d = build_data(_cfg(source="tokens", path=path, token_dtype=np.dtype(dtype).name), vocab_size=vocab)
    assert isinstance(d.train, np.memmap) and isinstance(d.val, np.memmap)  # indexed, never loaded
    assert np.array_equal(np.concatenate([d.train, d.val]), ids)
    assert d.num_tokens("val") == 500
    x = d.get_batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert x.dtype == torch.long and x.shape == (4, 16)
    assert d.decode(x[0]) == " ".join(str(int(i)) for i in x[0])
    assert torch.equal(d.encode(d.decode(x[0])), x[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("source", ["tokens", "text"])
def test_file_pages_do_not_stay_resident(tmp_path, source):
    """The id check, unigram_entropy, data_identity and the batches read the file with pread: pages read
    through the splits' own (run-long) maps stayed in the process's RSS, which grew to the whole file (a
    token file of tens of GB, per rank; data_identity's 64 spread windows alone, with readahead, kept 98%
    of this one)."""
    path = tmp_path / "corpus.bin"
    dtype = np.uint16 if source == "tokens" else np.uint8
    _write_tokens(path, np.random.default_rng(0).integers(0, 256, size=16 << 20), dtype)
    d = build_data(_cfg(source=source, path=str(path), seq_len=512, val_fraction=0.1), vocab_size=256)
    d.unigram_entropy("train")
    data_identity(d)  # (what a checkpoint stores of the data: 64 windows of each split)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        d.get_batch("train", 8, 512, g)
        d.get_batch("val", 8, 512, g)
    kib = resident_kib(path)
    assert kib < 1024, f"{kib} KiB of a {path.stat().st_size >> 10} KiB file stay resident"
    assert isinstance(d.train, np.memmap) and isinstance(d.val, np.memmap)
    assert np.array_equal(np.concatenate([d.train, d.val]), np.fromfile(path, d.train.dtype))


def test_hand_built_memmap_slices(tmp_path):
    """A TokenData of slices of one memmap (each slice's offset attribute is its base's) reads its own items."""
    path = _write_tokens(tmp_path / "seq.bin", np.arange(10_000), np.uint16)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    d = TokenData(mm[:9000], mm[9000:], 10_000, "tokens")
    x = d.get_batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert bool((x >= 9000).all()) and bool((x[:, 1:] - x[:, :-1] == 1).all())
    assert d.unigram_entropy("val") == pytest.approx(np.log(1000))


# ----------------------------------------------------------------------------------------------- batches

@pytest.mark.parametrize("source", ["dummy", "text"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_shape_dtype_range(source, split):
    d = build_data(_cfg(source=source), vocab_size=256)
    for b, s in [(1, 1), (3, 17), (8, 64)]:
        x = d.get_batch(split, b, s, torch.Generator().manual_seed(b))
        assert x.shape == (b, s) and x.dtype == torch.long and x.device.type == "cpu"
        assert int(x.min()) >= 0 and int(x.max()) < 256


def test_batch_needs_a_generator(text_data):
    with pytest.raises(ValueError, match=r"^generator: expected a torch.Generator .*, got NoneType"):
        text_data.get_batch("train", 2, 8, None)


def test_batch_is_a_window_of_the_split():
    # The dummy corpus as consecutive ids (a tokens file 0..N-1): every row must be a run of +1 steps that
    # lies wholly inside its split.
    d = build_data(_cfg(source="dummy"), vocab_size=256)
    n_train = d.num_tokens("train")
    d.train = torch.arange(n_train)
    d.val = torch.arange(n_train, n_train + d.num_tokens("val"))
    g = torch.Generator().manual_seed(0)
    for split, lo, hi in [("train", 0, n_train), ("val", n_train, n_train + d.num_tokens("val"))]:
        x = d.get_batch(split, 64, 33, g)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(64, 32, dtype=torch.long))
        assert int(x.min()) >= lo and int(x.max()) < hi


def test_full_length_window_and_too_long(tmp_path):
    path = _write_tokens(tmp_path / "t.bin", np.arange(100), np.uint16)
    d = build_data(_cfg(source="tokens", path=path, seq_len=9), vocab_size=100)  # val = last 10 tokens
    x = d.get_batch("val", 5, 10, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(90, 100).expand(5, 10))  # only one offset fits
    with pytest.raises(ValueError, match=r"seq_len: expected 1\.\.10"):
        d.get_batch("val", 5, 11, torch.Generator())


def test_splits_are_disjoint_and_ordered(tmp_path):
    ids = np.arange(2000)
    path = _write_tokens(tmp_path / "t.bin", ids, np.uint16)
    d = build_data(_cfg(source="tokens", path=path, val_fraction=0.2), vocab_size=2000)
    assert np.array_equal(d.train, ids[:1600]) and np.array_equal(d.val, ids[1600:])
    g = torch.Generator().manual_seed(1)
    assert int(d.get_batch("train", 32, 16, g).max()) < 1600
    assert int(d.get_batch("val", 32, 16, g).min()) >= 1600


def test_batches_are_deterministic_and_resumable(text_data):
    a = text_data.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    b = text_data.get_batch("train", 4, 32, torch.Generator().manual_seed(7))
    c = text_data.get_batch("train", 4, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)

    g = torch.Generator().manual_seed(0)
    text_data.get_batch("train", 4, 32, g)
    state = g.get_state()
    nxt = [text_data.get_batch("train", 4, 32, g) for _ in range(3)]
    g.set_state(state)
    assert all(torch.equal(x, text_data.get_batch("train", 4, 32, g)) for x in nxt)
    assert not torch.equal(nxt[0], nxt[1])  # the generator advances between calls


# ------------------------------------------------------------------------------------------ encode/decode

def test_text_round_trip(text_data):
    s = "The naïve café — ünïcödé ✓ and plain ASCII.\n"
    ids = text_data.encode(s)
    assert ids.dtype == torch.long and ids.shape == (len(s.encode("utf-8")),)
    assert int(ids.max()) < 256
    assert text_data.decode(ids) == s
    assert text_data.decode(ids.tolist()) == s and text_data.decode(ids.numpy()) == s


def test_text_encode_takes_escaped_bytes_back(text_data):
    """Bytes Python could not decode as UTF-8 (a Latin-1 command line) arrive as escaped characters and
    are encoded as those bytes; a character that is neither text nor an escaped byte is a ValueError."""
    assert text_data.encode(b"caf\xe9".decode("utf-8", "surrogateescape")).tolist() == list(b"caf\xe9")
    with pytest.raises(ValueError, match="^encode: the text has a character"):
        text_data.encode("\ud800")


def test_text_decode_replaces_bad_bytes_and_mask_ids(text_data):
    assert text_data.decode([0xC3]) == "\ufffd"                         # half of a 2-byte character
    assert text_data.decode([104, 105, 256, 33]) == "hi\ufffd!"        # 256: the [MASK] id


# --------------------------------------------------------------------------------------------- errors

def test_unknown_source():
    with pytest.raises(ValueError, match=r"data\.source: expected one of dummy, text, tokens, got 'bpe'"):
        build_data(_cfg(source="bpe"), vocab_size=256)


def test_unknown_split(text_data):
    with pytest.raises(ValueError, match=r"split: expected one of train, val, got 'test'"):
        text_data.get_batch("test", 1, 8, torch.Generator())
    with pytest.raises(ValueError, match=r"split: .*'validation'"):
        text_data.num_tokens("validation")


def test_text_needs_byte_vocab():
    with pytest.raises(ValueError, match=r"model vocab_size: .* >= 256 .* got 100"):
        build_data(_cfg(source="text"), vocab_size=100)


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_missing_file(tmp_path, source):
    path = str(tmp_path / "nope.bin")
    with pytest.raises(ValueError, match=f"no such file: {re.escape(path)}$"):
        build_data(_cfg(source=source, path=path), vocab_size=256)


def test_missing_relative_path_names_the_working_directory(tmp_path, monkeypatch):
    """A relative data.path is read from the working directory (not the config file's): the error says
    which directory that was."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no such file: \.\./corpus\.txt \(relative to the working directory, "
                                         + re.escape(os.getcwd()) + r"\)$"):
        build_data(_cfg(source="text", path="../corpus.txt"), vocab_size=256)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind):
    """A directory (data.path=data/ instead of a file in it) or a pipe (bash's <(zcat corpus.gz)) exists:
    "no such file" would send the user looking for a typo."""
    path = tmp_path / "corpus"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    want = "is a directory" if kind == "directory" else "is not a regular file"
    with pytest.raises(ValueError, match=f"data.path: {re.escape(str(path))} {want}"):
        build_data(_cfg(source="text", path=str(path)), vocab_size=256)


def test_tokens_needs_path():
    with pytest.raises(ValueError, match=r"data\.path: the tokens source needs a path"):
        build_data(_cfg(source="tokens"), vocab_size=256)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"empty: {re.escape(str(path))}"):
        build_data(_cfg(source="tokens", path=str(path)), vocab_size=256)


def test_ragged_token_file(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00" * 4003)
    with pytest.raises(ValueError, match=re.escape(f"{path} is 4003 bytes, not a multiple of the 2-byte uint16")):
        build_data(_cfg(source="tokens", path=str(path), token_dtype="uint16"), vocab_size=256)
    with pytest.raises(ValueError, match=re.escape(f"{path} is 4003 bytes, not a multiple of the 4-byte uint32")):
        build_data(_cfg(source="tokens", path=str(path), token_dtype="uint32"), vocab_size=256)


def test_token_ids_out_of_range(tmp_path):
    ids = np.zeros(3000, dtype=np.int64)
    ids[2500] = 300
    ids[2700] = 9000  # larger, later: the message names the first bad id, not the largest
    path = _write_tokens(tmp_path / "big.bin", ids, np.uint32)
    msg = re.escape(f"{path} holds id 300 >= model vocab_size 256 (first at token 2500)")
    with pytest.raises(ValueError, match=msg):
        build_data(_cfg(source="tokens", path=path, token_dtype="uint32"), vocab_size=256)


@pytest.mark.parametrize("at", [0, 999, 1000, 2999], ids=["first", "end-of-chunk", "start-of-chunk", "last"])
def test_token_id_equal_to_vocab_size_is_refused_wherever_it_is(tmp_path, monkeypatch, at):
    """ids must be < vocab_size: an id equal to it (one past the embedding) is refused, in any chunk of the
    scan (chunks of 1000 here) and at the file's last token."""
    monkeypatch.setattr(lwt_data, "_SCAN_CHUNK", 1000)
    ids = np.zeros(3000, dtype=np.int64)
    ids[at] = 256
    path = _write_tokens(tmp_path / "t.bin", ids, np.uint16)
    with pytest.raises(ValueError, match=re.escape(f"holds id 256 >= model vocab_size 256 (first at token {at})")):
        build_data(_cfg(source="tokens", path=path), vocab_size=256)


def test_largest_uint16_id_is_checked_against_an_equal_vocab_size(tmp_path):
    """vocab_size 65535: the uint16 id 65535 is out of range (the check is skipped only when no id of the
    dtype can reach vocab_size, i.e. vocab_size > 65535)."""
    ids = np.zeros(3000, dtype=np.int64)
    ids[100] = 65535
    path = _write_tokens(tmp_path / "t.bin", ids, np.uint16)
    with pytest.raises(ValueError, match="holds id 65535 >= model vocab_size 65535"):
        build_data(_cfg(source="tokens", path=path), vocab_size=65535)
    ids[100] = 65534
    _write_tokens(tmp_path / "t.bin", ids, np.uint16)
    build_data(_cfg(source="tokens", path=path), vocab_size=65535)


def test_unigram_entropy_over_several_chunks(tmp_path, monkeypatch):
    """The counts of every chunk add up (chunks of 1000 here, a file of 3500 tokens; the real chunk is 16M
    tokens), on a memmap split and on a tensor split."""
    monkeypatch.setattr(lwt_data, "_SCAN_CHUNK", 1000)
    ids = np.random.default_rng(3).integers(0, 50, size=3500)
    ids[:1000] = 7  # the first chunk unlike the rest
    d = build_data(_cfg(source="tokens", path=_write_tokens(tmp_path / "t.bin", ids, np.uint16), val_fraction=0.1),
                   vocab_size=50)
    want = lwt_data.entropy_of_counts(np.bincount(np.asarray(d.train, dtype=np.int64)))
    assert d.unigram_entropy("train") == pytest.approx(want, rel=1e-12)
    d.train = torch.from_numpy(np.asarray(d.train, dtype=np.int64))
    assert d.unigram_entropy("train") == pytest.approx(want, rel=1e-12)


def test_file_truncated_while_in_use_is_an_error(tmp_path, monkeypatch):
    """A token file cut short after build_data: a window read past the new end is the documented
    ValueError, not an endless loop of empty reads (guarded here: after 100 reads the test fails)."""
    path = _write_tokens(tmp_path / "t.bin", np.arange(2000), np.uint16)
    d = build_data(_cfg(source="tokens", path=path, val_fraction=0.2), vocab_size=2000)
    os.truncate(path, 1000 * 2)  # train keeps its first 1000 tokens, val none
    real, calls = os.preadv, []

    def preadv(*args):
        calls.append(1)
        if len(calls) > 100:
            raise AssertionError("preadv called again and again after the end of the file")
        return real(*args)

    monkeypatch.setattr(lwt_data.os, "preadv", preadv)
    with pytest.raises(ValueError, match="shorter than when it was opened"):
        d.get_batch("val", 2, 16, torch.Generator().manual_seed(0))


def test_batch_size_below_one_is_refused(text_data):
    with pytest.raises(ValueError, match=r"^batch_size: expected >= 1, got 0"):
        text_data.get_batch("train", 0, 8, torch.Generator())


def test_unknown_token_dtype(tmp_path):
    path = _write_tokens(tmp_path / "t.bin", np.arange(100), np.uint16)
    with pytest.raises(ValueError, match=r"data\.token_dtype: expected one of uint16, uint32, got 'int8'"):
        build_data(_cfg(source="tokens", path=path, token_dtype="int8"), vocab_size=256)


def test_split_too_short(tmp_path):
    path = _write_tokens(tmp_path / "t.bin", np.arange(300), np.uint16)
    msg = r"data\.seq_len=64 / data\.val_fraction=0\.1: .*>= 65 tokens.*train=270, val=30"
    with pytest.raises(ValueError, match=msg):
        build_data(_cfg(source="tokens", path=path, seq_len=64), vocab_size=300)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=r"data\.val_fraction: expected a value in \(0, 1\)"):
        build_data(_cfg(source="dummy", val_fraction=fraction), vocab_size=256)


def test_encode_ids_for_non_text_sources():
    d = build_data(_cfg(source="dummy"), vocab_size=10)
    assert torch.equal(d.encode("3 1 4"), torch.tensor([3, 1, 4]))
    with pytest.raises(ValueError, match=r"encode: the dummy source has no tokenizer"):
        d.encode("hello")
    with pytest.raises(ValueError, match=r"encode: ids must be in \[0, 10\), got 12"):
        d.encode("1 12")


# ------------------------------------------------------------------- from a second mutation run over lwt/data.py

def test_dummy_split_survives_the_floor_of_the_split_point():
    """(seq_len 1520, val_fraction 0.009): (1520 + 1) / 0.009 rounds up to 169000 tokens, and
    int(169000 * 0.009) = 1520 in floating point, one short of a window; the extra token makes it 1521."""
    d = build_data(_cfg(source="dummy", seq_len=1520, val_fraction=0.009), vocab_size=7)
    assert d.num_tokens("val") == 1521
    d.get_batch("val", 1, 1520, torch.Generator().manual_seed(0))


def test_seq_len_and_vocab_size_below_one_are_refused():
    """build_data names data.seq_len 0 and a vocab_size of 0 itself, rather than building a corpus that
    fails later (get_batch) or a bare torch.randint error."""
    with pytest.raises(ValueError, match=r"^data\.seq_len: expected >= 1, got 0"):
        build_data(_cfg(source="dummy", seq_len=0), vocab_size=256)
    with pytest.raises(ValueError, match=r"^model vocab_size: expected a positive int, got 0"):
        build_data(_cfg(source="dummy"), vocab_size=0)


def test_split_point_is_the_floor(tmp_path):
    """val is the last floor(n * val_fraction) tokens (1009 * 0.3 = 302.7: 302, not 303). The split lengths
    are part of the data identity a checkpoint stores, so a change of rounding would refuse every resume."""
    path = _write_tokens(tmp_path / "t.bin", np.arange(1009), np.uint16)
    d = build_data(_cfg(source="tokens", path=path, val_fraction=0.3), vocab_size=1009)
    assert (d.num_tokens("train"), d.num_tokens("val")) == (707, 302)
    assert int(d.val[0]) == 707


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="no preadv on this OS")
def test_short_reads_are_continued_where_they_stopped(tmp_path, monkeypatch):
    """preadv may return fewer bytes than asked (a signal, a network filesystem), even half a token: the
    read goes on from the byte where it stopped, and the window is still the file's."""
    path = _write_tokens(tmp_path / "t.bin", np.arange(2000), np.uint16)
    d = build_data(_cfg(source="tokens", path=path, val_fraction=0.2), vocab_size=2000)
    real = os.preadv
    monkeypatch.setattr(lwt_data.os, "preadv", lambda fd, buffers, offset: real(fd, [buffers[0][:5]], offset))
    x = d.get_batch("val", 4, 16, torch.Generator().manual_seed(0))
    assert bool((x[:, 1:] - x[:, :-1] == 1).all()) and int(x.min()) >= 1600


def test_default_text_joins_the_topics_in_sorted_order(monkeypatch):
    """The topics are joined in sorted key order, not the dict's (the generator script's): the default
    corpus, hence its split and data identity, is the same whatever order a Python build stores them in."""
    fake = types.ModuleType("pydoc_data.topics")
    fake.topics = {"b": "B" * 60_000, "a": "A" * 60_000}
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", fake)
    text, _ = lwt_data.default_text()
    assert text == "A" * 60_000 + "\n\n" + "B" * 60_000


def test_fallback_docstrings_are_not_repeated(monkeypatch):
    """A docstring reached twice (a re-exported object, a module listed twice) enters the fallback corpus
    once: a repeat could land in both splits, and validation would score text it trained on."""
    monkeypatch.setattr(lwt_data, "FALLBACK_DOC_MODULES", ("json",))
    once = lwt_data._stdlib_docstrings()
    monkeypatch.setattr(lwt_data, "FALLBACK_DOC_MODULES", ("json", "json"))
    assert lwt_data._stdlib_docstrings() == once


def test_encode_refuses_ids_outside_the_vocab_at_both_ends():
    """encode's ids must lie in [0, vocab_size): vocab_size itself and -1 are refused, 0 and vocab_size - 1
    taken."""
    d = build_data(_cfg(source="dummy"), vocab_size=10)
    assert d.encode("0 9").tolist() == [0, 9]
    for text, bad in (("10", 10), ("3 -1", -1)):
        with pytest.raises(ValueError, match=rf"encode: ids must be in \[0, 10\), got {bad}$"):
            d.encode(text)


def test_text_decode_of_a_negative_id_is_a_replacement_character(text_data):
    """Any id outside 0..255, negative ones too, decodes to U+FFFD (not a bytearray ValueError)."""
    assert text_data.decode([104, -1, 105]) == "h\ufffdi"


def test_data_identity_sees_each_splits_first_and_last_token(tmp_path):
    """The data identity a checkpoint stores reaches both ends of both splits: one token changed at the
    start or the end of train or val (lengths unchanged) changes it, so --resume refuses that file."""
    ids = np.arange(20_000) % 60_000
    path = _write_tokens(tmp_path / "t.bin", ids, np.uint16)
    cfg = _cfg(source="tokens", path=path, val_fraction=0.25)
    base = data_identity(build_data(cfg, vocab_size=60_000))
    for at in (0, 14_999, 15_000, 19_999):  # train is tokens 0..14999, val 15000..19999
        changed = ids.copy()
        changed[at] += 1
        _write_tokens(path, changed, np.uint16)
        now = data_identity(build_data(cfg, vocab_size=60_000))
        assert (now["train_tokens"], now["val_tokens"]) == (15_000, 5_000)
        assert now["sample_sha256"] != base["sample_sha256"], at
    _write_tokens(path, ids, np.uint16)
    assert data_identity(build_data(cfg, vocab_size=60_000)) == base


def test_data_identity_is_stable_across_versions():
    """The identity's recipe (64 windows of up to 4096 tokens spread over each split, train then val, the
    ids' bytes as stored) is part of the checkpoint format: a change would make --resume refuse every older
    checkpoint as "the training data differs". Pinned on a tensor corpus with a split shorter than a window."""
    d = TokenData(torch.arange(9000) % 251, torch.arange(1000) % 97, 256, "dummy")
    assert data_identity(d) == {"source": "dummy", "train_tokens": 9000, "val_tokens": 1000,
                                "sample_sha256": "aa69b061a48182ee3caf29039f93acd4534a318bfc516cb52298b3384bb8f01e"}


def test_encode_takes_any_whitespace_between_ids():
    """Ids for the non-text sources are whitespace-separated: newlines, tabs and runs of spaces all separate."""
    d = build_data(_cfg(source="dummy"), vocab_size=10)
    assert d.encode("3\n1\t4   1\n").tolist() == [3, 1, 4, 1]


def test_unigram_entropy_when_a_later_chunk_has_smaller_ids(tmp_path, monkeypatch):
    """A chunk whose largest id is below an earlier chunk's (a short last chunk, a section of the file with
    a smaller vocabulary) adds its counts to the earlier ones (chunks of 1000 here)."""
    monkeypatch.setattr(lwt_data, "_SCAN_CHUNK", 1000)
    ids = np.zeros(3000, dtype=np.int64)
    ids[:1000] = np.arange(1000) % 40  # ids 0..39 in the first chunk, only 0s after
    d = TokenData(torch.from_numpy(ids), torch.zeros(100, dtype=torch.int64), 40, "dummy")
    want = lwt_data.entropy_of_counts(np.bincount(ids))
    assert d.unigram_entropy("train") == pytest.approx(want, rel=1e-12)


def test_get_batch_refuses_seq_len_below_one(text_data):
    """seq_len 0 is a ValueError naming the range, not a batch of empty windows."""
    with pytest.raises(ValueError, match=r"^seq_len: expected 1\.\.\d+ .*got 0"):
        text_data.get_batch("train", 2, 0, torch.Generator())
