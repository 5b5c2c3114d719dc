"""A small safetensors reader that returns float32 numpy arrays, bfloat16 included (which
`safetensors.numpy` cannot read), or reads a tensor as stored straight into a buffer of the
caller's, and names the file and tensor when a file is damaged; and a writer that streams
each tensor from its array to the file."""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from concurrent.futures import ThreadPoolExecutor
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
# Bytes written (and hashed) at a time.
WRITE_CHUNK = 16 << 20


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
    """Write `tensors` (float64, float32, float16 or bfloat16) to `path` as a safetensors file:
    the header, then each tensor's bytes from its own array, with no copy of the file in
    memory. Returns the file's sha256, computed on a second thread while the bytes are
    written (both release the GIL), so no one has to read the file back to hash it."""
    arrays = {}
    for name, a in tensors.items():
        if a.dtype.name not in _CODES:
            raise ValueError(f"{name}: dtype {a.dtype.name} is not one of {sorted(_CODES)}")
        if a.dtype.byteorder == ">":  # safetensors is little-endian
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")  # keeps a 0-d shape
    order = sorted(arrays, key=lambda n: (_RANK[_CODES[arrays[n].dtype.name]], n))
    header, end = {}, 0
    for name in order:
        a = arrays[name]
        header[name] = {
            "dtype": _CODES[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [end, end + a.nbytes],
        }
        end += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with path.open("wb") as f, ThreadPoolExecutor(1) as hasher:
        for block in _blocks(struct.pack("<Q", len(text)) + text, [arrays[n] for n in order]):
            hashed = hasher.submit(digest.update, block)
            f.write(block)
            hashed.result()
    return digest.hexdigest()


def _blocks(head: bytes, arrays: list[np.ndarray]):
    yield memoryview(head)
    for a in arrays:
        raw = memoryview(a.reshape(-1).view(np.uint8))
        for start in range(0, len(raw), WRITE_CHUNK):
            yield raw[start : start + WRITE_CHUNK]
