"""A resolved preset -> one artifact folder per target.

A target whose artifact is in the build cache is published without importing TVM; the rest
are made by `builder.make_artifact`, which reuses a stored library or stored parameters where
their keys match (builder/cache.py), and imports TVM only to compile or to find the library
of a build it has no plan of.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifact
from .cache import Cache
from .config import DEFAULT_OUT, Preset, TargetConfig
from .errors import BuilderError, InputError

Progress = Callable[[str], None]


@dataclass
class Built:
    target: str
    path: Path
    seconds: float
    cached: bool = False


@dataclass
class Failed:
    target: str
    reason: str
    error: Exception | None = field(default=None, repr=False)


class TargetsFailed(BuilderError):
    """Some targets could not be built; the others were written."""

    def __init__(self, built: list[Built], failed: list[Failed]):
        self.built, self.failed = built, failed
        total = len(built) + len(failed)
        lines = [f"{len(failed)} of {total} targets failed:"]
        lines += [f"  [{f.target}] {f.reason}" for f in failed]
        super().__init__("\n".join(lines))


def _quiet(_: str) -> None:
    pass


def select_targets(preset: Preset, names: list[str] | None) -> list[TargetConfig]:
    if not names:
        return preset.targets
    known = [t.name for t in preset.targets]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"--target {unknown}: not among the preset's targets {known}")
    return [t for t in preset.targets if t.name in names]


def build(
    preset: Preset,
    out: Path = DEFAULT_OUT,
    only: list[str] | None = None,
    progress: Progress = _quiet,
    force: bool = False,
    verify: bool = False,
    cache: Cache | None = None,
) -> list[Built]:
    """Every selected target: reused from the build cache when its key is there (hashing
    the cached files first with `verify`), else assembled, compiled and stored; then
    published to `out/<preset>/<target>`. `force` rebuilds whatever the cache holds."""
    chosen = select_targets(preset, only)
    cache = cache if cache is not None else Cache()
    cache.sweep()
    digest = cache.weights_digest(preset)  # a bad checkpoint path fails here, before any work
    inputs: dict[str, Any] = {}  # the exported graph and the weights, shared by the targets
    built: list[Built] = []
    failed: list[Failed] = []
    # Each target on its own: one that cannot be built does not stop the others. Bad input
    # (a checkpoint that does not fit the preset) is not a target's failure: it stops all.
    for entry in chosen:
        try:
            built.append(
                _target(preset, entry, digest, inputs, cache, out, progress, force, verify)
            )
        except (InputError, KeyboardInterrupt):
            raise
        except Exception as e:  # reported per target, then raised for them all
            reason = str(e) if isinstance(e, BuilderError) else f"{type(e).__name__}: {e}"
            progress(f"[{entry.name}] FAILED: {reason}")
            failed.append(Failed(entry.name, reason, e))
    if failed:
        raise TargetsFailed(built, failed)
    return built


def _target(
    preset: Preset,
    entry: TargetConfig,
    digest: dict[str, Any],
    inputs: dict[str, Any],
    cache: Cache,
    out: Path,
    progress: Progress,
    force: bool,
    verify: bool,
) -> Built:
    t0 = time.perf_counter()
    key = cache.artifact_key(preset, entry, digest)
    final = out / preset.name / entry.name

    def waiting() -> None:
        progress(f"[{entry.name}] waiting for another build of the same key {key[:12]}")

    with cache.lock(key, waiting):
        folder, why = (None, "--force") if force else cache.lookup(key, verify)
        if folder is None:
            from .make_artifact import make_artifact  # TVM, unless the plan is stored

            progress(f"[{entry.name}] building ({why}; cache key {key[:12]})")
            with cache.store(key) as tmp:
                make_artifact(tmp, preset, entry, key, digest, inputs, cache, progress, force)
            folder = cache.entry(key)
        else:
            progress(f"[{entry.name}] cache hit {key[:12]}")
        artifact.publish(folder, final, cache.out_lock(final))
    seconds = time.perf_counter() - t0
    progress(f"[{entry.name}] wrote {final} [{seconds:.1f} s]")
    return Built(entry.name, final, seconds, cached=not why)
