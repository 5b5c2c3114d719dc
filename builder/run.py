"""`build run`: image files through an artifact into a features file.

The features go to a `.npy` file (float32, shape (N, tokens, dim), row i is image i) and a
JSON record beside it (same name, `.json`) holding the image order, the shape and what made
them, so the rows can be matched to their images without the command line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

Progress = Callable[[str], None]


@dataclass
class RunRequest:
    artifact: Path
    images: list[str]
    out: Path
    batch: int = 8
    threads: int | None = None


def record_path(out: Path) -> Path:
    """The JSON record beside a features file: `feats.npy` -> `feats.json`."""
    return out.with_suffix(".json")


def _check(req: RunRequest, variable: bool) -> None:
    errors = []
    if variable and req.out.suffix != ".safetensors":
        errors.append(
            f"--out {req.out}: this artifact gives each image its own number of tokens "
            "(a crop scheme of its preprocess): the features file must end in .safetensors"
        )
    elif not variable and req.out.suffix != ".npy":
        errors.append(f"--out {req.out}: the features file must end in .npy")
    if req.batch < 1:
        errors.append(f"--batch {req.batch}: must be at least 1")
    if not req.images:
        errors.append("run: no images given")
    if errors:
        raise InputError(errors)


def run_images(req: RunRequest, progress: Progress) -> dict[str, Any]:
    """Encode `req.images` with the artifact and write the features and their record.
    Returns the record. Nothing is written unless every image was encoded."""
    from .runtime import Encoder

    try:
        enc = Encoder(req.artifact, threads=req.threads)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e  # the message names the folder
    _check(req, enc.variable_length)
    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        progress(f"encoded {done}/{total} images [{time.perf_counter() - t0:.1f} s]")

    crops: list[dict[str, Any]] = []
    features = enc.encode_images(req.images, batch_size=req.batch, progress=report, record=crops)
    record = {
        "features": req.out.name,
        "images": [str(p) for p in req.images],
        "artifact": str(req.artifact),
        "preset": enc.manifest["preset"],
        "weights": enc.manifest["weights"]["kind"],
    }
    req.out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(features, list):
        # One tensor per image, named by its index in `images`.
        from safetensors.numpy import save_file

        record.update(shapes=[list(f.shape) for f in features], dtype="float32", crops=crops)
        save_file({str(i): f for i, f in enumerate(features)}, str(req.out))
    else:
        record.update(shape=list(features.shape), dtype=str(features.dtype))
        with req.out.open("wb") as f:
            np.save(f, features)
    record_path(req.out).write_text(json.dumps(record, indent=2) + "\n")
    return record
