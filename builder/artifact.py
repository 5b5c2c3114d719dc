"""The artifact folder: `OUT/<preset>/<target>/` holding the library, the parameters and
`manifest.json`; writing it atomically, and checking it against its manifest.

A folder is written under a temporary name and renamed into place only when complete. In the
output folder, `OUT/<preset>/<target>` is a symbolic link to a sibling version folder
`.<target>.v-XXXX`; publishing a new version swaps the link with one atomic rename, so a
reader, or a build killed at any moment, sees the old artifact or the new one, never a mix
and never none. Leftovers of a killed build are removed by the next publish of that target.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import safetensors_io
from .errors import ArtifactError, InputError
from .locking import locked
from .safetensors_io import SafetensorsFile

MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
FORMAT = 1
# Byte alignment of the parameter buffers the builder makes (TVM allocates tensors so).
ALIGN = 64


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a preset `dtype`; bfloat16 is ml_dtypes' (a TVM dependency), which
    safetensors and `tvm.runtime.tensor` both take."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def cast_params(arrays: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The parameters in the build's dtype (the weight readers give float32)."""
    want = numpy_dtype(dtype)
    if all(a.dtype == want for a in arrays.values()):
        return arrays
    return {name: a.astype(want, copy=False) for name, a in arrays.items()}


def empty_arrays(specs: list[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
    """Uninitialized arrays of the given (shape, dtype), C-contiguous, each starting at a
    multiple of ALIGN bytes (what `tvm.runtime.from_dlpack` needs to take an array without
    a copy), carved out of one anonymous memory map that lives as long as any of them.
    Plain pages: asking for transparent huge pages made the first touch slower on the
    build machine, not faster (docs/build-stages.md)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(t).itemsize for shape, t in specs]
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGN) * ALIGN
    memory = mmap.mmap(-1, max(end, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(memory, np.uint8)
    return [
        raw[begin : begin + size].view(dtype).reshape(shape)
        for (shape, dtype), begin, size in zip(specs, offsets, sizes, strict=True)
    ]


def save_params(
    folder: Path, order: list[str], arrays: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Write the parameters as `forward` takes them (cast and packed at build time: arrays, or
    tensors packed as they are written, `packing.Packed`), copied
    from the arrays into the file (`safetensors_io.write`). Returns the file's record (size,
    sha256 computed while writing, time) as `file_records`' `known` takes it, so that no one
    reads the file back to hash it."""
    path = folder / PARAMS
    digest = safetensors_io.write(path, {name: arrays[name] for name in order})
    st = path.stat()
    return {PARAMS: {"bytes": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}}


def load_params(
    folder: Path,
    order: list[str],
    empty: Callable[[tuple[int, ...], str], Any] | None = None,
) -> list[Any]:
    """The stored parameters in `order`, each read from the file straight into a buffer of its
    own: what `empty(shape, dtype)` returns (a tensor of another runtime whose host memory
    `np.from_dlpack` views), or where that is None or not given, a numpy array. The values
    so land where they are used, touched once (docs/artifacts.md has the load times of
    both ways)."""
    buffers, targets = [], []
    try:
        stored = SafetensorsFile(folder / PARAMS)
        for name in order:
            if name not in stored.entries:
                raise InputError(f"{folder / PARAMS}: no tensor {name!r}, which the manifest lists")
            shape, dtype = stored.shape(name), stored.dtype(name)
            buffer = None if empty is None else empty(shape, dtype)
            if buffer is None:
                buffer = view = np.empty(shape, numpy_dtype(dtype))
            else:
                view = np.from_dlpack(buffer)
            targets.append((name, view))
            buffers.append(buffer)
        stored.read_all_into(targets)
    except InputError as e:  # a damaged file: an artifact error, as `check` gives
        raise ArtifactError(f"{e}; rebuild the artifact") from None
    return buffers


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _publishable(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publishable(folder: Path) -> None:
    # mkdtemp and some writers create owner-only files; an artifact is read by its users.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        p.chmod((0o777 if os.access(p, os.X_OK) else 0o666) & ~umask)


def file_records(folder: Path, skip: tuple[str, ...] = (), known: dict[str, Any] | None = None):
    """Size, sha256 and modification time of every file in `folder` but `skip`. A file whose
    size and time equal its entry in `known` (written by `save_params`, or a hard link to a
    stored file) keeps that entry's sha256 instead of being read back."""
    known = known or {}
    records = {}
    for p in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in skip):
        st = p.stat()
        was = known.get(p.name)
        same = isinstance(was, dict) and [was.get("bytes"), was.get("mtime_ns")] == [
            st.st_size,
            st.st_mtime_ns,
        ]
        sha = was["sha256"] if same else sha256(p)
        records[p.name] = {"bytes": st.st_size, "sha256": sha, "mtime_ns": st.st_mtime_ns}
    return records


def write_manifest(
    folder: Path, manifest: dict[str, Any], known: dict[str, Any] | None = None
) -> None:
    """Add the size, sha256 and modification time of every file in `folder` (see
    `file_records`), then write the manifest. Call it last: the times are those of the
    finished files."""
    manifest["files"] = file_records(folder, skip=(MANIFEST,), known=known)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder}: not an artifact folder (no {MANIFEST})") from e
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this builder reads {FORMAT}")
    return manifest


# --- verifying -----------------------------------------------------------------------------


def verify(folder: Path, manifest: dict[str, Any], full: bool = False) -> None:
    """Check every file the manifest lists (`verify_files`), and that it lists the library
    and the parameters. Raises `ArtifactError` naming the first bad file."""
    files = manifest.get("files")
    needed = {manifest.get("library"), manifest.get("params", {}).get("file")}
    if not isinstance(files, dict) or not needed <= set(files):
        raise ArtifactError(
            f"{folder / MANIFEST}: 'files' does not list {sorted(map(str, needed))}"
        )
    verify_files(folder, files, full, listed_in=folder / MANIFEST)


def verify_files(
    folder: Path, files: dict[str, Any], full: bool = False, listed_in: Path | None = None
) -> None:
    """Fast path: each file's size, and the modification time recorded when it was
    written; a file whose time differs (a copy, a touch) or `full=True` is hashed."""
    listed_in = listed_in or folder
    if not isinstance(files, dict):
        raise ArtifactError(f"{listed_in}: 'files' is not a table of files")
    for name, entry in sorted(files.items()):
        path = folder / name
        well_formed = isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
        if "/" in name or name.startswith(".") or not well_formed or "sha256" not in entry:
            raise ArtifactError(f"{listed_in}: files: malformed entry {name!r}")
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing; the manifest lists it") from None
        if stat.st_size != entry["bytes"]:
            raise ArtifactError(
                f"{path}: {stat.st_size} bytes, the manifest says {entry['bytes']}: "
                "truncated or replaced; rebuild the artifact"
            )
        hash_it = full or stat.st_mtime_ns != entry.get("mtime_ns")
        if hash_it and sha256(path) != entry["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 differs from the manifest's: modified since it was "
                "built; rebuild the artifact"
            )


def check(folder: Path, full: bool = False) -> dict[str, Any]:
    """The manifest of `folder`, once the folder matches it (`verify`) and the running TVM
    is the one that built it; else `ArtifactError` naming the file."""
    from .tvm_import import versions

    manifest = read_manifest(folder)
    built_with, this = manifest.get("versions", {}).get("tvm"), versions()["tvm"]
    if built_with != this:
        raise ArtifactError(
            f"{folder / MANIFEST}: built with TVM {built_with}, this is TVM {this}; "
            "rebuild the artifact"
        )
    verify(folder, manifest, full)
    return manifest


# --- publishing ----------------------------------------------------------------------------


def _leftover(final: Path) -> re.Pattern[str]:
    # Names are `.<target>.(tmp|v|link)-<hex>`; a target name may hold dots, a suffix not.
    return re.compile(rf"\.{re.escape(final.name)}\.(tmp|v|link)-[0-9a-f]+")


def current_version(final: Path) -> Path | None:
    """The version folder that `final` links to (None if `final` is not a link)."""
    return final.parent / os.readlink(final) if final.is_symlink() else None


def sweep(final: Path) -> None:
    """Remove what killed builds left beside `final`: temporary folders and links, and
    version folders that `final` does not link to. Call it holding the publish lock."""
    if not final.parent.is_dir():
        return
    keep = current_version(final)
    pattern = _leftover(final)
    for p in final.parent.iterdir():
        if pattern.fullmatch(p.name) and p != keep:
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)


