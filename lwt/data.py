"""Token sources for the trainer: a random pseudo-corpus, byte-level text, and memory-mapped token files.

`build_data(cfg, vocab_size)` returns a `TokenData`: a 1-D train sequence and a 1-D validation sequence
of token ids, and `get_batch`, which cuts random windows of `seq_len` tokens out of one of them.

Sources (`DataConfig.source`):
- `dummy`: uniform random ids in [0, vocab_size), drawn once from `cfg.seed`. For plumbing only: there is
  nothing to learn, and the loss floor is log(vocab_size).
- `text`: byte-level tokens (one token per UTF-8 byte, ids 0..255). `cfg.path` None uses Python's own
  documentation topics (`pydoc_data.topics`), real English that ships with every CPython, so the default
  job needs no download; a path is memory-mapped as raw bytes.
- `tokens`: a nanoGPT-style raw binary file of uint16 or uint32 ids, memory-mapped and never loaded whole.

Split: the last `val_fraction` of the corpus is validation, the rest train. The boundary is a single cut,
never a shuffle, so no window of one split overlaps the other (a window never crosses the cut because
each split is indexed on its own).

Determinism and resuming: `get_batch` draws its window offsets from the `torch.Generator` it is given and
from nothing else, so the same generator state gives the same batch. The trainer saves and restores
`generator.get_state()` to resume exactly, and seeds one generator per rank for data-parallel runs.
"""
from __future__ import annotations

import importlib
import inspect
import math
import mmap
import os
import sys
import warnings
import weakref

import numpy as np
import torch

from lwt.config import BYTE_VOCAB, DataConfig
from lwt.config import DATA_SOURCES as SOURCES
from lwt.config import TOKEN_DTYPES as _TOKEN_DTYPE_NAMES

SPLITS = ("train", "val")
TOKEN_DTYPES = {name: np.dtype(name).type for name in _TOKEN_DTYPE_NAMES}  # "uint16" -> np.uint16

# The dummy corpus: long enough that random windows rarely repeat, short enough to build in milliseconds.
DUMMY_MIN_TOKENS = 100_000
DUMMY_MIN_WINDOWS = 50
# ... and made longer when a small val_fraction needs it for one window of validation, up to this.
DUMMY_MAX_TOKENS = 1 << 27

# The default text must be big enough to be worth training on; pydoc_data.topics is ~450-500 kB.
MIN_DEFAULT_TEXT_BYTES = 100_000

# Used only where a Python ships without pydoc_data (some distro builds strip it): the docstrings of
# these modules and of their public classes and functions, in this fixed order, are the corpus.
FALLBACK_DOC_MODULES = (
    "builtins", "argparse", "collections", "functools", "inspect", "itertools", "json", "logging", "os",
    "pathlib", "re", "string", "subprocess", "textwrap", "threading", "typing", "unittest",
)

# Items scanned at once when checking a token file's ids: 16M items is 32-64 MiB of RAM whatever the file size
# (read into a buffer of their own, not through the file's map: see _read_into).
_SCAN_CHUNK = 1 << 24


