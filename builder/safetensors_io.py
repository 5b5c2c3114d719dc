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
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Protocol

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
# Files of this many bytes or more are written, and read where not cached, past the page
# cache (`_DirectSink`, `_read_direct`).
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
        self.read_all_into([(name, out)])

    def read_all_into(self, targets: list[tuple[str, np.ndarray]]) -> None:
        """`read_into` for each (name, out) of `targets`. A file of DIRECT_MIN bytes or more
        that is not in the page cache (one the builder wrote past it, `write`) is read past
        it as well, in file order (`_read_direct`): read through the cache, its pages would
        be filled first and copied from after, which is most of a load's time on a guest
        whose memory is slow to hand out (docs/artifacts.md)."""
        spans = [(self._span(name, out), name, out) for name, out in targets]
        direct = self.file_size >= DIRECT_MIN and not _cached(self.path, self.file_size)
        if direct and _read_direct(self.path, spans):
            return
        with self.path.open("rb", buffering=0) as f:
            for begin, name, out in spans:
                f.seek(begin)
                if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                    raise InputError(
                        f"{self.path}: tensor {name!r} is cut short: the file is truncated"
                    )

    def _span(self, name: str, out: np.ndarray) -> int:
        """Where tensor `name` starts in the file, once `out` is checked to fit it."""
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
        return self.data_start + begin


def _cached(path: Path, size: int) -> bool:
    """Whether the file's pages are in the page cache, by a read that may not wait for the
    disk (`RWF_NOWAIT`) at the middle and the end of the file. True where that cannot be
    asked."""
    if not hasattr(os, "RWF_NOWAIT"):
        return True
    probe = bytearray(1)
    with path.open("rb", buffering=0) as f:
        for at in (size // 2, size - 1):
            try:
                os.preadv(f.fileno(), [probe], at, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError:  # the flag unsupported here
                return True
    return True


def _read_direct(path: Path, spans: list[tuple[int, str, np.ndarray]]) -> bool:
    """Read each (start, name, out) of `spans` with direct I/O: the file read DIRECT_CHUNK at
    a time into page-aligned buffers, DIRECT_QUEUE reads in flight, and each tensor's bytes
    copied out of them in file order. False where the file system has no direct I/O, or
    where two spans overlap (a tensor asked for twice: each byte read lands in one place)."""
    ordered = sorted((s for s in spans if s[2].nbytes), key=lambda s: s[0])  # empty: no bytes
    pieces = [(at, out.reshape(-1).view(np.uint8)) for at, _, out in ordered]
    if not pieces:
        return True  # nothing to read
    if any(a + len(raw) > b for (a, raw), (b, _) in zip(pieces, pieces[1:], strict=False)):
        return False
    first = pieces[0][0] - pieces[0][0] % DIRECT_ALIGN
    last = pieces[-1][0] + len(pieces[-1][1])
    stages = _stages()
    starts = list(range(first, last, DIRECT_CHUNK))
    reads: dict[int, Future] = {}
    k = 0  # the first piece not copied in full
    fd = _open_direct(path, os.O_RDONLY)
    if fd is None:
        return False
    try:
        with ThreadPoolExecutor(DIRECT_QUEUE) as pool:
            try:
                for i, at in enumerate(starts):
                    for j in range(i, min(i + DIRECT_QUEUE + 1, len(starts))):
                        if j not in reads:
                            reads[j] = pool.submit(_pread, fd, stages[j % len(stages)], starts[j])
                    got = reads.pop(i).result()
                    chunk = np.frombuffer(stages[i % len(stages)], np.uint8, got)
                    while k < len(pieces) and pieces[k][0] < at + got:
                        begin, raw = pieces[k]
                        lo, hi = max(begin, at), min(begin + len(raw), at + got)
                        raw[lo - begin : hi - begin] = chunk[lo - at : hi - at]
                        if begin + len(raw) > at + got:
                            break  # the rest of it in the next chunk
                        k += 1
                    if got < min(DIRECT_CHUNK, last - at):
                        raise InputError(f"{path}: the file is cut short: it is truncated")
            except BaseException:
                for read in reads.values():
                    read.cancel()
                raise
    except OSError as e:
        if e.errno == errno.EINVAL:  # direct reads refused after all
            return False
        raise
    finally:
        os.close(fd)
    return True


def _pread(fd: int, stage: mmap.mmap, at: int) -> int:
    """Fill `stage` from `at` of the file `fd`, up to the end of the file; bytes read."""
    with memoryview(stage) as view:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], at + done)
            if n == 0:
                break
            done += n
    return done