def fill(src: Path, dst: Path, names: Iterable[str] | None = None) -> None:
    """Hard-link (same file system) or copy, keeping modification times, every file of
    `src` (or those named)."""
    files = sorted(src.iterdir()) if names is None else [src / n for n in names]
    for f in files:
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def publish(src: Path, final: Path, lock: Path) -> None:
    """Make `final` a link to a new version folder holding `src`'s files, atomically.

    The files are hard links where possible, so publishing a 1 GB artifact takes
    milliseconds. `lock` serializes publishers of the same `final`. Atomic against a killed
    process, not durable against a power cut: nothing is fsync'd (docs/build-cache.md)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock):
        sweep(final)
        tag = secrets.token_hex(4)
        tmp = final.parent / f".{final.name}.tmp-{tag}"
        tmp.mkdir()
        fill(src, tmp)
        version = tmp.rename(final.parent / f".{final.name}.v-{tag}")
        link = final.parent / f".{final.name}.link-{tag}"
        link.symlink_to(version.name)
        old = current_version(final)
        if final.is_dir() and not final.is_symlink():
            # A real folder (written before links were used): moved aside once, not atomic.
            old = final.rename(final.parent / f".{final.name}.v-{secrets.token_hex(4)}")
        os.replace(link, final)
        if old is not None and old != version:
            _remove_version(final, old)


def _remove_version(final: Path, old: Path) -> None:
    """Remove a version folder `final` no longer links to (one of its own only)."""
    if _leftover(final).fullmatch(old.name):
        shutil.rmtree(old, ignore_errors=True)