class TokenData:
    """Train and validation token sequences plus a random-window batch sampler.

    Attributes:
        train, val: 1-D token ids: a torch integer tensor (dummy, default text) or a read-only numpy
            memmap (files), so a file larger than RAM is only read where a window lands.
        vocab_size: the model's vocabulary size; every id is in [0, vocab_size).
        source: "dummy", "text" or "tokens".
        description: one line saying where the tokens came from, for logs.
    """

    def __init__(self, train, val, vocab_size: int, source: str, description: str = ""):
        self.train = train
        self.val = val
        self.vocab_size = vocab_size
        self.source = source
        self.description = description

    def __repr__(self) -> str:
        return (f"TokenData(source={self.source!r}, train={self.num_tokens('train')}, "
                f"val={self.num_tokens('val')}, vocab_size={self.vocab_size})")

    def _split(self, split: str):
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")

    def num_tokens(self, split: str) -> int:
        """Number of tokens in `split`.

        Args:
            split: "train" or "val".
        Returns:
            The split's length, an int.
        Raises:
            ValueError: any other split name.
        """
        return len(self._split(split))

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """Random windows of consecutive tokens from one split.

        Args:
            split: "train" or "val".
            batch_size: number of windows B.
            seq_len: tokens per window S; at most the split's length.
            generator: the only source of randomness (window starts are uniform over every offset at
                which a whole window fits); restoring its state reproduces the batch. It may live on any
                device; the batch is always returned on the CPU.

        Returns:
            (B, S) int64 tensor on the CPU.

        Raises:
            ValueError: an unknown split, batch_size < 1, seq_len outside 1..len(split), or a generator that
                is not a torch.Generator.
        """
        data = self._split(split)
        n = len(data)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if seq_len < 1 or seq_len > n:
            raise ValueError(f"seq_len: expected 1..{n} (the {split} split holds {n} tokens), got {seq_len}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator (the batch's only randomness), got "
                             f"{type(generator).__name__}")
        starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=generator,
                               device=generator.device).cpu()                         # (B,)
        index = starts[:, None] + torch.arange(seq_len)                                # (B, S)
        if isinstance(data, torch.Tensor):
            return data[index].long()                                                  # (B, S)
        # Only the B*S ids of the windows are read from the file (see _read_into).
        out = np.empty((batch_size, seq_len), dtype=data.dtype)
        for row, start in zip(out, starts.tolist()):
            _read_into(data, start, row)
        return torch.from_numpy(out.astype(np.int64))                                  # (B, S)

    def encode(self, text: str) -> torch.Tensor:
        """Text to token ids.

        Args:
            text: for the text source any string (encoded as UTF-8 bytes; characters that stand for
                undecodable bytes, as Python decodes a non-UTF-8 command line, become those bytes again); for
                the others the inverse of `decode`: whitespace-separated integer ids.

        Returns:
            (N,) int64 tensor.

        Raises:
            ValueError: text with a character that is neither UTF-8 text nor an escaped byte; for the other
                sources, a token that is not an integer or an id outside [0, vocab_size).
        """
        if self.source == "text":
            try:
                return torch.tensor(list(text.encode("utf-8", "surrogateescape")), dtype=torch.long)
            except UnicodeEncodeError as e:
                raise ValueError(f"encode: the text has a character that is neither UTF-8 text nor an escaped "
                                 f"byte ({e})") from None
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            raise ValueError(f"encode: the {self.source} source has no tokenizer; expected whitespace-separated "
                             f"integer ids, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"encode: ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """Token ids to text.

        Args:
            ids: a 1-D sequence of ids (tensor, numpy array or list).

        Returns:
            The text source: the bytes decoded as UTF-8 with errors="replace" (a window may start or end
            inside a multi-byte character); an id outside 0..255 (e.g. the [MASK] id while sampling)
            becomes U+FFFD. Other sources: the ids as a space-separated string.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.source != "text":
            return " ".join(str(i) for i in ids)
        pieces, run = [], bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                run.append(i)
            else:
                pieces.append(run.decode("utf-8", errors="replace") + "\ufffd")
                run = bytearray()
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats of the split's token frequencies: the loss of a model that ignores context.

        Reads the split once, in chunks, so it is bounded in memory but costs a full pass over a big file.

        Args:
            split: "train" (default) or "val".
        Returns:
            The entropy in nats, a float >= 0.
        Raises:
            ValueError: any other split name.
        """
        data = self._split(split)
        counts = np.zeros(0, dtype=np.int64)
        for lo in range(0, len(data), _SCAN_CHUNK):
            hi = min(lo + _SCAN_CHUNK, len(data))
            if isinstance(data, torch.Tensor):
                chunk = data[lo:hi].numpy()
            else:
                chunk = _read_into(data, lo, np.empty(hi - lo, data.dtype))
            c = np.bincount(chunk.astype(np.int64, copy=False), minlength=len(counts))
            c[:len(counts)] += counts
            counts = c
        return entropy_of_counts(counts)


def entropy_of_counts(counts) -> float:
    """Entropy in nats of the distribution given by non-negative counts (a NumPy array or a tensor).

    Args:
        counts: non-negative counts of any shape (every element is one outcome), array-like or a CPU tensor;
            zeros are skipped.
    Returns:
        -Σ p log p with p = counts / counts.sum(), in float64, as a Python float; 0 when every count is 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum()) + 0.0  # (+ 0.0: one outcome gives -0.0, printed as "-0.0000")


def build_data(cfg: DataConfig, vocab_size: int) -> TokenData:
    """Load the token source that `cfg` names and split it into train and validation.

    Args:
        cfg: the `data` section of the config.
        vocab_size: the model's vocabulary size (real tokens, without [MASK]); every id must be below it.

    Returns:
        A `TokenData` whose train and val splits each hold at least cfg.seq_len + 1 tokens.

    Raises:
        ValueError: unknown source or token_dtype, a missing/empty/ragged file, ids >= vocab_size, a
            vocab_size below 256 for text, a val_fraction outside (0, 1), or a split too short for seq_len.
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source: expected one of {', '.join(SOURCES)}, got {cfg.source!r}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"model vocab_size: expected a positive int, got {vocab_size!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: expected a value in (0, 1), got {cfg.val_fraction}")
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len: expected >= 1, got {cfg.seq_len}")

    if cfg.source == "dummy":
        # Each split holds at least one window of seq_len + 1 tokens (the smaller split is the one below
        # min(val_fraction, 1 - val_fraction); one token more absorbs the floor of the split point).
        # (compared before ceil(): a fraction of 1e-310 makes the quotient inf, which ceil() refuses)
        per_split = (cfg.seq_len + 1) / min(cfg.val_fraction, 1 - cfg.val_fraction)
        least = max(DUMMY_MIN_TOKENS, DUMMY_MIN_WINDOWS * (cfg.seq_len + 1))
        need = max(least, per_split + 1)
        if need > DUMMY_MAX_TOKENS:
            raise ValueError(f"data.val_fraction={cfg.val_fraction} / data.seq_len={cfg.seq_len}: a dummy corpus "
                             f"with one window in each split needs {need:.6g} tokens, more than the "
                             f"{DUMMY_MAX_TOKENS} it is allowed")
        n = max(least, math.ceil(per_split) + 1)
        g = torch.Generator().manual_seed(cfg.seed)
        corpus = torch.randint(0, vocab_size, (n,), generator=g, dtype=torch.long)        # (N,)
        description = f"dummy: {n} uniform random ids in [0, {vocab_size}), seed {cfg.seed}"
    elif cfg.source == "text":
        if vocab_size < BYTE_VOCAB:
            raise ValueError(f"model vocab_size: the byte-level text source needs >= {BYTE_VOCAB} "
                             f"(one id per byte value), got {vocab_size}")
        if cfg.path is None:
            text, origin = default_text()
            corpus = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)  # (N,)
            description = f"text: {origin}, {len(corpus)} bytes"
        else:
            corpus = _memmap(cfg.path, np.uint8)                                          # (N,)
            description = f"text: {cfg.path}, {len(corpus)} bytes"
    else:
        if cfg.path is None:
            raise ValueError("data.path: the tokens source needs a path to a raw uint16/uint32 token file")
        if cfg.token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype: expected one of {', '.join(TOKEN_DTYPES)}, got {cfg.token_dtype!r}")
        corpus = _memmap(cfg.path, TOKEN_DTYPES[cfg.token_dtype])                         # (N,)
        _check_ids(corpus, vocab_size, cfg.path)
        description = f"tokens: {cfg.path}, {len(corpus)} {cfg.token_dtype} ids"

    n = len(corpus)
    n_val = int(n * cfg.val_fraction)
    n_train = n - n_val
    need = cfg.seq_len + 1
    if n_train < need or n_val < need:
        raise ValueError(f"data.seq_len={cfg.seq_len} / data.val_fraction={cfg.val_fraction}: each split needs "
                         f">= {need} tokens, but the {n}-token corpus splits into train={n_train}, val={n_val}")
    if isinstance(corpus, np.memmap):  # a map per split, whose offset attribute says where it lies in the file
        # (a slice of a memmap keeps its base's) and which keeps the file open for _read_into. Nothing is read.
        return TokenData(_memmap(cfg.path, corpus.dtype, 0, n_train), _memmap(cfg.path, corpus.dtype, n_train, n_val),
                         vocab_size, cfg.source, description)
    return TokenData(corpus[:n_train], corpus[n_train:], vocab_size, cfg.source, description)  # views of the tensor


