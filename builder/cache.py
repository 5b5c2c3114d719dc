"""The build cache: finished artifacts, compiled libraries and packed parameters, each reused
when nothing that went into it changed.

Three keys, each the sha256 of a canonical JSON (docs/build-cache.md):

- the **artifact key**: everything an artifact depends on, computed from the resolved preset
  and the build machine alone, before TVM is imported: the preset, the weights' digest, the
  target entry, the build machine's CPU and cores, the versions of TVM and TVM-FFI and a
  digest of the builder's sources and of every registered block's module. A hit publishes
  the stored artifact and imports nothing else.
- the **library key**: what the compiled code depends on: the exported graph's structure,
  the TVM target options and the kernel facts they imply (L2 size, vector width), the
  precision, the target kind's pipeline (its `PIPELINE_VERSION` and sources) and the TVM
  versions. A build whose weights alone changed reuses the library.
- the **parameters key**: the library key, the weights' digest and the dtype: the stored
  (packed) parameters.

A fourth, the **plan key**, is the artifact key without the weights: it finds the plan of a
build that compiled before (its library key, the parameters' names, shapes and packing, the
manifest's library facts), so that a build whose weights alone changed knows its library
and parameters without exporting the graph, and so without importing TVM's compiler.

Layout, under `BUILDER_CACHE_DIR` (default `$XDG_CACHE_HOME/clip-tvm-builder`, else
`~/.cache/clip-tvm-builder`):

    artifacts/<key>/        a finished artifact (lib, params, manifest)
    libraries/<key>/        a compiled library and `part.json` (its files' digests)
    params/<key>/           packed parameters and `part.json` (their order, source, digests)
    plans/<key>.json        an artifact's plan, by plan key (`builder.make_artifact`)
    kernels/<key>.json      a CPU kernel parsed from its TVMScript text (`kernel_key`);
                            `BUILDER_KERNEL_DIR` keeps them elsewhere
    kernels/<key>.o         a compiled PrimFunc's object file (`kernel_object_key`)
    locks/<key>.lock        held while a key is built or reused: a second build waits
    locks/out-<hash>.lock   held while an output folder's link is swapped
    hashes.json             checkpoint file digests by (path, size, mtime, inode)

The kernel store holds the CPU pipeline's kernels as TVM's JSON of the parsed function, keyed
by a sha256 of their TVMScript text and the TVM versions: loading one is far cheaper than
parsing it (docs/build-cache.md), and towers that share widths share kernels. It also holds
each compiled PrimFunc as an object file (`targets/cpu/objects.py`), keyed by the function,
the target, the pass options and the TVM versions: a compile links the stored objects of
the functions it shares with earlier compiles.

An artifact's files are hard links to the library's and the parameters' files, so the three
stores hold one copy of the bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from . import __version__, artifact, registry
from .config import Preset, TargetConfig
from .errors import ArtifactError
from .locking import locked, try_locked

CACHE_ENV = "BUILDER_CACHE_DIR"
# Where the kernel store is kept, if not in the cache folder: caches that build towers of the
# same widths can share their kernels (the test suite's per-test caches do).
KERNELS_ENV = "BUILDER_KERNEL_DIR"
# Bump when a key's layout changes.
KEY_FORMAT = 2
# Bump when a plan's fields change (`builder/library.py`): older plans are then not found.
PLAN_FORMAT = 2
INDEX = "hashes.json"
PART = "part.json"
STORES = ("artifacts", "libraries", "params")
PACKAGE = Path(__file__).resolve().parent


def default_dir() -> Path:
    """`BUILDER_CACHE_DIR`, else `$XDG_CACHE_HOME/clip-tvm-builder`, else
    `~/.cache/clip-tvm-builder`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip-tvm-builder"


