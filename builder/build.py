"""A resolved preset -> one artifact folder per target."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from . import __version__, artifact, targets
from .assemble import ENTRY, INPUT_NAME, export, input_shape, output_shape
from .config import Preset, TargetConfig
from .errors import BuilderError, InputError
from .weights import load_weights

DEFAULT_OUT = Path("artifacts")
PACK_FUNCTION = "transform_params"
Progress = Callable[[str], None]


@dataclass
class Built:
    target: str
    path: Path
    seconds: float


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
    mod, params = export(model, preset.blocks, preset.dtype)
    shapes = dict(params)
    count = sum(int(np.prod(s)) for s in shapes.values())
    progress(
        f"assembled {len(params)} parameters ({count / 1e6:.1f} M), "
        f"{model.num_layers_computed} of {model.num_hidden_layers} layers computed"
    )
    arrays, source = load_weights(preset, shapes)
    what = f"random init (seed {source['seed']})" if source["kind"] == "random" else source["path"]
    progress(f"weights: {what} [{time.perf_counter() - t0:.1f} s]")
    return [
        _build_target(preset, entry, mod, params, arrays, source, out, progress) for entry in chosen
    ]


def pack_params(
    executable: tvm.runtime.Executable, order: list[str], arrays: dict[str, np.ndarray]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the executable's `transform_params` (weight layouts its pipeline chose, such as
    GEMM panels) once, at build time, so the artifact stores the packed weights and `forward`
    takes them as they are. Executables without it get the parameters unchanged."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    if not vm.module.implements_function(PACK_FUNCTION):
        return order, arrays
    packed = vm[PACK_FUNCTION](*(tvm.runtime.tensor(arrays[name]) for name in order))
    names = [f"packed.{i}" for i in range(len(packed))]
    return names, {name: t.numpy() for name, t in zip(names, packed, strict=True)}


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
    target, options = kind.tvm_target(entry)
    progress(f"[{entry.name}] compiling for {options}")
    try:
        executable = kind.compile(mod, target)
    except Exception as e:  # TVM raises many types; the message is what matters
        raise BuilderError(f"[{entry.name}] compile failed: {type(e).__name__}: {e}") from e
    progress(f"[{entry.name}] compiled [{time.perf_counter() - t0:.1f} s]")
    final = out / preset.name / entry.name
    # In the build's dtype before packing: `transform_params` takes what `forward` takes.
    arrays = artifact.cast_params(arrays, preset.dtype)
    order, stored = pack_params(executable, [name for name, _ in params], arrays)
    if stored is not arrays:
        progress(f"[{entry.name}] packed weights [{time.perf_counter() - t0:.1f} s]")
    with artifact.staging(final) as tmp:
        executable.export_library(str(tmp / kind.LIBRARY))
        artifact.save_params(tmp, order, stored)
        manifest = {
            "format": artifact.FORMAT,
            "preset": preset.name,
            "resolved_preset": preset.to_dict(),
            "target": {"name": entry.name, "kind": entry.kind, "options": options},
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
                {
                    "name": preset.model.output,
                    "shape": output_shape(preset.model, preset.blocks),
                    "dtype": "float32",
                }
            ],
            "params": {
                "file": artifact.PARAMS,
                "order": order,
                "dtype": preset.dtype,
                "packed_at_build": stored is not arrays,
            },
            # Parameters and computation; pixel values and features are float32 regardless.
            "dtype": preset.dtype,
            "weights": source,
            # What `Encoder.encode_images` and `build run` apply to an image file.
            "preprocess": dataclasses.asdict(preset.preprocess.resolved(preset.model.image_size)),
        }
        artifact.write_manifest(tmp, manifest)
    seconds = time.perf_counter() - t0
    progress(f"[{entry.name}] wrote {final} [{seconds:.1f} s]")
    return Built(entry.name, final, seconds)
