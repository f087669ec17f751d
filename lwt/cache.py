"""The layer-wise trainer's activation cache: block k's outputs on disk, read back as block k+1's inputs.

After stage k the trainer pushes `cache_sequences x cache_draws` (= N) masked sequences through the
frozen prefix and writes, for each entry, block k's output together with the tokens, the mask and the t
that produced it, so stage k+1 trains on exactly the inputs the objective drew. Each rank of a
data-parallel run writes and reads only its own shard; shards of different ranks share a directory and
never touch each other's files.

Layout of one shard (rank r) in its stage directory, e.g. `<cache_dir>/stage0/`; raw little-endian
C-order arrays with no header, so `numpy.memmap` maps them directly:

    rank{r}.hidden.bin     (N, S, D)  float32 | float16 | bfloat16 stored as its uint16 bit pattern
                                      (numpy has no bfloat16; the bits come back with a torch .view)
    rank{r}.tokens.bin     (N, S)     int32    the unmasked token ids
    rank{r}.mask.bin       (N, S)     uint8    1 where the token was replaced by [MASK]
    rank{r}.t.bin          (N,)       float32  the mask fraction t drawn for the sequence
    rank{r}.manifest.json             format version, rank, entries, seq_len, d_model, dtype, the
                                      trainer's meta dict, and per file: numpy dtype, shape, byte size,
                                      sha256

Guarantees:
- A shard is valid only when its manifest exists, and the manifest is written last: data files are
  written under `*.partial` names, flushed and fsynced, renamed into place, and only then is the manifest
  written (temp file, fsync, `os.replace`, directory fsync). A crash or an abort at any point leaves no
  manifest, so `ActivationCache.open` refuses the shard instead of reading half of it. Rewriting a shard
  removes its old manifest before replacing the old files, so old and new files are never paired.
- `ActivationCache.open` checks the manifest against what the trainer expects (shape, dtype, stage,
  config fingerprint, ...), each file's size, and each file's sha256 (streamed, never loaded whole), so a
  cache left by another config or damaged on disk is an error, never silently wrong inputs.
- The writer reserves the whole shard on disk when it is created (`posix_fallocate`), so a full disk
  fails before the stage's forward passes run rather than halfway through them.

Errors: shape, count, expectation mismatches and corrupt files are `ValueError`; a missing manifest or
data file is `FileNotFoundError`; not enough free disk space is `DiskSpaceError`, a `RuntimeError` (an
environment problem, not bad input); using a writer after finish()/abort() is `RuntimeError`.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import numbers
import os
import shutil
import weakref
from typing import Iterator

import numpy as np
import torch

FORMAT = "lwt-activation-cache"
VERSION = 1
CHECKSUM = "sha256"  # hashlib's sha256 uses the CPU's SHA extensions: ~2x blake2b's throughput on x86
PARTIAL = ".partial"

# Free space kept beyond the shard itself: the manifest, filesystem metadata, and whatever else the run
# writes to the same disk meanwhile (logs, checkpoints); a disk filled to the last byte fails elsewhere.
DISK_MARGIN_BYTES = 64 << 20

# Read size when streaming a file through the checksum: big enough for full disk throughput, small
# enough that verifying a 100 GB shard costs 16 MiB of RAM.
_HASH_CHUNK = 16 << 20

# torch dtype of the hidden states -> (name in the manifest, numpy dtype of the stored bits)
_HIDDEN_DTYPES = {
    torch.float32: ("float32", np.dtype(np.float32)),
    torch.float16: ("float16", np.dtype(np.float16)),
    torch.bfloat16: ("bfloat16", np.dtype(np.uint16)),
}
_DTYPE_BY_NAME = {name: dt for dt, (name, _) in _HIDDEN_DTYPES.items()}
_FILES = ("hidden", "tokens", "mask", "t")
# Manifest fields that `expect` may name directly; any other key is looked up in the trainer's meta.
_TOP_LEVEL_KEYS = ("entries", "seq_len", "d_model", "dtype", "rank")


def _layout(entries: int, seq_len: int, d_model: int, dtype: torch.dtype) -> dict[str, tuple[np.dtype, tuple]]:
    """numpy dtype and shape of each file of a shard; the one definition the writer, reader and
    cache_bytes share."""
    return {
        "hidden": (_HIDDEN_DTYPES[dtype][1], (entries, seq_len, d_model)),
        "tokens": (np.dtype(np.int32), (entries, seq_len)),
        "mask": (np.dtype(np.uint8), (entries, seq_len)),
        "t": (np.dtype(np.float32), (entries,)),
    }


def _nbytes(np_dtype: np.dtype, shape: tuple) -> int:
    return int(np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)))


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in _HIDDEN_DTYPES:
        raise ValueError(f"dtype: expected one of torch.float32, torch.float16, torch.bfloat16, got {dtype!r}")
    return dtype


def _file_name(rank: int, part: str) -> str:
    return f"rank{rank}.{part}.bin" if part in _FILES else f"rank{rank}.{part}.json"


def _fsync_dir(directory: str) -> None:
    """Make renames in `directory` durable: a rename is a directory update, which the file's own fsync
    does not cover. Not possible on every OS (Windows cannot open a directory), where it is skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_errors(path: str):
    """Give `path` to an OSError raised inside that names no file: write, flush, fsync and fallocate errors
    (EIO, ENOSPC, EDQUOT at close on NFS) would otherwise reach the user as a bare "[Errno 5] Input/output
    error"."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from e


def cache_bytes(entries: int, seq_len: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes on disk of one shard (the manifest, a few kB, not counted).

    Args:
        entries: cached entries N of the shard (sequences x mask draws on this rank).
        seq_len: tokens per entry S.
        d_model: hidden size D.
        dtype: torch dtype of the stored hidden states (float32, float16 or bfloat16).

    Returns:
        N*S*D*itemsize (hidden) + N*S*4 (int32 tokens) + N*S (uint8 mask) + N*4 (float32 t).

    Raises:
        ValueError: any other dtype.
    """
    _check_dtype(dtype)
    return sum(_nbytes(dt, shape) for dt, shape in _layout(entries, seq_len, d_model, dtype).values())


