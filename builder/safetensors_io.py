"""A small safetensors reader that returns float32 numpy arrays, bfloat16 included (which
`safetensors.numpy` cannot read), or reads a tensor as stored straight into a buffer of the
caller's, and names the file and tensor when a file is damaged; and a writer that copies
each tensor from its array into the file, past the page cache where the file is large."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import InputError

# The float dtypes, by their safetensors codes, as numpy (and ml_dtypes) name them.
_FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "BF16": "bfloat16"}
_CODES = {name: code for code, name in _FLOAT_DTYPES.items()}
# The order `safetensors` writes tensors in (wider types first, so that every tensor starts at
# a multiple of its item size; then by name). The writer keeps it: its files are byte for byte
# those of `safetensors.numpy.save_file`.
_RANK = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}
MAX_HEADER = 100 << 20
# Bytes hashed, and written with `write` calls, at a time.
WRITE_CHUNK = 16 << 20
# Files of this many bytes or more are written past the page cache (`_write_direct`).
DIRECT_MIN = 64 << 20
# Bytes gathered and written at a time with direct I/O: a multiple of DIRECT_ALIGN.
DIRECT_CHUNK = 32 << 20
# What direct I/O asks of a write's buffer address, file offset and length: a multiple of
# the device's logical block size (at most the page size).
DIRECT_ALIGN = 4096
# Direct writes in flight at a time (the disk's queue; the gathering goes on beside them).
DIRECT_QUEUE = 2
# What `posix_fallocate` raises where the file system cannot reserve space up front.
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def _ints(value: object, count: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    )


def _well_formed(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and _ints(entry.get("shape"))
        and _ints(entry.get("data_offsets"), 2)
    )


class SafetensorsFile:
    """The header of one file, read eagerly; tensors are read from a memory map on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
                (size,) = struct.unpack("<Q", head)
                if size > MAX_HEADER:
                    raise InputError(f"{path}: not a safetensors file (header of {size} bytes)")
                header = f.read(size)
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror}") from e
        try:
            meta = json.loads(header)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a safetensors file (its header is not JSON)") from e
        if not isinstance(meta, dict):
            raise InputError(f"{path}: not a safetensors file (its header is not a JSON object)")
        meta.pop("__metadata__", None)
        self.data_start = 8 + size
        self.file_size = path.stat().st_size
        self.entries: dict[str, dict] = meta
        for name, entry in meta.items():
            if not _well_formed(entry):
                raise InputError(
                    f"{path}: not a safetensors file (tensor {name!r} needs a dtype string, "
                    "a shape of non-negative integers and two integer data_offsets)"
                )
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end or self.data_start + end > self.file_size:
                raise InputError(
                    f"{path}: tensor {name!r} lies past the end of the file "
                    f"({self.file_size} bytes): the file is truncated"
                )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """The tensor's dtype as numpy (and ml_dtypes) name it: "float32", "bfloat16"..."""
        stored = self.entries[name]["dtype"]
        return _FLOAT_DTYPES.get(stored, stored)

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = entry["dtype"]
        if dtype not in _FLOAT_DTYPES:
            raise InputError(
                f"{self.path}: tensor {name!r} has dtype {dtype}; expected one of "
                f"{sorted(_FLOAT_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        with self.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            # bfloat16 as its raw 16 bits (numpy has no bfloat16), widened below.
            stored = np.dtype(np.uint16 if dtype == "BF16" else _FLOAT_DTYPES[dtype])
            raw = np.frombuffer(
                m, stored, (end - begin) // stored.itemsize, self.data_start + begin
            )
            if raw.size != int(np.prod(shape)):
                raise InputError(
                    f"{self.path}: tensor {name!r} holds {raw.size} values, its shape "
                    f"{list(shape)} needs {int(np.prod(shape))}"
                )
            if dtype == "BF16":
                out = (raw.astype(np.uint32) << 16).view(np.float32)
            else:
                out = raw.astype(np.float32)
            del raw  # release the buffer before the map closes
        return out.reshape(shape)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Tensor `name`'s bytes, as stored, into `out` (C-contiguous and writable, with the
        tensor's dtype and shape): one read from the file, no array in between, so a buffer
        that is a view of another runtime's tensor gets the values where that runtime reads
        them."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        stored = self.dtype(name)
        if (stored, tuple(entry["shape"])) != (out.dtype.name, out.shape):
            raise InputError(
                f"{self.path}: tensor {name!r} is {stored} {entry['shape']}; expected "
                f"{out.dtype.name} {list(out.shape)}"
            )
        if end - begin != out.nbytes:
            raise InputError(
                f"{self.path}: tensor {name!r}, {stored} {entry['shape']}, takes {out.nbytes} "
                f"bytes; the file holds {end - begin} for it"
            )
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise InputError(f"{self.path}: tensor {name!r} is cut short: the file is truncated")


def write(path: Path, tensors: dict[str, np.ndarray]) -> str:
    """Write `tensors` (float64, float32, float16 or bfloat16) to `path` as a safetensors file,
    with no copy of the file in memory, and return its sha256, computed from the arrays on a
    thread of its own while they are written, so no one has to read the file back to hash it.

    A file of DIRECT_MIN bytes or more is written past the page cache (`_write_direct`):
    filling the page cache with a new file's pages is most of a buffered write's time on a
    guest whose memory is slow to hand out (docs/build-stages.md), and the file of a build
    is often not read on the machine that wrote it (another target's parameters, a build
    cache's entry). Smaller files, and file systems without direct I/O, get `write` calls."""
    arrays = {name: _little_endian_c(name, a) for name, a in tensors.items()}
    order = sorted(arrays, key=lambda n: (_RANK[_CODES[arrays[n].dtype.name]], n))
    header, end = {}, 0
    for name in order:
        size = arrays[name].nbytes
        header[name] = {
            "dtype": _CODES[arrays[name].dtype.name],
            "shape": list(arrays[name].shape),
            "data_offsets": [end, end + size],
        }
        end += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    # The file's bytes in order, WRITE_CHUNK at a time.
    pieces = [memoryview(head)]
    for name in order:
        raw = memoryview(arrays[name].reshape(-1).view(np.uint8))
        pieces.extend(raw[start : start + WRITE_CHUNK] for start in range(0, len(raw), WRITE_CHUNK))
    size = sum(len(piece) for piece in pieces)
    digest, failed = hashlib.sha256(), threading.Event()

    def hash_all() -> None:
        for piece in pieces:
            if failed.is_set():  # the write failed: its error is not kept waiting
                return
            digest.update(piece)

    with ThreadPoolExecutor(1) as hasher:
        hashed = hasher.submit(hash_all)
        try:
            if size < DIRECT_MIN or not _write_direct(path, pieces, size):
                with path.open("wb") as f:
                    for piece in pieces:
                        f.write(piece)
        except BaseException:
            failed.set()
            raise
        hashed.result()
    return digest.hexdigest()


def _write_direct(path: Path, pieces: list[memoryview], size: int) -> bool:
    """Write the file of `pieces` (`size` bytes in all) with direct I/O (`O_DIRECT`): the
    bytes are gathered DIRECT_CHUNK at a time into page-aligned buffers of the writer's own
    and written from there, DIRECT_QUEUE writes in flight, the last one padded to
    DIRECT_ALIGN and the file cut to its size after. False, the file left for the caller
    to write again, where the file system has no direct I/O. The file is given its full
    size first (`posix_fallocate`), so a full disk fails before anything is written."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        _reserve(fd, size)
        # Never closed here: a pool thread may hold a finished job's arguments a moment
        # longer, and a buffer is freed with its last reference.
        stages = [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(DIRECT_QUEUE + 1)]
        source = _Cursor(pieces)
        writes: list[Future | None] = [None] * len(stages)
        with ThreadPoolExecutor(DIRECT_QUEUE) as pool:
            try:
                for i, at in enumerate(range(0, size, DIRECT_CHUNK)):
                    k = i % len(stages)
                    if writes[k] is not None:
                        writes[k].result()
                    length = source.fill(np.frombuffer(stages[k], np.uint8))
                    writes[k] = pool.submit(_pwrite, fd, stages[k], length, at)
                for w in writes:
                    if w is not None:
                        w.result()
            except BaseException:
                for w in writes:  # those queued do not start; the pool waits for the rest
                    if w is not None:
                        w.cancel()
                raise
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno == errno.EINVAL:  # direct writes refused after all
            return False
        raise
    finally:
        os.close(fd)
    return True


class _Cursor:
    """The bytes of `pieces`, in order, copied out a buffer at a time."""

    def __init__(self, pieces: list[memoryview]):
        self._pieces = (np.frombuffer(piece, np.uint8) for piece in pieces)
        self._current, self._used = np.empty(0, np.uint8), 0

    def fill(self, out: np.ndarray) -> int:
        """Copy the next bytes into `out`, zeros after the last one up to a multiple of
        DIRECT_ALIGN; how many bytes of `out` to write."""
        filled = 0
        while filled < len(out):
            if self._used == len(self._current):
                following = next(self._pieces, None)
                if following is None:
                    break
                self._current, self._used = following, 0
                continue
            n = min(len(out) - filled, len(self._current) - self._used)
            out[filled : filled + n] = self._current[self._used : self._used + n]
            filled, self._used = filled + n, self._used + n
        length = -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN
        out[filled:length] = 0
        return length


def _pwrite(fd: int, stage: mmap.mmap, length: int, at: int) -> None:
    """The first `length` bytes of `stage` at `at` of the file `fd`."""
    with memoryview(stage) as view:
        done = 0
        while done < length:
            done += os.pwrite(fd, view[done:length], at + done)


def _reserve(fd: int, size: int) -> None:
    """Give the open file `fd` its `size` bytes on disk, where the file system can reserve
    space up front: a full disk raises here, before anything is written."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in _NO_FALLOCATE:
            raise


def _little_endian_c(name: str, a: np.ndarray) -> np.ndarray:
    """`a` as safetensors stores it: little-endian, C-contiguous."""
    if a.dtype.name not in _CODES:
        raise ValueError(f"{name}: dtype {a.dtype.name} is not one of {sorted(_CODES)}")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")  # keeps a 0-d shape
