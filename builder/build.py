"""A resolved preset -> one artifact folder per target."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi

from . import __version__, artifact, precision, targets
from .assemble import ENTRY, INPUT_NAME, export, input_shape, output_shape
from .config import Preset, TargetConfig
from .errors import BuilderError, InputError
from .weights import load_weights

DEFAULT_OUT = Path("artifacts")
Progress = Callable[[str], None]


@dataclass
class Built:
    target: str
    path: Path
    seconds: float


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
) -> list[Built]:
    """Assemble, load weights, then compile and write every selected target."""
    chosen = select_targets(preset, only)
    model = preset.model
    t0 = time.perf_counter()
    mod, params = export(model, preset.blocks)
    shapes = dict(params)
    count = sum(int(np.prod(s)) for s in shapes.values())
    progress(
        f"assembled {len(params)} parameters ({count / 1e6:.1f} M), "
        f"{model.num_layers_computed} of {model.num_hidden_layers} layers computed"
    )
    arrays, source = load_weights(preset, shapes)
    what = f"random init (seed {source['seed']})" if source["kind"] == "random" else source["path"]
    progress(f"weights: {what} [{time.perf_counter() - t0:.1f} s]")
    built: list[Built] = []
    failed: list[Failed] = []
    # Each target on its own: one that cannot be built does not stop the others.
    for entry in chosen:
        try:
            built.append(_build_target(preset, entry, mod, params, arrays, source, out, progress))
        except Exception as e:  # reported per target, then raised for them all
            reason = str(e) if isinstance(e, BuilderError) else f"{type(e).__name__}: {e}"
            progress(f"[{entry.name}] FAILED: {reason}")
            failed.append(Failed(entry.name, reason, e))
    if failed:
        raise TargetsFailed(built, failed)
    return built


def _build_target(
    preset: Preset,
    entry: TargetConfig,
    mod: tvm.IRModule,
    params: list[tuple[str, tuple[int, ...]]],
    arrays: dict[str, np.ndarray],
    source: dict[str, Any],
    out: Path,
    progress: Progress,
) -> Built:
    t0 = time.perf_counter()
    kind = targets.pipeline(entry.kind)
    lacking = kind.missing(entry)
    if lacking:
        raise BuilderError(f"cannot build on this machine: {'; '.join(lacking)}")
    target, options = kind.tvm_target(entry)
    progress(f"[{entry.name}] compiling for {options}, precision {entry.precision}")
    try:
        executable = kind.compile(precision.apply(mod, entry.precision), target)
    except Exception as e:  # TVM raises many types; the message is what matters
        raise BuilderError(f"compile failed: {type(e).__name__}: {e}") from e
    progress(f"[{entry.name}] compiled [{time.perf_counter() - t0:.1f} s]")
    final = out / preset.name / entry.name
    order = [name for name, _ in params]
    with artifact.staging(final) as tmp:
        try:
            kind.export(executable, tmp / kind.LIBRARY, entry)
        except Exception as e:
            raise BuilderError(f"export failed: {type(e).__name__}: {e}") from e
        artifact.save_params(tmp, order, arrays)
        manifest = {
            "format": artifact.FORMAT,
            "preset": preset.name,
            "resolved_preset": preset.to_dict(),
            "target": {
                "name": entry.name,
                "kind": entry.kind,
                "precision": entry.precision,
                "options": options,
            },
            "runs_on": kind.runs_on(entry, options, tmp / kind.LIBRARY),
            "versions": {
                "builder": __version__,
                "tvm": tvm.__version__,
                "tvm_ffi": tvm_ffi.__version__,
            },
            "library": kind.LIBRARY,
            "entry": ENTRY,
            "inputs": [
                {"name": INPUT_NAME, "shape": input_shape(preset.model), "dtype": "float32"}
            ],
            "outputs": [
                {"name": "features", "shape": output_shape(preset.model), "dtype": "float32"}
            ],
            "params": {"file": artifact.PARAMS, "order": order},
            "weights": source,
        }
        artifact.write_manifest(tmp, manifest)
    seconds = time.perf_counter() - t0
    progress(f"[{entry.name}] wrote {final} [{seconds:.1f} s]")
    return Built(entry.name, final, seconds)