def default_text() -> tuple[str, str]:
    """The default English corpus: Python's documentation topics, else stdlib docstrings.

    Returns:
        (text, origin): the text and a short description of where it came from.

    Raises:
        ValueError: the text found is under MIN_DEFAULT_TEXT_BYTES bytes (set data.path instead).
    """
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError:
        topics = None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if topics:
        # Sorted keys: the dict's order is the generator script's, not a promise.
        text = "\n\n".join(topics[k] for k in sorted(topics))
        origin = f"Python {version} documentation topics (pydoc_data.topics)"
    else:
        text = _stdlib_docstrings()
        origin = f"Python {version} stdlib docstrings ({len(FALLBACK_DOC_MODULES)} modules; no pydoc_data)"
    size = len(text.encode("utf-8"))
    if size < MIN_DEFAULT_TEXT_BYTES:
        raise ValueError(f"data.path: the default text ({origin}) is only {size} bytes, under "
                         f"{MIN_DEFAULT_TEXT_BYTES}; set data.path to a UTF-8 text file")
    return text, origin


def _stdlib_docstrings() -> str:
    parts, seen = [], set()
    # typing.io / typing.re warn when touched; reading their docstrings is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in FALLBACK_DOC_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in objects:
                # Classes and routines only: inspect.getdoc of a constant returns its type's docstring.
                if obj is not module and not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                doc = inspect.getdoc(obj)
                if doc and doc not in seen:  # re-exported objects would repeat their docstrings
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts)