def digest(material: Any) -> str:
    """sha256 of the canonical JSON of `material`."""
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def files_digest(files: Iterable[Path]) -> str:
    """sha256 over files' names (relative to the package where inside it) and contents."""
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(str(f.relative_to(PACKAGE) if f.is_relative_to(PACKAGE) else f).encode())
        h.update(b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@cache
def _package_files(*parts: str) -> frozenset[Path]:
    """The Python files at `parts` in the package: one file, or a folder's, recursively."""
    path = PACKAGE.joinpath(*parts)
    return frozenset([path] if path.is_file() else path.rglob("*.py"))


def source_digest() -> str:
    """The builder's own sources and the modules of all registered blocks (plugins
    included): an edited block, loader or pipeline never reuses a stale artifact."""
    files = set(_package_files())
    files.update(f for b in registry.all_blocks() if (f := b.file) is not None)
    return files_digest(files)


def pipeline_sources() -> str:
    """The target kinds' compile pipelines (`builder/targets`): part of the library key."""
    return files_digest(_package_files("targets"))


def weights_code() -> str:
    """The weight loaders, the random init (`builder/weights`) and the families' name maps
    (`builder/families`): part of the weights' digest, so a changed name map or init scheme
    never reuses stale parameters."""
    return files_digest(_package_files("weights") | _package_files("families"))


@cache
def _parser_digest() -> str:
    return files_digest(_package_files("targets", "cpu", "tvmscript.py"))


def kernel_key(src: str) -> str:
    """The kernel store's key of a kernel's TVMScript text: the text, and the TVM versions
    and the parser's source (`builder/targets/cpu/tvmscript.py`) that parse it."""
    return digest(
        {
            "key_format": KEY_FORMAT,
            "tvm": tvm_versions(),
            "parser": _parser_digest(),
            "src": src,
        }
    )


def kernel_object_key(func_json: str, target: Any, setting: Any) -> str:
    """The kernel store's key of a compiled kernel's object file: the function as TVM's JSON,
    the target, the pass context's options and the TVM versions that compile it."""
    return digest(
        {
            "key_format": KEY_FORMAT,
            "tvm": tvm_versions(),
            "target": target,
            "setting": setting,
            "func": func_json,
        }
    )


_REBUILDING = [False]


@contextmanager
def rebuilding_objects() -> Iterator[None]:
    """Within the block, every kernel object a compile needs is built anew and replaces the
    stored one (`build --force`: compile again whatever the cache holds)."""
    before, _REBUILDING[0] = _REBUILDING[0], True
    try:
        yield
    finally:
        _REBUILDING[0] = before


def _whole_elf(path: Path) -> bool:
    """Whether `path` is an ELF file as long as its header says: its section headers, which
    the linker writes last, are all there."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit objects only
        return False
    order = "<" if head[5] == 1 else ">"
    (sh_offset,) = struct.unpack_from(order + "Q", head, 0x28)
    entry_size, count = struct.unpack_from(order + "HH", head, 0x3A)
    return sh_offset + entry_size * count <= size


_SCRATCH_LOCK = threading.Lock()


def _scratch() -> Path:
    """A folder of this process's own for what an unwritable cache cannot keep (one, however
    many threads of a compile ask at once)."""
    with _SCRATCH_LOCK:
        return _scratch_folder()


@cache
def _scratch_folder() -> Path:
    import atexit
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="clip-tvm-builder-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@cache
def tvm_versions() -> dict[str, str]:
    """The installed TVM and TVM-FFI (`tvm_import.versions`: read from their distributions,
    without an import, where they have them), by distribution name."""
    from .tvm_import import versions

    found = versions()
    return {"apache-tvm": found["tvm"], "apache-tvm-ffi": found["tvm_ffi"]}


@cache
def host_cpu() -> dict[str, Any]:
    """What identifies the build machine's CPU for code generated for it (`mcpu: host`, the
    kernels' L2 size): its architecture, the first processor's identity and flags in
    /proc/cpuinfo, and the cache sizes in sysfs."""
    from .runtime import available_cores

    facts: dict[str, Any] = {"machine": platform.machine(), "cores": available_cores()}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        first = ""
    for line in first.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in (
            "vendor_id",
            "cpu family",
            "model",
            "model name",
            "stepping",
            "flags",
            "Features",
            "CPU implementer",
            "CPU part",
        ):
            facts[name] = value.strip()
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(caches.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            facts[f"L{level} {kind}"] = (index / "size").read_text().strip()
    except OSError:
        pass
    return facts


class Cache:
    """A cache folder. Every method that reads or writes an entry expects its key's lock."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_dir()
        kernels = os.environ.get(KERNELS_ENV)
        self.kernels = Path(kernels).expanduser() if kernels else self.root / "kernels"

    def entry(self, key: str, store: str = "artifacts") -> Path:
        return self.root / store / key

    @contextmanager
    def lock(self, name: str, waiting: Any = None) -> Iterator[None]:
        with locked(self.root / "locks" / f"{name}.lock", waiting):
            yield

    def out_lock(self, final: Path) -> Path:
        where = str(final.parent.resolve() / final.name).encode()
        return self.root / "locks" / f"out-{hashlib.sha256(where).hexdigest()[:32]}.lock"

    # --- keys -----------------------------------------------------------------------------

    def file_digest(self, path: Path) -> str:
        """sha256 of a file, remembered by (path, size, mtime, inode) so that an unchanged
        multi-GB checkpoint is hashed once."""
        path = path.resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        index = self._read_index()
        known = index.get(str(path))
        if isinstance(known, dict) and known.get("stamp") == stamp:
            return known["sha256"]
        sha = artifact.sha256(path)
        index = self._read_index()  # another build may have added entries meanwhile
        index[str(path)] = {"stamp": stamp, "sha256": sha}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{INDEX}.{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.root / INDEX)
        return sha

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def weights_digest(self, preset: Preset) -> dict[str, Any]:
        """What the weights are, cheaply: no array is made or read. Random init: the seed
        (the parameters' names and shapes follow from the graph); a checkpoint: the sha256 of
        every file read. Either way, the code that turns them into parameters."""
        if preset.weights.is_random:
            return {"kind": "random", "seed": preset.weights.seed, "code": weights_code()}
        from .weights.hf import checkpoint_files

        files = checkpoint_files(preset.weights.path)
        return {
            "kind": "hf",
            "files": {str(f.resolve()): self.file_digest(f) for f in files},
            "code": weights_code(),
        }

    def artifact_key(self, preset: Preset, entry: TargetConfig, weights: dict[str, Any]) -> str:
        """The artifact's key, from what the build is asked for and the machine it runs on;
        no TVM import."""
        return digest({**_request(preset, entry), "weights": weights})

    def plan_key(self, preset: Preset, entry: TargetConfig) -> str:
        """The key of an artifact's plan (`builder.make_artifact`): the artifact key without
        the weights, so without TVM; everything the graph, the library and the parameters'
        names and layout follow from."""
        request = _request(preset, entry)
        request["preset"].pop("weights")
        return digest({**request, "plan": PLAN_FORMAT})

    def plan(self, key: str) -> dict[str, Any] | None:
        """A stored plan (`plan_key`), or None where there is none or it is unreadable."""
        try:
            plan = json.loads((self.root / "plans" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        fields = ("library_key", "params", "packing", "manifest")
        return plan if isinstance(plan, dict) and all(f in plan for f in fields) else None

    def store_plan(self, key: str, plan: dict[str, Any]) -> None:
        """Store a plan, atomically; a cache that cannot take it only means the next build
        of other weights exports and keys the graph again."""
        text = json.dumps(plan, indent=1, sort_keys=True) + "\n"
        with contextlib.suppress(OSError):
            _store_file(self.root / "plans", f"{key}.json", lambda tmp: tmp.write_text(text))

    # --- entries --------------------------------------------------------------------------

    def lookup(self, key: str, full: bool = False) -> tuple[Path | None, str]:
        """(the artifact, "") if a finished, intact artifact holds `key`; else (None, why
        not). A damaged entry is removed."""
        folder = self.entry(key)
        if not folder.is_dir():
            return None, "not cached"
        try:
            manifest = artifact.read_manifest(folder)
            if manifest.get("cache_key") != key:
                raise ArtifactError(f"{folder}: manifest has another cache key")
            artifact.verify(folder, manifest, full)
        except (ArtifactError, OSError, ValueError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            return None, f"cached copy damaged ({e})"
        return folder, ""

    def lookup_part(self, store: str, key: str) -> dict[str, Any] | None:
        """The `part.json` of a stored library or parameters entry, if it is intact; a
        damaged entry is removed."""
        folder = self.entry(key, store)
        if not folder.is_dir():
            return None
        try:
            part = json.loads((folder / PART).read_text())
            artifact.verify_files(folder, part["files"])
        except (ArtifactError, OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        return part

    @contextmanager
    def store(self, key: str, store: str = "artifacts") -> Iterator[Path]:
        """A temporary folder; when the block ends without error it becomes the entry."""
        with artifact.staging(self.entry(key, store)) as tmp:
            yield tmp

    def kernel_json(self, key: str) -> str | None:
        """A stored kernel's JSON, or None."""
        try:
            return (self.kernels / f"{key}.json").read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def store_kernel_json(self, key: str, text: str) -> None:
        """Store a kernel's JSON, atomically; a cache folder that cannot be written only
        means the next process parses the kernel again."""
        with contextlib.suppress(OSError):
            _store_file(self.kernels, f"{key}.json", lambda tmp: tmp.write_text(text))

    def kernel_object(self, key: str, write: Callable[[Path], None]) -> Path:
        """The stored object file of a compiled kernel (`kernel_object_key`), made by
        `write(path)` first where the store has none, where what it has is not a whole ELF
        object (the targets are Linux's), or within `rebuilding_objects()`. A store that
        cannot take the file gets it in a temporary folder, which the process removes at
        exit."""
        name = f"{key}.o"
        if not _REBUILDING[0] and _whole_elf(self.kernels / name):
            return self.kernels / name
        try:
            return _store_file(self.kernels, name, write)
        except OSError:
            path = _scratch() / name
            write(path)
            return path

    def sweep(self) -> None:
        """Remove what killed builds left: temporary folders of keys no build holds, and
        kernel or plan files a killed process did not finish writing (a write takes
        milliseconds: any older than a minute is a leftover)."""
        for files in (self.kernels, self.root / "plans"):
            if not files.is_dir():
                continue
            for p in files.glob(".*.tmp-*"):
                with contextlib.suppress(OSError):
                    if time.time() - p.stat().st_mtime > 60:
                        p.unlink()
        for store in STORES:
            folder = self.root / store
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                leftover = p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
                if not leftover:
                    continue
                key = p.name[1:].split(".", 1)[0]
                lock = self.root / "locks" / f"{key}.lock"
                fd = try_locked(lock)
                if fd is None and lock.exists():
                    continue  # a build of that key is running
                try:
                    shutil.rmtree(p, ignore_errors=True)
                finally:
                    if fd is not None:
                        os.close(fd)


def _request(preset: Preset, entry: TargetConfig) -> dict[str, Any]:
    """What a build of `entry` is asked for and the machine it runs on (the keys' common
    part)."""
    return {
        "key_format": KEY_FORMAT,
        "artifact_format": artifact.FORMAT,
        "preset": preset.to_dict(),
        "target": dataclasses.asdict(entry),
        "host": host_cpu(),
        "versions": {"builder": __version__, "sources": source_digest(), **tvm_versions()},
    }


def _store_file(folder: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write a file of the cache's through a temporary file of this writer's own renamed
    into place: another process reads the whole file or none. OSError where the folder
    cannot take it (before `write` runs, where it cannot be written)."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = name.rsplit(".", 1)  # TVM picks an object file's format by its suffix
    fd, made = tempfile.mkstemp(dir=folder, prefix=f".{stem}.tmp-", suffix=f".{suffix}")
    os.close(fd)
    tmp = Path(made)
    try:
        write(tmp)
        os.replace(tmp, folder / name)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return folder / name


def write_part(
    folder: Path, record: dict[str, Any], known: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write `part.json`: `record` plus every file's size, sha256 and time (`known`'s where
    they match, see `artifact.file_records`)."""
    record = {**record, "files": artifact.file_records(folder, skip=(PART,), known=known)}
    (folder / PART).write_text(json.dumps(record, indent=1) + "\n")
    return record
