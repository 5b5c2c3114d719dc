"""The build cache: one finished artifact per key, reused when nothing that went into it
changed.

The key is the sha256 of a canonical JSON of everything a build depends on: the resolved
preset, the weights' content (random init: its seed and the parameter names and shapes; a
checkpoint: the sha256 of every file read), the target entry and the TVM target options it
resolves to, the versions of TVM, TVM-FFI and the builder (with a digest of the
builder's sources and of every registered block's module), and the target kind's
`PIPELINE_VERSION`. It is computed before any weights are made or read.

Layout, under `BUILDER_CACHE_DIR` (default `$XDG_CACHE_HOME/clip-tvm-builder`, else
`~/.cache/clip-tvm-builder`):

    artifacts/<key>/        a finished artifact (lib, params, manifest)
    locks/<key>.lock        held while a key is built or reused: a second build waits
    locks/out-<hash>.lock   held while an output folder's link is swapped
    hashes.json             checkpoint file digests by (path, size, mtime, inode)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from . import __version__, artifact, registry
from .config import Preset, TargetConfig
from .errors import ArtifactError
from .locking import locked, try_locked

CACHE_ENV = "BUILDER_CACHE_DIR"
# Bump when the key's layout changes.
KEY_FORMAT = 1
INDEX = "hashes.json"


def default_dir() -> Path:
    """`BUILDER_CACHE_DIR`, else `$XDG_CACHE_HOME/clip-tvm-builder`, else
    `~/.cache/clip-tvm-builder`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip-tvm-builder"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the builder's own sources and the modules of all registered blocks
    (plugins included): an edited block or pipeline never reuses a stale library."""
    package = Path(__file__).resolve().parent
    files = set(package.rglob("*.py"))
    for block in registry.all_blocks():
        module = sys.modules.get(block.factory.__module__)
        if module is not None and getattr(module, "__file__", None):
            files.add(Path(module.__file__).resolve())
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(str(f.relative_to(package) if f.is_relative_to(package) else f).encode())
        digest.update(b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import tvm
    import tvm_ffi

    return {
        "builder": __version__,
        "builder_sources": source_digest(),
        "tvm": tvm.__version__,
        "tvm_ffi": tvm_ffi.__version__,
    }


class Cache:
    """A cache folder. Every method that reads or writes an entry expects its key's lock."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_dir()

    def entry(self, key: str) -> Path:
        return self.root / "artifacts" / key

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
        digest = artifact.sha256(path)
        index = self._read_index()  # another build may have added entries meanwhile
        index[str(path)] = {"stamp": stamp, "sha256": digest}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{INDEX}.{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, self.root / INDEX)
        return digest

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / INDEX).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def weights_digest(self, preset: Preset) -> dict[str, Any]:
        """What the weights are, cheaply: no array is made or read."""
        if preset.weights.is_random:
            from .assemble import parameter_shapes

            # The init scheme itself is covered by the source digest.
            shapes = parameter_shapes(preset.model, preset.blocks)
            return {
                "kind": "random",
                "seed": preset.weights.seed,
                "params": sorted([name, list(shape)] for name, shape in shapes.items()),
            }
        from .weights.hf import checkpoint_files

        files = checkpoint_files(preset.weights.path)
        return {
            "kind": "hf",
            "files": {str(f.resolve()): self.file_digest(f) for f in files},
        }

    def key(
        self,
        preset: Preset,
        entry: TargetConfig,
        options: dict[str, Any],
        pipeline: ModuleType,
        weights: dict[str, Any],
    ) -> str:
        material = {
            "key_format": KEY_FORMAT,
            "artifact_format": artifact.FORMAT,
            "preset": preset.to_dict(),
            "weights": weights,
            "target": {"entry": dataclasses.asdict(entry), "options": options},
            "pipeline": {"kind": entry.kind, "version": pipeline.PIPELINE_VERSION},
            "versions": _versions(),
        }
        blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    # --- entries --------------------------------------------------------------------------

    def lookup(self, key: str, full: bool = False) -> tuple[Path | None, str]:
        """(the entry, "") if a finished, intact entry holds `key`; else (None, why not).
        A damaged entry is removed."""
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

    @contextmanager
    def store(self, key: str) -> Iterator[Path]:
        """A temporary folder; when the block ends without error it becomes the entry."""
        with artifact.staging(self.entry(key)) as tmp:
            yield tmp

    def sweep(self) -> None:
        """Remove what killed builds left: temporary folders of keys no build holds."""
        folder = self.root / "artifacts"
        if not folder.is_dir():
            return
        for p in folder.iterdir():
            leftover = p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
            if not leftover:
                continue
            key = p.name[1:].split(".", 1)[0]
            fd = try_locked(self.root / "locks" / f"{key}.lock")
            if fd is None and (self.root / "locks" / f"{key}.lock").exists():
                continue  # a build of that key is running
            try:
                shutil.rmtree(p, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)