class DiskSpaceError(RuntimeError):
    """Not enough free disk space for an activation cache (the message names the directory, the bytes
    needed and the bytes free)."""


def remove_partials(directory, rank: int) -> None:
    """Delete the temporary files that a writer of rank `rank` left in `directory` when it crashed (a
    writer reserves its whole shard up front, so they hold a shard's worth of disk). Call it only where no
    writer of that rank is running. A missing directory holds none.

    Args:
        directory: a stage's cache directory (str or path-like); it need not exist.
        rank: the data-parallel rank whose rank{rank}.*.partial files are deleted; other ranks' are kept.
    """
    directory = glob.escape(os.path.abspath(os.fspath(directory)))
    for path in glob.glob(os.path.join(directory, f"rank{rank}.*{PARTIAL}")):
        os.remove(path)


def check_disk_space(directory, nbytes: int, what: str = "") -> None:
    """Fail early, with a clear message, when `nbytes` will not fit on the disk holding `directory`.

    The directory need not exist yet: the free space is read from its nearest existing parent. When
    several ranks of a node write to one filesystem, pass the bytes of all their shards.

    Args:
        directory: where the files will be written.
        nbytes: bytes about to be written; DISK_MARGIN_BYTES more must be free.
        what: what those bytes are, for the message (e.g. "2 shards of 8.1 MiB, one per rank writing here").

    Raises:
        DiskSpaceError (a RuntimeError): naming the directory, the bytes needed and the bytes free.
    """
    path = os.path.abspath(os.fspath(directory))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes) + DISK_MARGIN_BYTES
    if need > free:
        raise DiskSpaceError(
            f"not enough disk space for the activation cache in {path}: needs {need} bytes "
            f"({need / 2**30:.2f} GiB{': ' + what if what else ''}, and a {DISK_MARGIN_BYTES >> 20} MiB margin), "
            f"{free} bytes ({free / 2**30:.2f} GiB) free on the disk holding {probe}. Free space, point "
            f"train.cache_dir at a bigger disk (a resumed run may move it), or lower train.cache_sequences / "
            f"train.cache_draws (a new run: a resumed one keeps them)")