class Computed(Protocol):
    """A tensor computed when the writer reaches it, into a buffer of the writer's (one of
    a few that it reuses), so that a file of such tensors is never whole in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def fill(self, out: np.ndarray) -> None:
        """Write the values into `out`: C-contiguous, aligned to a page, of `shape` and
        `dtype`."""


def write(path: Path, tensors: Mapping[str, np.ndarray | Computed]) -> str:
    """Write `tensors` (float64, float32, float16 or bfloat16; arrays, or `Computed`
    tensors) to `path` as a safetensors file and return its sha256, computed from the bytes
    on a thread of its own while they are written, so no one has to read the file back to
    hash it. No copy of the file is made in memory: arrays are written from where they are,
    and each computed tensor into one of two buffers that it shares with the others.

    A file of DIRECT_MIN bytes or more is written past the page cache (`_DirectSink`):
    filling the page cache with a new file's pages is most of a buffered write's time on a
    guest whose memory is slow to hand out (docs/build-stages.md), and the file of a build
    is often not read on the machine that wrote it (another target's parameters, a build
    cache's entry). Smaller files, and file systems without direct I/O, get `write` calls."""
    for name, t in tensors.items():
        if t.dtype.name not in _CODES:
            raise ValueError(f"{name}: dtype {t.dtype.name} is not one of {sorted(_CODES)}")
    values = {
        name: _little_endian_c(t) if isinstance(t, np.ndarray) else t for name, t in tensors.items()
    }
    order = sorted(values, key=lambda n: (_RANK[_CODES[values[n].dtype.name]], n))
    header, end = {}, 0
    for name in order:
        size = _nbytes(values[name])
        header[name] = {
            "dtype": _CODES[values[name].dtype.name],
            "shape": list(values[name].shape),
            "data_offsets": [end, end + size],
        }
        end += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    head = struct.pack("<Q", len(text)) + text
    tensors_in_order = [values[name] for name in order]
    size = len(head) + end
    if size >= DIRECT_MIN:
        try:
            return _write(_DirectSink(path, size), head, tensors_in_order)
        except _NoDirectIO:
            pass
    return _write(_FileSink(path), head, tensors_in_order)


def _nbytes(t: np.ndarray | Computed) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize


def _write(sink: _DirectSink | _FileSink, head: bytes, tensors: list[Any]) -> str:
    """The header and then each tensor's bytes into `sink`, and to a hashing thread; the
    file's sha256."""
    digest, queue = hashlib.sha256(), SimpleQueue()
    failed = threading.Event()

    def hash_all() -> None:
        # Pieces to hash, and events to set once the pieces before them are hashed.
        while (item := queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif not failed.is_set():  # the write failed: its error is not kept waiting
                digest.update(item)

    hasher = threading.Thread(target=hash_all, name="sha256", daemon=True)
    hasher.start()
    slots = _Slots(max((_nbytes(t) for t in tensors if not isinstance(t, np.ndarray)), default=0))
    try:
        with sink:
            sink.put(memoryview(head))
            queue.put(memoryview(head))
            for t in tensors:
                hashed = None
                if not isinstance(t, np.ndarray):
                    buffer, hashed = slots.take()
                    t.fill(
                        np.frombuffer(buffer, t.dtype, _nbytes(t) // t.dtype.itemsize).reshape(
                            t.shape
                        )
                    )
                    raw = memoryview(buffer)[: _nbytes(t)]
                else:
                    raw = memoryview(t.reshape(-1).view(np.uint8))
                for start in range(0, len(raw), WRITE_CHUNK):
                    piece = raw[start : start + WRITE_CHUNK]
                    sink.put(piece)
                    queue.put(piece)
                if hashed is not None:
                    queue.put(hashed)  # the buffer is free once the hashing has passed here
    except BaseException:
        failed.set()
        raise
    finally:
        queue.put(None)
        hasher.join()
    return digest.hexdigest()


class _Slots:
    """Two buffers, page-aligned, that computed tensors take in turn: one is given again once
    the hashing thread has passed the tensor it held last (the sinks copy or write what
    they are given before they return)."""

    def __init__(self, size: int, count: int = 2):
        self._buffers = [mmap.mmap(-1, max(size, 1)) for _ in range(count)]
        self._freed: list[threading.Event | None] = [None] * count
        self._next = 0

    def take(self) -> tuple[mmap.mmap, threading.Event]:
        k = self._next
        self._next = (k + 1) % len(self._buffers)
        if self._freed[k] is not None:
            self._freed[k].wait()
        self._freed[k] = threading.Event()
        return self._buffers[k], self._freed[k]


class _NoDirectIO(Exception):
    """The file system refused direct I/O: the file is written again with `write` calls."""


class _FileSink:
    """The file, written with `write` calls."""

    def __init__(self, path: Path):
        self._path = path

    def __enter__(self) -> _FileSink:
        self._file = self._path.open("wb")
        return self

    def put(self, data: memoryview) -> None:
        self._file.write(data)

    def __exit__(self, *exc: object) -> None:
        self._file.close()


class _DirectSink:
    """The file, written with direct I/O (`O_DIRECT`): the bytes gathered DIRECT_CHUNK at a
    time into page-aligned buffers of the sink's own and written from there, DIRECT_QUEUE
    writes in flight, the last one padded to DIRECT_ALIGN and the file cut to its size
    after. The file is given its full size first (`posix_fallocate`), so a full disk fails
    before anything is written. `_NoDirectIO` where the file system refuses direct I/O."""

    def __init__(self, path: Path, size: int):
        self._path, self._size = path, size

    def __enter__(self) -> _DirectSink:
        fd = _open_direct(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        if fd is None:
            raise _NoDirectIO
        self._fd = fd
        try:
            _reserve(self._fd, self._size)
            self._stages = _stages()
            self._writes: list[Future | None] = [None] * len(self._stages)
            self._k, self._filled, self._at = 0, 0, 0
            self._stage = np.frombuffer(self._stages[0], np.uint8)
            self._pool = ThreadPoolExecutor(DIRECT_QUEUE)
        except BaseException:
            os.close(self._fd)
            raise
        return self

    def put(self, data: memoryview) -> None:
        source = np.frombuffer(data, np.uint8)
        while len(source):
            n = min(len(source), DIRECT_CHUNK - self._filled)
            self._stage[self._filled : self._filled + n] = source[:n]
            self._filled += n
            source = source[n:]
            if self._filled == DIRECT_CHUNK:
                self._flush()

    def _flush(self) -> None:
        """Write the current buffer, and make the next one current once its last write is
        done."""
        length = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
        self._stage[self._filled : length] = 0
        write = self._pool.submit(_pwrite, self._fd, self._stages[self._k], length, self._at)
        self._writes[self._k] = write
        self._at += self._filled
        self._k = (self._k + 1) % len(self._stages)
        self._stage = np.frombuffer(self._stages[self._k], np.uint8)
        self._filled = 0
        self._wait(self._writes[self._k])

    @staticmethod
    def _wait(write: Future | None) -> None:
        try:
            if write is not None:
                write.result()
        except OSError as e:
            if e.errno == errno.EINVAL:  # direct writes refused after all
                raise _NoDirectIO from e
            raise

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        try:
            if kind is None:
                if self._filled:
                    self._flush()
                for write in self._writes:
                    self._wait(write)
                os.ftruncate(self._fd, self._size)
        finally:
            for write in self._writes:  # those queued do not start; the pool waits for the rest
                if write is not None:
                    write.cancel()
            # Closed only once no write can run on it: interrupted in the wait, the file is
            # left open rather than its number given to another file under a running write.
            self._pool.shutdown(wait=True)
            os.close(self._fd)


def _open_direct(path: Path, flags: int) -> int | None:
    """`path` opened with direct I/O (`O_DIRECT`) and `flags`; None where the system or the
    file system has none."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def _stages() -> list[mmap.mmap]:
    """The page-aligned buffers of one direct read or write, a chunk each: one per I/O in
    flight and one more to fill or empty meanwhile. Never closed by their user: a pool
    thread may hold a finished job's arguments a moment longer, and a buffer is freed with
    its last reference."""
    return [mmap.mmap(-1, DIRECT_CHUNK) for _ in range(DIRECT_QUEUE + 1)]


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


def _little_endian_c(a: np.ndarray) -> np.ndarray:
    """`a` as safetensors stores it: little-endian, C-contiguous."""
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")  # keeps a 0-d shape