def _memmap(path: str, dtype, start: int = 0, count: int | None = None) -> np.memmap:
    """Read-only memmap of items [start, start + count) (count None: to the end) of a raw file of `dtype`
    items, with the errors a user can act on, holding the file open for _read_into (attribute source_fd)."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ValueError(f"data.path: {path} is a directory; name a file in it")
        if os.path.exists(path):  # a pipe (bash's <(zcat corpus.gz)), a device: np.memmap maps regular files only
            raise ValueError(f"data.path: {path} is not a regular file (a pipe or a device?); the data is "
                             f"memory-mapped: write it to a file first")
        where = "" if os.path.isabs(path) else f" (relative to the working directory, {os.getcwd()})"
        raise ValueError(f"data.path: no such file: {path}{where}")
    size = os.path.getsize(path)
    itemsize = np.dtype(dtype).itemsize
    if size == 0:
        raise ValueError(f"data.path: the file is empty: {path}")  # np.memmap cannot map 0 bytes
    if size % itemsize:
        raise ValueError(f"data.path: {path} is {size} bytes, not a multiple of the {itemsize}-byte "
                         f"{np.dtype(dtype).name} item size (wrong data.token_dtype?)")
    if count is None:
        count = size // itemsize - start
    m = np.memmap(path, dtype=dtype, mode="r", offset=start * itemsize, shape=(count,))
    m.source_fd = os.open(path, os.O_RDONLY)  # the file this map reads, even if the path is renamed or replaced
    weakref.finalize(m, os.close, m.source_fd)
    return m


def _read_into(m, lo: int, out: np.ndarray) -> np.ndarray:
    """out[:] = m[lo:lo + len(out)], returning out. A split built by _memmap with a count is read with pread:
    pages read through a map stay in this process's resident set until it is unmapped (with the kernel's
    readahead around each one), and the splits' maps live as long as the run, so reading through them grew
    the RSS to the whole file (the id check and unigram_entropy read all of it; random windows reach every
    page over a long run). Read with pread, the file's pages stay in the page cache only. Anything else (a
    tensor, a TokenData built by hand from other memmaps; no preadv on Windows) is read by indexing."""
    fd = getattr(m, "source_fd", None)
    if fd is None or not hasattr(os, "preadv") or not isinstance(m.base, mmap.mmap):
        out[:] = np.asarray(m[lo:lo + len(out)])
        return out
    view, pos, done = memoryview(out).cast("B"), m.offset + lo * m.itemsize, 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n <= 0:
            raise ValueError(f"data.path: {m.filename} is shorter than when it was opened (truncated while in use?)")
        done += n
    return out


def _check_ids(tokens: np.memmap, vocab_size: int, path: str) -> None:
    """Every id must be < vocab_size.

    The exact max over the whole file, in chunks, rather than a sample: one bad id would surface much
    later as an out-of-range embedding lookup (a CUDA device-side assert with no file name), and a
    sequential read costs seconds even for billions of tokens.
    """
    if vocab_size > np.iinfo(tokens.dtype).max:
        return  # no id of this dtype can reach vocab_size
    for lo in range(0, len(tokens), _SCAN_CHUNK):
        chunk = _read_into(tokens, lo, np.empty(min(_SCAN_CHUNK, len(tokens) - lo), tokens.dtype))
        top = int(chunk.max())
        if top >= vocab_size:
            at = int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"data.path: {path} holds id {int(chunk[at])} >= model vocab_size {vocab_size} "
                             f"(first at token {lo + at}); wrong data.token_dtype or model.vocab_size?")
