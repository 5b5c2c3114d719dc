"""The artifact folder: `OUT/<preset>/<target>/` holding the library, the parameters and
`manifest.json`.

A folder is written under a temporary name beside its final place and renamed into place
only when complete, so a failed build leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
FORMAT = 1


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


def save_params(folder: Path, order: list[str], arrays: dict[str, np.ndarray]) -> None:
    """Write the parameters as `forward` takes them (cast and packed at build time)."""
    safetensors.numpy.save_file({name: arrays[name] for name in order}, str(folder / PARAMS))


def load_params(folder: Path, order: list[str]) -> list[np.ndarray]:
    arrays = safetensors.numpy.load_file(str(folder / PARAMS))
    return [arrays[name] for name in order]


@contextmanager
def staging(final: Path):
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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Add the sha256 and size of every file in `folder`, then write the manifest."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
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
