"""A small safetensors reader that returns float32 numpy arrays, bfloat16 included (which
`safetensors.numpy` cannot read), or reads a tensor as stored straight into a buffer of the
caller's, and names the file and tensor when a file is damaged; and a writer that copies
each tensor from its array into the file, on every core."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import BinaryIO

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
# Bytes written (and hashed) at a time.
WRITE_CHUNK = 16 << 20
# Bytes of the file mapped at a time while it is written (at least a piece per thread).
MAP_WINDOW = 64 << 20
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

    The file is made at its full size first (`posix_fallocate`: a full disk fails here, with
    an error, not later on a page of a memory map) and its pages filled through a memory map
    by a thread per core: the kernel's work of giving a new file its pages then runs on
    every core, where `write` calls on one file run one at a time (docs/build-stages.md).
    Where the file system cannot reserve the space up front, the arrays are streamed with
    `write` calls instead. (On a copy-on-write file system, ZFS or btrfs, a reservation does
    not promise the later writes their blocks.)"""
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
    # Each piece with its offset in the file, in the file's order.
    pieces = [(0, memoryview(head))]
    offset = len(head)
    for name in order:
        raw = memoryview(arrays[name].reshape(-1).view(np.uint8))
        for start in range(0, len(raw), WRITE_CHUNK):
            pieces.append((offset + start, raw[start : start + WRITE_CHUNK]))
        offset += len(raw)
    from .runtime import available_cores

    threads = available_cores()
    digest, failed = hashlib.sha256(), threading.Event()

    def hash_all() -> None:
        for _, piece in pieces:
            if failed.is_set():  # the write failed: its error is not kept waiting
                return
            digest.update(piece)

    with path.open("w+b") as f, ThreadPoolExecutor(1 + threads) as pool:
        hashed = pool.submit(hash_all)
        try:
            if _reserve(f, offset):
                _fill(f, pieces, pool, max(MAP_WINDOW, threads * WRITE_CHUNK))
            else:
                for _, piece in pieces:
                    f.write(piece)
        except BaseException:
            failed.set()
            raise
        hashed.result()
    return digest.hexdigest()


def _reserve(f: BinaryIO, size: int) -> bool:
    """Give the open file `f` its `size` bytes on disk; False where the file system cannot
    reserve space up front. A full disk raises here, before anything is mapped."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in _NO_FALLOCATE:
            return False
        raise
    return True


def _fill(
    f: BinaryIO, pieces: list[tuple[int, memoryview]], pool: ThreadPoolExecutor, size: int
) -> None:
    """Copy each piece to its offset of the open file `f`, through shared memory maps of the
    file, on the pool's threads (numpy's copy lets go of the GIL; a memoryview's would not).
    One window of about `size` bytes is mapped at a time, so the file's pages count in the
    process's resident memory only while they are copied to."""
    while pieces:
        count = 1
        while count < len(pieces) and pieces[count][0] - pieces[0][0] < size:
            count += 1
        window, pieces = pieces[:count], pieces[count:]
        begin = window[0][0] - window[0][0] % mmap.ALLOCATIONGRANULARITY
        end = window[-1][0] + len(window[-1][1])
        with mmap.mmap(f.fileno(), end - begin, offset=begin) as m:
            copies = [pool.submit(_copy_into, m, at - begin, piece) for at, piece in window]
            try:
                wait(copies)
            finally:  # on an interrupt too, no copy is left running when the map closes
                for copy in copies:
                    copy.cancel()
                wait(copies)
        for copy in copies:
            copy.result()


def _copy_into(m: mmap.mmap, at: int, piece: memoryview) -> None:
    """`piece` into `m` at `at`, through a view of the map made and dropped here: a view
    held past the copy (by the pool's work item, say) would keep the map from closing."""
    view = np.frombuffer(m, np.uint8, len(piece), at)
    try:
        np.copyto(view, np.frombuffer(piece, np.uint8))
    finally:
        del view


def _little_endian_c(name: str, a: np.ndarray) -> np.ndarray:
    """`a` as safetensors stores it: little-endian, C-contiguous."""
    if a.dtype.name not in _CODES:
        raise ValueError(f"{name}: dtype {a.dtype.name} is not one of {sorted(_CODES)}")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else a.copy(order="C")  # keeps a 0-d shape