class CacheWriter:
    """Writes one rank's shard of one stage, in order, and publishes it atomically with finish().

    Use as `with CacheWriter(...) as w: ...; w.finish()`: an exception inside the block, or leaving it
    without finish(), removes the temporary files and publishes nothing.
    """

    def __init__(self, directory, rank: int, entries: int, seq_len: int, d_model: int, dtype: torch.dtype,
                 meta: dict):
        """Create the stage directory and reserve the shard's files under temporary names.

        Args:
            directory: the stage's cache directory, e.g. <cache_dir>/stage0; created if missing.
            rank: data-parallel rank; selects the file names, so ranks never collide.
            entries: rows N the shard will hold; finish() requires exactly this many.
            seq_len: S of every row. d_model: D of every row.
            dtype: torch dtype the hidden states are stored in (float32, float16, bfloat16).
            meta: JSON-serialisable dict stored in the manifest (stage, config fingerprint, draws, ...);
                ActivationCache.open(expect=...) checks its keys. Keys named like the manifest's own
                fields (entries, seq_len, d_model, dtype, rank) must agree with them.

        Raises:
            ValueError: bad sizes, dtype or meta. DiskSpaceError (a RuntimeError): not enough disk space.
        """
        rank, entries, seq_len, d_model = (_int_at_least(name, value, low) for name, value, low in (
            ("rank", rank, 0), ("entries", entries, 1), ("seq_len", seq_len, 1), ("d_model", d_model, 1)))
        self.dtype = _check_dtype(dtype)
        try:
            # Round-trip now, so what open() compares against is what the manifest will hold (tuples
            # become lists) and a non-JSON value fails here, not after the whole stage ran.
            self.meta = _json_round_trip(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta: must be a JSON-serialisable dict, got {meta!r} ({e})") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta: expected a dict, got {type(meta).__name__}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.rank, self.entries, self.seq_len, self.d_model = rank, entries, seq_len, d_model
        # meta may repeat a manifest field (the trainer passes its whole `expect` dict), but not
        # contradict it: open() reads those keys from the manifest's own fields.
        own = {"rank": rank, "entries": entries, "seq_len": seq_len, "d_model": d_model,
               "dtype": _HIDDEN_DTYPES[dtype][0]}
        for key in sorted(set(self.meta) & set(own)):
            if _normalize_expected(key, meta[key]) != own[key]:
                raise ValueError(f"meta: {key}={meta[key]!r} contradicts the writer's {key}={own[key]!r}")
        self.rows = 0
        self._layout = _layout(entries, seq_len, d_model, dtype)
        self._final = {p: os.path.join(self.directory, _file_name(rank, p)) for p in _FILES}
        self._tmp = {p: path + PARTIAL for p, path in self._final.items()}
        self._files: dict = {}
        self._ids: dict = {}  # (st_dev, st_ino) of each temporary file: another writer's is never touched
        self._hash = {p: hashlib.new(CHECKSUM) for p in _FILES}
        self._state = "open"

        # A crashed writer's leftovers first (their space counts as free), and the check before the directory
        # is made: a failed check leaves nothing behind.
        remove_partials(self.directory, rank)
        check_disk_space(self.directory, cache_bytes(entries, seq_len, d_model, dtype))
        os.makedirs(self.directory, exist_ok=True)
        try:
            for part, (np_dtype, shape) in self._layout.items():
                f = open(self._tmp[part], "wb")
                self._files[part] = f
                st = os.fstat(f.fileno())
                self._ids[part] = (st.st_dev, st.st_ino)
                self._reserve(f, _nbytes(np_dtype, shape))
        except BaseException:
            self.abort()
            raise

    def _reserve(self, f, size: int) -> None:
        """Allocate the file's blocks now. A sparse file (plain truncate) would defer ENOSPC to some
        write in the middle of the stage; fallocate makes a full disk fail here."""
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                return
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    free = shutil.disk_usage(self.directory).free
                    raise DiskSpaceError(
                        f"not enough disk space for the activation cache in {self.directory}: reserving "
                        f"{size} bytes for {f.name} failed with {free} bytes free") from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise OSError(e.errno, e.strerror, f.name) from e
        f.truncate(size)  # filesystem without fallocate: size only, space is claimed as rows arrive

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if self._state != "finished":
            self.abort()
            raise RuntimeError(f"CacheWriter for {self._final['hidden']} left its `with` block without "
                               f"finish(); the shard was discarded")
        return False

    def _owns(self, part: str) -> bool:
        """Whether the temporary path of `part` still names the file this writer created."""
        st = _stat_or_none(self._tmp[part])
        return st is not None and (st.st_dev, st.st_ino) == self._ids.get(part)

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"CacheWriter for {self._final['hidden']} is already {self._state}")

    def append(self, hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> None:
        """Write the next B rows. Rows are stored in the order they are appended.

        Args:
            hidden: (B, S, D) floating, any device and dtype; stored rounded to the writer's dtype.
            tokens: (B, S) integer token ids (must fit int32).
            mask: (B, S) bool, True where the token was masked.
            t: (B,) floating mask fractions.

        Raises:
            ValueError: a shape or dtype does not match, a token id is outside [0, 2**31), or the rows would
                exceed `entries`.
            RuntimeError: the writer was already finished or aborted.
        """
        self._check_open()
        S, D = self.seq_len, self.d_model
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[1:]) != (S, D):
            raise ValueError(f"hidden: expected shape (B, {S}, {D}), got {_shape(hidden)}")
        B = hidden.shape[0]
        for name, x, shape in (("tokens", tokens, (B, S)), ("mask", mask, (B, S)), ("t", t, (B,))):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape} (B={B} from hidden), got {_shape(x)}")
        if not hidden.dtype.is_floating_point:
            raise ValueError(f"hidden: expected a floating dtype, got {hidden.dtype}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected an integer dtype, got {tokens.dtype}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected torch.bool, got {mask.dtype}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"t: expected a floating dtype, got {t.dtype}")
        if self.rows + B > self.entries:
            raise ValueError(f"append: {B} rows would make {self.rows + B}, more than the {self.entries} "
                             f"entries this shard was created for")
        if B == 0:
            return
        tokens = tokens.detach().to("cpu", torch.int64)  # (torch has no min/max of uint16, uint32, uint64)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(np.int32).max):
            raise ValueError(f"tokens: ids must lie in [0, 2**31), got [{int(tokens.min())}, {int(tokens.max())}]")

        # Round on the source device first: a bf16 copy off the GPU moves half the bytes of an fp32 one.
        bits = hidden.detach().to(self.dtype).to("cpu").contiguous()
        if self.dtype == torch.bfloat16:
            bits = bits.view(torch.int16)  # same 16 bits; numpy can hold them, it cannot hold bf16
        arrays = {
            "hidden": bits.numpy(),
            "tokens": tokens.to(torch.int32).contiguous().numpy(),
            "mask": mask.detach().to("cpu").contiguous().numpy().view(np.uint8),
            "t": t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy(),
        }
        for part, arr in arrays.items():
            # Rows arrive in file order, so hashing what is written gives the file's checksum without
            # reading the shard back in finish().
            view = memoryview(np.ascontiguousarray(arr)).cast("B")
            with naming_errors(self._tmp[part]):
                self._files[part].write(view)
            self._hash[part].update(view)
        self.rows += B

    def finish(self) -> dict:
        """Flush and fsync the files, rename them into place, then write the manifest atomically.

        Returns:
            The manifest (as written to rank{r}.manifest.json).

        Raises:
            ValueError: fewer than `entries` rows were appended (the writer stays open).
            RuntimeError: the writer was already finished or aborted, or another writer deleted or replaced
                one of its temporary files (nothing is published).
        """
        self._check_open()
        if self.rows != self.entries:
            raise ValueError(f"finish: {self.rows} rows appended, the shard was created for {self.entries}")
        files = {}
        for part in _FILES:
            f = self._files[part]
            with naming_errors(self._tmp[part]):
                f.flush()
                os.fsync(f.fileno())
            if not self._owns(part):
                raise RuntimeError(f"{self._tmp[part]} was deleted or replaced while this writer held it: another "
                                   f"writer of rank {self.rank} used {self.directory} (two runs sharing one "
                                   f"train.cache_dir?); the shard was not published")
            size = f.tell()
            f.close()
            np_dtype, shape = self._layout[part]
            assert size == _nbytes(np_dtype, shape), (part, size)  # every row written, in order
            files[part] = {"name": os.path.basename(self._final[part]), "dtype": np_dtype.name,
                           "shape": list(shape), "bytes": size, CHECKSUM: self._hash[part].hexdigest()}
        self._files = {}
        manifest = {
            "format": FORMAT, "version": VERSION, "rank": self.rank, "entries": self.entries,
            "seq_len": self.seq_len, "d_model": self.d_model, "dtype": _HIDDEN_DTYPES[self.dtype][0],
            "checksum": CHECKSUM, "meta": self.meta, "files": files,
        }
        manifest_path = os.path.join(self.directory, _file_name(self.rank, "manifest"))
        # An old shard of this rank stops being valid before any of its files is replaced: otherwise a
        # crash between the renames below could leave an old manifest beside new files.
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
            _fsync_dir(self.directory)
        for part in _FILES:
            os.replace(self._tmp[part], self._final[part])
        _fsync_dir(self.directory)  # the data files are in place before the manifest can be
        tmp = manifest_path + PARTIAL
        with naming_errors(tmp), open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path)
        _fsync_dir(self.directory)
        self._state = "finished"
        return manifest

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is published. Safe to call more than once, and
        a no-op after finish()."""
        if self._state == "finished":
            return
        for f in self._files.values():
            f.close()
        self._files = {}
        for part, path in self._tmp.items():
            if not self._owns(part):
                continue  # gone, or another writer's file now
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._state = "aborted"


def _stat_or_none(path: str):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _int_at_least(name: str, value, low: int) -> int:
    """Python or numpy integer (not bool) >= low, as an int; sizes often come out of numpy arithmetic."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _numpy_scalar(value):
    """json.dumps's `default`: NumPy scalars as Python numbers (sizes often come out of numpy arithmetic)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_round_trip(value):
    """`value` as a manifest holds it: tuples become lists, NumPy scalars Python numbers."""
    return json.loads(json.dumps(value, default=_numpy_scalar))


def _normalize_expected(key: str, value):
    """Expected values as the manifest spells them: dtype as its name, tuples as lists."""
    if key == "dtype":
        if isinstance(value, torch.dtype):
            return _HIDDEN_DTYPES[value][0] if value in _HIDDEN_DTYPES else str(value)
        return str(value).removeprefix("torch.")
    return _json_round_trip(value)


class ActivationCache:
    """One rank's shard of one stage, verified and memory-mapped read-only. Build it with open()
    (the constructor raises TypeError); len() is the number of entries.

    Attributes:
        entries, seq_len, d_model: N, S and D of the shard.
        dtype: torch dtype of the stored hidden states (float32, float16 or bfloat16).
        meta: the writer's meta dict, as the manifest holds it. manifest: the whole manifest dict.
        directory, rank: where the shard lives (an absolute path) and whose it is.
    """

    entries: int
    seq_len: int
    d_model: int
    dtype: torch.dtype
    meta: dict

    def __init__(self, *_args, **_kwargs):
        raise TypeError("use ActivationCache.open(directory, rank, expect)")

    @classmethod
    def open(cls, directory, rank: int, expect: dict, verify: bool = True) -> "ActivationCache":
        """Open rank `rank`'s shard in `directory` after checking it is the cache the caller expects.

        Args:
            directory: the stage's cache directory (what CacheWriter was given).
            rank: data-parallel rank whose shard to read.
            expect: manifest values that must match, e.g. {"entries": N, "seq_len": S, "d_model": D,
                "dtype": torch.bfloat16 or "bfloat16", "stage": k, "fingerprint": "..."}. entries,
                seq_len, d_model, dtype and rank are the manifest's own fields; any other key is looked
                up in the writer's meta.
            verify: stream every file through its checksum (reads the whole shard once). Sizes are
                always checked.

        Returns:
            The open cache; attributes entries, seq_len, d_model, dtype (torch dtype), meta, manifest.

        Raises:
            FileNotFoundError: the manifest or a data file is missing (the stage never finished writing).
            ValueError: an `expect` item differs, or the manifest or a file is corrupt.
        """
        rank = _int_at_least("rank", rank, 0)  # (a "0" from the environment would name rank 0's file)
        directory = os.path.abspath(os.fspath(directory))
        manifest_path = os.path.join(directory, _file_name(rank, "manifest"))
        rerun = (f"delete the cache directory {directory} and continue the run with --resume (the trainer "
                 f"rebuilds a missing cache from the checkpoint)")
        if not os.path.exists(manifest_path):
            partial = sorted(n for n in os.listdir(directory) if n.startswith(f"rank{rank}.")
                             and n.endswith(PARTIAL)) if os.path.isdir(directory) else []
            why = (f"a writer of this shard did not finish (temporary files {partial} present)" if partial
                   else "the stage that writes this shard has not finished")
            raise FileNotFoundError(f"activation cache manifest {manifest_path} not found: {why}; rerun it")
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"activation cache manifest {manifest_path} is unreadable ({e}); {rerun}") from None

        def corrupt(what: str) -> ValueError:
            return ValueError(f"activation cache manifest {manifest_path} is corrupt: {what}; {rerun}")

        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise corrupt(f"not an {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(f"activation cache manifest {manifest_path} has format version "
                             f"{manifest.get('version')!r}, this lwt reads version {VERSION}; {rerun}")
        try:
            entries, seq_len, d_model = (int(manifest[k]) for k in ("entries", "seq_len", "d_model"))
            dtype = _DTYPE_BY_NAME[manifest["dtype"]]
            meta, files = manifest["meta"], manifest["files"]
            layout = _layout(entries, seq_len, d_model, dtype)
            recs = {part: files[part] for part in layout}
            mismatched = [(part, rec) for part, rec in recs.items()
                          if (rec["name"] != _file_name(rank, part) or rec["dtype"] != layout[part][0].name
                              or tuple(rec["shape"]) != layout[part][1] or rec["bytes"] != _nbytes(*layout[part]))]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"missing or malformed field ({type(e).__name__}: {e})") from None
        if mismatched:
            part, rec = mismatched[0]
            raise corrupt(f"entry for {part!r} ({rec}) does not match entries={entries}, "
                          f"seq_len={seq_len}, d_model={d_model}, dtype={manifest['dtype']}")
        if not isinstance(meta, dict):
            raise corrupt(f"its meta is a {type(meta).__name__}, not a dict")
        algo = manifest.get("checksum", CHECKSUM)
        if (not isinstance(algo, str) or algo not in hashlib.algorithms_available
                or not hashlib.new(algo).digest_size):  # shake_*: variable length, no plain hexdigest()
            raise corrupt(f"unknown checksum algorithm {algo!r}")
        if manifest.get("rank") != rank:
            raise corrupt(f"it is rank {manifest.get('rank')!r}'s manifest under rank {rank}'s name")

        for key, want in expect.items():
            want = _normalize_expected(key, want)
            if key in _TOP_LEVEL_KEYS:
                found = manifest[key]
            elif key in meta:
                found = meta[key]
            else:
                raise ValueError(f"activation cache {manifest_path}: expected {key}={want!r}, found no "
                                 f"{key!r} in the manifest; {rerun}")
            if found != want:
                raise ValueError(f"activation cache {manifest_path} does not match this run: {key} "
                                 f"expected {want!r}, found {found!r}; {rerun}")

        paths = {part: os.path.join(directory, files[part]["name"]) for part in _FILES}
        for part, path in paths.items():
            if not os.path.exists(path):
                raise FileNotFoundError(f"activation cache file {path} (listed in {manifest_path}) not "
                                        f"found; {rerun}")
            size, want = os.path.getsize(path), files[part]["bytes"]
            if size != want:
                raise ValueError(f"activation cache file {path} is corrupt: {size} bytes, its manifest "
                                 f"says {want} (truncated or overwritten); {rerun}")
        if verify:
            for part, path in paths.items():
                got, want = _file_digest(path, algo), files[part].get(algo)
                if got != want:
                    raise ValueError(f"activation cache file {path} is corrupt: {algo} {got} differs from "
                                     f"its manifest's {want}; {rerun}")

        self = object.__new__(cls)
        self.directory, self.rank, self.manifest = directory, rank, manifest
        self.entries, self.seq_len, self.d_model, self.dtype, self.meta = entries, seq_len, d_model, dtype, meta
        self._maps = {part: np.memmap(paths[part], dtype=np_dtype, mode="r", shape=shape)
                      for part, (np_dtype, shape) in layout.items()}
        # What _fresh_maps maps again: file objects, not bare descriptor numbers, so a closed one raises
        # instead of reaching whatever file later reuses its number.
        files: list = []
        try:
            for part in layout:
                files.append(open(paths[part], "rb", buffering=0))
        except BaseException:
            _close_all(files)
            raise
        self._files = dict(zip(layout, files))
        self._close_files = weakref.finalize(self, _close_all, files)
        return self

    def __reduce__(self):
        # A copy would share (copy.copy) or duplicate as bare numbers (deepcopy, pickle) the open files,
        # which close() or garbage collection of the original closes under it.
        raise TypeError(f"an ActivationCache cannot be copied or pickled; call ActivationCache.open"
                        f"({self.directory!r}, {self.rank}, ...) again")

    def __len__(self) -> int:
        return self.entries

    def _to_torch(self, rows: dict[str, np.ndarray]) -> tuple:
        hidden = rows["hidden"]
        if self.dtype == torch.bfloat16:
            hidden = torch.from_numpy(hidden.view(np.int16)).view(torch.bfloat16)
        else:
            hidden = torch.from_numpy(hidden)
        return (hidden,
                torch.from_numpy(rows["tokens"]).to(torch.int64),
                torch.from_numpy(rows["mask"].view(np.bool_)),
                torch.from_numpy(rows["t"]))

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy the rows `index` out of the memory maps.

        Args:
            index: (B,) integer tensor of entry numbers in [0, entries), any device; repeats allowed.

        Returns:
            hidden (B, S, D) in the stored dtype, tokens (B, S) int64, mask (B, S) bool, t (B,) float32,
            all on the CPU (the caller moves them, e.g. with pin_memory/non_blocking).

        Raises:
            ValueError: index is not a 1-D integer tensor, or an entry is outside [0, entries).
            RuntimeError: the cache was closed.
        """
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index: expected a 1-D integer tensor, got {index.dtype} of shape {tuple(index.shape)}")
        self._check_mapped()
        idx = index.to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.entries):
            # numpy would wrap negative indices silently; an out-of-range entry is a trainer bug
            raise ValueError(f"index: entries must lie in [0, {self.entries}), got [{idx.min()}, {idx.max()}]")
        # Fancy indexing on a memmap reads just these rows and returns an ordinary (writable) array.
        return self._to_torch({part: m[idx] for part, m in self._fresh_maps().items()})

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every entry once, in order, `chunk` rows at a time (the last chunk may be shorter).

        Args:
            chunk: rows per chunk, >= 1.

        Yields:
            (start, hidden, tokens, mask, t) for rows [start, start + len): the same types as batch().

        Raises:
            ValueError: chunk is not an int >= 1. RuntimeError: the cache was closed. Both at the call,
                not at the first next().
        """
        chunk = _int_at_least("chunk", chunk, 1)  # checked at the call, not at the first next()
        self._check_mapped()
        return self._chunks(chunk)

    def _chunks(self, chunk: int):
        for start in range(0, self.entries, chunk):
            stop = min(start + chunk, self.entries)
            # np.array copies: the tensors must not keep the read-only map alive or be non-writable.
            yield (start, *self._to_torch({part: np.array(m[start:stop]) for part, m in self._fresh_maps().items()}))

    def _fresh_maps(self) -> dict[str, np.memmap]:
        """The shard's files mapped again, unmapped when the caller drops the maps. Pages read through a
        map stay in this process's resident set until it is unmapped (with the kernel's readahead around
        each): reading through the maps open() made, which live as long as the stage, grew the RSS by the
        whole shard over a stage (random rows reach every page). Read through short-lived maps, they stay
        in the page cache only."""
        self._check_mapped()
        maps = {}
        for part, m in self._maps.items():
            # (a map keeps a file descriptor of its own)
            maps[part] = np.memmap(self._files[part], dtype=m.dtype, mode="r", shape=m.shape)
        return maps

    def _check_mapped(self) -> None:
        if not self._maps:
            raise RuntimeError(f"ActivationCache of rank {self.rank} in {self.directory} is closed")

    def close(self) -> None:
        """Drop the memory maps and close the files (they also go when the object is garbage collected)."""
        self._maps, self._files = {}, {}
        self._close_files()


def _close_all(files: list) -> None:
    for f in files:
        f.close()


def _file_digest(path: str, algo: str) -> str:
    """Checksum of a file, streamed in _HASH_CHUNK reads."""
    h = hashlib.new(algo)
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
